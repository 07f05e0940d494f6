"""Quality benchmark: does zero-retraining assembly work, and which recipe works best?

Trains, on the eight corpora of ../shared/data partitioned into eight clusters, a dense baseline on the
same tokens as the whole modular pipeline, the shared phase, and several expert sets (init scratch or
anchor, mode alone or with_anchor, anchor substitution), then scores every row on the same dev tokens
(each corpus's own dev files): token-level MoE under every router with and without calibration and
top-1/top-2 (top-4 for the discriminative routers), the anchor as an always-on shared expert, oracle
routing, sequence routing (revised every `evaluate.sequence_revise_every` tokens, and the prefix's
choice kept: `sequence_fixed`), the output ensemble, the best recipe at five budget splits (1/3 to
19/20 of the tokens in the shared phase), and with random instead of clustered partitions.
Finally the best recipe goes through the real `assemble` and the exported folder is scored again.

Every row scores the positions after a 32-token prefix of each 256-token window (the prefix is what
sequence routing and the ensemble choose from), so all rows are compared on the same tokens.
Trained parts are cached in --work and reused on a rerun.

    python benchmarks/quality.py --data ../shared/data [--eval-data FILE] [--quick]

Prints a table and writes docs/results/quality.json and docs/results/quality.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml
from machine import machine_facts

from modularforge.assemble import assemble, assemble_in_memory
from modularforge.calibrate import (
    calibrate,
    calibration_batches,
    mean_loss,
    recalibrate_norms,
    search_temperature,
)
from modularforge.config import Config, apply_override, config_from_dict, preset_path
from modularforge.data.partition import Partitioner, partition_documents
from modularforge.data.shards import TokenStore
from modularforge.data.sources import iter_documents
from modularforge.data.tokenizer import eos_id, load_tokenizer, token_byte_lengths
from modularforge.device import autocast_dtype, module_device, resolve_device
from modularforge.evaluate import RoutingTally, Tally, WindowScoring, score_windows
from modularforge.files import atomic_path, load_tensors, read_json, read_metadata, read_metrics, save_tensors, write_json
from modularforge.inference import open_model
from modularforge.model.layers import SwiGLU
from modularforge.model.transformer import CausalLM
from modularforge.model.weights import FFN_WEIGHTS, ffn_from_weights, ffn_key, load_dense
from modularforge.prepare import prepare
from modularforge.routers import layer_stats, router_from_stats
from modularforge.runs import Run
from modularforge.train.experts import train_experts
from modularforge.train.loop import Interrupted, stable_steps
from modularforge.train.shared import train_shared

log = logging.getLogger("quality")

ROUTERS = ["uniform", "kaiming", "data_stats", "ridge", "lda"]
CALIBRATIONS = ["none", "temperature", "temperature_per_layer", "temperature+norm"]
EXPERT_VARIANTS = {
    "scratch-alone": {"init": "scratch", "mode": "alone"},
    "anchor-alone": {"init": "anchor", "mode": "alone"},
    "anchor-with_anchor": {"init": "anchor", "mode": "with_anchor"},
}
BUDGET_SPLITS = {"1/3": 1 / 3, "2/3": 2 / 3, "5/6": 5 / 6, "19/20": 19 / 20}
# --extended: rows measured before and left out of the 60-minute run (each worse than the main recipe or
# between two other rows in four runs): anchor substitution in expert training, the 9/10 split, top-4 LDA
EXTENDED_VARIANTS = {"anchor-alone-swap": {"init": "anchor", "mode": "alone", "anchor_swap": 0.25}}
EXTENDED_SPLITS = {"9/10": 9 / 10}
DISCRIMINATIVE = ("ridge", "lda")
RIDGE_LAMBDAS = (0.01, 0.1, 1.0)  # relative to the mean eigenvalue of the covariance (assemble.ridge_lambda)


def router_grid(extended: bool) -> list[tuple[str, str, int]]:
    """(router, calibration, top_k) rows: every router with and without a temperature at top-1 and top-2;
    the costlier calibrations (per-layer temperatures, norm recalibration) only for ridge at top-2 (on LDA they
    matched the global temperature to 0.01 ppl in two runs); uniform routers only uncalibrated,
    since a temperature does not change all-zero logits; and top-4 for the discriminative routers with a
    temperature (the calibrated temperature sat at the top of its grid at top-2: softer is better; LDA's only
    with --extended)."""
    grid = []
    for router in ROUTERS:
        for calibration in CALIBRATIONS:
            for top_k in (1, 2):
                extra = calibration in ("temperature_per_layer", "temperature+norm")
                if router == "uniform" and calibration != "none":
                    continue
                if extra and (router != "ridge" or top_k == 1):
                    continue
                grid.append((router, calibration, top_k))
        if router == "ridge" or (router == "lda" and extended):
            grid.append((router, "temperature", 4))
    return grid
SCORE_MICRO = 8  # windows per scoring forward: 1.2x the tokens/s of 4 for the 8-expert top-4 MoE in fp32
PRECISION = "fp32"  # calibrate.precision's default: rows must not depend on whether the CPU has bf16 units
DTYPE = autocast_dtype(PRECISION)
FORCED = ("oracle", "sequence", "sequence_fixed", "ensemble")  # modes from one forced pass per expert


# ----------------------------------------------------------------------------------------------- runs


class Workspace:
    """Runs derived from one base config inside --work, sharing prepared data and trained parts."""

    def __init__(self, base: Config, work: Path):
        self.base, self.work = base, work

    def config(self, **sections) -> Config:
        raw = self.base.model_dump(mode="json")
        for section, values in sections.items():
            node = raw
            *parents, leaf = section.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = {**node[leaf], **values} if isinstance(values, dict) else values
        return config_from_dict(raw)

    def run(self, name: str, cfg: Config) -> Run:
        return Run(cfg, self.work / name)


def ensure(run: Run, stage: str, fn) -> None:
    if not run.is_done(stage):
        start = time.perf_counter()
        fn(run)
        log.info("%s of %s took %.0fs", stage, run.dir.name, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------- dev sets


@dataclass
class DevSet:
    """Windows of (seq_len + 1) tokens from each corpus's dev documents, labelled with the partition the
    saved partitioner assigns to their document."""

    corpora: list[str]
    windows: dict[str, torch.Tensor]  # corpus -> (N, T + 1)
    partitions: dict[str, torch.Tensor]  # corpus -> (N,)

    @classmethod
    def build(cls, data_root: Path, run: Run, per_corpus: int, seq_len: int) -> DevSet:
        tokenizer = load_tokenizer(run.tokenizer_dir)
        partitioner = Partitioner.load(run.data_dir / "partitioner.npz")
        eos = eos_id(tokenizer)
        windows, partitions = {}, {}
        corpora = sorted(p.name for p in data_root.iterdir() if p.is_dir() and any(p.glob("dev-*.jsonl")))
        for corpus in corpora:
            cfg = run.cfg.data.model_copy(update={"sources": [str(data_root / corpus / "dev-*.jsonl")],
                                                  "max_documents": None})
            docs = [np.asarray(tokenizer.encode(d.text, add_special_tokens=False).ids + [eos]) for d in iter_documents(cfg)]
            labels = partitioner.assign([d[:-1] for d in docs], tokenizer)
            rows, row_labels = [], []
            for doc, label in zip(docs, labels):
                for start in range(0, len(doc) - seq_len - 1, seq_len):
                    rows.append(doc[start : start + seq_len + 1])
                    row_labels.append(label)
            pick = np.linspace(0, len(rows) - 1, min(per_corpus, len(rows))).astype(int)  # spread over documents
            windows[corpus] = torch.from_numpy(np.stack([rows[i] for i in pick]).astype(np.int64))
            partitions[corpus] = torch.tensor([row_labels[i] for i in pick])
        return cls(corpora, windows, partitions)

    @classmethod
    def from_text(cls, path: Path, run: Run, seq_len: int, limit: int) -> DevSet:
        tokenizer = load_tokenizer(run.tokenizer_dir)
        ids = np.asarray(tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids)
        rows = [ids[s : s + seq_len + 1] for s in range(0, len(ids) - seq_len - 1, seq_len)][:limit]
        partitioner = Partitioner.load(run.data_dir / "partitioner.npz")
        labels = partitioner.assign([r[:-1] for r in rows], tokenizer)
        return cls(["extra"], {"extra": torch.from_numpy(np.stack(rows).astype(np.int64))},
                   {"extra": torch.from_numpy(labels)})

    def batches(self, micro: int):
        """(corpus, (B, T + 1) windows, (B,) their partitions), `micro` windows at a time."""
        for corpus in self.corpora:
            w, p = self.windows[corpus], self.partitions[corpus]
            for i in range(0, len(w), micro):
                yield corpus, w[i : i + micro], p[i : i + micro]


# ------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Scoring:
    """What every row is scored with (the package's `evaluate.score_windows`, in fp32): the tokens' UTF-8 lengths,
    the evaluate section's prefix and sequence-routing revision interval, and windows per forward pass. Every row
    scores the positions after each window's prefix."""

    token_bytes: np.ndarray
    prefix_len: int
    revise_every: int | None
    micro: int = SCORE_MICRO

    @classmethod
    def for_run(cls, run: Run, micro: int = SCORE_MICRO) -> Scoring:
        cfg = run.cfg.evaluate
        return cls(token_byte_lengths(load_tokenizer(run.tokenizer_dir)), cfg.prefix_len, cfg.sequence_revise_every,
                   micro)

    def score(self, model: CausalLM, dev: DevSet, modes: tuple[str, ...] = ("token",),
              routing: bool = False) -> dict[str, dict]:
        """{mode: `summary`} of `model` on `dev`; `routing`: with its token routing's accuracy. A window's oracle
        expert is its partition's (the partition experts, in order)."""
        blocks = model.moe_blocks()
        how = WindowScoring(tuple(modes), self.prefix_len, self.revise_every, PRECISION, routing)
        scores = score_windows(model.eval(), dev.batches(self.micro), how, self.token_bytes,
                               range(blocks[0].num_experts if blocks else 0))
        return {m: summary(scores.after_prefix[m], scores.routing) for m in modes}


def summary(tallies: dict[str, Tally], routing: RoutingTally | None = None) -> dict:
    """Per-corpus and union perplexity and bits per byte; with `routing`, per layer the share of tokens whose top-1
    expert is their partition's and whose partition's expert is among the top-k, and per partition (those with
    dev tokens) the same shares, averaged over layers."""
    nll, tokens = sum(t.nll for t in tallies.values()), sum(t.tokens for t in tallies.values())
    out = {"per_corpus": {c: round(math.exp(t.nll / t.tokens), 3) for c, t in tallies.items()},
           "union_ppl": round(math.exp(nll / tokens), 3),
           "bits_per_byte": round(nll / math.log(2) / sum(t.bytes for t in tallies.values()), 4)}
    if routing is not None and routing.top1.sum():
        parts, own = np.arange(len(routing.oracle)), np.array(routing.oracle)
        top1, topk = routing.top1[:, parts, own], routing.hits[:, parts, own]  # (layers, partitions)
        routed = routing.top1[0].sum(-1)  # (partitions,) routed tokens of each partition
        seen = routed > 0
        out["routing_top1_accuracy"] = [round(x, 4) for x in top1.sum(1) / routed.sum()]
        out["routing_topk_hit"] = [round(x, 4) for x in topk.sum(1) / routed.sum()]
        out["routing_top1_by_partition"] = {int(p): round(float(x), 4) for p, x in
                                            zip(np.flatnonzero(seen), (top1 / np.maximum(routed, 1)).mean(0)[seen])}
        out["routing_topk_hit_by_partition"] = {int(p): round(float(x), 4) for p, x in
                                                zip(np.flatnonzero(seen), (topk / np.maximum(routed, 1)).mean(0)[seen])}
    return out


# ------------------------------------------------------------------------------------ in-memory MoE


class MoEUnderTest:
    """The run's expert set assembled in memory (`assemble_in_memory`); routers, temperature, top-k, norms and an
    always-on anchor are set per row, from the experts' statistics, with no gradient steps."""

    def __init__(self, run: Run):
        cfg = run.cfg
        self.run = run
        self.model = assemble_in_memory(run).eval()
        device = module_device(self.model)
        stats_paths = [run.expert_files(spec.name)["stats"] for spec in run.experts()]
        self.stats = [layer_stats(stats_paths, i, cfg.model.hidden_size) for i in range(cfg.model.num_layers)]
        self.norms = [layer.post_attention_layernorm.weight.detach().clone() for layer in self.model.model.layers]
        anchor = load_tensors(run.shared_dir / "anchor.safetensors")
        self.anchor = [ffn_from_weights({w: anchor[ffn_key(i, w)] for w in FFN_WEIGHTS}).to(device)
                       for i in range(cfg.model.num_layers)]
        self.hooks: list = []
        by_length: dict[int, list[torch.Tensor]] = {}
        for batch in calibration_batches(run, 2048):
            by_length.setdefault(batch.shape[1], []).append(batch)
        self.calib = [chunk for group in by_length.values() for chunk in torch.cat(group).split(SCORE_MICRO)]

    def configure(self, router: str, calibration: str, top_k: int, anchor_weight: float = 0.0,
                  ridge_lambda: float | None = None) -> dict:
        cfg = self.run.cfg
        lam = cfg.assemble.ridge_lambda if ridge_lambda is None else ridge_lambda
        generator = torch.Generator().manual_seed(cfg.run.seed)
        for layer, norm in zip(self.model.model.layers, self.norms):
            layer.post_attention_layernorm.weight.data.copy_(norm)
        for i, block in enumerate(self.model.moe_blocks()):
            block.gate.weight.data.copy_(router_from_stats(router, self.stats[i], lam,
                                                           cfg.assemble.centred, generator))
            block.top_k = top_k
        for hook in self.hooks:
            hook.remove()
        self.hooks = [block.register_forward_hook(anchored(ffn, anchor_weight))
                      for block, ffn in zip(self.model.moe_blocks(), self.anchor)] if anchor_weight else []
        info: dict = {}
        if calibration.endswith("norm"):
            targets = [torch.stack(s.diag).mean(0).float() for s in self.stats]
            recalibrate_norms(self.model, self.calib, targets, DTYPE)
        if calibration.startswith("temperature"):
            grid = cfg.calibrate.temperatures
            info["temperature"] = search_temperature(self.model, self.calib, grid,
                                                     calibration == "temperature_per_layer", DTYPE)
        info["calib_loss"] = round(mean_loss(self.model, self.calib, DTYPE), 4)
        return info


def anchored(anchor: SwiGLU, weight: float):
    """A forward hook that keeps the anchor FFN on beside an MoE block: (1 - weight) * block(x) + weight * anchor(x),
    in every routing mode. The exported Mixtral model has no place for an always-on shared expert, so it lives
    here, in the benchmark, not in the package's MoE block."""

    def hook(block, args, out):
        return (1 - weight) * out + weight * anchor(args[0])

    return hook


# ------------------------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--config", type=Path, default=preset_path("quality"))
    parser.add_argument("--eval-data", type=Path, help="extra held-out UTF-8 text, scored for every row")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "quality")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "quality.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "results" / "quality.png")
    parser.add_argument("--tokens", type=int, help="override budget.total_tokens")
    parser.add_argument("--dev-windows", type=int, default=24, help="dev windows per corpus")
    parser.add_argument("--extra-windows", type=int, default=96, help="windows of --eval-data scored")
    parser.add_argument("--quick", action="store_true", help="tiny budget, to check the benchmark itself")
    parser.add_argument("--extended", action="store_true",
                        help="also anchor substitution, the 9/10 split and top-4 LDA (about 68 minutes cold)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the base config (finished stages whose inputs did not change are reused)")
    parser.add_argument("--device", help="run.device for every stage and row (e.g. cuda; default: the config's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("modularforge").setLevel(logging.WARNING)
    started = time.perf_counter()
    if not args.data.is_dir():
        sys.exit(f"error: data folder not found: {args.data} (pass --data)")
    args.data = args.data.resolve()  # the work folder is keyed by the config, so one spelling per folder

    raw = yaml.safe_load(args.config.read_text())
    for item in args.set:
        apply_override(raw, item)
    raw.setdefault("data", {})["sources"] = [str(args.data / "*" / "train-*.jsonl")]
    raw.setdefault("run", {})["root"] = str(args.work)
    if args.device:
        raw["run"]["device"] = args.device
    if args.tokens or args.quick:
        raw.setdefault("budget", {})["total_tokens"] = args.tokens or 300_000
    if args.quick:
        raw["train"]["compile"] = raw["experts"]["train"]["compile"] = False
        args.dev_windows = min(args.dev_windows, 8)
    base_cfg = config_from_dict(raw)
    ws = Workspace(base_cfg, args.work)
    device = resolve_device(base_cfg)  # the stages train there; the dense rows are scored there too
    T = base_cfg.budget.total_tokens
    # the config's split, snapped to the budget-split row it stands for (one run directory per split)
    variants = EXPERT_VARIANTS | (EXTENDED_VARIANTS if args.extended else {})
    splits = BUDGET_SPLITS | (EXTENDED_SPLITS if args.extended else {})
    main_split = min(splits.values(), key=lambda f: abs(f - base_cfg.budget.shared_fraction))

    base = ws.run("base", base_cfg)
    ensure(base, "prepare", prepare)
    seq_len = base_cfg.model.max_seq_len
    dev = DevSet.build(args.data, base, args.dev_windows, seq_len)
    extra = DevSet.from_text(args.eval_data, base, seq_len, args.extra_windows) if args.eval_data else None
    scoring = Scoring.for_run(base)
    purity = read_json(base.data_dir / "partitions.json")["purity"]
    rows: list[dict] = []

    def record(row: str, group: str, scores: dict, extra_scores: dict | None = None, **info) -> dict:
        entry = {"row": row, "group": group, **scores, **info}
        if extra_scores is not None:
            entry["extra_ppl"] = extra_scores["union_ppl"]
        rows.append(entry)
        acc = entry.get("routing_top1_accuracy")
        log.info("%-58s union ppl %8.3f  bpb %.4f%s", row, entry["union_ppl"], entry["bits_per_byte"],
                 f"  top1 acc {' '.join(f'{a:.2f}' for a in acc)}" if acc else "")
        return entry

    def score_dense(model: CausalLM, row: str, group: str) -> dict:
        return record(row, group, scoring.score(model, dev)["token"],
                      scoring.score(model, extra)["token"] if extra else None)

    def score_moe(moe: MoEUnderTest, row: str, group: str, router: str, calibration: str, top_k: int,
                  anchor_weight: float = 0.0, ridge_lambda: float | None = None) -> dict:
        lam = base_cfg.assemble.ridge_lambda if ridge_lambda is None else ridge_lambda
        info = moe.configure(router, calibration, top_k, anchor_weight, lam)
        return record(row, group, scoring.score(moe.model, dev, routing=True)["token"],
                      scoring.score(moe.model, extra)["token"] if extra else None, router=router,
                      calibration=calibration, top_k=top_k, anchor_weight=anchor_weight, ridge_lambda=lam, **info)

    def score_forced(moe: MoEUnderTest, prefix: str, group: str) -> dict[str, dict]:
        forced = scoring.score(moe.model, dev, FORCED)
        forced_extra = scoring.score(moe.model, extra, FORCED) if extra else {}
        return {m: record(f"{prefix} {m}", group, s, forced_extra.get(m)) for m, s in forced.items()}

    # Dense baseline: the anchor's architecture trained on all T tokens (a shared phase with fraction 1/2 of 2T).
    # Under a wsd schedule every split's shared phase is the dense run's first steps plus its own decay, so
    # the dense run is trained once and each split branches from it (exactly what a run of its own gives).
    dense = ws.run("dense", ws.config(budget={"total_tokens": 2 * T, "shared_fraction": 0.5}))
    link_prepared(dense, base)
    shared_runs = {f: ws.run(f"shared-{f:.3f}", ws.config(budget={"total_tokens": T, "shared_fraction": f}))
                   for f in splits.values()}
    for run in shared_runs.values():
        link_prepared(run, base)
    branch_from_trunk(dense, list(shared_runs.values()))
    ensure(dense, "train-shared", train_shared)
    vocab = base.vocab_size()
    score_dense(load_dense(base_cfg.model, vocab, dense.shared_dir, device=device), "dense (same total tokens)",
                "baseline")

    def shared_for(fraction: float) -> Run:
        ensure(shared_runs[fraction], "train-shared", train_shared)
        return shared_runs[fraction]

    def experts_for(fraction: float, variant: str, data_from: Run = base, tag: str = "") -> Run:
        source = shared_for(fraction)
        cfg = ws.config(budget={"total_tokens": T, "shared_fraction": fraction}, experts=variants[variant],
                        **({"partition": data_from.cfg.partition.model_dump()} if tag else {}))
        run = ws.run(f"experts-{fraction:.3f}-{variant}{tag}", cfg)
        link_prepared(run, data_from)
        run.adopt_stage(source, "train-shared", ("shared",))  # the shared phase does not read the partitions
        ensure(run, "train-experts", train_experts)
        return run

    main_shared = shared_for(main_split)
    score_dense(load_dense(base_cfg.model, vocab, main_shared.shared_dir, device=device),
                "anchor (shared phase alone)", "baseline")

    # Every expert set, with the default token recipe and with forced routing. Experts trained beside the
    # anchor (with_anchor) are scored with it: alone they are only the residual of the pair they trained in.
    default = ("ridge", "temperature", 2)
    per_variant = {}
    for variant in variants:
        moe = MoEUnderTest(experts_for(main_split, variant))
        if variant == "scratch-alone":
            score_moe(moe, "seed recipe (scratch, alone, data_stats, no calibration, top-2)", "seed",
                      "data_stats", "none", 2)
        paired = variants[variant]["mode"] == "with_anchor"
        token = score_moe(moe, f"{variant}: token, ridge + temperature, top-2{', anchor on (w=0.5)' if paired else ''}",
                          "experts", *default, anchor_weight=0.5 if paired else 0.0)
        forced = score_forced(moe, f"{variant}:", "experts")
        per_variant[variant] = {"token": token, **forced}
        del moe
    best_variant = min(per_variant, key=lambda v: per_variant[v]["token"]["union_ppl"])
    log.info("best expert set for token routing: %s", best_variant)

    # Router x calibration x top-k on the best expert set, and the anchor kept on as a shared expert.
    moe = MoEUnderTest(experts_for(main_split, best_variant))
    best_anchor = 0.5 if variants[best_variant]["mode"] == "with_anchor" else 0.0
    for router, calibration, top_k in router_grid(args.extended):
        label = f"{best_variant}: {router}, {calibration}, top-{top_k}"
        if (router, calibration, top_k) == default:
            continue
        if top_k == 1 and calibration == "temperature":  # one expert per token, weight 1 at any temperature
            uncalibrated = next(r for r in rows if r["row"] == f"{best_variant}: {router}, none, top-1")
            rows.append({**uncalibrated, "row": label, "calibration": calibration, "temperature": "no effect at top-1"})
            continue
        score_moe(moe, label, "routers", router, calibration, top_k, best_anchor)

    def best_token_row() -> dict:
        return min((r for r in rows if r["group"] in ("experts", "routers") and r["row"].startswith(best_variant)
                    and "router" in r), key=lambda r: r["union_ppl"])

    best_token = best_token_row()
    # the regulariser of the discriminative routers, at the best router's calibration and top-k
    for lam in RIDGE_LAMBDAS:
        if lam != base_cfg.assemble.ridge_lambda and best_token["router"] in DISCRIMINATIVE:
            for top_k in sorted({2, best_token["top_k"]}):
                score_moe(moe, f"{best_variant}: {best_token['router']} (lambda={lam}), {best_token['calibration']}, "
                          f"top-{top_k}", "routers", best_token["router"], best_token["calibration"], top_k,
                          best_anchor, lam)
    best_token = best_token_row()
    recipe = (best_token["router"], best_token["calibration"], best_token["top_k"])
    lam = best_token["ridge_lambda"]
    for weight in (0.25, 0.5):
        score_moe(moe, f"{best_variant}: {recipe_label(best_token)}, anchor always on (w={weight})",
                  "anchor_shared", *recipe, anchor_weight=weight, ridge_lambda=lam)
    del moe

    # Budget splits and the random-partition control, with the best expert set and token recipe.
    budget = {}
    for label, fraction in sorted(splits.items(), key=lambda item: item[1]):
        if fraction == main_split:  # the rows above already score this split
            budget[label] = {"token": best_token, **{m: per_variant[best_variant][m]
                                                     for m in ("oracle", "sequence", "sequence_fixed", "ensemble")}}
            continue
        moe = MoEUnderTest(experts_for(fraction, best_variant))
        score_dense(load_dense(base_cfg.model, vocab, shared_for(fraction).shared_dir, device=device),
                    f"split {label}: anchor (shared phase alone)", "baseline")
        budget[label] = {"token": score_moe(moe, f"split {label}: {best_variant}, best token recipe", "budget",
                                            *recipe, best_anchor, lam),
                         **score_forced(moe, f"split {label}:", "budget")}
        del moe
    random_base = _random_partition_base(ws, base)
    moe = MoEUnderTest(experts_for(main_split, best_variant, data_from=random_base, tag="-random"))
    score_moe(moe, f"random partitions: {best_variant}, best token recipe", "random", *recipe, best_anchor, lam)
    score_forced(moe, "random partitions:", "random")
    del moe

    # The best recipe through the real assembly: the exported folder must score the same.
    exported = _assemble_best(ws, main_split, best_variant, variants[best_variant], recipe, lam, base)
    model = open_model(exported.model_dir)
    record("exported folder (modularforge assemble, best recipe)", "exported",
           scoring.score(model, dev, routing=True)["token"], scoring.score(model, extra)["token"] if extra else None)

    wall = time.perf_counter() - started
    result = summarize(rows, per_variant, best_variant, recipe, lam, budget, purity, base_cfg, args, wall)
    write_json(args.out, result)
    plot(rows, args.plot)
    print_table(rows, result)


def branch_checkpoint(source_dir: Path, target_dir: Path, fingerprint: str) -> int:
    """Give the run in `target_dir` the checkpoint (and the metrics up to it) of the run in `source_dir`, under
    the target's fingerprint, so the target resumes from there. Exact only for runs whose steps so far agree:
    same model, data stream and learning rates (wsd runs with warmup_steps, before the shorter one's decay).
    Returns the checkpoint's step."""
    source = source_dir / "ckpt.safetensors"
    step = int(read_metadata(source)["step"])
    target_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(target_dir / "ckpt.safetensors", load_tensors(source), {"step": str(step), "fingerprint": fingerprint})
    metrics = read_metrics(source_dir / "metrics.jsonl")
    with atomic_path(target_dir / "metrics.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics if m["step"] <= step))
    return step


def branch_from_trunk(trunk: Run, runs: list[Run]) -> None:
    """Wsd only: train `trunk` (the longest shared phase) up to each run's decay, in order, and start that run
    from there (`branch_checkpoint`). Runs already started, or whose branch point the trunk has passed,
    train on their own."""
    if trunk.cfg.train.schedule != "wsd" or trunk.cfg.train.warmup_steps is None:
        return
    ckpt = trunk.shared_dir / "ckpt.safetensors"
    for run in sorted(runs, key=lambda r: r.cfg.shared_steps):
        branch = stable_steps(run.cfg.shared_steps, run.cfg.train)
        if run.is_done("train-shared") or (run.shared_dir / "ckpt.safetensors").exists() or trunk.is_done("train-shared"):
            continue
        reached = int(read_metadata(ckpt)["step"]) if ckpt.exists() else 0
        if reached > branch:
            continue
        if reached < branch:
            try:
                train_shared(trunk, stop_after=branch)
            except Interrupted:
                pass
        branch_checkpoint(trunk.shared_dir, run.shared_dir, run.fingerprint("train-shared"))
        log.info("%s starts from step %d of %s", run.dir.name, branch, trunk.dir.name)


def link_prepared(run: Run, base: Run) -> None:
    """`run` uses `base`'s tokenizer, shards and partitions (Run.adopt_stage)."""
    run.adopt_stage(base, "prepare", ("data", "tokenizer"))


def _random_partition_base(ws: Workspace, base: Run) -> Run:
    """The same tokenizer and shards as `base`, with random partitions (the shared phase does not read
    partitions, so it is reused)."""
    cfg = ws.config(partition={"method": "random"})
    run = ws.run("base-random", cfg)
    if run.is_done("prepare"):
        return run
    with run.lock():
        data = run.data_dir
        data.mkdir(parents=True, exist_ok=True)
        for item in base.data_dir.iterdir():
            if item.name.startswith(("tokens-", "documents", "shards")) and not (data / item.name).exists():
                os.symlink(item.resolve(), data / item.name)
        tokenizer = run.dir / "tokenizer"
        if not tokenizer.exists():
            os.symlink(base.tokenizer_dir.resolve(), tokenizer)
        report = partition_documents(TokenStore.open(data), load_tokenizer(tokenizer), cfg.partition,
                                     cfg.model.num_experts, cfg.run.seed)
        run.adopt_stage(base, "prepare", facts={"purity": report["purity"]})  # the rest of prepare is base's
    return run


def recipe_label(row: dict) -> str:
    return f"{row['router']} (lambda={row['ridge_lambda']}), {row['calibration']}, top-{row['top_k']}"


def _assemble_best(ws: Workspace, fraction: float, variant: str, experts: dict, recipe: tuple, lam: float,
                   base: Run) -> Run:
    router, calibration, top_k = recipe
    source = ws.work / f"experts-{fraction:.3f}-{variant}"
    cfg = ws.config(
        budget={"total_tokens": ws.base.budget.total_tokens, "shared_fraction": fraction},
        experts=experts, model={"top_k": top_k}, assemble={"router": router, "ridge_lambda": lam},
        calibrate={"temperature": calibration.startswith("temperature"),
                   "per_layer": calibration == "temperature_per_layer", "norm": calibration.endswith("norm"),
                   "calib_tokens": 2048 * ws.base.model.num_experts},
    )
    run = ws.run("exported", cfg)
    if run.dir.exists():
        shutil.rmtree(run.dir)
    src = Run(Config.model_validate(yaml.safe_load((source / "config.yaml").read_text())), source)
    for stage, folders in (("prepare", ("data", "tokenizer")), ("train-shared", ("shared",)),
                           ("train-experts", ("experts",))):
        run.adopt_stage(src, stage, folders)
    assert run.fingerprint("train-experts") == src.fingerprint("train-experts")  # the experts' done.json agree
    assemble(run)
    calibrate(run)
    return run


def summarize(rows, per_variant, best_variant, recipe, lam, budget, purity, cfg, args, wall) -> dict:
    by_row = {r["row"]: r for r in rows}
    anchor = by_row["anchor (shared phase alone)"]["union_ppl"]
    dense = by_row["dense (same total tokens)"]["union_ppl"]
    best = per_variant[best_variant]
    oracle = best["oracle"]["union_ppl"]
    exported = by_row["exported folder (modularforge assemble, best recipe)"]
    token = exported["union_ppl"]
    gain = (anchor - token) / (anchor - oracle) if anchor != oracle else float("nan")
    modular_best = min(  # every inference mode ModularForge offers; oracle rows need the labels, so not those
        (r for r in rows if r["group"] in ("budget", "experts", "routers", "anchor_shared", "exported")
         and not r["row"].endswith("oracle")),
        key=lambda r: r["union_ppl"],
    )
    targets = {
        "token_share_of_oracle_gain": {"value": round(gain, 4), "target": ">= 0.75"},
        "sequence_vs_oracle": {"value": round(best["sequence"]["union_ppl"] / oracle - 1, 4), "target": "<= 0.02"},
        "sequence_fixed_vs_oracle": {"value": round(best["sequence_fixed"]["union_ppl"] / oracle - 1, 4),
                                     "target": "information: the prefix's choice never revised"},
        "best_modular_vs_dense": {"value": round(modular_best["union_ppl"] / dense, 4), "target": "<= 1.00",
                                  "row": modular_best["row"]},
        "routing_top1_accuracy_min_layer": {"value": min(exported.get("routing_top1_accuracy", [0])), "target": ">= 0.90"},
        "routing_topk_hit_min_layer": {"value": min(exported.get("routing_topk_hit", [0])), "target": ">= 0.90"},
        "routing_top1_min_partition": {"value": min(exported.get("routing_top1_by_partition", {0: 0}).values()),
                                       "target": ">= 0.90 (each partition's tokens, mean over layers)"},
        "routing_topk_hit_min_partition": {"value": min(exported.get("routing_topk_hit_by_partition", {0: 0}).values()),
                                           "target": ">= 0.90 (each partition's tokens, mean over layers)"},
        "cluster_purity": {"value": round(purity, 4), "target": ">= 0.80"},
    }
    return {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "config": cfg.model_dump(mode="json"),
        "machine": machine_facts(cfg, resolve_device(cfg)),
        "wall_seconds": round(wall, 1),
        "best_expert_set": best_variant,
        "best_token_recipe": {"router": recipe[0], "calibration": recipe[1], "top_k": recipe[2],
                              "ridge_lambda": lam},
        "targets": targets,
        "rows": rows,
    }


def print_table(rows: list[dict], result: dict) -> None:
    corpora = list(rows[0]["per_corpus"])
    short = [c.split("_")[0][:6] + c.split("_")[-1][:3] for c in corpora]
    print(f"\n{'row':<74} {'union':>7} {'bpb':>6} " + " ".join(f"{s:>9}" for s in short) + "  extra")
    for r in rows:
        cells = " ".join(f"{r['per_corpus'][c]:>9.2f}" for c in corpora)
        print(f"{r['row'][:74]:<74} {r['union_ppl']:>7.2f} {r['bits_per_byte']:>6.3f} {cells}  {r.get('extra_ppl', '')}")
    print("\ntargets:")
    for name, t in result["targets"].items():
        print(f"  {name}: {t['value']} (target {t['target']})")
    print(f"wall time: {result['wall_seconds'] / 60:.1f} min")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["group"] != "routers" or r["calibration"] in ("none", "temperature")]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(shown) + 1))
    colors = {"baseline": "black", "seed": "tab:red", "experts": "tab:blue", "routers": "tab:cyan",
              "anchor_shared": "tab:purple", "budget": "tab:green", "random": "tab:orange", "exported": "tab:olive"}
    ax.barh(range(len(shown)), [r["union_ppl"] for r in shown], color=[colors[r["group"]] for r in shown])
    ax.set_yticks(range(len(shown)), [r["row"][:90] for r in shown], fontsize=6)
    ax.invert_yaxis()
    # log scale: the scratch rows are 5x the others, which differ by a few percent
    ax.set_xscale("log")
    ax.set_xlabel("union dev perplexity (log scale, lower is better)")
    for r in shown:  # the dense model and the 5/6 anchor: the lines every other row is read against
        if r["row"] in ("dense (same total tokens)", "anchor (shared phase alone)"):
            ax.axvline(r["union_ppl"], color="grey", linestyle="--", linewidth=0.8)
    low = min(r["union_ppl"] for r in shown)
    ax.set_xlim(low * 0.95, max(r["union_ppl"] for r in shown) * 1.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
