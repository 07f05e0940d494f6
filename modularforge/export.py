"""Export an assembled model to GGUF, the file format llama.cpp runs.

Follows the conventions of llama.cpp's own converter (`convert_hf_to_gguf.py`, class `LlamaModel`,
which also converts Mixtral) and the key and tensor names of its `gguf` Python package:

- architecture `llama` (a Qwen3-MoE folder: `qwen3moe`, with `attn_q_norm` / `attn_k_norm` and
  `expert_feed_forward_length`) with `expert_count` / `expert_used_count`; the experts of each layer are
  stacked into `blk.N.ffn_{gate,up,down}_exps.weight` ([E, I, H], [E, I, H], [E, H, I] in numpy
  order), the router is `blk.N.ffn_gate_inp.weight` and stays f32;
- for `llama`, q_proj / k_proj rows are permuted per head from the Hugging Face `rotate_half` layout to the
  interleaved pairs that llama.cpp's `llama` RoPE rotates (`qwen3moe` rotates Hugging Face's halves itself);
  Llama 3.x's rope scaling is the `rope_freqs` tensor of per-frequency factors;
- 1-D tensors (norms) stay f32; q8_0 falls back to f16 for a matrix whose rows are not a multiple
  of the 32-value block;
- the tokenizer is a `gpt2` (byte-level BPE) vocabulary with its merges, token types, BOS/EOS/PAD
  and no automatic BOS, under the pre-tokenizer name llama.cpp maps to GPT-2's regex; a base's tokenizer
  under the names its `llama_cpp.json` gives (which prepare wrote where llama.cpp has a name for it).

The folder is read through `inference.AssembledFolder`, which checks it first. Memory stays bounded:
headers are read first to plan every tensor, the GGUF header is written, and
then tensor data is streamed in file order, one tensor (one layer's experts for a stacked tensor)
at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modularforge.errors import ConfigError, DataError, ModularForgeError
from modularforge.data.tokenizer import LLAMA_CPP_TOKENIZER, PRE_TOKENIZER_NAME
from modularforge.files import atomic_path, read_json
from modularforge.schemas import LlamaCppTokenizer
from modularforge.inference import AssembledFolder
from modularforge.model.layers import permute_rotary, rotary_frequencies
from modularforge.model.weights import expert_key

log = logging.getLogger(__name__)

FORMATS = ("gguf",)
DTYPES = ("f32", "f16", "q8_0")


# Hugging Face Mixtral name (per layer, after `model.layers.{i}.`) -> gguf tensor kind.
LAYER_TENSORS = {
    "input_layernorm.weight": "ATTN_NORM",
    "self_attn.q_proj.weight": "ATTN_Q",
    "self_attn.k_proj.weight": "ATTN_K",
    "self_attn.v_proj.weight": "ATTN_V",
    "self_attn.o_proj.weight": "ATTN_OUT",
    "self_attn.q_norm.weight": "ATTN_Q_NORM",
    "self_attn.k_norm.weight": "ATTN_K_NORM",
    "post_attention_layernorm.weight": "FFN_NORM",
    "block_sparse_moe.gate.weight": "FFN_GATE_INP",
}
EXPERT_TENSORS = {"w1": "FFN_GATE_EXP", "w3": "FFN_UP_EXP", "w2": "FFN_DOWN_EXP"}
GLOBAL_TENSORS = {"model.embed_tokens.weight": "TOKEN_EMBD", "model.norm.weight": "OUTPUT_NORM", "lm_head.weight": "OUTPUT"}
GGUF_ARCHITECTURES = {"mixtral": "LLAMA", "qwen3_moe": "QWEN3MOE"}  # exported family -> gguf.MODEL_ARCH


@dataclass
class Planned:
    """One GGUF tensor: its name, numpy-order shape, storage type and a function producing its float32 data."""

    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]


def export(model_dir: Path, fmt: str, out: Path | None, dtype: str) -> Path:
    """Write `model_dir` (an assembled Mixtral folder) as GGUF; returns the written file.

    Default output: `<model_dir>/../model.<dtype>.gguf`.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'; supported: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown GGUF dtype '{dtype}'; supported: {', '.join(DTYPES)}")
    gguf = _import_gguf()
    model_dir = Path(model_dir)
    model = AssembledFolder(model_dir)
    tokenizer_names(model)
    out = Path(out) if out is not None else model_dir.resolve().parent / f"model.{dtype}.gguf"
    plan = tensor_plan(model, dtype, gguf)
    with atomic_path(out) as tmp:
        write_gguf(tmp, model, plan, dtype, gguf)
    log.info("wrote %s (%d tensors, %s)", out, len(plan), dtype)
    return out


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ModularForgeError("GGUF export needs the `gguf` package: pip install 'modularforge[gguf]'") from None
    return gguf


def tokenizer_names(model: AssembledFolder) -> dict:
    """llama.cpp's names of the folder's tokenizer: a base's from its `llama_cpp.json`, else ours (byte-level BPE with
    GPT-2's regex), checked; a tokenizer llama.cpp has no name for is a DataError."""
    written = model.dir / LLAMA_CPP_TOKENIZER
    if written.is_file():
        return {"add_bos_token": False, **read_json(written, LlamaCppTokenizer)}
    tok = model.tokenizer
    pre = tok.get("pre_tokenizer") or {}
    if tok.get("model", {}).get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise DataError(
            f"{model.dir / 'tokenizer.json'} is not a byte-level BPE tokenizer with a pre-tokenizer llama.cpp names "
            "(GPT-2's, SmolLM's, Llama 3's, Qwen's); GGUF export supports those, and llama.cpp's own "
            "convert_hf_to_gguf.py converts the folder otherwise"
        )
    return {"model": "gpt2", "pre": PRE_TOKENIZER_NAME, "add_bos_token": False}


def storage_type(gguf, kind: str, shape: tuple[int, ...], dtype: str):
    """GGML type of one tensor: f32 for vectors and the router, else the requested type (q8_0 needs whole blocks)."""
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or kind == "FFN_GATE_INP" or dtype == "f32":
        return Q.F32
    if dtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16


def tensor_plan(model: AssembledFolder, dtype: str, gguf) -> list[Planned]:
    """Every GGUF tensor in file order, planned from headers alone (no tensor data is read here)."""
    cfg = model.cfg

    def planned(kind: str, shape: tuple[int, ...], load: Callable[[], torch.Tensor], bid: int | None = None) -> Planned:
        name = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)].format(bid=bid) + ".weight"
        return Planned(name, shape, storage_type(gguf, kind, shape, dtype), lambda: load().numpy())

    def whole(hf_name: str) -> Planned:
        return planned(GLOBAL_TENSORS[hf_name], model.shapes[hf_name], lambda: model.read(hf_name).float())

    plan = [whole("model.embed_tokens.weight")]
    if cfg.rope_scaling is not None:  # llama.cpp's converter writes Llama 3.x's scaling as per-frequency factors
        plan.append(Planned(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", (cfg.head_dim // 2,),
                            gguf.GGMLQuantizationType.F32, lambda: rope_factors(cfg)))
    for i in range(cfg.num_layers):
        for suffix, kind in LAYER_TENSORS.items():
            hf_name = f"model.layers.{i}.{suffix}"
            if hf_name not in model.shapes:  # q/k norms: Qwen3 only
                continue
            load = _loader(model, hf_name, _rotary_heads(suffix, cfg))
            plan.append(planned(kind, model.shapes[hf_name], load, i))
        for w, kind in EXPERT_TENSORS.items():
            names = [expert_key(i, e, w) for e in range(cfg.num_experts)]
            shape = (cfg.num_experts, *model.shapes[names[0]])
            plan.append(planned(kind, shape, lambda names=names: torch.stack([model.read(n).float() for n in names]), i))
    plan.append(whole("model.norm.weight"))
    if not cfg.tie_embeddings:  # llama.cpp reuses token_embd when `output` is absent
        plan.append(whole("lm_head.weight"))
    return plan


def rope_factors(cfg) -> np.ndarray:
    """Llama 3.x's rope scaling as llama.cpp's `rope_freqs`: each frequency's unscaled / scaled ratio."""
    plain = rotary_frequencies(cfg.model_copy(update={"rope_scaling": None}))
    return (plain / rotary_frequencies(cfg)).numpy().astype(np.float32)


def _rotary_heads(suffix: str, cfg) -> int | None:
    if cfg.architecture != "mixtral":  # only llama.cpp's `llama` rotary embedding pairs interleaved dimensions
        return None
    return {"self_attn.q_proj.weight": cfg.num_heads, "self_attn.k_proj.weight": cfg.kv_heads}.get(suffix)


def _loader(model: AssembledFolder, name: str, rotary_heads: int | None) -> Callable[[], torch.Tensor]:
    if rotary_heads is None:
        return lambda: model.read(name).float()
    return lambda: permute_rotary(model.read(name).float(), rotary_heads)


def encode(data: np.ndarray, qtype, gguf) -> np.ndarray:
    """float32 data -> the bytes (as an array) GGUF stores for `qtype`."""
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def stored_nbytes(shape: tuple[int, ...], qtype, gguf) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_size


def write_gguf(path: Path, model: AssembledFolder, plan: list[Planned], dtype: str, gguf) -> None:
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCHITECTURES[model.cfg.architecture])
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    add_hyperparameters(writer, model, dtype, gguf)
    add_tokenizer(writer, model, gguf)
    for t in plan:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), stored_nbytes(t.shape, t.qtype, gguf), raw_dtype=t.qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for t in plan:
            data = t.load()
            assert data.shape == t.shape, (t.name, data.shape, t.shape)
            writer.write_tensor_data(encode(data, t.qtype, gguf))
            del data
    finally:
        writer.close()


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def add_hyperparameters(writer, model: AssembledFolder, dtype: str, gguf) -> None:
    cfg = model.cfg
    writer.add_name(model.dir.resolve().parent.name or "modularforge")
    writer.add_vocab_size(model.config["vocab_size"])
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    if cfg.architecture == "qwen3_moe":
        writer.add_expert_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_expert_count(cfg.num_experts)
    writer.add_expert_used_count(cfg.top_k)
    if model.config.get("expert_names"):  # llama.cpp ignores keys it does not know; the names travel with the file
        writer.add_array("modularforge.expert_names", list(model.config["expert_names"]))
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def vocabulary(tokenizer: dict, vocab_size: int, gguf) -> tuple[list[str], list[int]]:
    """Tokens by id and their types: special added tokens CONTROL, other added tokens USER_DEFINED;
    ids the tokenizer does not use (when the embedding is larger) are UNUSED placeholders, as llama.cpp's
    converter writes them."""
    T = gguf.TokenType
    by_id: dict[int, tuple[str, int]] = {i: (tok, T.NORMAL) for tok, i in tokenizer["model"]["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], T.CONTROL if added.get("special") else T.USER_DEFINED)
    if by_id and max(by_id) >= vocab_size:
        raise DataError(f"tokenizer.json has token id {max(by_id)} but config.json says vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        token, kind = by_id.get(i, (f"[PAD{i}]", T.UNUSED))
        tokens.append(token)
        types.append(int(kind))
    return tokens, types


def merges(tokenizer: dict) -> list[str]:
    """BPE merges as 'left right' strings (tokenizer.json stores pairs, or such strings in older files)."""
    return [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"].get("merges", [])]


def add_tokenizer(writer, model: AssembledFolder, gguf) -> None:
    tokens, types = vocabulary(model.tokenizer, model.config["vocab_size"], gguf)
    names = tokenizer_names(model)
    writer.add_tokenizer_model(names["model"])
    writer.add_tokenizer_pre(names["pre"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges(model.tokenizer))
    eos = model.config["eos_token_id"]
    writer.add_bos_token_id(model.config.get("bos_token_id", eos))
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(model.config.get("pad_token_id", eos))
    # our tokenizer adds nothing when encoding, so llama.cpp must not add BOS either; a base's does as it did
    writer.add_add_bos_token(bool(names["add_bos_token"]))
    writer.add_add_eos_token(False)
