"""The shape of every JSON file ModularForge reads back: one pydantic model per file kind.

A file written by hand, by another version or by a crashed tool may be valid JSON of the wrong shape. Each model
below lists what the code reads of its file (other keys are allowed and kept, so whatever the current code writes
passes), with the types and ranges the code relies on; `check` validates a parsed file and turns the first problem
into one line naming the file, the key and what is wrong, plus how to get a good file back:

    runs/demo/experts/expert_00/done.json: 'sha256' must be a mapping, got a list; ...

Validation is strict (no "5" for 5, no true for 1) and returns the parsed JSON itself, not a model, so a reader
keeps the dicts it always had and rewrites a file with every key it found. Files read as lines (`metrics.jsonl`)
are checked line by line.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from modularforge.errors import DataError

EXPERT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # also a folder name: experts/<name>/


def _file_name(value: str) -> str:
    if not value or "/" in value or "\\" in value or value in (".", ".."):
        raise ValueError(f"must be a plain file name in the same folder, got {value!r}")
    return value


def _relative_folder(value: str) -> str:
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"must be a folder inside the run directory, got {value!r}")
    return value


def _hex(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{12,}", value):
        raise ValueError(f"must be a hexadecimal digest, got {value[:40]!r}")
    return value


def _expert_name(value: str) -> str:
    if not EXPERT_NAME.match(value):
        raise ValueError(f"must be a plain expert name (letters, digits, '_', '-', '.'), got {value!r}")
    return value


FileName = Annotated[str, AfterValidator(_file_name)]
RelativeFolder = Annotated[str, AfterValidator(_relative_folder)]
ExpertName = Annotated[str, AfterValidator(_expert_name)]
Digest = Annotated[str, AfterValidator(_hex)]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]


class _Part(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class FileSchema(_Part):
    """A whole file; `fix` says how to get a good one back."""

    fix: ClassVar[str] = "restore it from a copy"


# --- the run directory ----------------------------------------------------------------------------------------------

class StageRecord(_Part):
    status: str | None = None
    fingerprint: str | None = None
    files: dict[str, str | None] = {}  # path relative to the run directory -> sha256 (None: vanished while hashed)
    shared_sha256: str | None = None
    anchor_sha256: str | None = None
    wall_seconds: float | None = None
    peak_rss_mb: float | None = None


class Manifest(FileSchema):
    """manifest.json: per stage, what it recorded when it finished."""

    fix: ClassVar[str] = "restore it from a copy, or delete it to redo every stage"
    stages: dict[str, StageRecord]
    changes: list[dict[str, Any]] = []


class FitInto(_Part):
    experts: dict[str, str]  # name -> fingerprint of each expert of the set it joined
    temperature: list[Annotated[float, Field(gt=0)]] | None = None  # per layer


class ExpertEntry(BaseModel):
    """An expert that add-expert or import-expert registered. Only the keys this version writes: an entry is built
    from them."""

    model_config = ConfigDict(strict=True, extra="forbid")
    name: ExpertName
    kind: Literal["added", "imported"]
    data: RelativeFolder | None = None
    partition: Count | None = None
    data_sha256: Digest | None = None
    tokens: Positive | None = None
    replay: Annotated[float, Field(gt=0, lt=1)] | None = None
    fit_into: FitInto | None = None
    fingerprint: str | None = None
    origin: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> ExpertEntry:
        if self.kind == "added" and (self.data is None or self.partition is None):
            raise ValueError("must name its 'data' folder and 'partition' (an added expert)")
        if self.kind == "imported" and self.fingerprint is None:
            raise ValueError("must record its 'fingerprint' (an imported expert)")
        return self


class Registry(FileSchema):
    """experts/registry.json: what the grow commands changed in the expert set."""

    fix: ClassVar[str] = "restore it from a copy, or delete it to return to the partition experts alone"
    removed: list[str] = []
    added: list[ExpertEntry] = []

    @model_validator(mode="after")
    def _unique(self) -> Registry:
        names = [e.name for e in self.added]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"expert {twice[0]!r} is registered twice")
        return self


class Sha256s(_Part):
    expert: str
    stats: str


class Trunk(_Part):
    shared: str | None = None
    anchor: str | None = None
    tokenizer: str | None = None


class Selection(_Part):
    best_step: Count
    anchor_loss: float
    best_loss: float
    gain: float
    standard_error: float | None = None


class ExpertDone(FileSchema):
    """experts/<name>/done.json: a finished expert's summary."""

    fix: ClassVar[str] = ("restore it from a copy, or delete it and run `modularforge train-experts` to train the "
                          "expert again")
    fingerprint: str
    sha256: Sha256s  # of its files, by role
    name: str | None = None
    trunk: Trunk | None = None
    selection: Selection | None = None


# --- prepared data (data/ and added/<name>/) ------------------------------------------------------------------------

_PREPARE_FIX = "run `modularforge prepare` again (or add the expert's text again)"


class Shard(_Part):
    file: FileName
    tokens: Count
    sha256: str


class Shards(FileSchema):
    """data/shards.json: the token shards."""

    fix: ClassVar[str] = _PREPARE_FIX
    dtype: Literal["uint16", "uint32"]
    eos_id: Count
    bos_id: Count | None = None
    vocab_size: Positive
    shards: list[Shard]

    @model_validator(mode="after")
    def _eos_in_vocabulary(self) -> Shards:
        if self.eos_id >= self.vocab_size:
            raise ValueError(f"'eos_id' {self.eos_id} must be below 'vocab_size' {self.vocab_size}")
        return self


class Documents(FileSchema):
    """data/documents.json: each document's id, and the names of the sources."""

    fix: ClassVar[str] = _PREPARE_FIX
    ids: list[str]
    labels: list[str]


class PartitionRow(_Part):
    train_tokens: Count
    val_tokens: Count
    top_terms: list[str]
    sources: dict[str, int]


class PartitionReport(FileSchema):
    """data/partitions.json: what each partition holds."""

    fix: ClassVar[str] = _PREPARE_FIX
    partitions: list[PartitionRow]


class MetricsRecord(FileSchema):
    """One line of a training run's metrics.jsonl."""

    fix: ClassVar[str] = "delete that line"
    step: Count
    loss: float | None = None
    val_loss: float | None = None


# --- an assembled model folder (model/) -----------------------------------------------------------------------------

_ASSEMBLE_FIX = "run `modularforge assemble` again"


class ModelConfigFile(FileSchema):
    """config.json as the readers of a folder need it beside the model's shape (model.hf checks the shape)."""

    fix: ClassVar[str] = _ASSEMBLE_FIX
    model_type: str
    vocab_size: Positive
    eos_token_id: Count
    bos_token_id: Count | None = None
    pad_token_id: Count | None = None
    rope_parameters: dict[str, Any] | None = None
    expert_names: list[str] | None = None


class WeightIndex(FileSchema):
    """model.safetensors.index.json: which shard holds each tensor."""

    fix: ClassVar[str] = _ASSEMBLE_FIX
    weight_map: dict[str, FileName]


class Calibration(_Part):
    temperature: list[Annotated[float, Field(gt=0)]] | None = None  # per layer


class ModelInfo(FileSchema):
    """modularforge.json: how the folder was assembled and calibrated."""

    fix: ClassVar[str] = _ASSEMBLE_FIX
    calibration: Calibration | None = None


def _merges(value: list) -> list:
    if not all(isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(isinstance(s, str) for s in m))
               for m in value):
        raise ValueError("'model.merges' must hold 'left right' strings or [left, right] pairs")
    return value


class AddedToken(_Part):
    id: Count
    content: str
    special: bool = False


class TokenizerModel(_Part):
    type: str
    vocab: dict[str, Count]
    merges: Annotated[list, AfterValidator(_merges)] = []


class TokenizerFile(FileSchema):
    """tokenizer.json as GGUF export reads it (the tokenizers library checks the rest when it loads the file)."""

    fix: ClassVar[str] = "restore it from the run's tokenizer/ folder, or run `modularforge assemble` again"
    model: TokenizerModel
    pre_tokenizer: dict[str, Any] | None = None
    added_tokens: list[AddedToken] = []


def _special_token(value: Any) -> Any:
    if not (value is None or isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str))):
        raise ValueError("must be a token: a string, or a mapping with its 'content'")
    return value


SpecialToken = Annotated[Any, AfterValidator(_special_token)]


class TokenizerConfig(FileSchema):
    """tokenizer_config.json: the special tokens, as transformers reads them."""

    fix: ClassVar[str] = "run `modularforge prepare` again"
    bos_token: SpecialToken = None
    eos_token: SpecialToken = None
    pad_token: SpecialToken = None


class LlamaCppTokenizer(FileSchema):
    """llama_cpp.json beside a base's tokenizer: llama.cpp's names for it, which GGUF export declares."""

    fix: ClassVar[str] = "run `modularforge prepare` again"
    model: str
    pre: str
    add_bos_token: bool = False


# --- a pretrained base (model.base) ----------------------------------------------------------------------------------

_BASE_FIX = "give model.base a complete Hugging Face model folder"


class BaseConfig(FileSchema):
    """A base's config.json as far as choosing its family needs; model.hf reads the shape and says what is missing."""

    fix: ClassVar[str] = _BASE_FIX
    model_type: str | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool = False


class BaseTokenizerConfig(TokenizerConfig):
    fix: ClassVar[str] = _BASE_FIX
    unk_token: SpecialToken = None
    chat_template: str | list | None = None


class BaseWeightIndex(WeightIndex):
    fix: ClassVar[str] = _BASE_FIX


class BaseTokenizerFile(TokenizerFile):
    fix: ClassVar[str] = _BASE_FIX


class JsonObject(FileSchema):
    """A file that is copied, not read (special_tokens_map.json): a JSON object."""

    fix: ClassVar[str] = "run `modularforge prepare` again"


class HeadlineScore(_Part):
    perplexity: float


class Headline(_Part):
    token: HeadlineScore
    anchor: HeadlineScore


class Sample(_Part):
    routing: str
    prompt: str
    text: str


class Report(FileSchema):
    """reports/report.json, as `run` prints it at the end."""

    fix: ClassVar[str] = "run `modularforge evaluate` again"
    headline: Headline
    samples: list[Sample]


# --- checking -------------------------------------------------------------------------------------------------------

def check(value: Any, schema: type[FileSchema], where: object) -> Any:
    """`value` (a parsed JSON file, or one record of a file of lines) if it has `schema`'s shape; else a DataError
    naming `where` (the file, or the file and line) and the first problem."""
    try:
        schema.model_validate(value)
    except ValidationError as e:
        raise DataError(f"{where}: {problem(e.errors()[0])}; {schema.fix}") from None
    return value


_EXPECTED = {
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "list_type": "a list", "string_type": "a string", "int_type": "a whole number", "float_type": "a number",
    "bool_type": "true or false",
}


def problem(error: dict) -> str:
    """One pydantic error as a phrase: "'shards[0].file' is missing", "'sha256' must be a mapping, got a list"."""
    where = _location(error["loc"])
    kind = error["type"]
    if kind == "missing":
        return f"{where} is missing"
    if kind == "extra_forbidden":
        return f"{where} is not a key this version writes"
    if kind == "model_type" and not error["loc"]:
        return f"expected a JSON object, got {_json_type(error['input'])}"
    if kind in _EXPECTED:
        return f"{where} must be {_EXPECTED[kind]}, got {_json_type(error['input'])}"
    message = error["msg"]
    if kind == "value_error":  # from a validator below: says what it must be, or names its keys itself
        message = message.removeprefix("Value error, ")
        return f"{where} {message}" if message.startswith("must") else f"{where}: {message}" if error["loc"] else message
    if message.startswith("Input should be"):
        message = message.replace("Input should be", "must be") + f", got {_short(error['input'])}"
    return f"{where} {message}"


def _location(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return f"'{text}'" if text else "the file"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    return "a list" if isinstance(value, list) else "a mapping" if isinstance(value, dict) else type(value).__name__
