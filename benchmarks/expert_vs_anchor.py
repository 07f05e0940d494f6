"""Is an expert better than the anchor it started from on its partition's *whole* validation text?

The report's per-expert table scores the first `evaluate.eval_tokens` tokens of each partition's validation
text, which in a small benchmark (benchmarks/parallel.yaml: 2048) is one or two documents. This scores every
non-overlapping window of the partition's validation documents under the anchor and under the expert (the
same dense model with the expert's FFN stack in place of the anchor's), and gives the perplexity gain with
its standard error, windows clustered by document.

    python benchmarks/expert_vs_anchor.py RUN_DIR:EXPERT [RUN_DIR:EXPERT ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import git_facts, machine_facts  # noqa: E402

from modularforge.config import load_config  # noqa: E402
from modularforge.data.batches import PreparedData, document_batches  # noqa: E402
from modularforge.data.shards import VAL  # noqa: E402
from modularforge.device import autocast_dtype  # noqa: E402
from modularforge.files import load_tensors, write_json  # noqa: E402
from modularforge.model.weights import load_dense  # noqa: E402
from modularforge.runs import Run  # noqa: E402
from modularforge.train.loop import ModelLoss, PairedGain, window_losses  # noqa: E402


def check(run_dir: Path, name: str, micro: int = 16) -> dict:
    run = Run(load_config(run_dir / "config.yaml"), run_dir)
    cfg, spec = run.cfg, run.expert(name)
    if spec.data is None:
        raise SystemExit(f"error: {name} was imported and has no partition in {run_dir}")
    windows = PreparedData(run.dir / spec.data).windows(VAL, spec.partition)
    batches, documents = document_batches(windows, windows.total, cfg.model.max_seq_len, micro)
    dtype = autocast_dtype(cfg.evaluate.precision, torch.device("cpu"))
    scores = {}
    for role, ffn in (("anchor", None), ("expert", load_tensors(run.expert_files(name)["expert"]))):
        model = load_dense(cfg.model, run.vocab_size(), run.shared_dir, ffn=ffn).eval()
        scores[role] = window_losses(ModelLoss(model, compile=False).per_window, batches, dtype)
    anchor, expert = scores["anchor"], scores["expert"]
    gain = PairedGain.of(anchor, expert, documents)
    return {"run": str(run_dir), "expert": name, "windows": gain.windows, "documents": gain.documents,
            "tokens": int(sum(b.shape[0] * (b.shape[1] - 1) for b in batches)),
            "anchor_perplexity": round(math.exp(anchor.mean()), 4), "expert_perplexity": round(math.exp(expert.mean()), 4),
            "perplexity_gain": round(1 - math.exp(-gain.gain), 6),
            "standard_errors": round(gain.gain / gain.standard_error, 2) if 0 < gain.standard_error < math.inf else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experts", nargs="+", metavar="RUN_DIR:EXPERT")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for item in args.experts:
        run_dir, sep, name = item.rpartition(":")
        if not sep or not Path(run_dir).is_dir():
            raise SystemExit(f"error: {item!r} is not RUN_DIR:EXPERT with RUN_DIR a run directory")
        rows.append(check(Path(run_dir), name))
        r = rows[-1]
        print(f"{Path(run_dir).name}:{name}: {r['tokens']} validation tokens in {r['documents']} documents, anchor "
              f"{r['anchor_perplexity']:.2f} -> expert {r['expert_perplexity']:.2f}, gain {100 * r['perplexity_gain']:+.2f}% "
              f"({r['standard_errors']} standard errors)")
    if args.out:
        write_json(args.out, {"benchmark": "expert_vs_anchor", "command": " ".join(["python", *sys.argv]),
                              "rows": rows, "machine": machine_facts(), "git": git_facts()})


if __name__ == "__main__":
    main()
