"""Speed benchmark: ModularForge against Hugging Face transformers, same shapes, same machine, one run.

- Training steps: ModularForge's shared phase (dense model, everything trainable) and expert phase (frozen
  shared part, one trainable FFN stack), against transformers' MixtralForCausalLM (4 experts, top-2) and
  LlamaForCausalLM of the same shape, in fp32 and with bf16 autocast; tokens/s and model FLOP utilisation
  against a matrix-product peak measured here.
- Generation at batch 1 (16-token prompt, 128 new tokens, greedy, KV cache): ModularForge and
  transformers loading the same exported folder; the tokens must be identical.
- Tokenisation and partitioning of ../shared/data (the `prepare` stage).

Medians over repeated timings, the systems interleaved round by round. Prints a table, writes docs/results/speed.json.
`--device cuda` is the GPU mode: every system on the GPU (synchronised around each timing), the shape
`GPU_SHAPE` (hidden 1024, so the GPU is not idle), the matmul peak measured on the GPU, `transformers`' generate
on the GPU too; it writes speed_gpu.json.

    python benchmarks/speed.py [--data ../shared/data] [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import machine_facts, matmul_peak  # noqa: E402

from modularforge.config import ModelConfig, TrainConfig  # noqa: E402
from modularforge.device import autocast, autocast_dtype  # noqa: E402
from modularforge.files import write_json  # noqa: E402
from modularforge.inference import open_model  # noqa: E402
from modularforge.model.hf import hf_config  # noqa: E402
from modularforge.model.transformer import CausalLM  # noqa: E402
from modularforge.sampling import Sampling, generate_ids  # noqa: E402
from modularforge.train.loop import ModelLoss  # noqa: E402
from modularforge.train.optimizer import FusedAdamW  # noqa: E402

SHAPE = dict(hidden=256, intermediate=1024, layers=4, heads=4, vocab=8192, seq=256, batch=8, experts=4, top_k=2)
GPU_SHAPE = dict(hidden=1024, intermediate=4096, layers=8, heads=16, vocab=32768, seq=1024, batch=8, experts=4,
                 top_k=2)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(s: dict, trainable: str) -> float:
    """Matrix-product FLOPs of one training step (forward, input gradients, weight gradients of what trains)."""
    tokens = s["batch"] * s["seq"]
    attn_proj = 4 * s["hidden"] ** 2
    ffn = 3 * s["hidden"] * s["intermediate"] * (s["top_k"] if trainable == "mixtral" else 1)
    head = s["hidden"] * s["vocab"]
    attn_scores = 2 * s["seq"] * s["hidden"]  # QK^T and AV per token per layer (causal half not subtracted)
    forward = 2 * tokens * (s["layers"] * (attn_proj + ffn + attn_scores) + head)
    if trainable == "experts":  # input gradients everywhere above the embedding, weight gradients only for FFNs
        weight_grads = 2 * tokens * s["layers"] * ffn
        return forward + forward + weight_grads
    return 3 * forward


def our_step(cfg: ModelConfig, s: dict, phase: str, dtype, compile: bool, device: torch.device):
    model = CausalLM(cfg, s["vocab"], moe=False)
    model.init_weights(torch.Generator().manual_seed(0))
    model.to(device)
    if phase == "experts":
        model.requires_grad_(False)
        for layer in model.model.layers:
            layer.mlp.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = FusedAdamW([(params, 0.1)], betas=(0.9, 0.95))
    loss_fn = ModelLoss(model, compile)
    batch = torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), device=device)

    def step():
        with autocast(dtype, device):
            loss = loss_fn(batch)
        loss.backward()
        optimizer.step(1e-4)
        optimizer.zero_grad()

    return step


def hf_step(kind: str, s: dict, dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                  num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                  max_position_embeddings=s["seq"])
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=s["experts"], num_experts_per_tok=s["top_k"]))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), device=device)

    def step():
        with autocast(dtype, device):
            logits = model(batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def exported_folder(cfg: ModelConfig, s: dict, out: Path) -> Path:
    """A randomly initialised MoE with non-trivial routers, written as a Mixtral folder."""
    from safetensors.torch import save_file

    model = CausalLM(cfg, s["vocab"], moe=True)
    model.init_weights(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    for block in model.moe_blocks():
        torch.nn.init.normal_(block.gate.weight, std=0.5, generator=g)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, s["vocab"], eos_id=0)))
    return out


def generation(folder: Path, s: dict, repeats: int, device: torch.device) -> dict:
    """Greedy batch-1 decoding of the same exported folder by ModularForge (`generate`'s loading) and by
    transformers, each in float32 and float16, timed in interleaved rounds; every system's tokens are
    checked against ModularForge's float32 greedy output."""
    from transformers import AutoModelForCausalLM

    prompt = torch.randint(1, s["vocab"], (16,), generator=torch.Generator().manual_seed(2)).tolist()
    new = 128
    sampling = Sampling(temperature=0, max_new_tokens=new)

    def ours(dtype: str):
        model = open_model(folder, decode_dtype=dtype, device=device)
        return lambda: list(generate_ids(model, prompt, sampling))

    def theirs(dtype: torch.dtype):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()

        def run():
            with torch.inference_mode():
                out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, pad_token_id=0, eos_token_id=None)
            return out[0, len(prompt):].tolist()
        return run

    systems = {("modularforge", "float32"): ours("float32"), ("modularforge", "float16"): ours("float16"),
               ("transformers", "float32"): theirs(torch.float32), ("transformers", "float16"): theirs(torch.float16)}
    reference = systems["modularforge", "float32"]()
    same = {key: run() == reference for key, run in systems.items()}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in systems}
    for _ in range(repeats):
        for key, run in systems.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[key].append(time.perf_counter() - start)
    rows = [{"system": system, "dtype": dtype, "tokens_per_s": round(new / statistics.median(times[system, dtype]), 1),
             "greedy_tokens_equal_float32": same[system, dtype]} for system, dtype in systems]
    rate = {(r["system"], r["dtype"]): r["tokens_per_s"] for r in rows}
    return {"rows": rows,
            "same_precision_ratio": {d: round(rate["modularforge", d] / rate["transformers", d], 3)
                                     for d in ("float32", "float16")},
            "best_vs_best_ratio": round(max(rate[k] for k in rate if k[0] == "modularforge")
                                        / max(rate[k] for k in rate if k[0] == "transformers"), 3)}


def prepare_time(data: Path) -> dict | None:
    if not data.is_dir():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "modularforge", "prepare", "--preset", "quality",
                   "--set", f"data.sources=[{data}/*/train-*.jsonl]", "--set", f"run.root={tmp}"]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        shards = json.loads((Path(tmp) / "quality" / "data" / "shards.json").read_text())
    return {"seconds": round(seconds, 1), "documents": shards["num_documents"], "tokens": shards["num_tokens"],
            "bytes_of_text": sum(f.stat().st_size for f in data.glob("*/train-*.jsonl"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="default: docs/results/speed.json, or speed_gpu.json on a GPU")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the GPU mode: GPU_SHAPE, speed_gpu.json)")
    parser.add_argument("--shape", choices=("cpu", "gpu"), help="default: gpu with --device cuda, else cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA GPU is present on this machine")
    gpu_mode = device.type == "cuda"
    out = args.out or ROOT / "docs" / "results" / ("speed_gpu.json" if gpu_mode else "speed.json")
    torch.manual_seed(0)
    s = GPU_SHAPE if (args.shape or ("gpu" if gpu_mode else "cpu")) == "gpu" else SHAPE
    cfg = ModelConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_layers=s["layers"],
                      num_heads=s["heads"], max_seq_len=s["seq"], num_experts=s["experts"], top_k=s["top_k"])
    started = time.perf_counter()
    if gpu_mode:
        torch.backends.cuda.matmul.allow_tf32 = True  # as resolve_device sets it for every stage on CUDA
    peak = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
    default_dtype = autocast_dtype(TrainConfig().precision, device)
    precisions = {"fp32": None, "bf16": torch.bfloat16}
    tokens = s["batch"] * s["seq"]
    rows = []

    def add(system: str, precision: str, rate: float, flops_kind: str) -> None:
        flops = step_flops(s, flops_kind) * rate / tokens
        rows.append({"system": system, "precision": precision, "tokens_per_s": round(rate, 1),
                     "mfu": round(flops / peak[precision.split("+")[0]], 4)})
        print(f"{system:<34} {precision:<14} {rate:>9.0f} tok/s  MFU {rows[-1]['mfu']:.3f}", flush=True)

    systems = []  # (system, precision, step, flops kind); timed in interleaved rounds so drift hits all alike
    for phase in ("shared", "experts"):
        for name, dtype in precisions.items():
            for compile in (False, True):
                systems.append((f"modularforge {phase} phase", name + ("+compile" if compile else ""),
                                our_step(cfg, s, phase, dtype, compile, device),
                                "experts" if phase == "experts" else "dense"))
    for kind in ("llama", "mixtral"):
        for name, dtype in precisions.items():
            systems.append((f"transformers {kind}", name, hf_step(kind, s, dtype, device),
                            kind if kind == "mixtral" else "dense"))
    for _, _, step, _ in systems:  # warm-up, including compilation
        for _ in range(2):
            step()
    times: dict[int, list[float]] = {i: [] for i in range(len(systems))}
    for _ in range(args.repeats):
        for i, (_, _, step, _) in enumerate(systems):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[i].append(time.perf_counter() - start)
    for i, (system, precision, _, kind) in enumerate(systems):
        add(system, precision, tokens / statistics.median(times[i]), kind)
    del systems

    def best(prefix: str) -> dict:
        return max((r for r in rows if r["system"] == prefix), key=lambda r: r["tokens_per_s"])

    with tempfile.TemporaryDirectory() as tmp:
        gen = generation(exported_folder(cfg, s, Path(tmp) / "model"), s, args.repeats, device)
    prep = None if gpu_mode else prepare_time(args.data)  # prepare is CPU work: measured by the CPU mode
    shared, experts = best("modularforge shared phase"), best("modularforge experts phase")
    llama, mixtral = best("transformers llama"), best("transformers mixtral")
    ratios = {
        "experts_vs_transformers_mixtral": {"value": round(experts["tokens_per_s"] / mixtral["tokens_per_s"], 3), "target": ">= 2.0"},
        "experts_vs_transformers_llama": {"value": round(experts["tokens_per_s"] / llama["tokens_per_s"], 3), "target": ">= 1.3"},
        "shared_vs_transformers_llama": {"value": round(shared["tokens_per_s"] / llama["tokens_per_s"], 3), "target": ">= 1.0"},
        "generation_vs_transformers_float32": {"value": gen["same_precision_ratio"]["float32"], "target": ">= 2.0",
                                               "identical_greedy_tokens": all(r["greedy_tokens_equal_float32"]
                                                                              for r in gen["rows"] if r["dtype"] == "float32")},
        "generation_vs_transformers_float16": {"value": gen["same_precision_ratio"]["float16"], "target": ">= 2.0"},
        "generation_best_vs_best": {"value": gen["best_vs_best_ratio"], "target": ">= 2.0"},
    }
    if gpu_mode:  # the GPU targets: generation >= 1.5x, MFU >= 40% of the measured bf16 peak
        for name in ("generation_vs_transformers_float32", "generation_vs_transformers_float16",
                     "generation_best_vs_best"):
            ratios[name]["target"] = ">= 1.5"
        ratios["best_modularforge_mfu_bf16"] = {
            "value": max(r["mfu"] for r in rows
                         if r["system"].startswith("modularforge") and r["precision"].startswith("bf16")),
            "target": ">= 0.40"}
    if prep:
        ratios["prepare_77mb_seconds"] = {"value": prep["seconds"], "target": "< 180"}
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine_facts(device=device),
        "shape": s,
        "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peak.items()},
        "default_autocast": str(default_dtype),
        "comparison": "each system at its fastest measured precision (and compile setting for ModularForge)",
        "rows": rows,
        "best": {"shared": shared, "experts": experts, "llama": llama, "mixtral": mixtral},
        "generation": gen,
        "prepare": prep,
        "ratios": ratios,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out, result)
    print(f"\nmatmul peak: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    for r in gen["rows"]:
        print(f"generation {r['system']:<13} {r['dtype']:<8} {r['tokens_per_s']:>7.0f} tok/s  "
              f"greedy tokens equal to float32: {r['greedy_tokens_equal_float32']}")
    if prep:
        print(f"prepare on {prep['bytes_of_text'] / 1e6:.0f} MB: {prep['seconds']} s ({prep['tokens']} tokens)")
    for name, r in ratios.items():
        print(f"{name}: {r['value']} (target {r['target']})")


if __name__ == "__main__":
    main()
