"""The eight corpora of ../shared/data the benchmarks train and score on (each a folder of train-*.jsonl files and a
dev-00000.jsonl file of held-out documents), and a text none of them holds."""

from pathlib import Path

CORPORA = ("wikipedia_en", "gutenberg_fiction", "gutenberg_nonfiction", "us_state_of_the_union", "us_code",
           "debian_docs", "foldoc", "jargon_file")
UNSEEN = Path("/usr/share/common-licenses/GPL-3")


def dev_file(data: Path, corpus: str) -> Path:
    return data / corpus / "dev-00000.jsonl"
