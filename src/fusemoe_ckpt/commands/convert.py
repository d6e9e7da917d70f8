"""Convert a checkpoint: open, plan, write every shard into a temporary sibling, then rename it into place."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from ..errors import CheckpointError, ConversionInterrupted, DestinationError, FamilyError, UsageError
from ..hooks import pause_point
from ..plan.cast import output_dtype
from ..plan.conversion import ConversionPlan, ShardPlan, natural_key, plan_conversion
from ..reading.source import INDEX_NAME, SourceCheckpoint, open_checkpoint
from ..rules.families import REFUSED, Family, families_matching, family_by_name, family_for_config
from ..sizes import format_size, parse_size
from ..write.journal import JOURNAL_NAME, Journal, ShardRecord, completed_shards, plan_fingerprint
from ..write.lock import DestinationLock
from ..write.writer import DISK_FULL, disk_full_error, write_shard

# Weight files of any format, and their indexes: never copied beside the converted shards.
WEIGHT_EXTENSIONS = ("safetensors", "bin", "pt", "pth", "ckpt", "h5", "msgpack", "gguf", "onnx", "onnx_data", "npz")
_WEIGHT_FILE = re.compile(rf"\.({'|'.join(WEIGHT_EXTENSIONS)})(\.index\.json)?$")
PARTIAL_SUFFIX = ".fusemoe-partial"
# `org/name` as the Hub spells it; tried only when no local path of that name exists.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


@dataclass
class ConvertResult:
    """What a conversion did, for the summary line."""

    destination: Path
    plan: ConversionPlan
    bytes_written: int
    seconds: float
    copied_files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    kept_shards: int = 0
    source_dir: Path | None = None

    @property
    def nothing_to_fuse(self) -> bool:
        return not self.plan.fused_groups

    def summary(self) -> str:
        rate = self.bytes_written / self.seconds / 1e9 if self.seconds > 0 else float("inf")
        kept = f" ({self.kept_shards} kept from the interrupted run)" if self.kept_shards else ""
        return (
            f"{len(self.plan.fused_modules)} layers fused, {self.plan.num_experts} experts, "
            f"{format_size(self.bytes_written)} written in {len(self.plan.shards)} shards{kept}, "
            f"{self.seconds:.1f} s, {rate:.2f} GB/s -> {self.destination}"
        )


def resolve_family(source: SourceCheckpoint, name: str | None) -> Family:
    """`--family` if given, else the family config.json names.

    Raises:
        FamilyError: config.json names no known model type; the message lists the families whose
            expert patterns match the checkpoint's keys.
    """
    if name is not None:
        return family_by_name(name)
    config = source.config or {}
    model_type = config.get("model_type")
    if model_type in REFUSED:
        raise FamilyError(
            f"{source.root}: model_type {model_type!r} is not supported: its transformers rule needs "
            f"{REFUSED[model_type]}"
        )
    family = family_for_config(source.config)
    if family is not None:
        return family
    matching = families_matching(source.tensors)
    hint = (
        f"families whose expert keys match this checkpoint: {', '.join(matching)}"
        if matching
        else "no family's expert keys match this checkpoint"
    )
    what = f"model_type {model_type!r} has no family rule" if source.config else "no config.json to choose a family"
    raise FamilyError(f"{source.root}: {what}; pass --family NAME ({hint})")


def plan_for(
    src: str | os.PathLike,
    *,
    family: str | None = None,
    max_shard_size: str | int = "5GB",
    dtype: str | None = None,
):
    """Open `src` and plan its conversion, touching no tensor bytes.

    Args:
        dtype: "bfloat16", "float16" or "float32" to cast floating tensors to; None keeps them.
    """
    source = open_checkpoint(src)
    chosen = resolve_family(source, family)
    plan = plan_conversion(source, chosen, max_shard_size=parse_size(max_shard_size), dtype=output_dtype(dtype))
    return source, plan


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    family: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    resume: bool = False,
    workers: int | None = None,
    durable: bool = True,
    dtype: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    revision: str | None = None,
    download_progress: bool = True,
) -> ConvertResult:
    """Write the fused checkpoint of `src` to `dst`.

    Args:
        family: a family name; by default chosen from config.json.
        max_shard_size: upper bound of an output shard's tensor bytes ("5GB", or an int).
        overwrite: replace a non-empty `dst`, and discard a partial directory unless `resume`.
        resume: keep the shards an interrupted conversion of the same plan completed; without a
            partial directory, start afresh.
        workers: copy threads; default min(4, CPU count). Shards are written at once, and with fewer
            shards than workers, parts of one shard too.
        durable: fsync every file and directory before recording a shard and before the final rename.
        dtype: "bfloat16", "float16" or "float32": cast floating tensors to it while copying (the
            only path that imports torch); integer, boolean and FP8 tensors are copied untouched.
        progress: called as progress(bytes_just_written, total_bytes), from worker threads.
        revision: branch, tag or commit of a Hub repo id `src`.
        download_progress: show huggingface_hub's progress bars while downloading `src`.

    Raises:
        FusemoeError: bad input or destination, a full disk; `dst` is then left as it was and the
            partial directory removed. HubError when a repo id cannot be downloaded.
        ConversionInterrupted: ^C; the partial directory is kept for `resume`.
    """
    started = time.perf_counter()
    src_path, dst_path = Path(src).absolute(), Path(dst).absolute()
    provenance = {"fusemoe_ckpt_source": str(src)}
    if is_hub_source(src):
        from ..hub.download import download_checkpoint  # huggingface_hub is imported only for Hub sources

        # Before a download that may take hours.
        _check_destination(dst_path, overwrite)
        _check_no_partial(partial_path(dst_path), resume=resume, overwrite=overwrite)
        hub_source = download_checkpoint(str(src), revision=revision, progress=download_progress)
        src_path = hub_source.path
        provenance = {"fusemoe_ckpt_source": hub_source.repo_id, "fusemoe_ckpt_source_revision": hub_source.commit}
    elif revision is not None:
        raise UsageError(f"{src}: a revision applies to a Hub repo id, and this is a local path")
    check_paths(src_path, dst_path, overwrite)
    source, plan = plan_for(src_path, family=family, max_shard_size=max_shard_size, dtype=dtype)
    written, extras, kept = write_plan(
        source,
        plan,
        provenance,
        dst_path,
        overwrite=overwrite,
        resume=resume,
        workers=workers,
        durable=durable,
        progress=progress,
    )
    return ConvertResult(
        destination=dst_path,
        plan=plan,
        bytes_written=written,
        seconds=time.perf_counter() - started,
        copied_files=extras,
        warnings=_warnings(source),
        kept_shards=kept,
        source_dir=src_path,
    )


def write_plan(
    source: SourceCheckpoint,
    plan: ConversionPlan,
    provenance: dict[str, str],
    dst_path: Path,
    *,
    overwrite: bool,
    workers: int | None,
    durable: bool,
    progress: Callable[[int, int], None] | None,
    resume: bool = False,
) -> tuple[int, list[str], int]:
    """Execute `plan` under the destination lock: every shard into a hidden partial directory
    (journaled, so `resume` can keep completed ones), then the index and the other files of the
    source, then one rename into place. Returns (bytes written, files copied, shards kept)."""
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if workers < 1:
        raise UsageError(f"workers must be at least 1, not {workers}")
    extras = _extra_files(source)
    partial = partial_path(dst_path)
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    with DestinationLock(dst_path):
        _check_no_partial(partial, resume=resume, overwrite=overwrite)
        fingerprint = plan_fingerprint(source, plan)
        kept = _prepare_partial(partial, plan, fingerprint, resume=resume, overwrite=overwrite, durable=durable)
        kept_names = {record.filename for record in kept}
        todo = [s for s in plan.shards if s.filename not in kept_names]
        try:
            _check_free_space(dst_path.parent, todo, source.root, extras)
        except DestinationError:
            if not kept:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        journal = None
        try:
            journal = Journal.start(partial, fingerprint, kept, durable=durable)
            try:
                written = _write_shards(partial, plan, todo, journal, workers, durable, progress)
                _write_index(partial / INDEX_NAME, plan, provenance, durable=durable)
                _copy_extras(source.root, partial, extras, durable=durable)
            finally:
                journal.close()
            pause_point("install")
            if durable:
                _fsync_dir(partial)
            _install(partial, dst_path)
            # Removed only after the rename: a kill just before it must leave a resumable directory.
            (dst_path / JOURNAL_NAME).unlink()
            if durable:
                _fsync_dir(dst_path)
        except KeyboardInterrupt as e:
            if journal is None:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            raise ConversionInterrupted(
                f"{partial} keeps the completed shards; rerun with --resume to continue, or remove it"
            ) from e
        except OSError as e:
            shutil.rmtree(partial, ignore_errors=True)
            if e.errno in DISK_FULL:
                raise disk_full_error(Path(e.filename or partial), e) from e
            raise
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return written, extras, len(kept)


def partial_path(dst: Path) -> Path:
    """The hidden sibling a conversion into `dst` writes into before renaming it to `dst`."""
    return dst.parent / f".{dst.name}{PARTIAL_SUFFIX}"


def _check_no_partial(partial: Path, *, resume: bool, overwrite: bool) -> None:
    if partial.exists() and not (resume or overwrite):
        raise DestinationError(
            f"{partial}: left by an interrupted conversion; pass --resume to continue it, "
            "--overwrite to start over, or remove it"
        )


def is_hub_source(src: str | os.PathLike) -> bool:
    """True when `src` names no existing local path but reads as a Hub repo id (`org/name`)."""
    text = os.fspath(src)
    return not Path(text).exists() and looks_like_repo_id(text)


def looks_like_repo_id(text: str) -> bool:
    """True when `text` is spelled as the Hub spells a repo id (`org/name`)."""
    return _REPO_ID.fullmatch(text) is not None and ".." not in text and "--" not in text and not text.endswith(".")


def _prepare_partial(
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
            fd = os.open(partial / record.filename, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return kept


def _write_shards(
    partial: Path,
    plan: ConversionPlan,
    todo: list[ShardPlan],
    journal: Journal,
    workers: int,
    durable: bool,
    progress: Callable[[int, int], None] | None,
) -> int:
    """Write `todo` with `workers` threads, recording each in `journal`; the bytes written.

    On the first error or ^C the other writers are told to stop and queued shards are dropped, so
    the error surfaces promptly instead of after every shard is written.
    """
    total = sum(s.file_size for s in plan.shards)
    todo_bytes = sum(s.file_size for s in todo)
    report = (lambda n: progress(n, total)) if progress else None
    if report is not None and total > todo_bytes:
        report(total - todo_bytes)
    stop = threading.Event()
    # Fewer shards than workers: the spare threads copy parts of the same shard.
    threads = max(1, workers // max(1, len(todo)))

    def write_and_record(shard: ShardPlan) -> None:
        path = partial / shard.filename
        write_shard(path, shard, durable=durable, progress=report, stop=stop, threads=threads)
        journal.record(path)
        pause_point("shard-done", stop)

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for job in [pool.submit(write_and_record, shard) for shard in todo]:
            job.result()
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return todo_bytes


def _copy_extras(root: Path, partial: Path, extras: list[str], *, durable: bool) -> None:
    for relative in extras:
        target = partial / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / relative, target)
        if durable:
            fd = os.open(target, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if target.parent != partial:
                _fsync_dir(target.parent)


def check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse a DST inside SRC (or the reverse), a DST that is a file, or a non-empty DST without overwrite."""
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src or real_dst.is_relative_to(real_src):
        raise DestinationError(f"{dst}: destination is inside the source {src}")
    if real_src.is_relative_to(real_dst):
        raise DestinationError(f"{dst}: destination contains the source {src}")
    _check_destination(dst, overwrite)


def _check_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise DestinationError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise DestinationError(f"{dst}: exists and is not empty; pass --overwrite to replace it")


def _extra_files(source: SourceCheckpoint) -> list[str]:
    """Relative paths of the files to copy as they are: config, tokenizer, card... never weights."""
    extras = []
    for folder, dirnames, filenames in os.walk(source.root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or _WEIGHT_FILE.search(name):
                continue
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                # A FIFO would block the copy and a device would never end; a dangling link has nothing.
                raise CheckpointError(f"{path}: not a regular file; remove it from the source or replace it")
            extras.append(os.path.relpath(path, source.root))
    return sorted(extras, key=natural_key)


def _check_free_space(parent: Path, shards: list[ShardPlan], root: Path, extras: list[str]) -> None:
    """Refuse to start when the shards still to write and the extra files cannot fit."""
    probe = parent
    while not probe.exists():
        probe = probe.parent
    needed = sum(s.file_size for s in shards) + sum((root / e).stat().st_size for e in extras)
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DestinationError(
            f"{parent}: the conversion needs {format_size(needed)} ({needed} bytes) but only "
            f"{format_size(free)} ({free} bytes) is free"
        )


def _write_index(path: Path, plan: ConversionPlan, provenance: dict[str, str], *, durable: bool) -> None:
    index = {
        "metadata": {
            "total_size": plan.total_size,
            "total_parameters": plan.total_parameters,
            "fusemoe_ckpt_version": version("fusemoe-ckpt"),
            "fusemoe_ckpt_family": plan.family.name,
            **provenance,
            "fusemoe_ckpt_fused_layers": len(plan.fused_modules),
            "fusemoe_ckpt_experts": plan.num_experts,
            **({"fusemoe_ckpt_dtype": plan.dtype} if plan.dtype else {}),
        },
        "weight_map": dict(sorted(plan.tensor_to_filename.items(), key=lambda kv: natural_key(kv[0]))),
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
        if durable:
            f.flush()
            os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(partial: Path, dst: Path) -> None:
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


def _warnings(source: SourceCheckpoint) -> list[str]:
    warnings = []
    if source.config and "auto_map" in source.config:
        warnings.append(
            f"{source.root / 'config.json'}: has auto_map (remote code); remote modeling code "
            "expects per-expert weights and will not load the fused layout"
        )
    return warnings
