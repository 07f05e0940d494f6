"""Opening an assembled model under a memory bound (DESIGN.md section 8).

With `expert_cache=N`, everything but the experts is loaded, and each MoE block gets a lazy list of
experts backed by one LRU cache of at most N expert FFNs (one FFN = one expert in one layer). A miss
reads that FFN's three matrices from the expert's shard into their own memory (no mapping of the shard
stays behind). Logits are the same as with the model fully loaded.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from modularforge.files import read_json
from modularforge.model.hf import load_assembled, model_config_from_hf, read_weights, weight_map
from modularforge.model.layers import Attention, SwiGLU
from modularforge.model.transformer import CausalLM
from modularforge.model.weights import FFN_WEIGHTS, build_model, expert_key, ffn_from_weights
from modularforge.safetensors_stream import read_tensors


class ExpertCache:
    """LRU cache of expert FFNs read on demand from an assembled folder."""

    def __init__(self, model_dir: Path, capacity: int, files: dict[str, str], decode_dtype: str | None = None):
        self.model_dir, self.capacity, self.files = Path(model_dir), capacity, files
        self.decode_dtype = decode_dtype
        self.cache: OrderedDict[tuple[int, int], SwiGLU] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, layer: int, expert: int) -> SwiGLU:
        key = (layer, expert)
        if key in self.cache:
            self.hits += 1
            self.cache.move_to_end(key)
            return self.cache[key]
        self.misses += 1
        names = {w: expert_key(layer, expert, w) for w in FFN_WEIGHTS}
        tensors = read_tensors(self.model_dir / self.files[names["w1"]], names.values())
        ffn = ffn_from_weights({w: tensors[n] for w, n in names.items()})
        if self.decode_dtype is not None:
            ffn = for_decoding(ffn, self.decode_dtype)
        self.cache[key] = ffn
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return ffn


class LazyExperts:
    """Stands in for a block's `nn.ModuleList` of experts: indexing loads through the cache."""

    def __init__(self, cache: ExpertCache, layer: int, count: int):
        self.cache, self.layer, self.count = cache, layer, count

    def __getitem__(self, expert: int) -> SwiGLU:
        return self.cache.get(self.layer, expert)

    def __len__(self) -> int:
        return self.count


def for_decoding(module: nn.Module, dtype: str) -> nn.Module:
    """Lay the weights out for token-by-token generation, where each step is matrix-vector products.

    float32: each linear weight is stored transposed in memory, still seen as (out, in), so the product
    reads a contiguous (in, out) matrix, which CPU BLAS does about 1.4x faster than the (out, in) one
    (benchmarks/speed.py); logits agree to float rounding. Weights tied to an embedding keep their layout,
    since the embedding reads rows. float16: every weight in half precision, left (out, in), the layout
    its kernels are fast on; another ~1.5x, with logits within ~1e-3 of float32.
    Both: q|k|v and gate|up are each stored as one matrix (`qkv_weight`, `w13_weight`, used by
    `decode.decode_step`), the separate projections' weights becoming views of it, so memory is not doubled."""
    transposed = dtype == "float32"
    if dtype == "float16":
        module.half()
    for m in module.modules():
        if isinstance(m, Attention):
            m.qkv_weight = _fused([m.q_proj, m.k_proj, m.v_proj], transposed)
        elif isinstance(m, SwiGLU):
            m.w13_weight = _fused([m.w1, m.w3], transposed)
    if transposed:
        tied = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
        for m in module.modules():
            if isinstance(m, nn.Linear) and id(m.weight) not in tied and m.weight.is_contiguous():
                m.weight = nn.Parameter(m.weight.detach().t().contiguous().t(), requires_grad=False)
    if isinstance(module, CausalLM):
        module.decode_dtype = dtype
    return module


def _fused(linears: list[nn.Linear], transposed: bool) -> torch.Tensor:
    """One (sum of outs, in) weight for several linears over the same input; each linear's weight becomes a
    view of its rows. Stored input-major when `transposed`."""
    weights = [linear.weight.detach() for linear in linears]
    fused = torch.cat([w.t() for w in weights], dim=1).t() if transposed else torch.cat(weights, dim=0)
    start = 0
    for linear, w in zip(linears, weights):
        linear.weight = nn.Parameter(fused[start : start + w.shape[0]], requires_grad=False)
        start += w.shape[0]
    return fused


def open_model(model_dir: Path, expert_cache: int | None = None, decode_dtype: str | None = None) -> CausalLM:
    """The assembled model, fully loaded, or with at most `expert_cache` expert FFNs in memory.
    `decode_dtype` (float32 or float16) lays it out for generation (`for_decoding`)."""
    if expert_cache is None:
        model = load_assembled(model_dir, mapped=decode_dtype is None)[0]
        return model if decode_dtype is None else for_decoding(model, decode_dtype)
    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json")
    cfg = model_config_from_hf(config)
    files = weight_map(model_dir)
    is_expert = {expert_key(i, e, w) for i in range(cfg.num_layers) for e in range(cfg.num_experts) for w in FFN_WEIGHTS}
    tensors = read_weights(model_dir, [n for n in files if n not in is_expert], mapped=decode_dtype is None)
    cache = ExpertCache(model_dir, expert_cache, files, decode_dtype)

    def lazy(model: CausalLM) -> None:
        for i, block in enumerate(model.moe_blocks()):
            del block.experts
            block.experts = LazyExperts(cache, i, cfg.num_experts)

    model = build_model(cfg, config["vocab_size"], moe=True, tensors=tensors, customize=lazy)
    model.expert_cache = cache
    return (model if decode_dtype is None else for_decoding(model, decode_dtype)).eval()
