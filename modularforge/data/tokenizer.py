"""Byte-level BPE tokenizer trained with `tokenizers`, saved so that `AutoTokenizer` loads it.

Pre-tokenisation is GPT-2's byte-level regex, which llama.cpp knows under the name `gpt-2` (it rejects
`gpt2`); the GGUF export declares that name. One special token, `<|endoftext|>`, is BOS, EOS and padding; it
separates documents in the token shards. Nothing is added automatically when encoding, so our
ids equal what `AutoTokenizer(text)` returns.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from modularforge.config import TokenizerConfig
from modularforge.errors import DataError
from modularforge.files import atomic_dir, write_json

EOS = "<|endoftext|>"
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


def eos_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(EOS)
    if token_id is None:  # a damaged tokenizer.json
        raise DataError(f"the tokenizer has no end-of-text token {EOS!r}; its tokenizer.json is damaged or not a "
                        "ModularForge tokenizer")
    return token_id


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """Bytes of UTF-8 text each token id stands for (0 for special tokens), for bits-per-byte.

    Byte-level BPE maps every byte to one printable character, so a token's length in
    characters is its length in bytes.
    """
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    for token, index in tokenizer.get_vocab().items():
        lengths[index] = 0 if token in special else len(token)
    return lengths
