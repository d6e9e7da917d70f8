"""A pause point for tests that kill or interrupt a conversion at a chosen moment.

Inert unless FUSEMOE_CKPT_TEST_PAUSE is set to `POINT:N:FLAG`: the N-th time the conversion reaches
POINT, it creates the file FLAG and waits there until the conversion is told to stop (or forever),
so a test can send a signal at a known state. Points: `shard-done` (after a shard is written,
flushed and recorded in the journal), `piece` (after a byte range is copied, mid-shard),
`install` (everything written, before the final rename).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

PAUSE_VARIABLE = "FUSEMOE_CKPT_TEST_PAUSE"

_counts: Counter[str] = Counter()
_lock = threading.Lock()


def pause_point(point: str, until: threading.Event | None = None) -> None:
    """Pause here if FUSEMOE_CKPT_TEST_PAUSE asks for this point and this count; else return at once."""
    spec = os.environ.get(PAUSE_VARIABLE)
    if not spec:
        return
    name, count, flag = spec.split(":", 2)
    if name != point:
        return
    with _lock:
        _counts[point] += 1
        if _counts[point] != int(count):
            return
    Path(flag).touch()
    (until or threading.Event()).wait()
