"""Stream tensors between safetensors files in bounded memory.

The `safetensors` library writes a file from a dict of tensors held in memory (and copies each one
to bytes first), and reading through `safe_open` maps the whole input, whose touched pages count
toward resident memory. Assembly must not grow with the model, so it copies tensor bytes straight
from the input file's data section to the output in fixed-size chunks. The format is the documented
one: an 8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}
padded with spaces to 8 bytes, then the tensor bytes back to back.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from modularforge.errors import DataError

CHUNK_BYTES = 2 << 20  # 8 MiB chunks cost 6 MiB more peak memory in assembly and were no faster

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor table and metadata of a safetensors file; a truncated or damaged file is a DataError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8 or header_len > 100 << 20:
                raise ValueError("header length past the end of the file")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise DataError(f"missing file: {path}") from None
    except (OSError, ValueError, struct.error) as e:
        raise DataError(f"{path} is not a readable safetensors file ({e})") from None
    data_start = 8 + header_len
    if not isinstance(header, dict):
        raise DataError(f"{path} is not a readable safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", {}) or {}
    for name, entry in header.items():
        problem = _entry_problem(entry)
        if problem:
            raise DataError(f"{path}: tensor {name} {problem}; the file is damaged or not a safetensors file")
    table = {}
    expected = 0
    for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = entry["data_offsets"]
        count = int(np.prod(entry["shape"])) if entry["shape"] else 1
        itemsize = DTYPES[entry["dtype"]].itemsize
        if begin != expected or end - begin != count * itemsize:
            raise DataError(f"{path}: tensor {name} has inconsistent offsets; the file is damaged")
        expected = end
        table[name] = TensorInfo(name, entry["dtype"], tuple(entry["shape"]), data_start + begin, data_start + end)
    if data_start + expected != size:
        raise DataError(f"{path} is {size} bytes but its header describes {data_start + expected}; the file is damaged")
    return table, metadata


def checked_header(path: str | Path, expected: dict[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    """The tensor table of a file that must hold exactly the `expected` tensors at their shapes; else a DataError
    naming the file and the first difference."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing input: {path}")
    table, _ = read_header(path)
    missing = sorted(set(expected) - set(table))
    extra = sorted(set(table) - set(expected))
    if missing or extra:
        raise DataError(f"{path} does not match the config: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in expected.items():
        if table[name].shape != shape:
            raise DataError(f"{path}: {name} has shape {list(table[name].shape)}, the config needs {list(shape)}")
    return table


def _entry_problem(entry: object) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(entry, dict):
        return "has no header entry"
    if entry.get("dtype") not in DTYPES:
        return f"has dtype {entry.get('dtype')!r}, which is not one of {', '.join(DTYPES)}"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return f"has an invalid shape {shape!r}"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) and o >= 0 for o in offsets):
        return f"has invalid data offsets {offsets!r}"
    return None


def read_tensors(path: str | Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Named tensors (default: all) of a file, each read into fresh memory. Tensors from `safe_open` are views
    of one mapping of the whole file, which stays mapped (its touched pages resident) while any of them lives,
    and a view written to (a trained weight) gets private copies of its pages beside the file's; these hold
    exactly their own bytes."""
    table, _ = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for name in table if names is None else names:
            if name not in table:
                raise DataError(f"{path} has no tensor {name}")
            info = table[name]
            tensor = torch.empty(info.shape, dtype=DTYPES[info.dtype], device="cpu")  # files are read on the CPU
            f.seek(info.begin)
            if f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != info.nbytes:
                raise DataError(f"{path} ended early while reading {name}")
            out[name] = tensor
    return out


Source = tuple[TensorInfo, Callable[[BinaryIO], None]]  # what to write, and a function writing its bytes


def from_file(path: str | Path, info: TensorInfo, on_read: Callable[[Path, str], None] | None = None,
              name: str | None = None) -> Source:
    """A source that copies `info`'s bytes from `path` in CHUNK_BYTES pieces, under `name` (default: its own)."""

    def copy(out: BinaryIO) -> None:
        if on_read is not None:
            on_read(Path(path), info.name)
        with open(path, "rb") as f:
            f.seek(info.begin)
            left = info.nbytes
            while left:
                chunk = f.read(min(left, CHUNK_BYTES))
                if not chunk:
                    raise DataError(f"{path} ended early while reading {info.name}")
                out.write(chunk)
                left -= len(chunk)

    return (info if name is None else replace(info, name=name)), copy


def from_tensor(name: str, tensor: torch.Tensor) -> Source:
    tensor = tensor.detach().contiguous()
    info = TensorInfo(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), 0, tensor.numel() * tensor.element_size())

    def copy(out: BinaryIO) -> None:
        out.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))

    return info, copy


def write_streaming(path: str | Path, sources: Iterable[Source], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file from `sources` one tensor at a time; return the bytes of tensor data."""
    sources = list(sources)
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for info, _ in sources:
        header[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for _, copy in sources:
            copy(out)
    return offset
