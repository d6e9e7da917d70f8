"""The destination's lifecycle: checked before anything is written, filled in a hidden partial
directory beside it, renamed into place only when complete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import DestinationError
from ..plan.layout import ConversionPlan, ShardPlan
from ..sizes import format_size
from .journal import JOURNAL_NAME, ShardRecord, completed_shards

PARTIAL_SUFFIX = ".fusemoe-partial"


def partial_path(dst: Path) -> Path:
    """The hidden sibling a conversion into `dst` writes into before renaming it to `dst`."""
    return dst.parent / f".{dst.name}{PARTIAL_SUFFIX}"


def check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse a DST inside SRC (or the reverse), a DST that is a file, or a non-empty DST without overwrite."""
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src or real_dst.is_relative_to(real_src):
        raise DestinationError(f"{dst}: destination is inside the source {src}")
    if real_src.is_relative_to(real_dst):
        raise DestinationError(f"{dst}: destination contains the source {src}")
    check_destination(dst, overwrite)


def check_destination(dst: Path, overwrite: bool) -> None:
    """Refuse a DST that is a file, or that holds something, unless `overwrite`."""
    if dst.exists() and not dst.is_dir():
        raise DestinationError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise DestinationError(f"{dst}: exists and is not empty; pass --overwrite to replace it")


def check_no_partial(partial: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to touch a partial directory left by an interrupted run unless told what to do with it."""
    if partial.exists() and not (resume or overwrite):
        raise DestinationError(
            f"{partial}: left by an interrupted conversion; pass --resume to continue it, "
            "--overwrite to start over, or remove it"
        )


def prepare_partial(
    partial: Path, plan: ConversionPlan, fingerprint: str, *, resume: bool, overwrite: bool, durable: bool
) -> list[ShardRecord]:
    """An empty partial directory, or with `resume` one holding only the shards known complete.

    With both `resume` and `overwrite`, a partial directory that cannot be resumed (another plan, no
    journal) is started over instead of refused: resume where possible, else redo.
    """
    if not partial.exists():
        partial.mkdir()
        return []
    if not resume:
        shutil.rmtree(partial)
        partial.mkdir()
        return []
    if partial.is_symlink() or not partial.is_dir():
        raise DestinationError(f"{partial}: is not a directory; remove it")
    try:
        kept = completed_shards(partial, plan, fingerprint)
    except DestinationError:
        if not overwrite:
            raise
        shutil.rmtree(partial)
        partial.mkdir()
        return []
    keep = {record.filename for record in kept} | {JOURNAL_NAME}
    for entry in partial.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    if durable:
        # Kept shards may come from a run without fsync; the new journal will vouch for them.
        for record in kept:
            fsync_path(partial / record.filename)
    return kept


def check_free_space(parent: Path, shards: list[ShardPlan], extra_bytes: int) -> None:
    """Refuse to start when the shards still to write and `extra_bytes` of other files cannot fit."""
    probe = parent
    while not probe.exists():
        probe = probe.parent
    needed = sum(s.file_size for s in shards) + extra_bytes
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DestinationError(
            f"{parent}: the conversion needs {format_size(needed)} ({needed} bytes) but only "
            f"{format_size(free)} ({free} bytes) is free"
        )


def install(partial: Path, dst: Path) -> None:
    """Move the finished output into place; an existing `dst` is set aside until the move succeeds."""
    if not dst.exists():
        os.rename(partial, dst)
        return
    if not any(dst.iterdir()):
        dst.rmdir()
        os.rename(partial, dst)
        return
    replaced = dst.parent / f".{dst.name}.fusemoe-replaced"
    shutil.rmtree(replaced, ignore_errors=True)
    os.rename(dst, replaced)
    os.rename(partial, dst)
    shutil.rmtree(replaced)


def fsync_path(path: Path) -> None:
    """Flush the file or directory at `path` to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
