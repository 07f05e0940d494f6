"""The Hugging Face side of the format: Mixtral `config.json`, written by assembly and read back.

An assembled folder is self-contained: `config.json` gives the architecture, the index maps every
tensor to its shard, and `tokenizer.json` the vocabulary. `modularforge.inference` reads such folders.
"""

from __future__ import annotations

from modularforge.config import ModelConfig
from modularforge.errors import DataError


def mixtral_config(cfg: ModelConfig, vocab_size: int, eos_id: int, expert_names: list[str] | None = None) -> dict:
    """config.json of an assembled model; `expert_names` (one per expert, in order) is kept as an extra key, which
    transformers carries along unread."""
    names = {"expert_names": expert_names} if expert_names is not None else {}
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.0,
        "router_jitter_noise": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
        **names,
    }


def model_config_from_hf(config: dict) -> ModelConfig:
    if config.get("model_type") != "mixtral":
        raise DataError(f"expected a mixtral config.json, found model_type={config.get('model_type')!r}")
    return ModelConfig(
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        max_seq_len=config["max_position_embeddings"],
        num_experts=config["num_local_experts"],
        top_k=config["num_experts_per_tok"],
        rope_theta=config.get("rope_theta") or config["rope_parameters"]["rope_theta"],
        norm_eps=config["rms_norm_eps"],
        tie_embeddings=config.get("tie_word_embeddings", False),
        init_std=config.get("initializer_range", 0.02),
    )
