"""Byte-level BPE tokenizer trained with `tokenizers`, saved so that `AutoTokenizer` loads it.

Pre-tokenisation is GPT-2's byte-level regex, which llama.cpp knows under the name `gpt-2` (it rejects
`gpt2`); the GGUF export declares that name. One special token, `<|endoftext|>`, is BOS, EOS and padding; it
separates documents in the token shards. Nothing is added automatically when encoding, so our
ids equal what `AutoTokenizer(text)` returns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from modularforge import schemas
from modularforge.config import TokenizerConfig
from modularforge.errors import DataError
from modularforge.files import atomic_dir, read_json, write_json

EOS = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LLAMA_CPP_TOKENIZER = "llama_cpp.json"  # a base's tokenizer: llama.cpp's names for it, read by GGUF export
PRE_TOKENIZER_NAME = "gpt-2"  # the llama.cpp name of this pre-tokenizer


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, max_seq_len: int, out_dir: Path) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    save_tokenizer(tokenizer, max_seq_len, out_dir)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, max_seq_len: int, out_dir: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json into `out_dir` (atomically)."""
    with atomic_dir(out_dir) as tmp:
        tokenizer.save(str(tmp / "tokenizer.json"))
        write_json(
            tmp / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": EOS,
                "eos_token": EOS,
                "pad_token": EOS,
                "unk_token": None,
                "add_bos_token": False,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": max_seq_len,
            },
        )
        write_json(tmp / "special_tokens_map.json", {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS})


def load_tokenizer(tokenizer_dir: Path, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer.json of a folder; with `vocab_size` (the model's), one with more tokens than the model has
    embeddings is refused too. A damaged file is a DataError naming it."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"missing tokenizer: {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:
        raise DataError(f"cannot read tokenizer {path}: {e}") from None
    if vocab_size is not None and tokenizer.get_vocab_size() > vocab_size:
        raise DataError(f"{path} holds {tokenizer.get_vocab_size()} tokens, more than the {vocab_size} of the model "
                        "it belongs to; it is damaged or belongs to another model")
    return tokenizer


def eos_id(tokenizer: Tokenizer, tokenizer_dir: Path | None = None) -> int:
    """The end-of-text id: the `eos_token` that `tokenizer_dir`'s tokenizer_config.json names (a base's own), or our
    tokenizer's `<|endoftext|>`."""
    token = EOS
    config = Path(tokenizer_dir) / "tokenizer_config.json" if tokenizer_dir is not None else None
    if config is not None and config.is_file():
        named = read_json(config, schemas.TokenizerConfig).get("eos_token")
        token = named.get("content") if isinstance(named, dict) else named or EOS
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise DataError(f"the tokenizer has no end-of-text token {token!r}" + (f" ({config})" if config else ""))
    return token_id


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """Bytes of UTF-8 text each token id stands for (0 for special tokens), for bits-per-byte.

    Byte-level BPE (ours, GPT-2's, Llama 3's, Qwen's) maps every byte to one printable character, so a token's
    length in characters is its length in bytes. SentencePiece-style vocabularies (Llama 2, TinyLlama) write a
    space as U+2581 and a byte they cannot spell as `<0xNN>`.
    """
    decoder = json.dumps(json.loads(tokenizer.to_str()).get("decoder"))
    byte_level = '"ByteLevel"' in decoder
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    for token, index in tokenizer.get_vocab().items():
        if index >= len(lengths) or token in special:
            continue
        if byte_level:
            lengths[index] = len(token)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            lengths[index] = 1
        else:
            lengths[index] = len(token.replace("\u2581", " ").encode("utf-8"))
    return lengths
