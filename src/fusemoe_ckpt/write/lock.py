"""One convert per destination: an flock on a file beside DST, released by the kernel if we die."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import DestinationError
from .no_follow import open_own_file

LOCK_SUFFIX = ".fusemoe-lock"


def lock_path(dst: Path) -> Path:
    """The lock file of destination `dst`: `.DST.fusemoe-lock` beside it."""
    return dst.parent / f".{dst.name}{LOCK_SUFFIX}"


class DestinationLock:
    """Holds an exclusive, non-blocking flock on `lock_path(dst)` while a conversion writes `dst`.

    A lock file left by a killed run does not block: the kernel drops the flock with the process,
    and only the lock, never the file's existence, is tested. The file is removed on release.
    """

    def __init__(self, dst: Path) -> None:
        self.dst = dst
        self.path = lock_path(dst)
        self._fd = -1

    def __enter__(self) -> DestinationLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise at once.

        Raises:
            DestinationError: another process holds it, or the lock file cannot be created.
        """
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise DestinationError(
                    f"{self.dst}: another convert ({who}) is writing it and holds {self.path}; "
                    "wait for it to finish or stop it"
                ) from None
            # A holder may have removed the file between our open and our flock: then we locked a
            # file nobody else will see, and must lock the one at the path instead.
            try:
                same = os.lstat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _open(self) -> int:
        """The lock file, created if missing.

        Raises:
            DestinationError: a link, a special file or a file with other hard links is at the path
                (nothing is written to it: a link planted there must not get its target overwritten
                with a process id), or the file cannot be created.
        """
        try:
            return open_own_file(self.path, "the lock file", readable=True)
        except OSError as e:
            raise DestinationError(f"{self.path}: cannot create the lock file: {e.strerror}") from e

    def release(self) -> None:
        """Remove the lock file, then drop the lock; safe to call twice."""
        if self._fd < 0:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1
