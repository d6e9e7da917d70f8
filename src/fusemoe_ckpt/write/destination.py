"""The destination's lifecycle: checked before anything is written, filled in a hidden partial
directory beside it, renamed into place only when complete."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import DestinationError
from ..plan.layout import ConversionPlan, ShardPlan
from ..sizes import format_size
from .journal import JOURNAL_NAME, ShardRecord, completed_shards
from .lock import lock_path
from .no_follow import refuse_link, refuse_unless_directory, remove_tree

PARTIAL_SUFFIX = ".fusemoe-partial"
REPLACED_SUFFIX = ".fusemoe-replaced"


def partial_path(dst: Path) -> Path:
    """The hidden sibling a conversion into `dst` writes into before renaming it to `dst`."""
    return dst.parent / f".{dst.name}{PARTIAL_SUFFIX}"


def replaced_path(dst: Path) -> Path:
    """Where an existing `dst` is set aside while the finished output is renamed into its place."""
    return dst.parent / f".{dst.name}{REPLACED_SUFFIX}"


def resolve_destination(dst: Path) -> tuple[Path, list[str]]:
    """`dst` (absolute), or the directory it links to when it is a symbolic link, with a warning.

    The output is written beside the link's target and renamed onto it, so the link keeps pointing
    at the output; replacing the link itself would leave its target behind and break whatever else
    uses it.

    Raises:
        DestinationError: a link that never resolves (a loop).
    """
    if not os.path.islink(dst):
        return dst, []
    target = Path(os.path.realpath(dst))
    if os.path.islink(target):
        raise DestinationError(f"{dst}: is a symbolic link that does not resolve (a loop); remove it or fix it")
    return target, [f"{dst}: is a symbolic link; the output is written to its target {target}"]


def check_paths(src: Path, dst: Path) -> None:
    """Refuse a DST inside SRC (or the reverse), and what `check_destination` refuses."""
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src or real_dst.is_relative_to(real_src):
        raise DestinationError(f"{dst}: destination is inside the source {src}")
    if real_src.is_relative_to(real_dst):
        raise DestinationError(f"{dst}: destination contains the source {src}")
    check_destination(dst)


def check_destination(dst: Path) -> None:
    """Refuse, before anything is written: a DST that is a file or a mount point, and a link (or
    anything but what belongs there) at the lock file, partial directory or replaced directory
    beside it."""
    if dst.exists() and not dst.is_dir():
        raise DestinationError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and is_mount_point(dst):
        # rename() cannot replace a mount point (EBUSY), and the output would have been written on
        # the parent's file system first: refuse before that.
        raise DestinationError(
            f"{dst}: is a mount point, which the finished output cannot be renamed onto; nothing was "
            f"written; convert into a new directory inside it, such as {dst / 'NAME'}"
        )
    refuse_link(lock_path(dst), "the lock file")
    refuse_unless_directory(partial_path(dst), "the partial output")
    refuse_unless_directory(replaced_path(dst), "the replaced output")


def holds_files(dst: Path) -> bool:
    """Whether `dst` exists and is not an empty directory."""
    return os.path.lexists(dst) and (not dst.is_dir() or any(dst.iterdir()))


def refuse_non_empty(dst: Path, overwrite: bool) -> None:
    """Refuse a DST that holds something, unless `overwrite`."""
    if holds_files(dst) and not overwrite:
        raise DestinationError(f"{dst}: exists and is not empty; pass --overwrite to replace it")


def is_mount_point(path: Path) -> bool:
    """Whether the directory `path` is a mount point: another file system than its parent's
    (os.path.ismount), or on Linux any mount the kernel lists, bind mounts of one file system too."""
    if os.path.ismount(path):
        return True
    return os.path.realpath(path) in _mount_points()


def _mount_points() -> set[str]:
    """Mount points of this process's mount namespace, from /proc/self/mountinfo (none elsewhere)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    # The fifth field is the mount point, with space, tab, newline and backslash octal-escaped.
    return {_unescape(line.split(" ")[4]) for line in lines if line.count(" ") >= 4}


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def check_no_partial(partial: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to touch a partial directory left by an interrupted run unless told what to do with it.

    Raises:
        DestinationError: it is there without `resume` or `overwrite`; or it is a link, or not a directory.
    """
    if refuse_unless_directory(partial, "the partial output") and not (resume or overwrite):
        raise DestinationError(
            f"{partial}: left by an interrupted conversion; pass --resume to continue it, "
            "--overwrite to start over, or remove it"
        )


def prepare_partial(
    partial: Path,
    plan: ConversionPlan,
    fingerprint: str,
    *,
    resume: bool,
    overwrite: bool,
    durable: bool,
    keep_files: frozenset[str] = frozenset(),
) -> list[ShardRecord]:
    """An empty partial directory, or with `resume` one holding only the shards known complete
    (and the files named in `keep_files`, records of work done outside it).

    With both `resume` and `overwrite`, a partial directory that cannot be resumed (another plan, no
    journal) is started over instead of refused: resume where possible, else redo.
    """
    # mkdir and the lstat-based checks never follow a link planted at the partial directory's name.
    if not refuse_unless_directory(partial, "the partial output"):
        partial.mkdir()
        return []
    if not resume:
        remove_tree(partial, "the partial output")
        partial.mkdir()
        return []
    try:
        kept = completed_shards(partial, plan, fingerprint)
    except DestinationError:
        if not overwrite:
            raise
        remove_tree(partial, "the partial output")
        partial.mkdir()
        return []
    keep = {record.filename for record in kept} | {JOURNAL_NAME} | keep_files
    for entry in partial.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            import shutil  # here: it imports the compression modules, and only a resume may need it

            shutil.rmtree(entry)
        else:
            entry.unlink()
    if durable:
        # Kept shards may come from a run without fsync; the new journal will vouch for them.
        for record in kept:
            fsync_path(partial / record.filename)
    return kept


def check_free_space(parent: Path, shards: list[ShardPlan], extra_bytes: int, *, needed: int | None = None) -> None:
    """Refuse to start when the shards still to write and `extra_bytes` of other files (or `needed`
    bytes in all, where the caller knows better) cannot fit."""
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if needed is None:
        needed = sum(s.file_size for s in shards) + extra_bytes
    usage = os.statvfs(probe)  # shutil.disk_usage's free bytes, without importing shutil
    free = usage.f_bavail * usage.f_frsize
    if needed > free:
        raise DestinationError(
            f"{parent}: the conversion needs {format_size(needed)} ({needed} bytes) but only "
            f"{format_size(free)} ({free} bytes) is free"
        )


def install(partial: Path, dst: Path) -> None:
    """Move the finished output into place; an existing `dst` is set aside until the move succeeds.

    Raises:
        DestinationError: a rename failed (`dst` is then as it was), or a link is where the replaced
            directory goes.
    """
    try:
        if not os.path.lexists(dst):
            os.rename(partial, dst)
            return
        if not any(dst.iterdir()):
            dst.rmdir()
            os.rename(partial, dst)
            return
        replaced = replaced_path(dst)
        remove_tree(replaced, "the replaced output")  # left by a run killed between the renames
        os.rename(dst, replaced)
        try:
            os.rename(partial, dst)
        except OSError:
            os.rename(replaced, dst)
            raise
    except OSError as e:
        raise DestinationError(f"{dst}: cannot move the finished output into place: {e.strerror}") from e
    remove_tree(replaced, "the replaced output")


def fsync_path(path: Path) -> None:
    """Flush the file or directory at `path` to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
