"""What every benchmark JSON records about where it ran: the CPU, the flags that decide its speed (AVX-512,
AVX-512 BF16, AMX), the GPU if one computed, torch and the commit."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from modularforge.config import Config
from modularforge.device import autocast_dtype

ROOT = Path(__file__).resolve().parents[1]


def machine_facts(cfg: Config | None = None, device: torch.device | str = "cpu") -> dict:
    """The machine; with `cfg`, the autocast its training phases get on `device`."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    device = torch.device(device)
    facts = {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             "flags": {f: f in flags for f in ("avx512f", "avx512_bf16", "amx_tile")},
             "device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        facts |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    if cfg is not None:
        facts["training_precision"] = {"shared": str(autocast_dtype(cfg.train.precision, device) or "fp32"),
                                       "experts": str(autocast_dtype(cfg.experts.train.precision, device) or "fp32")}
    return facts


def matmul_peak(dtype: torch.dtype, device: torch.device | str = "cpu", blocks: int = 5) -> float:
    """The best rate of square matrix products in `dtype`, FLOP/s: the denominator of every MFU. The best of
    several timed blocks, because one short block on a CPU can read half the rate (a neighbour's burst)."""
    device = torch.device(device)
    n, reps = (8192, 50) if device.type == "cuda" else (2048, 8)
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(blocks):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def git_facts() -> dict:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--", "modularforge", "benchmarks").splitlines()}
