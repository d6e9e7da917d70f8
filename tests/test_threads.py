"""Items run on a few threads: every item once, at most `workers` at a time, the first failed item's
error raised, and nothing started after it."""

from __future__ import annotations

import threading

import pytest

from fusemoe_ckpt.write.threads import run_threaded


def test_every_item_runs_once_on_at_most_workers_threads():
    lock = threading.Lock()
    running, most, seen = [0], [0], []
    two_at_once = threading.Barrier(2)

    def work(item: int) -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            seen.append(item)
        if item < 2:
            two_at_once.wait(timeout=10)  # items 0 and 1 run at the same time, on two threads
        with lock:
            running[0] -= 1

    run_threaded(work, list(range(6)), workers=2, stop=threading.Event())
    assert sorted(seen) == list(range(6))
    assert most[0] == 2


def test_the_first_failed_item_in_order_is_raised_and_stop_set():
    """Item 1 fails first; item 0 fails after it: item 0's error is the one raised, as futures
    waited for in order raise it."""
    one_failed = threading.Event()
    stop = threading.Event()

    def work(item: int) -> None:
        if item == 0:
            assert one_failed.wait(timeout=10)
            raise ValueError("item 0")
        if item == 1:
            one_failed.set()
            raise ValueError("item 1")

    with pytest.raises(ValueError, match="item 0"):
        run_threaded(work, [0, 1, 2, 3], workers=2, stop=stop)
    assert stop.is_set()


def test_no_item_starts_after_the_error_is_raised():
    """Item 0 fails; item 1, which the thread may take meanwhile, gives up once told to stop;
    item 2 never starts, and the thread is done when the error is raised."""
    started = []
    stop = threading.Event()
    threads = threading.active_count()

    def work(item: int) -> None:
        started.append(item)
        if item == 0:
            raise OSError("disk on fire")
        assert stop.wait(timeout=10)

    with pytest.raises(OSError, match="disk on fire"):
        run_threaded(work, [0, 1, 2], workers=1, stop=stop)
    assert 2 not in started
    assert threading.active_count() == threads  # the running item finished before the error was raised
