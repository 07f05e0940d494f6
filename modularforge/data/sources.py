"""Where text comes from: local files, folders and globs, the bundled sample, or a Hugging Face dataset.

Every source yields `Document`s. A document longer than `data.max_doc_chars` is cut at paragraph
breaks into pieces that keep the parent's `group`, so the train/validation split (made per group)
never puts two halves of one text on both sides.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import re
import socket
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from modularforge.config import DataConfig
from modularforge.errors import DataError, os_error

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")

# Short names for datasets people ask for by habit; anything else is passed to `datasets` unchanged.
DATASET_ALIASES = {
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
}


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    group: str  # documents cut from one text share a group; splits are made per group
    source: str  # label of the file or corpus it came from (used for cluster purity)
    text: str


def iter_documents(cfg: DataConfig) -> Iterator[Document]:
    """All documents of the configured sources, in a deterministic order, long ones cut into pieces."""
    raw = _iter_dataset(cfg) if cfg.dataset else _iter_local(cfg)
    count = 0
    for doc in raw:
        text = doc.text.strip()
        if len(text) < cfg.min_chars:
            continue
        for k, piece in enumerate(split_paragraphs(text, cfg.max_doc_chars)):
            if len(piece) < cfg.min_chars:
                continue
            yield Document(f"{doc.id}#{k}" if k else doc.id, doc.group, doc.source, piece)
            count += 1
            if cfg.max_documents is not None and count >= cfg.max_documents:
                return


def split_paragraphs(text: str, max_chars: int) -> list[str]:
    """Cut `text` at blank lines into pieces of at most about `max_chars` characters."""
    if len(text) <= max_chars:
        return [text]
    pieces, current, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        if size and size + len(para) > max_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        while len(para) > max_chars:  # a single huge paragraph: cut at the last space before the limit
            cut = para.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            pieces.append(para[:cut])
            para = para[cut:].lstrip()
        current.append(para)
        size += len(para) + 2
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def resolve_paths(sources: list[str]) -> list[tuple[Path, str]]:
    """Expand files, folders and globs into (file, source label) pairs; error on anything unmatched."""
    found: list[tuple[Path, str]] = []
    for source in sources:
        if source == "bundled":
            root = resources.files("modularforge.bundled")
            found += [(Path(str(p)), _label(Path(str(p)))) for p in sorted(root.iterdir(), key=str) if _supported(p.name)]
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _supported(p.name))
            if not files:
                raise DataError(f"folder {path} holds no {'/'.join(SUFFIXES)} files")
            found += [(p, _label(p)) for p in files]
        elif path.is_file():
            if not _supported(path.name):
                raise DataError(f"unsupported file type: {path} (use {', '.join(SUFFIXES)})")
            found.append((path, _label(path)))
        elif any(c in source for c in "*?["):
            files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
            files = [p for p in files if p.is_file() and _supported(p.name)]
            if not files:
                raise DataError(f"glob '{source}' matched no {'/'.join(SUFFIXES)} files")
            found += [(p, _label(p)) for p in files]
        else:
            raise DataError(f"data source not found: {source}")
    if not found:
        raise DataError("no data sources given; set data.sources or data.dataset")
    return found


def _supported(name: str) -> bool:
    return name.endswith(SUFFIXES)


def _label(path: Path) -> str:
    """A file's source label: its corpus folder for sharded corpora (train-00000.jsonl), else its stem."""
    stem = path.name.split(".")[0]
    if re.fullmatch(r"(train|dev|valid|validation|test)(-\d+)?", stem):
        return path.parent.name
    return stem


def _iter_local(cfg: DataConfig) -> Iterator[Document]:
    for path, label in resolve_paths(cfg.sources):
        if path.name.endswith(".txt"):
            yield Document(str(path), str(path), label, _read_text(path))
        elif path.name.endswith((".jsonl", ".jsonl.gz")):
            yield from _iter_jsonl(path, label, cfg.text_field)
        else:
            yield from _iter_parquet(path, label, cfg.text_field)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Errors of reading `path` (bad bytes, a broken gzip stream, the file system) as one-line errors naming it."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start} of a line or piece)") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a complete gzip file ({e or 'it ends early'})") from None
    except OSError as e:
        raise os_error(e, path, "cannot read") from None


def _read_text(path: Path) -> str:
    with _reading(path):
        return path.read_text(encoding="utf-8")


def iter_text_pieces(path: Path, text_field: str = "text", piece_chars: int = 1 << 20) -> Iterator[tuple[str, bool]]:
    """The text of one file as `prepare` reads it, as (piece, ends a document) pairs in bounded memory: each record
    of a .jsonl(.gz) / .parquet file (its `text_field`) is a document; any other file is one document of UTF-8 text
    (gzip-compressed if it ends in .gz), in pieces of about `piece_chars` characters. A piece ends only before a
    space or line break that a non-space character follows, where byte-level BPE's pre-tokenizer splits anyway,
    so the tokens of the pieces are the tokens of the whole text."""
    path = Path(path)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        yield from ((doc.text, True) for doc in _iter_jsonl(path, _label(path), text_field))
    elif path.name.endswith(".parquet"):
        yield from ((doc.text, True) for doc in _iter_parquet(path, _label(path), text_field))
    else:
        yield from _text_pieces(path, piece_chars)


def _text_pieces(path: Path, piece_chars: int) -> Iterator[tuple[str, bool]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with _reading(path), opener(path, "rt", encoding="utf-8") as f:
        carry = ""
        while chunk := f.read(piece_chars):
            text = carry + chunk
            cut = _piece_end(text)
            if cut < 0 and len(text) < 16 * piece_chars:  # no clean break yet; a text without any is cut anyway
                carry = text
                continue
            cut = cut if cut >= 0 else len(text)
            yield text[:cut], False
            carry = text[cut:]
        yield carry, True


_BREAK = re.compile(r"[ \t\n](?=\S)")


def _piece_end(text: str) -> int:
    """Index of the last space, tab or newline followed by a non-space character, or -1. The pre-tokenizer splits
    a run of white space before a word just before its last character, so a piece that ends there splits the
    same way as the whole text."""
    for start in (max(0, len(text) - 4096), 0):
        last = max((m.start() for m in _BREAK.finditer(text, start)), default=-1)
        if last > 0:
            return last
    return -1


def _iter_jsonl(path: Path, label: str, text_field: str) -> Iterator[Document]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with _reading(path), opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno} has no string field '{text_field}' (set data.text_field)")
            doc_id = str(record.get("id", f"{path}:{lineno}"))
            group = str(record.get("book_id", doc_id))
            yield Document(doc_id, group, label, text)


def _iter_parquet(path: Path, label: str, text_field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow: pip install 'modularforge[hf]'") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if text_field not in table.schema_arrow.names:
        raise DataError(f"{path} has no column '{text_field}' (columns: {', '.join(table.schema_arrow.names)})")
    row = 0
    batches = table.iter_batches(columns=[text_field], batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except (OSError, ValueError) as e:  # pyarrow's errors for a damaged file derive from these
            raise DataError(f"cannot read {path}: {e}") from None
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, str):
                yield Document(f"{path}:{row}", f"{path}:{row}", label, text)


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _go_offline() -> None:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, names in (("datasets.config", ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")),
                          ("huggingface_hub.constants", ("HF_HUB_OFFLINE",))):
        if module in sys.modules:  # already imported: its constants were read from the environment then
            for name in names:
                setattr(sys.modules[module], name, True)


def _iter_dataset(cfg: DataConfig) -> Iterator[Document]:
    name, config = DATASET_ALIASES.get(cfg.dataset, (cfg.dataset, None))
    config = cfg.dataset_config or config
    offline = not hub_reachable()
    if offline:
        _go_offline()  # offline, `datasets` only succeeds from its cache; without this it retries for minutes
    try:
        import datasets
    except ImportError:
        raise DataError("data.dataset needs the `datasets` package: pip install 'modularforge[hf]'") from None
    try:
        ds = datasets.load_dataset(name, config, split=cfg.dataset_split)
    except Exception as e:
        if offline:
            raise DataError(
                f"cannot reach the Hugging Face hub and dataset '{name}' is not cached; "
                "download it on a connected machine, or use local files: "
                "--set data.sources=[path/to/*.txt] (or .jsonl with a 'text' field, or .parquet)"
            ) from None
        raise DataError(f"cannot load dataset '{name}' ({config}): {str(e).splitlines()[0]}") from None
    if cfg.text_field not in ds.column_names:
        raise DataError(f"dataset '{name}' has no column '{cfg.text_field}' (columns: {', '.join(ds.column_names)})")
    label = name.split("/")[-1]
    texts = (row[cfg.text_field] for row in ds)
    if "wikitext" in name:
        texts = _group_wikitext_articles(texts)
    for i, text in enumerate(texts):
        yield Document(f"{label}:{i}", f"{label}:{i}", label, text)


def _group_wikitext_articles(lines: Iterator[str]) -> Iterator[str]:
    """WikiText rows are lines; an article starts at a ' = Title = ' line (one '=' on each side)."""
    article: list[str] = []
    for line in lines:
        if re.fullmatch(r" = [^=].* = \n", line) and article:
            yield "".join(article)
            article = []
        article.append(line)
    if article:
        yield "".join(article)
