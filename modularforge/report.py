"""The evaluation report: `reports/report.json`, `reports/report.md` and PNG plots
(training loss curves of the shared phase and of every expert; the partition -> expert routing heatmap
and the per-layer expert load)."""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from modularforge.files import atomic_path, read_metrics, write_json, write_text  # noqa: E402
from modularforge.runs import Run  # noqa: E402

log = logging.getLogger(__name__)


def write_report(run: Run, report: dict) -> None:
    out = run.reports_dir
    out.mkdir(parents=True, exist_ok=True)
    plot_losses(run, out / "loss_curves.png")
    plot_routing(report["routing"], out / "routing.png", report.get("partition_labels"),
                 [e["expert"] for e in report.get("experts", [])])
    write_json(out / "report.json", report)
    markdown = render_markdown(report)
    write_text(out / "report.md", markdown)
    log.info("report written to %s\n%s", out / "report.md", _summary_lines(report))


def _summary_lines(report: dict) -> str:
    rows = [f"{'mode':<9} {'ppl':>9} {'bpb':>7}"]
    for mode, r in report["routing_modes"].items():
        rows.append(f"{mode:<9} {r['overall']['perplexity']:>9.2f} {r['overall']['bits_per_byte']:>7.3f}")
    return "\n".join(rows)


def render_markdown(report: dict) -> str:
    w = report["windowing"]
    lines = [
        "# ModularForge evaluation report",
        "",
        f"Run: `{report['run']}`. Validation documents of every partition, non-overlapping windows of "
        f"{w['window']} tokens (stride {w['stride']}), at most {w['eval_tokens_per_partition']} tokens per partition.",
        "",
        "## Headline (every position but each window's first)",
        "",
        "| model | loss | perplexity | bits/byte | tokens |",
        "|---|---|---|---|---|",
    ]
    anchor = report.get("anchor", "the shared phase's dense model")
    for name, label in (("token", "assembled MoE (token routing, exported)"), ("anchor", f"dense anchor ({anchor})")):
        r = report["headline"][name]
        lines.append(f"| {label} | {r['loss']:.4f} | {r['perplexity']:.2f} | {r['bits_per_byte']:.4f} | {r['tokens']} |")
    lines += _expert_lines(report.get("experts", []), anchor)
    modes = report["routing_modes"]
    labels = report["partition_labels"]
    lines += [
        "",
        "## Routing modes (positions after the prefix only)",
        "",
        "Perplexity per partition and overall; bits-per-byte overall. Partitions p0, p1, ... are those `prepare` "
        "made; a partition named after an expert is the text that expert was added with. Oracle routing needs the "
        "partition's own expert, so it has no number where that expert was removed.",
        "",
        "| mode | " + " | ".join(labels) + " | overall | bits/byte |",
        "|---|" + "---|" * (len(labels) + 2),
    ]
    partial = False
    for mode, r in modes.items():
        cells = " | ".join("-" if x is None else f"{x['perplexity']:.2f}" for x in r["per_partition"])
        mark = "*" if r.get("partitions_scored", len(labels)) < len(labels) else ""
        partial |= bool(mark)
        lines.append(f"| {mode} | {cells} | {r['overall']['perplexity']:.2f}{mark} | "
                     f"{r['overall']['bits_per_byte']:.4f}{mark} |")
    if partial:
        lines += ["", "\\* over the partitions it scores only, so not comparable with the other rows."]
    routing = report["routing"]
    names = [e["expert"] for e in report.get("experts", [])]
    lines += ["", "## Routing analysis", "", "![routing](routing.png)", ""]
    if names:
        lines += ["Experts, in the model's order: " + ", ".join(f"{j} = {n}" for j, n in enumerate(names)), ""]
    if routing["accuracy_per_layer"] is not None:
        lines.append(
            "Share of each partition's tokens whose top-1 expert is that partition's expert, per layer: "
            + ", ".join(f"{a:.3f}" for a in routing["accuracy_per_layer"])
        )
    lines += ["", "Expert load per layer (share of all top-k slots):", ""]
    lines += [f"- layer {i}: " + ", ".join(f"{x:.3f}" for x in load) for i, load in enumerate(routing["load"])]
    lines += ["", "## Partitions", "", "| partition | train tokens | val tokens | top terms | sources |", "|---|---|---|---|---|"]
    for p in report["partitions"]:
        sources = ", ".join(p["sources"])
        lines.append(f"| {p['partition']} | {p['train_tokens']} | {p['val_tokens']} | {' '.join(p['top_terms'][:10])} | {sources} |")
    lines += ["", "## Training", "", "![loss curves](loss_curves.png)", "", "## Samples", ""]
    for s in report["samples"]:
        text = s["text"].replace("\n", " ")
        lines.append(f"- **{s['prompt']}** ({s['routing']} routing): {s['prompt']}{text}")
    lines += ["", "## Stages", "", "| stage | wall time (s) | peak RSS (MB) |", "|---|---|---|"]
    for name, st in report["stages"].items():
        lines.append(f"| {name} | {st.get('wall_seconds', '')} | {st.get('peak_rss_mb', '')} |")
    return "\n".join(lines) + "\n"


def _expert_lines(experts: list[dict], anchor: str) -> list[str]:
    if not experts:
        return []
    lines = [
        "",
        "## What each expert adds over the anchor",
        "",
        "Its own partition's validation text (every position but each window's first), under the dense anchor "
        f"({anchor}, where the expert started) and under the expert in place of the anchor FFN. "
        "Training kept the checkpoint with the lowest loss on the partition's held-out calibration text, step 0 "
        "(the anchor itself) included; a trained step replaced the anchor only when it beat it by "
        "`experts.select_margin` standard errors (windows clustered by document).",
        "",
        "| expert | anchor ppl | expert ppl | gain | kept step | calibration loss: anchor -> kept (standard errors) |",
        "|---|---|---|---|---|---|",
    ]
    for e in experts:
        sel = e.get("selection") or {}
        kept = sel.get("best_step", "")
        calib = f"{sel['anchor_loss']:.4f} -> {sel['best_loss']:.4f}" if sel else ""
        if sel.get("standard_error"):
            calib += f" ({sel['gain'] / sel['standard_error']:.1f})"
        if e["gain"] is None:
            lines.append(f"| {e['expert']} | - | - | no partition here ({e['kind']}) | {kept} | {calib} |")
            continue
        lines.append(f"| {e['expert']} | {e['anchor_perplexity']:.2f} | {e['expert_perplexity']:.2f} | "
                     f"{100 * e['gain']:+.2f}% | {kept} | {calib} |")
    worse = [str(e["expert"]) for e in experts if e["gain"] is not None and e["gain"] <= 0]
    unchanged = [str(e["expert"]) for e in experts if (e.get("selection") or {}).get("best_step") == 0]
    if worse:
        lines += ["", f"**Not better than the anchor on its own partition: {', '.join(worse)}.**"]
    if unchanged:
        lines += ["", f"{', '.join(unchanged)} never beat the anchor on held-out text in training by the "
                  "margin and ship(s) as the anchor FFN."]
    if not worse:
        lines += ["", "Every expert beats the anchor on its own partition."]
    return lines


def plot_losses(run: Run, path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    shared = [m for m in read_metrics(run.shared_dir / "metrics.jsonl") if m.get("loss") is not None]
    offset = 0
    if shared:
        ax.plot([m["step"] for m in shared], [m["loss"] for m in shared], label="shared phase", color="black")
        offset = shared[-1]["step"]
    for spec in run.experts():
        metrics = [m for m in read_metrics(run.expert_dir(spec.name) / "metrics.jsonl") if m.get("loss") is not None]
        if metrics:
            ax.plot([offset + m["step"] for m in metrics], [m["loss"] for m in metrics], label=spec.name)
    ax.set_xlabel("step (experts start where the shared phase ends)")
    ax.set_ylabel("training loss (nats/token)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_routing(routing: dict, path, partitions: list[str] | None = None, experts: list[str] | None = None) -> None:
    matrix = np.asarray(routing["partition_to_expert_mean"])
    load = np.asarray(routing["load"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    image = left.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    left.set_xlabel("expert (top-1)")
    left.set_ylabel("partition")
    left.set_title("share of partition's tokens, mean over layers")
    fig.colorbar(image, ax=left)
    image = right.imshow(load, vmin=0, cmap="magma", aspect="auto")
    right.set_xlabel("expert")
    right.set_ylabel("layer")
    right.set_title("expert load (share of top-k slots)")
    fig.colorbar(image, ax=right)
    for ax, (rows, cols) in ((left, matrix.shape), (right, load.shape)):
        ax.set_xticks(range(cols), experts if experts and len(experts) == cols else range(cols),
                      rotation=45 if experts else 0, fontsize=7)
        ax.set_yticks(range(rows))
    if partitions:
        left.set_yticks(range(matrix.shape[0]), partitions, fontsize=7)
    _save(fig, path)


def _save(fig, path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
