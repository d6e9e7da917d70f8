"""SIGTERM handled as ^C: the signal Slurm (scancel, a time limit, preemption), Kubernetes and
`docker stop` send before SIGKILL becomes an exception, so a run stops at the same safe points."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from .errors import Interrupted


@contextmanager
def signals_as_interrupts(signals: Sequence[signal.Signals] = (signal.SIGTERM,)) -> Iterator[None]:
    """While inside, the first of `signals` to arrive raises `Interrupted` in the main thread, as ^C
    raises KeyboardInterrupt; the previous handlers come back on the way out.

    Only the first raises: a repeat (a batch passing SIGTERM on to entry processes that Slurm already
    signalled, a second scancel) is ignored, so the cleanup the first one started can finish. The
    scheduler's SIGKILL, after its grace period, remains the way to stop at once. Outside the main
    thread, where handlers cannot be set, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def interrupt(signum: int, frame) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise Interrupted(signal=signal.Signals(signum))

    previous = {sig: signal.signal(sig, interrupt) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
