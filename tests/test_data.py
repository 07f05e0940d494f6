import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from modularforge.config import DataConfig, TokenizerConfig
from modularforge.data import sources
from modularforge.data.batches import PreparedData, batch_rng, fixed_batches, spread_batches
from modularforge.data.partition import balanced_kmeans, capacity_assign, cluster_purity, load_partition
from modularforge.data.shards import CALIB, TRAIN, VAL, TokenStore
from modularforge.data.sources import iter_documents, split_paragraphs
from modularforge.data.tokenizer import load_tokenizer, token_byte_lengths, train_tokenizer
from modularforge.errors import DataError
from modularforge.prepare import prepare
from modularforge.runs import Run

TEXT = "Fellow-Citizens of the Senate and House: naïve café — 3.14 ÷ 2, 東京, emoji 🚀.\n\nA hacker is a person."


def test_tokenizer_round_trips_text_and_loads_in_transformers(tmp_path):
    tok = train_tokenizer([TEXT * 20, "the state of the union " * 50], TokenizerConfig(vocab_size=300), 64, tmp_path)
    assert tok.decode(tok.encode(TEXT, add_special_tokens=False).ids) == TEXT
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf(TEXT)["input_ids"] == tok.encode(TEXT, add_special_tokens=False).ids
    assert hf.decode(hf(TEXT)["input_ids"]) == TEXT
    assert hf.eos_token == "<|endoftext|>"
    lengths = token_byte_lengths(load_tokenizer(tmp_path))
    ids = tok.encode(TEXT).ids
    assert lengths[ids].sum() == len(TEXT.encode("utf-8"))


def test_reads_txt_jsonl_parquet_folders_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 100)
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "b1", "text": "beta " * 100}) + "\n")
    pq.write_table(pa.table({"text": ["gamma " * 100, "delta " * 100]}), tmp_path / "c.parquet")
    docs = list(iter_documents(DataConfig(sources=[str(tmp_path)], min_chars=10)))
    assert sorted(d.text.split()[0] for d in docs) == ["alpha", "beta", "delta", "gamma"]
    globbed = list(iter_documents(DataConfig(sources=[str(tmp_path / "*.jsonl")], min_chars=10)))
    assert [d.id for d in globbed] == ["b1"]
    assert {d.source for d in docs} == {"a", "b", "c"}


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="data source not found: nope.txt"):
        list(iter_documents(DataConfig(sources=["nope.txt"])))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not valid JSON"):
        list(iter_documents(DataConfig(sources=[str(tmp_path / "bad.jsonl")], min_chars=1)))
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="has no string field 'text'"):
        list(iter_documents(DataConfig(sources=[str(tmp_path / "nofield.jsonl")])))
    with pytest.raises(DataError, match="matched no"):
        list(iter_documents(DataConfig(sources=[str(tmp_path / "*.xyz")])))


def test_hub_dataset_offline_fails_at_once_and_points_to_local_files(monkeypatch, tmp_path):
    pytest.importorskip("datasets")
    monkeypatch.setattr(sources, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # restored after the test
        monkeypatch.setenv(name, "0")
    import time

    start = time.perf_counter()
    with pytest.raises(DataError) as e:
        list(iter_documents(DataConfig(dataset="wikitext-103")))
    assert time.perf_counter() - start < 30
    assert "Salesforce/wikitext" in str(e.value) and "data.sources" in str(e.value)


def test_long_documents_are_cut_at_paragraphs():
    text = "\n\n".join(f"paragraph {i} " + "word " * 50 for i in range(20))
    pieces = split_paragraphs(text, 1000)
    assert all(len(p) <= 1000 for p in pieces)
    assert "\n\n".join(pieces).split() == text.split()


def test_capacity_assign_respects_capacity_and_assigns_everything():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(200, 4))
    sim[:, 0] += 2  # everyone prefers cluster 0
    weights = rng.integers(1, 10, 200).astype(float)
    capacity = 1.1 * weights.sum() / 4
    a = capacity_assign(sim, weights, capacity)
    assert set(a) == {0, 1, 2, 3}
    loads = np.bincount(a, weights=weights, minlength=4)
    assert loads.max() <= capacity + weights.max()


def test_balanced_kmeans_recovers_separated_groups():
    rng = np.random.default_rng(0)
    centers = np.eye(8)[:4] * 5
    x = np.concatenate([c + rng.normal(size=(50, 8)) for c in centers])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.repeat(np.arange(4), 50)
    centroids = balanced_kmeans(x, np.ones(200), 4, 1.2, 30, rng)
    assignment = capacity_assign(x @ centroids.T, np.ones(200), 1.2 * 50)
    assert cluster_purity(labels, assignment) > 0.95


@pytest.mark.parametrize("method", ["clustered", "random", "curriculum"])
def test_partitions_are_deterministic_disjoint_and_complete(make_config, method):
    partition_cfg = {"method": method}
    first = Run(make_config(partition=partition_cfg))
    prepare(first)
    a, split_a = load_partition(first.data_dir)
    second = Run(make_config(partition=partition_cfg, run={"name": "again"}))
    prepare(second)
    b, split_b = load_partition(second.data_dir)
    store = TokenStore.open(first.data_dir)
    assert np.array_equal(a, b) and np.array_equal(split_a, split_b)
    assert len(a) == store.num_documents  # every document has exactly one partition
    assert set(a.tolist()) == {0, 1, 2, 3}
    for p in range(4):  # each partition has all three splits
        assert {TRAIN, CALIB, VAL} <= set(split_a[a == p].tolist())
    report = json.loads((first.data_dir / "partitions.json").read_text())
    assert sum(p["train_documents"] + p["val_documents"] + p["calib_documents"] for p in report["partitions"]) == len(a)


def test_clustering_separates_the_two_domains(make_config):
    run = Run(make_config(model={"num_experts": 2, "top_k": 1}))
    prepare(run)
    report = json.loads((run.data_dir / "partitions.json").read_text())
    assert report["purity"] > 0.9
    assert all(p["top_terms"] for p in report["partitions"])


def test_windows_gather_across_document_boundaries(make_config):
    run = Run(make_config())
    prepare(run)
    data = PreparedData(run.data_dir)
    w = data.windows(TRAIN, 0)
    stream = np.concatenate([data.store.document(i) for i in w.docs])
    assert len(stream) == w.total
    offsets = np.array([0, 5, w.total - 40])
    got = w.gather(offsets, 33)
    for row, off in zip(got, offsets):
        assert np.array_equal(row, stream[off : off + 33])
    eos = data.store.eos_id
    assert np.count_nonzero(stream == eos) == len(w.docs)  # EOS ends every document
    a = w.sample(batch_rng(0, 1, 7), 4, 16)
    b = w.sample(batch_rng(0, 1, 7), 4, 16)
    assert a.shape == (4, 17) and bool((a == b).all())
    # a held-out set shorter than one window validates on shorter windows instead of failing
    short = fixed_batches(w, 4, w.total + 100, 2)
    assert {tuple(b.shape[1:]) for b in short} == {(w.total,)}


def test_held_out_windows_add_training_documents_when_calibration_is_short(make_config):
    run = Run(make_config())
    prepare(run)
    data = PreparedData(run.data_dir)
    calib = data.windows(CALIB, 0)
    assert data.held_out(0, calib.total - 1).total == calib.total  # enough held-out text: only that
    topped = data.held_out(0, calib.total + 1)
    train = data.windows(TRAIN, 0)
    assert topped.total == calib.total + train.total
    assert set(topped.docs) == set(calib.docs) | set(train.docs)
    # spread windows reach the end of the stream, not only its first documents
    batches = spread_batches(topped, 4 * 16, 16, 2)
    rows = torch.cat(batches)
    assert rows.shape == (4, 17)
    assert torch.equal(rows[-1], torch.from_numpy(topped.gather(np.array([topped.total - 17]), 17)[0]))


def test_sentence_embedding_clustering_with_the_locally_installed_model(make_config):
    run = Run(make_config(model={"num_experts": 2, "top_k": 1}, partition={"features": "embeddings"}))
    prepare(run)
    report = json.loads((run.data_dir / "partitions.json").read_text())
    assert report["features"] == "embeddings"
    assert report["purity"] > 0.9


def test_source_partitions_are_the_corpora_and_must_match_the_expert_count(make_config, capsys):
    from modularforge.errors import DataError

    run = Run(make_config(partition={"method": "source"}, model={"num_experts": 2, "top_k": 1}))
    prepare(run)
    assignment, _ = load_partition(run.data_dir)
    store = TokenStore.open(run.data_dir)
    assert np.array_equal(assignment, store.docs["label"])  # one corpus folder, one partition
    report = json.loads((run.data_dir / "partitions.json").read_text())
    assert report["purity"] == 1.0
    with pytest.raises(DataError, match="model.num_experts=2"):
        prepare(Run(make_config(partition={"method": "source"}, run={"name": "four"})))


@pytest.mark.parametrize("method", ["clustered", "curriculum"])
def test_saved_partitioner_assigns_new_text_as_prepare_did(make_config, method):
    from modularforge.data.partition import Partitioner
    from modularforge.data.tokenizer import load_tokenizer

    run = Run(make_config(partition={"method": method}))
    prepare(run)
    assignment, split = load_partition(run.data_dir)
    store = TokenStore.open(run.data_dir)
    held_out = np.flatnonzero(split != TRAIN)
    partitioner = Partitioner.load(run.data_dir / "partitioner.npz")
    again = partitioner.assign([store.document(i)[:-1] for i in held_out], load_tokenizer(run.tokenizer_dir))
    moved = np.asarray(split)[held_out] != store.docs["split"][held_out]  # tiny corpora borrow training documents
    assert np.array_equal(again[~moved], assignment[held_out][~moved])


def test_labelled_windows_carry_each_tokens_partition(make_config):
    from modularforge.data.batches import split_labels

    run = Run(make_config(model={"num_experts": 2, "top_k": 1}))
    prepare(run)
    data = PreparedData(run.data_dir)
    w = data.windows(TRAIN)
    plain = w.sample(batch_rng(0, 1, 3), 6, 40)
    tokens, labels = split_labels(w.sample_labelled(batch_rng(0, 1, 3), 6, 40, data.partition))
    assert torch.equal(tokens, plain)  # the same windows as the unlabelled draw
    stream_labels = np.concatenate([np.full(data.store.docs["length"][d], data.partition[d]) for d in w.docs])
    offsets = batch_rng(0, 1, 3).integers(0, w.total - 40, size=6)
    expected = np.stack([stream_labels[o : o + 41] for o in offsets])
    assert np.array_equal(labels.numpy(), expected) and len(np.unique(expected)) == 2
    assert torch.equal(split_labels(plain)[0], plain) and not split_labels(plain)[1].any()
