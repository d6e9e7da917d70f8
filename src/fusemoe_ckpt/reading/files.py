"""Open untrusted files safely: regular files only, never blocking on a FIFO or a device."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import CheckpointError, FusemoeError


def open_regular(
    path: Path, *, what: str = "file", error: type[FusemoeError] = CheckpointError, follow_links: bool = True
) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file at `path`, and its stat.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; the type is then
    checked on the open descriptor, so the file cannot be swapped between the check and the read.
    Symlinks are followed (the Hub cache links snapshot files into blobs/), except with
    `follow_links=False`, for the files fusemoe-ckpt itself keeps beside or inside DST.

    Raises:
        error: the file is missing, unreadable, a link not to be followed, or not a regular file
            (CheckpointError by default).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        raise error(f"{path}: {what} not found") from e
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_links:
            raise error(f"{path}: is a symbolic link, which fusemoe-ckpt does not follow here; remove it") from e
        raise error(f"{path}: cannot open: {e.strerror}") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise error(f"{path}: not a regular file")
    return fd, st


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
