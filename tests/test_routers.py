"""Routers from statistics, and the routing-mode math, on tiny inputs."""

import math

import torch

from modularforge.config import ModelConfig
from modularforge.evaluate import window_nll
from modularforge.model.transformer import CausalLM
from modularforge.routers import RIDGE_SCALE, LayerStats, fold_bias, fold_direction, router_from_stats
from modularforge.sampling import sequence_choices


def _clusters(seed=0, experts=3, per=400, hidden=8, mean=5.0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(experts, hidden, generator=g) * spread + mean
    xs = [centres[e] + torch.randn(per, hidden, generator=g) for e in range(experts)]
    stats = LayerStats(hidden)
    for x in xs:
        x = x.double()
        stats.add(torch.tensor(float(len(x))), x.sum(0), x.T @ x)
    return xs, stats


def _accuracy(weight, xs):
    hits = sum((torch.argmax(x @ weight.T, 1) == e).sum().item() for e, x in enumerate(xs))
    return hits / sum(len(x) for x in xs)


def test_uniform_and_kaiming():
    _, stats = _clusters()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(router_from_stats("uniform", stats, 1e-2, True, g), torch.zeros(3, 8))
    a = router_from_stats("kaiming", stats, 1e-2, True, torch.Generator().manual_seed(1))
    b = router_from_stats("kaiming", stats, 1e-2, True, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.abs().max() <= 1 / 8**0.5 + 1e-6


def test_data_stats_rows_are_unit_centred_centroids():
    xs, stats = _clusters()
    w = router_from_stats("data_stats", stats, 1e-2, True, torch.Generator())
    mean = torch.cat(xs).mean(0)
    expected = torch.stack([x.mean(0) - mean for x in xs])
    torch.testing.assert_close(w, expected / expected.norm(dim=1, keepdim=True), atol=1e-4, rtol=1e-4)


def test_ridge_from_statistics_equals_ridge_on_the_data():
    xs, stats = _clusters()
    lam = 1e-2
    w = router_from_stats("ridge", stats, lam, False, torch.Generator()).double() / RIDGE_SCALE
    x = torch.cat(xs).double()
    y = torch.cat([torch.nn.functional.one_hot(torch.full((len(v),), e), 3) for e, v in enumerate(xs)]).double()
    gram = x.T @ x
    direct = torch.linalg.solve(gram + lam * torch.trace(gram) / 8 * torch.eye(8, dtype=torch.float64), x.T @ y).T
    torch.testing.assert_close(w, direct, atol=1e-5, rtol=1e-4)


def test_discriminative_routers_separate_clusters_better_than_centroids():
    xs, stats = _clusters(seed=3)
    g = torch.Generator()
    ridge = _accuracy(router_from_stats("ridge", stats, 1e-3, True, g), xs)
    lda = _accuracy(router_from_stats("lda", stats, 1e-3, True, g), xs)
    assert ridge > 0.95 and lda > 0.95


def test_folded_bias_is_the_least_squares_bias_free_fit_of_the_affine_logits():
    xs, stats = _clusters(mean=0.5)
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    x = torch.cat(xs).double()
    folded = fold_bias(w, b, fold_direction(stats))
    direct = torch.linalg.lstsq(x, x @ w.T + b).solution.T  # bias-free W' minimising |x W'^T - (x W^T + b)|^2
    torch.testing.assert_close(folded, direct, atol=1e-3, rtol=1e-3)


def test_fold_keeps_routing_when_the_mean_is_not_dominant(monkeypatch):
    # Router inputs whose pooled mean is a small part of their second moment, as measured on real ones: folding
    # LDA's bias along mu / |mu|^2 scales it by a token-dependent factor; the least-squares fold loses less.
    from modularforge import routers

    def lda_accuracy(xs, stats):
        return _accuracy(router_from_stats("lda", stats, 1e-3, True, torch.Generator()), xs)

    gains = []
    for seed in range(8):
        xs, stats = _clusters(seed=seed, experts=4, per=500, mean=0.5, spread=1.0)
        least_squares = lda_accuracy(xs, stats)
        with monkeypatch.context() as patch:
            patch.setattr(routers, "fold_direction", lambda s: s.pooled_mean / s.pooled_mean.dot(s.pooled_mean))
            along_mean = lda_accuracy(xs, stats)
        gains.append(least_squares - along_mean)
    assert min(gains) >= 0 and sum(gains) / len(gains) > 0.03


def test_ensemble_and_sequence_math_on_a_tiny_model():
    cfg = ModelConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, max_seq_len=16,
                      num_experts=3, top_k=2)
    model = CausalLM(cfg, vocab_size=20, moe=True)
    model.init_weights(torch.Generator().manual_seed(0))
    for block in model.moe_blocks():
        for e in block.experts:
            torch.nn.init.normal_(e.w2.weight, std=0.5, generator=torch.Generator().manual_seed(7))
    batch = torch.randint(0, 20, (2, 13), generator=torch.Generator().manual_seed(1))
    prefix = 4
    out = window_nll(model, None, batch, torch.tensor([2, 0]), prefix, {"oracle", "sequence", "ensemble"})
    per_expert = torch.stack([model.token_nll(batch, expert_ids=torch.full((2,), e)) for e in range(3)])
    prefix_nll = per_expert[:, :, : prefix - 1].sum(-1)  # (E, B)
    posterior = torch.softmax(-prefix_nll, dim=0)
    mixture = -torch.log((posterior[:, :, None] * torch.exp(-per_expert)).sum(0))
    torch.testing.assert_close(out["ensemble"], mixture, atol=1e-5, rtol=1e-5)
    chosen = prefix_nll.argmin(0)
    torch.testing.assert_close(out["sequence"], per_expert[chosen, torch.arange(2)])
    torch.testing.assert_close(out["oracle"], per_expert[torch.tensor([2, 0]), torch.arange(2)])
    revised = window_nll(model, None, batch, None, prefix, {"sequence", "sequence_fixed"}, revise_every=3)
    torch.testing.assert_close(revised["sequence_fixed"], out["sequence"])
    choice = sequence_choices(per_expert, prefix, 3)
    torch.testing.assert_close(revised["sequence"], per_expert.gather(0, choice[None])[0])


def test_sequence_choice_is_revised_from_the_text_so_far():
    # Expert 0 explains the prefix better; from position 4 on expert 1 is far better.
    nll = torch.zeros(2, 1, 12)
    nll[0, 0, :4], nll[1, 0, :4] = 1.0, 2.0
    nll[0, 0, 4:], nll[1, 0, 4:] = 3.0, 0.5
    fixed = sequence_choices(nll, prefix_len=4, revise_every=None)
    assert fixed.tolist() == [[0] * 12]
    # choices are made at t = 3 (the prefix's 3 predictions: 3 vs 6 nats), then at 7 and 11; the NLL of the
    # positions before 7 is 4 + 9 = 13 for expert 0 and 8 + 1.5 = 9.5 for expert 1
    revised = sequence_choices(nll, prefix_len=4, revise_every=4)
    assert revised.tolist() == [[0] * 7 + [1] * 5]
    # revised at every position, expert 1 first leads at t = 6 (10 vs 9 nats before it)
    assert sequence_choices(nll, prefix_len=4, revise_every=1).tolist() == [[0] * 6 + [1] * 6]


def test_grid_minimum_finds_the_valley_with_fewer_evaluations():
    from modularforge.calibrate import grid_minimum

    grid = [0.1, 0.2, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0, 5.0, 8.0]
    for best in grid:
        calls = []

        def loss(t, best=best, calls=calls):
            calls.append(t)
            return (math.log(t) - math.log(best)) ** 2

        assert grid_minimum(grid, loss) == (best, 0.0)
        assert len(set(calls)) == len(calls) <= 8
