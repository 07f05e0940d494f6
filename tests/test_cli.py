import json
import subprocess
import sys

import pytest

from modularforge.cli import build_parser, main

SUBCOMMANDS = ["prepare", "train-shared", "train-experts", "assemble", "calibrate", "evaluate", "generate", "run", "export", "config"]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["-h"])
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "modularforge", *args], capture_output=True, text=True, cwd=cwd)


def test_bad_config_value_is_one_line_and_exit_code_2(tmp_path):
    result = _cli("prepare", "--set", "model.top_k=9", "--set", f"run.root={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: invalid config: model.top_k=9 exceeds model.num_experts=4; lower top_k"
    ]


def test_missing_data_source_is_one_line(tmp_path):
    result = _cli("prepare", "--set", "data.sources=[/no/such/dir]", "--set", f"run.root={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: data source not found: /no/such/dir"


def test_stage_before_its_input_says_what_to_run(tmp_path):
    result = _cli("assemble", "--set", f"run.root={tmp_path}")
    assert result.returncode == 2
    assert "run `modularforge train-experts`" in result.stderr or "run `modularforge prepare`" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_prints_the_resolved_config_with_overrides(capsys):
    assert main(["config", "--preset", "smoke", "--set", "model.top_k=1"]) == 0
    out = capsys.readouterr().out
    assert "top_k: 1" in out and "name: smoke" in out


def test_evaluate_data_on_an_unseen_file_reports_windowing(trained_run, tmp_path, capsys):
    path = tmp_path / "unseen.txt"
    path.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 10)
    assert main(["evaluate", "--run-dir", str(trained_run.dir), "--data", str(path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["windowing"]["window"] == 32 and result["windowing"]["stride"] == 32
    assert result["perplexity"] > 1 and result["bits_per_byte"] > 0


def test_evaluate_with_an_expert_cache_scores_as_the_full_model(run_copy, tmp_path, capsys, monkeypatch):
    from modularforge import evaluate

    opened = []
    open_model = evaluate.open_model
    monkeypatch.setattr(evaluate, "open_model", lambda *a, **k: opened.append(k["expert_cache"]) or open_model(*a, **k))
    path = tmp_path / "unseen.txt"
    path.write_text("Fellow citizens, a hacker is a person who enjoys exploring the details of systems. " * 8)
    scores, reports = [], []
    for cache in ([], ["--expert-cache", "1"]):
        assert main(["evaluate", "--run-dir", str(run_copy.dir), "--data", str(path), *cache]) == 0
        scores.append(json.loads(capsys.readouterr().out))
        assert main(["evaluate", "--run-dir", str(run_copy.dir), *cache]) == 0
        report = json.loads((run_copy.reports_dir / "report.json").read_text())
        reports.append({k: report[k] for k in ("headline", "routing_modes", "routing", "experts", "samples")})
    assert opened == [None, None, 1, 1]
    assert scores[0] == scores[1] and reports[0] == reports[1]


def test_generate_streams_text_to_stdout(trained_run, capsys):
    assert main(["generate", "--run-dir", str(trained_run.dir), "--prompt", "The", "--max-new-tokens", "5",
                 "--expert-cache", "2"]) == 0
    assert capsys.readouterr().out.startswith("The")
    assert main(["generate", "--run-dir", str(trained_run.dir), "--prompt", "The", "--max-new-tokens", "5",
                 "--temperature", "0", "--dtype", "float16"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_hub_dataset_offline_is_one_line_with_the_local_alternative(tmp_path, monkeypatch, capsys):
    from modularforge.data import sources

    monkeypatch.setattr(sources, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "0")
    code = main(["prepare", "--dataset", "wikitext-103", "--set", f"run.root={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: cannot reach the Hugging Face hub")
    assert "data.sources" in err[-1]


def test_malloc_mmap_threshold_setting_reaches_glibc():
    import platform

    from modularforge.cli import set_mmap_threshold

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip(f"mallopt is a glibc function; this platform's C library is {platform.libc_ver()[0] or 'unknown'}")
    assert set_mmap_threshold(256 << 10)


def test_generate_flags_are_config_values(trained_run, capsys):
    assert main(["generate", "--run-dir", str(trained_run.dir), "--prompt", "The", "--top-k", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [
        "error: invalid config value for 'generate.top_k': Input should be greater than or equal to 1 (got 0)"]
    assert main(["generate", "--run-dir", str(trained_run.dir), "--prompt", "The", "--max-new-tokens", "3",
                 "--revise-every", "never", "--routing", "sequence"]) == 0  # the config's null
    assert capsys.readouterr().out.startswith("The")
    assert main(["generate", "--run-dir", str(trained_run.dir), "--prompt", "The", "--revise-every", "0"]) == 2
    out, err = capsys.readouterr()  # 0 means what the config key's 0 means: nothing valid
    assert out == "" and err.strip().splitlines() == ["error: invalid config value for 'generate.sequence_revise_every': "
                                                      "Input should be greater than or equal to 1 (got 0)"]


def test_evaluate_data_can_force_one_expert_and_stop_after_n_tokens(trained_run, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The Congress shall have power to lay and collect taxes, duties, imposts and excises. " * 30)
    base = ["evaluate", "--run-dir", str(trained_run.dir), "--data", str(text)]
    assert main([*base, "--max-tokens", "64", "--expert", "expert_02"]) == 0
    forced = json.loads(capsys.readouterr().out)
    assert forced["tokens_in_file"] == 64 and forced["windowing"]["expert"] == 2
    assert forced["tokens"] == 64 - forced["windowing"]["windows"]  # each window's first token has no context
    assert main([*base, "--max-tokens", "64", "--expert", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == forced["perplexity"]
    assert main([*base, "--max-tokens", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] != forced["perplexity"]  # the router picks others
    assert main([*base, "--expert", "expert_09"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no expert 'expert_09'" in err[0] and "expert_00, expert_01" in err[0]
