"""The one typed configuration tree, validated at load.

Every section is a pydantic model that rejects unknown keys; field descriptions double as the
text of `modularforge config --keys`. Presets live in `modularforge/configs/*.yaml` (also reachable
as `configs/` at the repository root). `--set section.key=value` overrides any field; values are
parsed as YAML, so `--set model.top_k=1` gives an int and `--set data.sources=[a.txt,b.txt]` a list.
"""

from __future__ import annotations

import difflib
import json
import math
from importlib import resources
from pathlib import Path
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modularforge.errors import ConfigError, os_error


MAX_STEPS = 10**9


class Section(BaseModel):
    # strict: a boolean is not a number and 1e20 is not a step count; numbers are range-checked where declared
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class RunConfig(Section):
    name: str = Field("demo", description="Run name (a plain folder name); the run directory is <root>/<name>.")
    root: str = Field("runs", description="Folder that holds run directories.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for data splits, initialisation and batch sampling.")
    threads: int | None = Field(None, ge=1, le=4096, description="torch intra-op threads (None: torch's default).")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$",
        description="Device that training, calibration, evaluation and generation compute on: auto (a CUDA GPU, "
        "else Apple's mps, else the CPU), cpu, cuda, cuda:N or mps; prepare and assemble are file work on the "
        "CPU. A device this machine lacks is refused when a stage starts.",
    )
    malloc_mmap_threshold_kb: int | None = Field(
        None, ge=64, le=1 << 30,
        description="glibc only: give every allocation above this size its own mapping, returned to the system "
        "when freed. Cuts training peak RSS by about a fifth (heap fragmentation) and costs about 30% "
        "throughput (page faults); for runs bound by memory, not time. None keeps glibc's default.",
    )


    @field_validator("name", mode="before")
    @classmethod
    def _plain_name(cls, name: Any) -> Any:
        if isinstance(name, int) and not isinstance(name, bool):
            name = str(name)  # `--set run.name=2024` reads as a number
        if isinstance(name, str) and (name in ("", ".", "..") or any(c in name for c in "/\\\0")):
            raise ValueError("must be a plain folder name inside run.root (no '/', '..' or absolute path)")
        return name


class DataConfig(Section):
    sources: list[str] = Field(
        default_factory=lambda: ["bundled"],
        description="Local .txt/.jsonl/.jsonl.gz/.parquet files, folders or globs; 'bundled' is the "
        "shipped public-domain sample. Ignored when `dataset` is set.",
    )
    dataset: str | None = Field(
        None, description="Hugging Face dataset name or alias (e.g. wikitext-103); needs network or a cache."
    )
    dataset_config: str | None = Field(None, description="Dataset configuration name (e.g. wikitext-103-raw-v1).")
    dataset_split: str = Field("train", description="Dataset split to read.")
    text_field: str = Field("text", description="Field holding the text in .jsonl/.parquet/dataset rows.")
    max_documents: int | None = Field(None, ge=1, le=10**12, description="Read at most this many documents.")
    min_chars: int = Field(200, ge=1, le=10**9, description="Drop documents shorter than this many characters.")
    max_doc_chars: int = Field(
        10_000, ge=1000, le=10**9, description="Cut longer documents into pieces of about this size at paragraph breaks."
    )
    split_unit: Literal["document", "group"] = Field(
        "document",
        description="Make the train/val split per document piece, or per group (a source record such as a "
        "whole book, so no text is on both sides).",
    )
    val_fraction: float = Field(0.05, gt=0, lt=0.5, description="Fraction of documents held out for validation.")
    calib_fraction: float = Field(
        0.05, gt=0, lt=0.5, description="Fraction of documents held out for router statistics and calibration."
    )


class TokenizerConfig(Section):
    vocab_size: int = Field(8192, ge=260, le=1 << 20, description="BPE vocabulary size (special tokens included).")
    min_frequency: int = Field(2, ge=1, le=10**9, description="Minimum pair frequency for a BPE merge.")
    train_max_chars: int = Field(
        30_000_000, ge=10_000, le=10**13,
        description="Train the tokenizer on about this many characters (an even sample of documents).",
    )


class PartitionConfig(Section):
    method: Literal["random", "clustered", "curriculum", "source"] = Field(
        "clustered", description="How documents are split among experts: random, clustered (tf-idf or embeddings, "
        "balanced k-means), curriculum (by difficulty), or source (one partition per source: a corpus folder, or "
        "a file's name; model.num_experts must equal their number).",
    )
    features: Literal["tfidf", "embeddings"] = Field(
        "tfidf", description="Clustering features: tf-idf over tokens + SVD, or sentence embeddings."
    )
    embedding_model: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2",
        description="Locally installed sentence-transformers model (name or path) for features=embeddings.",
    )
    svd_dim: int = Field(64, ge=2, le=4096, description="Dimensions kept by truncated SVD of the tf-idf matrix.")
    balance: float = Field(
        1.5, le=1000,
        ge=1.0,
        description="Largest cluster may hold at most balance x (tokens / num_experts); 1.0 = perfectly balanced.",
    )
    top_terms: int = Field(12, ge=1, le=1000, description="Top terms listed per cluster in the partition report.")
    kmeans_iters: int = Field(30, ge=1, le=10**6, description="Balanced k-means iterations.")


class RopeScaling(Section):
    """Llama 3.x's rotary frequency scaling (`rope_type: llama3` in transformers, `rope_freqs` in llama.cpp)."""

    rope_type: Literal["llama3"] = Field("llama3", description="The scaling rule (only llama3).")
    factor: float = Field(8.0, gt=0, le=1e6, description="Wavelengths above the low-frequency bound are this many times longer.")
    low_freq_factor: float = Field(1.0, gt=0, le=1e6, description="Low-frequency bound: original context / this.")
    high_freq_factor: float = Field(4.0, gt=0, le=1e6, description="High-frequency bound: original context / this.")
    original_max_position_embeddings: int = Field(8192, ge=1, le=1 << 24, description="Context the base was first trained at.")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> RopeScaling:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("high_freq_factor must exceed low_freq_factor")
        return self


class ModelConfig(Section):
    base: str | None = Field(
        None,
        description="A pretrained dense model to start from instead of training the trunk: a local Hugging Face "
        "folder (config.json + safetensors), a GGUF file, or a hub id (needs network or a cache). Its shape, "
        "tokenizer, trunk and FFN (the anchor) are used as they are; the shape keys below are taken from it.",
    )
    architecture: Literal["mixtral", "qwen3_moe"] = Field(
        "mixtral",
        description="The exported MoE family: mixtral (Llama-family layers) or qwen3_moe (Qwen3 layers: an RMSNorm "
        "on each head's queries and keys). Taken from the base.",
    )
    hidden_size: int = Field(256, ge=8, le=1 << 16, description="Model width (d_model).")
    intermediate_size: int = Field(768, ge=8, le=1 << 18, description="SwiGLU hidden width of each FFN / expert (d_ff).")
    num_layers: int = Field(4, ge=1, le=1024, description="Transformer blocks.")
    num_heads: int = Field(4, ge=1, le=1024, description="Attention heads.")
    num_kv_heads: int | None = Field(None, ge=1, le=1024, description="Key/value heads (grouped-query); None = num_heads.")
    head_size: int | None = Field(
        None, ge=2, le=1 << 12, description="Width of each attention head; None = hidden_size / num_heads."
    )
    max_seq_len: int = Field(256, ge=8, le=1 << 20, description="Context length the run trains and scores at.")
    context_length: int | None = Field(
        None, ge=8, le=1 << 24,
        description="Context the exported model declares (max_position_embeddings); None = max_seq_len. A base's "
        "own context, which may exceed what the run trains at.",
    )
    num_experts: int = Field(4, ge=1, le=1024, description="Experts = data partitions.")
    top_k: int = Field(2, ge=1, le=1024, description="Experts used per token in token-level routing.")
    rope_theta: float = Field(10_000.0, gt=0, le=1e12, description="Rotary embedding base.")
    rope_scaling: RopeScaling | None = Field(None, description="Rotary frequency scaling (Llama 3.x); None = none.")
    norm_eps: float = Field(1e-5, gt=0, le=1, description="RMSNorm epsilon.")
    tie_embeddings: bool = Field(False, description="Share the input embedding with the LM head.")
    init_std: float = Field(0.02, gt=0, le=10, description="Standard deviation of the normal weight initialisation.")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden_size // self.num_heads

    @property
    def qk_norm(self) -> bool:
        """Qwen3's RMSNorm over each head's queries and keys, before the rotary embedding."""
        return self.architecture == "qwen3_moe"

    @property
    def declared_context(self) -> int:
        return self.context_length or self.max_seq_len

    def dense_parameters(self, vocab_size: int) -> int:
        """Parameters of the dense model (shared part + one FFN per layer)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.kv_heads * self.head_dim
        layer = 2 * h * q + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        return vocab_size * h * (1 if self.tie_embeddings else 2) + self.num_layers * layer + h


class TrainConfig(Section):
    batch_size: int = Field(16, ge=1, le=1 << 20, description="Sequences per optimizer step.")
    micro_batch_size: int | None = Field(
        None, ge=1, le=1 << 20, description="Sequences per forward/backward (gradient accumulation); None = batch_size."
    )
    seq_len: int | None = Field(None, ge=8, le=1 << 20, description="Training sequence length; None = model.max_seq_len.")
    lr: float = Field(3e-4, gt=0, le=10, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="Fraction of steps spent in linear warmup.")
    warmup_steps: int | None = Field(
        None, ge=0, le=10**9, description="Linear warmup in steps, whatever the run's length (overrides warmup_fraction)."
    )
    schedule: Literal["cosine", "wsd"] = Field(
        "wsd", description="Learning rate after warmup: wsd (warmup-stable-decay): the peak until the last "
        "`decay_fraction` of the steps, then linear decay to min_lr; or cosine decay to min_lr over the run. "
        "At equal tokens wsd gave 8-10% lower perplexity than cosine in the shared phase (docs/RESULTS.md). "
        "With wsd and warmup_steps, runs of different lengths share their first steps exactly, so one run "
        "can be branched into several budgets (benchmarks/quality.py does).",
    )
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: fraction of the steps spent decaying.")
    optimizer: Literal["adamw", "adafactor"] = Field(
        "adamw", description="adamw, or adafactor (factored second moments, no first moment: about 4 bytes of state "
        "per parameter fewer than 8, for runs bound by memory; an absolute step size, so lr means what it means "
        "for adamw).",
    )
    step_in_backward: bool = Field(
        False, description="Update each parameter inside the backward pass as soon as its gradient is complete, "
        "and drop the gradient, so the gradients of all trained weights never exist at once (for runs bound by "
        "memory). Needs micro_batch_size = batch_size and grad_clip 0 (a global norm needs every gradient).",
    )
    weight_decay: float = Field(0.1, ge=0, le=100, description="AdamW weight decay (matrices only).")
    beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, gt=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0, le=1e6, description="Clip the global gradient norm (0 = off).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Autocast precision: bf16 on CPUs with native bf16 (auto), or fp32."
    )
    activation_checkpointing: bool = Field(False, description="Recompute block activations in backward.")
    loss_chunks: int = Field(
        1, ge=1, le=1 << 16, description="Run the LM head and loss on this many slices of the sequence, each slice's gradients "
        "computed at once, so only one slice's logits are in memory (matters at large vocabularies).",
    )
    domain_probe_weight: float = Field(
        0.0, ge=0, le=1000, description="Shared phase only: weight of an auxiliary loss that trains, per layer, a linear "
        "classifier of the token's partition from the hidden state that layer's router will read (then dropped), "
        "so those states become separable by partition and closed-form routers route tokens to their experts.",
    )
    domain_probe_from: int = Field(
        0, ge=0, le=1 << 20, description="Shared phase only: first position of each window the domain probe is trained on "
        "(earlier positions have little context to tell the domain from).",
    )
    compile: bool = Field(False, description="torch.compile the model (pays off only on long runs).")
    eval_interval: int = Field(100, ge=1, le=10**9, description="Validate every this many steps (and at the end).")
    eval_batches: int = Field(4, ge=1, le=10**6, description="Micro-batches per validation.")
    log_interval: int = Field(10, ge=1, le=10**9, description="One metrics line every this many steps.")
    checkpoint_interval: int = Field(100, ge=1, le=10**9, description="Save a resumable checkpoint every this many steps.")

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.batch_size


class BudgetConfig(Section):
    total_tokens: int = Field(
        2_000_000, ge=1, le=10**15, description="Training tokens of the whole pipeline (shared phase + all experts)."
    )
    shared_fraction: float | Literal["auto"] = Field(
        "auto",
        description="From scratch: share of total_tokens spent on the shared phase; the rest is split among "
        "experts. `auto` picks it from the run's tokens per dense parameter along the best splits measured by "
        "benchmarks/parallel.py and benchmarks/quality.py (SHARED_FRACTION_CURVE; docs/RESULTS.md). A run from a "
        "base ignores it (see base_trunk_tokens).",
    )
    base_trunk_tokens: int = Field(
        0, ge=0, le=10**15,
        description="With model.base: tokens of continued training of the whole base on the run's text (the shared "
        "phase, started from the base) before the experts branch from it; 0 keeps the base as it is, frozen. The "
        "rest of total_tokens is split among the experts.",
    )
    expert_tokens: int | None = Field(
        None, ge=1, le=10**12,
        description="Training tokens of each expert, instead of total_tokens x (1 - shared_fraction) / num_experts: "
        "on N machines that never talk while experts train, each expert can get the whole expert phase's "
        "tokens in the same wall time. Changing it never retrains the shared phase.",
    )

    @field_validator("shared_fraction")
    @classmethod
    def _fraction_in_range(cls, value: float | str) -> float | str:
        if value != "auto" and not 0 < value < 1:
            raise ValueError("must be 'auto' or a number between 0 and 1 (exclusive)")
        return value


# (tokens per dense parameter, best share of the tokens for the shared phase at equal tokens), measured:
# benchmarks/quality.py at 0.32 (7.6M parameters; 19/20 beat 5/6, 2/3, 1/3), benchmarks/parallel.py at 0.42, 1.26
# and 4.2 (0.48M parameters; 0.95 beat 0.8 and 0.5 at each). `auto` interpolates in log(tokens per parameter)
# and holds the end values beyond the measured range. 0.95 is the top of both grids, so the optimum may be higher.
SHARED_FRACTION_CURVE: tuple[tuple[float, float], ...] = ((0.32, 0.95), (0.42, 0.95), (1.26, 0.95), (4.2, 0.95))


def auto_shared_fraction(tokens_per_parameter: float) -> float:
    points = sorted(SHARED_FRACTION_CURVE)
    x = math.log(max(tokens_per_parameter, 1e-12))
    xs = [math.log(t) for t, _ in points]
    if x <= xs[0]:
        return points[0][1]
    for (x0, (_, f0)), (x1, (_, f1)) in zip(zip(xs, points), zip(xs[1:], points[1:])):
        if x <= x1:
            return f0 + (f1 - f0) * (x - x0) / (x1 - x0)
    return points[-1][1]


# (training tokens of one expert, best multiple of the trunk's final learning rate), measured: the demo at 75K
# tokens (2x beat 1x, and 3x in 146 steps of 512 tokens as well as 5x in 37 of 1024 lost) and benchmarks/grow.py
# at 299K (10x beat 2x, 5x and 20x); the quality benchmark agrees (5x lost to 2x at 15K tokens, tied at 50K, won
# at 100K and 200K, where 10x won more). Tokens, not steps: the demo's 146-step expert at 3x is the point that
# tells them apart. `auto` interpolates in log(tokens) and holds the end values beyond.
EXPERT_LR_CURVE: tuple[tuple[int, float], tuple[int, float]] = ((76_800, 2.0), (153_600, 10.0))


def auto_lr_from_trunk(tokens: int) -> float:
    (t0, m0), (t1, m1) = EXPERT_LR_CURVE
    if tokens <= t0:
        return m0
    if tokens >= t1:
        return m1
    return m0 * (m1 / m0) ** (math.log(tokens / t0) / math.log(t1 / t0))


# The peak learning rate of an expert branched from a frozen pretrained base (`model.base`, no shared phase):
# measured by benchmarks/upcycle.py --lr-sweep on SmolLM2-135M (docs/RESULTS.md).
BASE_EXPERT_LR = 3e-4


class ExpertsConfig(Section):
    init: Literal["scratch", "anchor"] = Field(
        "anchor", description="Start each expert from random weights or from the shared phase's anchor FFN."
    )
    mode: Literal["alone", "with_anchor"] = Field(
        "alone", description="Train the expert alone, or in a two-expert MoE beside the frozen anchor (FlexOlmo)."
    )
    anchor_swap: float = Field(
        0.0, ge=0, lt=1,
        description="mode=alone: chance that a training step runs the frozen anchor FFN instead of the expert in "
        "a layer, so the expert learns to work on inputs other FFNs produced.",
    )
    frozen_bf16: bool = Field(
        True,
        description="Keep the frozen attention and LM-head matrices in bf16 when training runs under bf16 autocast "
        "(exact: autocast casts them to bf16 anyway); embeddings and norms stay fp32.",
    )
    executor: Literal["local", "ray"] = Field("local", description="Run experts in this process or as Ray tasks.")
    ray_address: str | None = Field(None, description="Ray cluster address; None starts a local Ray instance.")
    ray_cpus_per_task: float = Field(1.0, gt=0, le=4096, description="CPUs reserved per expert task.")
    ray_gpus_per_task: float = Field(
        0.0, ge=0, le=64, description="GPUs reserved per expert task (Ray then makes them the task's visible CUDA "
        "devices, and run.device: auto trains on them); 0 trains on the CPU.",
    )
    ray_memory_gb_per_task: float | None = Field(None, gt=0, le=1e6, description="Memory reserved per expert task (GiB).")
    ray_max_retries: int = Field(2, ge=0, le=1000, description="Retries of a failed expert task (each resumes).")
    ray_local_cpus: int = Field(2, ge=1, le=4096, description="CPUs of the local Ray instance started without an address.")
    stats_tokens: int = Field(
        65_536, ge=256, le=10**12, description="Calibration-split tokens per expert for the router statistics."
    )
    lr_from_trunk: float | Literal["auto"] | None = Field(
        "auto",
        description="Expert peak learning rate as a multiple of the rate the shared phase's schedule ended at "
        "(train.lr x train.min_lr_ratio), so an expert continues near the trunk's schedule instead of jumping "
        "back up. `auto` takes the multiple from the expert's training tokens (EXPERT_LR_CURVE: 2x up to 76.8K "
        "tokens, 10x from 153.6K, log-linear between), as measured in docs/RESULTS.md: on the demo (75K tokens) "
        "5x left three of four experts worse than their anchor and 1x / 2x / 3x gave MoE/anchor 0.980 / 0.977 / "
        "0.988; in the grow benchmark (299K tokens) 10x beat 2x, 5x and 20x. None uses experts.train.lr.",
    )
    keep_best: bool = Field(
        True,
        description="Score each expert on its partition's held-out calibration text at step 0 (the anchor it "
        "starts from) and at every validation, and keep the best of those checkpoints, so an expert never "
        "ships worse than the anchor on its own partition.",
    )
    select_tokens: int = Field(
        32_768, ge=256, le=10**9,
        description="keep_best: tokens of held-out text each validation scores, in windows spread over the "
        "partition's calibration documents (joined by its validation documents when it has fewer than four). "
        "It replaces experts.train.eval_batches. 2K tokens chose 2 of 8 experts that were worse than the anchor "
        "on validation text in benchmarks/quality.py (19/20 split); 32K with select_margin 2 chose none.",
    )
    select_margin: float = Field(
        2.0, ge=0, le=100,
        description="keep_best: a trained checkpoint replaces the anchor only when its loss is lower by this "
        "many standard errors of the paired per-window difference, windows clustered by document; 0 takes any "
        "lower loss. An expert that cannot show a gain ships as the anchor FFN and the report names it.",
    )
    fit_fraction: float = Field(
        0.5, ge=0, le=100,
        description="add-expert: after training alone, an added expert trains this share of its steps more inside "
        "the grown model (the experts it joins, their routers and the trunk frozen; routers solved from the "
        "statistics as assembly solves them), on batches half its own text and half the older text of the set it "
        "joins, so that it learns the routing the exported model gives it (train/fit.py). 0 turns fitting off.",
    )
    fit_lr: float = Field(
        0.25, gt=0, le=10, description="add-expert fitting: peak learning rate as a share of the expert's own."
    )
    fit_distill: float = Field(
        10.0, ge=0, le=100,
        description="add-expert fitting: weight, on the older text, of the KL divergence from the model before the "
        "add (the same MoE without the new expert) beside the next-token loss, so that what the routers send the "
        "new expert of the older text changes that model as little as it can. In the grow benchmark 1 / 3 / 10 "
        "left the exported model's old corpora +5.5% / +3.9% / +1.8% above before and its new corpora at 65.4 / "
        "65.0 / 67.3 perplexity (149.3 before; docs/RESULTS.md#growing-a-model).",
    )
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=1e-3))

    @field_validator("lr_from_trunk")
    @classmethod
    def _multiple_in_range(cls, value: float | str | None) -> float | str | None:
        if value not in ("auto", None) and not 0 < value <= 100:
            raise ValueError("must be 'auto', null or a number in (0, 100]")
        return value


class AssembleConfig(Section):
    router: Literal["uniform", "kaiming", "data_stats", "ridge", "lda"] = Field(
        "ridge", description="Router initialisation from the experts' statistics (no training)."
    )
    ridge_lambda: float = Field(
        0.1, gt=0, le=1e6, description="Ridge/LDA regulariser, relative to the mean eigenvalue of the covariance "
        "(0.1 beat 0.01 and 1.0 in benchmarks/quality.py)."
    )
    centred: bool = Field(True, description="Centre the statistics on the pooled mean before solving.")
    shard_max_mb: int = Field(512, ge=1, le=1 << 20, description="Largest output shard for the shared tensors (MB).")


class CalibrateConfig(Section):
    temperature: bool = Field(True, description="Search a router temperature on the calibration split.")
    per_layer: bool = Field(False, description="Search one temperature per layer (coordinate descent).")
    temperatures: list[Annotated[float, Field(ge=1e-3, le=1000)]] = Field(
        default_factory=lambda: [0.1, 0.2, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0, 5.0, 8.0],
        min_length=1, description="Candidate temperatures (router logits are divided by these).",
    )
    norm: bool = Field(
        False, description="Rescale post-attention norm gains so expert inputs match their training statistics."
    )
    calib_tokens: int = Field(16_384, ge=256, le=10**12, description="Calibration-split tokens scored per candidate.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "fp32", description="Compute precision of the calibration passes. bf16 autocast is faster, but each "
        "routing-dependent expert batch shape gets its own cached oneDNN kernel and weight casts: on poc-50m "
        "the stage's memory above the interpreter doubled (benchmarks/memory.py).",
    )
    expert_cache: int | None = Field(
        None, ge=1, le=1 << 20, description="Run calibration with at most this many expert FFNs in memory (None = all)."
    )
    micro_batch_size: int = Field(8, ge=1, le=1 << 16, description="Calibration windows per forward pass.")


class EvaluateConfig(Section):
    eval_tokens: int = Field(32_768, ge=256, le=10**12, description="Validation tokens scored per partition.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Compute precision of the report's scoring passes (auto: bf16 on CPUs with native bf16)."
    )
    micro_batch_size: int = Field(8, ge=1, le=1 << 16, description="Report windows per forward pass.")
    expert_cache: int | None = Field(
        None, ge=1, le=1 << 20, description="Evaluate with at most this many expert FFNs in memory (LRU; None = all)."
    )
    window: int | None = Field(
        None, ge=2, le=1 << 20, description="Window length in tokens for `evaluate --data`; None = the model's context."
    )
    stride: int | None = Field(
        None, ge=1, le=1 << 20, description="Window stride for `evaluate --data`; None = window length."
    )
    prefix_len: int = Field(32, ge=1, le=1 << 20, description="Prefix tokens that choose the expert in sequence/ensemble routing.")
    sequence_revise_every: int | None = Field(
        32, ge=1, le=1 << 20, description="Sequence routing re-chooses its expert from all the text so far every this many "
        "tokens (None = keep the prefix's choice for the whole window)."
    )
    routing_modes: list[Literal["token", "sequence", "sequence_fixed", "ensemble", "oracle"]] = Field(
        default_factory=lambda: ["token", "sequence", "ensemble", "oracle"],
        description="Routing modes compared in the report.",
    )
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["The", "In the year", "A hacker is"], description="Prompts for report samples."
    )
    sample_tokens: int = Field(60, ge=1, le=1 << 20, description="New tokens per sample.")


class GenerateConfig(Section):
    temperature: float = Field(0.8, ge=0, le=100, description="Sampling temperature (0 = greedy, else at least 0.01).")
    top_k: int | None = Field(50, ge=1, le=1 << 20, description="Keep the k most likely tokens (None = off).")
    top_p: float | None = Field(0.95, gt=0, le=1, description="Nucleus sampling mass (None = off).")
    max_new_tokens: int = Field(200, ge=1, le=1 << 20, description="Tokens to generate.")
    min_new_tokens: int = Field(0, ge=0, le=1 << 20, description="End-of-text is not sampled before this many new tokens.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Sampling seed.")
    context_window: int | None = Field(
        None, ge=2, le=1 << 20, description="Sliding context window in tokens; None = model.max_seq_len."
    )
    routing: Literal["token", "sequence"] = Field("token", description="Routing mode for generation.")
    sequence_revise_every: int | None = Field(
        32, ge=1, le=1 << 20, description="Sequence routing re-chooses its expert from the text so far every this many new "
        "tokens, scoring the context under every expert (None = keep the prompt's choice)."
    )
    dtype: Literal["float32", "float16"] = Field(
        "float32", description="Weight precision for generation: float32 gives the exported model's own "
        "logits; float16 is ~1.5x faster at batch 1, with logits within ~1e-3."
    )
    expert_cache: int | None = Field(
        None, ge=1, le=1 << 20, description="Keep at most this many expert FFNs in memory (LRU); None = load all."
    )


    @field_validator("temperature")
    @classmethod
    def _greedy_or_finite_logits(cls, t: float) -> float:
        if 0 < t < 0.01:  # logits divided by less overflow float32
            raise ValueError("must be 0 (greedy) or at least 0.01")
        return t


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    assemble: AssembleConfig = Field(default_factory=AssembleConfig)
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        m = self.model
        if m.top_k > m.num_experts:
            raise ValueError(f"model.top_k={m.top_k} exceeds model.num_experts={m.num_experts}; lower top_k")
        if m.head_size is None and m.hidden_size % m.num_heads:
            raise ValueError(
                f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}; set "
                "model.head_size"
            )
        if m.head_dim % 2:
            raise ValueError(f"the attention head width {m.head_dim} must be even for rotary embeddings")
        if m.context_length is not None and m.context_length < m.max_seq_len:
            raise ValueError(f"model.max_seq_len={m.max_seq_len} exceeds model.context_length={m.context_length}")
        if m.num_heads % m.kv_heads:
            raise ValueError(f"model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={m.kv_heads}")
        for name, train in (("train", self.train), ("experts.train", self.experts.train)):
            if train.batch_size % train.micro_batch:
                raise ValueError(
                    f"{name}.batch_size={train.batch_size} is not a multiple of "
                    f"{name}.micro_batch_size={train.micro_batch}"
                )
            if train.step_in_backward and (train.micro_batch != train.batch_size or train.grad_clip):
                raise ValueError(f"{name}.step_in_backward steps as gradients arrive: it needs {name}.micro_batch_size "
                                 f"= batch_size and {name}.grad_clip=0")
            if train.seq_len is not None and train.seq_len > m.max_seq_len:
                raise ValueError(f"{name}.seq_len={train.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        if self.experts.train.domain_probe_weight or self.experts.train.domain_probe_from:
            raise ValueError("experts.train.domain_probe_* applies to the shared phase only; set train.domain_probe_*")
        if self.data.val_fraction + self.data.calib_fraction >= 0.5:
            raise ValueError("data.val_fraction + data.calib_fraction must stay below 0.5")
        if self.generate.context_window is not None and self.generate.context_window > m.max_seq_len:
            raise ValueError(
                f"generate.context_window={self.generate.context_window} exceeds model.max_seq_len={m.max_seq_len}"
            )
        if self.experts.lr_from_trunk is not None and self.train.min_lr_ratio == 0 and self.shared_steps:
            raise ValueError("experts.lr_from_trunk continues from the shared phase's final learning rate, which "
                             "train.min_lr_ratio=0 makes 0; raise train.min_lr_ratio or set experts.lr_from_trunk=null")
        if self.experts.anchor_swap and self.experts.mode == "with_anchor":
            raise ValueError("experts.anchor_swap applies to experts.mode=alone (with_anchor always runs the anchor)")
        if self.evaluate.prefix_len >= m.max_seq_len:
            raise ValueError(f"evaluate.prefix_len must be below model.max_seq_len={m.max_seq_len}")
        e = self.evaluate
        if e.window is not None and e.stride is not None and e.stride > e.window:
            raise ValueError(f"evaluate.stride={e.stride} exceeds evaluate.window={e.window}")
        if max(self.shared_steps, self.expert_steps) > MAX_STEPS:
            raise ValueError(f"the budget gives {max(self.shared_steps, self.expert_steps):,} steps in a phase, over "
                             f"{MAX_STEPS:,}; lower budget.total_tokens (or budget.expert_tokens)")
        if self.budget.base_trunk_tokens and m.base is None:
            raise ValueError("budget.base_trunk_tokens continues training a base: set model.base, or use "
                             "budget.shared_fraction for a run from scratch")
        if m.base is not None and self.budget.base_trunk_tokens >= self.budget.total_tokens:
            raise ValueError(f"budget.base_trunk_tokens={self.budget.base_trunk_tokens} leaves nothing of "
                             f"budget.total_tokens={self.budget.total_tokens} for the experts; raise total_tokens")
        if (self.shared_steps < 1 and m.base is None) or self.expert_steps < 1:
            raise ValueError(
                f"budget.total_tokens={self.budget.total_tokens} is too small for one step per phase; raise it"
            )
        return self

    def seq_len(self, train: TrainConfig) -> int:
        return train.seq_len or self.model.max_seq_len

    def tokens_per_step(self, train: TrainConfig) -> int:
        return train.batch_size * self.seq_len(train)

    @property
    def shared_fraction(self) -> float:
        """budget.shared_fraction, with `auto` resolved from the tokens per dense parameter; for a run that starts
        from a base, the share of budget.base_trunk_tokens (0: the base's trunk is used frozen, as it is)."""
        if self.model.base is not None:
            return self.budget.base_trunk_tokens / self.budget.total_tokens
        if self.budget.shared_fraction != "auto":
            return self.budget.shared_fraction
        return auto_shared_fraction(self.budget.total_tokens / self.model.dense_parameters(self.tokenizer.vocab_size))

    @property
    def shared_steps(self) -> int:
        return round(self.budget.total_tokens * self.shared_fraction / self.tokens_per_step(self.train))

    @property
    def expert_steps(self) -> int:
        expert_tokens = self.budget.expert_tokens or (
            self.budget.total_tokens * (1 - self.shared_fraction) / self.model.num_experts)
        return round(expert_tokens / self.tokens_per_step(self.experts.train))

    @property
    def expert_train(self) -> TrainConfig:
        """experts.train with the peak learning rate of an expert of the phase's own length (`expert_steps`)."""
        return self.expert_train_for(self.expert_steps)

    def expert_train_for(self, steps: int) -> TrainConfig:
        """experts.train with the peak learning rate that `experts.lr_from_trunk` resolves to for an expert that
        trains `steps` steps; an expert of a frozen base (no shared phase, so no final rate to continue from) takes
        BASE_EXPERT_LR."""
        multiple = self.experts.lr_from_trunk
        if multiple is None:
            return self.experts.train
        if self.shared_steps == 0:
            return self.experts.train.model_copy(update={"lr": BASE_EXPERT_LR})
        if multiple == "auto":
            multiple = auto_lr_from_trunk(steps * self.tokens_per_step(self.experts.train))
        final = self.train.lr * self.train.min_lr_ratio
        return self.experts.train.model_copy(update={"lr": final * multiple})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` and `1e20` (no dot) as strings; read them as floats, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("modularforge.configs").iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    path = resources.files("modularforge.configs") / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'; available presets: {', '.join(preset_names())}")
    return Path(str(path))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or the defaults when path is None), apply `section.key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = parse_yaml(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise os_error(e, path, "cannot read config") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, not {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects section.key=value, got '{item}'")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
    try:
        node[parts[-1]] = parse_yaml(value)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: cannot parse value '{value}'") from None


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        *parents, leaf = [str(p) for p in first["loc"]]
        known = _known_keys(parents)
        hint = difflib.get_close_matches(leaf, known, n=1)
        fix = f"did you mean '{'.'.join([*parents, hint[0]])}'?" if hint else f"known keys: {', '.join(known)}"
        return f"unknown config key '{loc}'; {fix}"
    message = first["msg"].removeprefix("Value error, ")
    if not loc:
        return f"invalid config: {message}"
    return f"invalid config value for '{loc}': {message} (got {first.get('input')!r})"


def _known_keys(parents: list[str]) -> list[str]:
    model: type[BaseModel] = Config
    for p in parents:
        annotation = model.model_fields[p].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf, for `modularforge config --keys`."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
            else:
                default = field.get_default(call_default_factory=True)
                rows.append((f"{prefix}{name}", json.dumps(default), field.description or ""))

    walk(Config, "")
    return rows
