"""Tensor and file names in the order people count them: layers.2 before layers.10."""

from __future__ import annotations

import re
from collections.abc import Callable
from sys import intern

# ASCII digits: `\d` also matches other scripts' digits, and str.isdigit() also takes '²'.
_NUMBERS = re.compile(r"([0-9]+)")


def natural_key(name: str) -> tuple:
    """Sort key with numbers compared as numbers: layers.2 before layers.10."""
    # split() puts the captured numbers at the odd positions. Sorting computes every key first, and
    # 300k tensor names share a few dozen texts between their numbers: each text is kept once.
    return tuple(int(part) if i % 2 else intern(part) for i, part in enumerate(_NUMBERS.split(name)))


class FirstError:
    """Of the errors found while taking keys in a checkpoint's own order, the one natural key order
    meets first: the one reported, whatever order the checkpoint stores its keys in (sorting every
    key of a frontier checkpoint first would cost a second and tens of megabytes).

    An error is an exception, or a function that makes it once every key has been seen.
    """

    def __init__(self) -> None:
        self._first: tuple[tuple, Exception | Callable[[], Exception]] | None = None

    def add(self, key: str, error: Exception | Callable[[], Exception]) -> None:
        order = natural_key(key)
        if self._first is None or order < self._first[0]:
            self._first = (order, error)

    def raise_first(self) -> None:
        if self._first is not None:
            error = self._first[1]
            raise error if isinstance(error, Exception) else error()
