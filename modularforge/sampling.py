"""Sampling text from a model, below every stage (`generate` and `evaluate` use it): temperature, top-k,
top-p, a preallocated KV cache, a sliding context window, routing per token (the exported model) or per
sequence (one expert in every layer, chosen from the prompt and re-chosen every `revise_every` tokens
from all the text so far), and tokens streamed as they come.

Sliding window: when the cache holds `context_window` tokens, the last half of the window is
prefilled again from position 0, so every prediction sees between half a window and a whole window
of context, at amortised O(1) cost per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from modularforge.config import GenerateConfig
from modularforge.data.tokenizer import eos_id
from modularforge.decode import RotaryRows, decode_step, supports_decode_step
from modularforge.device import module_device
from modularforge.errors import ModularForgeError
from modularforge.model.transformer import CausalLM, KVCache


_DEFAULTS = {name: field.default for name, field in GenerateConfig.model_fields.items()}


@dataclass
class Sampling:
    """The generation settings a sampler uses; the defaults are the config section's (generate.*), not copies."""

    temperature: float = _DEFAULTS["temperature"]
    top_k: int | None = _DEFAULTS["top_k"]
    top_p: float | None = _DEFAULTS["top_p"]
    max_new_tokens: int = _DEFAULTS["max_new_tokens"]
    seed: int = _DEFAULTS["seed"]
    context_window: int | None = _DEFAULTS["context_window"]
    min_new_tokens: int = _DEFAULTS["min_new_tokens"]
    revise_every: int | None = _DEFAULTS["sequence_revise_every"]

    @classmethod
    def from_config(cls, cfg: GenerateConfig) -> Sampling:
        return cls(cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_new_tokens, cfg.seed, cfg.context_window,
                   cfg.min_new_tokens, cfg.sequence_revise_every)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Mask (set to -inf) all but the top-k tokens and the smallest set holding top_p of the mass. logits: (V,)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = F.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - F.softmax(sorted_logits, dim=-1) >= top_p  # keep tokens until the mass reaches top_p
        drop[0] = False  # the most likely token always stays (a top_p below float32's range compares as 0)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    if s.temperature == 0:
        return int(torch.argmax(logits))
    probs = F.softmax(filter_logits(logits.float().cpu() / s.temperature, s.top_k, s.top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def choose_expert(model: CausalLM, prompt: list[int]) -> int:
    """Sequence routing: the expert under which the prompt is most likely (needs 2+ tokens), else the
    expert the routers of all layers favour most over the prompt."""
    device = module_device(model)
    ids = torch.tensor([prompt], device=device)
    blocks = model.moe_blocks()
    if len(prompt) >= 2:
        batch = ids.expand(blocks[0].num_experts, -1)
        nll = model.token_nll(batch, expert_ids=torch.arange(blocks[0].num_experts, device=device))
        return int(nll.sum(1).argmin())
    scores = torch.zeros(blocks[0].num_experts, device=device)

    def tally(module, args, logits: torch.Tensor) -> None:  # returns None: the router's output stays as it is
        scores.add_(F.softmax(logits.float(), -1).reshape(-1, len(scores)).sum(0))

    hooks = [b.gate.register_forward_hook(tally) for b in blocks]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return int(scores.argmax())


def sequence_choices(per_expert_nll: torch.Tensor, prefix_len: int, revise_every: int | None) -> torch.Tensor:
    """Sequence routing at every position of a window, from (E, B, T) next-token NLLs with each expert
    forced in every layer: the (B, T) expert that predicts each position. The first choice is the expert
    under which the prefix (the first `prefix_len` tokens) is most likely; then, every `revise_every`
    positions, the expert under which all the text so far is most likely (None: never revised). The
    prediction at t uses only positions before t, so the rule is causal past the prefix; positions inside
    the prefix take the prefix's choice."""
    E, B, T = per_expert_nll.shape
    nll_before = F.pad(per_expert_nll.float().cumsum(-1), (1, 0))  # [..., t] = NLL of the positions before t
    first = min(prefix_len - 1, T)
    positions = torch.arange(T, device=per_expert_nll.device)
    if revise_every:
        decided_at = first + (positions - first).clamp(min=0) // revise_every * revise_every
    else:
        decided_at = torch.full((T,), first, device=per_expert_nll.device)
    return nll_before[:, :, decided_at].argmin(0)


@torch.no_grad()
def generate_ids(
    model: CausalLM,
    prompt: list[int],
    s: Sampling,
    eos_id: int | None = None,
    expert: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time. `expert` forces one expert in every layer (sequence routing);
    it is re-chosen from the text in the window every `s.revise_every` new tokens, and the cache is
    prefilled again under the new expert when the choice changes."""
    if not prompt:
        raise ModularForgeError("the prompt is empty; give at least one token of text")
    window = s.context_window or model.cfg.max_seq_len
    if window > model.cfg.max_seq_len:
        raise ModularForgeError(f"context window {window} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    model.eval()
    generator = torch.Generator().manual_seed(s.seed)  # sampling draws on the CPU, so a seed means the same everywhere
    device = module_device(model)
    expert_ids = None if expert is None else torch.tensor([expert], device=device)
    dtype = next(model.parameters()).dtype
    tokens = list(prompt)
    # No position past the prompt and the new tokens is ever filled: a base's context (128K tokens for Llama 3.x)
    # would otherwise preallocate gigabytes of cache for a short generation.
    capacity = min(window, min(len(tokens), window - 1) + s.max_new_tokens + 1)
    cache = KVCache(model.cfg, 1, capacity, dtype, device)
    rotary = RotaryRows(model, dtype) if supports_decode_step(model) else None

    def prefill(context: list[int]) -> torch.Tensor:
        return model(torch.tensor([context], device=device), cache=cache, start=0, expert_ids=expert_ids)[0, -1]

    context = tokens[-(window - 1) :] if len(tokens) >= window else tokens
    logits, position = prefill(context), len(context)
    for step in range(s.max_new_tokens):
        if step < s.min_new_tokens and eos_id is not None:
            logits = logits.clone()
            logits[eos_id] = float("-inf")
        token = sample_token(logits, s, generator)
        yield token
        if token == eos_id:
            return
        tokens.append(token)
        switched = False
        if expert_ids is not None and s.revise_every and (step + 1) % s.revise_every == 0:
            best = choose_expert(model, tokens[-min(position + 1, window) :])
            switched, expert_ids = best != int(expert_ids), torch.tensor([best], device=device)
        if position >= window or switched:
            context = tokens[-(window // 2) :] if position >= window else tokens[-(position + 1) :]
            logits, position = prefill(context), len(context)
        else:
            if rotary is not None:
                logits = decode_step(model, rotary, token, cache, position, expert_ids)
            else:
                logits = model(torch.tensor([[token]], device=device), cache=cache, start=position,
                               expert_ids=expert_ids)[0, -1]
            position += 1


def generate_text(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompt: str,
    s: Sampling,
    routing: str = "token",
    on_text: Callable[[str], None] | None = None,
    eos: int | None = None,
) -> str:
    """Generate a continuation of `prompt`, ending at `eos` (default: our tokenizer's end-of-text); `on_text`
    receives each new piece of decoded text as it is ready."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    expert = choose_expert(model, prompt_ids) if routing == "sequence" else None
    new: list[int] = []
    shown = ""
    for token in generate_ids(model, prompt_ids, s, eos if eos is not None else eos_id(tokenizer), expert):
        new.append(token)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            if on_text is not None:
                on_text(text[len(shown) :])
            shown = text
    return tokenizer.decode(new)

