"""Byte sizes as people write them: parsed the way huggingface_hub parses `max_shard_size`."""

from __future__ import annotations

from .errors import UsageError

# Decimal units, exactly as huggingface_hub's `parse_size_to_int` reads them ("5GB" is 5 * 10**9).
SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}


def parse_size(size: str | int) -> int:
    """Bytes in `size`: an integer, or digits followed by TB, GB, MB or KB ("5GB", "0.5MB").

    Raises:
        UsageError: the text is not a positive size.
    """
    if isinstance(size, int):
        value = size
    else:
        text = size.strip()
        unit = text[-2:].upper()
        try:
            if unit in SIZE_UNITS:
                value = int(float(text[:-2].strip()) * SIZE_UNITS[unit])
            else:
                value = int(text)
        except (ValueError, OverflowError) as e:
            raise UsageError(
                f"max shard size {size!r} is not a number of bytes or a number followed by TB, GB, MB or KB"
            ) from e
    if value <= 0:
        raise UsageError(f"max shard size {size!r} must be positive")
    return value


def format_size(nbytes: float) -> str:
    """`nbytes` in the largest decimal unit that keeps it at or above 1 ("4.29 GB")."""
    for unit in ("TB", "GB", "MB", "KB"):
        if nbytes >= SIZE_UNITS[unit]:
            return f"{nbytes / SIZE_UNITS[unit]:.2f} {unit}"
    return f"{int(nbytes)} B"
