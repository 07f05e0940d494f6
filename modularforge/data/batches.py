"""Windows of tokens over a set of documents, read from the memmapped shards.

The chosen documents are treated as one stream (each ends with EOS), so a window may run across
a document boundary, as in nanoGPT's packing. Random batches are a pure function of
(seed, stream, step): resuming at step s draws exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from modularforge.data.partition import load_partition
from modularforge.data.shards import CALIB, SPLIT_NAMES, TRAIN, TokenStore
from modularforge.errors import DataError


class Windows:
    def __init__(self, store: TokenStore, doc_indices: np.ndarray, name: str = "documents"):
        order = np.lexsort((store.docs["start"][doc_indices], store.docs["shard"][doc_indices]))
        self.store = store
        self.name = name
        self.docs = np.asarray(doc_indices)[order]
        lengths = store.docs["length"][self.docs]
        self.doc_end = np.cumsum(lengths)
        self.doc_begin = self.doc_end - lengths
        self.total = int(self.doc_end[-1]) if len(self.docs) else 0
        self.bytes = int(store.docs["bytes"][self.docs].sum())

    def _require(self, length: int) -> None:
        if self.total < length:
            raise DataError(f"{self.name} hold {self.total} tokens, fewer than one window of {length}")

    def _documents(self, offsets: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Stream positions [offset, offset + length) per offset, and the document index of each: (B, length)."""
        positions = np.asarray(offsets)[:, None] + np.arange(length)
        return positions, np.searchsorted(self.doc_end, positions, side="right")

    def gather(self, offsets: np.ndarray, length: int) -> np.ndarray:
        """Tokens [offset, offset + length) of the stream for each offset: (B, length) int64."""
        positions, d = self._documents(offsets, length)
        docs = self.docs[d]
        local = self.store.docs["start"][docs] + positions - self.doc_begin[d]
        shards = self.store.docs["shard"][docs]
        out = np.empty(positions.shape, dtype=np.int64)
        for shard in np.unique(shards):
            mask = shards == shard
            out[mask] = self.store.shard(int(shard))[local[mask]]
        return out

    def _random_offsets(self, rng: np.random.Generator, batch: int, seq_len: int) -> np.ndarray:
        self._require(seq_len + 1)
        return rng.integers(0, self.total - seq_len, size=batch)

    def sample(self, rng: np.random.Generator, batch: int, seq_len: int) -> torch.Tensor:
        """A random batch of (batch, seq_len + 1) windows: inputs are [:, :-1], targets [:, 1:]."""
        return torch.from_numpy(self.gather(self._random_offsets(rng, batch, seq_len), seq_len + 1))

    def sample_labelled(self, rng: np.random.Generator, batch: int, seq_len: int, doc_labels: np.ndarray) -> torch.Tensor:
        """`sample`, with each token's document label (e.g. its partition) in the high bits: see `split_labels`."""
        offsets = self._random_offsets(rng, batch, seq_len)
        labels = doc_labels[self.docs[self._documents(offsets, seq_len + 1)[1]]].astype(np.int64)
        return torch.from_numpy(self.gather(offsets, seq_len + 1) | (labels << LABEL_SHIFT))

    def sequential(self, seq_len: int, max_tokens: int | None = None, stride: int | None = None) -> np.ndarray:
        """Offsets of deterministic windows of seq_len + 1 tokens, `stride` apart, covering at most max_tokens."""
        self._require(seq_len + 1)
        stride = stride or seq_len
        limit = self.total - seq_len - 1
        if max_tokens is not None:
            limit = min(limit, max(0, max_tokens - seq_len - 1))
        return np.arange(0, limit + 1, stride)

    def batches(self, offsets: np.ndarray, seq_len: int, batch: int) -> Iterator[torch.Tensor]:
        for i in range(0, len(offsets), batch):
            yield torch.from_numpy(self.gather(offsets[i : i + batch], seq_len + 1))


LABEL_SHIFT = 32  # token ids stay below 2**31; a label rides above them, so labelled batches are one tensor


def split_labels(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) of a batch from `sample_labelled`; an unlabelled batch gives labels of 0."""
    return batch & ((1 << LABEL_SHIFT) - 1), batch >> LABEL_SHIFT


def batch_rng(seed: int, stream: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, step])


class PreparedData:
    """The prepared corpus of a run: token store plus partition and split of every document."""

    def __init__(self, data_dir: Path):
        self.store = TokenStore.open(data_dir)
        self.partition, self.split = load_partition(data_dir)
        if len(self.partition) != self.store.num_documents:
            raise DataError(f"{data_dir}/partition.npz does not match the token shards; rerun `modularforge prepare`")

    @property
    def num_partitions(self) -> int:
        return int(self.partition.max()) + 1

    def windows(self, split: int | tuple[int, ...], partition: int | None = None) -> Windows:
        """The documents of one split, or of several, of one partition or of all."""
        mask = np.isin(self.split, split)
        if partition is not None:
            mask &= self.partition == partition
        where = "all partitions" if partition is None else f"partition {partition}"
        names = " and ".join(SPLIT_NAMES[s] for s in np.atleast_1d(split))
        docs = np.flatnonzero(mask)
        if not len(docs):
            raise DataError(f"no {names} documents in {where}")
        return Windows(self.store, docs, name=f"{names} documents of {where}")

    def documents(self, split: int, partition: int) -> int:
        return int(np.count_nonzero((self.split == split) & (self.partition == partition)))

    def held_out(self, partition: int, tokens: int) -> Windows:
        """The partition's calibration documents, for router statistics and calibration; when they hold fewer
        than `tokens` tokens, its training documents too. A split by whole books can leave a partition a single
        short calibration document (765 tokens against 65K asked, in the quality benchmark), and statistics
        that small misplace the expert's centroid and shrink its share in the pooled solve."""
        calib = self.windows(CALIB, partition)
        if calib.total > tokens:
            return calib
        docs = np.flatnonzero((self.partition == partition) & np.isin(self.split, (CALIB, TRAIN)))
        return Windows(self.store, docs, name=f"calib and train documents of partition {partition}")


def spread_batches(windows: Windows, tokens: int, seq_len: int, micro_batch: int) -> list[torch.Tensor]:
    """Windows covering about `tokens` tokens, spread evenly over the stream (not its first documents only)."""
    return fixed_batches(windows, max(1, -(-tokens // seq_len)), seq_len, micro_batch)


def document_batches(windows: Windows, tokens: int, seq_len: int, micro_batch: int) -> tuple[list[torch.Tensor], np.ndarray]:
    """About `tokens` tokens in windows spread evenly over the stream without overlapping (fewer where the text
    is shorter), in micro-batches; and the document each window mostly lies in (its middle token's)."""
    windows._require(2)
    seq_len = min(seq_len, windows.total - 1)
    count = max(1, min(tokens // seq_len, (windows.total - 1) // seq_len))
    offsets = np.unique(np.linspace(0, windows.total - seq_len - 1, count).astype(np.int64))
    documents = windows.docs[np.searchsorted(windows.doc_end, offsets + seq_len // 2, side="right")]
    return list(windows.batches(offsets, seq_len, micro_batch)), documents


def fixed_batches(windows: Windows, count: int, seq_len: int, micro_batch: int) -> list[torch.Tensor]:
    """`count` windows spread evenly over the stream, in micro-batches: the same ones at every validation.
    A held-out set shorter than one window (a small partition of a small corpus) gives shorter windows."""
    windows._require(2)
    seq_len = min(seq_len, windows.total - 1)
    offsets = np.unique(np.linspace(0, windows.total - seq_len - 1, count).astype(np.int64))
    return list(windows.batches(offsets, seq_len, micro_batch))
