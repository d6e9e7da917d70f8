"""The disk's sequential write bandwidth, measured with a checkpoint's own bytes: the physical limit
of any tool that writes the checkpoint durably.

    python3 benchmarks/disk_limit.py SRC_DIR --workdir DIR [--depth 1,4,16,32] [--block 4MiB]

One measurement writes the bytes of SRC_DIR's files (their concatenation, in `--block` pieces) once
into one new file in DIR, preallocated, with O_DIRECT from page-aligned buffers, by `--depth` threads
that each take the next piece: `--depth` writes in flight, as fio's iodepth. Then fdatasync. The
bytes come from the checkpoint (read from the page cache, warmed first), never zeros: this storage
wrote zero blocks 1.5x faster than real data. O_DIRECT bypasses the page cache, so the time is the
disk's. Depth is what saturates a disk: on this VM one write in flight reached 1.1 GB/s, 32 of them
1.95 GB/s, as fio (libaio, iodepth 32, direct) did with random data (2.0 GB/s). The report gives
GB/s for each depth and write size; the best is the limit.

As a module: `measure(files, workdir, depth=..., block=...)` -> GB/s of one run.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import threading
import time
from pathlib import Path

BLOCK = 4 * 1024 * 1024
ALIGN = 4096  # O_DIRECT offsets, lengths and buffers: multiples of the logical block (512 here; 4096 is safe)


def source_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _pieces(files: list[Path], block: int, limit: int | None) -> list[tuple[Path, int, int]]:
    """(file, offset, length) of every `block`-sized piece of the files' bytes, in order, each file's
    last piece shorter; the first `limit` bytes or so when given."""
    pieces: list[tuple[Path, int, int]] = []
    total = 0
    for file in files:
        size = file.stat().st_size
        for offset in range(0, size, block):
            if limit is not None and total >= limit:
                return pieces
            pieces.append((file, offset, min(block, size - offset)))
            total += pieces[-1][2]
    return pieces


def measure(files: list[Path], workdir: Path, *, depth: int, block: int = BLOCK, limit: int | None = None) -> float:
    """GB/s of writing the bytes of `files` (the first `limit` of them, if given) once, `depth`
    O_DIRECT writes in flight, fdatasync included."""
    if block % ALIGN:
        raise ValueError(f"block {block} is not a multiple of {ALIGN}")
    pieces = _pieces(files, block, limit)
    total = sum(length for _, _, length in pieces)
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / "disk-limit.bin"
    target.unlink(missing_ok=True)
    os.sync()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    queue = iter(range(len(pieces)))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def writer() -> None:
        buffer = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT wants
        view = memoryview(buffer)
        sources: dict[Path, int] = {}
        try:
            while not errors:
                with lock:
                    index = next(queue, None)
                if index is None:
                    return
                file, offset, length = pieces[index]
                if file not in sources:
                    sources[file] = os.open(file, os.O_RDONLY)
                if os.preadv(sources[file], [view[:length]], offset) != length:
                    raise OSError(f"{file}: short read at {offset}")
                padded = -(-length // ALIGN) * ALIGN  # a file's last piece: padded, cut back below
                view[length:padded] = bytes(padded - length)
                at, done = index * block, 0
                while done < padded:
                    done += os.pwrite(fd, view[done:padded], at + done)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            for source in sources.values():
                os.close(source)
            view.release()
            buffer.close()

    try:
        os.posix_fallocate(fd, 0, len(pieces) * block)
        started = time.perf_counter()
        threads = [threading.Thread(target=writer) for _ in range(depth)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        os.fdatasync(fd)
        seconds = time.perf_counter() - started
    finally:
        os.close(fd)
        target.unlink(missing_ok=True)
    return total / seconds / 1e9


def warm(files: list[Path]) -> None:
    buffer = bytearray(16 * 1024 * 1024)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def parse_size(text: str) -> int:
    units = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="checkpoint directory whose bytes are written")
    parser.add_argument("--workdir", type=Path, required=True, help="directory on the disk to measure")
    parser.add_argument("--depth", default="1,4,16,32", help="writes in flight to try (default 1,4,16,32)")
    parser.add_argument("--block", default="4MiB", help="bytes per write, a multiple of 4KiB (default 4MiB)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each (default 3)")
    parser.add_argument("--no-warm", action="store_true", help="skip reading the source first (already cached)")
    parser.add_argument(
        "--seconds-to", type=Path, metavar="FILE", help="write the seconds of the last measurement to FILE"
    )
    args = parser.parse_args(argv)
    files = source_files(args.source)
    size = sum(f.stat().st_size for f in files)
    block = parse_size(args.block)
    print(f"source: {args.source} ({size / 1e9:.2f} GB in {len(files)} files); block {block} bytes", flush=True)
    if not args.no_warm:
        warm(files)
    for depth in [int(d) for d in args.depth.split(",")]:
        rates = [measure(files, args.workdir, depth=depth, block=block) for _ in range(args.repeats)]
        if args.seconds_to:
            args.seconds_to.write_text(f"{size / rates[-1] / 1e9}\n")
        median = statistics.median(rates)
        print(f"depth {depth:3d}: median {median:.2f} GB/s (min {min(rates):.2f}, max {max(rates):.2f})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
