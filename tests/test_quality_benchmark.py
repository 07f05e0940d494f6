"""benchmarks/quality.py runs on the package's functions: its rows are evaluate's numbers on the same windows, and
its in-memory MoE is the package's assembly, with the always-on anchor a hook of the benchmark's that comes off
again."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality as Q  # noqa: E402
from run_checks import loss_curve, same_tensors  # noqa: E402

from modularforge.assemble import assemble_in_memory  # noqa: E402
from modularforge.evaluate import evaluate, partition_batches  # noqa: E402
from modularforge.inference import open_model  # noqa: E402
from modularforge.prepare import prepare  # noqa: E402
from modularforge.runs import Run  # noqa: E402
from modularforge.train.loop import Interrupted, stable_steps  # noqa: E402
from modularforge.train.shared import train_shared  # noqa: E402


def test_quality_rows_are_evaluates_numbers_on_the_same_windows(run_copy):
    cfg = run_copy.cfg.model_copy(deep=True)
    cfg.evaluate.precision = "fp32"  # the benchmark's
    cfg.evaluate.routing_modes = ["token", *Q.FORCED]
    run = Run(cfg, run_copy.dir)
    report = evaluate(run)
    windows: dict[str, list[torch.Tensor]] = {}
    for p, batch, _ in partition_batches(run):
        windows.setdefault(f"p{p}", []).append(batch)
    corpora = list(windows)
    dev = Q.DevSet(corpora, {c: torch.cat(w) for c, w in windows.items()},
                   {c: torch.full((sum(len(b) for b in w),), int(c[1:])) for c, w in windows.items()})
    scoring = Q.Scoring.for_run(run, micro=cfg.evaluate.micro_batch_size)
    model = open_model(run.model_dir)
    rows = scoring.score(model, dev, ("token", *Q.FORCED), routing=True)
    for mode, row in rows.items():
        expected = report["routing_modes"][mode]
        assert row["union_ppl"] == pytest.approx(expected["overall"]["perplexity"], abs=1e-3), mode
        assert row["bits_per_byte"] == pytest.approx(expected["overall"]["bits_per_byte"], abs=1e-4), mode
        for corpus, part in zip(corpora, expected["per_partition"]):
            assert row["per_corpus"][corpus] == pytest.approx(part["perplexity"], abs=1e-3), (mode, corpus)
    by_partition = rows["token"]["routing_top1_by_partition"]
    matrix = report["routing"]["partition_to_expert"]  # (layers, partitions, experts)
    for p, accuracy in by_partition.items():
        assert accuracy == pytest.approx(sum(layer[p][p] for layer in matrix) / len(matrix), abs=2e-4)
    assert len(by_partition) == len(corpora)


def test_the_benchmarks_moe_is_the_assembly_and_the_anchor_comes_off(trained_run):
    cfg = trained_run.cfg
    moe = Q.MoEUnderTest(trained_run)
    ids = torch.randint(0, trained_run.vocab_size(), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        moe.configure(cfg.assemble.router, "none", cfg.model.top_k)
        plain = moe.model(ids)
        assert torch.equal(plain, assemble_in_memory(trained_run)(ids))
        moe.configure(cfg.assemble.router, "none", cfg.model.top_k, anchor_weight=0.5)
        assert not torch.allclose(moe.model(ids), plain)
        moe.configure(cfg.assemble.router, "none", cfg.model.top_k)
        assert torch.equal(moe.model(ids), plain)


def test_branched_wsd_shared_phase_equals_a_run_of_its_own(make_config):
    train = {"schedule": "wsd", "warmup_steps": 3, "decay_fraction": 0.25}
    long = Run(make_config(run={"name": "long"}, train=train, budget={"total_tokens": 80 * 8 * 32}))
    short_cfg = make_config(run={"name": "short"}, train=train)
    alone, branched = Run(short_cfg), Run(short_cfg, short_cfg.run.root + "/branched")
    for run in (long, alone, branched):
        prepare(run)
    branch = stable_steps(short_cfg.shared_steps, short_cfg.train)
    with pytest.raises(Interrupted):
        train_shared(long, stop_after=branch)
    assert Q.branch_checkpoint(long.shared_dir, branched.shared_dir, branched.fingerprint("train-shared")) == branch
    train_shared(branched)
    train_shared(alone)
    for name in ("shared.safetensors", "anchor.safetensors"):
        assert same_tensors(alone.shared_dir / name, branched.shared_dir / name)
    assert loss_curve(alone.shared_dir / "metrics.jsonl") == loss_curve(branched.shared_dir / "metrics.jsonl")
