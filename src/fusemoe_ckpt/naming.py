"""Tensor and file names in the order people count them: layers.2 before layers.10."""

from __future__ import annotations

import re

_NUMBERS = re.compile(r"(\d+)")


def natural_key(name: str) -> list:
    """Sort key with numbers compared as numbers: layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in _NUMBERS.split(name)]
