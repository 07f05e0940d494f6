"""Grow benchmark: a model that takes new text after assembly, against the alternative a user
would try, continuing to train the dense model on the new text.

1. The whole pipeline (`modularforge run`) on six of the eight corpora of ../shared/data: trunk, six clustered
   partitions, one expert each, assembled, calibrated, evaluated. That model is "before".
2. The other two corpora are added with `modularforge add-expert --data <corpus>/train-*.jsonl --name <corpus>`,
   one call each, as a user would: only the new expert trains (alone, then fitted into the grown model,
   `experts.fit_fraction`), then re-assembly, calibration and the report.
3. Continued training: the dense anchor model (trunk + anchor FFN, every weight trainable) trained on the two new
   corpora for as many tokens of them as the two new experts saw together (alone and in their fit), half each, at
   the expert phase's learning rate and at the trunk's peak rate (the better one on the new corpora is the comparison).

Rows, on the first --eval-tokens tokens of every corpus's dev file (every position but the first): the dense
anchor; before (token routing, the exported model; sequence routing); after adding (token routing, exported;
sequence routing; oracle: each new corpus sent to its own expert); continued training. Then: the gain on the new
corpora against continued training's, the change on the old corpora, what add-expert cost against the full
pipeline (and against one expert's training plus assembly and calibration), its peak RSS per step against the
expert phase's, and the sha256 of every base expert's files before and after (nothing retrained).

    python benchmarks/grow.py --data ../shared/data            # about 40 minutes on 2 cores
    python benchmarks/grow.py --data ../shared/data --quick    # tiny model and budgets: checks the benchmark

Prints a table and writes docs/results/grow.json and docs/results/grow.png. Trained parts are kept in --work and
reused on a rerun.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from corpora import CORPORA, dev_file  # noqa: E402
from machine import git_facts, machine_facts  # noqa: E402

from modularforge.config import apply_override, config_from_dict  # noqa: E402
from modularforge.data.batches import PreparedData, batch_rng, fixed_batches  # noqa: E402
from modularforge.data.shards import CALIB, TRAIN  # noqa: E402
from modularforge.data.tokenizer import load_tokenizer  # noqa: E402
from modularforge.evaluate import FileScoring, score_file  # noqa: E402
from modularforge.files import read_json, write_json  # noqa: E402
from modularforge.inference import open_model  # noqa: E402
from modularforge.model.transformer import CausalLM  # noqa: E402
from modularforge.model.weights import load_dense  # noqa: E402
from modularforge.runs import STAGES, Run  # noqa: E402
from modularforge.train.loop import LoopPlan, ModelLoss, Objective, train_loop  # noqa: E402

log = logging.getLogger("grow")

CONFIG = ROOT / "benchmarks" / "grow.yaml"
NEW = ("us_code", "foldoc")  # legal text and a computing dictionary: neither is like the six the trunk saw
CT_STREAM = 3_000_000  # batch streams of continued training (one per new corpus)
QUICK = [
    "model.hidden_size=32", "model.intermediate_size=96", "model.num_layers=2", "model.num_heads=2",
    "model.max_seq_len=64", "tokenizer.vocab_size=1024", "tokenizer.train_max_chars=2000000",
    "budget.total_tokens=120000", "budget.expert_tokens=16000",
    "experts.stats_tokens=2048", "calibrate.calib_tokens=4096", "evaluate.eval_tokens=512",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="the eight corpora")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "grow", help="runs, reused on a rerun")
    p.add_argument("--new", default=",".join(NEW), help="the corpora added after assembly (comma-separated)")
    p.add_argument("--eval-tokens", type=int, help="dev tokens scored per corpus (default 32768; --quick 2048)")
    p.add_argument("--threads", type=int, help="torch threads (run.threads)")
    p.add_argument("--quick", action="store_true", help="tiny model and budgets, to check the benchmark itself")
    p.add_argument("--replay", type=float, help="add the new experts with `add-expert --replay F` (its own work "
                   "folder and grow-replay-F.json)")
    p.add_argument("--set", action="append", default=[], help="override a config key of the run (section.key=value)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="where grow.json and grow.png go")
    return p.parse_args()


def train_files(args: argparse.Namespace) -> str:
    """The training files of a corpus: all of them, or the first one in --quick."""
    return "train-00000.jsonl" if args.quick else "train-*.jsonl"


def base_config(args: argparse.Namespace, new: list[str]) -> dict:
    raw = yaml.safe_load(CONFIG.read_text())
    for item in [f"data.sources={[str(args.data / c / train_files(args)) for c in CORPORA if c not in new]}",
                 *(QUICK if args.quick else []), *([f"run.threads={args.threads}"] if args.threads else []), *args.set]:
        apply_override(raw, item)
    config_from_dict(raw)  # fails here, not in a child process
    return raw


def modularforge(*argv: str) -> float:
    """Run the CLI as a user would (its stages are child processes); its wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "modularforge", *argv], check=True)
    return time.perf_counter() - start


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- the steps


def pipeline(run: Run, config_path: Path, state: dict, work: Path) -> None:
    """The full pipeline on the base corpora; its model, manifest and expert files kept as "before"."""
    if "pipeline_seconds" in state:
        return
    state["pipeline_seconds"] = round(modularforge("run", "--config", str(config_path), "--run-dir", str(run.dir)), 1)
    before = work / "before"
    if before.exists():
        shutil.rmtree(before)
    shutil.copytree(run.model_dir, before / "model")
    shutil.copy2(run.manifest_path, before / "manifest.json")
    state["base_experts"] = [s.name for s in run.experts()]
    state["base_hashes"] = {name: file_hashes(run.expert_dir(name)) for name in state["base_experts"]}
    write_json(work / "state.json", state)


def add_new(run: Run, args: argparse.Namespace, new: list[str], state: dict, work: Path) -> None:
    for corpus in new:
        if corpus in {s.name for s in run.experts()} and run.is_done("evaluate"):
            continue
        replay = ["--replay", str(args.replay)] if args.replay is not None else []
        modularforge("add-expert", "--run-dir", str(run.dir), "--data", str(args.data / corpus / train_files(args)),
                     "--name", corpus, *replay)
    state["after_hashes"] = {name: file_hashes(run.expert_dir(name)) for name in state["base_experts"]}
    write_json(work / "state.json", state)


def continued_training(run: Run, new: list[str], lr: float, out_dir: Path) -> CausalLM:
    """The dense anchor model, every weight trainable, trained on the new corpora's training text (the files
    add-expert wrote) for as many tokens of it as their experts saw together (alone and in their fit), alternating
    corpora step by step, with the expert phase's recipe (AdamW, warmup, wsd decay) at peak rate `lr`."""
    cfg = run.cfg
    specs = [run.expert(c) for c in new]
    data = [PreparedData(run.dir / s.data) for s in specs]
    tcfg = cfg.expert_train.model_copy(update={"lr": lr})
    seq_len, micro = cfg.seq_len(tcfg), tcfg.micro_batch
    windows = [d.windows(TRAIN, s.partition) for d, s in zip(data, specs)]
    val = [b for d, s in zip(data, specs)
           for b in fixed_batches(d.windows(CALIB, s.partition), tcfg.eval_batches * micro, seq_len, micro)]
    model = load_dense(cfg.model, run.vocab_size(), run.shared_dir)
    model.requires_grad_(True)

    def sample_batch(step: int) -> torch.Tensor:
        i = step % len(windows)
        return windows[i].sample(batch_rng(cfg.run.seed, CT_STREAM + i, step), tcfg.batch_size, seq_len)

    steps = round(sum(own_text_tokens(run, s.name) for s in specs) / cfg.tokens_per_step(tcfg))
    train_loop(Objective(params=dict(model.named_parameters()), loss_fn=ModelLoss(model, False, tcfg.loss_chunks),
                         sample_batch=sample_batch, val_batches=val),
               tcfg, LoopPlan(steps=steps, out_dir=out_dir, label=f"continued training, lr {lr:.1e}",
                              fingerprint=f"{run.fingerprint('train-shared')}-{lr}-{steps}"))
    model.requires_grad_(False)
    return model.eval()


def own_text_tokens(run: Run, name: str) -> int:
    """Tokens of its own text an added expert trained on: alone, then in its fit (done.json)."""
    done = read_json(run.expert_dir(name) / "done.json")
    return done["tokens"] + done.get("fit", {}).get("own_tokens", 0)


# ----------------------------------------------------------------------------------------------- rows


class Rows:
    """Each row's perplexity on every corpus's dev text, from `score_file`."""

    def __init__(self, data: Path, tokenizer, eval_tokens: int):
        self.files = {c: dev_file(data, c) for c in CORPORA}
        self.tokenizer, self.eval_tokens = tokenizer, eval_tokens
        self.rows: dict[str, dict] = {}

    def score(self, name: str, model: CausalLM, corpora: list[str] | None = None, **how) -> dict:
        """Score `model` on the dev text of `corpora` (default: all) into row `name`."""
        per = self.rows.setdefault(name, {})
        for corpus in corpora or CORPORA:
            result = score_file(model, self.tokenizer, self.files[corpus],
                                FileScoring(max_tokens=self.eval_tokens, **how))
            per[corpus] = {k: result[k] for k in ("loss", "perplexity", "tokens")}
            log.info("%-50s %-22s perplexity %.2f", name, corpus, per[corpus]["perplexity"])
        return per


def pooled(per: dict, corpora: list[str]) -> float | None:
    """Perplexity over the tokens of `corpora` together (token-weighted mean loss)."""
    if not all(c in per for c in corpora):
        return None
    tokens = sum(per[c]["tokens"] for c in corpora)
    return math.exp(sum(per[c]["loss"] * per[c]["tokens"] for c in corpora) / tokens)


def summarize(rows: dict, new: list[str], old: list[str], ct_rows: list[str], state: dict, run: Run,
              work: Path) -> dict:
    best_ct = min(ct_rows, key=lambda r: pooled(rows[r], new))
    pool = {name: {"new": pooled(per, new), "old": pooled(per, old), "all": pooled(per, list(CORPORA))}
            for name, per in rows.items()}
    gain = lambda row: 1 - pool[row]["new"] / pool["before: token (exported)"]["new"]  # noqa: E731
    old_change = lambda row: pool[row]["old"] / pool["before: token (exported)"]["old"] - 1  # noqa: E731
    targets = {
        "new_gain_share_of_continued_training": {
            "grown (token, exported)": round(gain("after: token (exported)") / gain(best_ct), 4),
            "grown (sequence)": round((1 - pool["after: sequence"]["new"] / pool["before: sequence"]["new"])
                                      / gain(best_ct), 4),
            "target": ">= 0.90",
        },
        "old_corpora_change": {
            "grown (token, exported)": round(old_change("after: token (exported)"), 5),
            "grown (sequence)": round(pool["after: sequence"]["old"] / pool["before: sequence"]["old"] - 1, 5),
            **{ct: round(old_change(ct), 5) for ct in ct_rows},
            "target": "grown within +0.5% of before",
        },
    }
    before_manifest = read_json(work / "before" / "manifest.json")
    changes = read_json(run.manifest_path).get("changes", [])
    expert_seconds = [read_json(run.expert_dir(n) / "done.json")["seconds"] for n in state["base_experts"]]
    base_stages = before_manifest["stages"]
    cost = {
        "full_pipeline_seconds": state["pipeline_seconds"],
        "full_pipeline_stages": {s: base_stages[s]["wall_seconds"] for s in STAGES if s in base_stages},
        "one_base_expert_training_seconds_mean": round(sum(expert_seconds) / len(expert_seconds), 1),
        "add_expert": [{"added": c["added"], "wall_seconds": c["wall_seconds"], "steps": c["steps"],
                        "new_expert_training_seconds": read_json(run.expert_dir(c["added"][0]) / "done.json")["seconds"],
                        "share_of_full_pipeline": round(c["wall_seconds"] / state["pipeline_seconds"], 3)}
                       for c in changes if c["command"] == "add-expert"],
        "expert_phase_peak_rss_mb": base_stages["train-experts"]["peak_rss_mb"],
        "base_stage_peak_rss_mb": {s: base_stages[s]["peak_rss_mb"] for s in STAGES if s in base_stages},
    }
    unchanged = {name: state["base_hashes"][name] == state["after_hashes"][name] for name in state["base_experts"]}
    return {"pooled_perplexity": pool, "continued_training_compared": best_ct, "targets": targets, "cost": cost,
            "base_expert_files_unchanged": unchanged}


def print_table(rows: dict, summary: dict, new: list[str]) -> None:
    names = list(CORPORA)
    print("\n" + f"{'row':<42}" + "".join(f"{c[:11]:>12}" for c in names) + f"{'old':>9}{'new':>9}")
    for row, per in rows.items():
        cells = "".join(f"{per[c]['perplexity']:>12.2f}" if c in per else f"{'-':>12}" for c in names)
        pool = summary["pooled_perplexity"][row]
        print(f"{row:<42}{cells}" + "".join(f"{pool[k]:>9.2f}" if pool[k] else f"{'-':>9}" for k in ("old", "new")))
    t = summary["targets"]
    print(f"\nnew corpora ({', '.join(new)}): gain / continued training's = "
          f"{t['new_gain_share_of_continued_training']['grown (token, exported)']:.3f} (token), "
          f"{t['new_gain_share_of_continued_training']['grown (sequence)']:.3f} (sequence); target >= 0.90")
    print("old corpora: change " + ", ".join(f"{k} {v:+.2%}" for k, v in t["old_corpora_change"].items()
                                             if k != "target") + "; target grown within +0.5%")
    c = summary["cost"]
    for add in c["add_expert"]:
        print(f"add-expert {', '.join(add['added'])}: {add['wall_seconds']:.0f} s = {add['share_of_full_pipeline']:.1%} "
              f"of the full pipeline ({c['full_pipeline_seconds']:.0f} s); steps " + ", ".join(
                  f"{s} {v['wall_seconds']:.0f} s / {v['peak_rss_mb']:.0f} MB" for s, v in add["steps"].items()))
    print(f"expert phase peak RSS {c['expert_phase_peak_rss_mb']:.0f} MB; base experts' files unchanged: "
          f"{all(summary['base_expert_files_unchanged'].values())}")


def plot(rows: dict, path: Path, new: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shown = [r for r in rows if r != "dense anchor"]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(shown)
    for i, row in enumerate(shown):
        ratio = [rows[row][c]["perplexity"] / rows["dense anchor"][c]["perplexity"] if c in rows[row] else np.nan
                 for c in CORPORA]
        ax.bar(np.arange(len(CORPORA)) + i * width, ratio, width, label=row)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(CORPORA)) + 0.4 - width / 2,
                  [c + (" (new)" if c in new else "") for c in CORPORA], rotation=20, fontsize=8)
    ax.set_ylabel("perplexity / dense anchor's")
    ax.set_title("dev text of every corpus: before and after add-expert, against continued training")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    args = parse_args()
    new = [c.strip() for c in args.new.split(",") if c.strip()]
    args.eval_tokens = args.eval_tokens or (2048 if args.quick else 32768)
    old = [c for c in CORPORA if c not in new]
    suffix = "" if args.replay is None else f"-replay{args.replay:g}"
    work = args.work / (("quick" if args.quick else "full") + suffix)
    work.mkdir(parents=True, exist_ok=True)
    raw = base_config(args, new)
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = Run(config_from_dict(raw), work / "run")
    state = read_json(work / "state.json") if (work / "state.json").exists() else {}
    if state.get("config") != raw:  # another configuration: start over
        shutil.rmtree(work / "run", ignore_errors=True)
        state = {"config": raw}
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)

    pipeline(run, config_path, state, work)
    rows = Rows(args.data, load_tokenizer(run.tokenizer_dir), args.eval_tokens)
    cfg = run.cfg
    rows.score("dense anchor", load_dense(cfg.model, run.vocab_size(), run.shared_dir).eval())
    before = open_model(work / "before" / "model")
    rows.score("before: token (exported)", before)
    rows.score("before: sequence", before, routing="sequence", prefix_len=cfg.evaluate.prefix_len,
               revise_every=cfg.evaluate.sequence_revise_every)
    del before

    add_new(run, args, new, state, work)
    after = open_model(run.model_dir)
    rows.score("after: token (exported)", after)
    rows.score("after: sequence", after, routing="sequence", prefix_len=cfg.evaluate.prefix_len,
               revise_every=cfg.evaluate.sequence_revise_every)
    names = [s.name for s in run.experts()]
    for corpus in new:
        rows.score("after: oracle (new corpora to their expert)", after, [corpus], expert=names.index(corpus))
    del after

    ct_rows = []
    final = cfg.train.lr * cfg.train.min_lr_ratio  # where the trunk's schedule ended
    rates = [(cfg.expert_train.lr, "the expert phase's"), (cfg.train.lr, "the trunk's peak"),
             (2 * final, "2x the trunk's final")]
    for lr in sorted({rate for rate, _ in rates}):  # the baseline gets its best: the lowest new-corpora perplexity
        labels = [label for rate, label in rates if rate == lr]
        model = continued_training(run, new, lr, work / f"continued-{lr:.1e}")
        ct_rows.append(f"continued training (lr {lr:.1e}: {', '.join(labels)})")
        rows.score(ct_rows[-1], model)
        del model

    summary = summarize(rows.rows, new, old, ct_rows, state, run, work)
    result = {
        "benchmark": "grow",
        "command": " ".join(["python", *sys.argv]),
        "quick": args.quick,
        "replay": args.replay,
        "new_corpora": new,
        "old_corpora": old,
        "eval_tokens_per_corpus": args.eval_tokens,
        "config": raw,
        "rows": rows.rows,
        **summary,
        "machine": machine_facts(cfg),
        "git": git_facts(),
        "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
    }
    print_table(rows.rows, summary, new)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "grow" + suffix
        write_json(args.out / f"{name}.json", result)
        plot(rows.rows, args.out / f"{name}.png", new)
        print(f"\nwrote {args.out / name}.json and .png")
    else:
        write_json(work / "grow.json", result)
        plot(rows.rows, work / "grow.png", new)
        print(f"\nquick run: wrote {work / 'grow.json'} and {work / 'grow.png'}")


if __name__ == "__main__":
    main()
