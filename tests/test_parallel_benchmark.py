"""benchmarks/parallel.py: the straight-line fit states where modular reaches dense, and a copy of a run after
its shared phase, with a different `budget.expert_tokens`, reuses that shared phase (Run.adopt_stage)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import parallel as P  # noqa: E402

from modularforge.prepare import prepare  # noqa: E402
from modularforge.runs import Run  # noqa: E402
from modularforge.train.shared import train_shared  # noqa: E402


def test_fit_line_finds_the_crossover_and_says_on_which_side_modular_wins():
    x = [1.0, 10.0, 100.0]
    fit = P.fit_line(x, [1.1, 1.05, 1.0 - 0.0])  # ratio 1.1 - 0.05 * log10(x): 1.0 at x = 100
    assert fit["slope_per_decade"] == pytest.approx(-0.05)
    assert fit["crossover_tokens_per_parameter"] == pytest.approx(100.0)
    assert "inside" in fit["reading"] and "beats dense above it" in fit["reading"]
    flat = P.fit_line(x, [1.08, 1.0801, 1.0799])
    assert flat["crossover_tokens_per_parameter"] is None and "stays worse" in flat["reading"]
    assert P.fit_line([1.0], [1.0]) is None


def test_a_copy_after_the_shared_phase_with_other_expert_tokens_reuses_it(make_config):
    source = Run(make_config(run={"name": "source"}))
    prepare(source)
    train_shared(source)
    target = Run(make_config(run={"name": "copy"}, budget={"expert_tokens": 4096}))
    P.copy_after_shared(source, target)
    assert target.is_done("train-shared") and not target.is_done("train-experts")
    assert target.cfg.expert_steps != source.cfg.expert_steps
    assert target.shared_dir.resolve() == source.shared_dir.resolve()  # linked, not copied
    assert target.manifest()["stages"]["train-shared"]["adopted_from"] == str(source.dir.resolve())
    (target.dir / "marker").write_text("")
    P.copy_after_shared(source, target)  # unchanged source: the copy stays
    assert (target.dir / "marker").exists()
    other = Run(make_config(run={"name": "other"}, train={"lr": 1e-3}))
    with pytest.raises(RuntimeError, match="fingerprint"):  # its shared phase is not source's
        P.copy_after_shared(source, other)
