"""The smoke pipeline end to end through the CLI, as a user runs it."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_smoke_pipeline_end_to_end(tmp_path):
    command = [sys.executable, "-m", "modularforge", "run", "--smoke-test", "--set", f"run.root={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "smoke"
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done" for s in
               ("prepare", "train-shared", "train-experts", "assemble", "calibrate", "evaluate"))
    report = json.loads((run / "reports" / "report.json").read_text())
    assert {"token", "anchor", "oracle", "sequence", "ensemble"} <= set(report["routing_modes"])
    assert report["headline"]["token"]["perplexity"] < 1024  # better than uniform over the vocabulary
    for name in ("report.md", "loss_curves.png", "routing.png"):
        assert (run / "reports" / name).stat().st_size > 0
    experts = report["experts"]
    assert [e["expert"] for e in experts] == ["expert_00", "expert_01", "expert_02", "expert_03"]
    for e in experts:  # each expert's own partition, anchor vs expert, and how training chose it
        assert e["gain"] == pytest.approx(1 - e["expert_perplexity"] / e["anchor_perplexity"], abs=1e-4)
        assert e["selection"]["best_loss"] <= e["selection"]["anchor_loss"]
    markdown = (run / "reports" / "report.md").read_text()
    assert "## What each expert adds over the anchor" in markdown
    worse = [str(e["expert"]) for e in experts if e["gain"] <= 0]
    assert (f"Not better than the anchor on its own partition: {', '.join(worse)}" in markdown) == bool(worse)
    for name in ("config.json", "tokenizer.json", "model.safetensors.index.json", "generation_config.json"):
        assert (run / "model" / name).exists()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stderr.count("already done, skipping") == 6
