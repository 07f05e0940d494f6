"""Build modularforge/bundled/: the small public-domain sample the main job trains on offline.

Only the two registry-sourced public-domain corpora of ../shared/data are used (see its MANIFEST.md):
State of the Union addresses (a spread of years) and the Jargon File. Run from the repository root:

    python tools/build_bundled_corpus.py ../shared/data
"""

import gzip
import json
import sys
from pathlib import Path

BUDGET_BYTES = 5_000_000  # text bytes, before compression
JARGON_BYTES = 1_300_000


def read(corpus: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(corpus.glob("train-*.jsonl")) for line in path.open()]


def main(shared_data: str) -> None:
    root = Path(shared_data)
    out = Path(__file__).resolve().parents[1] / "modularforge" / "bundled"
    jargon = read(root / "jargon_file")
    speeches = sorted(read(root / "us_state_of_the_union"), key=lambda r: (int(r["year"]), r["id"]))
    jargon_bytes = sum(len(r["text"].encode()) for r in jargon)
    assert jargon_bytes <= JARGON_BYTES, jargon_bytes
    room = BUDGET_BYTES - jargon_bytes
    total = sum(len(r["text"].encode()) for r in speeches)
    step = total / room  # take speeches evenly across the years until the budget is spent
    picked, used, credit = [], 0, 0.0
    for record in speeches:
        credit += 1 / step
        size = len(record["text"].encode())
        if credit >= 1 and used + size <= room:
            picked.append(record)
            used += size
            credit -= 1
    for name, records in (("us_state_of_the_union", picked), ("jargon_file", jargon)):
        lines = "".join(json.dumps({"id": r["id"], "title": r["title"], "text": r["text"]}) + "\n" for r in records)
        # mtime=0 keeps the archive byte-identical across rebuilds
        (out / f"{name}.jsonl.gz").write_bytes(gzip.compress(lines.encode("utf-8"), compresslevel=9, mtime=0))
    print(f"{len(picked)} speeches ({used:,} bytes), {len(jargon)} jargon blocks ({jargon_bytes:,} bytes); "
          f"total {used + jargon_bytes:,} bytes of text")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
