"""Run.adopt_stage: a run takes another run's finished stage (its folders linked, the stage recorded done here with
the checksums of what it links), refuses what is not finished, and drops its later stages when what it adopted
changes."""

import pytest

from modularforge.assemble import assemble
from modularforge.errors import RunDirectoryError, StageOrderError
from modularforge.runs import Run
from modularforge.train.shared import train_shared


def test_a_run_adopts_finished_stages_and_drops_later_ones_when_they_change(run_copy, make_config, tmp_path):
    source = run_copy
    target = Run(source.cfg, tmp_path / "target")
    with pytest.raises(StageOrderError, match="prepare"):
        target.adopt_stage(source, "train-shared", ("shared",))  # the stage before is not done here
    assert not target.manifest_path.exists() and not (target.dir / "shared").exists()
    with pytest.raises(RunDirectoryError, match="missing"):
        target.adopt_stage(source, "prepare", ("data",))  # the tokenizer, also prepare's, is neither linked nor here

    for stage, folders in (("prepare", ("data", "tokenizer")), ("train-shared", ("shared",)),
                           ("train-experts", ("experts",))):
        target.adopt_stage(source, stage, folders)
        assert target.is_done(stage)
    assert target.shared_dir.resolve() == source.shared_dir.resolve()
    assert target.manifest()["stages"]["train-shared"]["shared_sha256"] == \
        source.manifest()["stages"]["train-shared"]["shared_sha256"]
    assemble(target)
    recorded = target.manifest_path.read_bytes()
    target.adopt_stage(source, "train-shared", ("shared",))  # unchanged: nothing to record, assembly stays done
    assert target.manifest_path.read_bytes() == recorded and target.is_done("assemble")

    other = Run(make_config(run={"name": "other"}, train={"lr": 1e-3}))  # another trunk on the same data
    other.adopt_stage(source, "prepare", ("data", "tokenizer"))
    with pytest.raises(StageOrderError, match="has not finished"):
        target.adopt_stage(other, "train-shared", ("shared",))
    train_shared(other)
    target.adopt_stage(other, "train-shared", ("shared",))
    assert target.shared_dir.resolve() == other.shared_dir.resolve()
    assert target.is_done("train-shared")
    assert set(target.manifest()["stages"]) == {"prepare", "train-shared"}  # experts and assembly were on the old
    assert source.is_done("assemble")  # the source is only read
