"""Grow a model after assembly (DESIGN.md section 7b): add experts trained on new text, import experts trained
elsewhere from the same trunk, remove experts. Nothing else is retrained or rewritten: each function below only
changes the run's expert set (`experts/registry.json`) and, for new text, writes `added/<name>/`; the command
then runs the stages from train-experts on, which train only the new experts (every other one is finished under
its own fingerprint), re-solve the routers from all stored statistics, recalibrate and rewrite the report.

Everything is checked before anything is written, so bad input (another trunk, a name in use, the last expert,
text that tokenizes to nothing) leaves the run as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from modularforge.config import DataConfig
from modularforge.data.batches import PreparedData
from modularforge.data.partition import load_partition, partition_documents
from modularforge.data.shards import TRAIN, TokenStore, write_shards
from modularforge.data.sources import iter_documents
from modularforge.data.tokenizer import eos_id, load_tokenizer
from modularforge.errors import DataError
from modularforge.expert_set import ExpertSpec, check_name, partition_expert_name
from modularforge.files import atomic_dir, read_json, sha256_file, write_json
from modularforge.model.weights import dense_shapes, is_ffn
from modularforge.routers import stats_shapes
from modularforge.runs import EXPERT_FILES, Run
from modularforge.safetensors_stream import read_header
from modularforge.schemas import ExpertDone, ModelInfo, Shards

log = logging.getLogger(__name__)


def add_experts(run: Run, sources: list[str], dataset: str | None = None, name: str | None = None,
                tokens: int | None = None, clusters: int = 1, replay: float | None = None) -> list[ExpertSpec]:
    """Register `clusters` new experts on the text of `sources` (files, folders, globs, as `prepare` reads them)
    or of a Hugging Face `dataset`, read with the run's tokenizer into `added/<name>/` and split into `clusters`
    partitions as `prepare` splits its corpus. Returns the new experts, which train-experts then trains.
    `replay` draws that share of each training batch from the trunk's own training text, so that the expert
    stays usable on the old text the exported model's token routing will also send it.

    An add that stopped before its experts finished is resumed when given the same name and text."""
    cfg = run.cfg
    run.require("train-shared")
    if not sources and not dataset:
        raise DataError("add-expert needs text: give --data PATH (files, folders or globs) or --dataset NAME")
    if not 1 <= clusters <= 1024:
        raise DataError(f"--clusters must be 1 to 1024, got {clusters}")
    if tokens is not None and tokens < 1:
        raise DataError(f"--tokens must be a positive number of tokens, got {tokens}")
    if replay is not None and not 0 < replay < 1:
        raise DataError(f"--replay must be a share of each batch between 0 and 1 (exclusive), got {replay}")
    registry = run.registry()
    taken = registry.names_in_use(cfg.model.num_experts)
    base = check_name(name) if name is not None else _next_free_name(taken, cfg.model.num_experts)
    names = [base] if clusters == 1 else [f"{base}_{j}" for j in range(clusters)]
    for n in names:
        check_name(n)
    data_cfg = cfg.data.model_copy(update={"sources": list(sources), "dataset": dataset, "max_documents": None})
    folder = run.added_dir / base
    registered = [s for s in registry.added if s.name in names]
    if not registered:
        clash = sorted(taken & set(names)) or sorted(n for n in names if run.expert_dir(n).exists())
        if clash:
            raise DataError(f"expert name {clash[0]!r} is in use in {run.dir} (by an expert of the set, a removed "
                            "one, or a folder in experts/); choose another with --name")
    else:
        _check_resumable(run, registered, names)
    fit_into = None if registered else fit_context(run)  # reads the set's files before anything is written
    with atomic_dir(folder) as tmp:  # replaces the folder only once the text is read and checked
        text_sha = _tokenize(run, data_cfg, tmp, clusters)
        if registered and any(s.data_sha256 != text_sha or s.replay != replay for s in registered):
            raise DataError(f"expert {names[0]!r} was added from other text or with another --replay; choose another "
                            f"--name, or `modularforge remove-expert --run-dir {run.dir} {names[0]}` first")
    if registered:
        log.info("%s: registered by an add that did not finish, on the same text; training now", ", ".join(names))
        return registered
    specs = [ExpertSpec(n, "added", data=folder.relative_to(run.dir).as_posix(), partition=j, data_sha256=text_sha,
                        tokens=tokens, replay=replay, fit_into=fit_into) for j, n in enumerate(names)]
    registry.added += specs
    registry.save(run.experts_dir)
    log.info("registered %s on %s (%d tokens of training text%s)", ", ".join(names), folder,
             PreparedData(folder).windows(TRAIN).total, f" in {clusters} clusters" if clusters > 1 else "")
    return specs


def fit_context(run: Run) -> dict | None:
    """What an expert registered now is fitted into: the set's experts with their fingerprints, and the routers'
    calibrated temperatures. None when fitting is off or an expert of the set is not trained yet."""
    if run.cfg.experts.fit_fraction == 0:
        return None
    experts = {}
    for spec in run.experts():
        done = run.expert_dir(spec.name) / "done.json"
        if not done.is_file():
            log.info("%s is not trained yet, so a new expert is not fitted into the set", spec.name)
            return None
        experts[spec.name] = read_json(done, ExpertDone)["fingerprint"]
    info = run.model_dir / "modularforge.json"
    calibration = read_json(info, ModelInfo).get("calibration") or {} if info.is_file() else {}
    return {"experts": experts, "temperature": calibration.get("temperature")}


def _next_free_name(taken: set[str], start: int) -> str:
    k = start
    while partition_expert_name(k) in taken:
        k += 1
    return partition_expert_name(k)


def _tokenize(run: Run, data_cfg: DataConfig, out: Path, clusters: int) -> str:
    """Token shards and partitions of the new text in `out`, as `prepare` writes `data/`; the text's identity."""
    cfg = run.cfg
    tokenizer = load_tokenizer(run.tokenizer_dir)
    try:
        write_shards(iter_documents(data_cfg), tokenizer, eos_id(tokenizer, run.tokenizer_dir), data_cfg, out,
                     vocab_size=run.vocab_size())
    except DataError as e:
        raise DataError(f"the new text gives no training data: {e}") from None
    store = TokenStore.open(out)
    method = cfg.partition.method if clusters > 1 else "random"  # one cluster: every document in it
    try:
        partition_documents(store, tokenizer, cfg.partition.model_copy(update={"method": method}), clusters,
                            cfg.run.seed)
    except DataError as e:
        raise DataError(f"the new text is too small for {clusters} expert(s): {e}") from None
    data = PreparedData(out)
    window = cfg.seq_len(cfg.expert_train) + 1
    for j in range(clusters):
        total = data.windows(TRAIN, j).total
        if total < window:
            raise DataError(f"the new text holds {total} training tokens{f' in cluster {j}' if clusters > 1 else ''}, "
                            f"fewer than one training window of {window}; give more text")
    return text_identity(out)


def text_identity(folder: Path) -> str:
    """sha256 of a data folder's token shards and its documents' partitions and splits."""
    digest = hashlib.sha256()
    digest.update(json.dumps([s["sha256"] for s in read_json(folder / "shards.json", Shards)["shards"]]).encode())
    for array in load_partition(folder):
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _check_resumable(run: Run, registered: list[ExpertSpec], names: list[str]) -> None:
    """The names were registered by an add that stopped before its experts finished (then the same text resumes
    it); anything else is a name in use."""
    in_set = {s.name for s in run.experts()}
    unfinished = [s.name for s in registered if not (run.expert_dir(s.name) / "done.json").exists()]
    if [s.name for s in registered] != names or not all(n in in_set for n in names) or not unfinished:
        raise DataError(f"expert name {names[0]!r} is in use in {run.dir}; choose another with --name")


def import_expert(run: Run, folder: Path, name: str | None = None) -> ExpertSpec:
    """Copy an expert folder trained elsewhere from this run's trunk (an `experts/<name>/` of another copy of the
    run) into this run's set. Refused, with nothing written, when its shapes, tokenizer or trunk differ."""
    cfg = run.cfg
    run.require("train-shared")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; give an expert folder (experts/<name>/ of a run)")
    if not (folder / "done.json").is_file():
        raise DataError(f"{folder} has no done.json; give the folder of a finished expert (experts/<name>/ of a run)")
    done = read_json(folder / "done.json", ExpertDone)
    name = check_name(name if name is not None else str(done.get("name") or folder.name))
    if name in run.registry().names_in_use(cfg.model.num_experts) or run.expert_dir(name).exists():
        raise DataError(f"expert name {name!r} is in use in {run.dir}; import it under another with --name")
    files = {role: folder / file for role, file in EXPERT_FILES.items()}
    for role, path in files.items():
        if not path.is_file():
            raise DataError(f"{folder} lacks {path.name}; give the folder of a finished expert")
        if sha256_file(path) != done.get("sha256", {}).get(role):
            raise DataError(f"{path} does not match the checksum its done.json records; it is damaged")
    _check_shapes(run, files)
    trunk, ours = done.get("trunk"), run.trunk_identity()
    if not isinstance(trunk, dict) or "fingerprint" not in done:
        raise DataError(f"{folder}/done.json does not record the trunk it was trained from (an expert written by an "
                        "older version); train it again from this run's trunk")
    if trunk.get("tokenizer") != ours["tokenizer"]:
        raise DataError(f"{folder} was trained with another tokenizer (tokenizer.json sha256 "
                        f"{str(trunk.get('tokenizer'))[:12]}, this run's {str(ours['tokenizer'])[:12]}); "
                        "an expert can join only the run whose trunk and tokenizer it was trained with")
    if (trunk.get("shared"), trunk.get("anchor")) != (ours["shared"], ours["anchor"]):
        raise DataError(f"{folder} was trained from another trunk (shared.safetensors sha256 "
                        f"{str(trunk.get('shared'))[:12]}, this run's {str(ours['shared'])[:12]}); an expert can "
                        "join only the run whose trunk it was trained beside")
    with atomic_dir(run.expert_dir(name)) as tmp:
        for path in [*files.values(), folder / "metrics.jsonl"]:
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
        write_json(tmp / "done.json", {**done, "name": name, "imported_from": str(folder.resolve())})
    spec = ExpertSpec(name, "imported", fingerprint=done["fingerprint"], origin=str(folder.resolve()))
    registry = run.registry()
    registry.added.append(spec)
    registry.save(run.experts_dir)
    log.info("imported %s from %s", name, folder)
    return spec


def _check_shapes(run: Run, files: dict[str, Path]) -> None:
    cfg = run.cfg
    expected = {
        "expert": {n: s for n, s in dense_shapes(cfg.model, run.vocab_size()).items() if is_ffn(n)},
        "stats": stats_shapes(cfg.model.num_layers, cfg.model.hidden_size),
    }
    for role, path in files.items():
        table, _ = read_header(path)
        got = {n: info.shape for n, info in table.items()}
        if got != expected[role]:
            wrong = sorted(set(got) ^ set(expected[role])) or [n for n in got if got[n] != expected[role][n]]
            detail = (f"{wrong[0]} has shape {list(got[wrong[0]])}, this run's model needs "
                      f"{list(expected[role][wrong[0]])}" if wrong[0] in got and wrong[0] in expected[role]
                      else f"its tensors are not this run's ({wrong[0]})")
            raise DataError(f"{path} does not fit this run's model (hidden {cfg.model.hidden_size}, FFN "
                            f"{cfg.model.intermediate_size}, {cfg.model.num_layers} layers): {detail}")


def remove_expert(run: Run, name: str) -> None:
    """Take one expert out of the set. Its files stay in experts/<name>/ (and its name stays taken), so nothing
    trained is lost; the model is re-assembled without it."""
    cfg = run.cfg
    experts = run.experts()
    if name not in {s.name for s in experts}:
        raise DataError(f"{run.dir} has no expert named {name!r}; its experts: {', '.join(s.name for s in experts)}")
    if len(experts) == 1:
        raise DataError(f"{name} is the last expert of {run.dir}; a model needs at least one, so it stays")
    if len(experts) - 1 < cfg.model.top_k:
        raise DataError(f"removing {name} would leave {len(experts) - 1} experts, fewer than model.top_k="
                        f"{cfg.model.top_k}; add --set model.top_k={len(experts) - 1}")
    registry = run.registry()
    registry.removed.append(name)
    registry.save(run.experts_dir)
    log.info("removed %s from the set; its files stay in %s", name, run.expert_dir(name))
