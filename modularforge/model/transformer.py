"""The decoder-only transformer, dense (one FFN per layer) or sparse (an MoE block per layer).

Parameter names equal `transformers`' Mixtral names (`model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`,
`model.layers.{i}.block_sparse_moe.experts.{e}.w1`, `model.norm`, `lm_head`), so exporting the MoE is a
copy. The dense variant (shared phase, expert phase) holds its FFN as `model.layers.{i}.mlp`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from modularforge.config import ModelConfig
from modularforge.model.layers import Attention, LayerKV, RMSNorm, SwiGLU, rotary_tables
from modularforge.model.moe import SparseMoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if moe:
            self.block_sparse_moe = SparseMoE(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.top_k)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache: LayerKV | None, start: int, expert_ids: torch.Tensor | None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        h = self.post_attention_layernorm(x)
        if hasattr(self, "block_sparse_moe"):
            return x + self.block_sparse_moe(h, expert_ids)
        return x + self.mlp(h)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, moe: bool):
        super().__init__()
        # given storage skips nn.Embedding's own init (init_weights sets every weight), which on the meta
        # device would import torch's meta kernels (about 70 MB resident) for nothing
        self.embed_tokens = nn.Embedding(vocab_size, cfg.hidden_size, _weight=torch.empty(vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, moe) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.capacity = capacity
        self.layers = [LayerKV(batch, cfg.kv_heads, capacity, cfg.head_dim, dtype, device)
                       for _ in range(cfg.num_layers)]


NLL_SLICE_BYTES = 32 << 20


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, moe: bool):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.model = Decoder(cfg, vocab_size, moe)
        self.lm_head = nn.Linear(cfg.hidden_size, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rotary_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        self.decode_dtype: str | None = None  # the layout `inference.for_decoding` gave the weights, if any
        self.expert_cache = None  # `inference.ExpertCache` of a model opened with a bound on experts in memory

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) for matrices; residual output projections scaled by 1/sqrt(2 * layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)
            else:
                scale = (2 * self.cfg.num_layers) ** -0.5 if name.endswith(("o_proj.weight", "w2.weight")) else 1.0
                nn.init.normal_(p, 0.0, std * scale, generator=generator)
            if name.endswith("gate.weight"):
                nn.init.zeros_(p)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        expert_ids: torch.Tensor | None = None,
        head: bool = True,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or with head=False the final-norm hidden states (B, T, H).
        `start` is the position of input_ids[:, 0] in the cache."""
        T = input_ids.shape[1]
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {start + T} exceed max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, layer_cache, start, expert_ids, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layer_cache, start, expert_ids)
        x = self.model.norm(x)
        return self.lm_head(x) if head else x

    def loss(self, batch: torch.Tensor, expert_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy of a (B, T + 1) window batch, in fp32."""
        logits = self(batch[:, :-1], expert_ids=expert_ids)
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    def token_nll(self, batch: torch.Tensor, expert_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token negative log-likelihood (B, T) of a (B, T + 1) window batch. The LM head runs on slices
        of positions, so the fp32 logits in memory stay near NLL_SLICE_BYTES whatever the vocabulary."""
        hidden = self(batch[:, :-1], expert_ids=expert_ids, head=False)
        targets = batch[:, 1:]
        B, T = targets.shape
        step = max(1, NLL_SLICE_BYTES // (4 * B * self.vocab_size))
        out = []
        for start in range(0, T, step):
            logits = self.lm_head(hidden[:, start : start + step]).float()
            out.append(F.cross_entropy(logits.flatten(0, 1), targets[:, start : start + step].flatten(), reduction="none"))
        return torch.cat([o.view(B, -1) for o in out], dim=1)

    def moe_blocks(self) -> list[SparseMoE]:
        return [layer.block_sparse_moe for layer in self.model.layers if hasattr(layer, "block_sparse_moe")]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
