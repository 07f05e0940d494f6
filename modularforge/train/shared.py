"""Stage 2, train-shared: embeddings, attention, norms, LM head and a dense anchor FFN, trained
together on all partitions (DESIGN.md section 2); then split into the frozen shared part and the anchor."""

from __future__ import annotations

import logging

import torch

from modularforge.data.batches import PreparedData, batch_rng, fixed_batches
from modularforge.data.shards import TRAIN, VAL
from modularforge.files import read_json, save_tensors
from modularforge.model.transformer import CausalLM, count_parameters
from modularforge.model.weights import split_shared
from modularforge.runs import Run
from modularforge.train.loop import model_loss, train_loop

log = logging.getLogger(__name__)

SHARED_STREAM = 1_000_000  # batch stream id of the shared phase; experts use their index


def vocab_size(run: Run) -> int:
    return read_json(run.data_dir / "shards.json")["vocab_size"]


def train_shared(run: Run, stop_after: int | None = None) -> None:
    cfg = run.cfg
    with run.stage("train-shared") as facts:
        data = PreparedData(run.data_dir)
        model = CausalLM(cfg.model, vocab_size(run), moe=False)
        model.init_weights(torch.Generator().manual_seed(cfg.run.seed))
        model.activation_checkpointing = cfg.train.activation_checkpointing
        seq_len, micro = cfg.seq_len(cfg.train), cfg.train.micro_batch
        train_windows = data.windows(TRAIN)
        val_batches = fixed_batches(data.windows(VAL), cfg.train.eval_batches * micro, seq_len, micro)
        log.info(
            "shared phase: %.2fM parameters, %d steps of %d x %d tokens",
            count_parameters(model) / 1e6, cfg.shared_steps, cfg.train.batch_size, seq_len,
        )
        result = train_loop(
            dict(model.named_parameters()),
            model_loss(model, cfg.train.compile, cfg.train.loss_chunks),
            lambda step: train_windows.sample(batch_rng(cfg.run.seed, SHARED_STREAM, step), cfg.train.batch_size, seq_len),
            val_batches,
            cfg.train,
            cfg.shared_steps,
            run.shared_dir,
            "shared",
            fingerprint=run.fingerprint("train-shared"),
            stop_after=stop_after,
        )
        state = model.state_dict()
        if cfg.model.tie_embeddings:
            state.pop("lm_head.weight")
        shared, anchor = split_shared(state)
        tokens = result.steps * cfg.tokens_per_step(cfg.train)
        provenance = {"stage": "train-shared", "fingerprint": run.fingerprint("train-shared"), "tokens": tokens}
        facts["shared_sha256"] = save_tensors(run.shared_dir / "shared.safetensors", shared, provenance)
        facts["anchor_sha256"] = save_tensors(run.shared_dir / "anchor.safetensors", anchor, provenance)
        facts.update(steps=result.steps, train_loss=result.train_loss, val_loss=result.val_loss,
                     tokens=tokens, train_seconds=round(result.seconds, 1))
