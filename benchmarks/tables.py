"""Markdown tables from the benchmark JSON files, so that the docs and the JSON cannot disagree.

Every table of measured numbers in docs/RESULTS.md, README.md and docs/*.md sits between two HTML comments:
the first names a renderer and the JSON files it reads (paths from the repository root, in the order the
renderer takes them); the second closes the block. Everything between them is this script's output, with a
blank line on either side so that Markdown ends the table before the closing comment.

    <!-- table: memory docs/results/memory.json -->

    | config | stage | peak RSS MiB | ... |

    <!-- /table -->

    python benchmarks/tables.py --write docs/RESULTS.md README.md   # rewrite every marked block from its JSON
    python benchmarks/tables.py --check docs/RESULTS.md README.md   # exit 1, naming each block that differs
    python benchmarks/tables.py memory docs/results/memory.json     # print one table
    python benchmarks/tables.py --list                              # the renderers

tests/test_results_tables.py runs the check over README.md and docs/*.md, so a number edited by hand fails it.

A new table is one function that takes the parsed JSON files (in the marker's order) and returns Markdown,
registered with `@renderer("name")`; then a marker in the docs and `--write`. Each parsed file carries its
own name under "_file" (rows can be labelled by the file they came from).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from fractions import Fraction
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RENDERERS: dict[str, Callable[..., str]] = {}
BLOCK = re.compile(r"^<!-- table: (?P<name>\S+) (?P<paths>[^>]*?) -->\n(?P<body>.*?)^<!-- /table -->$",
                   re.M | re.S)


def renderer(name: str):
    def register(fn: Callable[..., str]) -> Callable[..., str]:
        RENDERERS[name] = fn
        return fn
    return register


def load(path: str | Path) -> dict:
    data = json.loads((ROOT / path).read_text())
    data["_file"] = Path(path).name
    return data


def render(name: str, paths: list[str]) -> str:
    if name not in RENDERERS:
        raise KeyError(f"no renderer {name!r}; known: {', '.join(sorted(RENDERERS))}")
    return RENDERERS[name](*(load(p) for p in paths))


# ---- blocks in Markdown files ------------------------------------------------------------------------------

def blocks(text: str) -> list[dict]:
    """Every marked block of `text`: its renderer, its JSON paths, its body and the line it starts on."""
    return [{"name": m["name"], "paths": m["paths"].split(), "body": m["body"],
             "line": text.count("\n", 0, m.start()) + 1} for m in BLOCK.finditer(text)]


def body(name: str, paths: list[str]) -> str:
    """What a marked block holds between its two comments."""
    return f"\n{render(name, paths)}\n\n"


def rewrite(text: str) -> str:
    """`text` with every marked block's body rendered afresh from its JSON."""
    def fill(m: re.Match) -> str:
        rendered = body(m["name"], m["paths"].split())
        return f"<!-- table: {m['name']} {m['paths']} -->\n{rendered}<!-- /table -->"
    return BLOCK.sub(fill, text)


def differences(text: str, where: str = "") -> list[str]:
    """One line per marked block whose body is not what its renderer gives from its JSON."""
    return [f"{where}:{b['line']}: table {b['name']} ({' '.join(b['paths'])}) differs from its JSON"
            for b in blocks(text) if b["body"] != body(b["name"], b["paths"])]


# ---- formatting --------------------------------------------------------------------------------------------

def md(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def signed_pct(x: float, digits: int = 2) -> str:
    return f"{x:+.{digits}%}"


def tokens(n: float) -> str:
    return f"{n / 1e6:g}M" if n >= 1e5 else f"{n / 1e3:g}K"


def minutes(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def meets(value, target: str) -> str:
    """'met' / 'missed' for targets of the form '>= 0.75', '< 180', 'true'; '' for information only."""
    m = re.match(r"\s*(>=|<=|<|>)\s*([-0-9.e]+)", str(target))
    if m:
        op, bound = m[1], float(m[2])
        ok = {">=": value >= bound, "<=": value <= bound, "<": value < bound, ">": value > bound}[op]
        return "met" if ok else "**missed**"
    if str(target).strip().lower() == "true":
        return "met" if value is True else "**missed**"
    return ""


def precision(machine: dict) -> str:
    names = {"torch.bfloat16": "bf16", "torch.float32": "fp32", "fp32": "fp32", "bf16": "bf16"}
    p = machine.get("training_precision")
    if not p:
        return "not recorded"
    shared, experts = names.get(p["shared"], p["shared"]), names.get(p["experts"], p["experts"])
    return shared if shared == experts else f"shared {shared}, experts {experts}"


# ---- where a result was measured ---------------------------------------------------------------------------

@renderer("machine")
def machine(*results: dict) -> str:
    """One row per JSON file: the CPU facts benchmarks/machine.py records, the commit and the wall time."""
    def flag(m: dict, key: str) -> str:
        return "not recorded" if "flags" not in m else ("yes" if m["flags"].get(key) else "no")

    rows = []
    for r in results:
        m = r.get("machine", {})
        commit = r.get("git", {}).get("commit", "")[:7] or "not recorded"
        wall = r.get("wall_seconds", r.get("wall_seconds_this_invocation"))
        rows.append([f"`{r['_file']}`", m.get("cpu", "not recorded"), m.get("cores", ""),
                     flag(m, "avx512f"), flag(m, "avx512_bf16"), flag(m, "amx_tile"),
                     m.get("torch", "not recorded"), precision(m), commit, minutes(wall)])
    return md(["result", "CPU", "cores", "AVX-512", "AVX-512 BF16", "AMX", "torch", "training precision",
               "commit", "wall time"], rows)


@renderer("targets")
def targets(result: dict) -> str:
    """A benchmark's own targets ("targets" or "ratios": value and target) and whether each is met."""
    named = result.get("targets") or result.get("ratios")
    rows = [[f"`{name}`", f"**{t['value']}**", t["target"], meets(t["value"], t["target"])]
            for name, t in named.items()]
    return md(["measure", "value", "target", ""], rows)


# ---- the main job ------------------------------------------------------------------------------------------

@renderer("demo")
def demo(result: dict) -> str:
    """The main job per seed: MoE and anchor perplexity, experts kept, their gains, stage times."""
    rows = []
    for r in result["runs"]:
        gain, se, s = r["expert_gain_on_own_partition"], r["expert_standard_errors"], r["stage_seconds"]
        rows.append([r["seed"], f"{r['moe_perplexity']:.2f}", f"{r['anchor_perplexity']:.2f}",
                     f"**{r['moe_perplexity'] / r['anchor_perplexity']:.4f}**",
                     f"{r['experts_kept']} of {r['experts']}",
                     f"{signed_pct(gain['min'], 1)} to {signed_pct(gain['max'], 1)}",
                     f"{se['min']:g} to {se['max']:g}", s.get("train-shared", "-"),
                     s.get("train-experts", "-")])
    return md(["seed", "assembled MoE perplexity", "dense anchor", "MoE / anchor", "experts kept",
               "each expert's gain on its partition", "standard errors", "shared phase s", "expert phase s"],
              rows)


# ---- quality: assembly against dense at equal tokens -------------------------------------------------------

@renderer("quality")
def quality(result: dict) -> str:
    """Every row of the quality benchmark (perplexity on the dev text of each corpus)."""
    rows = result["rows"]
    corpora = list(rows[0]["per_corpus"])
    head = ["row", "union ppl", "bpb", *corpora, "extra ppl", "top-1 routing acc. per layer"]
    body = []
    for r in rows:
        acc = " ".join(f"{a:.2f}" for a in r.get("routing_top1_accuracy", []))
        extra = f"{r['extra_ppl']:.1f}" if "extra_ppl" in r else ""
        body.append([r["row"], f"{r['union_ppl']:.2f}", f"{r['bits_per_byte']:.3f}",
                     *(f"{r['per_corpus'][c]:.1f}" for c in corpora), extra, acc])
    return md(head, body)


def quality_splits_rows(result: dict) -> list[dict]:
    """Per budget split: the anchor, the exported token routing, oracle, sequence, ensemble and dense rows."""
    by = {r["row"]: r["union_ppl"] for r in result["rows"]}
    main = Fraction(result["config"]["budget"]["shared_fraction"]).limit_denominator(20)
    splits = {Fraction(m[1]): f"split {m[1]}: " for name in by
              if (m := re.match(r"split (\d+/\d+): anchor \(shared phase alone\)$", name))}
    splits[main] = ""
    out = []
    for frac in sorted(splits):
        p = splits[frac]
        names = {"anchor": f"{p}anchor (shared phase alone)" if p else "anchor (shared phase alone)",
                 "token": f"{p}anchor-alone, best token recipe" if p else
                 "exported folder (modularforge assemble, best recipe)"}
        for mode in ("oracle", "sequence", "sequence_fixed", "ensemble"):
            names[mode] = f"{p}{mode}" if p else f"anchor-alone: {mode}"
        row = {k: by[v] for k, v in names.items()}
        row.update(split=f"{frac.numerator}/{frac.denominator}", main=not p,
                   dense=by["dense (same total tokens)"],
                   share=(row["anchor"] - row["token"]) / (row["anchor"] - row["oracle"]),
                   sequence_vs_oracle=row["sequence"] / row["oracle"] - 1,
                   best=min(row[k] for k in ("token", "sequence", "sequence_fixed", "ensemble")))
        out.append(row)
    return out


@renderer("quality_splits")
def quality_splits(result: dict) -> str:
    """Per budget split: anchor, exported token routing, oracle, sequence, ensemble, and the ratios."""
    rows = [[s["split"] + (" (the config's)" if s["main"] else ""), f"{s['anchor']:.2f}", f"{s['token']:.2f}",
             f"{s['oracle']:.2f}", f"{s['sequence']:.2f}", f"{s['ensemble']:.2f}", f"**{s['share']:.3f}**",
             signed_pct(s["sequence_vs_oracle"]), f"{s['best'] / s['dense']:.3f}"]
            for s in quality_splits_rows(result)]
    return md(["shared phase's share of T", "anchor", "exported token routing", "oracle", "sequence",
               "ensemble", "token routing's share of the oracle's gain", "sequence vs oracle",
               "best label-free routing / dense"], rows)


@renderer("quality_experts")
def quality_experts(result: dict) -> str:
    """Per split of the quality benchmark: how its experts fared against their anchor."""
    rows = []
    for s in result["splits"]:
        kept = s["kept"]
        rows.append([s["split"], f"{s['expert_steps']} x {s['tokens_per_step']}",
                     f"{s['peak_lr_multiple']:g}x",
                     f"{kept} of {s['experts']}", ", ".join(s["shipped_as_anchor"]) or "none",
                     f"{s['gain']['min'] * 100:+g}% to {s['gain']['max'] * 100:+g}%",
                     f"{s['standard_errors']['min']:g} to {s['standard_errors']['max']:g}",
                     f"**{s['worse_than_anchor']}**"])
    return md(["split", "expert steps x tokens", "peak lr (x the trunk's final)", "trained checkpoint kept",
               "ship as the anchor", "gain of the kept experts on their partition", "standard errors",
               "worse than the anchor"], rows)


# ---- equal wall time on N workers, and the curve by tokens per parameter -----------------------------------

def parallel_sets(*results: dict) -> list[dict]:
    """Every expert set of the parallel JSONs among `results`, flattened: budget, fraction, kind
    ("equal_tokens" or "equal_wall"), the set's entry, its anchor's perplexity, the budget's entry and
    the file."""
    out = []
    for r in results:
        if "curve" not in r:
            continue
        for budget, b in r["results"].items():
            for fraction, f in b["fractions"].items():
                for kind in ("equal_tokens", "equal_wall"):
                    out.append({"budget": int(budget), "fraction": float(fraction), "kind": kind,
                                "set": f[kind], "anchor": f["anchor"], "at_budget": b, "file": r["_file"],
                                "report_tokens": r["config"]["evaluate"]["eval_tokens"]})
    return out


@renderer("parallel_curve")
def parallel_curve(result: dict) -> str:
    """Per budget T: dense, and the best modular row at equal tokens and at equal wall time."""
    n = result["num_experts"]
    rows = []
    for b in result["results"].values():
        et, ew = b["best_equal_tokens"], b["best_equal_wall"]
        nt = f"{b['dense_NT']:.2f}" if b["dense_NT"] else "-"
        vs_nt = f"{ew['ratio_vs_dense_NT']:.2f}" if ew["ratio_vs_dense_NT"] else "-"
        rows.append([tokens(b["tokens"]), f"{b['tokens_per_parameter']:.2f}", f"{b['dense']:.2f}", nt,
                     f"{et['ppl']:.2f} (f {et['fraction']:g}, {et['mode']})",
                     f"**{et['ratio_vs_dense_T']:.3f}**",
                     f"{ew['ppl']:.2f} (f {ew['fraction']:g}, {ew['mode']})",
                     f"**{ew['ratio_vs_dense_T']:.3f}**", vs_nt])
    return md(["T (tokens)", "tokens / parameter", "dense at T", f"dense at {n}T", "best at equal tokens",
               "ratio to dense at T", f"best at equal wall time ({n} workers)", "ratio to dense at T",
               f"ratio to dense at {n}T"], rows)


@renderer("parallel_fractions")
def parallel_fractions(*results: dict) -> str:
    """Best label-free routing / dense at T, for every budget, shared fraction and expert budget."""
    cells: dict[tuple[int, str], dict[float, float]] = {}
    for x in parallel_sets(*results):
        cells.setdefault((x["budget"], x["kind"]), {})[x["fraction"]] = x["set"]["ratio_vs_dense_T"]
    fractions = sorted({f for row in cells.values() for f in row})
    rows = []
    for (budget, kind), row in sorted(cells.items()):
        best = min(row.values())
        rows.append([tokens(budget), kind.replace("_", " ")] +
                    [("" if f not in row else f"**{row[f]:.3f}**" if row[f] == best else f"{row[f]:.3f}")
                     for f in fractions])
    return md(["T", "experts get"] + [f"f {f:g}" for f in fractions], rows)


@renderer("parallel_splits")
def parallel_splits(*results: dict) -> str:
    """At the largest budget, per shared fraction: the anchor and every routing of both expert sets."""
    sets = parallel_sets(*results)
    top = max(x["budget"] for x in sets)
    by: dict[float, dict] = {}
    for x in sets:
        if x["budget"] == top:
            by.setdefault(x["fraction"], {"anchor": x["anchor"]})[x["kind"]] = x["set"]["ppl"]
    rows = []
    for fraction, row in sorted(by.items()):
        rows.append([f"f {fraction:g}", f"{row['anchor']:.2f}"] +
                    [f"{row[kind][m]:.2f}" for kind in ("equal_tokens", "equal_wall")
                     for m in ("token", "sequence", "ensemble", "oracle")])
    head = ["split", "anchor"] + [f"{kind}: {m}" for kind in ("equal tokens", "equal wall")
                                  for m in ("token (exported)", "sequence", "ensemble", "oracle")]
    return md(head, rows)


def rescored(results: tuple[dict, ...]) -> dict[tuple[str, str], dict]:
    """expert_vs_anchor.json's rows, keyed by (expert set folder name, expert)."""
    return {(Path(row["run"]).name, row["expert"]): row
            for r in results if r.get("benchmark") == "expert_vs_anchor" for row in r["rows"]}


def set_folder(x: dict) -> str:
    return f"experts-{x['budget']}-{x['fraction']:.3f}-{x['kind']}"


def expert_verdicts(*results: dict) -> list[dict]:
    """Every expert of the parallel JSONs: shipped as the anchor, flagged worse by the report's sample of its
    validation text, and (when expert_vs_anchor.json rescored it) its gain on the whole validation text."""
    whole = rescored(results)
    out = []
    for x in parallel_sets(*results):
        for e in x["set"]["experts"]:
            flagged = e["beats_anchor"] and e.get("val_gain") is not None and e["val_gain"] < 0
            row = whole.get((set_folder(x), e["expert"]))
            out.append({**x, "expert": e["expert"], "as_anchor": not e["beats_anchor"], "flagged": flagged,
                        "report_gain": e.get("val_gain"), "whole": row,
                        "worse": flagged and (row is None or row["perplexity_gain"] <= 0)})
    return out


@renderer("parallel_experts")
def parallel_experts(*results: dict) -> str:
    """Per parallel JSON: its experts, how many ship as the anchor, and the ones the report's sample flags."""
    per_file: dict[str, list[int]] = {}
    for v in expert_verdicts(*results):
        n = per_file.setdefault(v["file"], [0, 0, 0, 0])
        n[0] += 1
        n[1] += v["as_anchor"]
        n[2] += v["flagged"]
        n[3] += v["worse"]
    total = [sum(col) for col in zip(*per_file.values())]
    rows = [[f"`{name}`", *n] for name, n in per_file.items()] + [["all", *(f"**{x}**" for x in total)]]
    return md(["expert sets", "experts", "ship as the anchor", "kept, but worse on the report's sample",
               "worse on the whole validation text"], rows)


@renderer("expert_vs_anchor")
def expert_vs_anchor(*results: dict) -> str:
    """expert_vs_anchor.json's rows beside the report's verdict on the same expert (the parallel JSONs)."""
    verdicts = {(set_folder(v), v["expert"]): v for v in expert_verdicts(*results)}
    rows, sample = [], None
    for key, row in rescored(results).items():
        v = verdicts[key]
        sample = v["report_tokens"]
        rows.append([f"{tokens(v['budget'])}, f {v['fraction']:g}, {v['kind'].replace('_', ' ')}",
                     v["expert"], signed_pct(v["report_gain"]), f"**{signed_pct(row['perplexity_gain'])}**",
                     f"{row['standard_errors']:g}", row["tokens"], row["documents"]])
    return md(["expert set", "expert", f"report (first {sample} tokens)", "whole validation text",
               "standard errors", "tokens", "documents"], rows)


# ---- growing a model after assembly ------------------------------------------------------------------------

@renderer("grow")
def grow(result: dict) -> str:
    """Every row of the grow benchmark: perplexity per corpus, pooled over the old, new and all corpora."""
    corpora = list(next(iter(result["rows"].values())))
    new = set(result["new_corpora"])
    head = ["row"] + [f"**{c}** (new)" if c in new else c for c in corpora] + ["old", "new", "all 8"]
    rows = []
    for name, per in result["rows"].items():
        pooled = result["pooled_perplexity"][name]
        rows.append([name] + [f"{per[c]['perplexity']:.2f}" if c in per else "" for c in corpora] +
                    [f"{pooled[k]:.2f}" if pooled[k] is not None else "" for k in ("old", "new", "all")])
    return md(head, rows)


@renderer("grow_summary")
def grow_summary(*results: dict) -> str:
    """Per grow JSON: the gain on the new corpora against continued training's, the old corpora's change."""
    rows = []
    for r in results:
        share, old = r["targets"]["new_gain_share_of_continued_training"], r["targets"]["old_corpora_change"]
        cont = r["continued_training_compared"]
        rows.append([f"`{r['_file']}`", f"--replay {r['replay']:g}" if r["replay"] else "no",
                     f"**{share['grown (token, exported)']:.3f}**", f"{share['grown (sequence)']:.3f}",
                     f"**{signed_pct(old['grown (token, exported)'])}**", signed_pct(old["grown (sequence)"]),
                     signed_pct(old[cont], 0), f"{r['pooled_perplexity'][cont]['new']:.2f}"])
    return md(["result", "replay",
               "new corpora: token routing (exported), share of continued training's gain",
               "sequence routing",
               "old corpora: token routing (exported), change", "sequence routing",
               "continued training, change on the old corpora", "continued training on the new corpora"],
              rows)


@renderer("grow_cost")
def grow_cost(result: dict) -> str:
    """What each add-expert cost, step by step, against the whole pipeline that made the model."""
    cost = result["cost"]
    stages = cost["full_pipeline_stages"]
    rows = [["the pipeline (six experts)", f"{stages['prepare']:.1f}", f"{stages['train-shared']:.1f}",
             f"{stages['train-experts']:.1f}", f"{stages['assemble']:.1f}", f"{stages['calibrate']:.1f}",
             f"{stages['evaluate']:.1f}", f"{cost['full_pipeline_seconds']:.1f}", "1.00",
             f"{cost['expert_phase_peak_rss_mb']:.0f}"]]
    for add in cost["add_expert"]:
        s = add["steps"]
        rows.append([f"add-expert {', '.join(add['added'])}", f"{s['add-expert']['wall_seconds']:.1f}", "",
                     f"{s['train-experts']['wall_seconds']:.1f}", f"{s['assemble']['wall_seconds']:.1f}",
                     f"{s['calibrate']['wall_seconds']:.1f}", f"{s['evaluate']['wall_seconds']:.1f}",
                     f"{add['wall_seconds']:.1f}", f"**{add['share_of_full_pipeline']:.3f}**",
                     f"{s['train-experts']['peak_rss_mb']:.0f}"])
    return md(["", "read text s", "shared phase s", "expert training s", "assemble s", "calibrate s",
               "report s", "total s", "share of the pipeline", "expert training peak RSS MB"], rows)


@renderer("grow_fit_distill")
def grow_fit_distill(sweep: dict, grown: dict) -> str:
    """The fit's KL weight: the exported model's old and new corpora against grow.json's before.

    The gain share is against grow.json's compared continued training."""
    before = grown["pooled_perplexity"]["before: token (exported)"]
    cont = grown["pooled_perplexity"][grown["continued_training_compared"]]["new"]
    rows = [[r["add_expert"], f"{r['old']:.2f}", signed_pct(r["old"] / before["old"] - 1), f"{r['new']:.2f}",
             f"{(before['new'] - r['new']) / (before['new'] - cont):.3f}"] for r in sweep["rows"]]
    return md(["add-expert", "old corpora", "change over before", "new corpora",
               "share of continued training's gain"], rows)


# ---- memory, speed, llama.cpp, the domain probe ------------------------------------------------------------

@renderer("memory")
def memory(result: dict) -> str:
    """Peak RSS of every stage against its floor."""
    rows = [[r["config"], r["stage"], f"{r['peak_rss_mb']:.0f}", f"{r['above_baseline_mb']:.0f}",
             f"{r['floor_mb']:.0f}" if "floor_mb" in r else "", r.get("ratio_to_floor", ""),
             f"{r['wall_seconds']:.0f}"] for r in result["rows"]]
    return md(["config", "stage", "peak RSS MiB", "above baseline", "floor", "ratio", "wall s"], rows)


@renderer("speed_training")
def speed_training(result: dict) -> str:
    """Training steps, tokens/s and MFU, per system and precision."""
    rows = [[r["system"], r["precision"], f"{r['tokens_per_s']:.0f}", f"{r['mfu']:.2f}"]
            for r in result["rows"]]
    return md(["system", "precision", "tokens/s", "MFU"], rows)


@renderer("speed_generation")
def speed_generation(result: dict) -> str:
    """Batch-1 greedy generation, tokens/s, and whether the tokens equal ModularForge's float32 ones."""
    rows = [[r["system"], r["dtype"], f"{r['tokens_per_s']:.0f}",
             "yes" if r["greedy_tokens_equal_float32"] else "no"] for r in result["generation"]["rows"]]
    return md(["generation (batch 1, greedy)", "weights", "tokens/s", "tokens equal to float32"], rows)


@renderer("speed_machines")
def speed_machines(base: dict, other: dict) -> str:
    """speed.json's ratios beside another machine's runs of the same script."""
    rows = []
    for name, values in other["ratios"].items():
        t = base["ratios"][name]
        rows.append([f"`{name}`", t["target"], f"{t['value']}", " / ".join(f"{v}" for v in values)])
    return md(["ratio", "target", f"`{base['_file']}`", f"`{other['_file']}`, {other['rounds']} runs"], rows)


def exponent(x: float) -> str:
    return f"{x:.1e}"


@renderer("gguf")
def gguf(result: dict) -> str:
    """llama.cpp against ModularForge on the same GGUF export, per dtype and KV cache."""
    rows = []
    for r in result["results"]:
        agree = f"{r['argmax_agreement'] * 100:.1f}".removesuffix(".0") + "%"
        greedy = "identical" if r["greedy_identical"] else f"first {r['greedy_common_prefix']} equal"
        rows.append([r["gguf"], r["kv_cache"] + (" (llama.cpp default)" if r["kv_cache"] == "f16" else ""),
                     exponent(r["max_abs_diff"]), exponent(r["mean_abs_diff"]), agree, greedy,
                     "identical" if r["tokenization_identical"] else "differs", f"{r['file_mb']:.2f}"])
    return md(["GGUF", "llama.cpp KV cache", "max abs logit diff", "mean abs diff", "argmax agreement",
               f"greedy {result['new_tokens']} tokens", "tokenization", "file MB"], rows)


@renderer("gguf_converter")
def gguf_converter(result: dict) -> str:
    """Our GGUF export against llama.cpp's own converter, tensor by tensor, per dtype."""
    rows = []
    for dtype, r in result["dtypes"].items():
        only = len(r["tensors_only_ours"]) + len(r["tensors_only_theirs"])
        rows.append([dtype, r["tensors"], f"**{r['tensors_identical']}**", len(r["tensors_differing"]), only,
                     ", ".join(f"`{k}`" for k in r["metadata_differing"])])
    return md(["GGUF dtype", "tensors", "byte-identical", "differing", "in one file only",
               "metadata keys that differ"], rows)


@renderer("domain_probe")
def domain_probe(*results: dict) -> str:
    """Per probe weight (and probed positions): anchor, token, oracle and sequence rows, routing accuracy."""
    rows = []
    for result in results:
        positions = f"from {result['probe_from']}" if result.get("probe_from") else "all"
        for weight, r in result["results"].items():
            rows.append([f"{float(weight):g}", positions, f"{r['anchor_ppl']:.2f}",
                         f"{r['best_token_ppl']:.2f}", f"{r['oracle_ppl']:.2f}", f"{r['sequence_ppl']:.2f}",
                         f"{r['token_share_of_oracle_gain']:.2f}", f"{r['sequence_vs_oracle']:.2%}",
                         f"{r['best_token_top1_min_layer']:.2f}",
                         f"{r['best_token_topk_hit_min_layer']:.2f}"])
    return md(["probe weight", "probed positions", "anchor", "best token (LDA + temp.)", "oracle", "sequence",
               "token share of oracle gain", "sequence vs oracle", "top-1 acc. (worst layer)",
               "top-k hit (worst layer)"], rows)


# ---- starting from a pretrained model -----------------------------------------------------------------------

def upcycle_pooled(result: dict, row: str) -> float:
    return result["pooled_dev_perplexity"][row]


@renderer("upcycle")
def upcycle(result: dict) -> str:
    """Perplexity of every row on each corpus's dev text and on the unseen text, with the pooled dev perplexity and
    its ratio to the base's."""
    rows, texts = result["rows"], list(result["rows"]["base"])
    base = upcycle_pooled(result, "base")
    out = []
    for name, per in rows.items():
        pooled = upcycle_pooled(result, name)
        out.append([name, *(f"{per[t]['perplexity']:.2f}" if t in per else "" for t in texts),
                    f"{pooled:.2f}" if pooled else "", f"**{pooled / base:.3f}**" if pooled else ""])
    short = {"us_state_of_the_union": "sotu", "gutenberg_fiction": "fiction", "gutenberg_nonfiction": "nonfiction",
             "unseen (GPL-3)": "unseen: GPL-3"}
    return md(["row", *(short.get(t, t) for t in texts), "dev pooled", "/ base"], out)


@renderer("upcycle_targets")
def upcycle_targets(result: dict) -> str:
    """The upcycle benchmark's targets, each with its measured value."""
    t, speed, gen = result["targets"], result.get("speed") or {}, result.get("generation") or {}
    corpora = [c for c in result["rows"]["base"] if c in result["rows"]["MoE: oracle (corpus to its expert)"]]
    better = t["experts_better_than_base_on_their_corpus"]["better"]
    rows = [["exported MoE / base, pooled dev text", f"**{t['moe_over_base_on_dev_text']['exported']:.3f}**",
             "<= 0.85", meets(t["moe_over_base_on_dev_text"]["exported"], "<= 0.85")],
            ["experts better than the base on their own corpus", f"**{len(better)} of {len(corpora)}**", "all",
             "met" if len(better) == len(corpora) else "**missed**"]]
    for key, value in t.items():
        if key.startswith("exported_over_"):
            rows.append([f"exported MoE / {key.removeprefix('exported_over_')}, pooled dev text",
                         f"**{value['dev']:.3f}**", "< 1", meets(value["dev"], "< 1")])
    unseen = t.get("unseen_text", {})
    for key, value in unseen.items():
        if key.startswith("exported_over_"):
            rows.append([f"unseen text: exported MoE / {key.removeprefix('exported_over_')}", f"**{value:.3f}**",
                         "<= 1", meets(value, "<= 1")])
    if speed:
        rows.append(["expert phase tokens/s / transformers (same base, FFNs trained)",
                     f"**{speed['ratio']:.2f}** (compiled: {speed['ratio_compiled']:.2f})", ">= 1.5",
                     meets(max(speed["ratio"], speed["ratio_compiled"]), ">= 1.5")])
        rows.append(["expert phase MFU (bf16 matmul peak measured here)",
                     f"**{speed['modularforge']['mfu']:.2f}**", ">= 0.40", meets(speed["modularforge"]["mfu"], ">= 0.40")])
    if gen:
        rows.append(["batch-1 generation / transformers' generate, same greedy tokens",
                     f"**{gen['ratio']:.2f}**, {'same' if gen['same_greedy_tokens'] else 'different'} tokens",
                     ">= 1.5", meets(gen["ratio"], ">= 1.5") if gen["same_greedy_tokens"] else "**missed**"])
    return md(["measure", "value", "target", ""], rows)


@renderer("upcycle_cost")
def upcycle_cost(result: dict) -> str:
    """Wall time and peak RSS of every stage of the upcycled run, the experts' training, and the baselines'."""
    rows = [[stage, f"{s['wall_seconds']:.0f}", f"{s['peak_rss_mb']:.0f}"] for stage, s in result["stages"].items()]
    experts = result["experts"].values()
    rows.append(["(one expert, mean: training and its validations)",
                 f"{sum(e['seconds'] for e in experts) / len(experts):.0f}", ""])
    ct = result["continued_training"]
    rows.append([f"continued training, equal tokens ({ct['equal_tokens_steps']} steps)",
                 f"{ct['equal_tokens_steps'] * ct['seconds_per_step']:.0f}", ""])
    return md(["stage", "wall s", "peak RSS MiB"], rows)


@renderer("upcycle_speed")
def upcycle_speed(result: dict) -> str:
    """The expert phase's step against transformers', and batch-1 generation."""
    s, g = result["speed"], result["generation"]
    rows = [[name, f"{s[name]['tokens_per_s']:.0f}", f"{s[name]['mfu']:.2f}"]
            for name in s if isinstance(s[name], dict) and "tokens_per_s" in s[name]]
    rows += [[f"generation, batch 1: {name}", f"{rate:.1f}", ""] for name, rate in g["tokens_per_s"].items()]
    return md([f"system ({s['batch']} x {s['seq']} tokens, {s['optimizer']}, {s['precision'].split('.')[-1]})",
               "tokens/s", "MFU"], rows)


@renderer("upcycle_experts")
def upcycle_experts(result: dict) -> str:
    """Each expert: its corpus, the base's and its own dev perplexity, and its keep-best choice."""
    rows = []
    for name, e in result["experts"].items():
        base = result["rows"]["base"][e["corpus"]]["perplexity"]
        own = result["rows"]["MoE: oracle (corpus to its expert)"][e["corpus"]]["perplexity"]
        sel = e["selection"]
        rows.append([name, e["corpus"], f"{base:.2f}", f"{own:.2f}", f"**{own / base - 1:+.1%}**",
                     f"step {sel['best_step']} of {e['steps']}" if sel["beats_anchor"] else "ships as the base"])
    return md(["expert", "corpus", "base", "expert", "change", "kept"], rows)


@renderer("upcycle_lr")
def upcycle_lr(result: dict) -> str:
    """The sweep of an expert's peak learning rate over a base, per optimizer: dev perplexity against the base's."""
    rows = []
    for optimizer, rates in result["optimizers"].items():
        for lr, per in sorted(rates.items(), key=lambda kv: float(kv[0])):
            cells = [f"{per[c]['perplexity']:.2f} ({per[c]['ratio_to_base']:.3f})"
                     + ("" if per[c]["beats_base_on_selection_text"] else ", ships as the base")
                     for c in result["corpora"]]
            rows.append([optimizer + (" (step in backward)" if optimizer == "adafactor" else ""), f"{float(lr):g}",
                         *cells])
    base = next(iter(next(iter(result["optimizers"].values())).values()))
    return md(["optimizer", "peak lr", *(f"{c} (base {base[c]['base_perplexity']:.2f})" for c in result["corpora"])],
              rows)


# ---- the README's claims -----------------------------------------------------------------------------------

def dense_parameters(config: dict) -> int:
    """Parameters of a config's dense model (trunk + one FFN per layer), embeddings and LM head included."""
    model, v = config["model"], config["tokenizer"]["vocab_size"]
    h, i, layers = model["hidden_size"], model["intermediate_size"], model["num_layers"]
    kv = (model.get("num_kv_heads") or model["num_heads"]) * h // model["num_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return v * h * (1 if model.get("tie_embeddings") else 2) + layers * per_layer + h


@renderer("claims")
def claims(*results: dict) -> str:
    """The README's table: one row per claim, each number read from the JSON of the section it links to."""
    by = {r["_file"]: r for r in results}
    link = "docs/RESULTS.md#"

    def verdict(value, target: str) -> str:
        return f"{target}: {meets(value, target).strip('*')}"

    q, qe, demo_runs = by["quality.json"], by["quality_experts.json"], by["demo.json"]["runs"]
    splits = quality_splits_rows(q)
    main = next(s for s in splits if s["main"])
    verdicts = expert_verdicts(*results)
    n = len(verdicts) + sum(s["experts"] for s in qe["splits"])
    as_anchor = sum(v["as_anchor"] for v in verdicts) + sum(len(s["shipped_as_anchor"]) for s in qe["splits"])
    worse = sum(v["worse"] for v in verdicts) + sum(s["worse_than_anchor"] for s in qe["splits"])

    sets = parallel_sets(*results)
    top = [x for x in sets if x["budget"] == max(y["budget"] for y in sets)]
    best = {kind: min((x["set"] for x in top if x["kind"] == kind), key=lambda s: s["ratio_vs_dense_T"])
            for kind in ("equal_tokens", "equal_wall")}
    tpp = top[0]["at_budget"]["tokens_per_parameter"]
    q_dense = q["targets"]["best_modular_vs_dense"]
    q_tpp = q["config"]["budget"]["total_tokens"] / dense_parameters(q["config"])
    workers = by["parallel.json"]["num_experts"]

    g = by["grow.json"]
    g_share, g_old = g["targets"]["new_gain_share_of_continued_training"], g["targets"]["old_corpora_change"]
    g_token_share, g_token_old = g_share["grown (token, exported)"], g_old["grown (token, exported)"]
    g_cost = [a["share_of_full_pipeline"] * 100 for a in g["cost"]["add_expert"]]
    old_bound = float(re.search(r"[0-9.]+", g_old["target"])[0]) / 100
    mem = by["memory.json"]["targets"]
    speed, amx = by["speed.json"]["ratios"], by["speed_amx.json"]["ratios"]
    gen32, gen16 = speed["generation_vs_transformers_float32"], speed["generation_vs_transformers_float16"]
    gen_amx = amx["generation_vs_transformers_float32"]
    f32 = next(r for r in by["gguf.json"]["results"] if r["gguf"] == "f32" and r["kv_cache"] == "f32")
    up, base_mem = by["upcycle.json"], by["memory_base.json"]
    up_t = up["targets"]
    up_vs = {key.removeprefix("exported_over_"): value["dev"] for key, value in up_t.items()
             if key.startswith("exported_over_")}
    up_corpora = [c for c in up["rows"]["base"] if c in up["rows"]["MoE: oracle (corpus to its expert)"]]
    up_better = len(up_t["experts_better_than_base_on_their_corpus"]["better"])
    converted = by["gguf_converter.json"]["dtypes"]["f32"]

    rows = [
        ["An expert never ships worse than the anchor it branched from",
         f"{n} experts: {n - as_anchor - worse} kept and better than their anchor on their own partition, "
         f"{as_anchor} ship as the anchor, **{worse} worse**",
         f"none worse: {'met' if worse == 0 else 'missed'}",
         f"[experts]({link}experts-against-their-anchor)"],
        ["The main job's MoE beats its dense anchor",
         f"perplexity **{demo_runs[0]['moe_perplexity']:.2f} vs {demo_runs[0]['anchor_perplexity']:.2f}** "
         f"({demo_runs[0]['moe_perplexity'] / demo_runs[0]['anchor_perplexity']:.3f}x; seed 1: "
         f"{demo_runs[1]['moe_perplexity'] / demo_runs[1]['anchor_perplexity']:.3f}x), "
         "every expert better on its partition", "", f"[main job]({link}the-main-job)"],
        ["The exported model (token routing) keeps the experts' gain",
         f"**{main['share']:.2f}** of the oracle's gain over the anchor at the config's split "
         f"({min(x['share'] for x in splits):.2f}-{max(x['share'] for x in splits):.2f} over "
         f"{len(splits)} splits); sequence routing {main['sequence_vs_oracle']:.2%} from the oracle",
         verdict(main["share"], q["targets"]["token_share_of_oracle_gain"]["target"]),
         f"[quality]({link}quality-at-equal-tokens)"],
        ["Modular against dense at equal tokens",
         f"**{q_dense['value']:.3f}x** dense perplexity at {q_tpp:.2f} tokens per parameter, "
         f"**{best['equal_tokens']['ratio_vs_dense_T']:.3f}x** at {tpp:.1f}",
         verdict(min(q_dense["value"], best["equal_tokens"]["ratio_vs_dense_T"]), q_dense["target"]),
         f"[quality]({link}quality-at-equal-tokens)"],
        [f"Modular against dense at equal wall time ({workers} workers)",
         f"**{best['equal_wall']['ratio_vs_dense_T']:.3f}x** dense perplexity at {tpp:.1f} tokens per "
         f"parameter (sequence or ensemble routing; the exported token routing "
         f"{best['equal_wall']['token_ratio_vs_dense_T']:.3f}x)",
         verdict(best["equal_wall"]["ratio_vs_dense_T"], "<= 0.90"),
         f"[equal wall time]({link}equal-wall-time-and-tokens-per-parameter)"],
        ["Start from a pretrained model: experts branched from SmolLM2-135M, one per corpus",
         f"exported MoE **{up_t['moe_over_base_on_dev_text']['exported']:.3f}x** the base's perplexity on the "
         f"corpora's dev text, {up_better} of {len(up_corpora)} experts better than the base on their corpus; "
         + "; ".join(f"{v:.3f}x {k}" for k, v in up_vs.items()),
         verdict(up_t["moe_over_base_on_dev_text"]["exported"], "<= 0.85"),
         f"[upcycling]({link}starting-from-a-pretrained-model)"],
        ["Growing: experts added after assembly, nothing retrained",
         f"two new corpora: the exported model gains **{g_token_share:.2f}** of what continued training "
         f"gains there, the old corpora move **{signed_pct(g_token_old)}** (continued training: "
         f"{signed_pct(g_old[g['continued_training_compared']], 0)}); each add-expert "
         f"{min(g_cost):.0f}-{max(g_cost):.0f}% of the pipeline's time",
         f"{verdict(g_token_share, g_share['target'])}; old corpora {g_old['target'].replace('grown ', '')}: "
         f"{'met' if g_token_old <= old_bound else 'missed'}", f"[growing]({link}growing-a-model)"],
        ["Memory: every stage near its floor",
         f"peak RSS at most **{mem['poc_50m_max_ratio_to_floor']['value']:.2f}x** the floor (50M model); a "
         f"1.24B-parameter MoE trains with every stage under {mem['1b_max_stage_peak_mb']['value']:.0f} MiB "
         f"and generates in {mem['1b_generate_cache_4_peak_mb']['value']:.0f} MiB; every stage from a "
         f"Llama-3.2-1B-shaped base (805M-parameter experts) at most "
         f"{base_mem['targets']['base_1b_max_stage_peak_mb']['value']:.0f} MiB",
         verdict(mem["poc_50m_max_ratio_to_floor"]["value"], mem["poc_50m_max_ratio_to_floor"]["target"])
         + f"; 1B base {verdict(base_mem['targets']['base_1b_max_stage_peak_mb']['value'], '< 8192 MiB')}",
         f"[memory]({link}memory)"],
        ["Speed against Hugging Face transformers",
         f"expert phase **{speed['experts_vs_transformers_mixtral']['value']:.2f}x** transformers' Mixtral "
         f"step; batch-1 generation **{gen32['value']:.2f}x** at fp32, {gen16['value']:.2f}x at fp16 "
         f"(on a CPU with AMX: {min(gen_amx):.2f}-{max(gen_amx):.2f}x at fp32)",
         f"training {verdict(speed['experts_vs_transformers_mixtral']['value'], '>= 2.0')}; generation "
         f"{gen32['target']}: {meets(gen32['value'], gen32['target']).strip('*')} at fp32, "
         f"{meets(gen16['value'], gen16['target']).strip('*')} at fp16, "
         f"{meets(max(gen_amx), gen32['target']).strip('*')} with AMX", f"[speed]({link}speed)"],
        ["Loads in transformers and llama.cpp",
         "transformers: no custom code, logits within 1e-4 of ours (a CI test); llama.cpp (f32 GGUF): logits "
         f"within {exponent(f32['max_abs_diff'])}, greedy tokens identical; GGUF tensors byte-identical to "
         f"llama.cpp's own converter ({converted['tensors_identical']} of {converted['tensors']})", "",
         f"[loading]({link}loading-in-transformers-and-llamacpp)"],
        ["Every stage under 8 GiB of GPU memory for a 4.89B-parameter MoE",
         "not measured yet: no GPU has run it", "", f"[GPU]({link}on-a-gpu)"],
    ]
    return md(["claim", "measured", "target", "details"], rows)


# ---- command line ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the marked blocks of the given files")
    parser.add_argument("--check", action="store_true", help="exit 1 if a marked block differs from its JSON")
    parser.add_argument("--list", action="store_true", help="list the renderers")
    parser.add_argument("args", nargs="*", help="Markdown files (--write, --check), or NAME JSON [JSON ...]")
    a = parser.parse_args(argv)
    if a.list:
        print("\n".join(f"{name}: {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}"
                        for name, fn in sorted(RENDERERS.items())))
        return 0
    if a.write or a.check:
        problems = []
        for path in map(Path, a.args):
            text = path.read_text()
            if a.write:
                new = rewrite(text)
                if new != text:
                    path.write_text(new)
                    print(f"rewrote {path}")
            else:
                problems += differences(text, str(path))
        if problems:
            print("\n".join(problems), file=sys.stderr)
        elif a.check:
            print("every table matches its JSON")
        return 1 if problems else 0
    if not a.args:
        parser.error("give --write/--check FILES, or NAME JSON [JSON ...]")
    print(render(a.args[0], a.args[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
