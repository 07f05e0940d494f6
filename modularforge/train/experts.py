"""Stage 3, train-experts: every expert not yet finished, one at a time in this process (the local executor)
or as Ray tasks (`experts.executor: ray`, train/ray_executor.py). Both run `train.expert.train_expert`.
"""

from __future__ import annotations

import gc

from modularforge.runs import Run
from modularforge.train.expert import train_expert


def train_experts(run: Run, stop_at: tuple[int, int] | None = None) -> None:
    """Train every expert not yet finished. stop_at=(expert, step) simulates a crash (tests)."""
    cfg = run.cfg
    with run.stage("train-experts") as facts:
        if cfg.experts.executor == "ray":
            from modularforge.train.ray_executor import train_experts_on_ray

            summaries = train_experts_on_ray(run)
        else:
            summaries = []
            for k in range(cfg.model.num_experts):
                stop = stop_at[1] if stop_at and stop_at[0] == k else None
                summaries.append(train_expert(run, k, stop_after=stop))
                gc.collect()
        facts["experts"] = summaries
