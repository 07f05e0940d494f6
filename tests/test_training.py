import json
import math
import shutil
from itertools import pairwise

import numpy as np
import pytest
import torch

from modularforge.config import TrainConfig
from modularforge.errors import TrainingError
from modularforge.files import load_tensors, read_json
from modularforge.prepare import prepare
from modularforge.runs import Run
from modularforge.train.experts import train_experts
from modularforge.train.loop import (Interrupted, KeepBest, LoopPlan, Objective, PairedGain, lr_at, stable_steps,
                                     train_loop)
from modularforge.train.shared import train_shared
from run_checks import loss_curve, same_tensors


def test_resume_matches_uninterrupted_run(make_config):
    straight = Run(make_config(run={"name": "straight"}))
    prepare(straight)
    train_shared(straight)
    resumed = Run(make_config(run={"name": "resumed"}))
    prepare(resumed)
    with pytest.raises(Interrupted):
        train_shared(resumed, stop_after=7)
    assert read_json(resumed.manifest_path)["stages"]["train-shared"]["status"] == "running"
    train_shared(resumed)
    for name in ("shared.safetensors", "anchor.safetensors"):
        assert same_tensors(straight.shared_dir / name, resumed.shared_dir / name)
    assert loss_curve(straight.shared_dir / "metrics.jsonl") == loss_curve(resumed.shared_dir / "metrics.jsonl")


def test_interrupted_expert_phase_resumes_at_the_expert_and_step(make_config, caplog):
    straight = Run(make_config(run={"name": "straight"}))
    prepare(straight)
    train_shared(straight)
    resumed = Run(straight.cfg, straight.dir.parent / "resumed")
    shutil.copytree(straight.dir, resumed.dir)
    train_experts(straight)
    with pytest.raises(Interrupted):
        train_experts(resumed, stop_at=(1, 3))
    assert (resumed.expert_dir(0) / "done.json").exists()
    assert not (resumed.expert_dir(1) / "done.json").exists()
    assert load_tensors(resumed.expert_dir(1) / "ckpt.safetensors") and not resumed.expert_dir(2).exists()
    caplog.set_level("INFO", logger="modularforge")
    train_experts(resumed)
    assert "expert_00 already trained; skipping" in caplog.text
    assert "resuming" in caplog.text and "at step 3/" in caplog.text
    for k in range(4):
        for name in ("expert.safetensors", "router_stats.safetensors"):
            assert same_tensors(straight.expert_dir(k) / name, resumed.expert_dir(k) / name), (k, name)


def test_non_finite_loss_stops_with_the_step(tmp_path):
    weight = torch.nn.Parameter(torch.ones(3))
    calls = {"n": 0}

    def loss_fn(batch):
        calls["n"] += 1
        return (weight * batch.float().mean()).sum() * (float("nan") if calls["n"] == 4 else 1.0)

    cfg = TrainConfig(batch_size=2, eval_interval=100, log_interval=100, checkpoint_interval=100)
    with pytest.raises(TrainingError, match="non-finite loss .* at step 4"):
        train_loop(Objective(params={"w": weight}, loss_fn=loss_fn, sample_batch=lambda step: torch.ones(2, 5),
                             val_batches=[]), cfg, LoopPlan(steps=10, out_dir=tmp_path, label="t", fingerprint="fp"))


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    torch.manual_seed(0)
    data = torch.randn(8, 5)

    def run(micro):
        weight = torch.nn.Parameter(torch.ones(5))
        cfg = TrainConfig(batch_size=8, micro_batch_size=micro, eval_interval=100, log_interval=100,
                          checkpoint_interval=100, precision="fp32", grad_clip=0)
        train_loop(Objective(params={"w": weight}, loss_fn=lambda b: ((b @ weight) ** 2).mean(),
                             sample_batch=lambda s: data, val_batches=[]),
                   cfg, LoopPlan(steps=3, out_dir=tmp_path / str(micro), label="t", fingerprint="fp"))
        return weight.detach()

    torch.testing.assert_close(run(8), run(2), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_learning_rate_warms_up_then_decays_to_the_floor(schedule):
    cfg = TrainConfig(lr=1.0, warmup_fraction=0.1, min_lr_ratio=0.1, schedule=schedule)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_wsd_runs_of_any_length_share_their_stable_phase():
    cfg = TrainConfig(lr=1.0, warmup_steps=5, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    short, long = [lr_at(s, 50, cfg) for s in range(50)], [lr_at(s, 200, cfg) for s in range(200)]
    assert stable_steps(50, cfg) == 40 and short[:40] == long[:40]
    assert short[4] == short[39] == 1.0 and short[0] == pytest.approx(0.2)
    assert all(a > b for a, b in pairwise(short[39:])) and short[-1] == pytest.approx(0.1)


def test_frozen_shared_weights_get_no_gradients_in_the_expert_phase(trained_run):
    from modularforge.train.expert import expert_model

    model = expert_model(trained_run.cfg, trained_run.vocab_size(), trained_run, 0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp." in n for n in trainable)
    batch = torch.randint(0, 500, (2, 17))
    model.loss(batch).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


@pytest.mark.parametrize("experts", [
    {"init": "scratch", "mode": "alone", "keep_best": False},
    {"init": "anchor", "mode": "with_anchor", "keep_best": False},
    {"init": "anchor", "mode": "alone", "anchor_swap": 0.5, "keep_best": False},
])
def test_expert_options_train_and_assemble(make_config, experts):
    from modularforge.assemble import assemble
    from modularforge.inference import open_model

    run = Run(make_config(experts=experts))
    prepare(run)
    train_shared(run)
    train_experts(run)
    assemble(run)
    tensors = load_tensors(run.expert_dir(0) / "expert.safetensors")
    assert not any(k.startswith("router_row.") for k in tensors)  # the with_anchor pair's router row is not kept
    anchor = load_tensors(run.shared_dir / "anchor.safetensors")
    w1 = tensors["model.layers.0.mlp.w1.weight"]  # an expert file holds a dense FFN stack
    assert not torch.equal(w1, anchor["model.layers.0.mlp.w1.weight"])  # it trained (or started elsewhere)
    model = open_model(run.model_dir)
    assert torch.isfinite(model(torch.randint(0, 500, (1, 16)))).all()


def test_with_anchor_keeps_the_anchor_and_its_router_row_frozen(trained_run, make_config):
    from modularforge.train.expert import expert_model

    cfg = make_config(experts={"mode": "with_anchor", "init": "scratch"})  # an anchor copy gives the gate no gradient
    model = expert_model(cfg, trained_run.vocab_size(), trained_run, 0)
    pair = model.model.layers[0].mlp
    model.loss(torch.randint(0, 500, (2, 17))).backward()
    assert pair.gate.weight.grad[0].abs().sum() == 0 and pair.gate.weight.grad[1].abs().sum() > 0
    assert all(p.grad is None for p in pair.experts[0].parameters())


def test_domain_probe_adds_its_loss_in_training_only_and_trains_the_trunk():
    from modularforge.config import ModelConfig
    from modularforge.data.batches import LABEL_SHIFT
    from modularforge.model.transformer import CausalLM
    from modularforge.train.loop import ModelLoss
    from modularforge.train.shared import DomainProbe, probed_loss

    model = CausalLM(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, max_seq_len=16,
                                 num_experts=2, top_k=1), vocab_size=50, moe=False)
    model.init_weights(torch.Generator().manual_seed(0))
    probe = DomainProbe(model, num_partitions=3)
    lm_loss = ModelLoss(model, compile=False)
    loss = probed_loss(lm_loss, probe, weight=0.5)
    tokens = torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(1))
    batch = tokens | (torch.tensor([[1], [2]]) << LABEL_SHIFT)
    with torch.no_grad():
        assert torch.equal(loss(batch), lm_loss(tokens)) and not probe.states
    with torch.no_grad():
        plain = lm_loss(tokens)
    total = loss(batch)
    assert total > plain
    total.backward()
    assert all(head.weight.grad.abs().sum() > 0 for head in probe.heads)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert not probe.states


def test_domain_probe_trains_only_on_positions_from_its_first():
    import torch.nn.functional as F

    from modularforge.config import ModelConfig
    from modularforge.model.transformer import CausalLM
    from modularforge.train.shared import DomainProbe

    model = CausalLM(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, max_seq_len=16,
                                 num_experts=2, top_k=1), vocab_size=50, moe=False)
    model.init_weights(torch.Generator().manual_seed(0))
    probe = DomainProbe(model, num_partitions=3, first_position=10)
    labels = torch.randint(0, 3, (2, 16), generator=torch.Generator().manual_seed(2))
    model(torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1)))
    states = list(probe.states)
    expected = sum(F.cross_entropy(head(h[:, 10:]).flatten(0, 1), labels[:, 10:].flatten())
                   for head, h in zip(probe.heads, states)) / 2
    torch.testing.assert_close(probe.loss(labels), expected)


def _pass_through_target(tmp_path, name, stop_after=None):
    """A run whose parameter walks from 0 towards the training target 2 and passes the validation target 1 on
    the way, so the best validation lies inside the run, not at its end."""
    weight = torch.nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(batch_size=1, lr=0.1, warmup_steps=0, schedule="wsd", decay_fraction=0.1, eval_interval=2,
                      log_interval=100, checkpoint_interval=3, precision="fp32", grad_clip=0, weight_decay=0)
    loss = lambda b: ((weight - b.float().mean()) ** 2).sum()  # noqa: E731
    per_window = lambda b: (weight - b.float().mean(1)) ** 2  # noqa: E731
    result = train_loop(Objective(params={"w": weight}, loss_fn=loss, sample_batch=lambda step: torch.full((1, 2), 2),
                                  val_batches=[torch.ones(1, 2)],
                                  keep_best=KeepBest(window_losses=per_window, documents=np.zeros(1), margin=0)),
                        cfg, LoopPlan(steps=30, out_dir=tmp_path / name, label="t", fingerprint="fp",
                                      stop_after=stop_after))
    return weight.detach().clone(), result


def test_keep_best_ends_on_the_best_validation_and_resumes_to_the_same_choice(tmp_path):
    weight, result = _pass_through_target(tmp_path, "straight")
    assert result.initial_val_loss == pytest.approx(1.0)
    assert 0 < result.best_step < 30 and result.best_val_loss < 0.05
    assert result.best_gain.gain == pytest.approx(1.0 - result.best_val_loss)
    assert float(weight) == pytest.approx(1.0, abs=0.25)  # not the last step's, which is near 2
    with pytest.raises(Interrupted):
        _pass_through_target(tmp_path, "resumed", stop_after=result.best_step + 1)
    resumed_weight, resumed = _pass_through_target(tmp_path, "resumed")
    assert torch.equal(weight, resumed_weight)
    assert (resumed.best_step, resumed.best_val_loss, resumed.initial_val_loss, resumed.best_gain) == (
        result.best_step, result.best_val_loss, result.initial_val_loss, result.best_gain)
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"step": 0, "val_loss": 1.0}


def _two_documents_run(tmp_path, margin, targets):
    """A parameter trained from 0 towards 1, validated on one window per target: each window's loss is
    (w - target)^2. With targets (1, 1) every window gains; with (1, -0.3) the mean gains a little while the
    two documents disagree."""
    weight = torch.nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(batch_size=1, lr=0.1, warmup_steps=0, eval_interval=5, log_interval=100,
                      checkpoint_interval=100, precision="fp32", grad_clip=0, weight_decay=0)
    val = torch.tensor([[t, t] for t in targets])
    result = train_loop(Objective(params={"w": weight}, loss_fn=lambda b: ((weight - b.float().mean()) ** 2).sum(),
                                  sample_batch=lambda step: torch.ones(1, 2), val_batches=[val],
                                  keep_best=KeepBest(window_losses=lambda b: (weight - b.float().mean(1)) ** 2,
                                                     documents=np.array([3, 7]), margin=margin)),
                        cfg, LoopPlan(steps=10, out_dir=tmp_path, label="t", fingerprint="fp"))
    return float(weight.detach()), result


def test_keep_best_keeps_the_start_when_the_gain_is_within_the_noise_of_its_documents(tmp_path):
    weight, result = _two_documents_run(tmp_path / "noisy", 2.0, (1.0, -0.3))
    records = [json.loads(line) for line in (tmp_path / "noisy" / "metrics.jsonl").read_text().splitlines()]
    assert min(r["val_loss"] for r in records if r["step"] > 0) < result.initial_val_loss  # the mean fell ...
    assert result.best_step == 0 and weight == 0.0  # ... but one document got worse: the start is kept
    weight, result = _two_documents_run(tmp_path / "any", 0.0, (1.0, -0.3))
    assert result.best_step > 0 and weight > 0  # margin 0 takes any lower loss
    weight, result = _two_documents_run(tmp_path / "clear", 2.0, (1.0, 1.0))
    assert result.best_step > 0 and result.best_gain.gain > 2 * result.best_gain.standard_error


def test_paired_gain_counts_each_document_once():
    start, trained = np.array([2.0, 2.0, 2.0, 2.0]), np.array([1.0, 1.0, 3.0, 3.0])
    by_document = PairedGain.of(start, trained, np.array([0, 0, 1, 1]))
    assert (by_document.gain, by_document.windows, by_document.documents) == (0.0, 4, 2)
    assert by_document.standard_error == pytest.approx(1.0)  # two documents of +1 and -1: sqrt(2 * 2) * 2 / 4
    one = PairedGain.of(start, np.full(4, 1.5), np.zeros(4))
    assert one.gain == 0.5 and one.standard_error == math.inf and not one.beats(2.0) and one.beats(0)


def test_keep_best_keeps_the_starting_point_when_training_only_hurts(tmp_path):
    weight = torch.nn.Parameter(torch.ones(1))
    cfg = TrainConfig(batch_size=1, lr=0.1, eval_interval=1, log_interval=100, checkpoint_interval=100,
                      precision="fp32", grad_clip=0, weight_decay=0)
    loss = lambda b: ((weight - b.float().mean()) ** 2).sum()  # noqa: E731
    result = train_loop(Objective(params={"w": weight}, loss_fn=loss, sample_batch=lambda step: torch.full((1, 2), 5),
                                  val_batches=[torch.ones(1, 2)],
                                  keep_best=KeepBest(window_losses=lambda b: (weight - b.float().mean(1)) ** 2,
                                                     documents=np.zeros(1), margin=0)),
                        cfg, LoopPlan(steps=10, out_dir=tmp_path, label="t", fingerprint="fp"))
    assert result.best_step == 0 and float(weight.detach()) == 1.0


def test_experts_continue_the_trunk_learning_rate_and_ship_no_worse_than_the_anchor(make_config, caplog):
    cfg = make_config(experts={"lr_from_trunk": 1.0})
    assert cfg.expert_train.lr == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)
    assert make_config(experts={"lr_from_trunk": None}).expert_train.lr == cfg.experts.train.lr
    run = Run(make_config(experts={"lr_from_trunk": 100.0}, budget={"total_tokens": 60 * 8 * 32}))
    prepare(run)
    train_shared(run)
    caplog.set_level("INFO", logger="modularforge")
    train_experts(run)
    anchor = load_tensors(run.shared_dir / "anchor.safetensors")
    for k in range(run.cfg.model.num_experts):
        selection = read_json(run.expert_dir(k) / "done.json")["selection"]
        assert selection["best_loss"] <= selection["anchor_loss"]
        expert = load_tensors(run.expert_dir(k) / "expert.safetensors")
        same = torch.equal(expert["model.layers.0.mlp.w1.weight"], anchor["model.layers.0.mlp.w1.weight"])
        assert same == (selection["best_step"] == 0) == (not selection["beats_anchor"])
        assert not (run.expert_dir(k) / "best.safetensors").exists()
    assert "did not beat its anchor" in caplog.text  # 100x the trunk's final rate wrecks at least one expert


def test_auto_expert_learning_rate_grows_with_the_experts_tokens(make_config):
    cfg = make_config()  # lr_from_trunk defaults to auto
    final = cfg.train.lr * cfg.train.min_lr_ratio
    per_step = cfg.tokens_per_step(cfg.experts.train)

    def multiple(tokens: int) -> float:
        return cfg.expert_train_for(-(-tokens // per_step)).lr / final

    assert multiple(per_step) == pytest.approx(2) and multiple(76_800 - per_step) == pytest.approx(2)
    assert multiple(153_600) == pytest.approx(10) and multiple(10**7) == pytest.approx(10)
    between = [multiple(t) for t in (90_000, 110_000, 130_000, 150_000)]
    assert between == sorted(between) and 2 < between[0] and between[-1] < 10
    assert cfg.expert_train.lr == cfg.expert_train_for(cfg.expert_steps).lr
    assert make_config(experts={"lr_from_trunk": 3.0}).expert_train_for(10**6).lr == pytest.approx(3 * final)


def test_a_damaged_expert_file_is_trained_again_not_trusted(make_config, caplog):
    run = Run(make_config())
    prepare(run)
    train_shared(run)
    train_experts(run)
    path = run.expert_dir(1) / "expert.safetensors"
    good = path.read_bytes()
    path.write_bytes(good[:-8] + b"\0" * 8)
    caplog.set_level("INFO", logger="modularforge")
    train_experts(run)
    assert "expert_01: expert.safetensors missing or changed since it was trained; training it again" in caplog.text
    assert "expert_00 already trained; skipping" in caplog.text
    assert path.read_bytes() == good
