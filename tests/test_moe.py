import pytest
import torch

from modularforge.config import ModelConfig
from modularforge.model.layers import SwiGLU
from modularforge.model.moe import SparseMoE, route
from modularforge.model.transformer import CausalLM

CFG = ModelConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_seq_len=16, num_experts=4, top_k=2)


def test_route_is_fp32_softmax_topk_renormalised():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 3.0, 1.0]], dtype=torch.bfloat16)
    weights, indices = route(logits, 2)
    probs = torch.softmax(logits.float(), -1)
    assert weights.dtype == torch.float32
    assert indices[0].tolist() == [0, 1]
    assert set(indices[1].tolist()) == {1, 2}
    expected = probs[0, :2] / probs[0, :2].sum()
    torch.testing.assert_close(weights[0], expected)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_moe_with_equal_experts_equals_the_dense_ffn_for_any_router(top_k):
    torch.manual_seed(0)
    dense = SwiGLU(32, 48)
    moe = SparseMoE(32, 48, num_experts=4, top_k=top_k)
    for expert in moe.experts:
        expert.load_state_dict(dense.state_dict())
    torch.nn.init.normal_(moe.gate.weight, std=3.0)  # an arbitrary, sharp router
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=1e-5)


def test_forced_expert_ids_use_exactly_that_expert():
    torch.manual_seed(0)
    moe = SparseMoE(32, 48, num_experts=4, top_k=2)
    x = torch.randn(2, 5, 32)
    out = moe(x, expert_ids=torch.tensor([3, 1]))
    torch.testing.assert_close(out[0], moe.experts[3](x[0]))
    torch.testing.assert_close(out[1], moe.experts[1](x[1]))


def test_moe_output_matches_a_per_token_reference():
    torch.manual_seed(1)
    moe = SparseMoE(32, 48, num_experts=4, top_k=2)
    torch.nn.init.normal_(moe.gate.weight)
    x = torch.randn(1, 6, 32)
    out = moe(x)[0]
    for t in range(6):
        w, idx = route(moe.gate(x[0, t : t + 1]), 2)
        ref = sum(w[0, j] * moe.experts[int(idx[0, j])](x[0, t]) for j in range(2))
        torch.testing.assert_close(out[t], ref, atol=1e-6, rtol=1e-5)


def test_kv_cache_prefill_and_decode_match_full_forward():
    torch.manual_seed(0)
    model = CausalLM(CFG, vocab_size=50, moe=True)
    model.init_weights(torch.Generator().manual_seed(0))
    torch.nn.init.normal_(model.model.layers[0].block_sparse_moe.gate.weight)
    model.eval()
    ids = torch.randint(0, 50, (2, 12))
    from modularforge.model.transformer import KVCache

    full = model(ids)
    cache = KVCache(CFG, 2, 16)
    first = model(ids[:, :5], cache=cache, start=0)
    chunk = model(ids[:, 5:9], cache=cache, start=5)  # a multi-token chunk after cached tokens
    steps = [model(ids[:, t : t + 1], cache=cache, start=t) for t in range(9, 12)]
    torch.testing.assert_close(torch.cat([first, chunk, *steps], dim=1), full, atol=1e-5, rtol=1e-5)


def test_single_token_path_matches_the_batched_path():
    torch.manual_seed(3)
    moe = SparseMoE(32, 48, num_experts=4, top_k=2)
    torch.nn.init.normal_(moe.gate.weight)
    x = torch.randn(5, 1, 32)
    batched = moe(x.reshape(1, 5, 32)).reshape(5, 32)
    one_by_one = torch.cat([moe(x[i : i + 1]).reshape(1, 32) for i in range(5)])
    torch.testing.assert_close(one_by_one, batched, atol=1e-6, rtol=1e-5)
