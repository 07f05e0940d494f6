"""The Hugging Face side of the format: the exported MoE's `config.json` and tensor names, written by assembly and
read back, and the shape of a dense Hugging Face model a run starts from.

Two exported families (DESIGN.md section 1): `mixtral` for the Llama family, whose names are ours (export is a
copy), and `qwen3_moe` for Qwen3, whose MoE tensors are named by the table `QWEN3_MOE_NAMES`. An assembled folder
is self-contained: `config.json` gives the architecture, the index maps every tensor to its shard, and
`tokenizer.json` the vocabulary. `modularforge.inference` reads such folders.
"""

from __future__ import annotations

import re

from modularforge.config import ModelConfig, RopeScaling
from modularforge.errors import DataError

ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}

# ours -> Qwen3-MoE's, for the tensors whose names differ (after `model.layers.{i}.`; {e} is an expert's number)
QWEN3_MOE_NAMES = (
    ("block_sparse_moe.gate.weight", "mlp.gate.weight"),
    ("block_sparse_moe.experts.{e}.w1.weight", "mlp.experts.{e}.gate_proj.weight"),
    ("block_sparse_moe.experts.{e}.w3.weight", "mlp.experts.{e}.up_proj.weight"),
    ("block_sparse_moe.experts.{e}.w2.weight", "mlp.experts.{e}.down_proj.weight"),
)


def _translate(name: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """Rename a layer tensor by the first (from, to) pair whose `from` it matches; others keep their name."""
    match = re.fullmatch(r"(model\.layers\.\d+\.)(.+)", name)
    if match is None:
        return name
    for source, target in pairs:
        found = re.fullmatch(re.escape(source).replace(r"\{e\}", r"(?P<e>\d+)"), match[2])
        if found:
            return match[1] + target.format(**found.groupdict())
    return name


def hf_name(name: str, architecture: str) -> str:
    """Our tensor name -> its name in an exported folder of `architecture`."""
    return _translate(name, QWEN3_MOE_NAMES) if architecture == "qwen3_moe" else name


def our_name(name: str, architecture: str) -> str:
    """A tensor name in an exported folder of `architecture` -> ours (inverse of `hf_name`)."""
    if architecture != "qwen3_moe":
        return name
    return _translate(name, tuple((hf, ours) for ours, hf in QWEN3_MOE_NAMES))


def rope_parameters(cfg: ModelConfig) -> dict:
    """transformers' `rope_parameters` of the model (Llama 3.x scaling included)."""
    scaling = cfg.rope_scaling.model_dump() if cfg.rope_scaling is not None else {"rope_type": "default"}
    return {**scaling, "rope_theta": cfg.rope_theta}


def hf_config(cfg: ModelConfig, vocab_size: int, eos_id: int, bos_id: int | None = None,
              expert_names: list[str] | None = None) -> dict:
    """config.json of an assembled model, Mixtral or Qwen3-MoE as `cfg.architecture` says, with every shape and
    rope parameter written out (neither family's defaults are the base's). `expert_names` (one per expert, in
    order) is kept as an extra key, which transformers carries along unread."""
    names = {"expert_names": expert_names} if expert_names is not None else {}
    bos = eos_id if bos_id is None else bos_id
    common = {
        "architectures": [ARCHITECTURES[cfg.architecture]],
        "model_type": cfg.architecture,
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.declared_context,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope_parameters(cfg),
        **({"rope_scaling": cfg.rope_scaling.model_dump()} if cfg.rope_scaling is not None else {}),
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_experts_per_tok": cfg.top_k,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    if cfg.architecture == "qwen3_moe":
        family = {"num_experts": cfg.num_experts, "moe_intermediate_size": cfg.intermediate_size,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "attention_bias": False,
                  "use_sliding_window": False, "max_window_layers": cfg.num_layers}
    else:
        family = {"num_local_experts": cfg.num_experts, "router_jitter_noise": 0.0}
    return {**common, **family, **names}


def shape_from_hf(config: dict) -> dict:
    """The ModelConfig shape keys of a Hugging Face config.json (dense or MoE, Llama family or Qwen3): layers,
    widths, heads, head width, rope parameters, norm epsilon, tied embeddings, context."""
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = config.get("rope_theta") or rope.get("rope_theta") or 10_000.0
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    shape = {
        "hidden_size": hidden,
        "intermediate_size": config.get("moe_intermediate_size") or config["intermediate_size"],
        "num_layers": config["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": config.get("num_key_value_heads") or heads,
        "head_size": None if head_dim * heads == hidden else head_dim,
        "rope_theta": float(theta),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "context_length": config["max_position_embeddings"],
    }
    if rope_type == "llama3":
        source = {**scaling, **rope}
        shape["rope_scaling"] = {key: source[key] for key in RopeScaling.model_fields if key in source}
    elif rope_type != "default":
        raise DataError(f"rope scaling of type {rope_type!r} is not supported (supported: none, llama3)")
    else:
        shape["rope_scaling"] = None
    return shape


def model_config_from_hf(config: dict) -> ModelConfig:
    """The ModelConfig of an assembled folder's config.json (Mixtral or Qwen3-MoE)."""
    architecture = config.get("model_type")
    if architecture not in ARCHITECTURES:
        raise DataError(f"expected a mixtral or qwen3_moe config.json, found model_type={architecture!r}")
    shape = shape_from_hf(config)
    context = shape.pop("context_length")
    return ModelConfig(
        architecture=architecture,
        **shape,
        max_seq_len=context,
        num_experts=config["num_local_experts"] if architecture == "mixtral" else config["num_experts"],
        top_k=config["num_experts_per_tok"],
        init_std=config.get("initializer_range", 0.02),
    )
