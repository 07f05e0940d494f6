"""Stage 1, prepare: text -> BPE tokenizer -> token shards -> partitions with a report."""

from __future__ import annotations

import logging

from modularforge.data.partition import partition_documents
from modularforge.data.shards import TokenStore, write_shards
from modularforge.data.sources import iter_documents
from modularforge.data.tokenizer import eos_id, train_tokenizer
from modularforge.runs import Run

log = logging.getLogger(__name__)


def prepare(run: Run) -> None:
    cfg = run.cfg
    with run.stage("prepare") as facts:
        log.info("training a %d-token BPE tokenizer", cfg.tokenizer.vocab_size)
        texts = (doc.text for doc in iter_documents(cfg.data))
        tokenizer = train_tokenizer(texts, cfg.tokenizer, cfg.model.max_seq_len, run.tokenizer_dir)
        shards = write_shards(iter_documents(cfg.data), tokenizer, eos_id(tokenizer), cfg.data, run.data_dir)
        log.info("%d documents, %d tokens", shards["num_documents"], shards["num_tokens"])
        store = TokenStore.open(run.data_dir)
        report = partition_documents(store, tokenizer, cfg.partition, cfg.model.num_experts, cfg.run.seed)
        log.info("partitions (%s):\n%s", cfg.partition.method, format_partition_table(report))
        facts.update(
            documents=shards["num_documents"],
            tokens=shards["num_tokens"],
            vocab_size=tokenizer.get_vocab_size(),
            purity=report["purity"],
        )


def format_partition_table(report: dict) -> str:
    lines = [f"{'part':>4} {'docs':>6} {'train tok':>10} {'val tok':>8}  top terms / sources"]
    for p in report["partitions"]:
        sources = ", ".join(list(p["sources"])[:3])
        lines.append(
            f"{p['partition']:>4} {p['train_documents']:>6} {p['train_tokens']:>10} {p['val_tokens']:>8}  "
            f"{' '.join(p['top_terms'][:8])}  [{sources}]"
        )
    return "\n".join(lines)
