"""Where each stage's weights live, and the one table of names between dense and MoE layouts.

    shared/shared.safetensors   embeddings, attention, norms, LM head (frozen after the shared phase)
    shared/anchor.safetensors   the dense anchor FFN, as model.layers.{i}.mlp.w{1,2,3}.weight
    experts/expert_XX/expert.safetensors   model.layers.{i}.block_sparse_moe.experts.{XX}.w{1,2,3}.weight

Models are built on the meta device and the loaded tensors are assigned, never copied, so the
frozen weights exist once in memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from modularforge.config import ModelConfig
from modularforge.errors import DataError
from modularforge.files import load_tensors
from modularforge.model.layers import SwiGLU, rotary_tables
from modularforge.model.transformer import CausalLM

FFN_WEIGHTS = ("w1", "w2", "w3")


def ffn_key(layer: int, weight: str) -> str:
    return f"model.layers.{layer}.mlp.{weight}.weight"


def expert_key(layer: int, expert: int, weight: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{weight}.weight"


def gate_key(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


def dense_shapes(cfg: ModelConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the dense model, from the config alone: building even a meta-device
    model to read them faults in about 9 MiB of torch code, a fifth of what assembly holds otherwise."""
    h, inner = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, h)}
    for i in range(cfg.num_layers):
        layer = f"model.layers.{i}."
        shapes |= {
            layer + "input_layernorm.weight": (h,),
            layer + "self_attn.q_proj.weight": (q, h),
            layer + "self_attn.k_proj.weight": (kv, h),
            layer + "self_attn.v_proj.weight": (kv, h),
            layer + "self_attn.o_proj.weight": (h, q),
            **({layer + "self_attn.q_norm.weight": (cfg.head_dim,), layer + "self_attn.k_norm.weight": (cfg.head_dim,)}
               if cfg.qk_norm else {}),
            layer + "post_attention_layernorm.weight": (h,),
            ffn_key(i, "w1"): (inner, h),
            ffn_key(i, "w2"): (h, inner),
            ffn_key(i, "w3"): (inner, h),
        }
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (vocab_size, h)
    return shapes


def is_ffn(name: str) -> bool:
    return ".mlp." in name or ".block_sparse_moe." in name


def ffn_to_expert(name: str, expert: int) -> str:
    """model.layers.3.mlp.w1.weight -> model.layers.3.block_sparse_moe.experts.{expert}.w1.weight"""
    match = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(w[123])\.weight", name)
    assert match, f"not a dense FFN weight: {name}"
    return expert_key(int(match[1]), expert, match[2])


def split_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A dense model's state dict -> (shared tensors, anchor FFN tensors)."""
    shared = {k: v for k, v in state.items() if not is_ffn(k)}
    anchor = {k: v for k, v in state.items() if is_ffn(k)}
    return shared, anchor


def build_model(
    cfg: ModelConfig,
    vocab_size: int,
    moe: bool,
    tensors: dict[str, torch.Tensor],
    customize: Callable[[CausalLM], None] | None = None,
    device: torch.device | str = "cpu",
) -> CausalLM:
    """Build a model on the meta device and assign `tensors` to it; every parameter must be given. Then the model
    goes to `device` (the tensors stay where they are when they are there already: the CPU, as read).

    `customize(model)` runs before the check, e.g. to have experts loaded on demand."""
    with torch.device("meta"):
        model = CausalLM(cfg, vocab_size, moe)
    if customize is not None:
        customize(model)
    expected = set(model.state_dict())
    if cfg.tie_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise DataError(
            f"weights do not fit the model config: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    model.load_state_dict(tensors, assign=True, strict=False)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rotary_tables(cfg)
    # frozen until a trainer says otherwise: autocast caches a bf16 copy of every weight that requires grad
    model.requires_grad_(False)
    return model.to(device)


def load_dense(cfg: ModelConfig, vocab_size: int, shared_dir: Path, ffn: dict[str, torch.Tensor] | None = None,
               device: torch.device | str = "cpu") -> CausalLM:
    """The dense model of the shared phase on `device`; `ffn` replaces the anchor FFN (e.g. with an expert's)."""
    tensors = load_tensors(Path(shared_dir) / "shared.safetensors")
    tensors |= ffn if ffn is not None else load_tensors(Path(shared_dir) / "anchor.safetensors")
    return build_model(cfg, vocab_size, moe=False, tensors=tensors, device=device)


def ffn_from_weights(weights: dict[str, torch.Tensor], trainable: bool = False) -> SwiGLU:
    """A SwiGLU FFN whose w1/w2/w3 are the given tensors (no copy)."""
    with torch.device("meta"):
        ffn = SwiGLU(weights["w1"].shape[1], weights["w1"].shape[0])
    for w, t in weights.items():
        getattr(ffn, w).weight = torch.nn.Parameter(t, requires_grad=trainable)
    return ffn
