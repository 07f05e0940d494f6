"""The Hugging Face side of the format: Mixtral `config.json`, and loading an assembled folder back.

An assembled folder is self-contained: `config.json` gives the architecture, the index maps every
tensor to its shard, and `tokenizer.json` the vocabulary. Loading builds the model on the meta
device and assigns the tensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from modularforge.config import ModelConfig
from modularforge.errors import DataError
from modularforge.files import read_json
from modularforge.model.transformer import CausalLM
from modularforge.model.weights import build_model
from modularforge.safetensors_stream import read_tensors


def mixtral_config(cfg: ModelConfig, vocab_size: int, eos_id: int) -> dict:
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


def weight_map(model_dir: Path) -> dict[str, str]:
    index = Path(model_dir) / "model.safetensors.index.json"
    if index.exists():
        return read_json(index)["weight_map"]
    single = Path(model_dir) / "model.safetensors"
    if not single.exists():
        raise DataError(f"{model_dir} holds no model.safetensors(.index.json); is it an assembled model folder?")
    with safe_open(str(single), framework="pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def read_weights(model_dir: Path, names: Iterable[str] | None = None, mapped: bool = True) -> dict[str, torch.Tensor]:
    """The named tensors (default: all) of an assembled folder. `mapped` tensors are views of the
    memory-mapped files (pages load as they are touched); otherwise each is read into its own memory, which
    a caller that replaces the tensors (a new layout or dtype) needs, so that the old bytes do not stay
    resident beside the new ones."""
    files = weight_map(model_dir)
    by_file: dict[str, list[str]] = {}
    for name in files if names is None else names:
        by_file.setdefault(files[name], []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, in_file in by_file.items():
        if not mapped:
            tensors |= read_tensors(Path(model_dir) / file, in_file)
            continue
        try:
            with safe_open(str(Path(model_dir) / file), framework="pt") as f:
                tensors |= {n: f.get_tensor(n) for n in in_file}
        except Exception as e:
            raise DataError(f"cannot read {Path(model_dir) / file}: {e}") from None
    return tensors


def load_assembled(model_dir: Path, mapped: bool = True) -> tuple[CausalLM, dict]:
    """Load an assembled folder fully into memory (`read_weights`); returns (model, config.json dict)."""
    config = read_json(Path(model_dir) / "config.json")
    tensors = read_weights(model_dir, mapped=mapped)
    return build_model(model_config_from_hf(config), config["vocab_size"], moe=True, tensors=tensors), config
