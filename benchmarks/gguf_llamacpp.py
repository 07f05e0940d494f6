"""Benchmark: llama.cpp itself (through llama-cpp-python) runs our GGUF export and agrees with ModularForge.

For each of f32, f16 and q8_0 the assembled model is exported, loaded with `llama_cpp.Llama(logits_all=True)`
and compared with our own forward pass on the same prompt: the tokenizer (llama.cpp's "gpt-2" BPE against
ours), the logits at every prompt position (max and mean absolute difference, argmax agreement), and
greedy generation of 32 new tokens with llama.cpp's own greedy sampler. llama.cpp keeps its KV cache in f16
by default; the comparison runs with an f32 cache (so f32 compares like with like), plus one row for the f32
file with the default f16 cache, to show what that cache alone costs.

Pass: f32 logits within 1e-3 of ours, identical greedy tokens for f32, identical tokenization.

    pip install 'modularforge[llamacpp]'   # compiles llama.cpp, about 4 minutes on 2 cores
    python benchmarks/gguf_llamacpp.py                     # trains the smoke preset into a temp dir first
    python benchmarks/gguf_llamacpp.py --run-dir runs/demo # or uses an assembled run

Writes docs/results/gguf.json (override with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from modularforge.data.tokenizer import eos_id, load_tokenizer
from modularforge.export import export
from modularforge.inference import AssembledFolder, open_model
from modularforge.sampling import Sampling, generate_ids

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Fellow citizens of the Senate and House of Representatives: the state of the union is"
# Digits, contractions, punctuation runs, repeated spaces, newlines and non-ASCII: where pre-tokenizers differ.
TOKENIZER_PROBE = ("In 1863, it's 4,096 words -- they'll say \"no!!\"   twice.\n\n\tTabs,  spaces; "
                   "naïve café — 12.5% (x=3) 'quoted' I'm you're we've he'd.")
NEW_TOKENS = 32
F32_TOLERANCE = 1e-3


def main() -> int:
    args = parse_args()
    run_dir = args.run_dir or train_smoke_run(Path(tempfile.mkdtemp(prefix="mf-gguf-")))
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file():
        print(f"error: {model_dir} is not an assembled model; run `modularforge run` first", file=sys.stderr)
        return 2
    import llama_cpp

    folder = AssembledFolder(model_dir)
    model, config = open_model(folder), folder.config
    model.eval()
    tokenizer = load_tokenizer(model_dir)
    budget = config["max_position_embeddings"] - NEW_TOKENS
    if budget < 4:
        print(f"error: max_position_embeddings must exceed {NEW_TOKENS + 3} for this benchmark", file=sys.stderr)
        return 2
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False).ids[:budget]
    prompt = tokenizer.decode(prompt_ids)
    eos = eos_id(tokenizer)
    with torch.no_grad():
        ours = model(torch.tensor([prompt_ids]))[0].float().numpy()
    our_greedy = list(generate_ids(model, prompt_ids, Sampling(temperature=0, max_new_tokens=NEW_TOKENS), eos))

    rows = []
    for dtype, cache in (("f32", "f32"), ("f32", "f16"), ("f16", "f32"), ("q8_0", "f32")):
        path = run_dir / f"model.{dtype}.gguf"
        if cache == "f32":
            export(model_dir, "gguf", path, dtype)
        rows.append(compare(llama_cpp, path, dtype, cache, prompt, prompt_ids, ours, our_greedy, eos, tokenizer))
    checks = {
        "f32_logits_within_1e-3": rows[0]["max_abs_diff"] <= F32_TOLERANCE,
        "f32_greedy_identical": rows[0]["greedy_identical"],
        "tokenization_identical": all(r["tokenization_identical"] for r in rows),
    }
    result = {
        "what": "llama.cpp (llama-cpp-python) logits and greedy tokens vs ModularForge on the same GGUF export",
        "command": " ".join(["python", "benchmarks/gguf_llamacpp.py", *sys.argv[1:]]),
        "llama_cpp_python": llama_cpp.__version__,
        "model": {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "vocab_size",
                                         "max_position_embeddings")},
        "prompt": prompt,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": NEW_TOKENS,
        "our_greedy_text": tokenizer.decode(our_greedy),
        "results": rows,
        "checks": checks,
        "passed": all(checks.values()),
    }
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if result["passed"] else 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, help="an assembled run directory (default: train the smoke preset)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "gguf.json", help="JSON result file")
    return p.parse_args()


def train_smoke_run(root: Path) -> Path:
    print(f"training the smoke preset into {root} ...", flush=True)
    subprocess.run([sys.executable, "-m", "modularforge", "run", "--smoke-test", "--set", f"run.root={root}"],
                   check=True, stdout=subprocess.DEVNULL)
    return root / "smoke"


def compare(llama_cpp, path, dtype, cache, prompt, prompt_ids, ours, our_greedy, eos, tokenizer) -> dict:
    cache_type = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[cache]
    start = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=len(prompt_ids) + NEW_TOKENS, logits_all=True, n_threads=os.cpu_count(),
                          type_k=cache_type, type_v=cache_type, seed=0, verbose=False)
    try:
        tokenized = [llm.tokenize(text.encode(), add_bos=False, special=False) for text in (prompt, TOKENIZER_PROBE)]
        same_tokens = tokenized == [prompt_ids, tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False).ids]
        llm.reset()
        llm.eval(prompt_ids)
        theirs = np.array(llm.scores[: len(prompt_ids)], dtype=np.float32)
        greedy = []
        for token in llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0, reset=True):
            greedy.append(int(token))
            if token == eos or len(greedy) == NEW_TOKENS:
                break
    finally:
        llm.close()
    diff = np.abs(theirs - ours)
    return {
        "gguf": dtype,
        "kv_cache": cache,
        "file_mb": round(path.stat().st_size / 2**20, 3),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_logit": float(np.abs(ours).max()),
        "argmax_agreement": float((theirs.argmax(-1) == ours.argmax(-1)).mean()),
        "greedy_identical": greedy == our_greedy,
        "greedy_common_prefix": _common_prefix(greedy, our_greedy),
        "tokenization_identical": same_tokens,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def print_table(result: dict) -> None:
    m = result["model"]
    print(f"\nmodel: hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, {m['num_local_experts']} experts "
          f"(top-{m['num_experts_per_tok']}), vocab {m['vocab_size']}; prompt {result['prompt_tokens']} tokens, "
          f"greedy {result['new_tokens']} new tokens; llama-cpp-python {result['llama_cpp_python']}\n")
    print("| gguf | KV cache | max abs diff | mean abs diff | argmax agree | greedy identical | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in result["results"]:
        greedy = "yes" if r["greedy_identical"] else f"no (first {r['greedy_common_prefix']} equal)"
        print(f"| {r['gguf']} | {r['kv_cache']} | {r['max_abs_diff']:.2e} | {r['mean_abs_diff']:.2e} | "
              f"{r['argmax_agreement']:.3f} | {greedy} | {'yes' if r['tokenization_identical'] else 'no'} |")
    print("\nchecks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in result["checks"].items()))


if __name__ == "__main__":
    sys.exit(main())
