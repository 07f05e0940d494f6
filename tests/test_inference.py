import json

import pytest

from modularforge.errors import DataError
from modularforge.inference import AssembledFolder, open_model
from modularforge.model.weights import expert_key, gate_key


def test_a_folder_is_checked_before_any_weight_is_read_however_it_is_opened(run_copy):
    index_path = run_copy.model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["router_row.layers.0"] = index["weight_map"][gate_key(0)]
    index_path.write_text(json.dumps(index))
    for cache in (None, 1):
        with pytest.raises(DataError, match="has no place for: router_row.layers.0"):
            open_model(run_copy.model_dir, expert_cache=cache)
    del index["weight_map"]["router_row.layers.0"]
    index_path.write_text(json.dumps(index))
    shard = run_copy.model_dir / index["weight_map"][expert_key(0, 1, "w1")]
    shard.unlink()
    with pytest.raises(DataError, match=f"missing file: .*{shard.name}"):
        AssembledFolder(run_copy.model_dir)


def test_the_reader_reads_one_tensor_or_one_expert_as_the_full_model_holds_them(trained_run):
    folder = AssembledFolder(trained_run.model_dir)
    model = open_model(folder)
    block = model.moe_blocks()[1]
    assert folder.read(gate_key(1)).equal(block.gate.weight)
    expert = folder.expert(1, 2)
    assert all(getattr(expert, w).weight.equal(getattr(block.experts[2], w).weight) for w in ("w1", "w2", "w3"))
    assert folder.shapes[gate_key(1)] == tuple(block.gate.weight.shape)
