"""Stage 3, train-experts: every expert of the run's set not yet finished, one at a time in this process (the
local executor) or as Ray tasks (`experts.executor: ray`, train/ray_executor.py). Both run
`train.expert.train_expert`. The set is the partition experts plus any that `add-expert` registered.
"""

from __future__ import annotations

import gc

from modularforge.runs import Run
from modularforge.train.expert import check_inputs, train_expert


def train_experts(run: Run, stop_at: tuple[int, int] | None = None) -> None:
    """Train every expert not yet finished. stop_at=(position in the set, step) simulates a crash (tests)."""
    with run.lock():  # every expert's inputs are checked before the stage records anything
        run.require("train-shared")
        check_inputs(run)
        _train_experts(run, stop_at)


def _train_experts(run: Run, stop_at: tuple[int, int] | None) -> None:
    cfg = run.cfg
    with run.stage("train-experts") as facts:
        if cfg.experts.executor == "ray":
            from modularforge.train.ray_executor import train_experts_on_ray

            summaries = train_experts_on_ray(run)
        else:
            summaries = []
            for j, spec in enumerate(run.experts()):
                stop = stop_at[1] if stop_at and stop_at[0] == j else None
                summaries.append(train_expert(run, spec, stop_after=stop))
                gc.collect()
        facts["experts"] = summaries
