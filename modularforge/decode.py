"""One new token through a model laid out for decoding (`inference.for_decoding`): the step `generate` repeats.

At batch 1 a step is about 45 matrix-vector products; through the modules it was also about 300 small tensor
operations and module calls, whose fixed costs took as long as the products on this project's 2-core machine
(benchmarks/speed.py). This is the same arithmetic in the same order with a third of the operations: one
product for q|k|v and one for each expert's gate|up (fused weights), large float32 products split over both
cores (`matvec`), rotary embedding as two products and a sum on tables built once, the key/value cache
written in place, and no module calls. Its logits equal the module path's, to float32 rounding where a split
product sums in another order (tests/test_generate.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modularforge.model.layers import RMSNorm, SwiGLU
from modularforge.model.moe import SparseMoE, route
from modularforge.model.transformer import CausalLM, KVCache


def supports_decode_step(model: CausalLM) -> bool:
    blocks = model.moe_blocks()
    return model.decode_dtype is not None and all(b.record is None for b in blocks)


class RotaryRows:
    """Per position, cos and a sign-folded sin so that rotary(x) = x * cos + x[..., swap] * sin."""

    def __init__(self, model: CausalLM, dtype: torch.dtype):
        half = model.cfg.head_dim // 2
        self.cos = model.rope_cos.to(dtype)
        sin = model.rope_sin.to(dtype)
        self.sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=1)  # rotate_half negates the first half
        device = self.cos.device
        self.swap = torch.cat([torch.arange(half, 2 * half, device=device), torch.arange(half, device=device)])


SPLIT_MIN_ELEMENTS = 1 << 17


def matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (1, in) times weight (out, in) transposed. The CPU branch: MKL runs a lone float32 matrix-vector product
    on one core; a large one is split into two halves of its outputs, which one `bmm` runs on two cores (about
    1.3-1.6x faster here). Every output is the same dot product; MKL picks its summation order per shape and CPU,
    so the result is bitwise the plain product's on some CPUs and within float32 rounding on others. Other
    devices take the plain product."""
    if (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() >= SPLIT_MIN_ELEMENTS
            and weight.shape[0] % 2 == 0):
        return torch.bmm(x.expand(2, 1, -1), weight.unflatten(0, (2, -1)).transpose(1, 2)).view(1, -1)
    return F.linear(x, weight)


def rms_norm(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    """RMSNorm.forward in one fused normalisation (the same bits: tests/test_generate.py)."""
    return norm.weight * F.rms_norm(x.float(), x.shape[-1:], None, norm.eps).to(x.dtype)


def swiglu(h: torch.Tensor, ffn: SwiGLU) -> torch.Tensor:
    gate_up = matvec(h, ffn.w13_weight)
    width = gate_up.shape[-1] // 2
    return matvec(F.silu(gate_up[:, :width]) * gate_up[:, width:], ffn.w2.weight)


def moe(h: torch.Tensor, block: SparseMoE, expert_ids: torch.Tensor | None) -> torch.Tensor:
    """SparseMoE.forward for one token: the experts' weighted outputs summed in expert order."""
    if expert_ids is None:
        weights, indices = route(matvec(h, block.gate.weight), block.top_k)
        scale = weights[0].to(h.dtype)
        chosen = sorted(zip(indices[0].tolist(), scale.unbind()))
    else:
        chosen = [(int(expert_ids.reshape(-1)[0]), None)]
    out = None
    for e, w in chosen:
        y = swiglu(h, block.expert(e))
        y = y if w is None else y * w
        out = y if out is None else out + y
    return out


@torch.no_grad()
def decode_step(model: CausalLM, rotary: RotaryRows, token: int, cache: KVCache, position: int,
                expert_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (V,) of the token after `token`, which sits at `position`; writes its keys and values to `cache`."""
    cfg = model.cfg
    heads, kv_heads, head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    cos, sin = rotary.cos[position], rotary.sin[position]
    x = model.model.embed_tokens.weight[token : token + 1]
    for layer, layer_cache in zip(model.model.layers, cache.layers):
        attn = layer.self_attn
        qkv = matvec(rms_norm(x, layer.input_layernorm), attn.qkv_weight)[0]
        qk = qkv[: (heads + kv_heads) * head_dim].view(heads + kv_heads, head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3: each head's query and key normalised before the rotation
            qk = torch.cat([rms_norm(qk[:heads], attn.q_norm), rms_norm(qk[heads:], attn.k_norm)])
        qk = qk * cos + qk[:, rotary.swap] * sin
        layer_cache.k[0, :, position] = qk[heads:]
        layer_cache.v[0, :, position] = qkv[(heads + kv_heads) * head_dim :].view(kv_heads, head_dim)
        y = F.scaled_dot_product_attention(
            qk[None, :heads, None], layer_cache.k[:, :, : position + 1], layer_cache.v[:, :, : position + 1],
            enable_gqa=kv_heads != heads,
        )
        x = x + matvec(y.reshape(1, heads * head_dim), attn.o_proj.weight)
        h = rms_norm(x, layer.post_attention_layernorm)
        if hasattr(layer, "block_sparse_moe"):
            x = x + moe(h, layer.block_sparse_moe, expert_ids)
        else:
            x = x + swiglu(h, layer.mlp)
    return matvec(rms_norm(x, model.model.norm), model.lm_head.weight)[0]
