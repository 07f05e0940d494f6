"""The assembled folder is a standard Mixtral checkpoint: transformers loads it with no custom code and
computes the same logits; its tokenizer loads with AutoTokenizer."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from modularforge.evaluate import FileScoring, evaluate_file  # noqa: E402
from modularforge.inference import open_model  # noqa: E402

PROMPT = "Fellow citizens of the Senate: a hacker is a person who enjoys exploring the details of programmable systems."


@pytest.fixture(scope="module")
def hf_model(trained_run):
    model = transformers.AutoModelForCausalLM.from_pretrained(trained_run.model_dir, dtype=torch.float32)
    return model.eval()


def test_transformers_loads_it_as_mixtral_and_logits_match(trained_run, hf_model):
    assert type(hf_model).__name__ == "MixtralForCausalLM"
    tokenizer = transformers.AutoTokenizer.from_pretrained(trained_run.model_dir)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids[:, :32]
    ours = open_model(trained_run.model_dir)
    with torch.no_grad():
        theirs = hf_model(ids).logits
        mine = ours.eval()(ids)
    assert (theirs - mine).abs().max().item() < 1e-4


def test_routers_are_not_trivial_so_parity_covers_routing(trained_run):
    ours = open_model(trained_run.model_dir)
    gates = [b.gate.weight for b in ours.moe_blocks()]
    assert all(g.abs().sum() > 0 for g in gates)


def test_transformers_generates_from_it(trained_run, hf_model):
    tokenizer = transformers.AutoTokenizer.from_pretrained(trained_run.model_dir)
    ids = tokenizer("The", return_tensors="pt").input_ids
    out = hf_model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] == ids.shape[1] + 5 or tokenizer.eos_token_id in out[0].tolist()


def test_file_perplexity_agrees_with_transformers(trained_run, hf_model, tmp_path):
    text = (PROMPT + " The state of the union is strong, and the Congress will act. ") * 12
    path = tmp_path / "held_out.txt"
    path.write_text(text)
    ours = evaluate_file(trained_run.model_dir, path, FileScoring(prefix_len=8))
    tokenizer = transformers.AutoTokenizer.from_pretrained(trained_run.model_dir)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    window = hf_model.config.max_position_embeddings
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            chunk = ids[start : start + window][None]
            if chunk.shape[1] < 2:
                continue
            loss = hf_model(chunk, labels=chunk).loss.item()
            nll += loss * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    assert ours["tokens"] == count
    assert ours["windowing"] == {**ours["windowing"], "window": window, "stride": window}
    assert abs(ours["perplexity"] / torch.exp(torch.tensor(nll / count)).item() - 1) < 1e-3
