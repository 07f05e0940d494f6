"""The generate stage: text from an assembled model, streamed to the terminal (`modularforge generate`).

The sampling itself (temperature, top-k, top-p, KV cache, sliding window, per-sequence routing) lives
in `modularforge.sampling`, below every stage, since `evaluate` samples too.
"""

from __future__ import annotations

import sys


def stream_to_stdout(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
