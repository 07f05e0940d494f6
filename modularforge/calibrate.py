"""Stage 5, calibrate: adjust the assembled model with no gradient training.

- Router temperature: the router rows are divided by T, chosen from `calibrate.temperatures` by the
  loss on the calibration documents of every partition (one T for all layers, then optionally one per
  layer by a sweep of coordinate descent). T is folded into the rows, so the checkpoint stays standard.
- Norm recalibration (the seed's post-assembly norm recalibration): each layer's post-attention norm
  gain is rescaled per channel so the mean square of the router/expert input matches what the experts
  saw in training (from their statistics), layer by layer from the bottom.

The stage starts from the uncalibrated routers (recomputed from the statistics) and norms (from the
shared part) every time, so running it again with other settings never compounds. Only the shard
holding routers and post-attention norms is rewritten. With `calibrate.expert_cache` the model is
opened with at most that many expert FFNs in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from modularforge.data.batches import PreparedData, spread_batches
from modularforge.device import as_float64, autocast, autocast_dtype, module_device, resolve_device, to_device
from modularforge.files import atomic_path, load_tensors, read_json, write_json
from modularforge.inference import AssembledFolder, open_model
from modularforge.model.transformer import CausalLM
from modularforge.model.weights import dense_shapes, gate_key, is_ffn
from modularforge.routers import compute_routers, layer_stats, stats_shapes
from modularforge.runs import Run
from modularforge.safetensors_stream import checked_header, from_tensor, write_streaming
from modularforge.schemas import ModelInfo

log = logging.getLogger(__name__)


def calibration_batches(run: Run, tokens_per_partition: int,
                        data: dict[str, PreparedData] | None = None) -> list[torch.Tensor]:
    """Held-out windows of every partition of the run's text (`Run.partitions`: the prepared ones and the text of
    each added expert), about `tokens_per_partition` tokens of each; `data`: the folders already open, by name."""
    cfg = run.cfg
    seq_len, micro = cfg.model.max_seq_len, cfg.calibrate.micro_batch_size
    data = {} if data is None else data
    batches = []
    for part in run.partitions():
        prepared = data.setdefault(part.data, PreparedData(run.dir / part.data))
        batches += spread_batches(prepared.held_out(part.index, tokens_per_partition), tokens_per_partition, seq_len,
                                  micro)
    return batches


@torch.no_grad()
def mean_loss(model: CausalLM, batches: list[torch.Tensor], dtype: torch.dtype | None) -> float:
    device = module_device(model)
    total, count = 0.0, 0
    for batch in batches:
        with autocast(dtype, device):
            nll = model.token_nll(to_device(batch, device))
        total += nll.sum().item()
        count += nll.numel()
    return total / count


def calibrate(run: Run) -> dict:
    with run.lock():  # every input is opened and checked before the stage records anything
        run.require("assemble")
        return _calibrate(run, *_open_inputs(run))


def _open_inputs(run: Run) -> tuple[AssembledFolder, dict, list[Path], dict[str, PreparedData]]:
    """The model folder (its headers), its modularforge.json, the experts' statistics, checked as far as their
    headers, as is shared.safetensors, and the text."""
    cfg = run.cfg
    folder = AssembledFolder(run.model_dir)
    info = read_json(run.model_dir / "modularforge.json", ModelInfo)
    stats_paths = [run.expert_files(s.name)["stats"] for s in run.experts()]
    for path in stats_paths:
        checked_header(path, stats_shapes(cfg.model.num_layers, cfg.model.hidden_size))
    checked_header(run.shared_dir / "shared.safetensors", {
        name: shape for name, shape in dense_shapes(cfg.model, folder.vocab_size).items() if not is_ffn(name)})
    data = {part.data: PreparedData(run.dir / part.data) for part in run.partitions()}
    return folder, info, stats_paths, data


def _calibrate(run: Run, folder: AssembledFolder, info: dict, stats_paths: list[Path],
               data: dict[str, PreparedData]) -> dict:
    cfg = run.cfg
    with run.stage("calibrate") as facts:
        device = resolve_device(cfg)
        model = open_model(folder, expert_cache=cfg.calibrate.expert_cache, device=device)
        reset_uncalibrated(model, run, stats_paths)
        result = {"temperature": None, "norm": cfg.calibrate.norm}
        if cfg.calibrate.temperature or cfg.calibrate.norm:
            dtype = autocast_dtype(cfg.calibrate.precision, device)
            batches = calibration_batches(run, max(1, cfg.calibrate.calib_tokens // len(run.partitions())), data)
            result["calib_loss_before"] = mean_loss(model, batches, dtype)
            if cfg.calibrate.norm:
                targets = [torch.stack(layer_stats(stats_paths, i, cfg.model.hidden_size).diag).mean(0).float().to(device)
                           for i in range(cfg.model.num_layers)]
                recalibrate_norms(model, batches, targets, dtype)
            if cfg.calibrate.temperature and cfg.model.top_k == 1:
                log.info("calibration: no temperature search, since the one expert a token gets at top_k=1 has "
                         "weight 1 whatever the temperature")
            elif cfg.calibrate.temperature:
                result["temperature"] = search_temperature(
                    model, batches, cfg.calibrate.temperatures, cfg.calibrate.per_layer, dtype
                )
            result["calib_loss_after"] = mean_loss(model, batches, dtype)
            log.info("calibration: loss %.4f -> %.4f (temperature %s, norm %s)", result["calib_loss_before"],
                     result["calib_loss_after"], result["temperature"], cfg.calibrate.norm)
        write_calibration_shard(folder, model)
        write_json(run.model_dir / "modularforge.json", {**info, "calibration": result})
        facts["calibration"] = result
        return result


def reset_uncalibrated(model: CausalLM, run: Run, stats_paths: list[Path]) -> None:
    """Routers as assembly computed them and post-attention norms as the shared phase trained them."""
    routers = compute_routers(run.cfg, stats_paths)
    shared = run.shared_dir / "shared.safetensors"
    for i, layer in enumerate(model.model.layers):
        layer.block_sparse_moe.gate.weight.data.copy_(routers[gate_key(i)])
        name = f"model.layers.{i}.post_attention_layernorm.weight"
        layer.post_attention_layernorm.weight.data.copy_(load_tensors(shared, [name])[name])


def search_temperature(
    model: CausalLM, batches: list[torch.Tensor], grid: list[float], per_layer: bool, dtype: torch.dtype | None
) -> list[float]:
    gates = [block.gate.weight for block in model.moe_blocks()]
    base = [g.detach().clone() for g in gates]

    def loss_with(temps: list[float]) -> float:
        for g, b, t in zip(gates, base, temps):
            g.data.copy_(b / t)
        return mean_loss(model, batches, dtype)

    grid = sorted(grid)
    best, current = grid_minimum(grid, lambda t: loss_with([t] * len(gates)))
    temps = [best] * len(gates)
    if per_layer:
        for i in range(len(gates)):
            t, score = grid_minimum(grid, lambda t: loss_with(temps[:i] + [t] + temps[i + 1 :]))
            if score < current:
                current, temps = score, temps[:i] + [t] + temps[i + 1 :]
    loss_with(temps)
    return temps


def grid_minimum(grid: list[float], loss) -> tuple[float, float]:
    """(value, loss) at the minimum of `loss` over the sorted `grid` by ternary search, which assumes one
    valley (the calibration loss falls, then rises, as routing goes from sharp to soft): about 7 of 11
    candidates scored instead of all."""
    scores: dict[int, float] = {}

    def at(i: int) -> float:
        if i not in scores:
            scores[i] = loss(grid[i])
        return scores[i]

    lo, hi = 0, len(grid) - 1
    while hi - lo > 2:
        third = (hi - lo) // 3
        if at(lo + third) <= at(hi - third):
            hi = hi - third
        else:
            lo = lo + third
    best = min(range(lo, hi + 1), key=at)
    return grid[best], at(best)


@torch.no_grad()
def recalibrate_norms(
    model: CausalLM, batches: list[torch.Tensor], targets: list[torch.Tensor], dtype: torch.dtype | None
) -> None:
    device = module_device(model)
    for i, layer in enumerate(model.model.layers):
        norm = layer.post_attention_layernorm
        square, count = torch.zeros_like(as_float64(norm.weight)), 0

        def accumulate(module, args, output):
            nonlocal square, count
            h = as_float64(output.detach().reshape(-1, output.shape[-1]))
            square += h.pow(2).sum(0)
            count += h.shape[0]

        hook = norm.register_forward_hook(accumulate)
        try:
            for batch in batches:
                with autocast(dtype, device):
                    model(to_device(batch[:, :-1], device))
        finally:
            hook.remove()
        observed = (square / count).float().to(device)
        norm.weight.mul_(torch.sqrt(targets[i] / observed.clamp_min(1e-12)))


def write_calibration_shard(folder: AssembledFolder, model: CausalLM) -> None:
    shard = folder.files[gate_key(0)]
    state = dict(model.named_parameters())
    names = [n for n, f in folder.files.items() if f == shard]
    with atomic_path(folder.dir / shard) as tmp:
        write_streaming(tmp, [from_tensor(folder.stored[n], state[n].cpu()) for n in names], {"calibrated": "true"})
