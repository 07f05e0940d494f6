"""Fitting an added expert into the model it joins (add-expert; DESIGN.md section 7b).

An expert trained alone beside the trunk meets, once assembled, a per-token router that sends it only part of its
own text (the rest goes to older experts) and part of the older text (in the grow benchmark, the State of the
Union addresses to the legal-code expert, the Jargon File to the computing dictionary's). Fitting trains it on:
inside the grown MoE, with the experts it joins, every router and the trunk frozen, for `experts.fit_fraction` of
its steps more. The routers are solved in closed form from every expert's statistics, as assembly solves them
(and divided by the temperatures the set was calibrated at), so the expert learns the routing the exported model
will give it. Each batch is half its own text, on which it learns next-token prediction under that routing, and
half the older text of the set, on which it learns to change the model before the add as little as it can:
next-token loss plus `experts.fit_distill` x the KL divergence from that model's predictions (the same MoE
without the new expert). Only the new expert's FFNs train; its router statistics stay those of the expert trained
alone, so the routers it was fitted under are the ones assembly computes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from modularforge.data.batches import LABEL_SHIFT, PreparedData, Windows, batch_rng, fixed_batches, split_labels
from modularforge.data.shards import TRAIN
from modularforge.device import resolve_device
from modularforge.errors import TrainingError
from modularforge.expert_set import ExpertSpec
from modularforge.files import read_json
from modularforge.model.transformer import CausalLM
from modularforge.model.weights import FFN_WEIGHTS, build_model, expert_key, ffn_key, ffn_to_expert, gate_key, is_ffn
from modularforge.routers import compute_routers
from modularforge.runs import Run
from modularforge.safetensors_stream import read_tensors
from modularforge.schemas import ExpertDone
from modularforge.train.cross_entropy import linear_cross_entropy
from modularforge.train.loop import LoopPlan, LoopResult, Objective, train_loop

log = logging.getLogger(__name__)

FIT_DIR = "fit"  # the fit's checkpoint folder in experts/<name>/, removed when the expert is done
FIT_STREAM = 30_000  # random stream of the fit's batches (FIT_STREAM + the expert's stream)
OLDER = 1  # window label of the older text in a fit batch (its own text is 0)


def fit_steps(run: Run, spec: ExpertSpec) -> int:
    return max(1, round(run.cfg.experts.fit_fraction * run.expert_steps(spec)))


def fit_windows(batch_size: int) -> tuple[int, int]:
    """Windows of a fit batch: (of the expert's own text, of the older text); a batch of one is its own text."""
    older = batch_size // 2
    return batch_size - older, older


def fit_expert(run: Run, spec: ExpertSpec, expert: dict[str, torch.Tensor], stats_path: Path,
               out_dir: Path) -> tuple[dict[str, torch.Tensor], LoopResult]:
    """The added expert `expert` (dense FFN names) fitted into the set `spec.fit_into`; the fit's loop result."""
    cfg = run.cfg
    joined = list(spec.fit_into["experts"])
    for name, fingerprint in spec.fit_into["experts"].items():
        done = run.expert_dir(name) / "done.json"
        if not done.is_file() or read_json(done, ExpertDone)["fingerprint"] != fingerprint:
            raise TrainingError(f"{spec.name} is fitted into the set it joined, and {name} of that set is missing "
                                f"or was trained again since; remove {spec.name} and add it again")
    model, older_rows = grown_model(run, joined, expert, stats_path, spec.fit_into.get("temperature"))
    new = len(joined)
    trainable = {}
    for i, block in enumerate(model.moe_blocks()):
        for w in FFN_WEIGHTS:
            linear = getattr(block.experts[new], w)
            linear.weight.requires_grad_(True)
            trainable[expert_key(i, new, w)] = linear.weight

    own = PreparedData(run.dir / spec.data).windows(TRAIN, spec.partition)
    older = older_text(run, joined)
    tcfg = cfg.expert_train_for(fit_steps(run, spec))
    own_count, older_count = fit_windows(tcfg.batch_size)
    # On the CPU in fp32: under bf16 autocast every expert's token count, new at each step, is a new matmul shape,
    # and the CPU kernels' per-shape caches grew the process by about 100 MB a step (1.3 GB after 6 steps, against
    # 0.7 GB in fp32, which was also faster: 0.54 against 0.62 s a step; the grow benchmark's us_code expert).
    # The grown model holds every expert, so its activations must shrink to keep the fit within the expert phase's
    # peak: micro-batches of a quarter of the batch, each of one kind of text (the fit alone peaked at 533 MB, at
    # 608 MB with halves and 695 MB with the whole batch; add-expert's training step at 575 MB against the expert
    # phase's 544 MB).
    quarters = older_count > 0 and own_count == older_count and older_count % 2 == 0
    fit_cfg = tcfg.model_copy(update={
        "lr": tcfg.lr * cfg.experts.fit_lr, "warmup_steps": None,
        "precision": "fp32" if resolve_device(cfg).type == "cpu" else tcfg.precision,
        "micro_batch_size": older_count // 2 if quarters else tcfg.micro_batch_size,
    })
    seq_len, micro = cfg.seq_len(fit_cfg), fit_cfg.micro_batch
    stream = run.expert_stream(spec)

    def sample_batch(step: int) -> torch.Tensor:
        rng = batch_rng(cfg.run.seed, FIT_STREAM + stream, step)
        picks = rng.integers(len(older), size=older_count)  # each older window from an expert's text, evenly
        parts = [own.sample(rng, own_count, seq_len)]
        parts += [older[k].sample(rng, int((picks == k).sum()), seq_len) for k in sorted(set(picks.tolist()))]
        batch = torch.cat(parts)
        batch[own_count:] |= OLDER << LABEL_SHIFT
        return batch

    val_own = fixed_batches(own, micro, seq_len, micro)[:1]
    val_older = [b | (OLDER << LABEL_SHIFT) for b in fixed_batches(older[0], micro, seq_len, micro)[:1]
                 if older_count]
    loss = FitLoss(model, older_rows, cfg.experts.fit_distill, fit_cfg.loss_chunks)
    result = train_loop(
        Objective(params=trainable, loss_fn=loss, sample_batch=sample_batch, val_batches=val_own + val_older),
        fit_cfg,
        LoopPlan(steps=fit_steps(run, spec), out_dir=out_dir, label=f"{spec.name} (fit)",
                 fingerprint=run.expert_fingerprint(spec)),
    )
    fitted = {ffn_key(i, w): trainable[expert_key(i, new, w)].detach().cpu()
              for i in range(cfg.model.num_layers) for w in FFN_WEIGHTS}
    return fitted, result


def grown_model(run: Run, joined: list[str], expert: dict[str, torch.Tensor], stats_path: Path,
                temperature: list[float] | None) -> tuple[CausalLM, list[torch.Tensor]]:
    """The MoE of the trunk, the experts `joined` and the new `expert` (last), with the routers assembly would
    compute for it; and the routers of the set without the new expert (the model before the add)."""
    cfg = run.cfg
    tensors = read_tensors(run.shared_dir / "shared.safetensors")
    for e, name in enumerate(joined):
        tensors |= {ffn_to_expert(n, e): t for n, t in read_tensors(run.expert_files(name)["expert"]).items()
                    if is_ffn(n)}
    tensors |= {ffn_to_expert(n, len(joined)): t.detach().cpu().clone() for n, t in expert.items()}
    stats = [run.expert_files(name)["stats"] for name in joined]
    temps = temperature or [1.0] * cfg.model.num_layers
    grown = compute_routers(cfg, stats + [stats_path])
    before = compute_routers(cfg, stats)
    tensors |= {gate_key(i): grown[gate_key(i)] / temps[i] for i in range(cfg.model.num_layers)}
    device = resolve_device(cfg)
    model_cfg = cfg.model.model_copy(update={"num_experts": len(joined) + 1})
    model = build_model(model_cfg, run.vocab_size(), moe=True, tensors=tensors, device=device)
    return model, [(before[gate_key(i)] / temps[i]).to(device) for i in range(cfg.model.num_layers)]


def older_text(run: Run, joined: list[str]) -> list[Windows]:
    """The training text of each expert of the set the new one joins (imported ones have none here)."""
    specs = {s.name: s for s in run.experts()} | {s.name: s for s in run.registry().added}
    data: dict[str, PreparedData] = {}
    texts = []
    for name in joined:
        spec = specs.get(name)
        if spec is None or spec.data is None:
            continue
        prepared = data.setdefault(spec.data, PreparedData(run.dir / spec.data))
        texts.append(prepared.windows(TRAIN, spec.partition))
    if not texts:
        raise TrainingError("no expert of the set holds training text here (all were imported), so there is no older "
                            "text to fit a new expert against; set experts.fit_fraction: 0")
    return texts


@contextlib.contextmanager
def before_the_add(model: CausalLM, rows: list[torch.Tensor]) -> Iterator[None]:
    """The grown model as the model before the add: every MoE block without its last (the new) expert, routed by
    `rows`. The modules are shared, so no weight is copied."""
    blocks = model.moe_blocks()
    saved = [(block.gate, block.experts) for block in blocks]
    try:
        for block, weight in zip(blocks, rows):
            gate = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            gate.weight = nn.Parameter(weight, requires_grad=False)
            block.gate, block.experts = gate, nn.ModuleList(list(block.experts)[:-1])
        yield
    finally:
        for block, (gate, experts) in zip(blocks, saved):
            block.gate, block.experts = gate, experts


class FitLoss:
    """Mean over a batch's tokens of: next-token loss of the grown model; on the older text (windows labelled
    OLDER), plus `distill` x the KL divergence of its predictions from the model before the add. Every window
    has the same length, so each weighs the same."""

    def __init__(self, model: CausalLM, older_rows: list[torch.Tensor], distill: float, chunks: int = 1):
        self.model, self.older_rows, self.distill, self.chunks = model, older_rows, distill, chunks

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        tokens, labels = split_labels(batch)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        hidden = self.model(inputs, head=False)
        is_older = labels[:, 0] == OLDER
        head = self.model.lm_head
        total = hidden.new_zeros((), dtype=torch.float32)
        if not is_older.all():
            total = linear_cross_entropy(hidden[~is_older].flatten(0, 1), head, targets[~is_older].flatten(),
                                         self.chunks)
        if is_older.any():
            reference = None
            if self.distill:
                with torch.no_grad(), before_the_add(self.model, self.older_rows):
                    reference = self.model(inputs[is_older], head=False).flatten(0, 1)
            total = total + linear_cross_entropy(hidden[is_older].flatten(0, 1), head, targets[is_older].flatten(),
                                                 self.chunks, reference, self.distill)
        return total / targets.numel()
