"""The one device seam (DESIGN.md section 7c): which device a run computes on and in which precision.

Every stage takes its device and its autocast settings from here. Only the CPU is supported today: `auto`
resolves to it, and a CUDA or MPS device is refused with a ConfigError (CUDA support is a later issue);
the CPU-specific choices (bf16 only where the CPU has native bf16 matrix units) sit here as the CPU branch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from modularforge.errors import ConfigError

if TYPE_CHECKING:
    from modularforge.config import Config


def resolve_device(cfg: Config) -> torch.device:
    """The torch device that `run.device` names on this machine; a ConfigError for one this build cannot use."""
    name = cfg.run.device  # its form (auto, cpu, cuda, cuda:N, mps) was checked when the config was loaded
    if name in ("auto", "cpu"):
        return torch.device("cpu")
    if name.startswith("cuda"):
        present = torch.cuda.is_available() and (name == "cuda" or int(name[5:]) < torch.cuda.device_count())
    else:
        present = torch.backends.mps.is_available()
    if not present:
        raise ConfigError(f"run.device={name}: no such device is present on this machine; use run.device=cpu "
                          "(or auto)")
    raise ConfigError(f"run.device={name}: only the CPU is supported so far; use run.device=cpu (or auto)")


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


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of token ids (made on the CPU from the memmapped shards) on `device`; on CUDA through pinned
    memory, so the copy does not block the host."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)
