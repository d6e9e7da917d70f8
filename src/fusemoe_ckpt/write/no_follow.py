"""Create, write and remove the paths fusemoe-ckpt keeps beside and inside DST without following links.

The lock file, the partial directory, the replaced directory and everything written into them are
the tool's own. A symbolic link found at one of those names was planted by someone else, and opening
or removing through it would write or delete wherever it points (a planted lock file linking into
SRC would get a SRC file overwritten). So these paths are opened with O_NOFOLLOW and examined with
lstat, and a link is refused by name before anything is written through it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ..errors import DestinationError


def refuse_link(path: Path, what: str) -> None:
    """Refuse `path` when it is a symbolic link (dangling or not).

    Raises:
        DestinationError: naming `path` and `what` fusemoe-ckpt keeps there.
    """
    if os.path.islink(path):
        raise DestinationError(link_refused(path, what))


def link_refused(path: Path, what: str) -> str:
    """The message for a link found where fusemoe-ckpt keeps `what`."""
    return (
        f"{path}: is a symbolic link where fusemoe-ckpt keeps {what}; links there are not followed and "
        "nothing was written through it; remove it"
    )


def refuse_unless_directory(path: Path, what: str) -> bool:
    """Whether `path` is a real directory (False when missing).

    Raises:
        DestinationError: `path` is a link, or something other than a directory.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise DestinationError(link_refused(path, what))
    if not stat.S_ISDIR(st.st_mode):
        raise DestinationError(f"{path}: is not a directory, where fusemoe-ckpt keeps {what}; remove it")
    return True


def remove_tree(path: Path, what: str) -> None:
    """Remove the directory at `path` and everything in it, never through a link; nothing if missing.

    shutil.rmtree itself removes links inside the tree without following them.

    Raises:
        DestinationError: `path` is a link or not a directory.
    """
    if refuse_unless_directory(path, what):
        import shutil  # here: it imports the compression modules, and only removing a tree needs it

        shutil.rmtree(path)


def open_own_file(
    path: Path, what: str, *, exclusive: bool = False, append: bool = False, readable: bool = False
) -> int:
    """A writable descriptor of the regular file at `path`, created if missing (`exclusive`: it must
    be), never opened through a link, never truncated (the caller truncates once it holds the file).

    Raises:
        DestinationError: `path` is a link; it is a FIFO, a device or a directory; or it has other
            hard links (writing would change their file too). The message names `what` is kept there.
        OSError: any other failure to create or open it (a full disk, permissions).
    """
    flags = (os.O_RDWR if readable else os.O_WRONLY) | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= (os.O_EXCL if exclusive else 0) | (os.O_APPEND if append else 0)
    try:
        # O_NONBLOCK: a FIFO planted at the name must not block the open; it is refused below.
        fd = os.open(path, flags | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DestinationError(link_refused(path, what)) from e
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        why = "has other hard links" if stat.S_ISREG(st.st_mode) else "is not a regular file"
        raise DestinationError(f"{path}: {why}, where fusemoe-ckpt keeps {what}; remove it")
    os.set_blocking(fd, True)
    return fd


def write_new_file(path: Path, data: bytes, *, durable: bool, what: str = "its output") -> None:
    """Write `data` to a new file at `path` (see `open_own_file`), flushed to disk when `durable`."""
    write_new_file_parts(path, (data,), durable=durable, what=what)


def write_new_file_parts(path: Path, parts: Iterable[bytes], *, durable: bool, what: str = "its output") -> None:
    """Write `parts` one after another to a new file at `path`, as `write_new_file` writes: a file made
    as it is written, never whole in memory."""
    with os.fdopen(open_own_file(path, what, exclusive=True), "wb") as f:
        for data in parts:
            f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
