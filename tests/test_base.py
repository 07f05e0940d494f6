"""Starting from a pretrained base: tiny random Llama-family and Qwen3 models built by transformers from configs (and
written as GGUF files) become the run's trunk and anchor exactly, the exported MoE is the model transformers computes,
and every stage after works; bad bases are one-line errors that write nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bases import LLAMA3, base_sections, gguf_file
from modularforge.assemble import assemble
from modularforge.calibrate import calibrate
from modularforge.cli import main
from modularforge.config import ModelConfig
from modularforge.evaluate import FileScoring, evaluate_file
from modularforge.files import load_tensors, read_json
from modularforge.inference import open_model
from modularforge.model.weights import build_model
from modularforge.prepare import prepare
from modularforge.pretrained import open_base
from modularforge.runs import Run
from modularforge.train.experts import train_experts
from modularforge.train.shared import train_shared

transformers = pytest.importorskip("transformers")

TEXT = ("Fellow citizens of the Senate and of the House of Representatives: a hacker is a person who enjoys "
        "exploring the details of programmable systems and how to stretch their capabilities. ") * 6


def _base_run(make_config, base: Path, name: str = "base", **sections) -> Run:
    return Run(make_config(**base_sections(base, name, **sections)))


def _through(run: Run, *stages) -> Run:
    for stage in stages or (prepare, train_shared, train_experts, assemble, calibrate):
        stage(run)
    return run


def _hf_logits(folder: Path, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(ids).logits


# --- the base is the trunk and the anchor, and the export is the model transformers computes -------------------------

@pytest.mark.parametrize("family, architecture", [("llama", "MixtralForCausalLM"), ("qwen3", "Qwen3MoeForCausalLM")])
def test_a_base_becomes_the_trunk_and_the_export_is_what_transformers_computes(family, architecture, make_config,
                                                                                 request):
    base = request.getfixturevalue(f"{family}_base")
    run = _through(_base_run(make_config, base, experts={"select_margin": 0.0}))  # trained experts kept
    source = json.loads((base / "config.json").read_text())
    assert run.cfg.model.hidden_size == source["hidden_size"] and run.cfg.model.head_dim == source["head_dim"]
    theirs = {}
    for shard in base.glob("*.safetensors"):
        theirs |= load_tensors(shard)
    ours = load_tensors(run.shared_dir / "shared.safetensors") | load_tensors(run.shared_dir / "anchor.safetensors")
    renamed = {"mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w3", "mlp.down_proj": "mlp.w2"}
    for name, tensor in theirs.items():
        for hf, mine in renamed.items():
            name = name.replace(hf, mine)
        if name == "lm_head.weight" and source["tie_word_embeddings"]:
            continue
        assert torch.equal(ours[name], tensor), name  # exactly the base's weights

    config = read_json(run.model_dir / "config.json")
    assert config["architectures"] == [architecture]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):
        assert config[key] == source[key], key
    assert config["rope_parameters"] == source["rope_parameters"]  # theta and llama3 scaling, not a family default
    ids = torch.randint(0, run.vocab_size(), (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = open_model(run.model_dir).eval()(ids)
    assert (mine - _hf_logits(run.model_dir, ids)).abs().max().item() < 1e-4
    assert any(read_json(run.expert_dir(s.name) / "done.json")["selection"]["beats_anchor"]
               for s in run.experts())  # trained experts, so the comparison covers them and their routers


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_with_no_expert_trained_evaluate_gives_the_bases_own_perplexity(family, make_config, request, tmp_path):
    base = request.getfixturevalue(f"{family}_base")
    run = _through(_base_run(make_config, base, experts={"select_margin": 100.0}))  # every expert ships as the anchor
    assert not any(read_json(run.expert_dir(s.name) / "done.json")["selection"]["beats_anchor"] for s in run.experts())
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    ours = evaluate_file(run.model_dir, path, FileScoring(window=32))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base))
    ids = tokenizer(TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 32):
            chunk = ids[start : start + 32][None]
            if chunk.shape[1] > 1:
                nll += model(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
                count += chunk.shape[1] - 1
    assert ours["tokens"] == count
    assert abs(ours["perplexity"] / torch.exp(torch.tensor(nll / count)).item() - 1) < 1e-4


def test_continuing_the_trunk_from_the_base_trains_it_from_the_base(make_config, llama_base):
    run = _base_run(make_config, llama_base, budget={"base_trunk_tokens": 20 * 8 * 32})
    assert run.cfg.shared_steps > 0
    _through(run, prepare, train_shared)
    manifest = run.manifest()["stages"]["train-shared"]
    assert manifest["steps"] == run.cfg.shared_steps and manifest["base"] == str(llama_base)
    trained = load_tensors(run.shared_dir / "shared.safetensors")["model.embed_tokens.weight"]
    original = load_tensors(llama_base / "model.safetensors")["model.embed_tokens.weight"]
    assert not torch.equal(trained, original) and (trained - original).abs().max() < 0.1


def test_an_expert_of_a_frozen_base_takes_the_measured_base_rate(make_config, llama_base):
    from modularforge.config import BASE_EXPERT_LR

    run = _base_run(make_config, llama_base)
    assert run.cfg.shared_steps == 0 and run.cfg.expert_train.lr == BASE_EXPERT_LR


# --- GGUF bases -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("storage", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_a_gguf_base_dequantises_to_what_transformers_reads_from_it(storage, wide_base, tmp_path):
    pytest.importorskip("accelerate")  # transformers loads GGUF files through it
    path = gguf_file(wide_base, tmp_path / f"base.{storage}.gguf", storage)
    base = open_base(str(path))
    cfg = ModelConfig(**base.shape, architecture=base.architecture, max_seq_len=32)
    model = build_model(cfg, base.vocab_size, moe=False, tensors=dict(base.tensors())).eval()
    ids = torch.randint(0, base.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = model(ids)
    theirs = _hf_logits(path.parent, ids, gguf_file=path.name)
    assert (mine - theirs).abs().max().item() < 1e-4 * max(1.0, theirs.abs().max().item())


def test_a_gguf_with_llama3_rope_factors_is_the_folder_it_came_from(llama_base, tmp_path):
    path = gguf_file(llama_base, tmp_path / "base.gguf", "F32")
    base = open_base(str(path))
    assert base.shape["rope_scaling"] == LLAMA3
    cfg = ModelConfig(**base.shape, architecture=base.architecture, max_seq_len=32)
    model = build_model(cfg, base.vocab_size, moe=False, tensors=dict(base.tensors())).eval()
    ids = torch.randint(0, base.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - _hf_logits(llama_base, ids)).abs().max().item() < 1e-4


def test_a_gguf_qwen3_base_is_the_folder_it_came_from(qwen3_base, tmp_path):
    folder = tmp_path / "single"
    shutil.copytree(qwen3_base, folder)
    merged = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        merged |= load_tensors(shard)
        shard.unlink()
    (folder / "model.safetensors.index.json").unlink()
    from safetensors.torch import save_file

    save_file(merged, folder / "model.safetensors", metadata={"format": "pt"})
    base = open_base(str(gguf_file(folder, tmp_path / "qwen3.gguf", "F32")))
    assert base.architecture == "qwen3_moe" and base.shape["head_size"] == 32
    cfg = ModelConfig(**base.shape, architecture=base.architecture, max_seq_len=32)
    model = build_model(cfg, base.vocab_size, moe=False, tensors=dict(base.tensors())).eval()
    ids = torch.randint(0, base.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids) - _hf_logits(qwen3_base, ids)).abs().max().item() < 1e-4


# --- bad bases: one line, exit 2, nothing written ----------------------------------------------------------------------

def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _damaged(kind: str, llama_base: Path, wide_base: Path, tmp: Path) -> str:
    folder = tmp / "damaged"
    shutil.copytree(llama_base, folder)
    if kind == "no config":
        (folder / "config.json").unlink()
    elif kind == "no weights":
        (folder / "model.safetensors").unlink()
    elif kind == "truncated shard":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "unsupported architecture":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    elif kind == "attention bias":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    elif kind == "missing tensor":
        from safetensors.torch import save_file

        tensors = load_tensors(folder / "model.safetensors")
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    elif kind == "tokenizer larger than the embeddings":
        config = json.loads((folder / "config.json").read_text())
        from safetensors.torch import save_file

        tensors = load_tensors(folder / "model.safetensors")
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = tensors[name][:300].contiguous()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    elif kind == "unsupported gguf type":
        import gguf

        writer = gguf.GGUFWriter(tmp / "bad.gguf", "llama")
        writer.add_block_count(1)
        writer.add_tensor("token_embd.weight", torch.zeros(4, 8, dtype=torch.float64).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return str(tmp / "bad.gguf")
    elif kind == "unsupported gguf architecture":
        import gguf

        writer = gguf.GGUFWriter(tmp / "bad.gguf", "gpt2")
        writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return str(tmp / "bad.gguf")
    elif kind == "offline hub id":
        return "nobody-here/no-such-model"
    return str(folder)


@pytest.mark.parametrize("kind, message", [
    ("no config", "no config.json"),
    ("no weights", "no weights"),
    ("truncated shard", "damaged"),
    ("unsupported architecture", "'gpt_neox' model; supported: "),
    ("attention bias", "bias terms"),
    ("missing tensor", "missing ['model.layers.1.mlp.w3.weight']"),
    ("tokenizer larger than the embeddings", "does not belong to these weights"),
    ("unsupported gguf type", "F64, which cannot be dequantised"),
    ("unsupported gguf architecture", "architecture 'gpt2'; supported: "),
    ("offline hub id", "nobody-here/no-such-model"),
])
def test_a_bad_base_is_one_line_and_writes_nothing(kind, message, llama_base, wide_base, tmp_path, capsys,
                                                   monkeypatch):
    monkeypatch.setattr("modularforge.data.sources.hub_reachable", lambda *a, **k: False)
    base = _damaged(kind, llama_base, wide_base, tmp_path)
    root = tmp_path / "runs"
    code = main(["run", "--smoke-test", "--base", base, "--set", f"run.root={root}"])
    assert code == 2
    assert message in _one_error(capsys)
    assert not root.exists()


def test_a_base_changed_after_its_experts_were_trained_is_refused(make_config, llama_base, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    run = _through(_base_run(make_config, base), prepare, train_shared, train_experts)
    before = {p: p.read_bytes() for p in run.dir.rglob("*") if p.is_file() and p.name != ".lock"}
    from safetensors.torch import save_file

    tensors = load_tensors(base / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    for command in (["assemble"], ["run"], ["train-experts"]):
        assert main([*command, "--run-dir", str(run.dir)]) == 2
        assert "has changed since this run took its trunk from it" in _one_error(capsys)
    after = {p: p.read_bytes() for p in run.dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


# --- everything downstream, from the command line --------------------------------------------------------------------

def _tiny_data(corpus: Path) -> list[str]:
    """--set flags that point the smoke preset at the tiny corpus, split as the tiny config splits it."""
    return [arg for key, value in (("sources", f"[{corpus}]"), ("max_doc_chars", 1500), ("val_fraction", 0.1),
                                   ("calib_fraction", 0.1)) for arg in ("--set", f"data.{key}={value}")]


def test_smoke_run_from_a_base_then_every_command_after_it(llama_base, tiny_corpus, tmp_path, capsys):
    root = tmp_path / "runs"
    assert main(["run", "--smoke-test", "--base", str(llama_base), "--set", f"run.root={root}",
                 *_tiny_data(tiny_corpus)]) == 0
    run_dir = root / "smoke-base"
    report = read_json(run_dir / "reports" / "report.json")
    assert [e["expert"] for e in report["experts"]] == ["expert_00", "expert_01", "expert_02", "expert_03"]
    assert all(e["gain"] is not None for e in report["experts"])  # every expert's gain over the base, on its text
    capsys.readouterr()

    assert main(["generate", "--run-dir", str(run_dir), "--prompt", "The", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The")

    gguf = pytest.importorskip("gguf")
    out = tmp_path / "model.gguf"
    assert main(["export", "--run-dir", str(run_dir), "--dtype", "f32", "--out", str(out)]) == 0
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert "rope_freqs.weight" in {t.name for t in reader.tensors}  # Llama 3.x's scaling, as llama.cpp reads it

    new_text = tmp_path / "new.jsonl"
    shutil.copy(next((tiny_corpus / "jargon_file").glob("*.jsonl")), new_text)
    assert main(["add-expert", "--run-dir", str(run_dir), "--data", str(new_text), "--name", "jargon",
                 "--tokens", "256", "--set", "experts.fit_fraction=0"]) == 0
    assert read_json(run_dir / "model" / "config.json")["expert_names"][-1] == "jargon"
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main(["remove-expert", "--run-dir", str(copy), "jargon"]) == 0
    assert main(["import-expert", "--run-dir", str(copy), str(run_dir / "experts" / "jargon"), "--name",
                 "jargon2"]) == 0
    assert read_json(copy / "model" / "config.json")["expert_names"][-1] == "jargon2"


def test_an_upcycled_run_killed_mid_expert_resumes_to_the_same_expert(llama_base, tiny_corpus, tmp_path):
    args = [sys.executable, "-m", "modularforge", "run", "--smoke-test", "--base", str(llama_base),
            *_tiny_data(tiny_corpus), "--set", "budget.expert_tokens=12800",
            "--set", "experts.select_tokens=256", "--set", "experts.train.eval_interval=25"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.Popen([*args, "--set", f"run.root={tmp_path / 'killed'}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = tmp_path / "killed" / "smoke-base" / "experts" / "expert_00" / "ckpt.safetensors"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists(), "no checkpoint to resume from"
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    for root in ("killed", "whole"):
        subprocess.run([*args, "--set", f"run.root={tmp_path / root}"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for name in ("expert.safetensors", "router_stats.safetensors"):
        resumed = tmp_path / "killed" / "smoke-base" / "experts" / "expert_00" / name
        whole = tmp_path / "whole" / "smoke-base" / "experts" / "expert_00" / name
        assert resumed.read_bytes() == whole.read_bytes(), name
