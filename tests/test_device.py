"""The device seam: run.device is checked at load, resolves to the CPU, and a device this machine cannot use
fails when a stage starts, before anything is written."""

import pytest
import torch

from modularforge.config import config_from_dict
from modularforge.device import autocast_dtype, resolve_device
from modularforge.errors import ConfigError
from modularforge.prepare import prepare
from modularforge.runs import Run


def test_cpu_is_the_cpu_and_auto_the_best_device_present():
    assert resolve_device(config_from_dict({"run": {"device": "cpu"}})) == torch.device("cpu")
    best = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device(config_from_dict({"run": {"device": "auto"}})).type == best


def test_a_device_name_of_another_form_fails_at_load_naming_the_key():
    with pytest.raises(ConfigError, match="run.device"):
        config_from_dict({"run": {"device": "gpu0"}})


@pytest.mark.parametrize("name", ["cuda", "cuda:7", "mps"])
def test_a_device_this_machine_lacks_is_refused_naming_the_key(name):
    present = (torch.cuda.device_count() > int(name[5:] or 0) if name.startswith("cuda")
               else torch.backends.mps.is_available())
    if present:
        pytest.skip(f"{name} is present here")
    with pytest.raises(ConfigError, match=f"run.device={name}: no such device"):
        resolve_device(config_from_dict({"run": {"device": name}}))


def test_a_stage_refuses_an_unusable_device_before_writing(make_config):
    run = Run(make_config(run={"device": "cuda:7"}))
    with pytest.raises(ConfigError, match="run.device=cuda:7"):
        prepare(run)
    assert not run.dir.exists()


def test_fp32_precision_means_no_autocast():
    assert autocast_dtype("fp32") is None
    assert autocast_dtype("bf16") == torch.bfloat16


def test_every_stage_and_generation_take_their_device_from_the_seam(make_config, tmp_path):
    """With torch's default device set to `meta`, a tensor made without a device taken from its inputs or from the
    seam lands on `meta` and fails against the CPU tensors around it; so every stage, scoring a file and
    generating text running through means each of their tensors got its device passed in."""
    from modularforge.assemble import assemble
    from modularforge.calibrate import calibrate
    from modularforge.evaluate import FileScoring, evaluate, evaluate_file
    from modularforge.data.tokenizer import load_tokenizer
    from modularforge.inference import open_model
    from modularforge.sampling import Sampling, generate_text
    from modularforge.train.experts import train_experts
    from modularforge.train.shared import train_shared

    run = Run(make_config(run={"device": "cpu"}, experts={"mode": "with_anchor"}))
    text = tmp_path / "text.txt"
    text.write_text("The Congress shall have power to lay and collect taxes. " * 40)
    torch.set_default_device("meta")
    try:
        for stage in (prepare, train_shared, train_experts, assemble, calibrate, evaluate):
            stage(run)
        device = resolve_device(run.cfg)
        how = FileScoring(routing="sequence", prefix_len=8)
        assert evaluate_file(run.model_dir, text, how, device=device)["tokens"] > 0
        assert evaluate_file(run.model_dir, text, FileScoring(max_tokens=50), device=device, expert="expert_01")["tokens"]
        for cache, dtype in ((None, "float32"), (2, "float16")):
            model = open_model(run.model_dir, expert_cache=cache, decode_dtype=dtype, device=device)
            assert generate_text(model, load_tokenizer(run.model_dir), "The", Sampling(max_new_tokens=6),
                                 routing="sequence")
    finally:
        torch.set_default_device(None)
    assert all(p.device.type == "cpu" for p in open_model(run.model_dir, device=device).parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_and_cpu_give_the_same_model_the_same_logits_and_greedy_tokens(trained_run):
    from modularforge.data.tokenizer import eos_id, load_tokenizer
    from modularforge.inference import open_model
    from modularforge.sampling import Sampling, generate_ids

    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    models = {d: open_model(trained_run.model_dir, device=d).eval() for d in ("cpu", "cuda")}
    with torch.no_grad():
        cpu, cuda = models["cpu"](ids), models["cuda"](ids.to("cuda")).cpu()
    assert (cpu - cuda).abs().max().item() < 1e-2 * cpu.abs().max().item()  # TF32 products: within bf16 tolerance
    tokenizer = load_tokenizer(trained_run.model_dir)
    prompt = tokenizer.encode("The Congress", add_special_tokens=False).ids
    greedy = {d: list(generate_ids(m, prompt, Sampling(temperature=0, max_new_tokens=12), eos_id(tokenizer)))
              for d, m in models.items()}
    assert greedy["cpu"] == greedy["cuda"]
