"""The one training loop, used by the shared phase and by every expert.

AdamW (fused on CPU), linear warmup then warmup-stable-decay or cosine decay, gradient accumulation,
global-norm clipping, optional bf16 autocast, periodic validation, resumable checkpoints, a progress bar,
one log line per interval and a `metrics.jsonl` file. Batches are a pure function of the step (see
`data.batches.batch_rng`) and the checkpoint holds parameters and optimizer state, so a resumed
run takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from modularforge.config import TrainConfig
from modularforge.device import autocast, autocast_dtype, to_device
from modularforge.errors import TrainingError
from modularforge.files import atomic_path, metric_lines, read_metadata, save_tensors
from modularforge.safetensors_stream import read_header, read_tensors
from modularforge.train.cross_entropy import linear_cross_entropy
from modularforge.train.optimizer import Adafactor, FusedAdamW, Optimizer

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor], torch.Tensor]  # (micro_batch, T + 1) window batch -> scalar loss
WindowLossFn = Callable[[torch.Tensor], torch.Tensor]  # (micro_batch, T + 1) window batch -> (micro_batch,) losses


class ModelLoss:
    """Mean next-token cross-entropy (fp32) of the model on a (B, T + 1) window batch; with `compile`
    the forward pass goes through torch.compile (fused norms, rotary and SwiGLU elementwise work).
    The LM head and the loss run fused on `loss_chunks` slices of the positions, so the logits of only one
    slice exist at a time (they dominate memory at large vocabularies); see `train.cross_entropy`."""

    def __init__(self, model: nn.Module, compile: bool, loss_chunks: int = 1):
        self.model, self.loss_chunks = model, loss_chunks
        self.forward = torch.compile(model, dynamic=False) if compile else model

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        hidden = self.forward(inputs, head=False)
        total = linear_cross_entropy(hidden.flatten(0, 1), self.model.lm_head, targets.flatten(), self.loss_chunks)
        return total / targets.numel()

    def per_window(self, batch: torch.Tensor) -> torch.Tensor:
        """The mean loss of each window of the batch: (B,)."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        hidden = self.forward(inputs, head=False)
        return torch.stack([linear_cross_entropy(h, self.model.lm_head, t, self.loss_chunks) / t.numel()
                            for h, t in zip(hidden, targets)])



def lr_at(step: int, steps: int, cfg: TrainConfig) -> float:
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_fraction * steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = stable_steps(steps, cfg)
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start + 1) / max(1, steps - decay_start)
        return cfg.lr - (cfg.lr - floor) * min(1.0, progress)
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def stable_steps(steps: int, cfg: TrainConfig) -> int:
    """wsd: the steps before the decay; runs of any length agree on them (given warmup_steps)."""
    return steps - max(1, round(cfg.decay_fraction * steps))


@dataclass
class LoopResult:
    steps: int
    train_loss: float
    val_loss: float | None
    seconds: float
    initial_val_loss: float | None = None  # keep_best: the validation loss at step 0
    best_step: int | None = None  # keep_best: the step whose parameters `params` hold at the end
    best_val_loss: float | None = None
    best_gain: PairedGain | None = None  # keep_best: the kept step's loss gain over step 0, on the same windows


class Interrupted(Exception):
    """Raised by `stop_after`: the loop stopped early after saving a checkpoint, as a crash would."""


@dataclass(kw_only=True, slots=True)
class Objective:
    """What a loop trains: the parameters, their loss, and the data it is computed on."""

    params: dict[str, nn.Parameter]
    loss_fn: LossFn
    sample_batch: Callable[[int], torch.Tensor]  # step -> that step's (batch_size, T + 1) windows
    val_batches: Sequence[torch.Tensor]
    no_decay: Callable[[str], bool] = lambda name: False  # parameters (by name) without weight decay
    keep_best: KeepBest | None = None


@dataclass(kw_only=True, slots=True)
class KeepBest:
    """End on the best validated parameters, the starting point included. A trained step replaces the start
    only when its loss is lower by `margin` standard errors of the paired per-window difference, so a gain
    within the noise of the validation text keeps the start (an expert that cannot show it beats the anchor
    FFN it started from ships as that anchor). Windows of one document are not independent samples: the error
    treats each document (`documents`, one id per validation window) as one."""

    window_losses: WindowLossFn
    documents: np.ndarray
    margin: float = 2.0


@dataclass(frozen=True)
class PairedGain:
    """The mean per-window loss difference (start - trained) and its standard error with windows clustered by
    document (infinite with fewer than two documents: nothing says how much a second one would differ)."""

    gain: float
    standard_error: float
    windows: int
    documents: int

    @classmethod
    def of(cls, start: np.ndarray, trained: np.ndarray, documents: np.ndarray) -> PairedGain:
        diff = np.asarray(start, dtype=np.float64) - np.asarray(trained, dtype=np.float64)
        ids, cluster = np.unique(documents, return_inverse=True)
        mean = float(diff.mean())
        if len(ids) < 2:
            return cls(mean, math.inf, len(diff), len(ids))
        sums = np.bincount(cluster, weights=diff - mean, minlength=len(ids))
        se = math.sqrt(float((sums**2).sum()) * len(ids) / (len(ids) - 1)) / len(diff)
        return cls(mean, se, len(diff), len(ids))

    def beats(self, margin: float) -> bool:
        return self.gain > 0 and (margin == 0 or self.gain > margin * self.standard_error)


@dataclass(kw_only=True, slots=True)
class LoopPlan:
    """How long a loop trains, where its files go and what identifies them."""

    steps: int
    out_dir: Path
    label: str  # the name in log lines and on the progress bar
    fingerprint: str  # a checkpoint written under another one is not resumed
    stop_after: int | None = None  # save a checkpoint and raise Interrupted after this step (tests)


def train_loop(job: Objective, cfg: TrainConfig, plan: LoopPlan) -> LoopResult:
    """Train `job.params` for `plan.steps` optimizer steps; resume from `out_dir/ckpt.safetensors` if it matches.

    The loop splits each step's batch into micro-batches of `cfg.micro_batch`. With `job.keep_best`,
    `val_batches` are also scored before the first step, every validation that improves on the best so far
    (by the rule of `KeepBest`) saves the parameters to `out_dir/best.safetensors`, and at the end `params`
    hold the best of those (the starting point included).
    """
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = plan.out_dir / "ckpt.safetensors", plan.out_dir / "metrics.jsonl"
    optimizer = make_optimizer(job, cfg)
    start = _resume(ckpt_path, job.params, optimizer, plan.fingerprint, plan.steps)
    _trim_metrics(metrics_path, start)
    device = next(iter(job.params.values())).device  # the loop computes where its parameters are
    dtype = autocast_dtype(cfg.precision, device)
    best = _start_best(job, plan, start, dtype, device) if job.keep_best is not None else None
    interval = _Interval()
    val_loss, last_loss = None, float("nan")
    loop_start = time.perf_counter()
    bar = tqdm(total=plan.steps, initial=start, desc=plan.label, unit="step", disable=None, leave=False)
    with logging_redirect_tqdm():
        for step in range(start, plan.steps):
            lr = lr_at(step, plan.steps, cfg)
            batch = to_device(job.sample_batch(step), device)
            last_loss = train_step(job, optimizer, cfg, batch, lr, dtype)
            if not math.isfinite(last_loss):
                raise TrainingError(f"{plan.label}: non-finite loss ({last_loss}) at step {step + 1}; "
                                    "lower the learning rate")
            done = step + 1
            interval.tokens += batch.shape[0] * (batch.shape[1] - 1)
            bar.update(1)
            validated = None  # this step's validation loss, if it has one
            if done % cfg.eval_interval == 0 or done == plan.steps:
                if best is None:
                    val_loss = validated = evaluate_loss(job.loss_fn, job.val_batches, dtype, device)
                else:
                    losses = window_losses(job.keep_best.window_losses, job.val_batches, dtype, device)
                    val_loss = validated = float(losses.mean())
                    best.offer(done, losses, job.params)
            if done % cfg.log_interval == 0 or done == plan.steps or validated is not None:
                log_interval(metrics_path, plan, interval, done, last_loss, lr, validated)
            if done % cfg.checkpoint_interval == 0 or done == plan.steps or done == plan.stop_after:
                _save_checkpoint(ckpt_path, job.params, optimizer, done, plan.fingerprint, best)
            if done == plan.stop_after and done < plan.steps:
                bar.close()
                raise Interrupted(f"{plan.label}: stopped after step {done}")
    bar.close()
    result = LoopResult(plan.steps, last_loss, val_loss, time.perf_counter() - loop_start)
    if best is not None:
        if best.step != plan.steps:
            best.load_into(job.params)
            log.info("%s: keeping step %d (val %.3f), the best validation of the run", plan.label, best.step,
                     best.loss)
        result.initial_val_loss, result.best_step, result.best_val_loss = best.initial, best.step, best.loss
        result.best_gain = best.gain
    return result


def make_optimizer(job: Objective, cfg: TrainConfig) -> Optimizer:
    """AdamW (or Adafactor) with weight decay on the matrices (`no_decay` exempts some), none on vectors; with
    `step_in_backward`, each parameter steps from a hook as soon as its gradient is complete."""
    decays = {n: p.dim() >= 2 and not job.no_decay(n) for n, p in job.params.items()}
    groups = [([p for n, p in job.params.items() if decays[n]], cfg.weight_decay),
              ([p for n, p in job.params.items() if not decays[n]], 0.0)]
    optimizer = FusedAdamW(groups, betas=(cfg.beta1, cfg.beta2)) if cfg.optimizer == "adamw" else Adafactor(groups)
    if cfg.step_in_backward:
        optimizer.lr = 0.0  # the rate of the step under way, set before its backward pass
        # The hooks hold the optimizer weakly: a strong reference makes a cycle through the parameters' hooks that
        # the garbage collector does not see, and kept each finished expert's weights and state alive (3 GB for a
        # 1B base's FFN stack) while the next one trained.
        optimizer_ref = weakref.ref(optimizer)

        def step(p: torch.Tensor) -> None:
            if (live := optimizer_ref()) is not None:
                live.step_one(p, live.lr)

        for p in job.params.values():
            p.register_post_accumulate_grad_hook(step)
    return optimizer


def train_step(job: Objective, optimizer: Optimizer, cfg: TrainConfig, batch: torch.Tensor, lr: float,
               dtype: torch.dtype | None) -> float:
    """One optimizer step on `batch` (batch_size, T + 1), accumulated over micro-batches; the mean loss. With
    `step_in_backward` the one backward pass also steps (`make_optimizer`), so a non-finite loss is caught before it."""
    micro = cfg.micro_batch
    accum = cfg.batch_size // micro
    loss_sum = 0.0
    for m in range(accum):
        with autocast(dtype, batch.device):
            loss = job.loss_fn(batch[m * micro : (m + 1) * micro])
        if cfg.step_in_backward:
            if not math.isfinite(loss.item()):
                return loss.item()
            optimizer.lr = lr
        (loss / accum).backward()
        loss_sum += loss.item()
    mean = loss_sum / accum
    if cfg.step_in_backward:
        return mean
    if not math.isfinite(mean):  # the caller raises; clipping or stepping on it would only spread the NaN
        return mean
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(list(job.params.values()), cfg.grad_clip)
    optimizer.step(lr)
    optimizer.zero_grad()
    return mean


class _Interval:
    """Tokens trained and wall time since the last log line."""

    def __init__(self):
        self.tokens, self.start = 0, time.perf_counter()
        self.process = psutil.Process()


def log_interval(metrics_path: Path, plan: LoopPlan, interval: _Interval, done: int, loss: float, lr: float,
                 val_loss: float | None) -> None:
    """One log line and one metrics.jsonl record for the steps since the last (`val_loss`: this step's validation)."""
    record = {} if val_loss is None else {"val_loss": round(val_loss, 5)}
    now = time.perf_counter()
    rate = interval.tokens / max(now - interval.start, 1e-9)
    rss = interval.process.memory_info().rss / 2**30
    log.info(
        "%s | step %d/%d | loss %.3f | lr %.1e | %.1fk tok/s | rss %.2f GiB%s",
        plan.label, done, plan.steps, loss, lr, rate / 1e3, rss,
        f" | val {val_loss:.3f}" if val_loss is not None else "",
    )
    _append_metrics(metrics_path, {
        "step": done, "loss": round(loss, 5), "lr": lr, "tokens_per_s": round(rate, 1),
        "rss_gib": round(rss, 3), **record,
    })
    interval.tokens, interval.start = 0, now


def _start_best(job: Objective, plan: LoopPlan, start: int, dtype: torch.dtype | None, device: torch.device) -> _Best:
    """keep_best: the best so far, scored at step 0 on a fresh run and read from the checkpoint on a resumed one."""
    best = _Best(plan.out_dir / "best.safetensors", plan.fingerprint, job.keep_best)
    if start == 0:
        losses = window_losses(job.keep_best.window_losses, job.val_batches, dtype, device)
        best.offer(0, losses, job.params)
        _append_metrics(plan.out_dir / "metrics.jsonl", {"step": 0, "val_loss": round(best.initial, 5)})
        log.info("%s | step 0/%d | val %.3f (the starting point)", plan.label, plan.steps, best.initial)
    else:
        best.restore(plan.out_dir / "ckpt.safetensors")
    return best


class _Best:
    """The best validated parameters so far of a keep_best run, in `path`; the checkpoint carries which they
    are (step and loss) and the starting point's per-window losses, so a resumed run compares against the same
    best and the same start as an uninterrupted one."""

    def __init__(self, path: Path, fingerprint: str, rule: KeepBest):
        self.path, self.fingerprint, self.rule = path, fingerprint, rule
        self.step: int | None = None
        self.loss = math.inf
        self.start_losses: np.ndarray | None = None  # per validation window, at step 0
        self.gain: PairedGain | None = None  # of the best step over step 0

    @property
    def initial(self) -> float:
        return float(self.start_losses.mean())

    def offer(self, step: int, losses: np.ndarray, params: dict[str, nn.Parameter]) -> None:
        loss = float(losses.mean())
        if step == 0:
            self.start_losses = losses
            gain = PairedGain.of(losses, losses, self.rule.documents)
        else:
            gain = PairedGain.of(self.start_losses, losses, self.rule.documents)
            if loss >= self.loss or not gain.beats(self.rule.margin):
                return
        self.step, self.loss, self.gain = step, loss, gain
        save_tensors(self.path, {n: p.detach() for n, p in params.items()},
                     {"step": str(step), "val_loss": repr(loss), "fingerprint": self.fingerprint})

    def metadata(self) -> dict[str, str]:
        return {"best_step": str(self.step), "best_val_loss": repr(self.loss),
                "best_gain": json.dumps([self.gain.gain, self.gain.standard_error]),
                "start_window_losses": json.dumps(self.start_losses.tolist())}

    def restore(self, ckpt_path: Path) -> None:
        meta = checkpoint_metadata(ckpt_path)
        if "start_window_losses" not in meta:
            raise TrainingError(f"checkpoint {ckpt_path} was written without keep_best; delete it to restart")
        try:
            self.step, self.loss = int(meta["best_step"]), float(meta["best_val_loss"])
            self.start_losses = np.asarray(json.loads(meta["start_window_losses"]), dtype=np.float64).reshape(-1)
            gain, se = (float(x) for x in json.loads(meta["best_gain"]))
        except (KeyError, TypeError, ValueError):  # ValueError: JSON, a number or the unpacking
            raise TrainingError(f"checkpoint {ckpt_path} is damaged (its keep_best record does not parse); delete it "
                                "to restart") from None
        if len(self.start_losses) != len(self.rule.documents):
            raise TrainingError(f"checkpoint {ckpt_path} was validated on other windows; delete it to restart")
        ids = np.unique(self.rule.documents)
        self.gain = PairedGain(gain, se, len(self.start_losses), len(ids))
        saved = checkpoint_metadata(self.path) if self.path.exists() else {}
        # a best saved after the checkpoint (by steps the resumed run repeats) is what those steps save again
        if saved.get("fingerprint") != self.fingerprint or int(saved.get("step", -1)) < self.step:
            raise TrainingError(f"{self.path} does not hold the best step {self.step} its checkpoint records; "
                                f"delete {ckpt_path} to restart this run")

    def load_into(self, params: dict[str, nn.Parameter]) -> None:
        meta = checkpoint_metadata(self.path)
        if int(meta["step"]) != self.step or meta.get("fingerprint") != self.fingerprint:
            raise TrainingError(f"{self.path} holds step {meta['step']}, not the best step {self.step}")
        with torch.no_grad():
            for name, p in params.items():  # one tensor at a time: the trained weights are not held twice
                p.copy_(read_tensors(self.path, [name])[name])


@torch.no_grad()
def window_losses(loss_fn: WindowLossFn, batches: Sequence[torch.Tensor], dtype: torch.dtype | None,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """The loss of every window of `batches`, in order (float64)."""
    out = []
    for batch in batches:
        with autocast(dtype, device):
            out.append(loss_fn(to_device(batch, torch.device(device))).double().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def evaluate_loss(loss_fn: LossFn, batches: Sequence[torch.Tensor], dtype: torch.dtype | None,
                  device: torch.device | str = "cpu") -> float:
    total, count = 0.0, 0
    for batch in batches:
        with autocast(dtype, device):
            total += loss_fn(to_device(batch, torch.device(device))).item() * len(batch)
        count += len(batch)
    return total / max(count, 1)


def _save_checkpoint(path: Path, params: dict[str, nn.Parameter], optimizer: Optimizer, step: int,
                     fingerprint: str, best: _Best | None = None) -> None:
    tensors = {f"param.{n}": p.detach() for n, p in params.items()}
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"{key}.{name}"] = value
    meta = {"step": str(step), "fingerprint": fingerprint, **(best.metadata() if best is not None else {})}
    save_tensors(path, tensors, meta)


def _resume(path: Path, params: dict[str, nn.Parameter], optimizer: Optimizer, fingerprint: str, steps: int) -> int:
    if not path.exists():
        return 0
    meta = checkpoint_metadata(path)
    if meta.get("fingerprint") != fingerprint:
        log.warning("ignoring checkpoint %s: it was written with a different config", path)
        return 0
    keys = read_header(path)[0]
    by_param: dict[str, list[str]] = {}
    for key in keys:
        by_param.setdefault(key.split(".", 1)[1], []).append(key)
    with torch.no_grad():
        for name, p in params.items():  # one parameter (and its state) at a time: nothing is held twice
            if f"param.{name}" not in keys:
                raise TrainingError(f"checkpoint {path} lacks parameter {name}; delete it to restart")
            tensors = read_tensors(path, by_param[name])
            p.copy_(tensors.pop(f"param.{name}"))
            if tensors:
                optimizer.load_state(p, {key.split(".", 1)[0]: value for key, value in tensors.items()})
    step = int(meta["step"])
    log.info("resuming %s at step %d/%d", path.parent, step, steps)
    return step


def checkpoint_metadata(path: Path) -> dict[str, str]:
    """The metadata of a checkpoint (ckpt.safetensors or best.safetensors) with its step: a damaged file is a
    DataError, a step that is not a number a TrainingError, each naming the file."""
    meta = read_metadata(path)
    if not meta.get("step", "").isdigit():
        raise TrainingError(f"checkpoint {path} is damaged (its step is {meta.get('step', 'missing')!r:.40}); delete "
                            "it to restart this training")
    return meta


def check_resume(out_dir: Path) -> None:
    """The files a loop resumes from in `out_dir` (checkpoint, best parameters, metrics), checked before its stage
    records anything: damage in them is an error naming the file."""
    for name in ("ckpt.safetensors", "best.safetensors"):
        if (out_dir / name).exists():
            checkpoint_metadata(out_dir / name)
    if (out_dir / "metrics.jsonl").exists():
        metric_lines(out_dir / "metrics.jsonl")


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metrics lines written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    kept = [line for line, record in metric_lines(path) if record["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))
