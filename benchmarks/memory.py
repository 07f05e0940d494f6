"""Memory benchmark: every stage's peak RSS, measured in a child process, against its floor.

Each stage runs as `python -m modularforge <stage> --run-dir DIR` in a child process; its peak resident
set size comes from `os.wait4`. The baseline is an idle interpreter with torch imported. Per stage the
table shows the peak above the baseline beside the floor computed from the config:

- training: frozen weights + trainable weights, gradients and AdamW state + the activations autograd keeps
  for one micro-batch (counted with saved-tensor hooks on one real forward pass of that micro-batch) +
  the gradient of the loss with respect to the logits;
- assemble: the largest tensor copied (assembly streams bytes in fixed chunks);
- calibrate / evaluate / generate: the resident weights (all of them, or the expert cache) + the KV
  cache or the logits of one micro-batch.

Configurations: `poc-50m` (the seed's 50M model) with a few steps per phase; assembly of 4 and of 64
experts of the same size (experts beyond the trained ones are copies of a trained expert under new names,
with valid checksums); and `1b` (1.24B parameters), which trains each expert two steps, assembles, and
generates with an LRU cache of 4 expert FFNs, compared token for token with the fully loaded model.

    python benchmarks/memory.py [--only poc-50m,scaling,1b]

GPU mode, `--device cuda`: the computing stages run with `run.device=cuda` and each child also reports
the CUDA allocator's peak (`torch.cuda.max_memory_allocated`), which is the bound compared with the same floors
(prepare and assemble stay CPU work). Configurations: `poc-50m` as above, and the 8 GiB headline
`configs/gpu-8gib.yaml` (32 experts of 151M over a 63M shared part, 4.89B parameters), which trains each expert
two steps, assembles, and generates with an expert cache on the GPU while the assembled experts stay in host
memory and on disk; every stage must stay under 8 GiB of VRAM. Writes docs/results/memory_gpu.json.

    python benchmarks/memory.py --device cuda [--only poc-50m,gpu-8gib]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import git_facts, machine_facts  # noqa: E402

from modularforge.config import Config, load_config, preset_path  # noqa: E402
from modularforge.device import autocast, autocast_dtype  # noqa: E402
from modularforge.files import read_json, sha256_file, write_json  # noqa: E402
from modularforge.model.transformer import CausalLM  # noqa: E402
from modularforge.runs import Run  # noqa: E402

MB = 2**20


# The child reports its own high-water mark (VmHWM) at exit, and the CUDA allocator's peak if it used a GPU. The
# rusage of a child (`wait4`) will not do: Linux carries the RSS of the forked copy of this process (which holds
# models for the floors) into it across exec.
PEAK_REPORTER = """
import atexit, runpy, sys
peak_path = sys.argv.pop(1)
def report():
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    torch = sys.modules.get("torch")
    cuda = torch.cuda.max_memory_allocated() if torch is not None and torch.cuda.is_initialized() else -1
    with open(peak_path, "w") as f:
        f.write(f"{kb} {cuda}")
atexit.register(report)
"""


class ChildPeaks(NamedTuple):
    rss_mb: float
    seconds: float
    stdout: str
    cuda_mb: float | None  # the CUDA allocator's peak; None when the child used no GPU


def child_peak_mb(command: list[str], log_path: Path | None = None) -> tuple[float, float, str]:
    """(peak RSS in MiB, wall seconds, stdout) of a child process running `python -m MODULE ...` or `-c CODE`."""
    return child_peaks(command, log_path)[:3]


def child_peaks(command: list[str], log_path: Path | None = None) -> ChildPeaks:
    """A child process's peak RSS, wall time, stdout and CUDA allocator peak."""
    assert command[0] == sys.executable and command[1] in ("-m", "-c")
    with tempfile.NamedTemporaryFile("r", suffix=".peak") as peak_file:
        runner = "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)" if command[1] == "-m" \
            else "exec(sys.argv.pop(1))"
        wrapped = [sys.executable, "-c", PEAK_REPORTER + runner, peak_file.name, *command[2:]]
        start = time.perf_counter()
        with open(log_path or os.devnull, "w") as err:
            proc = subprocess.run(wrapped, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, check=False)
        if proc.returncode:
            raise SystemExit(f"{' '.join(command)} failed with exit code {proc.returncode} (log: {log_path})")
        kb, cuda = peak_file.read().split()
        return ChildPeaks(int(kb) / 1024, time.perf_counter() - start, proc.stdout,
                          int(cuda) / MB if int(cuda) >= 0 else None)


def baseline_mb() -> float:
    peaks = [child_peak_mb([sys.executable, "-c", "import torch"])[0] for _ in range(3)]
    return min(peaks)


# -------------------------------------------------------------------------------------------- floors


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def dense_meta(cfg: Config, vocab: int) -> CausalLM:
    with torch.device("meta"):
        return CausalLM(cfg.model, vocab, moe=False)


def saved_activation_bytes(cfg: Config, vocab: int, phase: str, device: str = "cpu") -> int:
    """Bytes autograd keeps for backward on one micro-batch, counted on a real forward pass (weights random):
    the model's body and the final hidden states the LM head reads. The loss itself is `logits_grad`."""
    model = CausalLM(cfg.model, vocab, moe=False)
    train = cfg.train if phase == "shared" else cfg.experts.train
    if phase == "experts":
        model.requires_grad_(False)
        for layer in model.model.layers:
            layer.mlp.requires_grad_(True)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    inputs = torch.randint(0, vocab, (train.micro_batch, cfg.seq_len(train)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(autocast_dtype(train.precision, device)):
        hidden = model(inputs, head=False)
    return sum(storages.values()) + hidden.untyped_storage().nbytes()  # the LM head's input is kept too


def training_floor(cfg: Config, vocab: int, phase: str, device: str = "cpu") -> dict:
    """The floor of a training stage whose autocast is the one `device` gets (the activations are counted on the
    CPU under that autocast: their sizes do not depend on where they are made)."""
    model = dense_meta(cfg, vocab)
    ffn = sum(params(layer.mlp) for layer in model.model.layers)
    total = params(model)
    train = cfg.train if phase == "shared" else cfg.experts.train
    logits_grad = train.micro_batch * -(-cfg.seq_len(train) // train.loss_chunks) * vocab * 4  # one slice's
    activations = saved_activation_bytes(cfg, vocab, phase, device)
    tensors = list(model.parameters()) if phase == "shared" else \
        [p for layer in model.model.layers for p in layer.mlp.parameters()]
    trained = sum(p.numel() for p in tensors)
    if train.optimizer == "adamw":  # two moments
        optimizer = 8 * trained
    else:  # adafactor: a row and a column per matrix
        optimizer = 4 * sum(sum(p.shape) if p.dim() > 1 else p.numel() for p in tensors)
    # stepping inside backward: one gradient at a time
    gradients = 4 * (max(p.numel() for p in tensors) if train.step_in_backward else trained)
    if phase == "shared":
        weights = 4 * total + gradients + optimizer
    else:
        frozen = total - ffn
        bf16 = 0
        if cfg.experts.frozen_bf16 and autocast_dtype(train.precision, device) == torch.bfloat16:
            bf16 = sum(params(layer.self_attn) for layer in model.model.layers) + model.lm_head.weight.numel()
            if cfg.model.tie_embeddings:  # the embeddings stay fp32 beside the head's bf16 copy
                frozen += model.lm_head.weight.numel()
        weights = 4 * (frozen - bf16) + 2 * bf16 + 4 * ffn + gradients + optimizer
    return {"weights_and_optimizer_mb": weights / MB, "activations_mb": activations / MB,
            "logits_grad_mb": logits_grad / MB, "floor_mb": (weights + activations + logits_grad) / MB}


def inference_floor(cfg: Config, vocab: int, experts_resident: int, tokens: int, kv: bool) -> dict:
    model = dense_meta(cfg, vocab)
    shared = params(model) - sum(params(layer.mlp) for layer in model.model.layers)
    one_ffn = params(model.model.layers[0].mlp)
    weights = 4 * (shared + experts_resident * one_ffn + cfg.model.num_layers * cfg.model.num_experts * cfg.model.hidden_size)
    m = cfg.model
    extra = (2 * m.num_layers * m.kv_heads * m.head_dim * tokens * 4) if kv else tokens * vocab * 6
    return {"weights_mb": weights / MB, "kv_or_logits_mb": extra / MB, "floor_mb": (weights + extra) / MB}


def largest_tensor_mb(cfg: Config, vocab: int) -> float:
    model = dense_meta(cfg, vocab)
    return max(p.numel() for p in model.parameters()) * 4 / MB


# ----------------------------------------------------------------------------------------- stage runs


def stage(run_dir: Path, name: str, *extra: str, logs: Path) -> tuple[float, float, str]:
    command = [sys.executable, "-m", "modularforge", name, "--run-dir", str(run_dir), *extra]
    return child_peak_mb(command, logs / f"{run_dir.name}-{name}.log")


def new_run(config: Path, run_dir: Path, overrides: list[str]) -> Run:
    cfg = load_config(config, overrides)
    run = Run(cfg, run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run.claim()  # the run-directory marker: a folder without it is refused by every stage
    run.save_config()
    return run


def row(table: list, config: str, stage_name: str, peak: float, wall: float, baseline: float, floor: dict | None,
        **extra) -> None:
    above = peak - baseline
    entry = {"config": config, "stage": stage_name, "peak_rss_mb": round(peak, 1), "above_baseline_mb": round(above, 1),
             "wall_seconds": round(wall, 1), **extra}
    if floor:
        entry["floor_mb"] = round(floor["floor_mb"], 1)
        entry["floor_parts_mb"] = {k: round(v, 1) for k, v in floor.items() if k != "floor_mb"}
        entry["ratio_to_floor"] = round(above / floor["floor_mb"], 3) if floor["floor_mb"] else None
    table.append(entry)
    ratio = f"{entry.get('ratio_to_floor', '')}"
    print(f"{config:<10} {stage_name:<22} peak {peak:8.0f} MiB  above base {above:8.0f}  floor "
          f"{entry.get('floor_mb', float('nan')):8.1f}  ratio {ratio:<6} {wall:6.1f}s", flush=True)


def bench_poc(work: Path, baseline: float, table: list, logs: Path) -> Run:
    run = new_run(preset_path("poc-50m"), work / "poc-50m", POC_OVERRIDES)  # 3 shared steps, 2 steps per expert
    cfg = run.cfg
    peak, wall, _ = stage(run.dir, "prepare", logs=logs)
    row(table, "poc-50m", "prepare", peak, wall, baseline, None)
    vocab = read_json(run.data_dir / "shards.json")["vocab_size"]
    for name, phase in (("train-shared", "shared"), ("train-experts", "experts")):
        peak, wall, _ = stage(run.dir, name, logs=logs)
        row(table, "poc-50m", name, peak, wall, baseline, training_floor(cfg, vocab, phase))
    peak, wall, _ = stage(run.dir, "assemble", logs=logs)
    row(table, "poc-50m", "assemble", peak, wall, baseline, {"floor_mb": largest_tensor_mb(cfg, vocab)})
    micro = cfg.experts.train.micro_batch * cfg.model.max_seq_len
    full = cfg.model.num_layers * cfg.model.num_experts
    peak, wall, _ = stage(run.dir, "calibrate", logs=logs)
    row(table, "poc-50m", "calibrate", peak, wall, baseline, inference_floor(cfg, vocab, full, micro, kv=False))
    peak, wall, _ = stage(run.dir, "generate", "--prompt", "The", "--seed", "1", logs=logs)
    row(table, "poc-50m", "generate", peak, wall, baseline,
        inference_floor(cfg, vocab, full, cfg.model.max_seq_len, kv=True))
    return run


def clone_experts(source: Run, target_dir: Path, count: int) -> Run:
    """A run with `count` experts of `source`'s size: trained ones first, then renamed copies of expert 0."""
    cfg = source.cfg.model_copy(deep=True)
    cfg.model.num_experts = count
    cfg.budget.total_tokens *= count  # keeps one step per expert valid; nothing is trained here
    cfg.model.top_k = min(cfg.model.top_k, count)
    run = Run(cfg, target_dir)
    if target_dir.exists():
        shutil.rmtree(target_dir)
    run.adopt_stage(source, "prepare", ("tokenizer", "data"))
    run.adopt_stage(source, "train-shared", ("shared",))
    for k, spec in enumerate(run.experts()):
        src = source.expert_dir(k % source.cfg.model.num_experts)
        dst = run.expert_dir(spec.name)
        dst.mkdir(parents=True)
        for name in ("expert.safetensors", "router_stats.safetensors"):  # an expert file holds its dense FFN names
            shutil.copy2(src / name, dst / name)
        write_json(dst / "done.json", {"name": spec.name, "fingerprint": run.expert_fingerprint(spec), "sha256": {
            "expert": sha256_file(dst / "expert.safetensors"), "stats": sha256_file(dst / "router_stats.safetensors")}})
    run.adopt_stage(source, "train-experts")  # the copies just made stand for trained experts
    return run


def bench_scaling(poc: Run, work: Path, baseline: float, table: list, logs: Path) -> dict:
    out = {}
    vocab = read_json(poc.data_dir / "shards.json")["vocab_size"]
    for count in (4, 64):
        run = clone_experts(poc, work / f"assemble-{count}", count)
        peak, wall, _ = stage(run.dir, "assemble", logs=logs)
        expert_mb = (run.expert_dir(0) / "expert.safetensors").stat().st_size / MB
        row(table, f"{count} experts", "assemble", peak, wall, baseline,
            {"floor_mb": largest_tensor_mb(run.cfg, vocab)}, expert_mb=round(expert_mb, 1))
        out[count] = {"above_baseline_mb": peak - baseline, "expert_mb": expert_mb}
        shutil.rmtree(run.dir)
    return out


def bench_1b(work: Path, baseline: float, table: list, logs: Path) -> dict:
    run = new_run(preset_path("1b"), work / "1b", [])
    cfg = run.cfg
    peaks = {}
    for name in ("prepare", "train-shared", "train-experts", "assemble", "calibrate"):
        peak, wall, _ = stage(run.dir, name, logs=logs)
        vocab = read_json(run.data_dir / "shards.json")["vocab_size"]
        floor = None
        if name in ("train-shared", "train-experts"):
            floor = training_floor(cfg, vocab, "shared" if name == "train-shared" else "experts")
        elif name == "assemble":
            floor = {"floor_mb": largest_tensor_mb(cfg, vocab)}
        elif name == "calibrate":
            floor = inference_floor(cfg, vocab, cfg.calibrate.expert_cache, cfg.model.max_seq_len, kv=False)
        row(table, "1b", name, peak, wall, baseline, floor)
        peaks[name] = peak
    prompt = ["--prompt", "The Congress", "--seed", "3", "--max-new-tokens", "24"]
    peak, wall, cached_text = stage(run.dir, "generate", *prompt, "--expert-cache", "4", logs=logs)
    row(table, "1b", "generate (cache 4)", peak, wall, baseline,
        inference_floor(cfg, vocab, 4, cfg.model.max_seq_len, kv=True))
    peaks["generate (cache 4)"] = peak
    full_peak, full_wall, full_text = child_peak_mb(
        [sys.executable, "-m", "modularforge", "generate", "--run-dir", str(run.dir), *prompt,
         "--set", "generate.expert_cache=null"], logs / "1b-generate-full.log")
    full_floor = inference_floor(cfg, vocab, cfg.model.num_layers * cfg.model.num_experts, cfg.model.max_seq_len, kv=True)
    row(table, "1b", "generate (fully loaded)", full_peak, full_wall, baseline, full_floor)
    model_bytes = sum(f.stat().st_size for f in run.model_dir.glob("*.safetensors"))
    return {"peaks_mb": peaks, "model_file_gb": round(model_bytes / 1e9, 3),
            "fully_loaded_fp32_gb": round(full_floor["weights_mb"] * MB / 1e9, 3),
            "generated_text_cached": cached_text, "generated_text_full": full_text,
            "identical_tokens": cached_text == full_text}


# ------------------------------------------------------------------------------ the largest base in 8 GiB

BASE_CONFIG = ROOT / "benchmarks" / "memory_base.yaml"
LLAMA_1B = dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, head_dim=64, vocab=128256,
                context=131072, theta=500_000.0)
CPU_BOUND_MB = 8 * 1024


def random_llama_1b(folder: Path) -> Path:
    """A Llama-3.2-1B-shaped Hugging Face folder with random bf16 weights (as the real one is stored), written one
    layer at a time into shards, and a byte-level BPE tokenizer trained on the bundled text (its ids fit the
    embeddings, which keep Llama 3's 128256 rows)."""
    from safetensors.torch import save_file

    from modularforge.config import TokenizerConfig
    from modularforge.data.sources import iter_documents
    from modularforge.config import DataConfig
    from modularforge.data.tokenizer import train_tokenizer

    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    s = LLAMA_1B
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    shards = [{"model.embed_tokens.weight": randn(s["vocab"], s["hidden"]),
               "model.norm.weight": torch.ones(s["hidden"], dtype=torch.bfloat16)}]
    q, kv = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shards.append({p + "input_layernorm.weight": torch.ones(s["hidden"], dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(s["hidden"], dtype=torch.bfloat16),
                       p + "self_attn.q_proj.weight": randn(q, s["hidden"]),
                       p + "self_attn.k_proj.weight": randn(kv, s["hidden"]),
                       p + "self_attn.v_proj.weight": randn(kv, s["hidden"]),
                       p + "self_attn.o_proj.weight": randn(s["hidden"], q, std=0.02 / 32**0.5),
                       p + "mlp.gate_proj.weight": randn(s["intermediate"], s["hidden"]),
                       p + "mlp.up_proj.weight": randn(s["intermediate"], s["hidden"]),
                       p + "mlp.down_proj.weight": randn(s["hidden"], s["intermediate"], std=0.02 / 32**0.5)})
    for k, tensors in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map |= {t: name for t in tensors}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    texts = (d.text for d in iter_documents(DataConfig(sources=["bundled"])))
    train_tokenizer(texts, TokenizerConfig(vocab_size=8192), 256, folder / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / "tok" / name).replace(folder / name)
    (folder / "tok").rmdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": s["vocab"],
              "hidden_size": s["hidden"], "intermediate_size": s["intermediate"], "num_hidden_layers": s["layers"],
              "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "head_dim": s["head_dim"],
              "hidden_act": "silu", "max_position_embeddings": s["context"], "rms_norm_eps": 1e-5,
              "rope_theta": s["theta"], "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192},
              "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def bench_base_1b(work: Path, baseline: float, table: list, logs: Path) -> dict:
    base = random_llama_1b(work / "llama-1b-random")
    run = new_run(BASE_CONFIG, work / "base-1b", [f"model.base={base}"])
    cfg = run.cfg
    peaks = {}
    for name in ("prepare", "train-shared", "train-experts", "assemble", "calibrate", "evaluate"):
        peak, wall, _ = stage(run.dir, name, logs=logs)
        vocab = read_json(run.data_dir / "shards.json")["vocab_size"]
        floor = None
        if name == "train-experts":
            floor = training_floor(cfg, vocab, "experts")
        elif name in ("train-shared", "assemble"):
            floor = {"floor_mb": largest_tensor_mb(cfg, vocab)}
        elif name in ("calibrate", "evaluate"):
            floor = inference_floor(cfg, vocab, cfg.calibrate.expert_cache, cfg.model.max_seq_len, kv=False)
            if name == "evaluate":  # the report also scores the dense anchor: the anchor FFN stack beside
                anchor_mb = 4 * sum(params(layer.mlp) for layer in dense_meta(cfg, vocab).model.layers) / MB
                floor = {**floor, "anchor_ffn_mb": anchor_mb, "floor_mb": floor["floor_mb"] + anchor_mb}
        row(table, "base-1b", name, peak, wall, baseline, floor)
        peaks[name] = peak
    prompt = ["--prompt", "The Congress", "--seed", "3", "--max-new-tokens", "8"]
    peak, wall, text = stage(run.dir, "generate", *prompt, "--expert-cache", "4", logs=logs)
    row(table, "base-1b", "generate (cache 4)", peak, wall, baseline,
        inference_floor(cfg, vocab, 4, cfg.model.max_seq_len, kv=True))
    peaks["generate (cache 4)"] = peak
    model = dense_meta(cfg, vocab)
    ffn = sum(params(layer.mlp) for layer in model.model.layers)
    return {"base": "Llama-3.2-1B shape, random weights", "parameters_dense": params(model),
            "expert_ffn_parameters": ffn, "expert_adamw_fp32_gb": round(16 * ffn / 1e9, 2),
            "recipe": {"optimizer": cfg.experts.train.optimizer, "step_in_backward": cfg.experts.train.step_in_backward,
                       "frozen_bf16": cfg.experts.frozen_bf16},
            "peaks_mb": {k: round(v, 1) for k, v in peaks.items()}, "generated": text}


# ------------------------------------------------------------------------------------------- GPU mode

POC_OVERRIDES = ["budget.total_tokens=106496", "budget.shared_fraction=0.2308", "train.micro_batch_size=4",
                 "experts.train.micro_batch_size=4", "train.loss_chunks=4", "experts.train.loss_chunks=4",
                 "run.malloc_mmap_threshold_kb=256", "train.eval_interval=1000", "experts.train.eval_interval=1000",
                 "train.eval_batches=1", "experts.train.eval_batches=1", "experts.stats_tokens=4096",
                 "calibrate.calib_tokens=5120", "evaluate.eval_tokens=2048", "generate.max_new_tokens=64"]
VRAM_HEADLINE_MB = 8 * 1024


def gpu_row(table: list, config: str, stage_name: str, peaks: ChildPeaks, floor: dict | None) -> None:
    entry = {"config": config, "stage": stage_name, "peak_cuda_allocated_mb": None if peaks.cuda_mb is None
             else round(peaks.cuda_mb, 1), "peak_rss_mb": round(peaks.rss_mb, 1), "wall_seconds": round(peaks.seconds, 1)}
    if floor:
        entry["floor_mb"] = round(floor["floor_mb"], 1)
        entry["floor_parts_mb"] = {k: round(v, 1) for k, v in floor.items() if k != "floor_mb"}
        if peaks.cuda_mb is not None and floor["floor_mb"]:
            entry["ratio_to_floor"] = round(peaks.cuda_mb / floor["floor_mb"], 3)
    table.append(entry)
    vram = "CPU work" if peaks.cuda_mb is None else f"VRAM peak {peaks.cuda_mb:8.0f} MiB"
    print(f"{config:<10} {stage_name:<22} {vram:<24} floor {entry.get('floor_mb', float('nan')):8.1f}  ratio "
          f"{entry.get('ratio_to_floor', ''):<6}  RSS {peaks.rss_mb:7.0f} MiB {peaks.seconds:6.1f}s", flush=True)


def bench_gpu(name: str, config: Path, overrides: list[str], device: str, work: Path, table: list,
              logs: Path) -> dict:
    """Every stage of one configuration on `device`: the CUDA allocator's peak against the stage's floor.
    Generation keeps `generate.expert_cache` experts on the GPU and reads the others from the assembled files
    (host memory through the page cache), so the model may be larger than the card."""
    run = new_run(config, work / f"{name}-{device.replace(':', '')}", [*overrides, f"run.device={device}"])
    cfg = run.cfg
    layers = cfg.model.num_layers
    peaks: dict[str, float | None] = {}

    def one(stage_name: str, *extra: str, floor=None, label: str | None = None) -> ChildPeaks:
        command = [sys.executable, "-m", "modularforge", stage_name, "--run-dir", str(run.dir), *extra]
        result = child_peaks(command, logs / f"{run.dir.name}-{label or stage_name}.log")
        gpu_row(table, name, label or stage_name, result, floor(result) if floor else None)
        peaks[label or stage_name] = result.cuda_mb
        return result

    one("prepare")
    vocab = read_json(run.data_dir / "shards.json")["vocab_size"]
    one("train-shared", floor=lambda _: training_floor(cfg, vocab, "shared", device))
    one("train-experts", floor=lambda _: training_floor(cfg, vocab, "experts", device))
    one("assemble")
    calib_cache = cfg.calibrate.expert_cache or layers * cfg.model.num_experts
    one("calibrate", floor=lambda _: inference_floor(cfg, vocab, calib_cache,
                                                     cfg.calibrate.micro_batch_size * cfg.model.max_seq_len, kv=False))
    eval_cache = cfg.evaluate.expert_cache or layers * cfg.model.num_experts
    one("evaluate", floor=lambda _: inference_floor(cfg, vocab, eval_cache,
                                                    cfg.evaluate.micro_batch_size * cfg.model.max_seq_len, kv=False))
    cache = cfg.generate.expert_cache or layers * cfg.model.num_experts
    generated = one("generate", "--prompt", "The", "--seed", "1",
                    floor=lambda _: inference_floor(cfg, vocab, cache, cfg.model.max_seq_len, kv=True),
                    label=f"generate (cache {cache})")
    dense = dense_meta(cfg, vocab)
    ffn_stack = sum(params(layer.mlp) for layer in dense.model.layers)
    total = params(dense) + (cfg.model.num_experts - 1) * ffn_stack  # the shared part and every expert's stack
    model_bytes = sum(f.stat().st_size for f in run.model_dir.glob("*.safetensors"))
    shutil.rmtree(run.dir)  # the headline's files are tens of GB
    return {"parameters": total, "model_file_gb": round(model_bytes / 1e9, 2), "peaks_cuda_mb": peaks,
            "generated_text": generated.stdout,
            "max_stage_peak_cuda_mb": max((round(v, 1) for v in peaks.values() if v is not None), default=None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "memory")
    parser.add_argument("--out", type=Path, help="default: docs/results/memory.json (memory_gpu.json on a GPU)")
    parser.add_argument("--only", help="default: poc-50m,scaling,1b; base-1b (the largest base in 8 GiB) writes "
                        "memory_base.json alone; in the GPU mode poc-50m,gpu-8gib")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:N] (the GPU mode: memory_gpu.json)")
    parser.add_argument("--vram", action="store_true",
                        help="the GPU mode's rows on --device (implied by a GPU; with cpu it checks the mode itself)")
    args = parser.parse_args()
    if args.device != "cpu" or args.vram:
        return main_gpu(args)
    parts = set((args.only or "poc-50m,scaling,1b").split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    logs = args.work / "logs"
    logs.mkdir(exist_ok=True)
    started = time.perf_counter()
    baseline = baseline_mb()
    print(f"baseline (python + torch): {baseline:.0f} MiB")
    table: list[dict] = []
    result: dict = {"command": " ".join(["python", *sys.argv]), "baseline_mb": round(baseline, 1),
                    "machine": machine_facts(), "git": git_facts()}
    poc = None
    if parts & {"poc-50m", "scaling"}:
        poc = bench_poc(args.work, baseline, table, logs)
    targets = {}
    if poc is not None:
        poc_rows = [r for r in table if r["config"] == "poc-50m" and r.get("ratio_to_floor") is not None]
        targets["poc_50m_max_ratio_to_floor"] = {"value": max(r["ratio_to_floor"] for r in poc_rows),
                                                  "target": "<= 1.25"}
    if "scaling" in parts and poc is not None:
        scaling = bench_scaling(poc, args.work, baseline, table, logs)
        result["assembly_scaling"] = scaling
        growth = scaling[64]["above_baseline_mb"] / max(scaling[4]["above_baseline_mb"], 1e-9) - 1
        targets["assembly_64_vs_4_experts"] = {"value": round(growth, 4), "target": "<= 0.10"}
        targets["assembly_64_above_baseline_vs_one_expert_plus_64mb"] = {
            "value": round(scaling[64]["above_baseline_mb"], 1),
            "target": f"<= {scaling[64]['expert_mb'] + 64:.1f} MiB"}
    if "base-1b" in parts:
        base = bench_base_1b(args.work, baseline, table, logs)
        result["base-1b"] = base
        targets["base_1b_max_stage_peak_mb"] = {"value": round(max(base["peaks_mb"].values()), 1),
                                                "target": f"< {CPU_BOUND_MB}"}
    if "1b" in parts:
        one_b = bench_1b(args.work, baseline, table, logs)
        result["1b"] = one_b
        targets["1b_max_stage_peak_mb"] = {"value": round(max(one_b["peaks_mb"].values()), 1), "target": "< 2048"}
        targets["1b_generate_cache_4_peak_mb"] = {"value": round(one_b["peaks_mb"]["generate (cache 4)"], 1),
                                                   "target": "< 1536"}
        targets["1b_fully_loaded_fp32_gb"] = {"value": one_b["fully_loaded_fp32_gb"], "target": "> 4"}
        targets["1b_identical_tokens"] = {"value": one_b["identical_tokens"], "target": "true"}
    result.update(rows=table, targets=targets, wall_seconds=round(time.perf_counter() - started, 1))
    default = "memory_base.json" if parts == {"base-1b"} else "memory.json"
    write_json(args.out or ROOT / "docs" / "results" / default, result)
    print("\ntargets:")
    for name, t in targets.items():
        print(f"  {name}: {t['value']} (target {t['target']})")
    print(json.dumps({"wall_seconds": result["wall_seconds"]}))


def main_gpu(args: argparse.Namespace) -> None:
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: no CUDA GPU is present on this machine")
    parts = (args.only or "poc-50m,gpu-8gib").split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    logs = args.work / "logs"
    logs.mkdir(exist_ok=True)
    started = time.perf_counter()
    table: list[dict] = []
    result: dict = {"command": " ".join(["python", *sys.argv]), "machine": machine_facts(device=args.device),
                    "measure": "torch.cuda.max_memory_allocated of each stage's process"}
    targets = {}
    configs = {"poc-50m": (preset_path("poc-50m"), POC_OVERRIDES), "gpu-8gib": (preset_path("gpu-8gib"), [])}
    for name in parts:
        if name not in configs:
            raise SystemExit(f"error: --only {name}: the GPU mode has {', '.join(configs)}")
        result[name] = bench_gpu(name, *configs[name], args.device, args.work, table, logs)
    if "gpu-8gib" in result:
        headline = result["gpu-8gib"]
        targets["gpu_8gib_parameters"] = {"value": headline["parameters"], "target": "as large as fits (aim 10B)"}
        targets["gpu_8gib_max_stage_peak_cuda_mb"] = {"value": headline["max_stage_peak_cuda_mb"],
                                                      "target": f"< {VRAM_HEADLINE_MB}"}
    result.update(rows=table, targets=targets, wall_seconds=round(time.perf_counter() - started, 1))
    write_json(args.out or ROOT / "docs" / "results" / "memory_gpu.json", result)
    for name, t in targets.items():
        print(f"  {name}: {t['value']} (target {t['target']})")


if __name__ == "__main__":
    main()
