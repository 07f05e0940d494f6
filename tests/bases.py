"""Tiny pretrained bases built from configs, for the tests that start a run from a base: a Hugging Face folder of a
random Llama-family or Qwen3 model made by transformers, with a byte-level BPE tokenizer, and the same model written
as a GGUF file in the storage types llama.cpp uses (gguf-py quantises what it can; K-quant blocks are written from
random bytes with finite scales, as a dequantiser reads any block)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from modularforge.data.tokenizer import train_tokenizer
from modularforge.config import TokenizerConfig


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}  # Llama 3.1's rope scaling


def tokenizer_folder(texts: list[str], out: Path, vocab_size: int = 400) -> Path:
    train_tokenizer(texts, TokenizerConfig(vocab_size=vocab_size, min_frequency=2), 64, out)
    return out


def hf_folder(out: Path, tokenizer_dir: Path, family: str = "llama", *, seed: int = 0, hidden: int = 64,
              intermediate: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int | None = None,
              tie: bool = False, rope_scaling: dict | None = None, context: int = 256, sharded: bool = False,
              vocab: int | None = None) -> Path:
    """A random dense model saved by transformers (safetensors), with our tokenizer's files beside it."""
    import transformers

    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    eos = tokenizer["added_tokens"][0]["id"]
    vocab = vocab or len(tokenizer["model"]["vocab"])
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context,
                  rms_norm_eps=1e-6, tie_word_embeddings=tie, bos_token_id=eos, eos_token_id=eos)
    if family == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=head_dim or 32, rope_theta=1_000_000.0)
    else:
        config = transformers.LlamaConfig(**common, head_dim=head_dim or hidden // heads, rope_theta=500_000.0,
                                          rope_scaling=rope_scaling)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms at 1 would hide a missing or misplaced norm
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out, max_shard_size="100KB" if sharded else "5GB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tokenizer_dir / name, out / name)
    return out


K_BLOCKS = {"Q4_K": (144, (0, 2)), "Q6_K": (210, (208,))}  # bytes per 256 values, offsets of its f16 scales


def gguf_file(folder: Path, out: Path, matrix_type: str = "Q8_0", embedding_type: str | None = None) -> Path:
    """`folder`'s model as a GGUF file (architecture llama or qwen3, as llama.cpp's converter writes it) with its
    matrices stored as `matrix_type` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) and norms as F32."""
    import gguf
    from safetensors.torch import load_file

    from modularforge.model.layers import permute_rotary

    config = json.loads((folder / "config.json").read_text())
    arch = "qwen3" if config["model_type"] == "qwen3" else "llama"
    tensors = load_file(folder / "model.safetensors")
    writer = gguf.GGUFWriter(out, arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = config["vocab_size"]
    by_id = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    special = {a["id"] for a in tokenizer["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(vocab)])
    writer.add_token_types([3 if i in special else 1 if i in by_id else 5 for i in range(vocab)])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_add_bos_token(False)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type") == "llama3":  # llama.cpp's converter writes the scaling as per-frequency factors
        from modularforge.config import ModelConfig
        from modularforge.export import rope_factors

        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        cfg = ModelConfig(hidden_size=config["hidden_size"], num_heads=config["num_attention_heads"],
                          head_size=config["head_dim"], rope_theta=rope["rope_theta"], rope_scaling=scaling)
        writer.add_tensor("rope_freqs.weight", rope_factors(cfg))
    rng = np.random.default_rng(0)
    for name, tensor in sorted(tensors.items()):
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            target = f"blk.{i}.{layer[rest.removesuffix('.weight')]}.weight"
            if arch == "llama" and rest.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                heads = config["num_attention_heads"] if "q_proj" in rest else config["num_key_value_heads"]
                tensor = permute_rotary(tensor, heads)
        else:
            target = names[name]
        data = tensor.float().numpy()
        kind = embedding_type if name == "model.embed_tokens.weight" and embedding_type else matrix_type
        if data.ndim == 1 or kind == "F32":
            writer.add_tensor(target, data)
            continue
        qtype = gguf.GGMLQuantizationType[kind]
        if kind in K_BLOCKS:  # gguf-py reads K-quants but cannot write them: random blocks with finite scales
            size, scales = K_BLOCKS[kind]
            blocks = rng.integers(0, 256, size=(data.shape[0], data.shape[1] // 256, size), dtype=np.uint8)
            for offset in scales:
                blocks[..., offset : offset + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
            raw = blocks.reshape(data.shape[0], -1)
        else:
            raw = gguf.quants.quantize(np.ascontiguousarray(data), qtype)
        writer.add_tensor(target, raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def base_sections(base: Path, name: str = "base", **sections) -> dict:
    """Config sections (for `make_config`) of a tiny run that starts from `base`, its experts 3 steps long."""
    experts = {"stats_tokens": 512, "select_tokens": 512, **sections.pop("experts", {})}
    budget = {"shared_fraction": "auto", "expert_tokens": 3 * 8 * 32, **sections.pop("budget", {})}
    return {"run": {"name": name}, "model": {"base": str(base)}, "budget": budget, "experts": experts, **sections}
