"""Shared fixtures: a tiny two-domain corpus cut from the bundled sample, a tiny config, and one tiny
run trained through assembly once per test run (tests that only read it share it).

The tiny config computes on MODULARFORGE_TEST_DEVICE (default cpu), so the same suite runs on a GPU:
`MODULARFORGE_TEST_DEVICE=cuda python -m pytest`."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import pytest
import torch

from bases import LLAMA3, hf_folder, tokenizer_folder
from modularforge.config import Config, config_from_dict
from modularforge.runs import Run

torch.set_num_threads(2)
os.environ.setdefault("MODULARFORGE_CACHE", tempfile.mkdtemp(prefix="modularforge-cache-"))  # GGUF metadata
TEST_DEVICE = os.environ.get("MODULARFORGE_TEST_DEVICE", "cpu")


def _bundled_records(name: str) -> list[dict]:
    path = resources.files("modularforge.bundled") / f"{name}.jsonl.gz"
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """Two folders of .jsonl: 30 speeches and 30 jargon blocks, the first 4000 characters of each."""
    root = tmp_path_factory.mktemp("corpus")
    for name in ("us_state_of_the_union", "jargon_file"):
        folder = root / name
        folder.mkdir()
        with open(folder / "train-00000.jsonl", "w") as f:
            for r in _bundled_records(name)[:30]:
                f.write(json.dumps({"id": r["id"], "text": r["text"][:4000]}) + "\n")
    return root


def tiny_config_dict(corpus: Path, root: Path, **sections) -> dict:
    train = {"batch_size": 8, "lr": 3e-3, "eval_interval": 10, "eval_batches": 1, "log_interval": 10,
             "checkpoint_interval": 5, "precision": "fp32"}
    base = {
        "run": {"name": "tiny", "root": str(root), "seed": 0, "device": TEST_DEVICE},
        "data": {"sources": [str(corpus)], "max_doc_chars": 1500, "val_fraction": 0.1, "calib_fraction": 0.1},
        "tokenizer": {"vocab_size": 512},
        "partition": {"svd_dim": 16},
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
                  "max_seq_len": 32, "num_experts": 4, "top_k": 2},
        "budget": {"total_tokens": 40 * 8 * 32, "shared_fraction": 0.5},
        "train": train,
        "experts": {"stats_tokens": 512, "train": dict(train)},
        "calibrate": {"calib_tokens": 1024, "temperatures": [0.5, 1.0, 2.0]},
        "evaluate": {"eval_tokens": 512, "prefix_len": 8, "sample_tokens": 8, "sample_prompts": ["The"]},
        "generate": {"max_new_tokens": 8},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return base


@pytest.fixture
def make_config(tiny_corpus, tmp_path):
    def make(**sections) -> Config:
        return config_from_dict(tiny_config_dict(tiny_corpus, tmp_path / "runs", **sections))

    return make


@pytest.fixture(scope="module")
def make_config_module(tiny_corpus, tmp_path_factory):
    """`make_config` for module-scoped fixtures: runs under one folder of the module."""
    root = tmp_path_factory.mktemp("runs")

    def make(**sections) -> Config:
        return config_from_dict(tiny_config_dict(tiny_corpus, root, **sections))

    return make


@pytest.fixture(scope="session")
def trained_run(tiny_corpus, tmp_path_factory) -> Run:
    """A tiny run through every stage up to calibrate (read-only for tests)."""
    from modularforge.assemble import assemble
    from modularforge.calibrate import calibrate
    from modularforge.prepare import prepare
    from modularforge.train.experts import train_experts
    from modularforge.train.shared import train_shared

    logging.getLogger("modularforge").setLevel(logging.WARNING)
    cfg = config_from_dict(tiny_config_dict(tiny_corpus, tmp_path_factory.mktemp("runs")))
    run = Run(cfg)
    for stage in (prepare, train_shared, train_experts, assemble, calibrate):
        stage(run)
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Run:
    """A private copy of the trained run that a test may damage."""
    target = tmp_path / "run"
    shutil.copytree(trained_run.dir, target)
    return Run(trained_run.cfg, target)


# --- tiny pretrained bases (tests/bases.py) ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def base_tokenizer(tiny_corpus, tmp_path_factory) -> Path:
    texts = [json.loads(line)["text"] for f in sorted(tiny_corpus.rglob("*.jsonl")) for line in f.open()]
    return tokenizer_folder(texts, tmp_path_factory.mktemp("base-tokenizer"), vocab_size=400)


@pytest.fixture(scope="session")
def llama_base(base_tokenizer, tmp_path_factory) -> Path:
    """Llama 3.x-shaped: llama3 rope scaling, grouped KV heads, untied head."""
    return hf_folder(tmp_path_factory.mktemp("llama") / "base", base_tokenizer, "llama", rope_scaling=dict(LLAMA3),
                     context=16384)


@pytest.fixture(scope="session")
def qwen3_base(base_tokenizer, tmp_path_factory) -> Path:
    """Qwen3-shaped: q/k norms, a head width apart from hidden / heads (32, not 16), tied embeddings, sharded."""
    return hf_folder(tmp_path_factory.mktemp("qwen3") / "base", base_tokenizer, "qwen3", tie=True, sharded=True)


@pytest.fixture(scope="session")
def wide_base(base_tokenizer, tmp_path_factory) -> Path:
    """Rows a multiple of 256, as K-quant blocks need."""
    return hf_folder(tmp_path_factory.mktemp("wide") / "base", base_tokenizer, "llama", hidden=256,
                     intermediate=512, heads=4, kv_heads=2)

