"""The run directory never lies and never loses data, and every bad input is one line and exit 2:
files checked against the manifest, one writer at a time, a marker for run directories, numbers range-checked,
nothing scored is an error, OS errors name the path, and a fuzz test over `--set` values and generate flags."""

import errno
import fcntl
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modularforge import cli
from modularforge.cli import main
from modularforge.config import describe_keys
from modularforge.errors import DataError
from modularforge.files import LEFTOVER, atomic_path, read_json
from modularforge.inference import open_model
from modularforge.runs import Run


def _one_error(capsys) -> str:
    """The single stderr line of a failed command (main logs nowhere in tests: pytest owns the root logger)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"/" for p in sorted(root.rglob("*"))}


# --- the manifest: a stage is done only while its files match ------------------------------------------------

def test_a_stage_is_done_only_while_its_files_match(run_copy):
    assert run_copy.is_done("assemble") and run_copy.is_done("calibrate")  # calibrate rewrote a shard of model/
    shard = sorted(run_copy.model_dir.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert not run_copy.is_done("assemble") and not run_copy.is_done("calibrate")
    assert run_copy.is_done("train-experts")


def test_reassembly_means_recalibration(run_copy):
    from modularforge.assemble import assemble

    assemble(run_copy)
    assert run_copy.is_done("assemble") and not run_copy.is_done("calibrate")
    assert "calibrate" not in read_json(run_copy.manifest_path)["stages"]
    assert read_json(run_copy.model_dir / "modularforge.json")["calibration"] is None


def test_run_after_the_model_is_deleted_redoes_assembly_and_passes_debug_on(run_copy, monkeypatch):
    shutil.rmtree(run_copy.model_dir)
    commands = []
    monkeypatch.setattr(cli.subprocess, "call", lambda command, **kw: commands.append((command, kw)) or 0)
    assert main(["-v", "--debug", "run", "--run-dir", str(run_copy.dir)]) == 0
    assert [c[c.index("--run-dir") - 1] for c, _ in commands] == ["assemble", "calibrate", "evaluate"]
    command, kw = commands[0]
    assert "--debug" in command and "-v" in command
    assert kw["pass_fds"] and kw["env"]["MODULARFORGE_RUN_LOCK_FD"] == str(kw["pass_fds"][0])


def test_leftovers_of_a_killed_writer_are_removed_on_the_next_run(run_copy):
    (run_copy.dir / ".model.tmp-999999-3").mkdir()
    (run_copy.dir / ".model.tmp-999999-3" / "model-00001-of-00007.safetensors").write_bytes(b"0" * 1000)
    (run_copy.dir / ".model.old-999999-4").mkdir()
    (run_copy.shared_dir / ".ckpt.safetensors.tmp-999999-0").write_bytes(b"0")
    (run_copy.data_dir / ".tokens-00000.bin.tmp-999999-1").write_bytes(b"0")
    (run_copy.dir / "notes.tmp-1").write_text("not ours")
    with run_copy.lock():
        pass
    assert not [p for p in run_copy.dir.rglob("*") if LEFTOVER.match(p.name)]
    assert (run_copy.dir / "notes.tmp-1").read_text() == "not ours"


# --- one writer at a time ---------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_with_the_holders_pid(run_copy, capsys):
    manifest = run_copy.manifest_path.read_bytes()
    fd = os.open(run_copy.lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"4242 modularforge run\n", 0)
        assert main(["assemble", "--run-dir", str(run_copy.dir)]) == 2
        assert "is in use by process 4242" in _one_error(capsys)
        assert main(["run", "--run-dir", str(run_copy.dir)]) == 2
        assert "is in use by process 4242" in _one_error(capsys)
    finally:
        os.close(fd)
    assert run_copy.manifest_path.read_bytes() == manifest
    with run_copy.lock():
        assert run_copy.lock_path.read_text().split()[0] == str(os.getpid())


def test_children_of_run_share_its_lock_and_others_do_not(run_copy):
    code = ("import sys; from modularforge.config import load_config; from modularforge.runs import Run\n"
            "with Run(load_config(sys.argv[1]), sys.argv[2]).lock(): print('inside')")
    command = [sys.executable, "-c", code, str(run_copy.dir / "config.yaml"), str(run_copy.dir)]
    with run_copy.lock():
        env, fds = run_copy.child_lock()
        child = subprocess.run(command, env=env, pass_fds=fds, capture_output=True, text=True)
        stranger = subprocess.run(command, capture_output=True, text=True)
    assert child.stdout.strip() == "inside", child.stderr[-500:]
    assert f"is in use by process {os.getpid()}" in stranger.stderr


def test_temp_names_are_unique_per_call(tmp_path):
    with atomic_path(tmp_path / "f") as a, atomic_path(tmp_path / "f") as b:
        assert a != b and a.parent == b.parent == tmp_path
        a.write_text("a")
        b.write_text("b")
    assert (tmp_path / "f").read_text() == "a" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


# --- a run directory is recognised by its marker ------------------------------------------------------------------

def test_a_folder_that_is_not_a_run_directory_is_refused_and_left_untouched(tmp_path, capsys):
    docs = tmp_path / "Documents"
    (docs / "model").mkdir(parents=True)
    (docs / "model" / "thesis.txt").write_text("four years of work")
    (docs / "tokenizer").mkdir()
    before = _tree(docs)
    for command in (["run", "--smoke-test"], ["prepare", "--smoke-test"], ["assemble"], ["calibrate"]):
        assert main([*command, "--run-dir", str(docs)]) == 2
        assert "is not a ModularForge run directory" in _one_error(capsys)
    assert _tree(docs) == before


def test_an_empty_folder_becomes_a_run_directory(tmp_path, make_config):
    (tmp_path / "empty").mkdir()
    run = Run(make_config(), tmp_path / "empty")
    with run.lock():
        assert run.marker_path.is_file()


@pytest.mark.parametrize("name", ["../elsewhere", "/tmp/abs", "a/b", "..", "."])
def test_run_name_must_be_a_plain_name(name, capsys):
    assert main(["config", "--set", f"run.name={name}"]) == 2
    assert "'run.name'" in _one_error(capsys)


# --- flags pass the config's checks; nothing scored is an error ----------------------------------------------------

@pytest.mark.parametrize("flags", [
    ["--top-k", "0"], ["--top-p", "0"], ["--top-p", "1.5"], ["--max-new-tokens", "-1"], ["--expert-cache", "0"],
    ["--temperature", "-1"], ["--temperature", "nan"], ["--temperature", "1e-30"], ["--seed", "-3"],
    ["--context-window", "1"], ["--context-window", "33"], ["--revise-every", "-2"],
    ["--max-new-tokens", "100000000000"],
])
def test_generate_flags_are_checked_before_anything_is_printed(trained_run, capsys, flags):
    assert main(["generate", "--run-dir", str(trained_run.dir), "--prompt", "The", *flags]) == 2
    err = _one_error(capsys)
    assert err.startswith("error: invalid config")


@pytest.mark.parametrize("flags", [
    ["--window", "1"], ["--window", "0"], ["--window", "-4"], ["--stride", "-1"], ["--stride", "0"],
    ["--window", "8", "--stride", "9"], ["--window", "64"], ["--window", "8", "--routing", "sequence"],
])
def test_evaluate_windowing_that_scores_nothing_is_an_error(trained_run, tmp_path, capsys, flags):
    path = tmp_path / "text.txt"
    path.write_text("The state of the union is strong. " * 20)
    assert main(["evaluate", "--run-dir", str(trained_run.dir), "--data", str(path), *flags]) == 2
    _one_error(capsys)


def test_a_file_too_short_to_score_is_an_error(trained_run, tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text("a")
    assert main(["evaluate", "--run-dir", str(trained_run.dir), "--data", str(path)]) == 2
    assert "scoring needs at least 2" in _one_error(capsys)
    path.write_text("The state of the union")
    assert main(["evaluate", "--run-dir", str(trained_run.dir), "--data", str(path), "--routing", "sequence"]) == 2
    assert "nothing scored" in _one_error(capsys)


def _evaluate(run, path, *flags) -> dict:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["evaluate", "--run-dir", str(run.dir), "--data", str(path), *flags]) == 0
    return json.loads(out.getvalue())


def test_overlapping_windows_score_every_token_but_the_first_once(trained_run, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 8)
    for window, stride in ((16, 5), (32, 31), (9, 1)):
        result = _evaluate(trained_run, path, "--window", str(window), "--stride", str(stride))
        assert result["tokens"] == result["tokens_in_file"] - 1
    whole = _evaluate(trained_run, path, "--window", "32")
    assert whole["windowing"]["windows"] == math.ceil((whole["tokens_in_file"] - 1) / 32)


def test_evaluate_reads_documents_not_file_syntax(trained_run, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from modularforge.data.tokenizer import load_tokenizer

    docs = ["The state of the union is strong, and the Congress will act.",
            "A hacker is a person who enjoys exploring the details of programmable systems."]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs)))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress((tmp_path / "a.jsonl").read_bytes()))
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    tokenizer = load_tokenizer(trained_run.model_dir)
    expected = sum(len(tokenizer.encode(t).ids) for t in docs) + len(docs) - 1  # EOS between documents
    results = [_evaluate(trained_run, tmp_path / name) for name in ("a.jsonl", "a.jsonl.gz", "a.parquet")]
    assert [r["tokens_in_file"] for r in results] == [expected] * 3
    assert len({r["perplexity"] for r in results}) == 1
    (tmp_path / "one.txt").write_text(docs[0])
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": docs[0]}) + "\n")
    assert _evaluate(trained_run, tmp_path / "one.txt") == {**_evaluate(trained_run, tmp_path / "one.jsonl"),
                                                            "file": str(tmp_path / "one.txt")}


def test_text_read_in_pieces_tokenizes_as_the_whole(trained_run):
    from importlib import resources

    from modularforge.data.sources import iter_text_pieces
    from modularforge.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(trained_run.model_dir)
    record = json.loads(gzip.decompress(
        (resources.files("modularforge.bundled") / "us_state_of_the_union.jsonl.gz").read_bytes()).splitlines()[0])
    path = trained_run.dir.parent / "speech.txt"
    text = record["text"][:20_000]
    path.write_text(text[:5000] + "\n\n  " + text[5000:10000].replace(". ", ".\n") + "\n\t\n" + text[10000:])
    pieces = list(iter_text_pieces(path, piece_chars=500))
    assert len(pieces) > 10 and [end for _, end in pieces].count(True) == 1
    assert "".join(text for text, _ in pieces) == path.read_text()
    joined = [i for text, _ in pieces for i in tokenizer.encode(text).ids]
    assert joined == tokenizer.encode(path.read_text()).ids


def test_evaluate_scores_in_batches_what_it_scores_window_by_window(trained_run, tmp_path, monkeypatch):
    from modularforge import evaluate

    path = tmp_path / "text.txt"
    path.write_text("The Congress shall make no law respecting an establishment of religion. " * 10)
    batched = _evaluate(trained_run, path, "--window", "12", "--stride", "7")
    monkeypatch.setattr(evaluate, "NLL_BATCH_TOKENS", 1)
    monkeypatch.setattr(evaluate, "TEXT_BATCH_CHARS", 10)
    single = _evaluate(trained_run, path, "--window", "12", "--stride", "7")
    assert single["tokens"] == batched["tokens"] and abs(single["loss"] - batched["loss"]) < 1e-5


# --- OS errors and bad files are one line, exit 2, nothing half-written -------------------------------------------

def test_a_full_disk_in_assembly_names_the_folder_and_leaves_the_old_model(run_copy, monkeypatch, capsys):
    def full_disk(path, sources, metadata=None):
        Path(path).write_bytes(b"0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    before = _tree(run_copy.model_dir)
    monkeypatch.setattr("modularforge.assemble.write_streaming", full_disk)
    assert main(["assemble", "--run-dir", str(run_copy.dir)]) == 2
    err = _one_error(capsys)
    assert f"cannot write {run_copy.model_dir}: no space left on device" in err
    assert not [p for p in run_copy.dir.rglob("*") if LEFTOVER.match(p.name)]
    assert _tree(run_copy.model_dir) == before


def test_a_read_only_model_folder_in_calibration_names_the_shard(run_copy, monkeypatch, capsys):
    def read_only(path, sources, metadata=None):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr("modularforge.calibrate.write_streaming", read_only)
    assert main(["calibrate", "--run-dir", str(run_copy.dir)]) == 2
    err = _one_error(capsys)
    assert "read-only file system" in err and str(run_copy.model_dir / "model-") in err
    assert not [p for p in run_copy.dir.rglob("*") if LEFTOVER.match(p.name)]


def test_export_to_a_folder_is_an_error_before_writing(run_copy, tmp_path, capsys):
    pytest.importorskip("gguf")
    assert main(["export", "--run-dir", str(run_copy.dir), "--out", str(tmp_path)]) == 2
    assert "is a folder" in _one_error(capsys)


def _config_file(make_config, tmp_path, **sections) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(make_config(**sections).to_yaml())
    return path


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"text": "caf\xe9 ' + b"x" * 300 + b'"}\n', "is not UTF-8"),
    ("bad.jsonl.gz", gzip.compress(json.dumps({"text": "x" * 300}).encode() * 50)[:-30], "is not a complete gzip"),
    ("bad.jsonl.gz", b"not gzip at all", "is not a complete gzip"),
    ("bad.txt", b"\xff\xfe" + b"x" * 300, "is not UTF-8"),
])
def test_bad_text_files_are_one_line_errors(make_config, tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    config = _config_file(make_config, tmp_path, data={"sources": [str(tmp_path / name)]})
    assert main(["prepare", "--config", str(config)]) == 2
    assert message in _one_error(capsys)


def test_a_non_utf8_yaml_is_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_bytes(b"run:\n  name: caf\xe9\n")
    assert main(["config", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "is not UTF-8" in _one_error(capsys)


def test_an_unknown_dtype_in_a_safetensors_header_names_file_and_tensor(tmp_path):
    from modularforge.safetensors_stream import read_header

    header = json.dumps({"w": {"dtype": "F8_E9", "shape": [2], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "x.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"00")
    with pytest.raises(DataError, match=r"x.safetensors: tensor w has dtype 'F8_E9'"):
        read_header(tmp_path / "x.safetensors")


def test_a_torn_last_metrics_line_does_not_block_resume(make_config):
    from modularforge.prepare import prepare
    from modularforge.train.loop import Interrupted
    from modularforge.train.shared import train_shared

    run = Run(make_config())
    prepare(run)
    with pytest.raises(Interrupted):
        train_shared(run, stop_after=5)
    with open(run.shared_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    train_shared(run)
    lines = (run.shared_dir / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines) and run.is_done("train-shared")


def test_stdout_closed_early_exits_quietly():
    read, write = os.pipe()
    os.close(read)
    result = subprocess.run([sys.executable, "-m", "modularforge", "config", "--keys"], stdout=write,
                            stderr=subprocess.PIPE, text=True)
    os.close(write)
    assert result.returncode == cli.EXIT_BROKEN_PIPE and result.stderr == ""


# --- fuzz: exit 0, or exit 2 with one `error:` line; never a traceback, NaN weights or a metric over nothing --------

_VALUES = st.one_of(
    st.integers(-3, 70).map(str), st.sampled_from(["0", "-1", "1e20", "1.0e20", "10000000000000000000000", "0.5",
                                                   "true", "false", "null", "x", "nan", ".inf", "-.inf", "[0]", "[]",
                                                   "[0.5, 2]", "1e-9", "{a: 1}", "''", "3e-4", "[x, 1]"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
_KEYS = [key for key, _, _ in describe_keys()]
_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _check_outcome(code: int, capsys) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    else:
        assert code == 0, (code, err)
    return out


@_FUZZ
@given(overrides=st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES), min_size=1, max_size=3))
def test_fuzz_set_values_are_accepted_or_one_line_errors(overrides, capsys):
    sets = [arg for key, value in overrides for arg in ("--set", f"{key}={value}")]
    _check_outcome(main(["config", "--preset", "smoke", *sets]), capsys)


_INTS = st.one_of(st.integers(-2, 9), st.sampled_from([10**7, 2**40, 10**30]))
_FLOATS = st.one_of(st.floats(-1, 3), st.sampled_from([0.0, 1e-30, 1e30, float("inf"), float("nan")]))
_GENERATE_FLAGS = {
    "--temperature": _FLOATS, "--top-k": _INTS, "--top-p": _FLOATS, "--min-new-tokens": _INTS, "--seed": _INTS,
    "--max-new-tokens": st.integers(-2, 6) | st.sampled_from([10**7, 10**30]),  # valid runs stay short
    "--context-window": _INTS, "--revise-every": _INTS, "--expert-cache": _INTS,
    "--routing": st.sampled_from(["token", "sequence"]), "--dtype": st.sampled_from(["float32", "float16"]),
}


@settings(_FUZZ, max_examples=25)
@given(flags=st.dictionaries(st.sampled_from(sorted(_GENERATE_FLAGS)), st.none(), max_size=4).flatmap(
    lambda chosen: st.fixed_dictionaries({flag: _GENERATE_FLAGS[flag] for flag in chosen})))
def test_fuzz_generate_flags(trained_run, flags, capsys):
    args = [f"{flag}={value}" for flag, value in {"--max-new-tokens": 4, **flags}.items()]
    out = _check_outcome(main(["generate", "--run-dir", str(trained_run.dir), "--prompt", "The", *args]), capsys)
    assert out == "" or out.startswith("The")


@settings(_FUZZ, max_examples=20)
@given(window=_INTS, stride=st.none() | _INTS, routing=st.sampled_from(["token", "sequence"]))
def test_fuzz_evaluate_windowing_never_reports_a_metric_over_nothing(trained_run, tmp_path_factory, window, stride,
                                                                   routing, capsys):
    path = tmp_path_factory.getbasetemp() / "fuzz_eval.txt"
    path.write_text("The state of the union is strong, and the Congress will act. " * 6)
    flags = [f"--window={window}", f"--routing={routing}", *([f"--stride={stride}"] if stride is not None else [])]
    out = _check_outcome(main(["evaluate", "--run-dir", str(trained_run.dir), "--data", str(path), *flags]), capsys)
    if out:
        result = json.loads(out)
        assert result["tokens"] > 0 and math.isfinite(result["perplexity"]) and result["perplexity"] > 1


_CALIBRATE = {
    "calibrate.temperatures": st.sampled_from(["[0]", "[]", "[-1, 1]", "[0.5, 1.0]", "[1e-30]", "[nan]", "[2]",
                                               "[.inf]", "1", "[true]"]),
    "calibrate.per_layer": st.sampled_from(["true", "false", "1", "yes"]),
    "calibrate.norm": st.sampled_from(["true", "false", "0"]),
    "calibrate.temperature": st.sampled_from(["true", "false", "2"]),
    "calibrate.calib_tokens": st.sampled_from(["256", "512", "0", "-5", "1e20", "true"]),
    "calibrate.expert_cache": st.sampled_from(["null", "1", "0", "2"]),
}


@settings(_FUZZ, max_examples=6)
@given(overrides=st.dictionaries(st.sampled_from(sorted(_CALIBRATE)), st.none(), min_size=1, max_size=3).flatmap(
    lambda chosen: st.fixed_dictionaries({key: _CALIBRATE[key] for key in chosen})))
def test_fuzz_calibration_never_writes_a_nan(run_copy, overrides, capsys):
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    code = main(["calibrate", "--run-dir", str(run_copy.dir), *sets])
    _check_outcome(code, capsys)
    model = open_model(run_copy.model_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())
