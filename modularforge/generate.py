"""The generate stage: text from an assembled model, streamed to the terminal (`modularforge generate`).

The sampling itself (temperature, top-k, top-p, KV cache, sliding window, per-sequence routing) lives
in `modularforge.sampling`, below every stage, since `evaluate` samples too.
"""

from __future__ import annotations

import sys

# old import paths, kept while benchmarks run
from modularforge.sampling import (  # noqa: F401
    Sampling,
    choose_expert,
    filter_logits,
    generate_ids,
    generate_text,
    sample_token,
    sequence_choices,
)


def stream_to_stdout(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
