import pytest
import torch

from modularforge.config import ModelConfig
from modularforge.data.tokenizer import load_tokenizer
from modularforge.sampling import (
    Sampling,
    choose_expert,
    filter_logits,
    generate_ids,
    generate_text,
    sample_token,
)
from modularforge.inference import open_model
from modularforge.model.transformer import CausalLM

CFG = ModelConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, max_seq_len=24,
                  num_experts=4, top_k=2)


def _model():
    model = CausalLM(CFG, vocab_size=40, moe=True)
    model.init_weights(torch.Generator().manual_seed(0))
    for b in model.moe_blocks():
        torch.nn.init.normal_(b.gate.weight, generator=torch.Generator().manual_seed(1))
    return model.eval()


def test_cached_greedy_decode_equals_full_recompute():
    model = _model()
    prompt = [1, 5, 7, 2]
    cached = list(generate_ids(model, prompt, Sampling(temperature=0, max_new_tokens=12)))
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert cached == tokens[len(prompt):]


def test_the_kv_cache_holds_the_prompt_and_new_tokens_not_the_whole_context(monkeypatch):
    import modularforge.sampling as sampling

    capacities = []
    real = sampling.KVCache
    monkeypatch.setattr(sampling, "KVCache", lambda cfg, batch, capacity, *rest: capacities.append(capacity)
                        or real(cfg, batch, capacity, *rest))
    model = _model()
    prompt, sampling_ = [1, 5, 7, 2], Sampling(temperature=0, max_new_tokens=6)
    short = list(generate_ids(model, prompt, sampling_))
    assert capacities == [len(prompt) + 6 + 1] and capacities[0] < CFG.max_seq_len
    monkeypatch.setattr(sampling, "KVCache", real)
    assert short == list(generate_ids(model, prompt, sampling_))[:6]
    long = list(generate_ids(model, [1, 2, 3], Sampling(temperature=1.0, max_new_tokens=60, context_window=16)))
    assert len(long) == 60


def test_sliding_window_keeps_generating_past_the_context():
    model = _model()
    out = list(generate_ids(model, [1, 2, 3], Sampling(temperature=1.0, max_new_tokens=60, context_window=16)))
    assert len(out) == 60 and all(0 <= t < 40 for t in out)


def test_same_seed_same_tokens_and_sampling_depends_on_seed():
    model = _model()
    a = list(generate_ids(model, [3, 4], Sampling(temperature=1.0, top_k=None, top_p=None, max_new_tokens=20, seed=1)))
    b = list(generate_ids(model, [3, 4], Sampling(temperature=1.0, top_k=None, top_p=None, max_new_tokens=20, seed=1)))
    c = list(generate_ids(model, [3, 4], Sampling(temperature=1.0, top_k=None, top_p=None, max_new_tokens=20, seed=2)))
    assert a == b and a != c


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(filter_logits(logits, 2, None)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, None, 0.7)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, None, 0.85)).tolist() == [False, False, False, True]
    assert torch.isinf(filter_logits(logits, None, 0.97)).tolist() == [False, False, False, False]
    assert torch.isinf(filter_logits(logits, 1, 0.97)).tolist() == [False, True, True, True]


def test_expert_cache_gives_the_same_logits_and_tokens_as_the_full_model(trained_run):
    full = open_model(trained_run.model_dir)
    cached = open_model(trained_run.model_dir, expert_cache=2)
    ids = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(full.eval()(ids), cached(ids))
    assert cached.expert_cache.misses > 0 and len(cached.expert_cache.cache) <= 2
    s = Sampling(temperature=0.9, max_new_tokens=10, seed=3)
    assert list(generate_ids(full, [5, 6, 7], s)) == list(generate_ids(cached, [5, 6, 7], s))


def test_streamed_pieces_make_up_the_returned_text(trained_run):
    model = open_model(trained_run.model_dir)
    tokenizer = load_tokenizer(trained_run.model_dir)
    pieces = []
    text = generate_text(model, tokenizer, "The", Sampling(max_new_tokens=15, seed=0), on_text=pieces.append)
    assert "".join(pieces) == text.rstrip("\ufffd") and len(pieces) >= 1
    sequence = generate_text(model, tokenizer, "The Congress", Sampling(max_new_tokens=5), routing="sequence")
    assert isinstance(sequence, str)


def test_min_new_tokens_keeps_end_of_text_from_being_sampled_early():
    model = _model()
    prompt = [1, 5, 7, 2]
    first = next(generate_ids(model, prompt, Sampling(temperature=0, max_new_tokens=1)))
    stopped = list(generate_ids(model, prompt, Sampling(temperature=0, max_new_tokens=8), eos_id=first))
    assert stopped == [first]  # the greedy first token, taken as end-of-text, ends generation at once
    held = list(generate_ids(model, prompt, Sampling(temperature=0, max_new_tokens=8, min_new_tokens=5), eos_id=first))
    assert len(held) >= 5 and first not in held[:5]


def test_decoding_layouts_keep_the_logits_and_the_expert_cache_uses_them(trained_run):
    full = open_model(trained_run.model_dir)
    ids = torch.randint(0, 500, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = full.eval()(ids)
        fp32 = open_model(trained_run.model_dir, decode_dtype="float32")
        assert not fp32.model.layers[0].self_attn.q_proj.weight.is_contiguous()  # stored (in, out)
        torch.testing.assert_close(fp32(ids), reference, rtol=1e-5, atol=1e-5)
        fp16 = open_model(trained_run.model_dir, decode_dtype="float16")
        assert fp16.lm_head.weight.dtype == torch.float16
        torch.testing.assert_close(fp16(ids).float(), reference, rtol=0, atol=0.05 * reference.abs().max().item())
        cached = open_model(trained_run.model_dir, expert_cache=2, decode_dtype="float32")
        torch.testing.assert_close(cached(ids), reference, rtol=1e-5, atol=1e-5)
        assert not cached.moe_blocks()[0].expert(0).w1.weight.is_contiguous()
    s = Sampling(temperature=0, max_new_tokens=10)
    assert list(generate_ids(fp32, [5, 6, 7], s)) == list(generate_ids(full, [5, 6, 7], s))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_lean_decode_step_gives_the_module_path_logits(dtype, monkeypatch):
    import modularforge.decode as decode
    from modularforge.inference import for_decoding
    from modularforge.model.transformer import KVCache

    monkeypatch.setattr(decode, "SPLIT_MIN_ELEMENTS", 0)  # every float32 product through the two-core split
    model = _model()
    model = for_decoding(model, dtype)
    torch_dtype = getattr(torch, dtype)
    rotary = decode.RotaryRows(model, torch_dtype)
    with torch.no_grad():
        for expert_ids in (None, torch.tensor([2])):  # routed per token; one expert for the sequence
            caches = [KVCache(CFG, 1, CFG.max_seq_len, torch_dtype) for _ in range(2)]
            prompt = torch.tensor([[1, 5, 7, 2]])
            for cache in caches:
                model(prompt, cache=cache, start=0, expert_ids=expert_ids)
            token = 3
            for position in range(4, CFG.max_seq_len):
                expected = model(torch.tensor([[token]]), cache=caches[0], start=position, expert_ids=expert_ids)[0, -1]
                got = decode.decode_step(model, rotary, token, caches[1], position, expert_ids)
                if dtype == "float16":  # no split products: the same kernels in the same order
                    assert torch.equal(got, expected), (expert_ids, position)
                else:  # MKL may sum a split product in another order (CPU- and shape-dependent)
                    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=f"{expert_ids} {position}")
                token = int(expected.argmax())


def test_split_matrix_vector_product_equals_the_plain_one():
    """Each output is the same dot product either way; MKL picks its summation order per shape and CPU, so the
    result is bitwise equal on some machines (the speed benchmark's) and within float32 rounding on others."""
    from modularforge.decode import SPLIT_MIN_ELEMENTS, matvec

    g = torch.Generator().manual_seed(3)
    for out, inputs in ((2048, SPLIT_MIN_ELEMENTS // 2048 * 2), (768, 256), (256, 768), (8192, 256)):
        weight = torch.randn(inputs, out, generator=g).t()  # (out, in), stored input-major as for decoding
        x = torch.randn(1, inputs, generator=g)
        plain = torch.nn.functional.linear(x, weight)
        torch.testing.assert_close(matvec(x, weight), plain, rtol=1e-6, atol=1e-5 * inputs**0.5)


def test_sequence_routing_revises_its_expert_and_reprefills_under_it():
    """Sampling with the expert re-chosen after every token equals, token by token, sampling from the forced
    model of the expert under which the text so far is most likely, recomputed from scratch."""
    model = _model()
    for b in model.moe_blocks():
        for i, e in enumerate(b.experts):
            torch.nn.init.normal_(e.w2.weight, std=0.5, generator=torch.Generator().manual_seed(3 + i))
    prompt = [1, 5, 7, 2]
    s = Sampling(temperature=1.5, top_k=None, top_p=None, max_new_tokens=14, seed=2, revise_every=1)
    out = list(generate_ids(model, prompt, s, expert=choose_expert(model, prompt)))
    tokens, used, generator = list(prompt), [], torch.Generator().manual_seed(s.seed)
    with torch.no_grad():
        for _ in range(14):
            expert = choose_expert(model, tokens)
            used.append(expert)
            logits = model(torch.tensor([tokens]), expert_ids=torch.tensor([expert]))[0, -1]
            tokens.append(sample_token(logits, s, generator))
    assert out == tokens[len(prompt):]
    assert len(set(used)) > 1  # the choice did change, so the re-prefill was exercised


def test_one_token_prompt_chooses_an_expert_by_router_vote_and_leaves_the_model_unchanged():
    model = _model()
    with torch.no_grad():
        before = model(torch.tensor([[3]]))
    expert = choose_expert(model, [3])
    assert 0 <= expert < CFG.num_experts
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([[3]])), before)  # the vote's hooks left the routers' outputs alone
    s = Sampling(temperature=0, top_k=None, top_p=None, max_new_tokens=3, seed=0)
    assert len(list(generate_ids(model, [3], s, expert=expert))) == 3
