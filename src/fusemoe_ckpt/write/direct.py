"""Shards written with direct I/O: their bytes assembled in order into page-aligned buffers and written
past the page cache, several writes in flight.

A conversion larger than the page cache takes in without throttling the writer (`page_cache_absorbs`)
is written this way, fsync or not: past that point a buffered writer runs at the disk's pace with the
kernel's throttling stalls on top, and on some disks write-back runs well below what the disk takes
and varies from run to run (on a 2-CPU VM, a 4 GB durable convert took 2.5 to 7.9 s through the page
cache, 2.5 to 4.9 s written directly; the disk took the same bytes as direct writes in 1.6 to 2.8 s).
Direct writes with a few in flight are what reaches a disk's limit (benchmarks/disk_limit.py).
A smaller conversion stays in the page cache, as fast or faster there (benchmarks/direct_ab.py;
BENCHMARKS.md section 13). A filesystem that refuses direct I/O (tmpfs, some FUSE and network
filesystems) always gets the page cache.

Memory: `in_flight + 1` buffers of `chunk` bytes (9 MiB by default), whatever the shard's size.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections import deque
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from ..libc import errno_of_last_call, libc_function

if TYPE_CHECKING:
    import mmap
    from concurrent.futures import Future

# Offsets, lengths and buffer addresses of direct I/O must be multiples of the device's logical block
# (512 bytes or 4 KiB); 4 KiB suits both, and mmap's buffers start on a page.
ALIGN = 4096
# One write's size. On the disks measured, 1 MiB with 8 writes in flight reached the limit that larger
# writes did (benchmarks/disk_limit.py's sweep), with a ninth of the memory of 4 MiB x 16.
CHUNK = 1024 * 1024
IN_FLIGHT = 8


def page_cache_absorbs(nbytes: int) -> bool:
    """Whether Linux takes `nbytes` of writes into the page cache without slowing the writer down:
    below the midpoint of its dirty-page limits (vm.dirty_background_* and vm.dirty_*, of available
    memory), where it starts throttling writers to the disk's pace. True where the limits cannot be
    read (not Linux).

    Past that point a buffered copy runs at the disk's speed with throttling stalls on top (4 GB
    with `--no-fsync` on a 24 GB VM: 2.4 to 7.7 s), and direct writes are steadier and faster
    (2.6 s), whether or not the shards are then fsynced.
    """
    try:
        available = _meminfo_bytes("MemAvailable")
        limit = _limit("dirty_bytes", "dirty_ratio", available)
        background = _limit("dirty_background_bytes", "dirty_background_ratio", available)
    except (OSError, ValueError):
        return True
    return nbytes <= (limit + background) // 2


def _limit(in_bytes: str, in_percent: str, available: int) -> int:
    value = int(Path("/proc/sys/vm", in_bytes).read_text())
    return value if value else int(Path("/proc/sys/vm", in_percent).read_text()) * available // 100


def _meminfo_bytes(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024
    raise ValueError(f"/proc/meminfo has no {field}")


def enable_direct(fd: int) -> bool:
    """Switch `fd` to direct I/O; False where the OS has none or the filesystem refuses it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | flag)
    except OSError:
        return False
    return True


def preallocate(fd: int, size: int, path: Path) -> None:
    """Reserve the `size` bytes of the file `fd` (at `path`) is about to be written with, before it
    is written directly (Linux's fallocate): each direct write then fills blocks already the file's,
    where otherwise it would allocate them and grow the file as it goes. A 4 GB durable convert on
    this project's 2-CPU VM took 2.81 s reserved against 3.03 s not, paired over 6 rounds
    (benchmarks/direct_ab.py, `reserve=0`); the disk limit is measured into a preallocated file too
    (benchmarks/disk_limit.py).

    Where the filesystem has no fallocate nothing is reserved (glibc's posix_fallocate would write
    the whole file instead).

    Raises:
        OSError: ENOSPC, EDQUOT or EFBIG: the disk cannot hold the file, known before it is written.
    """
    function = libc_function("fallocate", "c_int", "c_int", "c_longlong", "c_longlong")
    if function is None or size <= 0 or function(fd, 0, 0, size) == 0:
        return
    code = errno_of_last_call()
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        raise OSError(code, os.strerror(code), str(path))


class DirectStream:
    """Bytes appended in file order from offset 0, written `chunk` bytes at a time at aligned offsets,
    up to `in_flight` writes at once; `finish` writes the last part padded to ALIGN (the caller then
    truncates the file to its size).

    The first error of a write is raised by the next append or by `finish`.
    """

    def __init__(self, fd: int, *, chunk: int | None = None, in_flight: int = IN_FLIGHT) -> None:
        chunk = chunk or CHUNK
        if chunk % ALIGN or chunk <= 0:
            raise ValueError(f"chunk {chunk} is not a positive multiple of {ALIGN}")
        # Here: only direct writes need them, and concurrent.futures imports logging.
        import mmap
        import queue
        from concurrent.futures import ThreadPoolExecutor

        self._fd = fd
        self._chunk = chunk
        self._buffers = [mmap.mmap(-1, chunk) for _ in range(in_flight + 1)]
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for buffer in self._buffers:
            self._free.put(buffer)
        self._pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="direct-write")
        self._jobs: deque[Future] = deque()
        self._buffer = self._free.get()
        self._view = memoryview(self._buffer)
        self._used = 0
        self._at = 0  # file offset of the current buffer
        self.position = 0  # bytes appended

    def append(self, data) -> None:
        """Append `data` (any bytes-like object)."""
        data = memoryview(data).cast("B")
        while data:
            n = min(len(data), self._chunk - self._used)
            self._view[self._used : self._used + n] = data[:n]
            data = data[n:]
            self._advance(n)

    def append_from(self, fd: int, offset: int, length: int) -> int:
        """Append up to `length` bytes read from `fd` at `offset` straight into the buffers; the bytes
        read, fewer only where the file ends."""
        done = 0
        while done < length:
            n = min(length - done, self._chunk - self._used)
            got = os.preadv(fd, [self._view[self._used : self._used + n]], offset + done)
            if got == 0:
                break
            done += got
            self._advance(got)
        return done

    def finish(self) -> None:
        """Write what is left and wait for every write."""
        if self._used:
            padded = -(-self._used // ALIGN) * ALIGN
            self._view[self._used : padded] = bytes(padded - self._used)
            self._submit(padded)
        while self._jobs:
            self._jobs.popleft().result()

    def close(self) -> None:
        """Wait for writes in flight and release the buffers; safe after an error."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._view.release()
        for buffer in self._buffers:
            with suppress(BufferError):  # a failed write's traceback still views it: freed with it
                buffer.close()

    def _advance(self, n: int) -> None:
        self._used += n
        self.position += n
        if self._used == self._chunk:
            self._submit(self._chunk)

    def _submit(self, length: int) -> None:
        while self._jobs and self._jobs[0].done():
            self._jobs.popleft().result()
        self._view.release()
        self._jobs.append(self._pool.submit(self._write, self._buffer, self._at, length))
        self._at += length
        self._used = 0
        self._buffer = self._free.get()  # waits for a write to finish when all are in flight
        self._view = memoryview(self._buffer)

    def _write(self, buffer: mmap.mmap, at: int, length: int) -> None:
        try:
            with memoryview(buffer) as view:
                view = view[:length]
                while view:
                    written = os.pwrite(self._fd, view, at)
                    view = view[written:]
                    at += written
        finally:
            self._free.put(buffer)
