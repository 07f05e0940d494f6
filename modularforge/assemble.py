"""Stage 4, assemble: stream the shared part and every expert of the run's set into one Mixtral folder (a Qwen3-MoE
folder for a run that starts from a Qwen3 base) (DESIGN.md section 4).

1. Validate everything before writing anything: files present, headers readable, names, shapes and
   dtypes as the config says, checksums as recorded when they were written, each expert trained under
   its own fingerprint. A problem is an AssemblyError that names the file; no output is left behind.
2. Compute the routers in closed form from the experts' statistics, one expert's statistics at a time.
3. Write into a temporary folder, tensor by tensor with bounded buffers: shared shards, one shard per
   expert (its bytes copied as they are, its FFN named by its position in the set), and a last small
   shard with the routers and the post-attention norms (the only tensors the `calibrate` stage changes).
   Then write config (with the experts' names), index and tokenizer, and rename into place.

Peak memory is the routers and statistics of one layer and a copy buffer, never an expert, whatever the
number of experts. The model is not loaded; calibration, which runs it, is the next stage.

`assemble_in_memory` builds the same model in memory and writes nothing (the quality benchmark sets its routers
row by row).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modularforge.data.tokenizer import LLAMA_CPP_TOKENIZER, TOKENIZER_FILES
from modularforge.device import resolve_device
from modularforge.errors import AssemblyError, DataError
from modularforge.files import atomic_dir, load_tensors, read_json, sha256_file, write_json
from modularforge.model.hf import hf_config, hf_name
from modularforge.model.transformer import CausalLM
from modularforge.model.weights import build_model, dense_shapes, ffn_to_expert
from modularforge.routers import compute_routers, stats_shapes
from modularforge.runs import Run
from modularforge.safetensors_stream import TensorInfo, checked_header, from_file, from_tensor, write_streaming
from modularforge.schemas import ExpertDone, JsonObject, Shards, TokenizerConfig

log = logging.getLogger(__name__)

OnRead = Callable[[Path, str], None]


@dataclass
class Inputs:
    """Validated inputs: every file with its tensor table, the experts in the set's order."""

    shared: Path
    shared_table: dict[str, TensorInfo]
    names: list[str] = field(default_factory=list)
    experts: list[Path] = field(default_factory=list)
    expert_tables: list[dict[str, TensorInfo]] = field(default_factory=list)
    stats: list[Path] = field(default_factory=list)


def assemble(run: Run, on_read: OnRead | None = None) -> None:
    """`on_read(file, tensor)` is called before each input tensor is copied (for instrumentation)."""
    with run.lock():  # held from the checks to the last write, so what was checked is what is copied
        run.require("train-experts")
        _assemble(run, validate_inputs(run), on_read)  # bad input leaves the run as it was, manifest included


def _assemble(run: Run, inputs: Inputs, on_read: OnRead | None) -> None:
    cfg = run.cfg
    with run.stage("assemble") as facts:
        log.info("assembly copies files on the CPU (run.device applies to the stages that compute)")
        routers = compute_routers(cfg, inputs.stats)
        model = cfg.model.model_copy(update={"num_experts": len(inputs.names)})
        with atomic_dir(run.model_dir) as tmp:
            files = write_weights(tmp, run, inputs, routers, on_read)
            write_json(tmp / "config.json", hf_config(model, run.vocab_size(), _eos(run), _bos(run), inputs.names))
            write_json(tmp / "generation_config.json", _generation_config(run))
            for name in TOKENIZER_FILES:
                shutil.copy2(run.tokenizer_dir / name, tmp / name)
            if (run.tokenizer_dir / LLAMA_CPP_TOKENIZER).is_file():  # a base's tokenizer, for GGUF export
                shutil.copy2(run.tokenizer_dir / LLAMA_CPP_TOKENIZER, tmp / LLAMA_CPP_TOKENIZER)
            write_json(tmp / "modularforge.json", {
                "router": cfg.assemble.router, "centred": cfg.assemble.centred,
                "experts": inputs.names, "calibration": None,
                "fingerprint": run.fingerprint("assemble"),
            })
        facts.update(shards=len(files), experts=inputs.names)
        log.info("assembled %d experts (%s) into %s (%d shards)", len(inputs.names), ", ".join(inputs.names),
                 run.model_dir, len(files))


def assemble_in_memory(run: Run) -> CausalLM:
    """The model `assemble` writes, before calibration, built on the run's device and written nowhere: the same
    checks of every input (`validate_inputs`), routers from the statistics as `assemble.router` says, the experts in
    the set's order. Unlike `assemble`, it holds every expert in memory."""
    cfg = run.cfg
    run.require("train-experts")
    inputs = validate_inputs(run)
    tensors = load_tensors(inputs.shared) | compute_routers(cfg, inputs.stats)
    for position, path in enumerate(inputs.experts):  # an expert file holds its dense FFN names
        tensors |= {ffn_to_expert(name, position): t for name, t in load_tensors(path).items()}
    model = cfg.model.model_copy(update={"num_experts": len(inputs.names)})
    return build_model(model, run.vocab_size(), moe=True, tensors=tensors, device=resolve_device(cfg))


def _eos(run: Run) -> int:
    return read_json(run.data_dir / "shards.json", Shards)["eos_id"]


def _bos(run: Run) -> int:
    """The base's beginning-of-text token, recorded by prepare; our own tokenizer's is its EOS."""
    shards = read_json(run.data_dir / "shards.json", Shards)
    return shards.get("bos_id", shards["eos_id"])


def _generation_config(run: Run) -> dict:
    g, eos = run.cfg.generate, _eos(run)
    return {
        "bos_token_id": _bos(run), "eos_token_id": eos, "pad_token_id": eos, "do_sample": g.temperature > 0,
        "temperature": g.temperature or 1.0, "top_k": g.top_k or 0, "top_p": g.top_p or 1.0,
    }


def validate_inputs(run: Run) -> Inputs:
    cfg = run.cfg
    shapes = dense_shapes(cfg.model, run.vocab_size())
    shared_facts = run.manifest()["stages"].get("train-shared", {})
    # the files are copied, not parsed: loading the tokenizer here cost 22 MiB, a third of assembly's peak
    missing = [name for name in TOKENIZER_FILES if not (run.tokenizer_dir / name).is_file()]
    if missing:
        raise AssemblyError(f"tokenizer files missing from {run.tokenizer_dir}: {', '.join(missing)}; "
                            "run `modularforge prepare`")
    _check_tokenizer_files(run)
    shared = run.shared_dir / "shared.safetensors"
    shared_table = _checked_table(
        shared, {k: v for k, v in shapes.items() if ".mlp." not in k}, shared_facts.get("shared_sha256")
    )
    inputs = Inputs(shared, shared_table)
    experts = run.experts()
    if cfg.model.top_k > len(experts):
        raise AssemblyError(f"model.top_k={cfg.model.top_k} exceeds the {len(experts)} experts of the run; lower "
                            "model.top_k (--set model.top_k=N) or add experts")
    ffn_shapes = {name: shape for name, shape in shapes.items() if ".mlp." in name}
    stats_table = stats_shapes(cfg.model.num_layers, cfg.model.hidden_size)
    for spec in experts:
        files = run.expert_files(spec.name)
        done_path = run.expert_dir(spec.name) / "done.json"
        if not done_path.exists():
            raise AssemblyError(f"expert {spec.name} is missing: {done_path} not found; run `modularforge "
                                "train-experts`")
        done = read_json(done_path, ExpertDone)
        if done["fingerprint"] != run.expert_fingerprint(spec):
            raise AssemblyError(f"{done_path}: expert {spec.name} was trained under a different config or trunk; "
                                "run `modularforge train-experts` to retrain it")
        table = _checked_table(files["expert"], ffn_shapes, done["sha256"]["expert"])
        _checked_table(files["stats"], stats_table, done["sha256"]["stats"])
        inputs.names.append(spec.name)
        inputs.experts.append(files["expert"])
        inputs.expert_tables.append(table)
        inputs.stats.append(files["stats"])
    return inputs


def _check_tokenizer_files(run: Run) -> None:
    """The tokenizer files are copied into the model as they are: the small ones must have their shape, and
    tokenizer.json, which the experts were trained with, must be the file prepare wrote (its checksum, not its
    parse: parsing it cost a third of assembly's peak memory)."""
    read_json(run.tokenizer_dir / "tokenizer_config.json", TokenizerConfig)
    read_json(run.tokenizer_dir / "special_tokens_map.json", JsonObject)
    path = run.tokenizer_dir / "tokenizer.json"
    recorded = run.manifest()["stages"].get("prepare", {}).get("files", {}).get("tokenizer/tokenizer.json")
    if recorded is not None and sha256_file(path) != recorded:
        raise AssemblyError(f"{path} was changed since `modularforge prepare` wrote it, so it is not the tokenizer the "
                            "experts were trained with; restore it, or run `modularforge run` to redo the run from it")


def _checked_table(path: Path, expected: dict[str, tuple[int, ...]], sha256: str | None) -> dict[str, TensorInfo]:
    try:
        table = checked_header(path, expected)
    except DataError as e:
        raise AssemblyError(str(e)) from None
    if sha256 is not None and sha256_file(path) != sha256:
        raise AssemblyError(f"{path} does not match the checksum recorded when it was written; it is corrupted")
    return table


def write_weights(
    out: Path, run: Run, inputs: Inputs, routers: dict[str, torch.Tensor], on_read: OnRead | None
) -> list[str]:
    """Write the shards and the index into `out`; returns the shard file names."""
    cfg = run.cfg
    limit = cfg.assemble.shard_max_mb << 20
    norms = [n for n in inputs.shared_table if n.endswith("post_attention_layernorm.weight")]
    groups: list[list[TensorInfo]] = [[]]
    for info in inputs.shared_table.values():
        if info.name in norms:
            continue
        if groups[-1] and sum(t.nbytes for t in groups[-1]) + info.nbytes > limit:
            groups.append([])
        groups[-1].append(info)
    total_files = len(groups) + len(inputs.experts) + 1
    names = [f"model-{i + 1:05d}-of-{total_files:05d}.safetensors" for i in range(total_files)]
    weight_map: dict[str, str] = {}
    total_bytes = 0
    meta = {"modularforge": run.fingerprint("assemble")}
    for name, group in zip(names, groups):
        total_bytes += write_streaming(out / name, [from_file(inputs.shared, t, on_read) for t in group], meta)
        weight_map |= {t.name: name for t in group}
    architecture = cfg.model.architecture
    for k, (path, table) in enumerate(zip(inputs.experts, inputs.expert_tables)):
        name = names[len(groups) + k]
        renamed = {t.name: hf_name(ffn_to_expert(t.name, k), architecture) for t in table.values()}
        total_bytes += write_streaming(out / name, [from_file(path, t, on_read, renamed[t.name]) for t in table.values()],
                                       meta)
        weight_map |= {new: name for new in renamed.values()}
    last = names[-1]
    norm_tensors = load_tensors(inputs.shared, norms) if norms else {}
    sources = [from_tensor(hf_name(n, architecture), t) for n, t in (routers | norm_tensors).items()]
    total_bytes += write_streaming(out / last, sources, meta)
    weight_map |= {hf_name(n, architecture): last for n in routers | norm_tensors}
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
    return names

