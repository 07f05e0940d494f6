"""Building blocks of the Mixtral architecture, named as transformers names them.

RMSNorm and rotary embeddings follow `transformers.models.mixtral` (fp32 normalisation,
`rotate_half` rotary convention, Llama 3.x's `llama3` frequency scaling); attention uses
`scaled_dot_product_attention` with grouped KV heads, and for Qwen3 an RMSNorm over each head's queries and
keys before the rotary embedding (`transformers.models.qwen3`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modularforge.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """The (head_dim / 2,) inverse wavelengths of the rotary embedding, scaled as Llama 3.x scales them:
    wavelengths beyond original context / low_freq_factor are `factor` times longer, those below original
    context / high_freq_factor unchanged, and those between interpolated (transformers'
    `_compute_llama3_parameters`)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    wavelength = 2 * math.pi / inv_freq
    low_wavelength = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelength = s.original_max_position_embeddings / s.high_freq_factor
    scaled = torch.where(wavelength > low_wavelength, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    between = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
    return torch.where(between, smoothed, scaled)


def rotary_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim), in fp32, on the CPU even under a meta-device context:
    the first computation on meta tensors imports torch's meta kernels, about 70 MB of resident memory."""
    inv_freq = rotary_frequencies(cfg)
    freqs = torch.arange(cfg.max_seq_len, dtype=torch.int64, device="cpu").float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, head_dim); cos/sin: (T, head_dim)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection (heads * head_dim, H) from HF's rotate_half order (dimension j pairs with
    j + head_dim/2) to the interleaved order (2j pairs with 2j + 1) that llama.cpp's `llama` RoPE uses."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of `permute_rotary`."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


class LayerKV:
    """Preallocated key/value cache of one layer: (B, kv_heads, capacity, head_dim)."""

    def __init__(self, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        # q|k|v as one (q + k + v outs, in) matrix whose rows the three weights view; set by
        # `inference.for_decoding`, read by `decode.decode_step`
        self.qkv_weight: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerKV | None = None, start: int = 0
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        mask = None
        if cache is not None:
            k, v = cache.update(k, v, start)
            if start and T > 1:  # a chunk after cached tokens: causal within the chunk, full to the past
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and start == 0 and T > 1,
            enable_gqa=self.kv_heads != self.num_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """The FFN, and therefore the expert: w2(silu(w1 x) * w3 x) (w1 = gate, w3 = up, w2 = down)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w13_weight: torch.Tensor | None = None  # gate|up fused for decoding, as Attention.qkv_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
