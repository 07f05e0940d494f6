"""Stage 1, prepare: text -> BPE tokenizer (or a base's own) -> token shards -> partitions with a report."""

from __future__ import annotations

import hashlib
import logging

from modularforge.data.partition import partition_documents
from modularforge.data.shards import TokenStore, write_shards
from modularforge.data.sources import iter_documents
from modularforge.data.tokenizer import eos_id, load_tokenizer, train_tokenizer
from modularforge.pretrained import write_tokenizer
from modularforge.runs import Run

log = logging.getLogger(__name__)


def prepare(run: Run) -> None:
    cfg = run.cfg
    with run.stage("prepare") as facts:
        log.info("prepare reads and writes files on the CPU (run.device applies to the stages that compute)")
        if run.base is not None:
            facts_of_base = write_tokenizer(run.base, run.tokenizer_dir, cfg.model.max_seq_len)
            tokenizer = load_tokenizer(run.tokenizer_dir)
            log.info("using the tokenizer of %s as it is (%d tokens)", cfg.model.base, facts_of_base.vocab)
            shards = write_shards(iter_documents(cfg.data), tokenizer, facts_of_base.eos_id, cfg.data, run.data_dir,
                                  vocab_size=run.base.vocab_size, bos=facts_of_base.bos_id)
        else:
            total_chars = sum(len(doc.text) for doc in iter_documents(cfg.data))
            share = min(1.0, cfg.tokenizer.train_max_chars / max(total_chars, 1))
            log.info("training a %d-token BPE tokenizer on %.0f%% of %.1fM characters",
                     cfg.tokenizer.vocab_size, 100 * share, total_chars / 1e6)
            texts = (doc.text for doc in iter_documents(cfg.data) if _sampled(doc.id, share))
            tokenizer = train_tokenizer(texts, cfg.tokenizer, cfg.model.max_seq_len, run.tokenizer_dir)
            shards = write_shards(iter_documents(cfg.data), tokenizer, eos_id(tokenizer), cfg.data, run.data_dir)
        log.info("%d documents, %d tokens", shards["num_documents"], shards["num_tokens"])
        store = TokenStore.open(run.data_dir)
        report = partition_documents(store, tokenizer, cfg.partition, cfg.model.num_experts, cfg.run.seed)
        log.info("partitions (%s):\n%s", cfg.partition.method, format_partition_table(report))
        facts.update(
            documents=shards["num_documents"],
            tokens=shards["num_tokens"],
            vocab_size=shards["vocab_size"],
            purity=report["purity"],
        )


def _sampled(doc_id: str, share: float) -> bool:
    """An even, order-independent sample of documents: keep a document when its id hashes below `share`."""
    return share >= 1.0 or int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "little") < share * 2**64


def format_partition_table(report: dict) -> str:
    lines = [f"{'part':>4} {'docs':>6} {'train tok':>10} {'val tok':>8}  top terms / sources"]
    for p in report["partitions"]:
        sources = ", ".join(list(p["sources"])[:3])
        lines.append(
            f"{p['partition']:>4} {p['train_documents']:>6} {p['train_tokens']:>10} {p['val_tokens']:>8}  "
            f"{' '.join(p['top_terms'][:8])}  [{sources}]"
        )
    return "\n".join(lines)
