"""evaluate.score_windows, the one scoring function of windows (evaluate's report and the benchmarks): its tallies are
the model's own NLLs summed, its routing tally the token routing's choices counted, and the report carries them."""

import numpy as np
import pytest
import torch

from modularforge.data.tokenizer import load_tokenizer, token_byte_lengths
from modularforge.evaluate import MODES, Tally, WindowScoring, evaluate, partition_batches, score_windows
from modularforge.inference import open_model
from modularforge.model.weights import load_dense
from modularforge.runs import Run


def test_window_scores_are_the_models_own_nlls_and_routing_choices(trained_run):
    cfg, parts = trained_run.cfg, trained_run.partitions()
    model = open_model(trained_run.model_dir).eval()
    anchor = load_dense(cfg.model, trained_run.vocab_size(), trained_run.shared_dir).eval()
    token_bytes = token_byte_lengths(load_tokenizer(trained_run.tokenizer_dir))
    prefix = cfg.evaluate.prefix_len
    batches = list(partition_batches(trained_run))
    assert {p for p, _, _ in batches} == set(range(len(parts)))
    how = WindowScoring(MODES, prefix, cfg.evaluate.sequence_revise_every, "fp32", routing=True)
    scores = score_windows(model, batches, how, token_bytes, [part.expert for part in parts], anchor)

    blocks = model.moe_blocks()
    assert all(b.record is None for b in blocks)
    direct = {mode: [Tally() for _ in parts] for mode in ("token", "anchor", "oracle")}
    top1 = np.zeros((len(parts), cfg.model.num_experts), dtype=np.int64)  # layer 0's top-1 choices per partition
    with torch.no_grad():
        for p, batch, _ in batches:
            blocks[0].record = []
            token = model.token_nll(batch)
            top1[p] += np.bincount(blocks[0].record[0][:, 0].numpy(), minlength=top1.shape[1])
            blocks[0].record = None
            targets = batch[:, 1:]
            direct["token"][p].add(token[:, prefix - 1 :], targets[:, prefix - 1 :], token_bytes)
            direct["anchor"][p].add(anchor.token_nll(batch), targets, token_bytes)
            oracle = model.token_nll(batch, expert_ids=torch.full((len(batch),), parts[p].expert))
            direct["oracle"][p].add(oracle, targets, token_bytes)
    for mode, after_prefix in (("token", True), ("anchor", False), ("oracle", False)):
        for got, want in zip(scores.per_group(mode, range(len(parts)), after_prefix), direct[mode], strict=True):
            assert (got.tokens, got.bytes) == (want.tokens, want.bytes) and want.tokens
            assert got.nll == pytest.approx(want.nll, rel=1e-9)
    assert np.array_equal(scores.routing.top1[0], top1)
    tokens = sum(len(batch) * (batch.shape[1] - 1) for _, batch, _ in batches)
    assert scores.routing.load.sum(-1).tolist() == [tokens * cfg.model.top_k] * cfg.model.num_layers
    assert (scores.routing.hits.sum(-1) == cfg.model.top_k * scores.routing.top1.sum(-1)).all()

    with pytest.raises(ValueError, match="token"):
        score_windows(model, batches, WindowScoring(("oracle",), prefix, routing=True), token_bytes, range(4))


def test_the_report_holds_the_window_scores(run_copy):
    cfg = run_copy.cfg.model_copy(deep=True)
    cfg.evaluate.precision = "fp32"
    run = Run(cfg, run_copy.dir)
    report = evaluate(run)
    parts = run.partitions()
    how = WindowScoring(MODES, cfg.evaluate.prefix_len, cfg.evaluate.sequence_revise_every, "fp32", routing=True)
    model = open_model(run.model_dir)
    anchor = load_dense(cfg.model, run.vocab_size(), run.shared_dir)
    scores = score_windows(model, partition_batches(run), how, token_byte_lengths(load_tokenizer(run.tokenizer_dir)),
                           [part.expert for part in parts], anchor)
    for mode in ("token", "anchor"):
        assert report["headline"][mode] == scores.total(mode, after_prefix=False).summary()
    for mode in cfg.evaluate.routing_modes:
        assert report["routing_modes"][mode]["overall"] == scores.total(mode).summary()
    assert report["routing"] == scores.routing.summary()
    oracle = scores.per_group("oracle", range(len(parts)), after_prefix=False)
    for entry, tally in zip(report["experts"], oracle):
        assert entry["expert_perplexity"] == tally.summary()["perplexity"]
