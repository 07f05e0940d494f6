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


def _open(llama_cpp, path, context):
    # llama.cpp's default f16 KV cache alone moves logits by ~5e-4; compare against an f32 cache
    return llama_cpp.Llama(str(path), n_ctx=context, logits_all=True, n_threads=2, seed=0, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


@pytest.mark.parametrize("dtype, tolerance", [("f32", 1e-3), ("f16", 1e-2), ("q8_0", 5e-2)])
def test_llama_cpp_tokenizes_like_us_and_its_logits_agree(trained_run, reference, llama_cpp, tmp_path, dtype, tolerance):
    tokenizer, prompt, ours, _ = reference
    path = export(trained_run.model_dir, "gguf", tmp_path / f"model.{dtype}.gguf", dtype)
    llm = _open(llama_cpp, path, trained_run.cfg.model.max_seq_len)
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
