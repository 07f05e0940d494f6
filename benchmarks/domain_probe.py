"""Domain-probe sweep: the shared phase trained with `train.domain_probe_weight` = w, then the
quality benchmark's best expert set (anchor-initialised, alone) and token recipes, against oracle and
sequence routing, at the presets' 5/6 split. Reuses `benchmarks/quality.py`'s work folder, prepared data,
dev windows and scoring, so its rows compare with quality.json's.

    python benchmarks/domain_probe.py --data ../shared/data --weights 0,0.01,0.05,0.3
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality as Q  # noqa: E402

from modularforge.config import config_from_dict, preset_path  # noqa: E402
from modularforge.files import write_json  # noqa: E402
from modularforge.model.weights import load_dense  # noqa: E402
from modularforge.prepare import prepare  # noqa: E402
from modularforge.train.experts import train_experts  # noqa: E402
from modularforge.train.shared import train_shared  # noqa: E402

log = logging.getLogger("domain_probe")
RECIPES = [("lda", "temperature", 2), ("ridge", "temperature", 2), ("lda", "temperature", 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--weights", default="0,0.01,0.05,0.3", help="comma-separated probe weights")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "quality")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "domain_probe.json")
    parser.add_argument("--dev-windows", type=int, default=24)
    parser.add_argument("--probe-from", type=int, default=0, help="train.domain_probe_from")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("modularforge").setLevel(logging.WARNING)
    if not args.data.is_dir():
        sys.exit(f"error: data folder not found: {args.data} (pass --data)")
    args.data = args.data.resolve()  # the work folder is keyed by the config, so one spelling per folder
    started = time.perf_counter()
    raw = yaml.safe_load(preset_path("quality").read_text())
    raw.setdefault("data", {})["sources"] = [str(args.data / "*" / "train-*.jsonl")]
    raw.setdefault("run", {})["root"] = str(args.work)
    base_cfg = config_from_dict(raw)
    ws = Q.Workspace(base_cfg, args.work)
    total = base_cfg.budget.total_tokens
    base = ws.run("base", base_cfg)
    Q.ensure(base, "prepare", prepare)
    dev = Q.DevSet.build(args.data, base, args.dev_windows, base_cfg.model.max_seq_len)
    scoring = Q.Scoring.for_run(base, micro=base_cfg.experts.train.micro_batch)
    budget = {"total_tokens": total, "shared_fraction": 5 / 6}
    results = {}
    for weight in (float(w) for w in args.weights.split(",")):
        probe = {"domain_probe_weight": weight, "domain_probe_from": args.probe_from}
        tag = f"probe{weight}" + (f"-from{args.probe_from}" if args.probe_from else "")
        shared = ws.run(f"shared-0.833-{tag}", ws.config(budget=budget, train=probe))
        Q.link_prepared(shared, base)
        Q.ensure(shared, "train-shared", train_shared)
        row = {"anchor": scoring.score(load_dense(base_cfg.model, base.vocab_size(), shared.shared_dir), dev)["token"]}
        cfg = ws.config(budget=budget, train=probe, experts=Q.EXPERT_VARIANTS["anchor-alone"])
        experts = ws.run(f"experts-0.833-anchor-alone-{tag}", cfg)
        Q.link_prepared(experts, base)
        experts.adopt_stage(shared, "train-shared", ("shared",))
        Q.ensure(experts, "train-experts", train_experts)
        moe = Q.MoEUnderTest(experts)
        for router, calibration, top_k in RECIPES:
            info = moe.configure(router, calibration, top_k)
            row[f"{router} + {calibration}, top-{top_k}"] = {**scoring.score(moe.model, dev, routing=True)["token"],
                                                             **info}
        row |= scoring.score(moe.model, dev, Q.FORCED)
        ppl = {k: v["union_ppl"] for k, v in row.items()}
        best = min(v for k, v in ppl.items() if "top-" in k)
        token_rows = [row[k] for k in row if "top-" in k]
        results[str(weight)] = {
            "rows": row,
            "anchor_ppl": ppl["anchor"], "best_token_ppl": best, "oracle_ppl": ppl["oracle"],
            "sequence_ppl": ppl["sequence"], "ensemble_ppl": ppl["ensemble"],
            "token_share_of_oracle_gain": round((ppl["anchor"] - best) / (ppl["anchor"] - ppl["oracle"]), 4),
            "sequence_vs_oracle": round(ppl["sequence"] / ppl["oracle"] - 1, 4),
            "best_token_top1_min_layer": min(min(r["routing_top1_accuracy"]) for r in token_rows if r["union_ppl"] == best),
            "best_token_topk_hit_min_layer": min(min(r["routing_topk_hit"]) for r in token_rows if r["union_ppl"] == best),
        }
        log.info("w=%s: %s", weight, json.dumps({k: v for k, v in results[str(weight)].items() if k != "rows"}))
    write_json(args.out, {"command": " ".join(["python", *sys.argv]), "config": "modularforge/configs/quality.yaml",
                          "split": "5/6", "expert_set": "anchor-alone", "probe_from": args.probe_from, "results": results,
                          "wall_seconds": round(time.perf_counter() - started, 1)})
    print(f"{'weight':>7} {'anchor':>8} {'token':>8} {'oracle':>8} {'sequence':>9} {'share':>6} {'seq gap':>8} "
          f"{'top1 min':>9} {'top-k hit min':>14}")
    for weight, r in results.items():
        print(f"{weight:>7} {r['anchor_ppl']:8.2f} {r['best_token_ppl']:8.2f} {r['oracle_ppl']:8.2f} "
              f"{r['sequence_ppl']:9.2f} {r['token_share_of_oracle_gain']:6.2f} {r['sequence_vs_oracle']:8.2%} "
              f"{r['best_token_top1_min_layer']:9.2f} {r['best_token_topk_hit_min_layer']:14.2f}")


if __name__ == "__main__":
    main()
