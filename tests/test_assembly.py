from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import modularforge.safetensors_stream as stream
from modularforge.assemble import assemble
from modularforge.config import ModelConfig
from modularforge.errors import AssemblyError, DataError
from modularforge.files import load_tensors, read_json
from modularforge.model.transformer import CausalLM
from modularforge.model.weights import dense_shapes, ffn_key, ffn_to_expert


def _all_output_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in set(read_json(model_dir / "model.safetensors.index.json")["weight_map"].values()):
        with safe_open(str(model_dir / file), framework="pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def test_streaming_assembly_writes_back_bit_for_bit_what_it_read(trained_run):
    out = _all_output_tensors(trained_run.model_dir)
    shared = load_tensors(trained_run.shared_dir / "shared.safetensors")
    for name, tensor in shared.items():
        if name.endswith("post_attention_layernorm.weight") and trained_run.cfg.calibrate.norm:
            continue
        assert torch.equal(out[name], tensor), name
    for k in range(trained_run.cfg.model.num_experts):
        expert = load_tensors(trained_run.expert_dir(k) / "expert.safetensors")
        for name, tensor in expert.items():  # the expert's dense FFN, named by its position in the set
            assert torch.equal(out[ffn_to_expert(name, k)], tensor), name
    num_layers, experts = trained_run.cfg.model.num_layers, trained_run.cfg.model.num_experts
    assert out[f"model.layers.{num_layers - 1}.block_sparse_moe.gate.weight"].shape == (experts, 32)
    index = read_json(trained_run.model_dir / "model.safetensors.index.json")
    assert set(index["weight_map"]) == set(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())


def test_assembly_reads_each_tensor_once_and_one_expert_at_a_time(run_copy):
    reads = []
    assemble_fresh(run_copy, on_read=lambda path, name: reads.append((path.parent.name, name)))
    assert len(reads) == len(set(reads)), "a tensor was read twice"
    experts_in_order = [folder for folder, _ in reads if folder.startswith("expert_")]
    runs = [e for i, e in enumerate(experts_in_order) if i == 0 or e != experts_in_order[i - 1]]
    assert runs == sorted(set(runs)), f"experts were interleaved: {runs}"
    assert len(runs) == run_copy.cfg.model.num_experts


def test_tensor_bytes_are_copied_in_bounded_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "CHUNK_BYTES", 256)
    big = torch.randn(64, 64)
    src = tmp_path / "src.safetensors"
    stream.write_streaming(src, [stream.from_tensor("w", big)])
    table, _ = stream.read_header(src)
    writes = []

    class Recorder:
        def write(self, data):
            writes.append(bytes(data))

    stream.from_file(src, table["w"])[1](Recorder())
    assert max(len(w) for w in writes) == 256 and len(writes) == 64 * 64 * 4 // 256
    assert b"".join(writes) == big.numpy().tobytes()


def assemble_fresh(run, **kwargs):
    manifest = read_json(run.manifest_path)
    manifest["stages"].pop("assemble", None)
    from modularforge.files import write_json

    write_json(run.manifest_path, manifest)
    assemble(run, **kwargs)


def test_missing_expert_is_named_and_nothing_is_written(run_copy):
    import shutil

    shutil.rmtree(run_copy.model_dir)
    (run_copy.expert_dir(2) / "expert.safetensors").unlink()
    with pytest.raises(AssemblyError, match=r"expert_02/expert.safetensors"):
        assemble_fresh(run_copy)
    assert not run_copy.model_dir.exists()
    assert not any(p.name.startswith(".model") for p in run_copy.dir.iterdir())


def test_corrupted_expert_is_detected_by_checksum(run_copy):
    path = run_copy.expert_dir(1) / "expert.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    before = sorted(p.name for p in run_copy.model_dir.iterdir())
    with pytest.raises(AssemblyError, match=r"expert_01/expert.safetensors does not match the checksum"):
        assemble_fresh(run_copy)
    assert sorted(p.name for p in run_copy.model_dir.iterdir()) == before  # the old output is untouched


def test_truncated_file_is_reported_not_crashed_on(run_copy):
    path = run_copy.expert_dir(0) / "router_stats.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AssemblyError, match="router_stats.safetensors"):
        assemble_fresh(run_copy)


def test_expert_of_another_shape_is_a_config_mismatch_naming_the_file(run_copy):
    from modularforge.files import save_tensors

    path = run_copy.expert_dir(3) / "expert.safetensors"
    tensors = load_tensors(path)
    name = ffn_key(0, "w1")
    tensors[name] = torch.zeros(7, 32)
    save_tensors(path, tensors)
    with pytest.raises(AssemblyError, match=r"expert_03/expert.safetensors.*shape \[7, 32\]"):
        assemble_fresh(run_copy)


def test_streamed_file_is_a_valid_safetensors_file(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2).bfloat16()}
    stream.write_streaming(tmp_path / "x.safetensors", [stream.from_tensor(k, v) for k, v in tensors.items()], {"k": "v"})
    back = load_tensors(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    table, meta = stream.read_header(tmp_path / "x.safetensors")
    assert meta["k"] == "v" and table["a"].shape == (3, 4)


def test_calibration_reruns_from_the_uncalibrated_routers(run_copy):
    from modularforge.calibrate import calibrate

    shard = run_copy.model_dir / read_json(run_copy.model_dir / "model.safetensors.index.json")["weight_map"][
        "model.layers.0.block_sparse_moe.gate.weight"]
    before = load_tensors(shard)
    manifest = read_json(run_copy.manifest_path)
    manifest["stages"].pop("calibrate")
    from modularforge.files import write_json

    write_json(run_copy.manifest_path, manifest)
    calibrate(run_copy)  # a second calibration must not divide by the temperature twice
    after = load_tensors(shard)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_dense_shapes_from_the_config_match_the_built_model():
    for tie, kv in ((False, None), (True, 2)):
        cfg = ModelConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=kv,
                          max_seq_len=16, tie_embeddings=tie)
        with torch.device("meta"):
            model = CausalLM(cfg, vocab_size=50, moe=False)
        built = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
        assert dense_shapes(cfg, 50) == built


def test_read_tensors_gives_the_stored_tensors_in_their_own_memory(tmp_path):
    from safetensors.torch import save_file

    stored = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).bfloat16(),
              "scalar": torch.tensor(2.5)}
    save_file(stored, str(tmp_path / "t.safetensors"))
    read = stream.read_tensors(tmp_path / "t.safetensors", ["c", "a", "scalar", "b"])
    assert all(torch.equal(read[k], v) and read[k].dtype == v.dtype for k, v in stored.items())
    read["a"].add_(1)  # own memory: writable, and the file is untouched
    assert torch.equal(stream.read_tensors(tmp_path / "t.safetensors", ["a"])["a"], stored["a"])
    with pytest.raises(DataError, match="no tensor z"):
        stream.read_tensors(tmp_path / "t.safetensors", ["z"])


def test_calibration_skips_the_temperature_at_top_1(run_copy):
    from modularforge.calibrate import calibrate
    from modularforge.routers import compute_routers
    from modularforge.runs import Run

    cfg = run_copy.cfg.model_copy(update={"model": run_copy.cfg.model.model_copy(update={"top_k": 1})})
    run = Run(cfg, run_copy.dir)
    assemble(run)
    assert calibrate(run)["temperature"] is None
    gate = "model.layers.0.block_sparse_moe.gate.weight"
    shard = run.model_dir / read_json(run.model_dir / "model.safetensors.index.json")["weight_map"][gate]
    stats = [run.expert_files(k)["stats"] for k in range(cfg.model.num_experts)]
    torch.testing.assert_close(load_tensors(shard)[gate], compute_routers(cfg, stats)[gate])
