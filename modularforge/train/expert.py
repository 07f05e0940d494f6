"""Training one expert, the body that both executors of stage 3 (train-experts) run, in this process or as a
Ray task: one FFN stack per partition beside the frozen shared part.

Each expert is a dense run with everything but its FFN frozen (`mode: alone`, the seed's harness),
or a two-expert MoE of the frozen anchor and the trainable expert with that expert's router row
(`mode: with_anchor`, as FlexOlmo does). It starts from the anchor FFN (`init: anchor`, as
Branch-Train-MiX does) or from random weights (`init: scratch`). At the end it records, over its
partition's calibration documents and with itself in place, the router-input statistics of
DESIGN.md section 3: count, sum and X^T X of the post-attention-norm hidden state per layer.

Only one expert's training state exists at a time; a finished expert is skipped on rerun and an
interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import logging
import math
import shutil

import torch
from torch import nn

from modularforge.config import Config
from modularforge.data.batches import PreparedData, Windows, batch_rng, document_batches, fixed_batches, spread_batches
from modularforge.data.shards import CALIB, TRAIN, VAL
from modularforge.device import as_float64, autocast, autocast_dtype, module_device, resolve_device, to_device
from modularforge.errors import DataError, TrainingError
from modularforge.expert_set import PREPARED, ExpertSpec
from modularforge.files import read_json, save_tensors, sha256_file, write_json
from modularforge.model.layers import SwiGLU
from modularforge.model.moe import SparseMoE
from modularforge.model.transformer import CausalLM
from modularforge.model.weights import FFN_WEIGHTS, build_model, dense_shapes, ffn_from_weights, ffn_key, is_ffn
from modularforge.routers import empty_stats, save_stats, stat_names
from modularforge.runs import Run
from modularforge.safetensors_stream import checked_header, read_header, read_tensors
from modularforge.schemas import ExpertDone
from modularforge.train.fit import FIT_DIR, fit_expert, fit_windows
from modularforge.train.loop import KeepBest, LoopPlan, LoopResult, ModelLoss, Objective, check_resume, train_loop

log = logging.getLogger(__name__)

MIN_SELECTION_DOCUMENTS = 4  # fewer calibration documents than this: choose on the validation ones too
SWAP_STREAM = 10_000  # random stream of anchor-swap draws (an expert of batch stream s uses SWAP_STREAM + s)
REPLAY_STREAM = 20_000  # random stream of an added expert's replayed trunk windows (REPLAY_STREAM + s)


def check_inputs(run: Run) -> None:
    """What training the run's experts reads, checked before the stage records anything: the trunk's headers, each
    expert's done.json and the files it would resume from, and the text of each expert not finished."""
    cfg = run.cfg
    shapes = dense_shapes(cfg.model, run.vocab_size())
    for name, ffn in (("shared", False), ("anchor", True)):
        checked_header(run.shared_dir / f"{name}.safetensors", {n: s for n, s in shapes.items() if is_ffn(n) == ffn})
    folders = set()
    for spec in run.experts():
        out = run.expert_dir(spec.name)
        done = read_json(out / "done.json", ExpertDone) if (out / "done.json").exists() else {}
        check_resume(out)
        check_resume(out / FIT_DIR)
        if done.get("fingerprint") == run.expert_fingerprint(spec) or spec.data is None:
            continue
        folders |= {spec.data, *([PREPARED] if spec.replay is not None else [])}
        if spec.fit_into is not None:  # the fit reads the set it joins: its experts' files and text
            _check_fit_into(run, spec)
            folders |= {s.data for s in run.experts() if s.data is not None}
    for folder in sorted(folders):
        PreparedData(run.dir / folder)


def _check_fit_into(run: Run, spec: ExpertSpec) -> None:
    temperature = spec.fit_into.get("temperature")
    if temperature is not None and len(temperature) != run.cfg.model.num_layers:
        raise DataError(f"{run.experts_dir / 'registry.json'}: {spec.name} is fitted at {len(temperature)} router "
                        f"temperatures, one per layer of {run.cfg.model.num_layers}; remove {spec.name} and add it again")
    for name in spec.fit_into["experts"]:
        for path in run.expert_files(name).values():
            if path.is_file():  # a missing one is the fit's own error, which says what to do
                read_header(path)


def finished_expert(run: Run, spec: ExpertSpec) -> dict | None:
    """The summary of an expert if it finished under its current fingerprint and its files are intact."""
    done = run.expert_dir(spec.name) / "done.json"
    if not done.exists():
        return None
    summary = read_json(done, ExpertDone)
    if summary["fingerprint"] != run.expert_fingerprint(spec):
        return None
    damaged = [path.name for role, path in run.expert_files(spec.name).items()
               if not path.is_file() or sha256_file(path) != summary.get("sha256", {}).get(role)]
    if damaged:
        log.warning("%s: %s missing or changed since it was trained; training it again", spec.name,
                    " and ".join(damaged))
        return None
    return summary


def train_expert(run: Run, spec: ExpertSpec, stop_after: int | None = None) -> dict:
    """Train one expert of the set (a partition or an added expert) unless it is finished; its summary."""
    cfg = run.cfg
    label = spec.name
    if (summary := finished_expert(run, spec)) is not None:
        log.info("%s already trained; skipping", label)
        return summary
    if spec.kind == "imported":
        raise TrainingError(f"{label} was imported and its files in {run.expert_dir(spec.name)} are missing or "
                            "changed, and there is no text here to train it again: import it again, or remove it")
    out = run.expert_dir(spec.name)
    data = PreparedData(run.dir / spec.data)
    stream, part = run.expert_stream(spec), spec.partition
    fingerprint = run.expert_fingerprint(spec)
    model = expert_model(cfg, run.vocab_size(), run, stream)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tcfg = cfg.expert_train_for(run.expert_steps(spec))
    seq_len, micro = cfg.seq_len(tcfg), tcfg.micro_batch
    train_windows = data.windows(TRAIN, part)
    # at least one window of each kind per batch: a share that rounds to none (or to all) still mixes
    replayed = 0 if spec.replay is None else min(tcfg.batch_size - 1, max(1, round(spec.replay * tcfg.batch_size)))
    trunk_text = PreparedData(run.data_dir).windows(TRAIN) if replayed else None
    loss = ModelLoss(model, tcfg.compile, tcfg.loss_chunks)
    keep_best = None
    selection_text = selection_windows(data, part) if cfg.experts.keep_best else None
    if selection_text is not None:
        val_batches, documents = document_batches(selection_text, cfg.experts.select_tokens, seq_len, micro)
        keep_best = KeepBest(window_losses=loss.per_window, documents=documents, margin=cfg.experts.select_margin)
    else:
        val_batches = fixed_batches(data.windows(VAL, part), tcfg.eval_batches * micro, seq_len, micro)

    def sample_batch(step: int) -> torch.Tensor:
        swaps = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, AnchorSwap)]
        if swaps:  # which layers run the anchor this step: a function of the step, so resuming repeats it
            draws = batch_rng(cfg.run.seed, SWAP_STREAM + stream, step).random(len(swaps))
            use_anchor = draws < cfg.experts.anchor_swap
            use_anchor[draws.argmax()] = False  # at least one layer trains every step
            for swap, flag in zip(swaps, use_anchor):
                swap.use_anchor = bool(flag)
        batch = train_windows.sample(batch_rng(cfg.run.seed, stream, step), tcfg.batch_size - replayed, seq_len)
        if not replayed:
            return batch
        trunk_batch = trunk_text.sample(batch_rng(cfg.run.seed, REPLAY_STREAM + stream, step), replayed, seq_len)
        return torch.cat([batch, trunk_batch])

    result = train_loop(
        Objective(params=trainable, loss_fn=loss, sample_batch=sample_batch, val_batches=val_batches,
                  no_decay=lambda name: name.endswith("gate.weight"), keep_best=keep_best),
        tcfg,
        LoopPlan(steps=run.expert_steps(spec), out_dir=out, label=label, fingerprint=fingerprint,
                 stop_after=stop_after),
    )
    if keep_best is not None:
        _log_against_anchor(label, result, cfg.experts.select_margin)
    stats = router_statistics(model, data.held_out(part, cfg.experts.stats_tokens), cfg.experts.stats_tokens, seq_len,
                              micro, autocast_dtype(tcfg.precision, module_device(model)))
    tokens = result.steps * cfg.tokens_per_step(tcfg)
    provenance = {"stage": "train-experts", "expert": spec.name, "fingerprint": fingerprint, "tokens": tokens}
    files = run.expert_files(spec.name)
    save_stats(files["stats"], stats, provenance)
    weights = {n: t.cpu() for n, t in expert_tensors(model).items()}
    fit = None
    if spec.fit_into is not None:  # an added expert: trained on inside the model it joins
        del model, loss, trainable, keep_best, sample_batch, val_batches  # free the expert trained alone
        weights, fit = fit_expert(run, spec, weights, files["stats"], out / FIT_DIR)
    save_tensors(files["expert"], weights, provenance)
    summary = {
        "name": spec.name,
        "fingerprint": fingerprint,
        "trunk": run.trunk_identity(),
        "model": {"hidden_size": cfg.model.hidden_size, "intermediate_size": cfg.model.intermediate_size,
                  "num_layers": cfg.model.num_layers},
        "steps": result.steps,
        "tokens": tokens,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "seconds": round(result.seconds + (fit.seconds if fit else 0), 1),
        "sha256": {name: sha256_file(path) for name, path in files.items()},
    }
    if selection_text is not None:
        gain = result.best_gain
        summary["selection"] = {
            "text": selection_text.name,
            "windows": gain.windows, "documents": gain.documents, "margin": cfg.experts.select_margin,
            "anchor_loss": result.initial_val_loss, "best_loss": result.best_val_loss, "best_step": result.best_step,
            "beats_anchor": result.best_step != 0,
            "gain": gain.gain, "standard_error": gain.standard_error if math.isfinite(gain.standard_error) else None,
        }
    if fit is not None:
        own, older = (fit.steps * count * cfg.seq_len(tcfg) for count in fit_windows(tcfg.batch_size))
        summary["fit"] = {"into": list(spec.fit_into["experts"]), "steps": fit.steps, "seconds": round(fit.seconds, 1),
                          "own_tokens": own, "older_tokens": older, "train_loss": fit.train_loss,
                          "val_loss": fit.val_loss}
    write_json(out / "done.json", summary)
    for leftover in ("ckpt.safetensors", "best.safetensors"):  # the finished files supersede them
        (out / leftover).unlink(missing_ok=True)
    shutil.rmtree(out / FIT_DIR, ignore_errors=True)
    return summary


def selection_windows(data: PreparedData, k: int) -> Windows:
    """Text an expert is chosen on: its partition's calibration documents, held out from training and from the
    validation split the report scores, so the choice does not flatter the reported numbers. A split by whole
    books can leave a partition one or two calibration documents (765 tokens of one, in the quality benchmark),
    too few to tell a gain from the difference between documents: such a partition is chosen on its
    calibration and validation documents together."""
    if data.documents(CALIB, k) >= MIN_SELECTION_DOCUMENTS:
        return data.windows(CALIB, k)
    return data.windows((CALIB, VAL), k)


def _log_against_anchor(label: str, result: LoopResult, margin: float) -> None:
    gain = result.best_gain
    if result.best_step == 0:
        log.warning("%s did not beat its anchor on held-out text of its partition by %g standard errors "
                    "(anchor loss %.4f; %d windows of %d documents): it ships as the anchor FFN", label, margin,
                    result.initial_val_loss, gain.windows, gain.documents)
    else:
        log.info("%s: held-out loss %.4f (anchor) -> %.4f at step %d (%.1f standard errors), perplexity %.1f%% "
                 "lower", label, result.initial_val_loss, result.best_val_loss, result.best_step,
                 gain.gain / gain.standard_error if gain.standard_error > 0 else math.inf,
                 100 * (1 - math.exp(-gain.gain)))


def expert_model(cfg: Config, vocab: int, run: Run, stream: int) -> CausalLM:
    """Frozen shared part + this expert's trainable FFN (beside the frozen anchor in with_anchor mode), on the
    run's device."""
    device = resolve_device(cfg)
    shared = read_tensors(run.shared_dir / "shared.safetensors")
    keeps_anchor = cfg.experts.mode == "with_anchor" or cfg.experts.anchor_swap > 0
    needs_anchor = keeps_anchor or cfg.experts.init == "anchor"
    anchor = read_tensors(run.shared_dir / "anchor.safetensors") if needs_anchor else {}
    if cfg.experts.init == "anchor":  # the loaded tensors are ours: copy them only if the anchor stays too
        ffn = {name: t.clone() for name, t in anchor.items()} if keeps_anchor else anchor
    else:
        ffn = scratch_ffn(cfg, stream)
    model = build_model(cfg.model, vocab, moe=False, tensors=shared | ffn, device=device)
    del shared
    if cfg.experts.frozen_bf16 and autocast_dtype(cfg.expert_train.precision, device) == torch.bfloat16:
        frozen_linears_to_bf16(model)
    model.activation_checkpointing = cfg.experts.train.activation_checkpointing
    for layer in model.model.layers:
        layer.mlp.requires_grad_(True)
    for i, layer in enumerate(model.model.layers if keeps_anchor else []):
        frozen = {w: anchor[ffn_key(i, w)].to(device) for w in FFN_WEIGHTS}
        if cfg.experts.mode == "with_anchor":
            layer.mlp = anchored_pair(layer.mlp, frozen, cfg.model.hidden_size)
        else:
            layer.mlp = AnchorSwap(layer.mlp, ffn_from_weights(frozen))
    return model


def frozen_linears_to_bf16(model: CausalLM) -> None:
    """Store the frozen attention projections and LM head in bf16. Under bf16 autocast a Linear casts its
    weight to bf16 before the product, so the results are unchanged and the fp32 copies are not needed. A head
    tied to the embeddings gets a bf16 copy of its own (the embeddings, whose rows are looked up, stay fp32): else
    every step casts the vocabulary-wide matrix again."""
    linears = [layer.self_attn for layer in model.model.layers]
    for module in [m for attn in linears for m in attn.children() if isinstance(m, nn.Linear)]:
        module.weight.data = module.weight.data.to(torch.bfloat16)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().to(torch.bfloat16),
                                            requires_grad=False)
    else:
        model.lm_head.weight.data = model.lm_head.weight.data.to(torch.bfloat16)


class AnchorSwap(nn.Module):
    """The expert FFN, which a training step may replace by the frozen anchor FFN (`experts.anchor_swap`),
    so that the expert's other layers learn to work on hidden states another FFN produced, as they will
    in the assembled MoE."""

    def __init__(self, expert: SwiGLU, anchor: SwiGLU):
        super().__init__()
        self.expert, self.anchor = expert, anchor
        self.use_anchor = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.anchor(x) if self.use_anchor and self.training else self.expert(x)


def scratch_ffn(cfg: Config, stream: int) -> dict[str, torch.Tensor]:
    m = cfg.model
    g = torch.Generator().manual_seed(cfg.run.seed * 1000 + stream + 1)
    out_std = m.init_std * (2 * m.num_layers) ** -0.5
    ffn = {}
    for i in range(m.num_layers):
        ffn[ffn_key(i, "w1")] = torch.randn(m.intermediate_size, m.hidden_size, generator=g) * m.init_std
        ffn[ffn_key(i, "w3")] = torch.randn(m.intermediate_size, m.hidden_size, generator=g) * m.init_std
        ffn[ffn_key(i, "w2")] = torch.randn(m.hidden_size, m.intermediate_size, generator=g) * out_std
    return ffn


def anchored_pair(expert: SwiGLU, anchor: dict[str, torch.Tensor], hidden: int) -> SparseMoE:
    """FlexOlmo's training unit: MoE of [frozen anchor, trainable expert] with top-2 of 2 and a router
    whose anchor row stays zero (its gradient is masked and it has no weight decay)."""
    with torch.device("meta"):
        pair = SparseMoE(hidden, expert.w1.out_features, num_experts=2, top_k=2)
    pair.experts[0] = ffn_from_weights(anchor)
    pair.experts[1] = expert
    device = expert.w1.weight.device
    pair.gate.weight = nn.Parameter(torch.zeros(2, hidden, device=device))
    mask = torch.tensor([[0.0], [1.0]], device=device)
    pair.gate.weight.register_hook(lambda grad: grad * mask)
    return pair


def expert_ffn(layer: nn.Module) -> SwiGLU:
    if isinstance(layer.mlp, SparseMoE):
        return layer.mlp.experts[1]
    return layer.mlp.expert if isinstance(layer.mlp, AnchorSwap) else layer.mlp


def expert_tensors(model: CausalLM) -> dict[str, torch.Tensor]:
    """The trained FFN under the dense model's names (`model.layers.{i}.mlp.w1.weight`): an expert is a dense
    FFN stack, and assembly names it by its position in the set. In with_anchor mode the pair's router row is
    not kept: assembly computes every router from the statistics."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        ffn = expert_ffn(layer)
        for w in FFN_WEIGHTS:
            out[ffn_key(i, w)] = getattr(ffn, w).weight.detach()
    return out


@torch.no_grad()
def router_statistics(
    model: CausalLM, windows: Windows, tokens: int, seq_len: int, micro: int, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """count, sum and X^T X (float64, on the CPU) of each layer's router input over about `tokens` tokens of
    `windows`, in windows spread evenly over them. The products are computed where the model is, in float64 where
    the device has it (not on Apple's mps, which takes the CPU path)."""
    hidden = model.cfg.hidden_size
    device = module_device(model)
    stats = empty_stats(len(model.model.layers), hidden)
    hooks = []
    for i, layer in enumerate(model.model.layers):

        def accumulate(module, args, output, names=stat_names(i)):
            x = output.detach().reshape(-1, hidden)
            x = as_float64(x)
            count, total, xtx = names
            stats[count] += x.shape[0]
            stats[total] += x.sum(0).cpu()
            stats[xtx] += (x.T @ x).cpu()

        hooks.append(layer.post_attention_layernorm.register_forward_hook(accumulate))
    was_training = model.training
    model.eval()
    try:
        for batch in spread_batches(windows, tokens, seq_len, micro):
            with autocast(dtype, device):
                model(to_device(batch[:, :-1], device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return stats
