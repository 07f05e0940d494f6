"""llama.cpp itself (through llama-cpp-python) loads the GGUF export, tokenizes like we do, computes our
logits and generates our greedy tokens. Opt-in (llama-cpp-python compiles llama.cpp on install):

    pip install 'modularforge[llamacpp]' && MODULARFORGE_LLAMACPP=1 python -m pytest tests/test_llamacpp.py

benchmarks/gguf_llamacpp.py runs the same comparison on the smoke preset and records the numbers.
"""

import os

import numpy as np
import pytest
import torch

from modularforge.data.tokenizer import eos_id, load_tokenizer
from modularforge.export import export
from modularforge.sampling import Sampling, generate_ids
from modularforge.inference import AssembledFolder, open_model

pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.skipif(
        os.environ.get("MODULARFORGE_LLAMACPP") != "1",
        reason="opt-in: set MODULARFORGE_LLAMACPP=1 (needs llama-cpp-python, which compiles llama.cpp)",
    ),
]

TEXT = "Fellow citizens of the Senate: a hacker is a person who enjoys exploring the details of programmable systems."
PROBE = "In 1863, it's 4,096 words -- they'll say \"no!!\"   twice.\n\n\tnaïve café — 12.5% I'm you're we've."
PROMPT_TOKENS = 8


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def reference(trained_run):
    """Our logits on the prompt and our greedy continuation, filling the model's context."""
    folder = AssembledFolder(trained_run.model_dir)
    model, config = open_model(folder), folder.config
    model.eval()
    tokenizer = load_tokenizer(trained_run.model_dir)
    prompt = tokenizer.encode(TEXT, add_special_tokens=False).ids[:PROMPT_TOKENS]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0].numpy()
    new_tokens = config["max_position_embeddings"] - len(prompt)
    greedy = list(generate_ids(model, prompt, Sampling(temperature=0, max_new_tokens=new_tokens), eos_id(tokenizer)))
    return tokenizer, prompt, logits, greedy


def _amx() -> bool:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return " amx_int8" in flags or " amx_tile" in flags


def _open(llama_cpp, path, context, repack: bool = True):
    # llama.cpp's default f16 KV cache alone moves logits by ~5e-4; compare against an f32 cache
    kwargs = dict(n_ctx=context, logits_all=True, n_threads=2, seed=0, verbose=False,
                  type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    if repack:
        return llama_cpp.Llama(str(path), **kwargs)
    # llama-cli's --no-repack: Llama() has no argument for the model parameter, so its defaults are patched
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = no_repack
    try:
        return llama_cpp.Llama(str(path), **kwargs)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


@pytest.mark.parametrize("dtype, tolerance", [("f32", 1e-3), ("f16", 1e-2), ("q8_0", 5e-2)])
def test_llama_cpp_tokenizes_like_us_and_its_logits_agree(trained_run, reference, llama_cpp, tmp_path, dtype, tolerance):
    tokenizer, prompt, ours, _ = reference
    path = export(trained_run.model_dir, "gguf", tmp_path / f"model.{dtype}.gguf", dtype)
    # on CPUs with AMX units llama.cpp 0.3.36 segfaults on repacked q8_0 weights (its AMX matmul; seen here, and
    # gone with repacking off): docs/cluster_and_gguf.md
    llm = _open(llama_cpp, path, trained_run.cfg.model.max_seq_len, repack=not (dtype == "q8_0" and _amx()))
    try:
        for text in (TEXT, PROBE):
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text).ids
        llm.eval(prompt)
        theirs = np.array(llm.scores[: len(prompt)])
    finally:
        llm.close()
    assert np.abs(theirs - ours).max() < tolerance


def test_llama_cpp_generates_our_greedy_tokens_from_the_f32_export(trained_run, reference, llama_cpp, tmp_path):
    tokenizer, prompt, _, ours = reference
    llm = _open(llama_cpp, export(trained_run.model_dir, "gguf", tmp_path / "model.gguf", "f32"),
                trained_run.cfg.model.max_seq_len)
    try:
        theirs = []
        for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
            theirs.append(int(token))
            if token == eos_id(tokenizer) or len(theirs) == len(ours):
                break
    finally:
        llm.close()
    assert theirs == ours


@pytest.fixture(scope="module", params=[3, 5])
def regrown(request, trained_run, tmp_path_factory):
    """The tiny run with one expert removed (3) or one added (5): expert counts that are not powers of two."""
    import shutil

    from modularforge.cli import main
    from modularforge.runs import Run

    target = tmp_path_factory.mktemp("regrown") / "run"
    shutil.copytree(trained_run.dir, target)
    (target / ".lock").unlink(missing_ok=True)
    if request.param == 3:
        assert main(["remove-expert", "--run-dir", str(target), "expert_02"]) == 0
    else:
        text = tmp_path_factory.mktemp("text") / "new.txt"
        text.write_text("\n\n".join(f"{TEXT} {PROBE} Paragraph {i} of a new domain." for i in range(60)))
        assert main(["add-expert", "--run-dir", str(target), "--data", str(text), "--name", "probe"]) == 0
    return Run(trained_run.cfg, target)


def test_llama_cpp_runs_expert_counts_that_are_not_powers_of_two(regrown, llama_cpp, tmp_path):
    folder = AssembledFolder(regrown.model_dir)
    count = folder.config["num_local_experts"]
    assert count in (3, 5)
    model = open_model(folder).eval()
    prompt = load_tokenizer(regrown.model_dir).encode(TEXT, add_special_tokens=False).ids[:PROMPT_TOKENS]
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
    llm = _open(llama_cpp, export(regrown.model_dir, "gguf", tmp_path / "model.gguf", "f32"), regrown.cfg.model.max_seq_len)
    try:
        llm.eval(prompt)
        theirs = np.array(llm.scores[: len(prompt)])
    finally:
        llm.close()
    assert np.abs(theirs - ours).max() < 1e-3


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def upcycled(request, make_config_module):
    """A tiny run from a pretrained base: Llama 3.x-shaped (llama3 rope scaling: `rope_freqs`) or Qwen3-shaped
    (q/k norms, head width 32: architecture `qwen3moe`)."""
    from bases import base_sections
    from modularforge.assemble import assemble
    from modularforge.calibrate import calibrate
    from modularforge.prepare import prepare
    from modularforge.runs import Run
    from modularforge.train.experts import train_experts
    from modularforge.train.shared import train_shared

    base = request.getfixturevalue(f"{request.param}_base")
    run = Run(make_config_module(**base_sections(base, request.param, experts={"select_margin": 0.0})))
    for stage in (prepare, train_shared, train_experts, assemble, calibrate):
        stage(run)
    return run


def test_llama_cpp_runs_an_upcycled_model_as_we_do(upcycled, llama_cpp, tmp_path):
    model = open_model(upcycled.model_dir).eval()
    tokenizer = load_tokenizer(upcycled.model_dir)
    prompt = tokenizer.encode(TEXT, add_special_tokens=False).ids[:PROMPT_TOKENS]
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
    eos = eos_id(tokenizer, upcycled.model_dir)
    greedy = list(generate_ids(model, prompt, Sampling(temperature=0, max_new_tokens=24), eos))
    llm = _open(llama_cpp, export(upcycled.model_dir, "gguf", tmp_path / "model.gguf", "f32"), 64)
    try:
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tokenizer.encode(TEXT).ids
        llm.eval(prompt)
        theirs = np.array(llm.scores[: len(prompt)])
        generated = []
        llm.reset()
        for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
            generated.append(int(token))
            if token == eos or len(generated) == len(greedy):
                break
    finally:
        llm.close()
    assert np.abs(theirs - ours).max() < 1e-3
    assert generated == greedy
