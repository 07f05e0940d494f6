"""Every file the tool reads may be damaged: valid JSON of the wrong shape, a missing key, a
value of the wrong type, a truncated file. The command that reads it stops with one `error:` line naming the file,
exit 2, and nothing in the run directory changes (not even the manifest); a fuzz test mutates the files at random."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modularforge import cli
from modularforge.cli import main
from modularforge.errors import DataError
from modularforge.files import read_json
from modularforge.schemas import Report


def _state(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `root` with its mtime and bytes (the lock file, which every writer rewrites, aside)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _one_error(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# --- how a file gets damaged ------------------------------------------------------------------------------------------

def _edit(change: Callable[[object], object]) -> Callable[[Path], None]:
    """A damage that rewrites a JSON file through `change(parsed) -> new value`."""
    def damage(path: Path) -> None:
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return damage


def _set(keys: str, value: object) -> Callable[[Path], None]:
    """Set the value at `keys` ("a/0/b") to `value`."""
    def change(doc):
        node = doc
        parts = [int(k) if k.isdigit() else k for k in keys.split("/")]
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
        return doc
    return _edit(change)


def _drop(key: str) -> Callable[[Path], None]:
    return _edit(lambda doc: {k: v for k, v in doc.items() if k != key})


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _middle_line(path: Path) -> None:
    lines = path.read_text().splitlines()
    lines[0] = json.dumps({"step": "ten", "loss": 5.0})
    path.write_text("\n".join(lines) + "\n")


def _registry(run_dir: Path) -> None:
    (run_dir / "experts" / "registry.json").write_text(json.dumps({"removed": [], "added": []}))


RUN = ["--run-dir", "{run}"]
GENERATE = ["generate", *RUN, "--prompt", "The", "--max-new-tokens", "2"]

# file kind -> (the file, its damage, the command that reads it, what the error says); one case per kind
CASES = {
    "manifest": ("manifest.json", _set("stages", []), ["assemble", *RUN], "'stages' must be a mapping, got a list"),
    "registry": ("experts/registry.json", _set("removed", "expert_01"), ["remove-expert", *RUN, "expert_02"],
                 "'removed' must be a list"),
    "done.json": ("experts/expert_00/done.json", _set("sha256", ["bf29", "0da3"]), ["assemble", *RUN],
                  "'sha256' must be a mapping, got a list"),
    "shards.json": ("data/shards.json", _drop("vocab_size"), ["assemble", *RUN], "'vocab_size' is missing"),
    "documents.json": ("data/documents.json", _set("ids", 190), ["calibrate", *RUN], "'ids' must be a list"),
    "documents.npz": ("data/documents.npz", _truncate, ["calibrate", *RUN], "is not a readable .npz file"),
    "partition.npz": ("data/partition.npz", _truncate, ["train-shared", *RUN], "is not a readable .npz file"),
    "partitions.json": ("data/partitions.json", _set("partitions/1/sources", ["jargon_file"]), ["evaluate", *RUN],
                        "'partitions[1].sources' must be a mapping"),
    "metrics.jsonl": ("shared/metrics.jsonl", _middle_line, ["evaluate", *RUN],
                      "line 1: 'step' must be a whole number"),
    "token shard": ("data/tokens-00000.bin", _truncate, ["calibrate", *RUN], "has the wrong size"),
    "model config.json": ("model/config.json", _edit(lambda doc: [doc]), GENERATE, "expected a JSON object"),
    "weight index": ("model/model.safetensors.index.json", _set("weight_map/lm_head.weight", "../../shared.bin"),
                     GENERATE, "must be a plain file name"),
    "modularforge.json": ("model/modularforge.json", _set("calibration", {"temperature": "0.5"}),
                          ["calibrate", *RUN], "'calibration.temperature' must be a list"),
    "model shard": ("model/model-00006-of-00006.safetensors", _truncate, ["calibrate", *RUN], "the file is damaged"),
    "expert weights": ("experts/expert_01/expert.safetensors", _truncate, ["assemble", *RUN], "the file is damaged"),
    "checkpoint": ("shared/ckpt.safetensors", _truncate, ["train-shared", *RUN], "cannot read"),
    "tokenizer.json": ("model/tokenizer.json", _set("model", "BPE"), GENERATE, "cannot read tokenizer"),
    "tokenizer_config.json": ("tokenizer/tokenizer_config.json", _set("eos_token", 0), ["assemble", *RUN],
                              "'eos_token' must be a token"),
    "config.yaml": ("config.yaml", lambda path: path.write_text("- run\n- model\n"), ["assemble", *RUN],
                    "must hold a mapping of sections, not list"),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_a_damaged_file_is_one_line_naming_it_and_changes_nothing(run_copy, kind, capfd):
    rel, damage, command, message = CASES[kind]
    if rel == "experts/registry.json":
        _registry(run_copy.dir)
    path = run_copy.dir / rel
    damage(path)
    before = _state(run_copy.dir)
    assert main([arg.format(run=run_copy.dir) for arg in command]) == 2
    err = _one_error(capfd.readouterr().err)
    assert str(path) in err and message in err, err
    assert _state(run_copy.dir) == before


def test_the_grow_commands_read_done_json_before_they_write(run_copy, tmp_path, capfd):
    """add-expert reads the done.json of the set it joins before it writes added/<name>/; import-expert reads the
    one it imports (outside the run) before it writes anything."""
    done = run_copy.dir / "experts" / "expert_02" / "done.json"
    _drop("fingerprint")(done)
    before = _state(run_copy.dir)
    text = tmp_path / "new.txt"
    text.write_text("New text for a new expert. " * 400)
    assert main(["add-expert", "--run-dir", str(run_copy.dir), "--data", str(text)]) == 2
    err = _one_error(capfd.readouterr().err)
    assert str(done) in err and "'fingerprint' is missing" in err
    assert _state(run_copy.dir) == before

    elsewhere = tmp_path / "expert_01"
    shutil.copytree(run_copy.dir / "experts" / "expert_01", elsewhere)
    (elsewhere / "done.json").write_text("[]")
    assert main(["import-expert", "--run-dir", str(run_copy.dir), str(elsewhere), "--name", "copy"]) == 2
    err = _one_error(capfd.readouterr().err)
    assert str(elsewhere / "done.json") in err and "expected a JSON object, got a list" in err
    assert _state(run_copy.dir) == before


def test_run_redoes_evaluate_when_its_report_is_damaged(run_copy, monkeypatch, capsys):
    """`run` prints the report at the end; a damaged report.json no longer matches evaluate's record, so `run`
    evaluates again instead of reading it (and a report of the wrong shape is refused by its schema)."""
    assert main(["evaluate", "--run-dir", str(run_copy.dir)]) == 0
    report = run_copy.reports_dir / "report.json"
    report.write_text(json.dumps({"headline": [], "samples": {}}))
    with pytest.raises(DataError, match="'headline' must be a mapping"):
        read_json(report, Report)
    stages = []
    monkeypatch.setattr(cli.subprocess, "call", lambda command, **kw: stages.append(command[-3]) or main(command[3:]))
    capsys.readouterr()
    assert main(["run", "--run-dir", str(run_copy.dir)]) == 0
    assert stages == ["evaluate"] and "perplexity on held-out text" in capsys.readouterr().out
    read_json(report, Report)


def test_files_written_by_this_version_pass_their_schemas(trained_run):
    from modularforge import schemas

    kinds = {"manifest.json": schemas.Manifest, "experts/expert_00/done.json": schemas.ExpertDone,
             "data/shards.json": schemas.Shards, "data/documents.json": schemas.Documents,
             "data/partitions.json": schemas.PartitionReport, "model/config.json": schemas.ModelConfigFile,
             "model/model.safetensors.index.json": schemas.WeightIndex, "model/modularforge.json": schemas.ModelInfo,
             "model/tokenizer.json": schemas.TokenizerFile, "model/tokenizer_config.json": schemas.TokenizerConfig}
    for rel, schema in kinds.items():
        read_json(trained_run.dir / rel, schema)


def test_every_json_read_of_the_package_names_its_schema():
    """A new reader of a JSON file must say which shape it expects (read_json(path, Schema))."""
    import ast

    import modularforge

    unchecked = []
    for path in Path(modularforge.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "read_json":
                if len(node.args) + len(node.keywords) < 2:
                    unchecked.append(f"{path.name}:{node.lineno}")
    assert not unchecked, unchecked


# --- fuzz: the files mutated at random; never an internal error, never a write on a refusal ---------------------------

# file -> the command that reads it (JSON files get values retyped, keys dropped and bytes cut; others bytes cut)
FUZZ_TARGETS = {
    "manifest.json": ["assemble"],
    "experts/expert_00/done.json": ["assemble"],
    "data/shards.json": ["assemble"],
    "data/documents.json": ["calibrate"],
    "data/partitions.json": ["evaluate"],
    "model/config.json": GENERATE[:1] + GENERATE[3:],
    "model/model.safetensors.index.json": GENERATE[:1] + GENERATE[3:],
    "model/modularforge.json": ["calibrate"],
    "model/tokenizer.json": GENERATE[:1] + GENERATE[3:],
    "tokenizer/tokenizer_config.json": ["assemble"],
    "data/partition.npz": ["calibrate"],
    "experts/expert_02/router_stats.safetensors": ["assemble"],
    "model/model-00002-of-00006.safetensors": GENERATE[:1] + GENERATE[3:],
}
_VALUES = st.sampled_from([None, 0, -1, 1.5, True, "", "x", "../x", [], [1], {}, {"a": 1}, 10**20])


def _paths(node, prefix=()) -> list[tuple]:
    """Every key path of a parsed JSON value (lists: their first three items)."""
    children = node.items() if isinstance(node, dict) else enumerate(node[:3]) if isinstance(node, list) else []
    return [prefix] + [p for key, child in children for p in _paths(child, (*prefix, key))]


def _mutated(data, path: Path) -> bytes:
    raw = path.read_bytes()
    how = data.draw(st.sampled_from(["retype", "drop", "cut"] if path.suffix == ".json" else ["cut", "flip"]))
    if how == "cut":
        return raw[: data.draw(st.integers(0, len(raw) - 1))]
    if how == "flip":
        at = data.draw(st.integers(0, min(len(raw), 4096) - 1))  # the header, where damage is not silent
        return raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :]
    doc = json.loads(raw)
    keys = data.draw(st.sampled_from(_paths(doc) if how == "retype" else [p for p in _paths(doc) if p] or [()]))
    if not keys:
        return json.dumps(data.draw(_VALUES)).encode()
    parent = doc
    for key in keys[:-1]:
        parent = parent[key]
    if how == "drop" and isinstance(parent, dict):
        del parent[keys[-1]]
    else:
        parent[keys[-1]] = data.draw(_VALUES)
    return json.dumps(doc).encode()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_damaged_files_never_end_in_an_internal_error_or_a_write(trained_run, tmp_path_factory, data, capfd):
    rel = data.draw(st.sampled_from(sorted(FUZZ_TARGETS)))
    run_dir = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(trained_run.dir, run_dir)
    path = run_dir / rel
    path.write_bytes(_mutated(data, path))
    before = _state(run_dir)
    command = FUZZ_TARGETS[rel]
    code = main([command[0], "--run-dir", str(run_dir), *command[1:]])
    err = capfd.readouterr().err
    assert "internal error" not in err and "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        _one_error(err)
    if code == 2 or command[0] == "generate":
        assert _state(run_dir) == before, f"{rel}: {err}"
    shutil.rmtree(run_dir)


def test_train_experts_checks_what_a_fit_reads_before_it_trains(run_copy, tmp_path, capfd):
    """An added expert is fitted at the set's router temperatures, one per layer, recorded in the registry: a
    registry that records another number is refused before any expert trains."""
    from modularforge.grow import add_experts

    text = tmp_path / "new.jsonl"
    text.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Document {i} of the new text says hello. " * 40}) + "\n"
                            for i in range(30)))
    add_experts(run_copy, [str(text)], name="new")
    registry = run_copy.experts_dir / "registry.json"
    _set("added/0/fit_into/temperature", [0.5])(registry)
    before = _state(run_copy.dir)
    assert main(["train-experts", "--run-dir", str(run_copy.dir)]) == 2
    err = _one_error(capfd.readouterr().err)
    assert str(registry) in err and "new is fitted at 1 router temperatures" in err, err
    assert _state(run_copy.dir) == before
