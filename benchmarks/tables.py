"""Markdown tables from the benchmark JSON files, for docs/RESULTS.md.

    python benchmarks/tables.py docs/results/{quality,memory,speed,domain_probe}.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def quality(result: dict) -> str:
    rows = result["rows"]
    corpora = list(rows[0]["per_corpus"])
    head = ["row", "union ppl", "bpb", *corpora, "extra ppl", "top-1 routing acc. per layer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = " ".join(f"{a:.2f}" for a in r.get("routing_top1_accuracy", []))
        cells = [r["row"], f"{r['union_ppl']:.2f}", f"{r['bits_per_byte']:.3f}",
                 *(f"{r['per_corpus'][c]:.1f}" for c in corpora), str(r.get("extra_ppl", "")), acc]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + targets(result)


def memory(result: dict) -> str:
    head = ["config", "stage", "peak RSS MiB", "above baseline", "floor", "ratio", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["config"], r["stage"], f"{r['peak_rss_mb']:.0f}", f"{r['above_baseline_mb']:.0f}",
                 f"{r['floor_mb']:.0f}" if "floor_mb" in r else "", str(r.get("ratio_to_floor", "")),
                 f"{r['wall_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + targets(result)


def speed(result: dict) -> str:
    head = ["system", "precision", "tokens/s", "MFU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        lines.append(f"| {r['system']} | {r['precision']} | {r['tokens_per_s']:.0f} | {r['mfu']:.2f} |")
    lines += ["", "| generation (batch 1, greedy) | weights | tokens/s | tokens equal to float32 |", "|---|---|---|---|"]
    for r in result["generation"]["rows"]:
        lines.append(f"| {r['system']} | {r['dtype']} | {r['tokens_per_s']:.0f} | {r['greedy_tokens_equal_float32']} |")
    ratios = "\n".join(f"- {name}: **{t['value']}** (target {t['target']})" for name, t in result["ratios"].items())
    return "\n".join(lines) + "\n\n" + ratios


def domain_probe(result: dict) -> str:
    head = ["probe weight", "anchor", "best token (LDA + temp.)", "oracle", "sequence", "token share of oracle gain",
            "sequence vs oracle", "top-1 acc. (worst layer)", "top-k hit (worst layer)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for weight, r in result["results"].items():
        cells = [f"{float(weight):g}", f"{r['anchor_ppl']:.2f}", f"{r['best_token_ppl']:.2f}", f"{r['oracle_ppl']:.2f}",
                 f"{r['sequence_ppl']:.2f}", f"{r['token_share_of_oracle_gain']:.2f}", f"{r['sequence_vs_oracle']:.2%}",
                 f"{r['best_token_top1_min_layer']:.2f}", f"{r['best_token_topk_hit_min_layer']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(result: dict) -> str:
    return "\n".join(f"- {name}: **{t['value']}** (target {t['target']})" for name, t in result["targets"].items())


def main() -> None:
    for path in map(Path, sys.argv[1:]):
        result = json.loads(path.read_text())
        render = {"quality": quality, "memory": memory, "speed": speed, "domain_probe": domain_probe}[path.stem]
        print(f"## {path.name}\n\n{render(result)}\n")


if __name__ == "__main__":
    main()
