"""The run directory is the interface between stages (DESIGN.md section 6).

    runs/<name>/config.yaml          resolved config
    runs/<name>/manifest.json        per stage: status, fingerprint, wall time, peak RSS
    runs/<name>/tokenizer/  data/  shared/  experts/expert_XX/  model/  reports/

A stage's fingerprint hashes the config sections it reads plus the fingerprint of the stage before
it, so changing `train.lr` reruns the shared phase and everything after it, but not `prepare`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modularforge.config import Config
from modularforge.errors import StageOrderError
from modularforge.files import read_json, write_json, write_text

log = logging.getLogger(__name__)

STAGES = ["prepare", "train-shared", "train-experts", "assemble", "calibrate", "evaluate"]

# Config keys each stage reads (executor settings are left out: they do not change results). model.top_k
# only matters from assembly on, so changing it does not retrain anything.
_STAGE_KEYS: dict[str, list[str]] = {
    "prepare": ["data", "tokenizer", "partition", "model.num_experts", "run.seed"],
    "train-shared": ["model", "train", "budget", "run.seed"],
    "train-experts": [
        "experts.init", "experts.mode", "experts.anchor_swap", "experts.stats_tokens", "experts.train", "budget",
        "model", "run.seed",
    ],
    "assemble": ["assemble", "model.top_k"],
    "calibrate": ["calibrate"],
    "evaluate": ["evaluate"],
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Run:
    def __init__(self, cfg: Config, run_dir: str | Path | None = None):
        self.cfg = cfg
        self.dir = Path(run_dir) if run_dir is not None else Path(cfg.run.root) / cfg.run.name

    tokenizer_dir = property(lambda self: self.dir / "tokenizer")
    data_dir = property(lambda self: self.dir / "data")
    shared_dir = property(lambda self: self.dir / "shared")
    experts_dir = property(lambda self: self.dir / "experts")
    model_dir = property(lambda self: self.dir / "model")
    reports_dir = property(lambda self: self.dir / "reports")
    manifest_path = property(lambda self: self.dir / "manifest.json")

    def expert_dir(self, index: int) -> Path:
        return self.experts_dir / f"expert_{index:02d}"

    def manifest(self) -> dict[str, Any]:
        return read_json(self.manifest_path) if self.manifest_path.exists() else {"stages": {}}

    def fingerprint(self, stage: str) -> str:
        dump = self.cfg.model_dump(mode="json")
        picked = {key: _lookup(dump, key) for key in _STAGE_KEYS[stage]}
        if "model" in picked:  # top_k matters only from assembly on (listed there)
            picked["model"] = {k: v for k, v in picked["model"].items() if k != "top_k"}
        index = STAGES.index(stage)
        upstream = self.fingerprint(STAGES[index - 1]) if index else ""
        blob = json.dumps({"keys": picked, "upstream": upstream}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def is_done(self, stage: str) -> bool:
        entry = self.manifest()["stages"].get(stage, {})
        return entry.get("status") == "done" and entry.get("fingerprint") == self.fingerprint(stage)

    def require(self, stage: str) -> None:
        if not self.is_done(stage):
            entry = self.manifest()["stages"].get(stage)
            why = "has not finished" if not entry or entry.get("status") != "done" else "ran with a different config"
            raise StageOrderError(
                f"stage '{stage}' {why} in {self.dir}; run `modularforge {stage}` (or `modularforge run`) first"
            )

    def save_config(self) -> None:
        write_text(self.dir / "config.yaml", self.cfg.to_yaml())

    def _update(self, stage: str, entry: dict[str, Any]) -> None:
        manifest = self.manifest()
        manifest["stages"][stage] = entry
        write_json(self.manifest_path, manifest)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Mark `name` running; on success record it done with wall time and this process's peak RSS.

        The yielded dict collects extra facts (sizes, checksums) stored with the stage.
        """
        if STAGES.index(name):
            self.require(STAGES[STAGES.index(name) - 1])
        self.dir.mkdir(parents=True, exist_ok=True)
        self.save_config()
        fingerprint = self.fingerprint(name)
        self._update(name, {"status": "running", "fingerprint": fingerprint, "started_at": time.time()})
        extra: dict[str, Any] = {}
        start = time.perf_counter()
        yield extra
        wall = time.perf_counter() - start
        self._update(
            name,
            {
                "status": "done",
                "fingerprint": fingerprint,
                "finished_at": time.time(),
                "wall_seconds": round(wall, 2),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                **extra,
            },
        )
        log.info("%s done in %.1fs (peak RSS %.0f MB)", name, wall, peak_rss_mb())


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node
