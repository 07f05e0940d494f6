"""The one device seam (DESIGN.md section 7c): which device a run computes on and in which precision.

Every stage that computes (train-shared, train-experts, calibrate, evaluate, generate) takes its device and its
autocast settings from here; prepare and assemble are file work and stay on the CPU. `run.device`: `auto` is the
best device present (a CUDA GPU, else Apple's mps, else the CPU), or `cpu`, `cuda`, `cuda:N`, `mps`; a device
this machine lacks is a ConfigError before anything is written. Per device:

- CPU: bf16 autocast only where the CPU has native bf16 matrix units; the split mat-vec of decoding
  (`decode.matvec`) is its branch.
- CUDA: bf16 autocast where the GPU supports it (fp32 master weights, as on the CPU), TF32 for the float32
  matrix products that remain, batches copied from pinned memory without blocking.
- mps: fp32; float64 sums (router statistics, report tallies) are taken on the CPU, which mps lacks.

The GPU branches are written against torch's documented behaviour and exercised on the CPU by the tests that run
every stage with the device passed in; they have not yet been run on a GPU by this project (docs/RESULTS.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from modularforge.errors import ConfigError

if TYPE_CHECKING:
    from modularforge.config import Config


def resolve_device(cfg: Config) -> torch.device:
    """The torch device that `run.device` names on this machine; a ConfigError for one it lacks."""
    name = cfg.run.device  # its form (auto, cpu, cuda, cuda:N, mps) was checked when the config was loaded
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        present = torch.cuda.is_available() and (name == "cuda" or int(name[5:]) < torch.cuda.device_count())
    else:
        present = _mps_available()
    if not present:
        raise ConfigError(f"run.device={name}: no such device is present on this machine; use run.device=cpu "
                          "(or auto)")
    device = torch.device(name)
    if device.type == "cuda":
        # the float32 products left outside bf16 autocast (router statistics, fp32 runs) may use TF32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def autocast_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """bf16 when asked, or under `auto` where `device` computes bf16 natively (a CPU with bf16 matrix units, a
    CUDA GPU that supports it); None means fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        return None
    kind = torch.device(device).type
    if kind == "cpu":
        return torch.bfloat16 if _cpu_has_native_bf16() else None
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return None


def _cpu_has_native_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((check and check()) or (amx and amx()))


def autocast(dtype: torch.dtype | None, device: torch.device | str = "cpu"):
    """Autocast to `dtype` (None: off) for computations on `device`."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device a model's weights are on (the CPU for a module without any)."""
    weight = next(module.parameters(), None)
    return weight.device if weight is not None else torch.device("cpu")


def as_float64(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float64 for exact sums: where it is, or on the CPU for a device without float64 (mps)."""
    return (tensor.cpu() if tensor.device.type == "mps" else tensor).double()


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of token ids (made on the CPU from the memmapped shards) on `device`; on CUDA through pinned
    memory, so the copy does not block the host."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)
