"""Tensor and file names in the order people count them: layers.2 before layers.10."""

from __future__ import annotations

import re
from sys import intern

# ASCII digits: `\d` also matches other scripts' digits, and str.isdigit() also takes '²'.
_NUMBERS = re.compile(r"([0-9]+)")


def natural_key(name: str) -> tuple:
    """Sort key with numbers compared as numbers: layers.2 before layers.10."""
    # split() puts the captured numbers at the odd positions. Sorting computes every key first, and
    # 300k tensor names share a few dozen texts between their numbers: each text is kept once.
    return tuple(int(part) if i % 2 else intern(part) for i, part in enumerate(_NUMBERS.split(name)))
