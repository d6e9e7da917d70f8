"""Write one output shard: header first, then source byte ranges copied in by the kernel, or, for a
conversion larger than the page cache takes in, assembled in order and written with direct I/O."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from itertools import islice
from pathlib import Path

from ..errors import CheckpointError, DestinationError, FusemoeError
from ..plan.layout import ShardPlan
from ..plan.pieces import Piece, copies
from ..reading.files import open_regular
from .direct import IN_FLIGHT, DirectStream, enable_direct, page_cache_absorbs, preallocate
from .streams import piece_chunks
from .threads import run_threaded
from .writeback import start_writeback

# Bytes moved per system call: large enough to be cheap, small enough for smooth progress.
COPY_CHUNK = 64 * 1024 * 1024
# Buffer of the read/write fallback, the only copy that holds tensor bytes in our memory.
FALLBACK_BUFFER = 8 * 1024 * 1024
# With fsync, the disk is asked to start writing each stretch of this many copied bytes at once
# (WriteBehind): large enough for long sequential writes, small enough to keep the disk busy.
WRITE_BEHIND = 32 * 1024 * 1024
# copy_file_range reports these when it cannot copy between two given files; read/write takes over.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF}
# Conversions larger than the page cache takes in are written with direct I/O where the filesystem
# takes it (write/direct.py, `writes_directly`).
DIRECT_IO = True
# Errors that mean the destination is full or may not grow: reported as such, naming the file.
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

Progress = Callable[[int], None]


class WriteStopped(Exception):
    """Raised inside a shard writer when the conversion was told to stop (another shard failed, or ^C)."""


class WriterState(Enum):
    NEW = "new"
    OPEN = "open"
    FINALIZED = "finalized"


class ShardWriter:
    """Open, copy pieces to their planned offsets, finalize. The file must end at the planned size.

    Pieces are copied at explicit offsets, so several threads may copy different pieces of one shard
    at once; the writer counts what they wrote. With `direct` (where the filesystem takes direct I/O:
    `self.direct` says after `open`), pieces must be copied by one thread in file order, each into
    the direct stream; `durable` still decides the fsync.
    """

    def __init__(
        self,
        path: Path,
        shard: ShardPlan,
        *,
        durable: bool = True,
        stop: threading.Event | None = None,
        direct: bool = False,
        in_flight: int = IN_FLIGHT,
    ) -> None:
        self.path = path
        self.shard = shard
        self.durable = durable
        self.stop = stop
        self.state = WriterState.NEW
        self._fd = -1
        self._written = 0
        self._lock = threading.Lock()
        self._sources: dict[Path, int] = {}
        self._kernel_copy = True
        self._wants_direct = direct
        self._in_flight = in_flight
        self._direct: DirectStream | None = None

    @property
    def direct(self) -> bool:
        return self._direct is not None

    def open(self) -> None:
        self._expect(WriterState.NEW, "open")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.state = WriterState.OPEN
        for tensor in self.shard.tensors:
            for file, _, _ in copies(tensor.pieces):
                if file is not None:
                    self._source_fd(file)
        if self._wants_direct and enable_direct(self._fd):
            preallocate(self._fd, self.shard.file_size, self.path)
            self._direct = DirectStream(self._fd, in_flight=self._in_flight)
        at = 0
        for chunk in self.shard.header_chunks():
            if self._direct is not None:
                self._direct.append(chunk)
            else:
                self._pwrite_all(chunk, at)
            at += len(chunk)
        self._count(at)

    def copy(self, piece: Piece, at: int, progress: Progress | None = None) -> None:
        """Write `piece` at output offset `at`."""
        self._expect(WriterState.OPEN, "copy")
        if self._direct is not None and at != self._direct.position:
            raise RuntimeError(f"{self.path}: direct writes go in file order: byte {at} after {self._direct.position}")
        if piece.file is None or piece.transpose is not None or piece.cast is not None:
            src_fd = self._sources.get(piece.file, -1)
            # Bytes that change on the way pass through our memory, one bounded chunk at a time.
            for data in piece_chunks(src_fd, piece):
                if self._direct is not None:
                    self._direct.append(data)
                else:
                    self._pwrite_all(data, at)
                at += len(data)
                self._count(len(data), progress)
            return
        src_fd = self._sources[piece.file]
        offset, remaining = piece.offset, piece.length
        while remaining:
            if self.stop is not None and self.stop.is_set():
                raise WriteStopped(self.path)
            moved = self._copy_chunk(src_fd, offset, min(remaining, COPY_CHUNK), at)
            if moved == 0:
                raise CheckpointError(
                    f"{piece.file}: ended at byte {offset}, before the {piece.length}-byte range at "
                    f"{piece.offset} its header promises (file changed or truncated during conversion)"
                )
            offset += moved
            at += moved
            remaining -= moved
            self._count(moved, progress)

    def finalize(self) -> None:
        self._expect(WriterState.OPEN, "finalize")
        try:
            if self._written != self.shard.file_size:
                raise FusemoeError(f"{self.path}: wrote {self._written} bytes, planned {self.shard.file_size}")
            if self._direct is not None:
                self._direct.finish()  # the last write is padded to a whole block: cut back to the size
                os.ftruncate(self._fd, self.shard.file_size)
            if self.durable:
                os.fsync(self._fd)
        finally:
            self.close()
        self.state = WriterState.FINALIZED

    def start_writeback(self, offset: int, length: int) -> None:
        """Start writing bytes [offset, offset + length) of the shard to disk, without waiting."""
        if self._fd >= 0 and self._direct is None:
            start_writeback(self._fd, offset, length)

    def close(self) -> None:
        """Release every file descriptor; safe to call at any point, including after an error."""
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _count(self, n: int, progress: Progress | None = None) -> None:
        with self._lock:
            self._written += n
        if progress is not None:
            progress(n)

    def _expect(self, state: WriterState, action: str) -> None:
        if self.state is not state:
            raise RuntimeError(f"cannot {action} a shard writer that is {self.state.value}")

    def _source_fd(self, path: Path) -> int:
        if path not in self._sources:
            self._sources[path] = open_regular(path, what="shard file")[0]
        return self._sources[path]

    def _pwrite_all(self, data: bytes, at: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, at)
            view = view[written:]
            at += written

    def _copy_chunk(self, src_fd: int, offset: int, count: int, at: int) -> int:
        if self._direct is not None:
            return self._direct.append_from(src_fd, offset, count)
        if self._kernel_copy:
            try:
                return os.copy_file_range(src_fd, self._fd, count, offset, at)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                self._kernel_copy = False
        data = os.pread(src_fd, min(count, FALLBACK_BUFFER), offset)
        self._pwrite_all(data, at)
        return len(data)


def writes_directly(nbytes: int) -> bool:
    """Whether a conversion writing `nbytes` writes its shards with direct I/O (where the filesystem
    takes it): when the page cache would not take them in without throttling the writer. Below that,
    the page cache is as fast or faster, fsync or not; above it, its worst runs are far slower
    (benchmarks/direct_ab.py, BENCHMARKS.md section 13)."""
    return DIRECT_IO and not page_cache_absorbs(nbytes)


def placed_pieces(shard: ShardPlan) -> Iterator[tuple[Piece, int]]:
    """Every piece of `shard` with the file offset it is written at, in file order (made as they are
    read: a shard of tiny experts holds a hundred thousand pieces)."""
    at = shard.header_size
    for tensor in shard.tensors:
        for piece in tensor.pieces:
            yield piece, at
            at += piece.out_length


def split_evenly(sizes: Iterable[int], parts: int) -> list[range]:
    """The indexes of pieces of `sizes` bytes cut into at most `parts` runs of consecutive pieces
    holding about equal bytes."""
    sizes = list(sizes)
    total = sum(sizes)
    starts = [0]
    done = 0
    for i, size in enumerate(sizes):
        # A new run starts where the boundary falls nearer this piece's start than its end.
        if i > starts[-1] and len(starts) < parts and done + size / 2 >= total * len(starts) / parts:
            starts.append(i)
        done += size
    return [range(start, stop) for start, stop in zip(starts, [*starts[1:], len(sizes)], strict=True) if stop > start]


def write_shard(
    path: Path,
    shard: ShardPlan,
    *,
    durable: bool,
    progress: Progress | None,
    stop: threading.Event | None = None,
    threads: int = 1,
    shards_at_once: int = 1,
    direct: bool = False,
) -> None:
    """Write `shard` to `path` from start to finish, closing every file on the way out.

    With `direct`, the shard is written with direct I/O where the filesystem
    takes it, with IN_FLIGHT writes in flight shared with the other `shards_at_once` shards being
    written (at least 2 each): the buffers stay about 9 MiB in all.

    With `threads` > 1, runs of the shard's pieces are copied at once: one kernel copy runs on one
    core, so a shard copies faster than `cp` copies a file when cores are free.

    Raises:
        DestinationError: the disk is full, a quota is reached or the file may not grow (EFBIG);
            the message names the file.
        WriteStopped: `stop` was set while copying.
    """
    in_flight = max(2, IN_FLIGHT // max(1, shards_at_once))
    writer = ShardWriter(
        path, shard, durable=durable, stop=stop or threading.Event(), direct=direct, in_flight=in_flight
    )

    # A shard no larger than one stretch gains nothing from early write-back: its fsync follows the copy.
    write_behind = durable and not writer.direct and shard.file_size > WRITE_BEHIND

    def copy_run(run: range) -> None:
        behind = WriteBehind(writer) if write_behind else None
        for piece, at in islice(placed_pieces(shard), run.start, run.stop):
            writer.copy(piece, at, progress)
            if behind is not None:
                behind.copied(at, at + piece.out_length)
        if behind is not None:
            behind.flush()

    try:
        writer.open()
        if progress is not None:
            progress(shard.header_size)
        # Direct writes are assembled in file order by one thread; several are in flight at once.
        runs = split_evenly((piece.out_length for piece, _ in placed_pieces(shard)), 1 if writer.direct else threads)
        if len(runs) <= 1:
            for run in runs:
                copy_run(run)
        else:
            run_threaded(copy_run, runs, workers=len(runs), stop=writer.stop)
        writer.finalize()
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full_error(path, e) from e
        raise
    finally:
        writer.close()


class WriteBehind:
    """Has the disk start writing each stretch of a shard soon after it is copied
    (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: asynchronous, nothing is waited for), so the disk
    works while the copy goes on and the fsync that makes the shard durable has little left to do.
    It only starts write-back early: a shard is still journaled only after its fsync."""

    def __init__(self, writer: ShardWriter) -> None:
        self.writer = writer
        self.start = self.end = -1

    def copied(self, start: int, end: int) -> None:
        """Bytes [start, end) of the shard were just copied (by this thread, in file order)."""
        if start != self.end:
            self.flush()
            self.start = start
        self.end = end
        if self.end - self.start >= WRITE_BEHIND:
            self.flush()

    def flush(self) -> None:
        if self.end > self.start >= 0:
            self.writer.start_writeback(self.start, self.end - self.start)
        self.start = self.end


def disk_full_error(path: Path, error: OSError) -> DestinationError:
    """The one-line error for a write refused for lack of space or a file size limit."""
    name = errno.errorcode.get(error.errno, str(error.errno))
    return DestinationError(f"{path}: cannot write: {error.strerror} ({name})")
