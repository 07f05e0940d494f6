"""Routers computed without training, from each expert's router-input statistics (DESIGN.md section 3).

Statistics per expert e and layer: n_e (count), s_e (sum of x), S_e (sum of x x^T), gathered over its
own partition with itself in place. Methods:

- `uniform`: zeros; every expert equally likely (top-k then breaks ties by index).
- `kaiming`: the seed's default, a random `nn.Linear` initialisation.
- `data_stats`: the seed's centroids, W_e = mu_e / |mu_e| (centred on the pooled mean when `centred`).
- `ridge`: one-vs-rest least squares from x to the one-hot expert label, W = B (C + lam I)^-1, as DUME's
  closed-form router; C and B from the pooled (centred) statistics, the intercept is the expert's share
  of tokens. Its outputs approximate P(expert | x) in [0, 1], so they are multiplied by RIDGE_SCALE to
  serve as logits (a margin of 0.1 becomes a logit gap of 1); calibration then tunes the temperature.
- `lda`: linear discriminant with shared covariance: W_e = Sigma^-1 mu_e, b_e = -mu_e^T Sigma^-1 mu_e / 2.

A Mixtral router has no bias, so an affine router (W, b) is folded into bias-free rows with
`fold_bias`: W' = W + b v^T with v = S^-1 mu (S = E[x x^T], mu = E[x], pooled over experts), the
least-squares bias-free fit of the affine logits over the router inputs. The earlier fold along the mean,
v = mu / |mu|^2, assumed the pooled mean dominates the RMS-normalised states a router reads; in the quality
benchmark's experts it is 3-22% of E|x|^2, so x.v, which should be 1, varied from token to token with a
standard deviation of 0.37-1.04, scaling every bias by that noise; along S^-1 mu, 0.08-0.10 in layers 1-3
and 0.53 in layer 0. Ridge routers then put 2-3 points more tokens on their partition's expert per layer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modularforge.files import load_tensors, save_tensors
from modularforge.model.weights import gate_key

if TYPE_CHECKING:
    from modularforge.config import Config

RIDGE_SCALE = 10.0
CPU = "cpu"  # statistics are files and their maths a few (hidden x hidden) solves: both live on the CPU


class LayerStats:
    """Pooled statistics of one layer across experts, accumulated one expert at a time."""

    def __init__(self, hidden: int):
        self.counts: list[float] = []
        self.sums: list[torch.Tensor] = []
        self.second = torch.zeros(hidden, hidden, dtype=torch.float64, device=CPU)  # sum over experts of S_e
        self.within = torch.zeros(hidden, hidden, dtype=torch.float64, device=CPU)  # sum of S_e - n_e mu_e mu_e^T
        self.diag: list[torch.Tensor] = []  # diag(S_e) / n_e, per-channel second moment of each expert

    def add(self, count: torch.Tensor, total: torch.Tensor, xtx: torch.Tensor) -> None:
        n = float(count)
        self.counts.append(n)
        self.sums.append(total.clone())  # a loaded tensor can keep its whole file mapped (and resident)
        self.second += xtx
        self.within += xtx - torch.outer(total, total) / n
        self.diag.append(torch.diagonal(xtx) / n)

    @property
    def n(self) -> float:
        return sum(self.counts)

    @property
    def means(self) -> torch.Tensor:
        return torch.stack([s / n for s, n in zip(self.sums, self.counts)])

    @property
    def pooled_mean(self) -> torch.Tensor:
        return torch.stack(self.sums).sum(0) / self.n


def _regularised(matrix: torch.Tensor, lam: float) -> torch.Tensor:
    scale = torch.trace(matrix) / matrix.shape[0]
    return matrix + lam * scale * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)


FOLD_REGULARISER = 1e-3  # relative to the mean eigenvalue of S; keeps directions no token uses out of v


def fold_direction(stats: LayerStats) -> torch.Tensor:
    """v = S^-1 mu: x.v is the least-squares estimate of the constant 1 from a router input x."""
    return torch.linalg.solve(_regularised(stats.second / stats.n, FOLD_REGULARISER), stats.pooled_mean)


def fold_bias(weight: torch.Tensor, bias: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Bias-free rows W + b v^T whose logits W x + b (x.v) approximate the affine W x + b."""
    return weight + torch.outer(bias, direction)


def router_from_stats(method: str, stats: LayerStats, lam: float, centred: bool, generator: torch.Generator) -> torch.Tensor:
    """(num_experts, hidden) float32 router rows."""
    experts, hidden = len(stats.counts), stats.second.shape[0]
    mu = stats.pooled_mean
    if method == "uniform":
        return torch.zeros(experts, hidden, device=CPU)
    if method == "kaiming":
        weight = torch.empty(experts, hidden, device=CPU)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        return weight
    if method == "data_stats":
        centroids = stats.means - (mu if centred else 0)
        return (centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()
    if method == "ridge":
        counts = torch.tensor(stats.counts, dtype=torch.float64, device=CPU)
        if centred:
            cov = stats.second - stats.n * torch.outer(mu, mu)
            cross = torch.stack(stats.sums) - counts[:, None] * mu  # sum_n (y_ne - 0) (x_n - mu)
        else:
            cov, cross = stats.second, torch.stack(stats.sums)
        weight = torch.linalg.solve(_regularised(cov, lam), cross.T).T
        if centred:
            weight = fold_bias(weight, counts / stats.n - weight @ mu, fold_direction(stats))
        return (RIDGE_SCALE * weight).float()
    if method == "lda":
        cov = _regularised(stats.within / stats.n, lam)
        means = stats.means
        weight = torch.linalg.solve(cov, means.T).T  # Sigma^-1 mu_e
        bias = -0.5 * (weight * means).sum(1)
        return fold_bias(weight, bias, fold_direction(stats)).float()
    raise ValueError(f"unknown router method {method}")


# The router-statistics file (experts/expert_XX/router_stats.safetensors): float64 tensors per layer i,
# `layers.{i}.count` (n_e), `layers.{i}.sum` (s_e, hidden) and `layers.{i}.xtx` (S_e, hidden x hidden).

def stat_names(layer: int) -> tuple[str, str, str]:
    """The names of layer `layer`'s count, sum and X^T X in a router-statistics file."""
    return f"layers.{layer}.count", f"layers.{layer}.sum", f"layers.{layer}.xtx"


def stats_shapes(num_layers: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """The table of a router-statistics file, in file order: name -> shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(num_layers):
        count, total, xtx = stat_names(i)
        shapes |= {count: (), total: (hidden,), xtx: (hidden, hidden)}
    return shapes


def empty_stats(num_layers: int, hidden: int) -> dict[str, torch.Tensor]:
    """Zeroed float64 statistics of every layer, to accumulate into and then `save_stats`."""
    return {name: torch.zeros(shape, dtype=torch.float64, device=CPU)
            for name, shape in stats_shapes(num_layers, hidden).items()}


def save_stats(path: str | Path, stats: dict[str, torch.Tensor], metadata: dict[str, Any]) -> str:
    return save_tensors(path, stats, metadata)


def layer_stats(stats_paths: list[Path], layer: int, hidden: int) -> LayerStats:
    """One layer's statistics pooled over experts, reading one expert's file at a time."""
    pooled = LayerStats(hidden)
    names = stat_names(layer)
    for path in stats_paths:
        s = load_tensors(path, list(names))
        pooled.add(*(s[name] for name in names))
    return pooled


def compute_routers(cfg: Config, stats_paths: list[Path]) -> dict[str, torch.Tensor]:
    """Router rows of every layer (`assemble.router`), in closed form from the experts' statistics files."""
    generator = torch.Generator().manual_seed(cfg.run.seed)
    return {
        gate_key(i): router_from_stats(cfg.assemble.router, layer_stats(stats_paths, i, cfg.model.hidden_size),
                                       cfg.assemble.ridge_lambda, cfg.assemble.centred, generator)
        for i in range(cfg.model.num_layers)
    }
