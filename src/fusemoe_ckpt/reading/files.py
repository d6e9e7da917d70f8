"""Open untrusted files safely: regular files only, never blocking on a FIFO or a device."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import CheckpointError

# Largest index or config.json read into memory; a real one is a few megabytes at most.
MAX_TEXT_BYTES = 100_000_000


def open_regular(path: Path, *, what: str = "file") -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file at `path` (symlinks followed), and its stat.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; the type is then
    checked on the open descriptor, so the file cannot be swapped between the check and the read.

    Raises:
        CheckpointError: the file is missing, unreadable, or not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: {what} not found") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {e.strerror}") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file")
    return fd, st


def read_text(path: Path) -> str:
    """The UTF-8 text of the small regular file at `path`.

    Raises:
        CheckpointError: not a regular file, larger than MAX_TEXT_BYTES, or not UTF-8.
    """
    fd, st = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        if st.st_size > MAX_TEXT_BYTES:
            raise CheckpointError(f"{path}: {st.st_size} bytes, more than the {MAX_TEXT_BYTES}-byte limit")
        # At most one byte past the size fstat saw (and never past the limit): read() allocates
        # what it is asked for before it reads.
        raw = f.read(min(st.st_size, MAX_TEXT_BYTES) + 1)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not valid UTF-8: {e}") from e


def read_exact(fd: int, offset: int, length: int, file: Path) -> bytearray:
    """`length` bytes at `offset`, or CheckpointError naming `file` when it ends before them."""
    data = bytearray(length)
    filled = 0
    while filled < length:
        got = os.preadv(fd, [memoryview(data)[filled:]], offset + filled)
        if got == 0:
            raise CheckpointError(
                f"{file}: ended at byte {offset + filled}, inside a {length}-byte range at {offset} its header promises"
            )
        filled += got
    return data
