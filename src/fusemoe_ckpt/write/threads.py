"""Calling a function on items with a few threads at once, stopping at the first error.

What `ThreadPoolExecutor` with its futures waited for in order did here, with plain threads:
importing concurrent.futures (and logging, which it imports) cost a small convert about a tenth
of its start-up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

Item = TypeVar("Item")


def run_threaded(
    function: Callable[[Item], None], items: Sequence[Item], *, workers: int, stop: threading.Event
) -> None:
    """Call `function` on every item, on at most `workers` threads at once, each taking the next item
    in order, and wait for them all.

    Items are waited for in order: the error of the first item that failed is raised once those
    before it are done. Then, or at ^C while waiting, `stop` is set (for the running calls to give
    up), items not started are dropped, and the running calls finish before the error is raised.
    """
    done = [threading.Event() for _ in items]
    errors: list[BaseException | None] = [None] * len(items)
    todo = iter(range(len(items)))
    lock = threading.Lock()
    dropped = False

    def work() -> None:
        while True:
            with lock:
                index = None if dropped else next(todo, None)
            if index is None:
                return
            try:
                function(items[index])
            except BaseException as e:  # noqa: BLE001 - raised by the waiting thread
                errors[index] = e
            finally:
                done[index].set()

    threads = [threading.Thread(target=work) for _ in range(min(workers, len(items)))]
    for thread in threads:
        thread.start()
    try:
        for index, finished in enumerate(done):
            finished.wait()
            error = errors[index]
            if error is not None:
                raise error
    except BaseException:
        with lock:
            dropped = True  # before `stop`: a call that gives up when told to is the last one started
        stop.set()
        raise
    finally:
        for thread in threads:
            thread.join()
