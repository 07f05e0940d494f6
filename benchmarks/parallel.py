"""Parallel benchmark: modular training against dense at equal tokens and at equal
wall time on N machines, and how the comparison moves with tokens per parameter.

On the eight corpora of ../shared/data partitioned into N = 8 clusters, for each budget T:

- dense at T tokens (one machine, the same wall time as the whole pipeline) and dense at N*T tokens (a perfect
  data-parallel run on N machines, which needs a fast interconnect);
- for each shared fraction f: the shared phase at f*T tokens, its anchor alone, and two expert sets trained by
  the package's `train_experts` with its defaults (learning rate from the trunk, best checkpoint kept):
  equal tokens, each expert (1 - f)*T/N tokens; and equal wall time on N workers, each expert (1 - f)*T
  tokens (`budget.expert_tokens`). The N experts are trained for real, one after another on this machine;
  their wall time is counted as on N workers (the slowest expert's);
- every expert set through the real `assemble` + `calibrate` (router and top-k as the config says) and
  `evaluate` (its per-expert report), and scored on the same dev tokens as the dense rows: the exported
  token-routing MoE, and sequence, fixed-sequence, ensemble and oracle routing (the package's
  `evaluate.score_windows`, as benchmarks/quality.py: every row scores the positions after each window's prefix).

Under a wsd schedule with fixed warmup steps, runs of any length share their stable phase, so the longest dense
run is trained once and every shorter one (dense T, dense N*T, each shared phase) branches from it before its
own decay. Then: per T the modular/dense ratios, the best shared fraction, which experts beat their anchor;
across T the ratios against tokens per parameter, a straight-line fit in log(tokens/param) and where it
reaches 1.0. Trained parts are cached in --work and reused on a rerun.

    python benchmarks/parallel.py --data ../shared/data [--budgets 0.2e6,0.6e6,2e6] [--estimate] [--ray-check]
    python benchmarks/parallel.py --quick --ray-check     # tiny model and budgets: checks the benchmark itself

Prints a table and writes docs/results/parallel.json and docs/results/parallel.png. The defaults (the 0.48M-parameter
model of benchmarks/parallel.yaml; T = 0.2M, 0.6M, 2M tokens = 0.42 to 4.2 tokens per parameter; f = 0.5, 0.8,
0.95; dense N*T at the smallest T only, which the longest dense run covers) were projected at 38 minutes on a
2-core machine at 11.8K tok/s (one torch thread, `--threads 1`, the CPU shared with other jobs); `--estimate`
prints the projection on the machine at hand after a few seconds of training.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality as Q  # noqa: E402
from machine import git_facts, machine_facts  # noqa: E402

from modularforge.assemble import assemble  # noqa: E402
from modularforge.calibrate import calibrate  # noqa: E402
from modularforge.config import Config, apply_override, config_from_dict  # noqa: E402
from modularforge.evaluate import evaluate  # noqa: E402
from modularforge.files import read_json, read_metadata, read_metrics, sha256_file, write_json  # noqa: E402
from modularforge.inference import open_model  # noqa: E402
from modularforge.model.transformer import CausalLM, count_parameters  # noqa: E402
from modularforge.model.weights import load_dense  # noqa: E402
from modularforge.prepare import prepare  # noqa: E402
from modularforge.runs import Run  # noqa: E402
from modularforge.train.experts import train_experts  # noqa: E402
from modularforge.train.loop import Interrupted, stable_steps  # noqa: E402
from modularforge.train.shared import train_shared  # noqa: E402

log = logging.getLogger("parallel")

CONFIG = ROOT / "benchmarks" / "parallel.yaml"
KINDS = {"equal_tokens": "each expert (1-f)T/N tokens", "equal_wall": "each expert (1-f)T tokens (N workers)"}
DEPLOYABLE = ("token", "sequence", "sequence_fixed", "ensemble")  # oracle needs the partition labels
EXPERT_FILES = ("expert.safetensors", "router_stats.safetensors")
# --quick: a model and budgets small enough to run every part of the benchmark in a few minutes; the data and
# tokenizer are the full run's, so the prepared base is shared with it.
QUICK = {
    "model": {"hidden_size": 32, "intermediate_size": 96, "num_layers": 2, "num_heads": 2},
    "train": {"batch_size": 8, "warmup_steps": 5, "eval_interval": 50, "log_interval": 50},
    "experts": {"stats_tokens": 2048, "train": {"batch_size": 4, "eval_interval": 10, "eval_batches": 2}},
    "calibrate": {"calib_tokens": 4096},
    "evaluate": {"eval_tokens": 512},
}
QUICK_BUDGETS, QUICK_NT, QUICK_FRACTIONS = "30e3,100e3,300e3", "30e3", "0.5,0.9"
DEFAULT_BUDGETS, DEFAULT_NT, DEFAULT_FRACTIONS = "0.2e6,0.6e6,2e6", "0.2e6", "0.5,0.8,0.95"


# ------------------------------------------------------------------------------------------------ plan


def parse_tokens(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


class Plan:
    """Budgets, shared fractions and the runs they need, named by what they train."""

    def __init__(self, ws: Q.Workspace, scale: str, budgets: list[int], fractions: list[float], nt: list[int],
                 dev_windows: int):
        self.ws, self.scale, self.dev_windows = ws, scale, dev_windows
        self.budgets, self.fractions, self.nt = sorted(budgets), sorted(fractions), sorted(nt)
        self.N = ws.base.model.num_experts
        self.dense = {d: self.run(f"dense-{d}", budget={"total_tokens": 2 * d, "shared_fraction": 0.5})
                      for d in sorted(set(self.budgets) | {self.N * t for t in self.nt})}
        self.shared = {(t, f): self.run(f"shared-{t}-{f:.3f}", budget={"total_tokens": t, "shared_fraction": f})
                       for t in self.budgets for f in self.fractions}
        self.trunk = self.dense[max(self.dense)]

    def run(self, name: str, **sections) -> Run:
        return self.ws.run(f"{self.scale}/{name}", self.ws.config(**sections))

    def experts(self, t: int, f: float, kind: str, **sections) -> Run:
        expert_tokens = None if kind == "equal_tokens" else round((1 - f) * t)
        return self.run(f"experts-{t}-{f:.3f}-{kind}", **sections,
                        budget={"total_tokens": t, "shared_fraction": f, "expert_tokens": expert_tokens})

    def branches(self) -> list[Run]:
        return [r for r in [*self.dense.values(), *self.shared.values()] if r is not self.trunk]

    def training_tokens(self) -> dict[str, float]:
        """Tokens each part trains: the trunk whole, every branch only its decay, every expert set whole."""
        def decay(run: Run) -> int:
            steps = run.cfg.shared_steps
            return (steps - stable_steps(steps, run.cfg.train)) * run.cfg.tokens_per_step(run.cfg.train)

        trunk = self.trunk.cfg
        return {
            "dense trunk": trunk.shared_steps * trunk.tokens_per_step(trunk.train),
            "decays of the branched runs": sum(decay(r) for r in self.branches()),
            "experts, equal tokens": sum((1 - f) * t for t in self.budgets for f in self.fractions),
            "experts, equal wall time": sum(self.N * (1 - f) * t for t in self.budgets for f in self.fractions),
        }


class Timings:
    """Wall seconds of each part, kept in the work folder, so a rerun that reuses a part still reports its time."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = read_json(path) if path.exists() else {}

    def add(self, key: str, seconds: float) -> None:
        self.data[key] = round(self.data.get(key, 0.0) + seconds, 1)
        write_json(self.path, self.data)

    def ensure(self, run: Run, stage: str, fn, key: str) -> None:
        if not run.is_done(stage):
            start = time.perf_counter()
            fn(run)
            self.add(key, time.perf_counter() - start)


def copy_after_shared(source: Run, target: Run) -> None:
    """`target`: `source`'s prepared data and trained shared part (linked: Run.adopt_stage) under target's config,
    whose shared phase must be source's (`budget.expert_tokens` is not in its fingerprint). When source's shared
    phase was retrained, target starts again from nothing (an expert counts as trained while its trunk's config,
    not its trunk's weights, is unchanged)."""
    if target.fingerprint("train-shared") != source.fingerprint("train-shared"):
        raise RuntimeError(f"{target.dir} would not train the shared phase of {source.dir}; does "
                           "budget.expert_tokens enter the shared phase's fingerprint?")
    if target.dir.exists() and not target.is_done("train-shared"):
        shutil.rmtree(target.dir)
    target.adopt_stage(source, "prepare", ("data", "tokenizer"))
    target.adopt_stage(source, "train-shared", ("shared",))


# ------------------------------------------------------------------------------------------- training


def train_dense(plan: Plan, timings: Timings, rate_only: bool) -> float:
    """Train the trunk to the first branch point (timed: the tokens/s every estimate uses), then the
    branches and the rest of the trunk. Returns the shared phase's measured tokens/s."""
    trunk, branches = plan.trunk, plan.branches()
    per_step = trunk.cfg.tokens_per_step(trunk.cfg.train)
    first = min(stable_steps(r.cfg.shared_steps, r.cfg.train) for r in branches) if branches else trunk.cfg.shared_steps
    ckpt = trunk.shared_dir / "ckpt.safetensors"
    reached = int(read_metadata(ckpt)["step"]) if ckpt.exists() else 0
    if not trunk.is_done("train-shared") and reached < first:
        start = time.perf_counter()
        try:
            train_shared(trunk, stop_after=first)
        except Interrupted:
            pass
        seconds = time.perf_counter() - start
        timings.add("dense trunk", seconds)
        timings.data["shared_rate"] = round((first - reached) * per_step / seconds, 1)
        write_json(timings.path, timings.data)
    rate = timings.data.get("shared_rate") or _metrics_rate(trunk)
    if rate_only:
        return rate
    start = time.perf_counter()
    Q.branch_from_trunk(trunk, branches)
    timings.add("dense trunk", time.perf_counter() - start)
    timings.ensure(trunk, "train-shared", train_shared, "dense trunk")
    for run in branches:
        timings.ensure(run, "train-shared", train_shared, f"decay of {run.dir.name}")
    return rate


def shared_rate(plan: Plan, timings: Timings, fallback: float) -> float:
    """Tokens/s of the whole shared-phase training (trunk and decays), from the recorded wall times."""
    tokens = plan.training_tokens()
    seconds = timings.data.get("dense trunk", 0) + sum(timings.data.get(f"decay of {r.dir.name}", 0)
                                                       for r in plan.branches())
    trained = tokens["dense trunk"] + tokens["decays of the branched runs"]
    return trained / seconds if seconds else fallback


def _metrics_rate(run: Run) -> float:
    rates = [m["tokens_per_s"] for m in read_metrics(run.shared_dir / "metrics.jsonl") if "tokens_per_s" in m]
    return float(np.median(rates)) if rates else float("nan")


def projection(plan: Plan, rate: float, expert_rate: float) -> dict:
    """Projected seconds of the whole benchmark from the measured tokens/s. Scoring, statistics, calibration and
    evaluation are counted as forward tokens at 3x the training rate (a training step is about three forwards)."""
    tokens = plan.training_tokens()
    seconds = {k: v / (expert_rate if k.startswith("experts") else rate) for k, v in tokens.items()}
    cfg, sets = plan.ws.base, 2 * len(plan.budgets) * len(plan.fractions)
    dev = 8 * plan.dev_windows * cfg.model.max_seq_len
    per_set = (dev * (plan.N + 1) + plan.N * cfg.experts.stats_tokens
               + cfg.evaluate.eval_tokens * plan.N * (plan.N + 2) + cfg.calibrate.calib_tokens * 8)
    rows = len(plan.dense) + len(plan.shared)
    seconds["scoring, assembly, calibration, evaluation"] = (sets * per_set + rows * dev) / (3 * rate)
    return {"tokens": {k: int(v) for k, v in tokens.items()}, "seconds": {k: round(v) for k, v in seconds.items()},
            "total_minutes": round(sum(seconds.values()) / 60, 1), "shared_tokens_per_s": round(rate),
            "expert_tokens_per_s": round(expert_rate)}


# -------------------------------------------------------------------------------------------- scoring


class Rows:
    def __init__(self, scoring: Q.Scoring, dev: Q.DevSet):
        self.scoring, self.dev, self.rows = scoring, dev, []

    def add(self, row: str, scores: dict, **info) -> dict:
        entry = {"row": row, **info, **scores}
        self.rows.append(entry)
        log.info("%-64s union ppl %8.3f  bpb %.4f", row, entry["union_ppl"], entry["bits_per_byte"])
        return entry

    def dense(self, model: CausalLM, row: str, **info) -> float:
        return self.add(row, self.scoring.score(model, self.dev)["token"], **info)["union_ppl"]

    def moe(self, model: CausalLM, label: str, **info) -> dict[str, float]:
        """The exported MoE under token routing, and the forced modes, as {mode: union ppl}."""
        token = self.scoring.score(model, self.dev, routing=True)["token"]
        out = {"token": self.add(f"{label}: token (exported)", token, mode="token", **info)["union_ppl"]}
        for mode, scores in self.scoring.score(model, self.dev, Q.FORCED).items():
            out[mode] = self.add(f"{label}: {mode}", scores, mode=mode, **info)["union_ppl"]
        return out


def expert_checks(run: Run) -> list[dict]:
    """Per expert: how training chose it (done.json `selection`, on held-out calibration text of its partition)
    and its partition's validation perplexity before and after (the evaluate report's `experts` list)."""
    report = read_json(run.reports_dir / "report.json")
    out = []
    for entry in report["experts"]:
        selection = entry.get("selection") or {}
        out.append({"expert": entry["expert"], "beats_anchor": selection.get("beats_anchor"),
                    "best_step": selection.get("best_step"), "anchor_loss": selection.get("anchor_loss"),
                    "best_loss": selection.get("best_loss"), "val_anchor_ppl": entry["anchor_perplexity"],
                    "val_expert_ppl": entry["expert_perplexity"], "val_gain": entry["gain"]})
    return out


def expert_seconds(run: Run) -> list[float]:
    return [read_json(run.expert_dir(k) / "done.json")["seconds"] for k in range(run.cfg.model.num_experts)]


# ----------------------------------------------------------------------------------------- ray check


def ray_check(plan: Plan, t: int, f: float, kind: str, timings: Timings) -> dict:
    """Train the experts of one run again with the Ray executor (a local instance, 2 CPUs, one task per CPU)
    into a copy of its shared phase, and compare every expert file's sha256 with the local executor's. The
    tasks use as many torch threads as this process, so both executors compute alike."""
    local = plan.experts(t, f, kind)
    ray_cfg = {"executor": "ray", "ray_local_cpus": 2, "ray_cpus_per_task": 1}
    on_ray = plan.run(f"experts-{t}-{f:.3f}-{kind}-ray", run={"threads": torch.get_num_threads()},
                      experts=ray_cfg, budget=local.cfg.budget.model_dump())
    copy_after_shared(plan.shared[(t, f)], on_ray)
    assert on_ray.fingerprint("train-experts") == local.fingerprint("train-experts")  # executor settings excluded
    start = time.perf_counter()
    if not on_ray.is_done("train-experts"):
        train_experts(on_ray)
        timings.add(f"ray check {on_ray.dir.name}", time.perf_counter() - start)
    files = {}
    for k in range(plan.N):
        for name in EXPERT_FILES:
            a, b = sha256_file(local.expert_dir(k) / name), sha256_file(on_ray.expert_dir(k) / name)
            files[f"expert_{k:02d}/{name}"] = {"local": a, "ray": b, "same": a == b}
    same = all(v["same"] for v in files.values())
    log.info("ray check (%s): %d files, %s", on_ray.dir.name, len(files), "all identical" if same else "DIFFERENT")
    return {"run": local.dir.name, "executor": ray_cfg, "torch_threads_per_task": torch.get_num_threads(),
            "all_identical": same, "seconds": timings.data.get(f"ray check {on_ray.dir.name}"), "files": files}


# --------------------------------------------------------------------------------------------- driver


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("modularforge").setLevel(logging.WARNING)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        sys.exit(f"error: data folder not found: {args.data} (pass --data)")
    args.data = args.data.resolve()  # the work folder is keyed by the config, so one spelling per folder
    base_cfg = load_base(args)
    ws = Q.Workspace(base_cfg, args.work)
    scale = "quick" if args.quick else "full"
    budgets, fractions = parse_tokens(args.budgets), [float(x) for x in args.fractions.split(",")]
    nt = [t for t in parse_tokens(args.nt_budgets) if t in budgets] if args.nt_budgets != "all" else budgets
    plan = Plan(ws, scale, budgets, fractions, nt, args.dev_windows)
    timings = Timings(args.work / scale / "timings.json")
    (args.work / scale).mkdir(parents=True, exist_ok=True)

    base = ws.run("base", base_cfg)
    timings.ensure(base, "prepare", prepare, "prepare")
    for run in [*plan.dense.values(), *plan.shared.values()]:
        Q.link_prepared(run, base)
    vocab = base.vocab_size()
    dense_model = CausalLM(base_cfg.model, vocab, moe=False)
    params = count_parameters(dense_model)
    embedding = dense_model.model.embed_tokens.weight.numel() + (
        0 if base_cfg.model.tie_embeddings else dense_model.lm_head.weight.numel())
    del dense_model
    log.info("dense model: %.2fM parameters (%.2fM outside embeddings and LM head); budgets %s tokens = %s "
             "tokens/parameter", params / 1e6, (params - embedding) / 1e6, budgets,
             ", ".join(f"{t / params:.2f}" for t in budgets))

    rate = train_dense(plan, timings, rate_only=args.estimate)
    expert_rate = _expert_rate(plan) or rate
    estimate = projection(plan, rate, expert_rate)
    log.info("measured %.0f tok/s in the shared phase, %.0f tok/s per expert%s; projected benchmark %.1f min "
             "(tokens %s)", rate, expert_rate, "" if _expert_rate(plan) else " (assumed: no expert trained yet)",
             estimate["total_minutes"], estimate["tokens"])
    if args.estimate:
        print(yaml.safe_dump(estimate, sort_keys=False))
        return

    rate = shared_rate(plan, timings, rate)  # the whole shared phase's, for the wall times below
    dev = Q.DevSet.build(args.data, base, args.dev_windows, base_cfg.model.max_seq_len)
    rows = Rows(Q.Scoring.for_run(base), dev)
    dense_ppl = {d: rows.dense(load_dense(base_cfg.model, vocab, run.shared_dir), f"dense at {d} tokens",
                               group="dense", tokens=d) for d, run in plan.dense.items()}

    results = {}
    for t in plan.budgets:
        entry = {"tokens": t, "tokens_per_parameter": round(t / params, 4), "dense": dense_ppl[t],
                 "dense_NT": dense_ppl.get(plan.N * t), "fractions": {}}
        for f in plan.fractions:
            shared = plan.shared[(t, f)]
            cell = {"anchor": rows.dense(load_dense(base_cfg.model, vocab, shared.shared_dir),
                                         f"T={t} f={f}: anchor", group="anchor", budget=t, fraction=f)}
            for kind in KINDS:
                run = plan.experts(t, f, kind)
                copy_after_shared(shared, run)
                for stage, fn in (("train-experts", train_experts), ("assemble", assemble),
                                  ("calibrate", calibrate), ("evaluate", evaluate)):
                    timings.ensure(run, stage, fn, f"{stage} {run.dir.name}")
                model = open_model(run.model_dir)
                calibration = read_json(run.model_dir / "modularforge.json")["calibration"]
                cell[kind] = {"ppl": rows.moe(model, f"T={t} f={f} {kind}", group=kind, budget=t, fraction=f),
                              "expert_tokens": run.cfg.expert_steps * run.cfg.tokens_per_step(run.cfg.expert_train),
                              "expert_seconds": expert_seconds(run), "experts": expert_checks(run),
                              "temperature_per_layer": calibration["temperature"]}
                del model
            entry["fractions"][str(f)] = cell
        results[t] = summarize_budget(entry, plan, rate, timings)

    ray = ray_check(plan, plan.budgets[0], plan.fractions[-1], "equal_wall", timings) if args.ray_check else None
    curve = fit_curve(results)
    result = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "config": base_cfg.model_dump(mode="json"),
        "machine": machine_facts(base_cfg),
        "git": git_facts(),
        "scale": scale,
        "num_experts": plan.N,
        "budgets": plan.budgets,
        "fractions": plan.fractions,
        "dense_NT_budgets": plan.nt,
        "dense_NT_dropped": [t for t in plan.budgets if t not in plan.nt],
        "parameters": {"dense_total": params, "embeddings_and_lm_head": embedding},
        "tokens_per_parameter": "budget T / all parameters of the dense model (embeddings and LM head included)",
        "wall_time_note": f"equal_wall: the {plan.N} experts of a set were trained one after another on this "
                          f"machine; their wall time is counted as on {plan.N} workers (the slowest expert). "
                          "Shared-phase and dense wall times are tokens / the trunk's measured tokens/s (the "
                          "branched runs share the trunk's steps).",
        "scored": f"positions after the {base_cfg.evaluate.prefix_len}-token prefix of {args.dev_windows} "
                  f"{base_cfg.model.max_seq_len}-token windows per corpus dev set, fp32",
        "projection": estimate,
        "throughput": {"shared_tokens_per_s": round(rate), "expert_tokens_per_s": round(_expert_rate(plan) or 0),
                       "note": "shared: trunk and decays, tokens / recorded wall time; experts: their training "
                               "loops (done.json); the projection used the trunk's first segment"},
        "timings": timings.data,
        "results": {str(t): r for t, r in results.items()},
        "curve": curve,
        "ray_check": ray,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "rows": rows.rows,
    }
    write_json(args.out, result)
    plot(results, curve, args.plot)
    print_table(result)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "parallel")
    parser.add_argument("--out", type=Path, help="default docs/results/parallel.json (--quick: in --work/quick)")
    parser.add_argument("--plot", type=Path, help="default docs/results/parallel.png (--quick: in --work/quick)")
    parser.add_argument("--budgets", help=f"budgets T in tokens, comma-separated (default {DEFAULT_BUDGETS})")
    parser.add_argument("--nt-budgets", help="budgets that also get a dense run at N*T tokens, or 'all' (default "
                                             f"{DEFAULT_NT}: the longest run, dense at the largest T, covers 8x the "
                                             "smallest; 8x a larger one would not fit in 40 minutes)")
    parser.add_argument("--fractions", help=f"shared fractions f (default {DEFAULT_FRACTIONS})")
    parser.add_argument("--dev-windows", type=int, help="dev windows per corpus (default 32)")
    parser.add_argument("--threads", type=int, help="torch threads (default torch's: one per core). On this "
                                                    "2-core machine shared with other jobs, 1 thread trained 4x "
                                                    "faster than 2")
    parser.add_argument("--estimate", action="store_true",
                        help="train the dense trunk to its first branch point, print tokens/s and the projected "
                             "time of the whole benchmark, and stop")
    parser.add_argument("--ray-check", action="store_true",
                        help="also train the smallest budget's equal-wall experts (largest f) with the Ray executor "
                             "on 2 local workers and compare the files' sha256 with the local executor's")
    parser.add_argument("--quick", action="store_true", help="tiny model and budgets, to check the benchmark itself")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the base config (finished stages whose inputs did not change are reused)")
    args = parser.parse_args()
    quick = args.quick
    args.budgets = args.budgets or (QUICK_BUDGETS if quick else DEFAULT_BUDGETS)
    args.nt_budgets = args.nt_budgets or (QUICK_NT if quick else DEFAULT_NT)
    args.fractions = args.fractions or (QUICK_FRACTIONS if quick else DEFAULT_FRACTIONS)
    args.dev_windows = args.dev_windows or (8 if quick else 32)
    results = args.work / "quick" if quick else ROOT / "docs" / "results"  # a check's results stay in --work
    args.out = args.out or results / "parallel.json"
    args.plot = args.plot or results / "parallel.png"
    return args


def load_base(args: argparse.Namespace) -> Config:
    raw = yaml.safe_load(args.config.read_text())
    if args.quick:
        for section, values in QUICK.items():
            node = raw.setdefault(section, {})
            for key, value in values.items():
                node[key] = {**node.get(key, {}), **value} if isinstance(value, dict) else value
    for item in args.set:
        apply_override(raw, item)
    raw.setdefault("data", {})["sources"] = [str(args.data / "*" / "train-*.jsonl")]
    raw.setdefault("run", {})["root"] = str(args.work)
    return config_from_dict(raw)


def _expert_rate(plan: Plan) -> float | None:
    """Tokens/s of one expert's training loop, from the finished experts of this scale's work folder."""
    tokens = seconds = 0.0
    for done in (plan.ws.work / plan.scale).glob("experts-*/experts/expert_*/done.json"):
        summary = read_json(done)
        tokens, seconds = tokens + summary["tokens"], seconds + summary["seconds"]
    return tokens / seconds if seconds else None


# ------------------------------------------------------------------------------------------- summary


def best_mode(ppl: dict[str, float]) -> tuple[str, float]:
    mode = min(DEPLOYABLE, key=lambda m: ppl[m])
    return mode, ppl[mode]


def summarize_budget(entry: dict, plan: Plan, rate: float, timings: Timings) -> dict:
    """Ratios against dense (below 1: modular is better), the best fraction, experts that did not beat the
    anchor, and wall times (shared phase and dense from the trunk's tokens/s; experts as measured)."""
    t, dense, dense_nt = entry["tokens"], entry["dense"], entry["dense_NT"]
    for f, cell in entry["fractions"].items():
        f = float(f)
        shared_s = f * t / rate
        for kind in KINDS:
            part = cell[kind]
            mode, ppl = best_mode(part["ppl"])
            part["best_deployable"] = {"mode": mode, "ppl": ppl}
            part["ratio_vs_dense_T"] = round(ppl / dense, 4)
            part["token_ratio_vs_dense_T"] = round(part["ppl"]["token"] / dense, 4)
            if dense_nt:
                part["ratio_vs_dense_NT"] = round(ppl / dense_nt, 4)
            part["vs_anchor"] = {m: round(v / cell["anchor"], 4) for m, v in part["ppl"].items()}
            seconds = part["expert_seconds"]
            expert_s = max(seconds) if kind == "equal_wall" else sum(seconds)
            part["wall_seconds"] = {"shared_phase": round(shared_s, 1), "experts": round(expert_s, 1),
                                    "counted_as": f"{plan.N} workers" if kind == "equal_wall" else "one machine",
                                    "total": round(shared_s + expert_s, 1)}
            part["experts_not_beating_anchor"] = {
                "selection_text": [e["expert"] for e in part["experts"] if e["beats_anchor"] is False],
                "validation_text": [e["expert"] for e in part["experts"] if e["val_gain"] <= 0]}
    entry["dense_wall_seconds"] = {"T": round(t / rate, 1), "NT_on_one_machine": round(plan.N * t / rate, 1)}
    for kind in KINDS:
        best_f = min(entry["fractions"], key=lambda f: entry["fractions"][f][kind]["best_deployable"]["ppl"])
        best = entry["fractions"][best_f][kind]
        entry[f"best_{kind}"] = {"fraction": float(best_f), "ratio_vs_dense_T": best["ratio_vs_dense_T"],
                                 "ratio_vs_dense_NT": best.get("ratio_vs_dense_NT"), **best["best_deployable"],
                                 "token_ratio_vs_dense_T": min(c[kind]["token_ratio_vs_dense_T"]
                                                               for c in entry["fractions"].values())}
    return entry


def fit_line(x: list[float], y: list[float], crossover: bool = True) -> dict | None:
    """y = slope * log10(x) + intercept, and (`crossover`) the x where y reaches 1.0."""
    if len(x) < 2:
        return None
    slope, intercept = np.polyfit(np.log10(x), y, 1)
    out = {"slope_per_decade": round(float(slope), 5), "intercept": round(float(intercept), 5)}
    if not crossover:
        return out
    if abs(slope) < 1e-9:
        out["crossover"] = None
        out["reading"] = "flat: no crossover"
        return out
    log_cross = (1 - intercept) / slope
    lo, hi = min(x), max(x)
    wins = "above" if slope < 0 else "below"
    span = f"the measured range {lo:.3g}-{hi:.3g}"
    if not np.log10(lo) - 1 <= log_cross <= np.log10(hi) + 1:
        out["crossover_tokens_per_parameter"] = None
        side = "better" if intercept + slope * np.log10(hi) < 1 else "worse"
        out["reading"] = (f"no crossover within 10x of {span}: modular stays {side} than dense there "
                          f"(the fit reaches 1.0 only at 10^{log_cross:.1f})")
        return out
    cross = 10**log_cross
    where = "inside" if lo <= cross <= hi else ("above" if cross > hi else "below")
    out["crossover_tokens_per_parameter"] = float(f"{cross:.4g}")
    out["reading"] = f"ratio 1.0 at {cross:.3g} tokens/parameter ({where} {span}); modular beats dense {wins} it"
    return out


def fit_curve(results: dict) -> dict:
    ts = sorted(results)
    x = [results[t]["tokens_per_parameter"] for t in ts]
    series = {
        "equal_tokens_vs_dense_T": [results[t]["best_equal_tokens"]["ratio_vs_dense_T"] for t in ts],
        "equal_tokens_token_routing_vs_dense_T": [results[t]["best_equal_tokens"]["token_ratio_vs_dense_T"]
                                                  for t in ts],
        "equal_wall_vs_dense_T": [results[t]["best_equal_wall"]["ratio_vs_dense_T"] for t in ts],
        "equal_wall_vs_dense_NT": [results[t]["best_equal_wall"]["ratio_vs_dense_NT"] for t in ts],
        "best_fraction_equal_tokens": [results[t]["best_equal_tokens"]["fraction"] for t in ts],
        "best_fraction_equal_wall": [results[t]["best_equal_wall"]["fraction"] for t in ts],
    }
    fits = {}
    for name, y in series.items():
        pairs = [(a, b) for a, b in zip(x, y) if b is not None]
        fits[name] = fit_line([a for a, _ in pairs], [b for _, b in pairs], not name.startswith("best_fraction"))
    return {"tokens_per_parameter": x, "series": series, "fits": fits,
            "ratio": "best deployable modular perplexity (token, sequence, fixed sequence or ensemble routing; "
                     "best shared fraction) / dense perplexity; below 1.0 modular is better"}


def print_table(result: dict) -> None:
    n = result["num_experts"]
    print(f"\nequal_wall: experts trained one after another here, wall time counted as on {n} workers")
    print(f"{'T':>9} {'tok/par':>7} {'dense T':>8} {'dense NT':>8} {'f':>5} {'anchor':>8} | "
          f"{'eq tok':>7} {'eq seq':>7} {'eq orc':>7} {'eq/T':>6} | {'wall tok':>8} {'wall seq':>8} "
          f"{'wall orc':>8} {'wall/T':>6} {'wall/NT':>7} | not beating anchor (sel/val)")
    for t, r in result["results"].items():
        nt = f"{r['dense_NT']:.2f}" if r["dense_NT"] else "-"
        for f, c in r["fractions"].items():
            eq, wall = c["equal_tokens"], c["equal_wall"]
            worse = " ".join(f"{short} {c[k]['experts_not_beating_anchor']['selection_text']}"
                             f"/{c[k]['experts_not_beating_anchor']['validation_text']}"
                             for k, short in zip(KINDS, ("eq", "wall")))
            print(f"{t:>9} {r['tokens_per_parameter']:>7.3f} {r['dense']:>8.2f} {nt:>8} {float(f):>5.2f} "
                  f"{c['anchor']:>8.2f} | {eq['ppl']['token']:>7.2f} {eq['ppl']['sequence']:>7.2f} "
                  f"{eq['ppl']['oracle']:>7.2f} {eq['ratio_vs_dense_T']:>6.3f} | {wall['ppl']['token']:>8.2f} "
                  f"{wall['ppl']['sequence']:>8.2f} {wall['ppl']['oracle']:>8.2f} {wall['ratio_vs_dense_T']:>6.3f} "
                  f"{wall.get('ratio_vs_dense_NT', float('nan')):>7.3f} | {worse}")
        for kind in KINDS:
            b = r[f"best_{kind}"]
            nt_ratio = f", vs dense NT {b['ratio_vs_dense_NT']:.3f}" if b["ratio_vs_dense_NT"] else ""
            print(f"{'':>9} best {kind}: f={b['fraction']} {b['mode']} {b['ppl']:.2f}, "
                  f"vs dense T {b['ratio_vs_dense_T']:.3f}{nt_ratio}")
    print("\ncurve (ratio = a * log10(tokens/parameter) + b):")
    for name, fit in result["curve"]["fits"].items():
        if fit:
            print(f"  {name}: a={fit['slope_per_decade']:+.4f} b={fit['intercept']:.4f}"
                  f"{'  ' + fit['reading'] if 'reading' in fit else ''}")
    if result["ray_check"]:
        rc = result["ray_check"]
        print(f"\nray check ({rc['run']}, 2 local workers): {len(rc['files'])} files, "
              f"{'all identical' if rc['all_identical'] else 'NOT identical'} to the local executor's")
    print(f"projected {result['projection']['total_minutes']} min; wall time {result['wall_seconds'] / 60:.1f} min")


def plot(results: dict, curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array(curve["tokens_per_parameter"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"equal_tokens_vs_dense_T": ("equal tokens vs dense T", "tab:blue", "o"),
              "equal_wall_vs_dense_T": ("equal wall time (8 workers) vs dense T", "tab:green", "s")}
    grid = np.logspace(np.log10(x.min()) - 0.3, np.log10(x.max()) + 0.3, 50)
    for name, (label, color, marker) in styles.items():
        pairs = [(a, b) for a, b in zip(x, curve["series"][name]) if b is not None]
        if not pairs:
            continue
        left.plot(*zip(*pairs), marker, color=color, label=label, fillstyle="none", markersize=8)
        fit = curve["fits"].get(name)
        if fit:
            left.plot(grid, fit["slope_per_decade"] * np.log10(grid) + fit["intercept"], "--", color=color, lw=0.8)
    left.axhline(1.0, color="grey", lw=0.8)
    # dense at N*T (several times better) is written, not drawn: on the same axis it flattens every other point
    nt = [f"{a:.2g}: {b:.2f}" for a, b in zip(x, curve["series"]["equal_wall_vs_dense_NT"]) if b is not None]
    if nt:
        left.set_title("equal wall time vs dense N*T (tokens/param: ratio): " + ", ".join(nt), fontsize=8)
    left.set_xlabel("tokens per parameter (dense model)")
    left.set_ylabel("modular / dense perplexity (best f, best routing)")
    left.legend(fontsize=7)
    for name, color in (("best_fraction_equal_tokens", "tab:blue"), ("best_fraction_equal_wall", "tab:green")):
        right.plot(x, curve["series"][name], "o-", color=color, label=name.replace("best_fraction_", ""))
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:.2g}" for v in x])
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    right.set_xlabel("tokens per parameter (dense model)")
    right.set_ylabel("best shared fraction f")
    right.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
