"""A pretrained dense model a run starts from (`model.base`, DESIGN.md section 9): its shape, its tokenizer and its
weights under our names.

A base is a local Hugging Face folder (config.json + model.safetensors or sharded safetensors with their index), a
GGUF file (llama.cpp's format, dequantised to float32 on read by the `gguf` package), or a hub id, fetched into the
Hugging Face cache where the network allows it. Nothing executes code from a base: config.json (or the GGUF
metadata) gives the shape, tensors are read one at a time and renamed by the tables below, as transformers'
`conversion_mapping` and mergekit's architecture files do; a tensor the tables do not name is an error.

Families: the Llama family (`llama`, which SmolLM, TinyLlama and Llama 2/3.x are, and `mistral` without a sliding
window), exported as Mixtral, and `qwen3` (q/k norms), exported as Qwen3-MoE. Anything else is refused before
anything is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from modularforge import schemas
from modularforge.config import Config, config_from_dict
from modularforge.data.tokenizer import LLAMA_CPP_TOKENIZER, TOKENIZER_FILES
from modularforge.errors import DataError, ModularForgeError
from modularforge.files import atomic_dir, read_json, write_json
from modularforge.model.hf import shape_from_hf

if TYPE_CHECKING:  # torch is imported where tensors are read: resolving a run's config needs only metadata
    import torch

log = logging.getLogger(__name__)

SUPPORTED = ("Hugging Face model_type llama (Llama 2/3.x, SmolLM, TinyLlama), mistral without a sliding window, "
             "or qwen3; GGUF architecture llama or qwen3")
HF_FAMILIES = {"llama": "mixtral", "mistral": "mixtral", "qwen3": "qwen3_moe"}  # model_type -> exported family
GGUF_FAMILIES = {"llama": "mixtral", "qwen3": "qwen3_moe"}  # general.architecture (Mistral GGUFs say llama)

# Hugging Face dense names (after `model.layers.{i}.`) -> ours; the others (embeddings, final norm, head) are ours
HF_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.q_proj.weight": "self_attn.q_proj.weight",
    "self_attn.k_proj.weight": "self_attn.k_proj.weight",
    "self_attn.v_proj.weight": "self_attn.v_proj.weight",
    "self_attn.o_proj.weight": "self_attn.o_proj.weight",
    "self_attn.q_norm.weight": "self_attn.q_norm.weight",
    "self_attn.k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.w1.weight",
    "mlp.up_proj.weight": "mlp.w3.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
}
HF_GLOBAL_NAMES = {name: name for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # a buffer older files saved

# GGUF names (llama.cpp's `gguf` package: after `blk.{i}.`) -> ours
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.w1.weight",
    "ffn_up.weight": "mlp.w3.weight",
    "ffn_down.weight": "mlp.w2.weight",
}
GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                     "output.weight": "lm_head.weight"}
GGUF_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.x's frequency factors: checked against the shape, not loaded
# Llama 3.x's rope scaling, which llama.cpp's converter stores only as `rope_freqs` factors: the sets Meta shipped
LLAMA3_SCALINGS = tuple({"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192} for factor in (8.0, 32.0, 16.0))

# Hugging Face pre-tokenizer regexes -> llama.cpp's name for them (its converter tells them apart by hashing the
# tokens of a test text; a run's tokenizer is one of these or has no GGUF name)
LLAMA_CPP_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class PretrainedBase:
    """A base checked as far as its metadata: the shape and family it implies, and where its weights are."""

    source: str  # as the config gave it
    path: Path  # the local folder or GGUF file
    architecture: str  # the exported family: mixtral | qwen3_moe
    shape: dict  # ModelConfig keys
    vocab_size: int  # rows of the embedding
    token_ids: int  # ids the tokenizer uses (its largest + 1)
    files: list[Path] = field(default_factory=list)  # every file whose bytes make the base
    _tensors: Callable[[set[str] | None], Iterator[tuple[str, torch.Tensor]]] | None = None
    _names: Callable[[], dict[str, tuple[int, ...]]] | None = None

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Our name -> shape of every tensor the base gives (a tied head is not among them)."""
        return self._names()

    def tensors(self, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(our name, float32 tensor) of every tensor (or of `names`), one at a time, in the order of the names."""
        return self._tensors(names)

    def identity(self) -> str:
        """sha256 over the base's files (names and bytes): what every later fingerprint of the run covers."""
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(path.name.encode() + b"\0" + _file_sha256(path).encode())
        return digest.hexdigest()


def open_base(source: str) -> PretrainedBase:
    """The base `source` names: a local folder or .gguf file, else a hub id (fetched, or an error offline)."""
    path = Path(source).expanduser()
    if not path.exists():
        if not HUB_ID.fullmatch(source) or source.startswith((".", "/", "~")):
            raise DataError(f"model.base: {source} does not exist (give a Hugging Face folder, a .gguf file or a hub "
                            "id such as HuggingFaceTB/SmolLM2-135M)")
        path = _download(source)
    if path.is_dir():
        return _open_folder(source, path)
    if path.suffix.lower() == ".gguf":
        return _open_gguf(source, path)
    raise DataError(f"model.base: {path} is neither a folder with config.json nor a .gguf file")


_sha256_cache: dict[tuple, str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _sha256_cache:
        from modularforge.files import sha256_file

        _sha256_cache[key] = sha256_file(path)
    return _sha256_cache[key]


def _download(repo_id: str) -> Path:
    from modularforge.data.sources import hub_reachable

    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DataError(f"model.base={repo_id} is a hub id, which needs `huggingface_hub`: pip install "
                        "'modularforge[hf]' (or give a local folder or .gguf file)") from None
    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES, "tokenizer.model",
                "generation_config.json"]
    offline = not hub_reachable()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except Exception as e:
        if offline:
            raise DataError(f"cannot reach the Hugging Face hub and model '{repo_id}' is not cached; download it on a "
                            "connected machine, or give a local folder or .gguf file as model.base") from None
        raise DataError(f"cannot fetch model '{repo_id}': {str(e).splitlines()[0]}") from None


# --- Hugging Face folders -------------------------------------------------------------------------------------------

def _open_folder(source: str, folder: Path) -> PretrainedBase:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DataError(f"model.base: {folder} has no config.json; give a Hugging Face model folder or a .gguf file")
    config = read_json(config_path, schemas.BaseConfig)
    model_type = config.get("model_type")
    if model_type not in HF_FAMILIES:
        raise DataError(f"model.base: {folder} is a {model_type!r} model; supported: {SUPPORTED}")
    _check_hf_config(config, config_path)
    shape = _shape(config, config_path)
    weights = _weight_files(folder)
    tables = {}
    from modularforge.safetensors_stream import read_header

    for path in weights:
        tables |= {name: (path, info) for name, info in read_header(path)[0].items()}
    ours = {}
    for name in tables:
        mapped = _hf_to_ours(name)
        if mapped is None:
            if HF_IGNORED.fullmatch(name):
                continue
            raise DataError(f"{tables[name][0]}: tensor {name} has no place in a {model_type} model of ModularForge")
        ours[mapped] = name
    if shape["tie_embeddings"]:
        ours.pop("lm_head.weight", None)
    vocab = config.get("vocab_size") or tables["model.embed_tokens.weight"][1].shape[0]
    architecture = HF_FAMILIES[model_type]

    def names() -> dict[str, tuple[int, ...]]:
        return {mine: tables[theirs][1].shape for mine, theirs in ours.items()}

    def tensors(wanted: set[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        from modularforge.safetensors_stream import read_tensors

        for mine, theirs in sorted(ours.items()):
            if wanted is not None and mine not in wanted:
                continue
            yield mine, read_tensors(tables[theirs][0], [theirs])[theirs].float()

    extra = [folder / n for n in (*TOKENIZER_FILES, "tokenizer.model") if (folder / n).is_file()]
    files = [config_path, *(p for p in weights), *extra]
    return PretrainedBase(source, folder, architecture, shape, vocab, _token_ids(folder), files, tensors, names)


def _token_ids(folder: Path) -> int:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"model.base: {folder} has no tokenizer.json (a fast tokenizer is needed; a tokenizer.model "
                        "alone can be converted with transformers: AutoTokenizer.from_pretrained(folder)"
                        ".save_pretrained(folder))")
    tokenizer = read_json(path, schemas.BaseTokenizerFile)
    try:
        ids = [*tokenizer["model"]["vocab"].values(), *(t["id"] for t in tokenizer.get("added_tokens") or [])]
        return max(ids) + 1
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DataError(f"{path} is not a tokenizers vocabulary (no model.vocab of token ids)") from None


def _check_hf_config(config: dict, path: Path) -> None:
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (SwiGLU with silu is supported)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("bias terms in attention or MLP")
    if config.get("model_type") == "mistral" and config.get("sliding_window") is not None:
        problems.append(f"a sliding window of {config['sliding_window']} tokens")
    if config.get("use_sliding_window"):
        problems.append("a sliding window")
    if problems:
        raise DataError(f"model.base: {path} describes a model with {' and '.join(problems)}, which ModularForge does "
                        f"not support; supported: {SUPPORTED}")


def _shape(config: dict, path: Path) -> dict:
    try:
        return shape_from_hf(config)
    except KeyError as e:
        raise DataError(f"{path} lacks the key {e.args[0]!r}, which a model's shape needs") from None
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {e}") from None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, schemas.BaseWeightIndex)["weight_map"]
        if not weight_map:
            raise DataError(f"{index} has an empty weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise DataError(f"{index} names shards that are not in {folder}: {', '.join(missing[:3])}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if list(folder.glob("*.bin")) or list(folder.glob("*.pth")):
        raise DataError(f"model.base: {folder} holds pickled weights (.bin/.pth), which ModularForge does not load; "
                        "convert them to safetensors first")
    raise DataError(f"model.base: {folder} has no weights (model.safetensors or model.safetensors.index.json)")


def _hf_to_ours(name: str) -> str | None:
    if name in HF_GLOBAL_NAMES:
        return HF_GLOBAL_NAMES[name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match and match[2] in HF_LAYER_NAMES:
        return f"model.layers.{match[1]}.{HF_LAYER_NAMES[match[2]]}"
    return None


# --- GGUF files -----------------------------------------------------------------------------------------------------

def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ModularForgeError("a GGUF base needs the `gguf` package: pip install 'modularforge[gguf]'") from None
    return gguf


def _gguf_reader(path: Path):
    gguf = _import_gguf()
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises several types for a damaged file
        raise DataError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None


def _gguf_field(reader, key: str, default=None):
    found = reader.fields.get(key)
    if found is None:
        return default
    value = found.contents()
    return value


def _open_gguf(source: str, path: Path) -> PretrainedBase:
    gguf = _import_gguf()
    facts = _gguf_facts(path)
    ours = facts["tensors"]  # our name -> (GGUF name, shape)
    permuted = facts["permuted"]  # our layer suffix -> heads, for the q/k rows llama.cpp's converter permuted

    def names() -> dict[str, tuple[int, ...]]:
        return {mine: tuple(shape) for mine, (_, shape) in ours.items()}

    def read(wanted: set[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        import torch

        from modularforge.model.layers import unpermute_rotary

        fresh = _gguf_reader(path)  # the reader's memory map pages in what is read; a new one per pass lets them go
        by_name = {t.name: t for t in fresh.tensors}
        for mine, (theirs, shape) in sorted(ours.items()):
            if wanted is not None and mine not in wanted:
                continue
            t = by_name[theirs]
            data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            tensor = torch.from_numpy(np.array(data, dtype=np.float32, order="C")).reshape(tuple(shape))
            suffix = mine.split(".", 3)[-1] if mine.startswith("model.layers.") else None
            if suffix in permuted:
                tensor = unpermute_rotary(tensor, permuted[suffix])
            yield mine, tensor

    return PretrainedBase(source, path, facts["architecture"], facts["shape"], facts["vocab_size"], facts["token_ids"],
                          [path], read, names)


def _gguf_facts(path: Path) -> dict:
    """What a GGUF file says of its model (family, shape, tensors), kept in the user's cache by the file's identity:
    gguf's reader parses every metadata array (a vocabulary of tens of thousands of strings) in seconds, and every
    stage of a run needs these facts."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{FACTS_VERSION}".encode())
    cached = cache_dir() / f"gguf-{key.hexdigest()[:32]}.json"
    if cached.is_file():
        try:
            return json.loads(cached.read_text())
        except (OSError, ValueError):
            pass  # a damaged cache entry is read again from the file
    facts = _read_gguf_facts(path)
    try:
        write_json(cached, facts)
    except ModularForgeError:
        log.debug("cannot cache the metadata of %s in %s", path, cached)
    return facts


FACTS_VERSION = 2  # of what `_read_gguf_facts` records


def cache_dir() -> Path:
    root = os.environ.get("MODULARFORGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
        / "modularforge"
    return Path(root)


def _read_gguf_facts(path: Path) -> dict:
    gguf = _import_gguf()
    reader = _gguf_reader(path)
    arch = _gguf_field(reader, "general.architecture")
    if arch not in GGUF_FAMILIES:
        raise DataError(f"model.base: {path} is a GGUF model of architecture {arch!r}; supported: {SUPPORTED}")
    tensors = {t.name: t for t in reader.tensors}
    readable = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *gguf.quants._type_traits}
    for t in reader.tensors:
        if t.tensor_type not in readable:
            raise DataError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which cannot be dequantised "
                            f"here (readable: {', '.join(sorted(q.name for q in readable))})")

    def key(suffix: str, default=None):
        return _gguf_field(reader, f"{arch}.{suffix}", default)

    heads = key("attention.head_count")
    hidden = key("embedding_length")
    needed = {"block_count": key("block_count"), "embedding_length": hidden, "feed_forward_length":
              key("feed_forward_length"), "attention.head_count": heads, "context_length": key("context_length")}
    missing = [k for k, v in needed.items() if v is None]
    if missing or "token_embd.weight" not in tensors:
        raise DataError(f"{path} lacks {', '.join(f'{arch}.{k}' for k in missing) or 'token_embd.weight'}, which a "
                        "model's shape needs")
    if not isinstance(heads, int):
        raise DataError(f"{path}: per-layer head counts are not supported")
    head_dim = key("attention.key_length") or hidden // heads
    kv_heads = key("attention.head_count_kv") or heads
    config = {
        "hidden_size": hidden, "intermediate_size": key("feed_forward_length"), "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "rope_theta": float(key("rope.freq_base", 10_000.0)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "tie_word_embeddings": "output.weight" not in tensors, "max_position_embeddings": key("context_length"),
    }
    scaling_type = key("rope.scaling.type")
    if scaling_type not in (None, "none"):
        raise DataError(f"{path}: rope scaling of type {scaling_type!r} is not supported (supported: none, llama3)")
    shape = _shape(config, path)
    if GGUF_ROPE_FREQS in tensors:
        shape["rope_scaling"] = _llama3_scaling(np.asarray(tensors[GGUF_ROPE_FREQS].data, np.float32), shape, path)
    ours: dict[str, tuple[str, list[int]]] = {}
    for name, t in tensors.items():
        if name == GGUF_ROPE_FREQS:
            continue
        mapped = _gguf_to_ours(name)
        if mapped is None:
            raise DataError(f"{path}: tensor {name} has no place in a {arch} model of ModularForge")
        ours[mapped] = (name, [int(d) for d in reversed(t.shape)])
    # llama.cpp's converter permutes q/k rows for its `llama` rotary embedding; Qwen's NEOX one keeps HF's order
    permuted = {"self_attn.q_proj.weight": heads, "self_attn.k_proj.weight": kv_heads} if arch == "llama" else {}
    return {"architecture": GGUF_FAMILIES[arch], "shape": shape, "vocab_size": int(tensors["token_embd.weight"].shape[1]),
            "tensors": ours, "permuted": permuted, "token_ids": len(_gguf_field(reader, "tokenizer.ggml.tokens", []))}


def _gguf_to_ours(name: str) -> str | None:
    if name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if match and match[2] in GGUF_LAYER_NAMES:
        return f"model.layers.{match[1]}.{GGUF_LAYER_NAMES[match[2]]}"
    return None


def _llama3_scaling(factors: np.ndarray, shape: dict, path: Path) -> dict:
    """The Llama 3.x scaling whose frequency factors llama.cpp's converter stored as `rope_freqs`."""
    from modularforge.config import ModelConfig, RopeScaling
    from modularforge.model.layers import rotary_frequencies

    plain = ModelConfig(**{k: v for k, v in shape.items() if k != "rope_scaling"}, max_seq_len=8)
    base = rotary_frequencies(plain).numpy()
    for scaling in LLAMA3_SCALINGS:
        scaled = rotary_frequencies(plain.model_copy(update={"rope_scaling": RopeScaling(**scaling)})).numpy()
        if factors.shape == base.shape and np.allclose(base / scaled, factors, rtol=1e-3):
            return {"rope_type": "llama3", **scaling}
    raise DataError(f"{path}: its rope_freqs factors match none of Llama 3.x's rope scalings; other frequency "
                    "factors are not supported")


# --- tokenizers -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizerFacts:
    """What prepare records of a base's tokenizer: the id that ends each document (the base's EOS) and its BOS."""

    eos_id: int
    bos_id: int
    vocab: int  # token ids the tokenizer uses (max id + 1)


def write_tokenizer(base: PretrainedBase, out_dir: Path, max_seq_len: int) -> TokenizerFacts:
    """The base's tokenizer, as it is, into `out_dir` (tokenizer.json, tokenizer_config.json, special_tokens_map.json
    and, where llama.cpp has a name for its pre-tokenizer, llama_cpp.json); a tokenizer whose ids do not fit the
    embeddings is a DataError."""
    if base.path.is_dir():
        tokenizer_json, special, llama_cpp = _folder_tokenizer(base)
    else:
        tokenizer_json, special, llama_cpp = _gguf_tokenizer(base)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    vocab = max([*tokenizer.get_vocab(with_added_tokens=True).values(), -1]) + 1
    if vocab > base.vocab_size:
        raise DataError(f"the tokenizer of {base.source} has token ids up to {vocab - 1}, but its embeddings have "
                        f"{base.vocab_size} rows; the tokenizer does not belong to these weights")
    ids = {}
    for role in ("eos", "bos"):
        token, token_id = special.get(f"{role}_token"), special.get(f"{role}_id")
        if token_id is None and token is not None:
            token_id = tokenizer.token_to_id(token)
        if token_id is None or not 0 <= token_id < base.vocab_size:
            if role == "bos":
                token_id = ids["eos"]
            else:
                raise DataError(f"cannot find the end-of-text token of the tokenizer of {base.source}; its "
                                "tokenizer_config.json or config.json must name it")
        ids[role] = int(token_id)
    eos_token = tokenizer.id_to_token(ids["eos"])
    bos_token = tokenizer.id_to_token(ids["bos"])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos_token, "eos_token": eos_token,
              "pad_token": eos_token, "unk_token": special.get("unk_token"), "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": max_seq_len,
              **({"chat_template": special["chat_template"]} if special.get("chat_template") else {})}
    with atomic_dir(out_dir) as tmp:
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        write_json(tmp / "tokenizer_config.json", config)
        write_json(tmp / "special_tokens_map.json", {"bos_token": bos_token, "eos_token": eos_token,
                                                      "pad_token": eos_token})
        if llama_cpp is not None:
            write_json(tmp / LLAMA_CPP_TOKENIZER, llama_cpp)
    return TokenizerFacts(ids["eos"], ids["bos"], vocab)


def _folder_tokenizer(base: PretrainedBase) -> tuple[str, dict, dict | None]:
    folder = base.path
    text = (folder / "tokenizer.json").read_text(encoding="utf-8")  # its presence was checked on opening
    special: dict = {}
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        tokenizer_config = read_json(config_path, schemas.BaseTokenizerConfig)
        for key in ("eos_token", "bos_token", "unk_token", "chat_template"):
            value = tokenizer_config.get(key)
            special[key] = value.get("content") if isinstance(value, dict) else value
    model_config = read_json(folder / "config.json", schemas.BaseConfig)
    for role in ("eos", "bos"):
        value = model_config.get(f"{role}_token_id")
        special[f"{role}_id"] = value[0] if isinstance(value, list) and value else value
    return text, special, _llama_cpp_names(text)


def _llama_cpp_names(tokenizer_json: str) -> dict | None:
    """llama.cpp's names of a byte-level BPE tokenizer's model and pre-tokenizer, or None where it has none."""
    tok = json.loads(tokenizer_json)
    if (tok.get("model") or {}).get("type") != "BPE":
        return None
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return {"model": "gpt2", "pre": "gpt-2"}
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return {"model": "gpt2", "pre": "smollm"}
    if kinds[:1] == ["Split"] and kinds[-1] == "ByteLevel":
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex in LLAMA_CPP_PRE_TOKENIZERS:
            return {"model": "gpt2", "pre": LLAMA_CPP_PRE_TOKENIZERS[regex]}
    return None


def _gguf_tokenizer(base: PretrainedBase) -> tuple[str, dict, dict | None]:
    """A GGUF file's vocabulary as a tokenizer.json, converted by transformers (which loads GGUF tokenizers)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ModularForgeError("the tokenizer of a GGUF base is converted by transformers: pip install "
                                "'modularforge[hf]'") from None
    reader = _gguf_reader(base.path)
    model = _gguf_field(reader, "tokenizer.ggml.model")
    if model is None:
        raise DataError(f"{base.path} holds no tokenizer (tokenizer.ggml.model)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base.path.parent), gguf_file=base.path.name)
    except Exception as e:
        raise DataError(f"cannot read the tokenizer of {base.path}: {str(e).splitlines()[0][:200]}") from None
    special = {"eos_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
               "bos_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
               "chat_template": _gguf_field(reader, "tokenizer.chat_template")}
    pre = _gguf_field(reader, "tokenizer.ggml.pre")
    llama_cpp = {"model": model, "pre": pre, "add_bos_token": bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token",
                                                                                False))} \
        if model == "gpt2" and pre else None
    return tokenizer.backend_tokenizer.to_str(), special, llama_cpp


_opened: dict[tuple, PretrainedBase] = {}


def cached_base(source: str) -> PretrainedBase:
    """`open_base`, once per process for an unchanged local path."""
    path = Path(source).expanduser()
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:
        key = (source,)
    if key not in _opened:
        _opened[key] = open_base(source)
    return _opened[key]


def with_base_shape(cfg: Config) -> Config:
    """`cfg` with the model shape (and vocabulary) of its base, if it has one: the base decides layers, widths,
    heads, head width, rope parameters, norm epsilon, tied embeddings and context; `model.max_seq_len`, the context
    the run trains and scores at, is kept up to the base's context."""
    if cfg.model.base is None:
        return cfg
    base = cached_base(cfg.model.base)
    dump = cfg.model_dump(mode="json")
    shape = {**base.shape, "architecture": base.architecture}
    dump["model"] |= shape | {"max_seq_len": min(cfg.model.max_seq_len, shape["context_length"])}
    dump["tokenizer"]["vocab_size"] = base.vocab_size
    resolved = config_from_dict(dump)
    check_base(base, resolved)
    return resolved


def check_base(base: PretrainedBase, cfg: Config) -> None:
    """Every tensor the dense model of `cfg` needs, at its shape, and no other, and a tokenizer whose ids the
    embeddings have rows for: before anything is written."""
    from modularforge.model.weights import dense_shapes

    if base.token_ids > base.vocab_size:
        raise DataError(f"the tokenizer of {base.source} has token ids up to {base.token_ids - 1}, but its embeddings "
                        f"have {base.vocab_size} rows; the tokenizer does not belong to these weights")
    if base.token_ids == 0:
        raise DataError(f"{base.source} holds no tokenizer vocabulary")
    expected, found = dense_shapes(cfg.model, base.vocab_size), base.tensor_shapes()
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise DataError(f"model.base: {base.path} does not hold a complete model of its own config: missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise DataError(f"model.base: {base.path}: {name} has shape {list(found[name])}, its config implies "
                            f"{list(shape)}")
