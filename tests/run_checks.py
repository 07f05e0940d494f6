"""Comparisons of two runs' files that several tests make: the same tensors, the same logged loss curve."""

import json
from pathlib import Path

import torch

from modularforge.files import load_tensors


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_tensors(a), load_tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def loss_curve(path: Path) -> list[tuple]:
    """(step, loss, validation loss) of every line of a metrics.jsonl."""
    return [(m["step"], m["loss"], m.get("val_loss")) for m in map(json.loads, path.read_text().splitlines())]
