"""The Ray executor trains each expert as a Ray task on a local Ray instance (2 CPUs, 2 workers), writes the
same expert files as the local executor, and survives a worker killed in the middle of an expert."""

import shutil
import sys
import threading
import time

import psutil
import pytest
import torch

from modularforge.errors import DataError, ModularForgeError
from modularforge.files import read_json
from modularforge.prepare import prepare
from modularforge.runs import Run
from modularforge.train import experts as experts_module
from modularforge.train import ray_executor
from modularforge.train.experts import train_experts
from modularforge.train.ray_executor import progress_line, train_experts_on_ray
from modularforge.train.shared import train_shared

EXPERT_FILES = ("expert.safetensors", "router_stats.safetensors")
TASK_TITLE = "ray::train_expert_task"  # Ray names a busy worker process after the task function

# Both executors run torch with one thread, so they are compared like with like (on the 2-core CPU of
# CI, 1 and 2 threads gave identical tensors as well, but that is not guaranteed in general).
ON_RAY = {"executor": "ray", "ray_local_cpus": 2, "ray_cpus_per_task": 1}


def _summary(run, k):
    """done.json without the wall time."""
    return {key: v for key, v in read_json(run.expert_dir(k) / "done.json").items() if key != "seconds"}


def _prepared_pair(make_config, steps_config=None):
    """A prepared run with its shared part trained (local executor), and a copy of it set to the Ray executor."""
    extra = steps_config or {}
    local = Run(make_config(run={"name": "local", "threads": 1}, **extra))
    prepare(local)
    train_shared(local)
    on_ray = Run(make_config(run={"name": "ray", "threads": 1}, **_with_experts(extra, ON_RAY)))
    shutil.copytree(local.dir, on_ray.dir)
    return local, on_ray


def _with_experts(sections: dict, values: dict) -> dict:
    return {**sections, "experts": {**sections.get("experts", {}), **values}}


def _train_local(run):
    threads = torch.get_num_threads()
    torch.set_num_threads(run.cfg.run.threads)  # what the CLI does for the local executor
    try:
        train_experts(run)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def ray():
    return pytest.importorskip("ray")


def test_without_ray_installed_the_error_says_which_extra_to_install(make_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ModularForgeError, match=r"pip install 'modularforge\[cluster\]'"):
        train_experts_on_ray(Run(make_config(experts=ON_RAY)))


def test_progress_line_shows_each_running_experts_last_step(make_config):
    run = Run(make_config())
    run.expert_dir(1).mkdir(parents=True)
    (run.expert_dir(1) / "metrics.jsonl").write_text('{"step": 3, "loss": 5.25}\n{"step": 4, "lo')  # being written
    line = progress_line(run, ["expert_01", "expert_02"], done=1)
    assert line == f"experts 1/4 done | expert_01: step 3/{run.cfg.expert_steps} loss 5.250 | expert_02: no step yet"
    stale = progress_line(run, ["expert_01"], done=1, since=time.time() + 60)  # metrics left from an earlier run
    assert stale == "experts 1/4 done | expert_01: no step yet"


def test_an_error_inside_a_task_fails_the_stage_with_its_one_line_message(ray, make_config):
    run = Run(make_config(experts=ON_RAY))  # nothing prepared: every task fails reading the token shards
    with pytest.raises(DataError, match=r"^expert_\d\d: "):
        train_experts_on_ray(run)
    assert not ray.is_initialized()


def test_ray_executor_writes_the_same_expert_files_as_the_local_executor(ray, make_config, monkeypatch):
    local, on_ray = _prepared_pair(make_config)
    _train_local(local)

    def not_in_the_driver(*args, **kwargs):
        raise AssertionError("the driver did work it should not")

    monkeypatch.setattr(experts_module, "train_expert", not_in_the_driver)
    train_experts(on_ray)
    assert not ray.is_initialized()  # the local instance it started is stopped again
    manifest = read_json(on_ray.manifest_path)["stages"]["train-experts"]
    assert manifest["status"] == "done" and [s["name"] for s in manifest["experts"]] == [
        "expert_00", "expert_01", "expert_02", "expert_03"]
    for k in range(4):
        for name in EXPERT_FILES:
            assert (on_ray.expert_dir(k) / name).read_bytes() == (local.expert_dir(k) / name).read_bytes(), (k, name)
        assert _summary(on_ray, k) == _summary(local, k)
        assert not (on_ray.expert_dir(k) / "ckpt.safetensors").exists()
    monkeypatch.setattr(ray_executor, "_connect", not_in_the_driver)  # all finished: no Ray needed to rerun
    assert train_experts_on_ray(on_ray) == manifest["experts"]


def test_ray_executor_trains_the_experts_of_a_run_from_a_base(ray, make_config, llama_base):
    from bases import base_sections

    sections = base_sections(llama_base, "local", experts={"select_margin": 0.0})
    sections["run"]["threads"] = 1
    local = Run(make_config(**sections))
    prepare(local)
    train_shared(local)
    on_ray = Run(make_config(**{**sections, "run": {"name": "ray", "threads": 1},
                                "experts": {**sections["experts"], **ON_RAY}}))
    shutil.copytree(local.dir, on_ray.dir)
    _train_local(local)
    train_experts(on_ray)
    for k in range(4):
        for name in EXPERT_FILES:
            assert (on_ray.expert_dir(k) / name).read_bytes() == (local.expert_dir(k) / name).read_bytes(), (k, name)


def _kill_workers_mid_expert(run, killed: list, timeout: float = 300.0) -> None:
    """Once some expert has a checkpoint but is not finished, SIGKILL every Ray worker of this test
    process that is running an expert task."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not killed:
        mid_expert = [k for k in range(run.cfg.model.num_experts)
                      if (run.expert_dir(k) / "ckpt.safetensors").exists() and not (run.expert_dir(k) / "done.json").exists()]
        if mid_expert:
            for process in psutil.Process().children(recursive=True):
                try:
                    if process.cmdline()[:1] == [TASK_TITLE]:
                        process.kill()
                        killed.append((process.pid, mid_expert))
                except psutil.NoSuchProcess:
                    continue
        time.sleep(0.02)


def test_a_worker_killed_mid_expert_is_retried_and_the_run_completes(ray, make_config):
    train = {"batch_size": 8, "lr": 3e-3, "eval_interval": 50, "eval_batches": 1, "log_interval": 10,
             "checkpoint_interval": 5, "precision": "fp32"}
    longer = {"budget": {"total_tokens": 61_440, "shared_fraction": 0.15},  # 36 shared steps, 51 per expert
              "train": train,
              "experts": {"stats_tokens": 512, "train": train, "ray_max_retries": 2}}
    local, on_ray = _prepared_pair(make_config, longer)
    killed: list = []
    watcher = threading.Thread(target=_kill_workers_mid_expert, args=(on_ray, killed), daemon=True)
    watcher.start()
    train_experts(on_ray)
    watcher.join()
    assert killed, "no worker was running an expert with a checkpoint"
    _train_local(local)
    for k in range(4):
        for name in EXPERT_FILES:
            assert (on_ray.expert_dir(k) / name).read_bytes() == (local.expert_dir(k) / name).read_bytes(), (k, name)
        assert read_json(on_ray.expert_dir(k) / "done.json")["steps"] == on_ray.cfg.expert_steps
