"""Run fusemoe-ckpt in this process, pausing it at a chosen moment, so a test can signal a known state.

    python tests/pause_launcher.py POINT:COUNT:FLAG cli convert SRC DST ...
    python tests/pause_launcher.py POINT:COUNT:FLAG worker ENTRY_JSON RESULT_FILE

The N-th (COUNT) time the run reaches POINT, it creates the file FLAG and waits there, until a
SIGINT or SIGTERM (which then interrupts the run as it would have without the pause) or a kill.
Points, each patched in from outside:

- `piece`: after a byte range is copied into a shard (ShardWriter.copy), mid-shard;
- `shard-done`: after a shard is written, flushed and recorded in the journal (Journal.record);
- `install`: everything written, just before the partial directory is renamed into place;
- `installed`: just after that rename, before the journal is removed from DST.

With `cli batch ...`, the batch's entry processes are started through this launcher as well
(`worker`), so the pause happens inside the entry being converted.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

import fusemoe_ckpt.batch.runner as runner
import fusemoe_ckpt.write.output as output
from fusemoe_ckpt.write.journal import Journal
from fusemoe_ckpt.write.writer import ShardWriter

# A paused run that nobody stops is ended, so a failed test leaves no process behind.
GIVE_UP_SECONDS = 120

_released = threading.Event()
_counts: Counter[str] = Counter()
_lock = threading.Lock()


def _pause_here(point: str, spec: tuple[str, int, Path]) -> None:
    name, count, flag = spec
    if name != point:
        return
    with _lock:
        _counts[point] += 1
        if _counts[point] != count:
            return
    flag.touch()
    if not _released.wait(GIVE_UP_SECONDS):
        os._exit(3)


def _after(function, point: str, spec):
    def paused(*args, **kwargs):
        result = function(*args, **kwargs)
        _pause_here(point, spec)
        return result

    return paused


def _before(function, point: str, spec):
    def paused(*args, **kwargs):
        _pause_here(point, spec)
        return function(*args, **kwargs)

    return paused


def _interrupt(signum, frame) -> None:
    # Let paused threads go, then interrupt the main thread as ^C would.
    _released.set()
    signal.default_int_handler(signum, frame)


_set_handler = signal.signal


def _releasing(signum, handler):
    """signal.signal for the code under test: a handler it sets for SIGINT or SIGTERM lets paused
    threads go first, so the interruption it raises can stop the run as it would without the pause."""
    if signum in (signal.SIGINT, signal.SIGTERM) and callable(handler):
        inner = handler

        def handler(signum, frame):
            _released.set()
            inner(signum, frame)

    return _set_handler(signum, handler)


def main(argv: list[str]) -> int:
    point, count, flag = argv[0].split(":", 2)
    spec = (point, int(count), Path(flag))
    ShardWriter.copy = _after(ShardWriter.copy, "piece", spec)
    Journal.record = _after(Journal.record, "shard-done", spec)
    output.install = _after(_before(output.install, "install", spec), "installed", spec)
    runner.WORKER_COMMAND = (sys.executable, os.path.abspath(__file__), argv[0], "worker")
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal = _releasing
    if argv[1] == "worker":
        from fusemoe_ckpt.batch.worker import main as worker_main

        return worker_main(argv[2:])
    from fusemoe_ckpt.cli import cli

    cli.main(argv[2:], prog_name="fusemoe-ckpt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
