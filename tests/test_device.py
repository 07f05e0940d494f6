"""The device seam: run.device is checked at load, resolves to the CPU, and a device this machine cannot use
fails when a stage starts, before anything is written."""

import pytest
import torch

from modularforge.config import config_from_dict
from modularforge.device import autocast_dtype, resolve_device
from modularforge.errors import ConfigError
from modularforge.prepare import prepare
from modularforge.runs import Run


def test_auto_and_cpu_resolve_to_the_cpu():
    for name in ("auto", "cpu"):
        assert resolve_device(config_from_dict({"run": {"device": name}})) == torch.device("cpu")


def test_a_device_name_of_another_form_fails_at_load_naming_the_key():
    with pytest.raises(ConfigError, match="run.device"):
        config_from_dict({"run": {"device": "gpu0"}})


@pytest.mark.parametrize("name", ["cuda", "cuda:7", "mps"])
def test_a_device_other_than_the_cpu_is_refused_naming_the_key(name):
    with pytest.raises(ConfigError, match=f"run.device={name}"):
        resolve_device(config_from_dict({"run": {"device": name}}))


def test_a_stage_refuses_an_unusable_device_before_writing(make_config):
    run = Run(make_config(run={"device": "cuda:7"}))
    with pytest.raises(ConfigError, match="run.device=cuda:7"):
        prepare(run)
    assert not run.dir.exists()


def test_fp32_precision_means_no_autocast():
    assert autocast_dtype("fp32") is None
    assert autocast_dtype("bf16") == torch.bfloat16
