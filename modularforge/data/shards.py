"""Token ids in memory-mapped shards, with an index of documents (DESIGN.md section 5).

    data/tokens-00000.bin   raw uint16 (uint32 when the vocabulary needs it) ids, EOS after each document
    data/documents.npz      per document: shard, start, length (with EOS), utf-8 bytes, split, source label
    data/documents.json     document ids and the list of source labels
    data/shards.json        dtype, EOS id, shard files with token counts and sha256

A document never crosses a shard. Splits come from a hash of the document id (or of its group,
with data.split_unit=group), so they do not depend on the order of sources or on the seed.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from modularforge.config import DataConfig
from modularforge.errors import DataError, os_error
from modularforge.files import atomic_path, read_arrays, read_json, sha256_file, temp_name, write_json
from modularforge.schemas import Documents, Shards

if TYPE_CHECKING:  # the writer's types; readers of the shards (every later stage) need neither library
    from tokenizers import Tokenizer

    from modularforge.data.sources import Document

TRAIN, CALIB, VAL = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", CALIB: "calib", VAL: "val"}
SHARD_MAX_TOKENS = 1 << 28  # 512 MiB of uint16
DOCUMENT_COLUMNS = ("shard", "start", "length", "bytes", "split", "label")  # of documents.npz, one entry per document


def split_of(key: str, cfg: DataConfig) -> int:
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "little") / 2**64
    if h < cfg.val_fraction:
        return VAL
    if h < cfg.val_fraction + cfg.calib_fraction:
        return CALIB
    return TRAIN


def write_shards(docs: Iterable[Document], tokenizer: Tokenizer, eos: int, cfg: DataConfig, out_dir: Path,
                 vocab_size: int | None = None, bos: int | None = None) -> dict:
    """Tokenise `docs` into shards under `out_dir`, `eos` after each document; return the shard manifest. The
    manifest records `vocab_size`, the model's (a base's embeddings may have more rows than its tokenizer has ids;
    default the tokenizer's), and `bos`, a base's beginning-of-text token (ours: `eos`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = vocab_size or tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    columns: dict[str, list[int]] = {k: [] for k in DOCUMENT_COLUMNS}
    ids: list[str] = []
    labels: dict[str, int] = {}
    shards: list[dict] = []
    writer = _ShardWriter(out_dir, dtype)
    progress = tqdm(desc="tokenize", unit=" docs", disable=None)
    try:
        for batch in _batched(docs, 256):
            encodings = tokenizer.encode_batch([d.text for d in batch], add_special_tokens=False)
            for doc, enc in zip(batch, encodings):
                tokens = np.asarray(enc.ids + [eos], dtype=dtype)
                shard, start = writer.append(tokens)
                columns["shard"].append(shard)
                columns["start"].append(start)
                columns["length"].append(len(tokens))
                columns["bytes"].append(len(doc.text.encode("utf-8")))
                columns["split"].append(split_of(doc.group if cfg.split_unit == "group" else doc.id, cfg))
                columns["label"].append(labels.setdefault(doc.source, len(labels)))
                ids.append(doc.id)
            progress.update(len(batch))
        shards = writer.close()
    except BaseException:
        writer.abort()  # a partial shard would keep a full disk full
        raise
    finally:
        progress.close()
    if not ids:
        raise DataError("the data sources hold no documents of at least data.min_chars characters")
    arrays = {k: np.asarray(v, dtype=np.int64) for k, v in columns.items()}
    with atomic_path(out_dir / "documents.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    write_json(out_dir / "documents.json", {"ids": ids, "labels": list(labels)})
    manifest = {
        "dtype": np.dtype(dtype).name,
        "eos_id": eos,
        **({"bos_id": bos} if bos is not None else {}),
        "vocab_size": vocab,
        "num_documents": len(ids),
        "num_tokens": int(arrays["length"].sum()),
        "shards": shards,
    }
    write_json(out_dir / "shards.json", manifest)
    return manifest


def _batched(items: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _ShardWriter:
    def __init__(self, out_dir: Path, dtype: type):
        self.out_dir, self.dtype = out_dir, dtype
        self.shards: list[dict] = []
        self._open()

    def _open(self) -> None:
        self.path = self.out_dir / f"tokens-{len(self.shards):05d}.bin"
        self.tmp = temp_name(self.path)
        try:
            self.file = open(self.tmp, "wb")
        except OSError as e:
            raise os_error(e, self.path, "cannot write") from None
        self.count = 0

    def _seal(self) -> None:
        try:
            self.file.close()
            self.tmp.replace(self.path)
        except OSError as e:
            raise os_error(e, self.path, "cannot write") from None
        self.shards.append({"file": self.path.name, "tokens": self.count, "sha256": sha256_file(self.path)})

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)

    def append(self, tokens: np.ndarray) -> tuple[int, int]:
        if self.count and self.count + len(tokens) > SHARD_MAX_TOKENS:
            self._seal()
            self._open()
        start = self.count
        try:
            self.file.write(tokens.tobytes())
        except OSError as e:
            raise os_error(e, self.path, "cannot write") from None
        self.count += len(tokens)
        return len(self.shards), start

    def close(self) -> list[dict]:
        self._seal()
        return self.shards


@dataclass
class TokenStore:
    """Read side of the shards: document index plus a fresh memmap per access.

    The memmap is re-opened on every read (as nanoGPT does) so pages from earlier reads are
    unmapped and do not accumulate in the process's resident memory.
    """

    data_dir: Path
    dtype: np.dtype
    eos_id: int
    shard_files: list[Path]
    docs: dict[str, np.ndarray]
    ids: list[str]
    labels: list[str]

    @classmethod
    def open(cls, data_dir: Path) -> TokenStore:
        """The store `write_shards` wrote in `data_dir`; a file of it missing, damaged or at odds with another is a
        DataError naming the file."""
        data_dir = Path(data_dir)
        manifest = read_json(data_dir / "shards.json", Shards)
        meta = read_json(data_dir / "documents.json", Documents)
        path = data_dir / "documents.npz"
        docs = read_arrays(path, DOCUMENT_COLUMNS, Documents.fix)
        files = [data_dir / s["file"] for s in manifest["shards"]]
        for f, s in zip(files, manifest["shards"]):
            if not f.is_file() or f.stat().st_size != s["tokens"] * np.dtype(manifest["dtype"]).itemsize:
                raise DataError(f"token shard {f} is missing or has the wrong size; rerun `modularforge prepare`")
        problem = _index_problem(docs, len(meta["ids"]), len(meta["labels"]), [s["tokens"] for s in manifest["shards"]])
        if problem:
            raise DataError(f"{path} {problem}; {Documents.fix}")
        return cls(data_dir, np.dtype(manifest["dtype"]), manifest["eos_id"], files, docs, meta["ids"], meta["labels"])

    @property
    def num_documents(self) -> int:
        return len(self.ids)

    def shard(self, index: int) -> np.memmap:
        return np.memmap(self.shard_files[index], dtype=self.dtype, mode="r")

    def document(self, index: int) -> np.ndarray:
        start, length = self.docs["start"][index], self.docs["length"][index]
        return np.array(self.shard(int(self.docs["shard"][index]))[start : start + length])


def _index_problem(docs: dict[str, np.ndarray], documents: int, labels: int, shard_tokens: list[int]) -> str | None:
    """What is wrong with the document index of documents.npz, given documents.json and shards.json, or None."""
    if len(docs["shard"]) != documents:
        return f"has {len(docs['shard'])} documents, documents.json {documents}"
    if not documents:
        return None
    shard, start, length = docs["shard"], docs["start"], docs["length"]
    if shard.min() < 0 or shard.max() >= len(shard_tokens):
        return f"names a shard past the {len(shard_tokens)} of shards.json"
    if start.min() < 0 or length.min() < 1 or (start + length > np.asarray(shard_tokens)[shard]).any():
        return "places a document outside its shard"
    if not np.isin(docs["split"], list(SPLIT_NAMES)).all():
        return "has a split other than train, calib and val"
    if docs["label"].min() < 0 or docs["label"].max() >= labels:
        return "has a source label past those of documents.json"
    return None
