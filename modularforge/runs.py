"""The run directory is the interface between stages (DESIGN.md section 6).

    runs/<name>/.modularforge-run    marker: this folder is a run directory (nothing else is written into)
    runs/<name>/.lock                the writer's lock (fcntl.flock) and its pid
    runs/<name>/config.yaml          resolved config
    runs/<name>/manifest.json        per stage: status, fingerprint, the sha256 of every file it wrote, wall
                                     time, peak RSS
    runs/<name>/tokenizer/  data/  shared/  experts/<expert>/  added/<expert>/  model/  reports/

Experts have identity (DESIGN.md section 7b): the run's expert set (`expert_set`) names them, each has a folder
`experts/<name>/` and a fingerprint of its own (trunk, data, recipe, steps), so adding, importing or removing
one never retrains another. Text added after `prepare` lives in `added/<expert>/`, laid out as `data/` is.

A stage's fingerprint hashes the config sections it reads plus the fingerprint of the stage before
it, so changing `train.lr` reruns the shared phase and everything after it, but not `prepare`.
A stage counts as done only while its files are on disk with the checksums it recorded (a file a later
stage rewrote, such as calibrate's shard in model/, is checked against that stage's record), and starting
a stage drops the records of every later one: re-assembly means recalibration.

One process writes into a run directory at a time: every stage holds the directory's lock, and `run`
holds it for all its stages, its child processes sharing it through an inherited descriptor.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modularforge.config import Config
from modularforge.errors import DataError, RunDirectoryError, StageOrderError, os_error
from modularforge.expert_set import PREPARED, ExpertSpec, Registry, partition_expert_name
from modularforge.files import LEFTOVER, read_json, remove_leftovers, sha256_file, write_json, write_text
from modularforge.pretrained import PretrainedBase, cached_base, with_base_shape
from modularforge.schemas import Manifest, Shards

log = logging.getLogger(__name__)

STAGES = ["prepare", "train-shared", "train-experts", "assemble", "calibrate", "evaluate"]

# Config keys each stage reads (executor settings are left out: they do not change results). model.top_k
# only matters from assembly on, so changing it does not retrain anything.
_STAGE_KEYS: dict[str, list[str]] = {
    "prepare": ["data", "tokenizer", "partition", "model.num_experts", "run.seed"],
    "train-shared": ["model", "train", "budget.total_tokens", "budget.shared_fraction", "run.seed"],
    "train-experts": [
        "experts.init", "experts.mode", "experts.anchor_swap", "experts.stats_tokens", "experts.train", "experts.lr_from_trunk",
        "experts.keep_best", "experts.select_tokens", "experts.select_margin", "budget",
        "model", "run.seed",
    ],  # and the expert set, each expert with its own fingerprint
    "assemble": ["assemble", "model.top_k"],
    "calibrate": ["calibrate"],
    "evaluate": ["evaluate"],
}


# Model keys that came with starting from a base, at their defaults: left out of fingerprints, so that runs from
# scratch keep the fingerprints (and finished stages) they had before the keys existed
_BASE_KEY_DEFAULTS = {"base": None, "architecture": "mixtral", "head_size": None, "context_length": None,
                      "rope_scaling": None}

# What one expert's fingerprint covers beside its trunk, its text and its steps
_EXPERT_RECIPE = ["experts.init", "experts.mode", "experts.anchor_swap", "experts.stats_tokens", "experts.train",
                  "experts.lr_from_trunk", "experts.keep_best", "experts.select_tokens", "experts.select_margin",
                  "run.seed"]

# and, for an added expert fitted into the set it joins (train/fit.py), what its fit reads
_FIT_RECIPE = ["experts.fit_fraction", "experts.fit_lr", "experts.fit_distill", "assemble", "model.top_k"]

EXPERT_FILES = {"expert": "expert.safetensors", "stats": "router_stats.safetensors"}  # role -> name in experts/<name>/
MARKER = ".modularforge-run"
LOCK = ".lock"
LOCK_FD_ENV = "MODULARFORGE_RUN_LOCK_FD"  # a child of `run`: the inherited descriptor that holds the lock

_held: dict[str, list] = {}  # resolved run directory -> [lock descriptor, depth, inherited]
_checksums: dict[tuple, str] = {}  # (path, size, mtime, inode) -> sha256, so one process hashes a file once


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_device_memory() -> dict[str, float]:
    """The CUDA allocator's peak of this process (MB), if it used a GPU: the memory bound on a GPU."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {}
    return {"peak_cuda_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


class Run:
    def __init__(self, cfg: Config, run_dir: str | Path | None = None):
        self.cfg = with_base_shape(cfg)  # a run that starts from a base takes its shape from it
        self.dir = Path(run_dir) if run_dir is not None else Path(cfg.run.root) / cfg.run.name

    @property
    def base(self) -> PretrainedBase | None:
        """The pretrained model the run starts from (`model.base`), if any."""
        return cached_base(self.cfg.model.base) if self.cfg.model.base is not None else None

    def check_base(self) -> None:
        """A run's trunk, anchor and every expert come from its base's bytes: if the file at `model.base` changed
        since the trunk was taken from it, nothing may go on from it (a DataError, before anything is written)."""
        base = self.base
        recorded = self.manifest()["stages"].get("train-shared", {})
        if base is None or recorded.get("status") != "done" or "base_sha256" not in recorded:
            return
        if recorded.get("base") == self.cfg.model.base and recorded["base_sha256"] != base.identity():
            raise DataError(
                f"the base model {self.cfg.model.base} has changed since this run took its trunk from it (sha256 "
                f"{recorded['base_sha256'][:12]}... then, {base.identity()[:12]}... now); put the original back, or "
                f"start a new run from it (--set run.name=NEW)"
            )

    tokenizer_dir = property(lambda self: self.dir / "tokenizer")
    data_dir = property(lambda self: self.dir / "data")
    shared_dir = property(lambda self: self.dir / "shared")
    experts_dir = property(lambda self: self.dir / "experts")
    model_dir = property(lambda self: self.dir / "model")
    reports_dir = property(lambda self: self.dir / "reports")
    manifest_path = property(lambda self: self.dir / "manifest.json")
    marker_path = property(lambda self: self.dir / MARKER)
    lock_path = property(lambda self: self.dir / LOCK)

    added_dir = property(lambda self: self.dir / "added")

    def expert_dir(self, expert: int | str) -> Path:
        """The folder of an expert, by name, or by partition for the partition experts."""
        return self.experts_dir / (expert if isinstance(expert, str) else partition_expert_name(expert))

    def expert_files(self, expert: int | str) -> dict[str, Path]:
        """The files an expert is shipped as: its weights ("expert") and its router statistics ("stats")."""
        return {role: self.expert_dir(expert) / name for role, name in EXPERT_FILES.items()}

    def registry(self) -> Registry:
        return Registry.load(self.experts_dir)

    def experts(self) -> list[ExpertSpec]:
        """The expert set, in the order of the assembled model's experts."""
        return self.registry().experts(self.cfg.model.num_experts)

    def expert(self, name: str) -> ExpertSpec:
        for spec in self.experts():
            if spec.name == name:
                return spec
        raise RunDirectoryError(f"{self.dir} has no expert named {name!r}; its experts: "
                                f"{', '.join(s.name for s in self.experts())}")

    def expert_steps(self, spec: ExpertSpec) -> int:
        if spec.tokens is None:
            return self.cfg.expert_steps
        return max(1, round(spec.tokens / self.cfg.tokens_per_step(self.cfg.expert_train)))

    def expert_stream(self, spec: ExpertSpec) -> int:
        """The random stream of an expert's batches (and scratch initialisation): its partition for the partition
        experts, else a number taken from its text, so that the same text added twice trains the same expert."""
        if spec.data_sha256 is None:
            return spec.partition
        return int(spec.data_sha256[:12], 16) * 1024 + spec.partition

    def expert_fingerprint(self, spec: ExpertSpec) -> str:
        """What one expert is: its trunk (the shared phase's fingerprint, which covers the prepared data), its text,
        its recipe and its steps. An imported expert keeps the fingerprint it was trained under."""
        if spec.kind == "imported":
            return spec.fingerprint
        dump = self.cfg.model_dump(mode="json")
        blob = json.dumps({
            "recipe": {key: _lookup(dump, key) for key in _EXPERT_RECIPE},
            "steps": self.expert_steps(spec),
            "trunk": self.fingerprint("train-shared"),
            "text": {"partition": spec.partition, "added": spec.data_sha256,
                     **({"replay": spec.replay} if spec.replay is not None else {})},
            **({"fit": {"into": spec.fit_into, **{key: _lookup(dump, key) for key in _FIT_RECIPE}}}
               if spec.fit_into is not None else {}),
        }, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def trunk_identity(self) -> dict[str, str]:
        """The sha256 of the trunk's files and of the tokenizer: an expert trained from another trunk has others."""
        facts = self.manifest()["stages"].get("train-shared", {})
        return {"shared": facts.get("shared_sha256"), "anchor": facts.get("anchor_sha256"),
                "tokenizer": _checksum(self.tokenizer_dir / "tokenizer.json")}

    def partitions(self) -> list[PartitionRef]:
        """The text the run is evaluated and calibrated on: every partition `prepare` made, then the text of each
        added expert; with the position of the expert trained on it, if that expert is in the set."""
        position = {(s.data, s.partition): j for j, s in enumerate(self.experts())}
        refs = [PartitionRef(f"p{k}", PREPARED, k, position.get((PREPARED, k))) for k in range(self.cfg.model.num_experts)]
        return refs + [PartitionRef(s.name, s.data, s.partition, position[(s.data, s.partition)])
                       for s in self.experts() if s.kind == "added"]

    def vocab_size(self) -> int:
        """The vocabulary size that prepare recorded with the token shards."""
        return read_json(self.data_dir / "shards.json", Shards)["vocab_size"]

    def manifest(self) -> dict[str, Any]:
        return read_json(self.manifest_path, Manifest) if self.manifest_path.exists() else {"stages": {}}

    def fingerprint(self, stage: str) -> str:
        dump = self.cfg.model_dump(mode="json")
        picked = {key: _lookup(dump, key) for key in _STAGE_KEYS[stage]}
        if "budget.shared_fraction" in picked:  # `auto` as resolved: the curve behind it may be remeasured
            picked["budget.shared_fraction"] = self.cfg.shared_fraction
        elif "budget" in picked:
            picked["budget"] = {**picked["budget"], "shared_fraction": self.cfg.shared_fraction}
            if self.cfg.model.base is None:  # a key of runs from a base (resolved into shared_fraction there)
                picked["budget"].pop("base_trunk_tokens")
        if "model" in picked:  # top_k matters only from assembly on (listed there)
            picked["model"] = {k: v for k, v in picked["model"].items()
                               if k != "top_k" and not (k in _BASE_KEY_DEFAULTS and v == _BASE_KEY_DEFAULTS[k])}
        if stage == "train-experts":
            picked["expert set"] = [[s.name, self.expert_fingerprint(s)] for s in self.experts()]
        if stage == "prepare" and self.base is not None:  # the base's tokenizer, and its bytes for every later stage
            picked["base"] = {"source": self.cfg.model.base, "sha256": self.base.identity()}
        index = STAGES.index(stage)
        upstream = self.fingerprint(STAGES[index - 1]) if index else ""
        blob = json.dumps({"keys": picked, "upstream": upstream}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def outputs(self, stage: str) -> list[Path]:
        """The files and folders `stage` writes (a later stage may rewrite some: calibrate rewrites model/)."""
        experts = [self.expert_dir(s.name) / name for s in self.experts() for name in (*EXPERT_FILES.values(), "done.json")]
        return {
            "prepare": [self.tokenizer_dir, self.data_dir],
            "train-shared": [self.shared_dir / "shared.safetensors", self.shared_dir / "anchor.safetensors"],
            "train-experts": experts,
            "assemble": [self.model_dir],
            "calibrate": [self.model_dir],
            "evaluate": [self.reports_dir],
        }[stage]

    def output_checksums(self, stage: str) -> dict[str, str]:
        """{path relative to the run directory: sha256} of every file `stage` wrote, as on disk now."""
        files = []
        for target in self.outputs(stage):
            files += [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
        relative = {path.relative_to(self.dir).as_posix(): path for path in files}
        return {rel: _checksum(path) for rel, path in relative.items()
                if not any(LEFTOVER.match(part) for part in rel.split("/"))}

    def changed_files(self, stage: str) -> list[str] | None:
        """Files `stage` recorded that are missing or differ from the record; None if it has not finished under
        this config (or ran before files were recorded)."""
        stages = self.manifest()["stages"]
        entry = stages.get(stage, {})
        if entry.get("status") != "done" or entry.get("fingerprint") != self.fingerprint(stage) or "files" not in entry:
            return None
        expected: dict[str, str] = {}
        for name in STAGES:  # a file rewritten by a later finished stage must match that stage's record
            if stages.get(name, {}).get("status") == "done":
                expected |= stages[name].get("files", {})
        return [rel for rel in entry["files"] if _checksum(self.dir / rel) != expected[rel]]

    def is_done(self, stage: str) -> bool:
        return self.changed_files(stage) == []

    def require(self, stage: str) -> None:
        """`stage` must have finished under this config. Its files are not hashed here: the stage that reads them
        validates them itself and says which file is wrong (assembly checks every input's checksum)."""
        self.check_base()
        entry = self.manifest()["stages"].get(stage)
        if not entry or entry.get("status") != "done":
            why = "has not finished"
        elif entry.get("fingerprint") != self.fingerprint(stage):
            why = "ran with a different config"
        else:
            return
        raise StageOrderError(
            f"stage '{stage}' {why} in {self.dir}; run `modularforge {stage}` (or `modularforge run`) first"
        )

    def claim(self) -> None:
        """Make `dir` a run directory before anything is written into it: create it with its marker, or adopt an
        empty folder or one an older version made (it has a manifest); refuse any other existing folder."""
        try:
            if self.marker_path.is_file():
                return
            if self.dir.exists():
                if not self.dir.is_dir():
                    raise RunDirectoryError(f"{self.dir} is a file, not a run directory")
                if any(self.dir.iterdir()) and not _older_run(self.dir):
                    raise RunDirectoryError(
                        f"{self.dir} is not empty and is not a ModularForge run directory (no {MARKER} in it); "
                        "nothing was written: give --run-dir (or run.root / run.name) a new or empty folder"
                    )
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise os_error(e, self.dir, "cannot create run directory") from None
        write_json(self.marker_path, {"modularforge": "run directory", "created_at": time.time()})

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory's lock (an OS file lock, so it ends with the process). Re-entrant in a process;
        a child started with `child_lock()` shares its parent's. Fresh holders first delete the temporary files
        that killed writers left behind. Another holder is a RunDirectoryError naming its pid."""
        key = str(self.dir.resolve())
        if key in _held:
            _held[key][1] += 1
            try:
                yield
            finally:
                _held[key][1] -= 1
            return
        self.claim()
        fd = self._inherited_lock()
        inherited = fd is not None
        if fd is None:
            fd = self._acquire_lock()
            for path in remove_leftovers(self.dir):
                log.info("removed %s, left behind by an interrupted run", path)
        _held[key] = [fd, 1, inherited]
        try:
            yield
        finally:
            del _held[key]
            if not inherited:  # an inherited descriptor is the parent's lock: unlocking it would free the parent's
                os.close(fd)

    def child_lock(self) -> tuple[dict[str, str], tuple[int, ...]]:
        """(environment, pass_fds) for a child process that should write under the lock this process holds."""
        fd = _held[str(self.dir.resolve())][0]
        return {**os.environ, LOCK_FD_ENV: str(fd)}, (fd,)

    def _inherited_lock(self) -> int | None:
        try:
            fd = int(os.environ.get(LOCK_FD_ENV, ""))
            held, ours = os.fstat(fd), os.stat(self.lock_path)
            if (held.st_dev, held.st_ino) != (ours.st_dev, ours.st_ino):
                return None
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # succeeds only on the descriptor that holds the lock
        except (ValueError, OSError):
            return None
        return fd

    def _acquire_lock(self) -> int:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise os_error(e, self.lock_path, "cannot create the lock file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").split()
            os.close(fd)
            pid = holder[0] if holder else "unknown"
            raise RunDirectoryError(
                f"run directory {self.dir} is in use by process {pid} (another modularforge command writing into "
                f"it); wait for it to finish, or stop it (kill {pid}) and rerun"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {' '.join(sys.argv)}\n".encode(), 0)
        return fd

    def save_config(self) -> None:
        text, path = self.cfg.to_yaml(), self.dir / "config.yaml"
        if not (path.is_file() and path.read_text(errors="replace") == text):  # a command that fails writes nothing
            write_text(path, text)

    def record_change(self, entry: dict[str, Any]) -> None:
        """Append what a grow command (add-expert, import-expert, remove-expert) did and what each of its steps
        cost to the manifest's `changes`. Under the lock."""
        manifest = self.manifest()
        manifest.setdefault("changes", []).append(entry)
        write_json(self.manifest_path, manifest)

    def adopt_stage(self, source: Run, stage: str, folders: Sequence[str] = (),
                    facts: dict[str, Any] | None = None) -> None:
        """Take `source`'s finished `stage` as this run's, so that runs sharing a part train it once (the benchmarks'
        runs that differ only in later stages). Links each of `folders` (e.g. "shared") to source's (a link to
        elsewhere is replaced, a folder kept), then records the stage done under this run's fingerprint with the
        checksums of its outputs here and source's facts (updated by `facts`). The caller vouches that those outputs
        are what `stage` would make under this run's config (the shared phase does not read the partition settings,
        say); outputs it does not link must already be in place here.

        If the stage is recorded done here, under this fingerprint, with these same outputs, the manifest is left as
        it is; otherwise the records of later stages are dropped, as they were built on other outputs (source redid
        the stage, or another source was adopted). A StageOrderError unless `stage` is done in source and the stage
        before it here; a RunDirectoryError if an output is missing. Under the lock."""
        if not source.is_done(stage):
            raise StageOrderError(f"stage '{stage}' has not finished in {source.dir}, so there is nothing to adopt")
        index = STAGES.index(stage)
        with self.lock():
            if index:
                self.require(STAGES[index - 1])
            for folder in folders:
                link, target = self.dir / folder, (source.dir / folder).resolve()
                if link.is_symlink() and link.resolve() != target:
                    link.unlink()
                if not (link.exists() or link.is_symlink()):
                    os.symlink(target, link)
            missing = [str(path) for path in self.outputs(stage) if not path.exists()]
            if missing:
                raise RunDirectoryError(f"cannot adopt '{stage}' from {source.dir}: {', '.join(missing[:3])} missing")
            entry = {**source.manifest()["stages"][stage], **(facts or {}), "fingerprint": self.fingerprint(stage),
                     "adopted_from": str(source.dir.resolve()), "files": self.output_checksums(stage)}
            self.save_config()
            manifest = self.manifest()
            recorded = manifest["stages"].get(stage, {})
            if recorded.get("status") == "done" and all(recorded.get(k) == entry[k] for k in ("fingerprint", "files")):
                return
            for later in STAGES[index + 1 :]:
                manifest["stages"].pop(later, None)
            manifest["stages"][stage] = entry
            write_json(self.manifest_path, manifest)

    def _update(self, stage: str, entry: dict[str, Any]) -> None:
        manifest = self.manifest()
        manifest["stages"][stage] = entry
        write_json(self.manifest_path, manifest)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Under the lock: mark `name` running and drop the records of every later stage (their inputs are about
        to change); on success record it done with the checksums of its files, wall time and peak RSS.

        The yielded dict collects extra facts (sizes, checksums) stored with the stage. An OSError in the stage
        that names no file (a write on a full disk) becomes a FileSystemError naming the run directory.
        """
        from modularforge.device import resolve_device  # torch: imported only when a stage runs

        resolve_device(self.cfg)  # a device this machine cannot use fails before anything is written
        with self.lock():
            self.check_base()
            index = STAGES.index(name)
            if index:
                self.require(STAGES[index - 1])
            self.save_config()
            fingerprint = self.fingerprint(name)
            manifest = self.manifest()
            for later in STAGES[index + 1 :]:
                manifest["stages"].pop(later, None)
            manifest["stages"][name] = {"status": "running", "fingerprint": fingerprint, "started_at": time.time()}
            write_json(self.manifest_path, manifest)
            extra: dict[str, Any] = {}
            start = time.perf_counter()
            try:
                yield extra
            except OSError as e:
                if e.filename is not None:
                    raise os_error(e, doing=f"{name}: cannot access") from None
                raise os_error(e, self.dir, f"{name}: cannot write in") from None
            wall = time.perf_counter() - start
            self._update(
                name,
                {
                    "status": "done",
                    "fingerprint": fingerprint,
                    "finished_at": time.time(),
                    "wall_seconds": round(wall, 2),
                    "peak_rss_mb": round(peak_rss_mb(), 1),
                    **peak_device_memory(),
                    **extra,
                    "files": self.output_checksums(name),
                },
            )
            log.info("%s done in %.1fs (peak RSS %.0f MB)", name, wall, peak_rss_mb())


@dataclass(frozen=True, slots=True)
class PartitionRef:
    """One partition of the run's text: its label in reports, its data folder (relative to the run directory) and
    index there, and the position in the expert set of the expert trained on it (None if it was removed)."""

    label: str
    data: str
    index: int
    expert: int | None


def _checksum(path: Path) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _checksums:
        _checksums[key] = sha256_file(path)
    return _checksums[key]


def _older_run(path: Path) -> bool:
    """A run directory made before the marker existed: it holds a manifest of stages."""
    try:
        return isinstance(json.loads((path / "manifest.json").read_text()).get("stages"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node
