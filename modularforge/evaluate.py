"""Stage 5, evaluate: how good the assembled model is, and how it routes.

On every partition's validation documents, in non-overlapping windows of `max_seq_len` tokens:

- `anchor`: the dense shared-phase model alone;
- `token`: the exported MoE, per-layer top-k routing (what transformers and llama.cpp run);
- `oracle`: each partition's text sent to its own expert in every layer;
- `sequence`: one expert in all layers, first the one under which the window's first `prefix_len`
  tokens are most likely, then re-chosen every `sequence_revise_every` tokens as the one under which
  all the text so far is most likely (each position is predicted by the dense model of one expert
  over the whole window, as generation with sequence routing does);
- `sequence_fixed`: the prefix's choice kept for the whole window;
- `ensemble`: the experts' next-token distributions mixed by their posterior given the prefix
  (as BTM/DEMix do).

So that the modes are compared on equal terms, the routing table scores only tokens after the
prefix; the headline perplexities of `token` and `anchor` score every position but each window's first.
Loss is in nats per token, perplexity its exponential, bits-per-byte its total in bits over the
UTF-8 bytes of the scored tokens. Routing analysis: per-layer expert load and the partition -> expert
matrix of the top-1 choice. Also generation samples, and wall time and peak RSS of every stage.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from modularforge.data.batches import PreparedData, Windows
from modularforge.data.partition import load_report
from modularforge.data.shards import VAL
from modularforge.data.sources import iter_text_pieces
from modularforge.data.tokenizer import eos_id, load_tokenizer, token_byte_lengths
from modularforge.device import as_float64, autocast, autocast_dtype, module_device, resolve_device, to_device
from modularforge.errors import DataError
from modularforge.files import load_tensors, read_json, read_metrics, sha256_file
from modularforge.inference import AssembledFolder, open_model
from modularforge.model.transformer import CausalLM
from modularforge.model.weights import build_model, dense_shapes, is_ffn
from modularforge.report import write_report
from modularforge.runs import Run
from modularforge.safetensors_stream import checked_header
from modularforge.sampling import Sampling, generate_text, sequence_choices
from modularforge.schemas import ExpertDone

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

MODES = ("anchor", "token", "oracle", "sequence", "sequence_fixed", "ensemble")


@dataclass
class Tally:
    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0

    def add(self, nll: torch.Tensor, targets: torch.Tensor, token_bytes: np.ndarray) -> None:
        self.nll += float(as_float64(nll).sum())
        self.tokens += nll.numel()
        self.bytes += int(token_bytes[targets.numpy()].sum())

    def summary(self) -> dict:
        if not self.tokens:
            raise DataError("no token was scored, so there is no perplexity to report; give the evaluation "
                            "more text (evaluate.eval_tokens, or a validation split with text in every partition)")
        loss = self.nll / self.tokens
        return {
            "loss": round(loss, 5),
            "perplexity": round(math.exp(loss), 4),
            "bits_per_byte": round(self.nll / math.log(2) / max(self.bytes, 1), 5),
            "tokens": self.tokens,
        }


@dataclass
class RoutingTally:
    layers: int
    experts: int
    oracle: list[int | None]  # per partition, the expert trained on it (None: none in the set)
    top1: np.ndarray = field(init=False)  # (layers, partitions, experts) counts of top-1 choices
    hits: np.ndarray = field(init=False)  # (layers, partitions, experts) tokens with the expert among their top-k

    def __post_init__(self):
        self.top1 = np.zeros((self.layers, len(self.oracle), self.experts), dtype=np.int64)
        self.hits = np.zeros((self.layers, len(self.oracle), self.experts), dtype=np.int64)

    @property
    def load(self) -> np.ndarray:
        """(layers, experts) counts of all k slots."""
        return self.hits.sum(1)

    def add(self, records: list[torch.Tensor], partitions: torch.Tensor) -> None:
        """records: per layer, the (B * T, k) expert indices of the tokens of B windows; partitions: (B,) the
        partition of each window."""
        cells = len(self.oracle) * self.experts
        for layer, indices in enumerate(records):
            indices = indices.cpu().numpy()
            rows = np.repeat(partitions.cpu().numpy(), len(indices) // len(partitions)) * self.experts
            self.top1[layer] += np.bincount(rows + indices[:, 0], minlength=cells).reshape(-1, self.experts)
            self.hits[layer] += np.bincount((rows[:, None] + indices).reshape(-1),
                                            minlength=cells).reshape(-1, self.experts)

    def summary(self) -> dict:
        matrix = self.top1 / np.maximum(self.top1.sum(-1, keepdims=True), 1)
        own = [(p, e) for p, e in enumerate(self.oracle) if e is not None]
        load = self.load
        return {
            "load": (load / np.maximum(load.sum(-1, keepdims=True), 1)).round(4).tolist(),
            "partition_to_expert": matrix.round(4).tolist(),
            "partition_to_expert_mean": matrix.mean(0).round(4).tolist(),
            # share of each partition's tokens whose top-1 expert is the one trained on that partition
            "accuracy_per_layer": [round(float(np.mean([m[p, e] for p, e in own])), 4) for m in matrix] if own else None,
        }


@torch.no_grad()
def window_nll(
    moe: CausalLM,
    anchor: CausalLM | None,
    batch: torch.Tensor,
    partitions: torch.Tensor | None,
    prefix_len: int,
    modes: set[str],
    revise_every: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token NLL (B, T) of each mode on a (B, T + 1) batch; `partitions` (B,) labels each window for the
    oracle. Sequence, ensemble and oracle come from one forced pass per expert."""
    out = {"token": moe.token_nll(batch)} if "token" in modes else {}
    if anchor is not None and "anchor" in modes:
        out["anchor"] = anchor.token_nll(batch)
    if modes & {"oracle", "sequence", "sequence_fixed", "ensemble"}:
        experts = moe.moe_blocks()[0].num_experts
        B = batch.shape[0]
        per_expert = torch.stack([moe.token_nll(batch, expert_ids=torch.full((B,), e, device=batch.device))
                                  for e in range(experts)])  # (E, B, T)
        for mode, every in (("sequence", revise_every), ("sequence_fixed", None)):
            if mode in modes:
                out[mode] = per_expert.gather(0, sequence_choices(per_expert, prefix_len, every)[None])[0]
        if "ensemble" in modes:
            prefix = per_expert[:, :, : prefix_len - 1].sum(-1)  # (E, B): -log p(prefix | expert)
            log_posterior = torch.log_softmax(-prefix, dim=0)  # uniform prior over experts
            out["ensemble"] = -torch.logsumexp(log_posterior[:, :, None] - per_expert, dim=0)
        if "oracle" in modes and partitions is not None:
            out["oracle"] = per_expert.gather(0, partitions[None, :, None].expand(1, B, per_expert.shape[-1]))[0]
    return out


@dataclass(frozen=True, slots=True)
class WindowScoring:
    """How `score_windows` scores: the routing `modes` (of MODES), the `prefix_len`-token prefix that sequence and
    ensemble routing choose from (the routing comparison scores the positions after it), sequence routing's
    `revise_every`, the compute `precision`, and whether to tally the token routing's choices (`routing`)."""

    modes: tuple[str, ...] = ("token",)
    prefix_len: int = 32
    revise_every: int | None = None
    precision: str = "fp32"
    routing: bool = False


@dataclass
class WindowScores:
    """Per mode, per group: a Tally of every position but each window's first (`full`) and one of the positions
    after the prefix (`after_prefix`); and the token routing's top-k choices per partition (`routing`), if asked."""

    full: dict[str, dict[Hashable, Tally]] = field(default_factory=dict)
    after_prefix: dict[str, dict[Hashable, Tally]] = field(default_factory=dict)
    routing: RoutingTally | None = None

    def per_group(self, mode: str, groups: Iterable[Hashable], after_prefix: bool = True) -> list[Tally]:
        """The tallies of `mode` for `groups` in that order; an empty Tally for a group with nothing scored."""
        table = (self.after_prefix if after_prefix else self.full).get(mode, {})
        return [table.get(group, Tally()) for group in groups]

    def total(self, mode: str, after_prefix: bool = True) -> Tally:
        return _merge(list((self.after_prefix if after_prefix else self.full).get(mode, {}).values()))


@torch.no_grad()
def score_windows(
    model: CausalLM,
    batches: Iterable[tuple[Hashable, torch.Tensor, torch.Tensor | None]],
    how: WindowScoring,
    token_bytes: np.ndarray,
    partition_experts: Sequence[int | None] = (),
    anchor: CausalLM | None = None,
) -> WindowScores:
    """Score `model` (an MoE, or a dense model under `token` routing) and, for mode `anchor`, the dense `anchor` on
    batches of windows, each (group, (B, T + 1) token ids on the CPU, (B,) the partition of each window or None).
    Tallies are summed per group (a partition, a corpus). A window's partition gives its oracle expert through
    `partition_experts` (partition -> position of the expert trained on it; None: none in the set, and a batch
    with such a window gets no oracle score) and its row in the routing tally.

    The one scoring function of windows: evaluate's report and the quality and parallel benchmarks use it. Batches
    go to the model's device, and run under autocast at `how.precision`."""
    modes = set(how.modes)
    device = module_device(model)
    dtype = autocast_dtype(how.precision, device)
    blocks = model.moe_blocks() if how.routing else []
    if blocks and "token" not in modes:
        raise ValueError("the routing tally counts the choices of token routing: add `token` to the modes")
    scores = WindowScores(routing=RoutingTally(len(blocks), blocks[0].num_experts, list(partition_experts))
                          if blocks else None)
    after = how.prefix_len - 1
    try:
        for group, batch, partitions in batches:
            for b in blocks:
                b.record = []
            labels = _oracle_labels(partitions, partition_experts, device)
            with autocast(dtype, device):
                nll = window_nll(model, anchor, to_device(batch, device), labels, how.prefix_len, modes,
                                 how.revise_every)
            if blocks and partitions is not None:
                scores.routing.add([b.record[0] for b in blocks], partitions)
            targets = batch[:, 1:]
            for mode, values in nll.items():
                scores.full.setdefault(mode, {}).setdefault(group, Tally()).add(values, targets, token_bytes)
                scores.after_prefix.setdefault(mode, {}).setdefault(group, Tally()).add(
                    values[:, after:], targets[:, after:], token_bytes)
    finally:
        for b in blocks:
            b.record = None
    return scores


def _oracle_labels(partitions: torch.Tensor | None, partition_experts: Sequence[int | None],
                   device: torch.device) -> torch.Tensor | None:
    """(B,) the expert trained on each window's partition; None if a window's partition has none (or is unknown)."""
    if partitions is None or not len(partition_experts):
        return None
    experts = [partition_experts[p] for p in partitions.tolist()]
    return None if None in experts else torch.tensor(experts, device=device)


def _batches(w: Windows, seq_len: int, max_tokens: int, micro: int, stride: int | None = None):
    seq_len = min(seq_len, w.total - 1)
    return w.batches(w.sequential(seq_len, max_tokens=max_tokens, stride=stride), seq_len, micro)


def partition_batches(
    run: Run, data: dict[str, PreparedData] | None = None
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(partition, (B, T + 1) batch, (B,) its partition) over the validation windows of every partition of the run's
    text, `evaluate.eval_tokens` of each; `data`: the data folders already open, by name."""
    cfg = run.cfg
    data = {} if data is None else data
    for p, part in enumerate(run.partitions()):
        prepared = data.setdefault(part.data, PreparedData(run.dir / part.data))
        for batch in _batches(prepared.windows(VAL, part.index), cfg.model.max_seq_len, cfg.evaluate.eval_tokens,
                              cfg.evaluate.micro_batch_size):
            yield p, batch, torch.full((len(batch),), p, device=batch.device)  # on the CPU, as the batch


def evaluate(run: Run) -> dict:
    with run.lock():  # every input is opened and checked before the stage records anything
        run.require("calibrate")
        return _evaluate(run, *_open_inputs(run))


def anchor_beside(moe: CausalLM, run: Run) -> CausalLM:
    """The dense anchor model, built on the MoE's own trunk tensors (its embeddings, attention, final norm and head,
    which assembly copied from the shared part) rather than a second copy of them, with the shared part's
    post-attention norms (calibration may rescale the MoE's) and the anchor FFN."""
    shared = run.shared_dir / "shared.safetensors"
    trunk = {name: t for name, t in moe.state_dict().items()
             if ".block_sparse_moe." not in name and not name.endswith("post_attention_layernorm.weight")
             and not (name == "lm_head.weight" and run.cfg.model.tie_embeddings)}
    norms = load_tensors(shared, [f"model.layers.{i}.post_attention_layernorm.weight"
                                  for i in range(run.cfg.model.num_layers)])
    tensors = trunk | norms | load_tensors(run.shared_dir / "anchor.safetensors")
    return build_model(run.cfg.model, run.vocab_size(), moe=False, tensors=tensors, device=module_device(moe))


def _open_inputs(run: Run) -> tuple[Tokenizer, AssembledFolder, dict[str, PreparedData]]:
    """The tokenizer, the model folder and the text; and a check of every other file the report reads."""
    cfg = run.cfg
    folder = AssembledFolder(run.model_dir)
    tokenizer = load_tokenizer(run.tokenizer_dir, folder.vocab_size)
    recorded = run.manifest()["stages"].get("prepare", {}).get("files", {}).get("tokenizer/tokenizer.json")
    if recorded is not None and sha256_file(run.tokenizer_dir / "tokenizer.json") != recorded:
        raise DataError(f"{run.tokenizer_dir / 'tokenizer.json'} was changed since `modularforge prepare` wrote it, so "
                        "it does not read the run's text as the model does; restore it, or run `modularforge run`")
    shapes = dense_shapes(cfg.model, folder.vocab_size)
    for name, ffn in (("shared", False), ("anchor", True)):
        checked_header(run.shared_dir / f"{name}.safetensors", {n: s for n, s in shapes.items() if is_ffn(n) == ffn})
    data = {part.data: PreparedData(run.dir / part.data) for part in run.partitions()}
    reports = {name: load_report(run.dir / name) for name in data}
    for part in run.partitions():
        if part.index >= len(reports[part.data]["partitions"]):
            raise DataError(f"{run.dir / part.data / 'partitions.json'} has no partition {part.index}; run "
                            "`modularforge prepare` again")
    for spec in run.experts():
        read_json(run.expert_dir(spec.name) / "done.json", ExpertDone)
        read_metrics(run.expert_dir(spec.name) / "metrics.jsonl")
    read_metrics(run.shared_dir / "metrics.jsonl")
    return tokenizer, folder, data


def _evaluate(run: Run, tokenizer: Tokenizer, folder: AssembledFolder, data: dict[str, PreparedData]) -> dict:
    cfg = run.cfg
    with run.stage("evaluate") as facts:
        device = resolve_device(cfg)
        moe = open_model(folder, expert_cache=cfg.evaluate.expert_cache, device=device)
        anchor = anchor_beside(moe, run)
        moe.eval(), anchor.eval()
        experts, parts = run.experts(), run.partitions()
        modes = tuple(m for m in MODES if m in {*cfg.evaluate.routing_modes, "anchor", "token", "oracle"})
        prefix = cfg.evaluate.prefix_len
        how = WindowScoring(modes, prefix, cfg.evaluate.sequence_revise_every, cfg.evaluate.precision, routing=True)
        scores = score_windows(moe, partition_batches(run, data), how, token_byte_lengths(tokenizer),
                               [part.expert for part in parts], anchor)
        full = {m: scores.total(m, after_prefix=False) for m in ("anchor", "token")}
        own_partition = {m: [Tally() for _ in experts] for m in ("anchor", "oracle")}
        for m, tallies in own_partition.items():
            for part, tally in zip(parts, scores.per_group(m, range(len(parts)), after_prefix=False)):
                if part.expert is not None:
                    tallies[part.expert] = tally
        after_prefix = {m: scores.per_group(m, range(len(parts))) for m in modes}
        report = {
            "run": str(run.dir),
            "windowing": {
                "window": cfg.model.max_seq_len, "stride": cfg.model.max_seq_len,
                "scored": "every position but each window's first (headline); positions after the "
                          f"{prefix}-token prefix (routing comparison)",
                "eval_tokens_per_partition": cfg.evaluate.eval_tokens,
            },
            "headline": {m: t.summary() for m, t in full.items()},
            "anchor": f"the pretrained base {cfg.model.base}, as it is" if cfg.model.base and not cfg.shared_steps
            else f"the base {cfg.model.base} trained further on the run's text" if cfg.model.base
            else "the shared phase's dense model",
            "routing_modes": {
                m: {"overall": _merge(ts).summary(), "per_partition": [t.summary() if t.tokens else None for t in ts],
                    "partitions_scored": sum(1 for t in ts if t.tokens)}
                for m, ts in after_prefix.items()
            },
            "partition_labels": [part.label for part in parts],
            "routing": scores.routing.summary(),
            "experts": expert_gains(run, own_partition),
            "samples": samples(moe, tokenizer, cfg, eos_id(tokenizer, run.tokenizer_dir)),
            "stages": {name: {k: v for k, v in entry.items() if k in ("wall_seconds", "peak_rss_mb")}
                       for name, entry in run.manifest()["stages"].items()},
            "partitions": _partition_summary(run),
        }
        write_report(run, report)
        worse = [e["expert"] for e in report["experts"] if e["gain"] is not None and e["gain"] <= 0]
        if worse:
            log.warning("expert(s) %s do not beat the anchor on their own partition's validation text",
                        ", ".join(map(str, worse)))
        facts["token_perplexity"] = report["headline"]["token"]["perplexity"]
        facts["anchor_perplexity"] = report["headline"]["anchor"]["perplexity"]
        return report


def expert_gains(run: Run, own_partition: dict[str, list[Tally]]) -> list[dict]:
    """Per expert of the set: its partition's validation perplexity under the anchor and under the expert alone
    (every position but each window's first), the gain, and how training chose the expert (from its done.json).
    An expert with no partition in this run (imported) has no such numbers."""
    rows = []
    for spec, anchor, expert in zip(run.experts(), own_partition["anchor"], own_partition["oracle"]):
        done = read_json(run.expert_dir(spec.name) / "done.json", ExpertDone)
        row = {"expert": spec.name, "kind": spec.kind, "anchor_perplexity": None, "expert_perplexity": None,
               "gain": None, "tokens": 0, "selection": done.get("selection")}
        if expert.tokens:
            before, after = anchor.summary(), expert.summary()
            row |= {"anchor_perplexity": before["perplexity"], "expert_perplexity": after["perplexity"],
                    "gain": round(1 - after["perplexity"] / before["perplexity"], 5), "tokens": after["tokens"]}
        rows.append(row)
    return rows


def _merge(tallies: list[Tally]) -> Tally:
    return Tally(sum(t.nll for t in tallies), sum(t.tokens for t in tallies), sum(t.bytes for t in tallies))


def _partition_summary(run: Run) -> list[dict]:
    reports: dict[str, dict] = {}
    rows = []
    for part in run.partitions():
        report = reports.setdefault(part.data, load_report(run.dir / part.data))  # checked by _open_inputs
        p = report["partitions"][part.index]
        rows.append({"partition": part.label, **{k: p[k] for k in ("train_tokens", "val_tokens", "top_terms", "sources")}})
    return rows


def samples(model: CausalLM, tokenizer, cfg, eos: int) -> list[dict]:
    s = Sampling.from_config(cfg.generate)
    s.max_new_tokens = cfg.evaluate.sample_tokens
    out = []
    for prompt in cfg.evaluate.sample_prompts:
        for routing in ("token", "sequence"):
            out.append({"prompt": prompt, "routing": routing,
                        "text": generate_text(model, tokenizer, prompt, s, routing=routing, eos=eos)})
    return out


NLL_BATCH_TOKENS = 8192  # window tokens per forward pass of `evaluate --data`
TEXT_BATCH_CHARS = 1 << 20  # characters of text tokenized per call


@dataclass(frozen=True, slots=True)
class FileScoring:
    """How `score_file` scores a text: windows of `window` tokens (default: the model's context) every `stride`
    (default: window), the routing (`token`: the model's own; `sequence`: one expert per window, chosen from its
    `prefix_len`-token prefix and revised every `revise_every` tokens), or `expert`: every token to that expert
    (oracle routing, where the text's expert is known); the precision, and the first `max_tokens` of the text."""

    window: int | None = None
    stride: int | None = None
    routing: str = "token"
    prefix_len: int = 32
    revise_every: int | None = None
    precision: str = "fp32"
    expert: int | None = None
    max_tokens: int | None = None


def evaluate_file(model_dir: Path, path: Path, how: FileScoring = FileScoring(), text_field: str = "text",
                  expert_cache: int | None = None, device: torch.device | str = "cpu",
                  expert: str | None = None) -> dict:
    """Perplexity of the model in `model_dir`, opened on `device`, on a file (`score_file`); with `expert_cache`,
    at most that many expert FFNs of it in memory. `expert` (a name from config.json's expert_names, or a
    position) sends every token to that expert."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is a folder; give a text file" if path.is_dir() else f"evaluation file not found: {path}")
    folder = AssembledFolder(model_dir)
    if expert is not None:
        how = replace(how, expert=expert_position(folder, expert))
    model = open_model(folder, expert_cache=expert_cache, device=device)
    tokenizer = load_tokenizer(model_dir, folder.vocab_size)
    return score_file(model, tokenizer, path, how, text_field, eos_id(tokenizer, model_dir))


def expert_position(folder: AssembledFolder, expert: str) -> int:
    """The position of an expert of an assembled model, given by its name or its position."""
    names = folder.config.get("expert_names") or [str(e) for e in range(folder.cfg.num_experts)]
    if expert in names[: folder.cfg.num_experts]:
        return names.index(expert)
    if expert.isdigit() and int(expert) < folder.cfg.num_experts:
        return int(expert)
    raise DataError(f"the model in {folder.dir} has no expert {expert!r}; its experts: {', '.join(names)}")


def score_file(model: CausalLM, tokenizer, path: Path, how: FileScoring = FileScoring(),
               text_field: str = "text", eos: int | None = None) -> dict:
    """Perplexity of `model` (an assembled MoE, or a dense model with token routing) on a file, in windows of
    `how.window` tokens every `how.stride` tokens. The first window scores every position it can predict; a later
    one only the tokens no earlier window predicted (its last `stride`, or `stride - 1` when stride == window,
    whose first token has no context), so with stride < window every token but the first is scored exactly once.
    Sequence routing scores only the positions after each window's prefix.

    .jsonl(.gz) / .parquet files are read as `prepare` reads them (the `text_field` of each record, stripped,
    documents separated by `eos`, default our tokenizer's); other files as UTF-8 text (.gz: compressed). The file is tokenized and scored
    as a stream, so memory holds a few MB of text, one batch of windows and the model, whatever the file's size.
    This is the one scoring function of files: `evaluate --data` and the benchmarks use it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is a folder; give a text file" if path.is_dir() else f"evaluation file not found: {path}")
    if how.routing == "sequence" and how.expert is not None:
        raise DataError("sequence routing chooses the expert itself; give a forced expert or sequence routing, not both")
    model.eval()
    context = model.cfg.max_seq_len
    window = how.window or context
    stride = how.stride or window
    check_windowing(window, stride, context, how.routing, how.prefix_len)
    token_bytes = token_byte_lengths(tokenizer)
    device = module_device(model)
    dtype = autocast_dtype(how.precision, device)
    later_from = max(0, window - stride - 1)  # the first position whose target no earlier window predicted
    prefix_from = how.prefix_len - 1 if how.routing == "sequence" else 0
    tally, windows, total = Tally(), 0, 0
    progress = tqdm(desc=f"evaluate {path.name}", unit=" tok", unit_scale=True, disable=None, leave=False)

    def counted(stream: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        nonlocal total
        for ids in stream:
            if how.max_tokens is not None:
                ids = ids[: how.max_tokens - total]
            total += len(ids)
            yield ids
            if how.max_tokens is not None and total >= how.max_tokens:
                return

    stream = counted(file_tokens(path, tokenizer, text_field, eos))
    for batch, starts in batched_windows(stream, window, stride, max(1, NLL_BATCH_TOKENS // window)):
        on_device = to_device(batch, device)
        with torch.no_grad(), autocast(dtype, device):
            if how.routing == "sequence":
                nll = window_nll(model, None, on_device, None, how.prefix_len, {"sequence"}, how.revise_every)["sequence"]
            elif how.expert is not None:
                nll = model.token_nll(on_device, expert_ids=torch.full((len(batch),), how.expert, device=device))
            else:
                nll = model.token_nll(on_device)
        before = tally.tokens
        for row, start in enumerate(starts):
            first = max(prefix_from, 0 if start == 0 else later_from)
            tally.add(nll[row, first:], batch[row, 1:][first:], token_bytes)
        windows += len(starts)
        progress.update(tally.tokens - before)
    progress.close()
    if total < 2:
        raise DataError(f"{path} holds {total} token(s); scoring needs at least 2")
    if not tally.tokens:
        raise DataError(f"nothing scored in {path}: its {total} tokens all fall inside the {how.prefix_len}-token prefix "
                        "that sequence routing does not score; use a longer file or --routing token")
    return {
        "file": str(path),
        "tokens_in_file": total,
        "windowing": {"window": window, "stride": stride, "windows": windows, "routing": how.routing,
                      **({"prefix_len": how.prefix_len, "sequence_revise_every": how.revise_every}
                         if how.routing == "sequence" else {}),
                      **({"expert": how.expert} if how.expert is not None else {}),
                      "scored": "every position of the first window; in each later one the positions whose targets "
                                "no earlier window predicted (the first token of a window that does not overlap "
                                "the one before it has no context and is not scored)"
                                + ("; in sequence routing only positions after the prefix" if prefix_from else "")},
        **tally.summary(),
    }


def check_windowing(window: int, stride: int, context: int, routing: str, prefix_len: int) -> None:
    """Windowing that scores at least one token per window, within the model's context; else a DataError."""
    if not 2 <= window <= context:
        raise DataError(f"the window must be 2 to {context} tokens (the model's context), got {window}")
    if not 1 <= stride <= window:
        raise DataError(f"the stride must be 1 to the window ({window}) tokens, got {stride}")
    if routing == "sequence" and window <= prefix_len:
        raise DataError(f"sequence routing scores the positions after the {prefix_len}-token prefix (evaluate."
                        f"prefix_len), so the window must be longer than it, got {window}")


def file_tokens(path: Path, tokenizer, text_field: str = "text", eos: int | None = None) -> Iterator[np.ndarray]:
    """Token ids of a file (see `evaluate_file`) as a stream of arrays, TEXT_BATCH_CHARS of text at a time."""
    eos = np.array([eos_id(tokenizer) if eos is None else eos], dtype=np.int64)
    documents = path.name.endswith((".jsonl", ".jsonl.gz", ".parquet"))
    pending: list[tuple[str, bool]] = []
    size, after_document = 0, False

    # without offsets and token strings: 30 MB instead of 130 MB per million characters
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    def encode() -> Iterator[np.ndarray]:
        nonlocal after_document
        for (text, ends), enc in zip(pending, encode_batch([t for t, _ in pending], add_special_tokens=False)):
            if after_document:
                yield eos
            yield np.asarray(enc.ids, dtype=np.int64)
            after_document = ends
        pending.clear()

    for text, ends in iter_text_pieces(path, text_field, piece_chars=TEXT_BATCH_CHARS // 4):
        pending.append((text.strip() if documents else text, ends))
        size += len(text)
        if size >= TEXT_BATCH_CHARS:
            yield from encode()
            size = 0
    yield from encode()


def batched_windows(tokens: Iterator[np.ndarray], window: int, stride: int,
                    per_batch: int) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """(batch (B, window), start of each window) for windows every `stride` tokens of a stream, holding only the tokens from the next window's start on. Windows stop at the first that reaches the
    end; if none does, a last shorter window (2+ tokens) from the next start comes alone in its batch."""
    buffer, base, start, last_end = np.zeros(0, dtype=np.int64), 0, 0, 0  # buffer[0] is token `base`
    batch: list[np.ndarray] = []
    starts: list[int] = []
    for ids in tokens:
        buffer = np.concatenate([buffer, ids])
        while start + window <= base + len(buffer):
            batch.append(buffer[start - base : start - base + window])
            starts.append(start)
            last_end, start = start + window, start + stride
            if len(batch) == per_batch:
                yield torch.from_numpy(np.stack(batch)), starts
                batch, starts = [], []
        drop = min(start, base + len(buffer)) - base
        buffer, base = buffer[drop:], base + drop
    total = base + len(buffer)
    if batch:
        yield torch.from_numpy(np.stack(batch)), starts
    if last_end < total and total - start >= 2:
        yield torch.from_numpy(buffer[start - base :].copy())[None], [start]
