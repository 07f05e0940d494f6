"""What every benchmark JSON records about where it ran: the CPU, the flags that decide its speed (AVX-512,
AVX-512 BF16, AMX), the GPU if one computed, torch and the commit."""

from __future__ import annotations

import os
import platform
import subprocess
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


def git_facts() -> dict:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--", "modularforge", "benchmarks").splitlines()}
