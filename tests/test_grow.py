"""Growing a model after assembly: add-expert, import-expert and remove-expert change the expert set and
re-assemble, and never retrain or rewrite another expert; bad input is one line and leaves the run as it was."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from modularforge.cli import main
from modularforge.data.batches import Windows
from modularforge.errors import DataError
from modularforge.expert_set import ExpertSpec, Registry
from modularforge.files import read_json, write_json
from modularforge.grow import add_experts, import_expert, remove_expert
from modularforge.inference import AssembledFolder
from modularforge.model.weights import ffn_to_expert
from modularforge.runs import Run
from modularforge.safetensors_stream import read_header
from modularforge.train.expert import train_expert
from modularforge.train.loop import Interrupted


def _new_text(path: Path, first: int = 34, count: int = 24, corpus: str = "jargon_file") -> Path:
    """Bundled documents the tiny corpus does not hold (it has the first 30 of each corpus), as a .jsonl file."""
    raw = (resources.files("modularforge.bundled") / f"{corpus}.jsonl.gz").read_bytes()
    records = [json.loads(line) for line in gzip.decompress(raw).decode().splitlines()][first : first + count]
    path.write_text("".join(json.dumps({"id": r["id"], "text": r["text"][:3000]}) + "\n" for r in records))
    return path


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _copy(run: Run, target: Path) -> Run:
    shutil.copytree(run.dir, target)
    (target / ".lock").unlink(missing_ok=True)
    return Run(run.cfg, target)


@pytest.fixture(scope="module")
def grown(trained_run, tmp_path_factory):
    """The tiny run with two experts added on new text (--clusters 2): six experts, not a power of two."""
    root = tmp_path_factory.mktemp("grown")
    run = _copy(trained_run, root / "run")
    text = _new_text(root / "new.jsonl")
    assert main(["add-expert", "--run-dir", str(run.dir), "--data", str(text), "--name", "jargon", "--clusters", "2"]) == 0
    return run


def test_add_expert_trains_only_the_new_experts_and_reassembles(trained_run, grown):
    before = _hashes(trained_run.experts_dir)
    after = _hashes(grown.experts_dir)
    assert all(after[name] == digest for name, digest in before.items())  # no other expert retrained or rewritten
    assert [s.name for s in grown.experts()] == ["expert_00", "expert_01", "expert_02", "expert_03", "jargon_0", "jargon_1"]
    config = read_json(grown.model_dir / "config.json")
    assert config["num_local_experts"] == 6 and config["expert_names"][4:] == ["jargon_0", "jargon_1"]
    folder = AssembledFolder(grown.model_dir)
    for j, spec in enumerate(grown.experts()):  # every expert's bytes copied as they are, at its position
        table, _ = read_header(grown.expert_files(spec.name)["expert"])
        for name, info in table.items():
            stored = folder.table[ffn_to_expert(name, j)]
            with open(grown.expert_files(spec.name)["expert"], "rb") as a, open(grown.model_dir / folder.files[stored.name], "rb") as b:
                a.seek(info.begin), b.seek(stored.begin)
                assert a.read(info.nbytes) == b.read(stored.nbytes), (spec.name, name)
    manifest = read_json(grown.manifest_path)
    assert all(manifest["stages"][s]["status"] == "done" for s in ("train-experts", "assemble", "calibrate", "evaluate"))
    (change,) = manifest["changes"]  # what the command did and what each step cost
    assert change["command"] == "add-expert" and change["added"] == ["jargon_0", "jargon_1"] and not change["removed"]
    assert set(change["steps"]) == {"add-expert", "train-experts", "assemble", "calibrate", "evaluate"}
    assert all(step["peak_rss_mb"] > 0 for step in change["steps"].values())
    report = read_json(grown.reports_dir / "report.json")
    assert report["partition_labels"] == ["p0", "p1", "p2", "p3", "jargon_0", "jargon_1"]
    rows = {e["expert"]: e for e in report["experts"]}
    assert rows["jargon_0"]["gain"] is not None and rows["jargon_1"]["anchor_perplexity"] > 0
    assert len(report["routing_modes"]["oracle"]["per_partition"]) == 6
    markdown = (grown.reports_dir / "report.md").read_text()
    assert "| mode | p0 | p1 | p2 | p3 | jargon_0 | jargon_1 |" in markdown


def test_a_grown_model_loads_in_transformers_with_the_same_logits(grown):
    transformers = pytest.importorskip("transformers")
    from modularforge.inference import open_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(grown.model_dir, dtype=torch.float32).eval()
    assert hf.config.num_local_experts == 6
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - open_model(grown.model_dir).eval()(ids)).abs().max().item() < 1e-4


def test_a_grown_model_exports_to_gguf_with_its_expert_count_and_names(grown, tmp_path):
    gguf = pytest.importorskip("gguf")
    from modularforge.export import export

    path = export(grown.model_dir, "gguf", tmp_path / "grown.gguf", "f32")
    reader = gguf.GGUFReader(path)
    fields = {f.name: f for f in reader.fields.values()}
    assert int(fields["llama.expert_count"].parts[-1][0]) == 6
    names = [bytes(fields["modularforge.expert_names"].parts[i]).decode() for i in fields["modularforge.expert_names"].data]
    assert names == [s.name for s in grown.experts()]
    gate = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate_exps.weight")
    assert list(gate.shape)[-1] == 6  # gguf lists dimensions innermost first


def test_remove_and_import_change_only_the_set(grown, tmp_path):
    run = _copy(grown, tmp_path / "run")
    partner = _copy(grown, tmp_path / "partner")  # another copy of the run: same trunk, trained elsewhere
    before = _hashes(run.experts_dir)
    assert main(["remove-expert", "--run-dir", str(run.dir), "expert_01"]) == 0
    assert [s.name for s in run.experts()] == ["expert_00", "expert_02", "expert_03", "jargon_0", "jargon_1"]
    assert _hashes(run.experts_dir).items() >= {k: v for k, v in before.items() if k != "registry.json"}.items()
    assert read_json(run.model_dir / "config.json")["num_local_experts"] == 5
    report = read_json(run.reports_dir / "report.json")
    assert report["routing_modes"]["oracle"]["per_partition"][1] is None  # p1's expert is gone: no oracle there
    assert "over the partitions it scores only" in (run.reports_dir / "report.md").read_text()

    assert main(["add-expert", "--run-dir", str(partner.dir), "--data", str(_new_text(tmp_path / "more.jsonl", 40, 20, "us_state_of_the_union")),
                 "--name", "lexicon"]) == 0
    before = _hashes(run.experts_dir)
    assert main(["import-expert", "--run-dir", str(run.dir), str(partner.expert_dir("lexicon"))]) == 0
    assert [s.name for s in run.experts()][-1] == "lexicon"
    after = _hashes(run.experts_dir)
    assert all(after[k] == v for k, v in before.items() if k != "registry.json")
    for name in ("expert.safetensors", "router_stats.safetensors"):
        assert (run.expert_dir("lexicon") / name).read_bytes() == (partner.expert_dir("lexicon") / name).read_bytes()
    assert read_json(run.model_dir / "config.json")["expert_names"][-1] == "lexicon"
    assert next(e for e in read_json(run.reports_dir / "report.json")["experts"] if e["expert"] == "lexicon")["gain"] is None


def test_an_experts_fingerprint_does_not_depend_on_the_others(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path / "run")
    fingerprints = {s.name: run.expert_fingerprint(s) for s in run.experts()}
    registry = Registry(["expert_02"], [ExpertSpec("extra", "added", data="added/extra", partition=0, data_sha256="ab" * 32)])
    registry.save(run.experts_dir)
    assert {s.name: run.expert_fingerprint(s) for s in run.experts() if s.name in fingerprints} == {
        n: f for n, f in fingerprints.items() if n != "expert_02"}
    assert run.fingerprint("train-experts") != trained_run.fingerprint("train-experts")  # the set is part of the stage
    other = Run(run.cfg.model_copy(update={"experts": run.cfg.experts.model_copy(update={"stats_tokens": 256})}), run.dir)
    assert all(other.expert_fingerprint(s) != fingerprints[s.name] for s in other.experts() if s.name in fingerprints)


def _refused(argv: list[str], capfd, run: Run, message: str) -> None:
    before = _hashes(run.dir)
    assert main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert _hashes(run.dir) == before  # the run is as it was


def test_bad_additions_are_one_line_errors_that_change_nothing(run_copy, tmp_path, capfd):
    d = str(run_copy.dir)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"id": "x", "text": "too short"}) + "\n")
    _refused(["add-expert", "--run-dir", d, "--data", str(empty)], capfd, run_copy, "no training data")
    _refused(["add-expert", "--run-dir", d, "--data", str(tmp_path / "missing.jsonl")], capfd, run_copy, "missing.jsonl")
    text = _new_text(tmp_path / "new.jsonl")
    _refused(["add-expert", "--run-dir", d, "--data", str(text), "--name", "expert_02"], capfd, run_copy, "in use")
    _refused(["add-expert", "--run-dir", d, "--data", str(text), "--name", "../up"], capfd, run_copy, "not a plain name")
    _refused(["remove-expert", "--run-dir", d, "expert_09"], capfd, run_copy, "no expert named 'expert_09'")


def test_removing_the_last_expert_or_going_below_top_k_is_refused(run_copy, capfd):
    Registry(["expert_01", "expert_02"], []).save(run_copy.experts_dir)
    _refused(["remove-expert", "--run-dir", str(run_copy.dir), "expert_00"], capfd, run_copy, "fewer than model.top_k=2")
    Registry(["expert_01", "expert_02", "expert_03"], []).save(run_copy.experts_dir)
    with pytest.raises(DataError, match="expert_00 is the last expert"):
        remove_expert(run_copy, "expert_00")


def _fake_expert(source: Run, target: Path, **done_changes) -> Path:
    shutil.copytree(source.expert_dir(0), target)
    done = read_json(target / "done.json")
    write_json(target / "done.json", {**done, **done_changes})
    return target


def test_an_expert_from_another_trunk_tokenizer_or_shape_is_refused(run_copy, tmp_path, capfd):
    d = str(run_copy.dir)
    trunk = read_json(run_copy.expert_dir(0) / "done.json")["trunk"]
    other_trunk = _fake_expert(run_copy, tmp_path / "a", trunk={**trunk, "shared": "0" * 64})
    _refused(["import-expert", "--run-dir", d, str(other_trunk), "--name", "a"], capfd, run_copy, "another trunk")
    other_tokenizer = _fake_expert(run_copy, tmp_path / "b", trunk={**trunk, "tokenizer": "1" * 64})
    _refused(["import-expert", "--run-dir", d, str(other_tokenizer), "--name", "b"], capfd, run_copy, "another tokenizer")
    old = _fake_expert(run_copy, tmp_path / "c", trunk=None)
    _refused(["import-expert", "--run-dir", d, str(old), "--name", "c"], capfd, run_copy, "does not record the trunk")
    _refused(["import-expert", "--run-dir", d, str(_fake_expert(run_copy, tmp_path / "expert_01"))], capfd, run_copy,
             "in use")
    wide = _fake_expert(run_copy, tmp_path / "d")
    from modularforge.files import load_tensors, save_tensors, sha256_file

    tensors = load_tensors(wide / "expert.safetensors")
    tensors["model.layers.0.mlp.w1.weight"] = torch.zeros(65, 32)
    save_tensors(wide / "expert.safetensors", tensors)
    done = read_json(wide / "done.json")
    write_json(wide / "done.json", {**done, "sha256": {**done["sha256"], "expert": sha256_file(wide / "expert.safetensors")}})
    _refused(["import-expert", "--run-dir", d, str(wide), "--name", "d"], capfd, run_copy, "has shape [65, 32]")
    with pytest.raises(DataError, match="is not a folder"):
        import_expert(run_copy, tmp_path / "nowhere")


def test_an_add_that_stopped_before_training_resumes_on_the_same_text_only(run_copy, tmp_path):
    text = _new_text(tmp_path / "new.jsonl")
    (spec,) = add_experts(run_copy, [str(text)], name="late")  # registered; its training never ran
    assert add_experts(run_copy, [str(text)], name="late") == [spec]
    with pytest.raises(DataError, match="added from other text"):
        add_experts(run_copy, [str(_new_text(tmp_path / "other.jsonl", 40, 20, "us_state_of_the_union"))], name="late")


def test_replay_mixes_the_trunks_text_into_an_added_experts_batches(run_copy, tmp_path, monkeypatch):
    text = _new_text(tmp_path / "new.jsonl")
    with pytest.raises(DataError, match="--replay must be"):
        add_experts(run_copy, [str(text)], name="mixed", replay=1.0)
    (mixed,) = add_experts(run_copy, [str(text)], name="mixed", replay=0.25)
    assert mixed.replay == 0.25 and run_copy.registry().added[-1].replay == 0.25
    unmixed = ExpertSpec(**{**mixed.to_json(), "replay": None})
    assert run_copy.expert_fingerprint(mixed) != run_copy.expert_fingerprint(unmixed)  # the same text, another expert
    with pytest.raises(DataError, match="another --replay"):
        add_experts(run_copy, [str(text)], name="mixed", replay=0.5)
    sampled = []
    real_sample = Windows.sample

    def recording_sample(self, rng, batch, seq_len):
        sampled.append((self.name, batch))
        return real_sample(self, rng, batch, seq_len)

    monkeypatch.setattr(Windows, "sample", recording_sample)
    with pytest.raises(Interrupted):
        train_expert(run_copy, mixed, stop_after=1)
    per_step = run_copy.cfg.expert_train.batch_size
    replayed = round(0.25 * per_step)
    assert sampled == [("train documents of partition 0", per_step - replayed),
                       ("train documents of all partitions", replayed)]


def test_an_added_expert_is_fitted_into_the_model_it_joins(run_copy, tmp_path):
    from modularforge.data.batches import LABEL_SHIFT
    from modularforge.inference import open_model
    from modularforge.train.fit import OLDER, FitLoss, before_the_add, fit_steps, grown_model

    text = _new_text(tmp_path / "new.jsonl")
    (fitted,) = add_experts(run_copy, [str(text)], name="fitted")
    set_before = {s.name: read_json(run_copy.expert_dir(s.name) / "done.json")["fingerprint"] for s in run_copy.experts()
                  if s.name != "fitted"}
    assert fitted.fit_into["experts"] == set_before  # the set it joins, as registered
    assert run_copy.registry().added[-1].fit_into == fitted.fit_into
    plain = ExpertSpec(**{**fitted.to_json(), "name": "plain", "fit_into": None})
    assert run_copy.expert_fingerprint(fitted) != run_copy.expert_fingerprint(plain)
    summary = train_expert(run_copy, fitted)
    assert summary["fit"]["steps"] == fit_steps(run_copy, fitted) and summary["fit"]["into"] == list(set_before)
    batch, seq_len = run_copy.cfg.expert_train.batch_size, run_copy.cfg.seq_len(run_copy.cfg.expert_train)
    assert summary["fit"]["own_tokens"] == summary["fit"]["older_tokens"] == summary["fit"]["steps"] * batch // 2 * seq_len
    assert not (run_copy.expert_dir("fitted") / "fit").exists()
    train_expert(run_copy, plain)  # the same expert trained alone, not fitted

    def weights(name):
        from modularforge.safetensors_stream import read_tensors
        return read_tensors(run_copy.expert_files(name)["expert"])

    joined, temperature = list(set_before), fitted.fit_into["temperature"]
    stats = run_copy.expert_files("fitted")["stats"]
    model, older_rows = grown_model(run_copy, joined, weights("plain"), stats, temperature)
    # the fit's reference is the model before the add, as calibrated: the run's assembled model
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), before_the_add(model, older_rows):
        reference = model(ids)
    assert (reference - open_model(run_copy.model_dir).eval()(ids)).abs().max().item() < 1e-4
    # fitting lowers the grown model's loss on a batch of the new text and of the older text
    from modularforge.data.batches import PreparedData
    from modularforge.data.shards import CALIB, TRAIN
    own = PreparedData(run_copy.dir / fitted.data).windows((TRAIN, CALIB), 0).sample(np.random.default_rng(0), 8, 32)
    older = PreparedData(run_copy.data_dir).windows(CALIB).sample(np.random.default_rng(0), 8, 32)
    batch = torch.cat([own, older | (OLDER << LABEL_SHIFT)])
    losses = {}
    for name in ("plain", "fitted"):
        model, older_rows = grown_model(run_copy, joined, weights(name), stats, temperature)
        with torch.no_grad():
            losses[name] = FitLoss(model.eval(), older_rows, run_copy.cfg.experts.fit_distill)(batch).item()
    assert losses["fitted"] < losses["plain"], losses


def test_fitting_can_be_turned_off_and_needs_a_trained_set(run_copy, tmp_path):
    off = Run(run_copy.cfg.model_copy(update={"experts": run_copy.cfg.experts.model_copy(update={"fit_fraction": 0.0})}),
              run_copy.dir)
    (spec,) = add_experts(off, [str(_new_text(tmp_path / "new.jsonl"))], name="alone")
    assert spec.fit_into is None
    (run_copy.expert_dir("expert_01") / "done.json").unlink()  # an expert of the set not trained: nothing to fit into
    (spec,) = add_experts(run_copy, [str(_new_text(tmp_path / "other.jsonl", 40, 20, "us_state_of_the_union"))],
                          name="early")
    assert spec.fit_into is None
