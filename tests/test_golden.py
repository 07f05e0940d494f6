"""Golden-loss test: a tiny fixed run (conftest's tiny config, fp32) through prepare, train-shared, train-experts,
assemble and calibrate must reproduce the committed loss curves and final logits, so a refactor that changes
what any stage computes fails here (torchtitan's golden-loss files).

Regenerate the committed file only when a change is meant to alter results:
    MODULARFORGE_UPDATE_GOLDEN=1 OMP_NUM_THREADS=1 python -m pytest -q tests/test_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from modularforge.files import read_json
from modularforge.inference import open_model

GOLDEN = Path(__file__).parent / "golden" / "tiny_run.json"
TOLERANCE = 1e-5
# metrics.jsonl stores losses rounded to 5 decimals: two runs within 1e-5 may round one step apart
ROUNDING = 1e-5 + 1e-9
CURVE_KEYS = ("loss", "val_loss", "lr")
EXPERTS = (0, 1)


def _curve(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [{"step": r["step"], **{k: r[k] for k in CURVE_KEYS if k in r}} for r in records]


def _logits_summary(model_dir: Path) -> dict:
    model = open_model(model_dir)
    vocab = read_json(model_dir / "config.json")["vocab_size"]
    batch = (torch.arange(2 * 16).reshape(2, 16) * 37 + 11) % vocab  # (B, T) fixed token ids
    with torch.no_grad():
        logits = model(batch).float()  # (B, T, V)
    return {
        "shape": list(logits.shape),
        "first_64": [round(v, 7) for v in logits.flatten()[:64].tolist()],
        "last_position_first_16": [round(v, 7) for v in logits[:, -1, :8].flatten().tolist()],
        "mean": logits.mean().item(),
        "mean_abs": logits.abs().mean().item(),
    }


def _observed(run) -> dict:
    return {
        "shared": _curve(run.shared_dir / "metrics.jsonl"),
        "experts": {str(k): _curve(run.expert_dir(k) / "metrics.jsonl") for k in EXPERTS},
        "logits": _logits_summary(run.model_dir),
    }


def _assert_curve(observed: list[dict], golden: list[dict], name: str) -> None:
    assert [r["step"] for r in observed] == [r["step"] for r in golden], f"{name}: logged steps differ"
    for got, want in zip(observed, golden):
        assert set(got) == set(want), f"{name} step {want['step']}: fields differ"
        for key in CURVE_KEYS:
            if key in want:
                assert got[key] == pytest.approx(want[key], abs=ROUNDING, rel=0), f"{name} step {want['step']} {key}"


@pytest.mark.skipif(os.environ.get("MODULARFORGE_TEST_DEVICE", "cpu") != "cpu",
                    reason="the golden numbers are the CPU's fp32 ones; other devices round differently")
def test_tiny_run_reproduces_golden_losses_and_logits(trained_run):
    observed = _observed(trained_run)
    if os.environ.get("MODULARFORGE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(observed, indent=1) + "\n")  # then compared like any other run's
    golden = json.loads(GOLDEN.read_text())
    _assert_curve(observed["shared"], golden["shared"], "shared")
    for k, curve in golden["experts"].items():
        _assert_curve(observed["experts"][k], curve, f"expert {k}")
    got, want = observed["logits"], golden["logits"]
    assert got["shape"] == want["shape"]
    for key in ("first_64", "last_position_first_16"):
        assert got[key] == pytest.approx(want[key], abs=TOLERANCE, rel=0), key
    for key in ("mean", "mean_abs"):
        assert got[key] == pytest.approx(want[key], abs=TOLERANCE, rel=0), key
