"""Stage 2, train-shared: embeddings, attention, norms, LM head and a dense anchor FFN, trained
together on all partitions (DESIGN.md section 2); then split into the frozen shared part and the anchor.

A run that starts from a pretrained base (`model.base`, DESIGN.md section 9) takes them from it instead: with no
shared-phase budget (`budget.base_trunk_tokens: 0`) the base's tensors are written as they are, one at a time,
into the same two files; with a budget, the shared phase trains from the base rather than from random weights."""

from __future__ import annotations

import logging
import math
from typing import BinaryIO

import torch
import torch.nn.functional as F
from torch import nn

from modularforge.data.batches import PreparedData, batch_rng, fixed_batches, split_labels
from modularforge.data.shards import TRAIN, VAL
from modularforge.device import resolve_device
from modularforge.errors import TrainingError
from modularforge.files import atomic_path, save_tensors, sha256_file
from modularforge.model.transformer import CausalLM, count_parameters
from modularforge.model.weights import build_model, is_ffn, split_shared
from modularforge.runs import Run
from modularforge.safetensors_stream import Source, TensorInfo, write_streaming
from modularforge.train.loop import LoopPlan, LossFn, ModelLoss, Objective, check_resume, train_loop

log = logging.getLogger(__name__)

SHARED_STREAM = 1_000_000  # batch stream id of the shared phase; experts use their index


class DomainProbe(nn.Module):
    """Per layer, a linear classifier of each token's partition from the state that layer's router reads (the
    post-attention norm's output), trained beside the shared phase when `train.domain_probe_weight` > 0 and
    then dropped. Its gradient makes those states separable by partition, which is what a router that is
    linear in one hidden state (Mixtral's) needs in order to send tokens to their partition's expert."""

    def __init__(self, model: CausalLM, num_partitions: int, first_position: int = 0):
        super().__init__()
        self.first_position = first_position
        self.heads = nn.ModuleList(nn.Linear(model.cfg.hidden_size, num_partitions) for _ in model.model.layers)
        self.states: list[torch.Tensor] = []
        for layer in model.model.layers:
            layer.post_attention_layernorm.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # training steps only; validation and other no-grad passes keep nothing
            self.states.append(out)

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over layers and tokens of the states recorded since the last call."""
        states, self.states = self.states, []
        if len(states) != len(self.heads):
            raise TrainingError(f"the domain probe saw {len(states)} hidden states for {len(self.heads)} layers")
        first, labels = self.first_position, labels[:, self.first_position :]
        losses = [F.cross_entropy(head(h[:, first:]).float().flatten(0, 1), labels.flatten())
                  for head, h in zip(self.heads, states)]
        return sum(losses) / len(losses)


def probed_loss(lm_loss: LossFn, probe: DomainProbe, weight: float) -> LossFn:
    """The language-model loss of a labelled batch, plus `weight` x the probe's loss while training."""

    def loss(batch: torch.Tensor) -> torch.Tensor:
        tokens, labels = split_labels(batch)
        value = lm_loss(tokens)
        if not torch.is_grad_enabled():  # validation: the language-model loss alone
            return value
        return value + weight * probe.loss(labels[:, :-1])

    return loss


def train_shared(run: Run, stop_after: int | None = None) -> None:
    with run.lock():  # the text and the checkpoint are checked before the stage records anything
        run.require("prepare")
        PreparedData(run.data_dir)
        check_resume(run.shared_dir)
        _train_shared(run, stop_after)


def _train_shared(run: Run, stop_after: int | None) -> None:
    cfg = run.cfg
    with run.stage("train-shared") as facts:
        if run.base is not None:
            facts.update(base=cfg.model.base, base_sha256=run.base.identity())
            if cfg.shared_steps == 0:
                adopt_base(run, facts)
                return
        data = PreparedData(run.data_dir)
        device = resolve_device(cfg)
        if run.base is not None:
            model = build_model(cfg.model, run.vocab_size(), moe=False, tensors=dict(run.base.tensors()), device=device)
            model.requires_grad_(True)
        else:
            with torch.device("cpu"):  # initialised on the CPU from a CPU generator: the same weights on every device
                model = CausalLM(cfg.model, run.vocab_size(), moe=False)
            model.init_weights(torch.Generator().manual_seed(cfg.run.seed))
            model.to(device)
        model.activation_checkpointing = cfg.train.activation_checkpointing
        seq_len, micro = cfg.seq_len(cfg.train), cfg.train.micro_batch
        train_windows = data.windows(TRAIN)
        val_batches = fixed_batches(data.windows(VAL), cfg.train.eval_batches * micro, seq_len, micro)
        log.info(
            "shared phase: %.2fM parameters, %d steps of %d x %d tokens",
            count_parameters(model) / 1e6, cfg.shared_steps, cfg.train.batch_size, seq_len,
        )
        probe = None
        if cfg.train.domain_probe_weight > 0:
            with torch.device("cpu"):
                probe = DomainProbe(model, data.num_partitions, min(cfg.train.domain_probe_from, seq_len - 1))
            probe.to(device)
        # the probe reads states through forward hooks, which a graph compiled earlier in this process for a
        # model of the same structure (dynamo reuses it across instances) would skip: run eagerly then
        compile = cfg.train.compile and probe is None
        params, loss = dict(model.named_parameters()), ModelLoss(model, compile, cfg.train.loss_chunks)
        if probe is not None:
            params |= {f"probe.{n}": p for n, p in probe.named_parameters()}
            loss = probed_loss(loss, probe, cfg.train.domain_probe_weight)

        def sample_batch(step: int) -> torch.Tensor:
            rng = batch_rng(cfg.run.seed, SHARED_STREAM, step)
            if probe is None:
                return train_windows.sample(rng, cfg.train.batch_size, seq_len)
            return train_windows.sample_labelled(rng, cfg.train.batch_size, seq_len, data.partition)

        result = train_loop(
            Objective(params=params, loss_fn=loss, sample_batch=sample_batch, val_batches=val_batches),
            cfg.train,
            LoopPlan(steps=cfg.shared_steps, out_dir=run.shared_dir, label="shared",
                     fingerprint=run.fingerprint("train-shared"), stop_after=stop_after),
        )
        state = {name: t.cpu() for name, t in model.state_dict().items()}
        if cfg.model.tie_embeddings:
            state.pop("lm_head.weight")
        shared, anchor = split_shared(state)
        tokens = result.steps * cfg.tokens_per_step(cfg.train)
        provenance = {"stage": "train-shared", "fingerprint": run.fingerprint("train-shared"), "tokens": tokens,
                      **({"base": cfg.model.base} if run.base is not None else {})}
        facts["shared_sha256"] = save_tensors(run.shared_dir / "shared.safetensors", shared, provenance)
        facts["anchor_sha256"] = save_tensors(run.shared_dir / "anchor.safetensors", anchor, provenance)
        facts.update(steps=result.steps, train_loss=result.train_loss, val_loss=result.val_loss,
                     tokens=tokens, train_seconds=round(result.seconds, 1))


def adopt_base(run: Run, facts: dict) -> None:
    """The base's trunk and FFN as the run's shared part and anchor, exactly (float32), streamed one tensor at a time:
    the base's FFN stack is never in memory whole. The anchor is the base's FFN, so with no expert trained the
    assembled model is the base."""
    base = run.base
    shapes = base.tensor_shapes()
    provenance = {"stage": "train-shared", "fingerprint": run.fingerprint("train-shared"), "tokens": "0",
                  "base": run.cfg.model.base, "base_sha256": base.identity()}
    log.info("taking the trunk and the anchor FFN from %s (%.1fM parameters), frozen as they are", run.cfg.model.base,
             sum(math.prod(s) for s in shapes.values()) / 1e6)
    for role, names in (("shared", {n for n in shapes if not is_ffn(n)}), ("anchor", {n for n in shapes if is_ffn(n)})):
        stream = base.tensors(names)

        def source(name: str) -> Source:
            info = TensorInfo(name, "F32", tuple(shapes[name]), 0, 4 * math.prod(shapes[name]))

            def copy(out: BinaryIO) -> None:
                read, tensor = next(stream)
                assert read == name, (read, name)
                out.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))

            return info, copy

        path = run.shared_dir / f"{role}.safetensors"
        with atomic_path(path) as tmp:
            write_streaming(tmp, [source(n) for n in sorted(names)], {k: str(v) for k, v in provenance.items()})
        facts[f"{role}_sha256"] = sha256_file(path)
    facts.update(steps=0, tokens=0, train_seconds=0.0)
