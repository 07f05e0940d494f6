"""Calibration after assembly, with no gradient training.

- Router temperature: the router rows are divided by T, chosen from `calibrate.temperatures` by the
  loss on the calibration documents of every partition (one T for all layers, then optionally one per
  layer by a sweep of coordinate descent). T is folded into the rows, so the checkpoint stays standard.
- Norm recalibration (the seed's post-assembly norm recalibration): each layer's post-attention norm
  gain is rescaled per channel so the mean square of the router/expert input matches what the experts
  saw in training (from their statistics), layer by layer from the bottom.

Only the shard holding routers and post-attention norms is rewritten.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from modularforge.data.batches import PreparedData, fixed_batches
from modularforge.data.shards import CALIB
from modularforge.files import atomic_path, read_json
from modularforge.model.hf import load_assembled
from modularforge.model.transformer import CausalLM
from modularforge.model.weights import gate_key
from modularforge.runs import Run
from modularforge.safetensors_stream import from_tensor, write_streaming
from modularforge.train.loop import autocast, autocast_dtype

log = logging.getLogger(__name__)


def calibration_batches(run: Run, tokens_per_partition: int) -> list[torch.Tensor]:
    cfg = run.cfg
    data = PreparedData(run.data_dir)
    seq_len, micro = cfg.model.max_seq_len, cfg.experts.train.micro_batch
    windows = max(1, tokens_per_partition // seq_len)
    batches = []
    for p in range(cfg.model.num_experts):
        w = data.windows(CALIB, p)
        batches += fixed_batches(w, windows, min(seq_len, w.total - 1), micro)
    return batches


@torch.no_grad()
def mean_loss(model: CausalLM, batches: list[torch.Tensor], dtype: torch.dtype | None) -> float:
    total, count = 0.0, 0
    for batch in batches:
        with autocast(dtype):
            nll = model.token_nll(batch)
        total += nll.sum().item()
        count += nll.numel()
    return total / count


def calibrate(model_dir: Path, run: Run, norm_targets: list[torch.Tensor]) -> dict:
    cfg = run.cfg.calibrate
    if not (cfg.temperature or cfg.norm):
        return {"temperature": None, "norm": False}
    model, _ = load_assembled(model_dir)
    model.eval()
    dtype = autocast_dtype(run.cfg.experts.train.precision)
    batches = calibration_batches(run, max(1, cfg.calib_tokens // run.cfg.model.num_experts))
    before = mean_loss(model, batches, dtype)
    if cfg.norm:
        recalibrate_norms(model, batches, norm_targets, dtype)
    temperatures = None
    if cfg.temperature:
        temperatures = search_temperature(model, batches, cfg.temperatures, cfg.per_layer, dtype)
    after = mean_loss(model, batches, dtype)
    log.info("calibration: loss %.4f -> %.4f (temperature %s, norm %s)", before, after, temperatures, cfg.norm)
    write_calibration_shard(model_dir, model)
    return {"temperature": temperatures, "norm": cfg.norm, "calib_loss_before": before, "calib_loss_after": after}


def search_temperature(
    model: CausalLM, batches: list[torch.Tensor], grid: list[float], per_layer: bool, dtype: torch.dtype | None
) -> list[float]:
    gates = [block.gate.weight for block in model.moe_blocks()]
    base = [g.detach().clone() for g in gates]

    def loss_with(temps: list[float]) -> float:
        for g, b, t in zip(gates, base, temps):
            g.data.copy_(b / t)
        return mean_loss(model, batches, dtype)

    scores = {t: loss_with([t] * len(gates)) for t in grid}
    best = min(scores, key=scores.get)
    temps = [best] * len(gates)
    if per_layer:
        current = scores[best]
        for i in range(len(gates)):
            for t in grid:
                trial = temps[:i] + [t] + temps[i + 1 :]
                if (score := loss_with(trial)) < current:
                    current, temps = score, trial
    loss_with(temps)
    return temps


@torch.no_grad()
def recalibrate_norms(
    model: CausalLM, batches: list[torch.Tensor], targets: list[torch.Tensor], dtype: torch.dtype | None
) -> None:
    for i, layer in enumerate(model.model.layers):
        norm = layer.post_attention_layernorm
        square, count = torch.zeros_like(norm.weight, dtype=torch.float64), 0

        def accumulate(module, args, output):
            nonlocal square, count
            h = output.detach().reshape(-1, output.shape[-1]).double()
            square += h.pow(2).sum(0)
            count += h.shape[0]

        hook = norm.register_forward_hook(accumulate)
        try:
            for batch in batches:
                with autocast(dtype):
                    model(batch[:, :-1])
        finally:
            hook.remove()
        observed = (square / count).float()
        norm.weight.mul_(torch.sqrt(targets[i] / observed.clamp_min(1e-12)))


def write_calibration_shard(model_dir: Path, model: CausalLM) -> None:
    index = read_json(model_dir / "model.safetensors.index.json")
    shard = index["weight_map"][gate_key(0)]
    state = model.state_dict()
    names = [n for n, f in index["weight_map"].items() if f == shard]
    with atomic_path(model_dir / shard) as tmp:
        write_streaming(tmp, [from_tensor(n, state[n]) for n in names], {"calibrated": "true"})
