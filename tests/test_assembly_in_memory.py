"""assemble.assemble_in_memory: the model `assemble` writes, built in memory with the same checks, writing nothing."""

import pytest
import torch

from modularforge.assemble import assemble, assemble_in_memory
from modularforge.errors import AssemblyError
from modularforge.inference import open_model


def _files(run) -> dict[str, int]:
    return {str(p.relative_to(run.dir)): p.stat().st_mtime_ns for p in run.dir.rglob("*") if p.is_file()}


def test_the_in_memory_model_is_the_assembled_folder_before_calibration(run_copy):
    assemble(run_copy)  # the fixture's folder is calibrated: write it again as assembly leaves it
    before = _files(run_copy)
    in_memory = assemble_in_memory(run_copy).eval()
    assert _files(run_copy) == before
    reopened = open_model(run_copy.model_dir).eval()
    state, expected = in_memory.state_dict(), reopened.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    ids = torch.randint(0, run_copy.vocab_size(), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(in_memory(ids), reopened(ids))


def test_in_memory_assembly_checks_its_inputs_as_assembly_does(run_copy):
    stats = run_copy.expert_files(run_copy.experts()[1].name)["stats"]
    damaged = bytearray(stats.read_bytes())
    damaged[-1] ^= 0xFF  # one byte of the last statistic: the header still reads
    stats.write_bytes(bytes(damaged))
    before = _files(run_copy)
    with pytest.raises(AssemblyError, match="checksum") as error:
        assemble_in_memory(run_copy)
    assert str(stats) in str(error.value)
    assert _files(run_copy) == before
    with pytest.raises(AssemblyError, match="checksum"):
        assemble(run_copy)
