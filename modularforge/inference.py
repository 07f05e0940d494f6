"""The one reader of an assembled model folder (DESIGN.md section 8): calibrate, evaluate, generate and export
open folders only through it.

`AssembledFolder` checks a folder before any weight is read: config.json a Mixtral or Qwen3-MoE config of ours, the index
(or the single model.safetensors), every shard present with a readable header that holds what the index says,
and every tensor the config implies at its shape, with no other. It keeps the header table and reads single
tensors and experts on demand.

`open_model` builds the model from it, fully loaded, or with `expert_cache=N` everything but the experts:
each MoE block's experts then come from its `expert_source`, one LRU cache of at most N expert FFNs (one FFN =
one expert in one layer). A miss reads that FFN's three matrices from the expert's shard into their own
memory (no mapping of the shard stays behind). Logits are the same as with the model fully loaded.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from modularforge.errors import DataError
from modularforge.files import read_json
from modularforge.model.hf import model_config_from_hf, our_name
from modularforge.model.layers import Attention, SwiGLU
from modularforge.model.transformer import CausalLM
from modularforge.model.weights import (
    FFN_WEIGHTS, build_model, dense_shapes, expert_key, ffn_from_weights, ffn_to_expert, gate_key, is_ffn,
)
from modularforge.schemas import ModelConfigFile, TokenizerFile, WeightIndex
from modularforge.safetensors_stream import TensorInfo, read_header, read_tensors

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"


class AssembledFolder:
    """An assembled folder, checked and read as far as its headers; a folder that is not one is a DataError."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise DataError(f"{self.dir} is not a folder; give an assembled model folder (runs/<name>/model)")
        if not (self.dir / "config.json").is_file():
            raise DataError(f"{self.dir} has no config.json; is it an assembled model folder (runs/<name>/model)?")
        self.config = _read_config(self.dir / "config.json")
        self.cfg = model_config_from_hf(self.config)
        # our tensor name -> its name in the folder (Qwen3-MoE names its MoE tensors its own way), and -> its shard
        stored_files = self._weight_map()
        self.stored = {our_name(name, self.cfg.architecture): name for name in stored_files}
        self.files = {ours: stored_files[name] for ours, name in self.stored.items()}
        ours_of = {name: ours for ours, name in self.stored.items()}
        self.table: dict[str, TensorInfo] = {}
        for file in sorted(set(self.files.values())):
            self.table |= {ours_of.get(name, name): info for name, info in read_header(self.dir / file)[0].items()}
        self._check_tensors()

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: info.shape for name, info in self.table.items()}

    @cached_property
    def tokenizer(self) -> dict:
        """tokenizer.json as a dict."""
        path = self.dir / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{self.dir} has no tokenizer.json; is it an assembled model folder?")
        return read_json(path, TokenizerFile)

    def _weight_map(self) -> dict[str, str]:
        if (self.dir / INDEX).exists():
            return read_json(self.dir / INDEX, WeightIndex)["weight_map"]
        if not (self.dir / SINGLE).exists():
            raise DataError(f"{self.dir} holds no {SINGLE}(.index.json); is it an assembled model folder?")
        return {name: SINGLE for name in read_header(self.dir / SINGLE)[0]}

    def _check_tensors(self) -> None:
        expected = expected_shapes(self.config)
        for name, shape in expected.items():
            if name not in self.files:
                raise DataError(f"{self.dir} lacks tensor {name}; is it a complete assembled model folder?")
            if name not in self.table:
                raise DataError(f"{self.dir / self.files[name]} does not hold {name} although the index says it does")
            if self.table[name].shape != shape:
                raise DataError(f"{self.dir}: {name} has shape {list(self.table[name].shape)}, config.json implies "
                                f"{list(shape)}")
        unexpected = sorted(set(self.files) - set(expected))
        if unexpected:  # a model built from the folder would drop them, exporting them would change the model
            raise DataError(f"{self.dir} holds tensors a model of its config.json has no place for: "
                            f"{', '.join(unexpected[:3])}")

    def read(self, name: str) -> torch.Tensor:
        """One tensor, as stored; the shard is opened only while it is read."""
        path = self.dir / self.files[name]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(self.stored[name])
        except Exception as e:  # safetensors raises several types for a damaged header or body
            raise DataError(f"cannot read {name} from {path}: {e}") from None

    def read_many(self, names: Iterable[str] | None = None, mapped: bool = True) -> dict[str, torch.Tensor]:
        """The named tensors (default: all). `mapped` tensors are views of the memory-mapped files (pages load
        as they are touched); otherwise each is read into its own memory, which a caller that replaces the
        tensors (a new layout or dtype) needs, so that the old bytes do not stay resident beside the new ones."""
        by_file: dict[str, list[str]] = {}
        for name in self.files if names is None else names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file, in_file in by_file.items():
            if not mapped:
                stored = read_tensors(self.dir / file, [self.stored[n] for n in in_file])
                tensors |= {n: stored[self.stored[n]] for n in in_file}
                continue
            try:
                with safe_open(str(self.dir / file), framework="pt") as f:
                    tensors |= {n: f.get_tensor(self.stored[n]) for n in in_file}
            except Exception as e:
                raise DataError(f"cannot read {self.dir / file}: {e}") from None
        return tensors

    def expert(self, layer: int, expert: int) -> SwiGLU:
        """One expert's FFN in one layer, its three matrices read into their own memory."""
        names = {w: self.stored[expert_key(layer, expert, w)] for w in FFN_WEIGHTS}
        tensors = read_tensors(self.dir / self.files[expert_key(layer, expert, "w1")], names.values())
        return ffn_from_weights({w: tensors[n] for w, n in names.items()})


def _read_config(path: Path) -> dict:
    config = read_json(path, ModelConfigFile)
    try:
        model_config_from_hf(config)
        missing = [key for key in ("vocab_size", "eos_token_id") if key not in config]
        if missing:
            raise KeyError(missing[0])
    except (KeyError, ValueError, TypeError) as e:  # a missing key, or a value our model config rejects
        raise DataError(f"{path} is not a ModularForge Mixtral or Qwen3-MoE config ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]})") from None
    return config


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor an assembled Mixtral folder must hold, with its shape: the dense model's, each FFN
    repeated for every expert, and a router per layer."""
    cfg = model_config_from_hf(config)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in dense_shapes(cfg, config["vocab_size"]).items():
        if is_ffn(name):
            shapes |= {ffn_to_expert(name, e): shape for e in range(cfg.num_experts)}
        else:
            shapes[name] = shape
    return shapes | {gate_key(i): (cfg.num_experts, cfg.hidden_size) for i in range(cfg.num_layers)}


class ExpertCache:
    """LRU cache of expert FFNs read on demand from an assembled folder."""

    def __init__(self, folder: AssembledFolder, capacity: int, decode_dtype: str | None = None,
                 device: torch.device | str = "cpu"):
        self.folder, self.capacity, self.decode_dtype, self.device = folder, capacity, decode_dtype, device
        self.cache: OrderedDict[tuple[int, int], SwiGLU] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, layer: int, expert: int) -> SwiGLU:
        key = (layer, expert)
        if key in self.cache:
            self.hits += 1
            self.cache.move_to_end(key)
            return self.cache[key]
        self.misses += 1
        ffn = self.folder.expert(layer, expert).to(self.device)  # read on the CPU, kept where the model computes
        if self.decode_dtype is not None:
            ffn = for_decoding(ffn, self.decode_dtype)
        self.cache[key] = ffn
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return ffn


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


def open_model(model_dir: Path | AssembledFolder, expert_cache: int | None = None,
               decode_dtype: str | None = None, device: torch.device | str = "cpu") -> CausalLM:
    """The assembled model on `device`, fully loaded, or with at most `expert_cache` expert FFNs in memory (of that
    device: the others stay on disk). `decode_dtype` (float32 or float16) lays it out for generation
    (`for_decoding`)."""
    folder = model_dir if isinstance(model_dir, AssembledFolder) else AssembledFolder(model_dir)
    cfg = folder.cfg
    if expert_cache is None:
        model = build_model(cfg, folder.vocab_size, moe=True, tensors=folder.read_many(mapped=decode_dtype is None),
                            device=device)
        # no reference to the loaded tensors may outlive build_model: for_decoding re-lays every weight, and the
        # originals must be freed as it goes, or the model exists twice at the peak
        return model if decode_dtype is None else for_decoding(model, decode_dtype)
    is_expert = {expert_key(i, e, w) for i in range(cfg.num_layers) for e in range(cfg.num_experts) for w in FFN_WEIGHTS}
    tensors = folder.read_many([n for n in folder.files if n not in is_expert], mapped=decode_dtype is None)
    cache = ExpertCache(folder, expert_cache, decode_dtype, device)

    def lazy(model: CausalLM) -> None:
        for i, block in enumerate(model.moe_blocks()):
            block.experts = nn.ModuleList()
            block.expert_source = functools.partial(cache.get, i)

    model = build_model(cfg, folder.vocab_size, moe=True, tensors=tensors, customize=lazy, device=device)
    del tensors  # as above: for_decoding must be able to free each original weight
    model.expert_cache = cache
    return (model if decode_dtype is None else for_decoding(model, decode_dtype)).eval()
