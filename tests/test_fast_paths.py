"""Each fast path gives the plain path's results within tolerance."""

import tempfile
from pathlib import Path

import pytest
import torch

from modularforge.config import ModelConfig
from modularforge.model.transformer import CausalLM
from modularforge.device import autocast
from modularforge.train.loop import ModelLoss

CFG = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, max_seq_len=32,
                  num_experts=4, top_k=2)


def _model(moe=False):
    model = CausalLM(CFG, vocab_size=300, moe=moe)
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def test_bf16_autocast_loss_is_close_to_fp32():
    model = _model()
    batch = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(1))
    loss = ModelLoss(model, compile=False)
    with torch.no_grad():
        fp32 = loss(batch).item()
        with autocast(torch.bfloat16):
            bf16 = loss(batch).item()
    assert abs(bf16 - fp32) / fp32 < 5e-3


def _assert_same_loss_and_gradients(model, batch, reference, candidate):
    expected = reference(batch)
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = candidate(batch)
    got.backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)


def test_compiled_loss_and_gradients_match_eager():
    model = _model()
    batch = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(2))
    _assert_same_loss_and_gradients(model, batch, ModelLoss(model, compile=False), ModelLoss(model, compile=True))


def test_bf16_frozen_matrices_give_the_same_loss_under_autocast():
    from modularforge.train.expert import frozen_linears_to_bf16

    model = _model()
    batch = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(3))
    loss = ModelLoss(model, compile=False)
    with torch.no_grad(), autocast(torch.bfloat16):
        before = loss(batch)
        frozen_linears_to_bf16(model)
        after = loss(batch)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(before, after)


def test_chunked_loss_and_gradients_match_the_whole_sequence_loss():
    model = _model()
    batch = torch.randint(0, 300, (3, 33), generator=torch.Generator().manual_seed(4))
    chunked = ModelLoss(model, compile=False, loss_chunks=3)  # 32 positions: slices of 11, 11, 10
    _assert_same_loss_and_gradients(model, batch, ModelLoss(model, compile=False), chunked)


def test_per_window_losses_average_to_the_batch_loss():
    model = _model()
    batch = torch.randint(0, 300, (3, 33), generator=torch.Generator().manual_seed(5))
    loss = ModelLoss(model, compile=False, loss_chunks=2)
    with torch.no_grad():
        per_window = loss.per_window(batch)
        assert per_window.shape == (3,)
        torch.testing.assert_close(per_window.mean(), loss(batch))
        torch.testing.assert_close(per_window[1], loss(batch[1:2]))


def _plain_loss(model):
    def loss(batch):
        logits = model(batch[:, :-1])
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    return loss


def test_fused_head_and_loss_match_autograd_cross_entropy_in_fp32():
    model = _model()
    batch = torch.randint(0, 300, (3, 33), generator=torch.Generator().manual_seed(5))
    _assert_same_loss_and_gradients(model, batch, _plain_loss(model), ModelLoss(model, compile=False, loss_chunks=2))


def test_fused_head_and_loss_match_autograd_cross_entropy_under_bf16_autocast(monkeypatch):
    import modularforge.train.cross_entropy as cross_entropy

    monkeypatch.setattr(cross_entropy, "BLOCK_BYTES", 4 * 300 * 5)  # 5-row blocks inside each slice
    model = _model()
    batch = torch.randint(0, 300, (3, 33), generator=torch.Generator().manual_seed(6))
    with autocast(torch.bfloat16):
        expected = _plain_loss(model)(batch)
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with autocast(torch.bfloat16):
        got = ModelLoss(model, compile=False, loss_chunks=3)(batch)
    got.backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():  # bf16 products: the head's weight gradient is summed per slice
        torch.testing.assert_close(p.grad, grads[n], atol=2e-3, rtol=2e-2, msg=n)


def test_fused_adamw_takes_the_steps_of_torch_adamw():
    from modularforge.train.optimizer import FusedAdamW

    ours, theirs = _model(), _model()
    decay = lambda m: [p for p in m.parameters() if p.dim() >= 2]  # noqa: E731
    rest = lambda m: [p for p in m.parameters() if p.dim() < 2]  # noqa: E731
    opt_ours = FusedAdamW([(decay(ours), 0.1), (rest(ours), 0.0)], betas=(0.9, 0.95))
    opt_theirs = torch.optim.AdamW([{"params": decay(theirs), "weight_decay": 0.1},
                                    {"params": rest(theirs), "weight_decay": 0.0}], betas=(0.9, 0.95), fused=True)
    for step in range(3):
        batch = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(10 + step))
        for model in (ours, theirs):
            ModelLoss(model, compile=False)(batch).backward()
        opt_ours.step(lr=1e-2 / (step + 1))
        for group in opt_theirs.param_groups:
            group["lr"] = 1e-2 / (step + 1)
        opt_theirs.step()
        opt_ours.zero_grad()
        opt_theirs.zero_grad()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.equal(ours.lm_head.weight, _model().lm_head.weight)


def test_adafactor_takes_the_steps_of_torch_adafactor_with_an_absolute_step_size():
    from modularforge.train.optimizer import Adafactor

    ours, theirs = _model(), _model()
    opt_ours = Adafactor([(list(ours.parameters()), 0.1)])
    opt_theirs = torch.optim.Adafactor(theirs.parameters(), lr=1e-2, eps=(None, 1.0), weight_decay=0.1)
    for step in range(3):
        batch = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(10 + step))
        for model in (ours, theirs):
            ModelLoss(model, compile=False)(batch).backward()
        opt_ours.step(lr=1e-2)
        opt_theirs.step()
        opt_ours.zero_grad()
        opt_theirs.zero_grad()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    matrix = ours.lm_head.weight
    assert set(opt_ours.state[matrix]) == {"step", "row_var", "col_var"}  # a row and a column, not a matrix
    assert sum(t.numel() for t in opt_ours.state[matrix].values()) == 1 + sum(matrix.shape)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_stepping_inside_backward_takes_the_same_steps(optimizer):
    from modularforge.config import TrainConfig
    from modularforge.train.loop import LoopPlan, Objective, train_loop

    results = []
    for in_backward in (False, True):
        model = _model()
        cfg = TrainConfig(batch_size=2, lr=1e-2, grad_clip=0.0, precision="fp32", optimizer=optimizer,
                          step_in_backward=in_backward, eval_interval=100, checkpoint_interval=100)
        loss = ModelLoss(model, compile=False)
        data = torch.randint(0, 300, (8, 2, 33), generator=torch.Generator().manual_seed(3))
        with tempfile.TemporaryDirectory() as out:
            train_loop(Objective(params=dict(model.named_parameters()), loss_fn=loss,
                                 sample_batch=lambda step: data[step], val_batches=[data[0]]),
                       cfg, LoopPlan(steps=8, out_dir=Path(out), label="t", fingerprint="f"))
        assert all(p.grad is None for p in model.parameters())
        results.append(model)
    for (name, a), b in zip(results[0].named_parameters(), results[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.equal(results[1].lm_head.weight, _model().lm_head.weight)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_stepping_inside_backward_frees_the_optimizer_and_its_parameters(optimizer):
    import gc
    import weakref

    from modularforge.config import TrainConfig
    from modularforge.train.loop import Objective, make_optimizer

    model = _model()
    cfg = TrainConfig(batch_size=2, lr=1e-2, grad_clip=0.0, precision="fp32", optimizer=optimizer,
                      step_in_backward=True)
    opt = make_optimizer(Objective(params=dict(model.named_parameters()), loss_fn=ModelLoss(model, compile=False),
                                   sample_batch=lambda step: None, val_batches=[]), cfg)
    opt.lr = 1e-2
    ModelLoss(model, compile=False)(torch.randint(0, 300, (2, 33))).backward()
    assert opt.state  # the hooks stepped
    weights, state = weakref.ref(model.lm_head.weight), weakref.ref(opt)
    del model, opt
    gc.collect()
    assert weights() is None and state() is None  # a finished expert's weights do not outlive it


def test_stepping_inside_backward_needs_whole_batches_and_no_global_clip():
    from modularforge.config import config_from_dict
    from modularforge.errors import ConfigError

    with pytest.raises(ConfigError, match="step_in_backward"):
        config_from_dict({"experts": {"train": {"step_in_backward": True, "batch_size": 4, "micro_batch_size": 2,
                                                "grad_clip": 0.0}}})
    with pytest.raises(ConfigError, match="step_in_backward"):
        config_from_dict({"train": {"step_in_backward": True}})  # grad_clip defaults to 1
