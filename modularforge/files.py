"""File helpers shared by every stage: atomic writes, JSON, checksums, safetensors with provenance.

Every file is written to a temporary name in the same folder and renamed into place, so a crash
leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from modularforge.errors import DataError, FileSystemError, os_error
from modularforge.safetensors_stream import from_tensor, write_streaming
from modularforge.schemas import FileSchema, MetricsRecord, check


_calls = itertools.count()  # next() on a count is atomic under the GIL, so threads get distinct names too
LEFTOVER = re.compile(r"^\..+\.(tmp|old)-\d+(-\d+)?$")


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """A name beside `path` unique to this process and call, `.{name}.{kind}-{pid}-{n}`: two writers never share
    one. A process killed mid-write leaves it behind; `remove_leftovers` deletes such names on the next run."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{next(_calls)}")


def remove_leftovers(root: str | Path) -> list[Path]:
    """Delete the temporary files and folders that killed writers left anywhere under `root`; returns them.
    Only safe while no other process writes under `root` (the run directory's lock)."""
    removed = []
    for folder, dirs, files in os.walk(root):
        for name in [d for d in dirs if LEFTOVER.match(d)]:
            dirs.remove(name)
            shutil.rmtree(Path(folder) / name, ignore_errors=True)
            removed.append(Path(folder) / name)
        for name in (f for f in files if LEFTOVER.match(f)):
            with contextlib.suppress(OSError):
                (Path(folder) / name).unlink()
                removed.append(Path(folder) / name)
    return removed


def _write_error(e: OSError, target: Path, tmp: Path) -> FileSystemError:
    """Name the target of the write, unless the error is about another file (an input read inside the block)."""
    if e.filename is not None and not str(e.filename).startswith(str(tmp)) and Path(e.filename) != target:
        return os_error(e, e.filename, "cannot access")
    return os_error(e, target, "cannot write")


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, path.parent, "cannot create folder") from None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds. An OSError
    (full disk, permissions) becomes a FileSystemError naming `path`; the temporary file is always removed."""
    path = Path(path)
    if path.is_dir():
        raise FileSystemError(f"cannot write {path}: is a folder, not a file; give a file name")
    _make_parent(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(e, path, tmp) from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; when the block succeeds, it replaces `path` (an old `path` is removed).
    Errors are as in `atomic_path`; if the final rename fails, the old `path` is put back."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileSystemError(f"cannot write {path}: is a file, not a folder")
    _make_parent(path)
    tmp = temp_name(path)
    old = temp_name(path, "old")
    try:
        tmp.mkdir()
        yield tmp
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists() and not path.exists():
                os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise _write_error(e, path, tmp) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path, schema: type[FileSchema] | None = None) -> Any:
    """The parsed JSON file at `path`, checked against `schema` (modularforge.schemas) when given: a missing,
    unreadable or malformed file, or one of the wrong shape, is a DataError naming it and what is wrong."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"missing file: {path}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise os_error(e, path, "cannot read") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    return value if schema is None else check(value, schema, path)


def read_arrays(path: str | Path, names: tuple[str, ...], fix: str) -> dict[str, np.ndarray]:
    """The named arrays of an .npz file, each one-dimensional, of integers and of one length; a missing, truncated
    or damaged file, or one without these arrays, is a DataError naming it and what is wrong, and saying `fix`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path}; {fix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [name for name in names if name not in z.files]
            if missing:
                raise DataError(f"{path} lacks the array '{missing[0]}'; {fix}")
            arrays = {name: z[name] for name in names}
    except DataError:
        raise
    except OSError as e:
        raise os_error(e, path, "cannot read") from None
    except Exception as e:  # zipfile, numpy and zlib raise several types for a truncated or damaged archive
        raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}: {e}); {fix}") from None
    for name, array in arrays.items():
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise DataError(f"{path}: '{name}' must be a list of whole numbers, got a {array.ndim}-d array of "
                            f"{array.dtype}; {fix}")
        if len(array) != len(arrays[names[0]]):
            raise DataError(f"{path}: '{name}' has {len(array)} entries, '{names[0]}' {len(arrays[names[0]])}; {fix}")
    return arrays


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(chunk_bytes):
                digest.update(chunk)
    except OSError as e:
        raise os_error(e, path, "cannot read") from None
    return digest.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> str:
    """Save tensors as safetensors (atomically) with string metadata; return the file's sha256.

    The same tensors and metadata always give the same bytes (safetensors' own writer orders metadata
    keys randomly), so a file's checksum identifies its content."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in sorted((metadata or {}).items())}
    ordered = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    with atomic_path(path) as tmp:
        write_streaming(tmp, [from_tensor(k, v) for k, v in ordered], meta)
    return sha256_file(path)


def load_tensors(path: str | Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load (some) tensors of a safetensors file; a missing or corrupted file is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in (keys if keys is not None else f.keys())}
    except Exception as e:  # safetensors raises several types for a damaged header or body
        raise DataError(f"cannot read {path}: {e}") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise DataError(f"cannot read {path}: {e}") from None


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a training run's `metrics.jsonl` (none when it does not exist)."""
    if not Path(path).exists():
        return []
    return [record for _, record in metric_lines(Path(path))]


def metric_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of each line of a metrics file, less a last line torn by a crash in mid-write (resuming
    writes it again); any other line that is not a record is a DataError naming the file and line."""
    try:
        lines = [line for line in path.read_text().splitlines() if line]
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise os_error(e, path, "cannot read") from None
    records = []
    for number, line in enumerate(lines, 1):
        where = f"{path}, line {number}"
        try:
            records.append((line, check(_json_line(line, where), MetricsRecord, where)))
        except DataError:
            if number < len(lines):
                raise
    return records


def _json_line(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not valid JSON ({e.msg}); {MetricsRecord.fix}") from None
