"""Ray executor of the expert stage (DESIGN.md section 7): one Ray task per expert.

Each task rebuilds the Run from the run directory (a path every node sees) and the config, sets its
torch threads, and calls the same `train_expert` as the local executor, which reads the shared
checkpoint and the expert's partition from that directory and writes the expert's files there. A task
returns only the expert's small summary, so the driver never holds expert weights. Resources per task
come from `experts.ray_*`; a task whose worker dies is retried up to `experts.ray_max_retries` times
and resumes from the expert's last checkpoint, because `train_expert` always does.

Progress: the driver shows a bar of finished experts and, every few seconds, one line with each
running expert's last step and loss, read from the `metrics.jsonl` files the tasks append to.
No service beyond Ray itself is involved.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from modularforge.config import Config, ExpertsConfig
from modularforge.errors import ModularForgeError, TrainingError
from modularforge.runs import Run
from modularforge.schemas import MetricsRecord, check

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
LOG_SECONDS = 10.0


def train_experts_on_ray(run: Run) -> list[dict]:
    """Train every unfinished expert of `run` as a Ray task; returns the summaries in expert order.

    Connects to the cluster at `experts.ray_address` (and disconnects at the end, leaving it running), or
    starts a local instance with `experts.ray_local_cpus` CPUs (and stops it at the end). If this process
    is already connected to Ray, that connection is used as it is.
    """
    ray = _import_ray()
    from modularforge.train.expert import finished_expert, train_expert

    cfg = run.cfg
    experts = run.experts()
    summaries = {s.name: done for s in experts if (done := finished_expert(run, s)) is not None}
    for name in summaries:
        log.info("%s already trained; skipping", name)
    pending = [s.name for s in experts if s.name not in summaries]
    for spec in experts:
        if spec.kind == "imported" and spec.name in pending:
            train_expert(run, spec)  # raises: an imported expert cannot be trained here
    if pending:
        started = _connect(ray, cfg.experts)
        try:
            task = ray.remote(**task_options(cfg.experts))(train_expert_task)
            config, run_dir = cfg.model_dump(mode="json"), str(Path(run.dir).resolve())
            refs = {task.remote(run_dir, config, name): name for name in pending}
            summaries |= _wait_for(ray, run, refs, len(summaries))
        finally:
            if started:
                ray.shutdown()
    return [summaries[s.name] for s in experts]


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ModularForgeError(
            "experts.executor=ray needs Ray: pip install 'modularforge[cluster]' (or set experts.executor=local)"
        ) from None
    return ray


def _connect(ray, x: ExpertsConfig) -> bool:
    """Attach to Ray; True when this call connected, so `ray.shutdown()` should follow."""
    if ray.is_initialized():
        return False
    try:
        if x.ray_address is None:
            ray.init(num_cpus=x.ray_local_cpus, include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=x.ray_address, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise ModularForgeError(f"cannot connect to the Ray cluster at {x.ray_address}: {e}") from None
    return True


def task_options(x: ExpertsConfig) -> dict[str, Any]:
    """Ray options of one expert task. Worker deaths (crash, OOM kill, lost node) are retried; so are
    I/O errors, which a shared filesystem can raise transiently. A ModularForgeError is not: it
    would fail the same way again."""
    options: dict[str, Any] = {
        "num_cpus": x.ray_cpus_per_task,
        "max_retries": x.ray_max_retries,
        "retry_exceptions": [OSError],
    }
    if x.ray_memory_gb_per_task is not None:
        options["memory"] = int(x.ray_memory_gb_per_task * 2**30)
    if x.ray_gpus_per_task:
        options["num_gpus"] = x.ray_gpus_per_task
    return options


def task_threads(cfg: Config) -> int:
    """torch intra-op threads of a task: run.threads, else the CPUs reserved for it (at least one)."""
    return cfg.run.threads or max(1, int(cfg.experts.ray_cpus_per_task))


def train_expert_task(run_dir: str, config: dict, name: str) -> dict:
    """Body of one Ray task (its name is the worker's process title): train the named expert, return its summary."""
    import torch

    from modularforge.config import config_from_dict
    from modularforge.train.expert import train_expert

    cfg = config_from_dict(config)
    torch.set_num_threads(task_threads(cfg))
    run = Run(cfg, run_dir)
    return train_expert(run, run.expert(name))


def _wait_for(ray, run: Run, refs: dict, already_done: int) -> dict[str, dict]:
    """Collect task results as they finish, showing progress; a failed task fails the stage."""
    total = len(run.experts())
    summaries: dict[str, dict] = {}
    pending = list(refs)
    started, last_log = time.time(), time.monotonic()
    bar = tqdm(total=total, initial=already_done, desc="experts (ray)", unit="expert", disable=None)
    with logging_redirect_tqdm():
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                name = refs[ref]
                summaries[name] = _result(ray, ref, name, pending)
                bar.update(1)
                log.info("%s done | train loss %.3f", name, summaries[name]["train_loss"])
            if pending and time.monotonic() - last_log >= LOG_SECONDS:
                log.info("%s", progress_line(run, [refs[r] for r in pending], already_done + len(summaries), started))
                last_log = time.monotonic()
    bar.close()
    return summaries


def _result(ray, ref, name: str, pending: list) -> dict:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        _cancel(ray, pending)
        raise _in_expert(e.cause, name) from None
    except ray.exceptions.RayError as e:
        _cancel(ray, pending)
        raise TrainingError(
            f"{name}: its Ray task was lost after all retries ({type(e).__name__}); "
            "rerun the stage to resume from its checkpoint"
        ) from None


def _in_expert(cause: BaseException, where: str) -> ModularForgeError:
    """The task's error for the driver: a user-fixable error keeps its type and one-line message."""
    if isinstance(cause, ModularForgeError):
        try:
            return type(cause)(f"{where}: {cause}")
        except TypeError:  # a subclass with its own constructor
            return ModularForgeError(f"{where}: {cause}")
    return TrainingError(f"{where} failed on Ray: {type(cause).__name__}: {cause}")


def _cancel(ray, pending: list) -> None:
    for ref in pending:
        ray.cancel(ref, force=True)


def progress_line(run: Run, running: list[str], done: int, since: float = 0.0) -> str:
    """`experts 1/4 done | expert_01: step 40/80 loss 3.214 | expert_02: no step yet` (queued or starting).

    Metrics files last written before `since` (a time.time()) are left from an earlier run and ignored."""
    experts = {s.name: s for s in run.experts()}
    parts = [f"experts {done}/{len(experts)} done"]
    for name in sorted(running):
        last = last_metrics(run.expert_dir(name) / "metrics.jsonl", since)
        if last and last.get("loss") is not None:  # the step-0 record of keep_best holds a validation loss only
            parts.append(f"{name}: step {last['step']}/{run.expert_steps(experts[name])} loss {last['loss']:.3f}")
        else:
            parts.append(f"{name}: no step yet")
    return " | ".join(parts)


def last_metrics(path: Path, since: float = 0.0) -> dict | None:
    """The last complete record of a metrics file another process may be appending to, if written since `since`."""
    if not path.exists() or path.stat().st_mtime < since:
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        try:
            return check(json.loads(line), MetricsRecord, path)
        except (ValueError, ModularForgeError):  # a line still being written (or damaged: this is only progress)
            continue
    return None
