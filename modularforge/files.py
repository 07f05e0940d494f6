"""File helpers shared by every stage: atomic writes, JSON, checksums, safetensors with provenance.

Every file is written to a temporary name in the same folder and renamed into place, so a crash
leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from modularforge.errors import DataError
from modularforge.safetensors_stream import from_tensor, write_streaming


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; when the block succeeds, it replaces `path` (an old `path` is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"missing file: {path}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
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
