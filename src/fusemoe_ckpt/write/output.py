"""Execute a plan into a destination: every shard, the index and the side files, then one rename.

Under the destination lock, shards are written into the hidden partial directory and journaled as
they complete, so `resume` can keep them; the partial directory becomes DST only when complete.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from json.encoder import encode_basestring_ascii
from pathlib import Path

from ..errors import ConversionInterrupted, UsageError, interrupted_by
from ..naming import natural_key
from ..plan.layout import ConversionPlan, ShardPlan
from ..reading.files import open_regular
from ..reading.side_files import side_files
from ..reading.source import CONFIG_NAME, INDEX_NAME, SourceCheckpoint
from ..version import package_version
from .destination import (
    check_free_space,
    check_no_partial,
    fsync_path,
    install,
    partial_path,
    prepare_partial,
)
from .journal import JOURNAL_NAME, Journal, plan_fingerprint
from .lock import DestinationLock
from .no_follow import open_own_file, write_new_file, write_new_file_parts
from .threads import run_threaded
from .workers import default_workers
from .writer import DISK_FULL, disk_full_error, write_shard, writes_directly

# Index text written at a time.
INDEX_CHUNK = 1 << 20
# Bytes of a side file (config.json, tokenizer files) copied at a time, as shutil.copyfileobj would.
SIDE_FILE_CHUNK = 64 * 1024


class ShardHooks:
    """What a caller that supplies the source bytes just in time, or moves finished shards elsewhere,
    does around each shard. These defaults do nothing; with hooks, shards are written one at a time
    in plan order, each with every copy thread."""

    # Entries of the partial directory a resume keeps besides the journal and the shards.
    keep_files: frozenset[str] = frozenset()
    # An identity of the source files for the resume fingerprint, where their mtimes change between runs.
    source_identity: list | None = None

    def start(self, partial: Path, kept: set[str]) -> set[str]:
        """Called once the partial directory is ready, `kept` the shards on disk from an earlier run;
        returns the shards finished elsewhere (not on disk, not to be written again)."""
        return set()

    def space_needed(self, todo: list[ShardPlan], side_bytes: int) -> int:
        """Bytes the rest of the run needs beside DST."""
        return sum(s.file_size for s in todo) + side_bytes

    def before_shard(self, shard: ShardPlan) -> None:
        """Called before `shard` is written: its source bytes must be readable on return."""

    def after_shard(self, shard: ShardPlan, path: Path) -> None:
        """Called once `shard` is written and journaled at `path`."""

    def before_install(self, partial: Path) -> None:
        """Called with everything written, before the partial directory is renamed into place."""


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
    hooks: ShardHooks | None = None,
) -> tuple[int, list[str], int]:
    """Execute `plan` under the destination lock: every shard into a hidden partial directory
    (journaled, so `resume` can keep completed ones), then the index and the other files of the
    source, then one rename into place. Returns (bytes written, files copied, shards kept).

    With `hooks`, shards are written one by one in plan order, the hooks called around each."""
    if workers is None:
        workers = default_workers()
    if workers < 1:
        raise UsageError(f"workers must be at least 1, not {workers}")
    extras = side_files(source)
    partial = partial_path(dst_path)
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    with DestinationLock(dst_path):
        check_no_partial(partial, resume=resume, overwrite=overwrite)
        fingerprint = plan_fingerprint(source, plan, hooks.source_identity if hooks else None)
        kept = prepare_partial(
            partial,
            plan,
            fingerprint,
            resume=resume,
            overwrite=overwrite,
            durable=durable,
            keep_files=hooks.keep_files if hooks else frozenset(),
        )
        kept_names = {record.filename for record in kept}
        journal = None
        try:
            if hooks is not None:
                kept_names |= hooks.start(partial, set(kept_names))
            todo = [s for s in plan.shards if s.filename not in kept_names]
            side_bytes = sum((source.root / e).stat().st_size for e in extras)
            needed = hooks.space_needed(todo, side_bytes) if hooks else None
            check_free_space(dst_path.parent, todo, side_bytes, needed=needed)
        except BaseException:
            if not kept_names:
                _discard(partial)
            raise
        try:
            journal = Journal.start(partial, fingerprint, kept, durable=durable)
            try:
                written = _write_shards(partial, plan, todo, journal, workers, durable, progress, hooks)
                write_index(partial / INDEX_NAME, plan, provenance, durable=durable)
                _copy_side_files(source.root, partial, extras, plan.config, durable=durable)
            finally:
                journal.close()
            if hooks is not None:
                hooks.before_install(partial)
            if durable:
                fsync_path(partial)
            install(partial, dst_path)
            # Removed only after the rename: a kill just before it must leave a resumable directory.
            finish_installed(dst_path)
            if durable:
                fsync_path(dst_path)
        except KeyboardInterrupt as e:
            if journal is None:
                _discard(partial)
                raise
            raise ConversionInterrupted(
                f"{partial} keeps the completed shards; rerun with --resume to continue, or remove it",
                signal=interrupted_by(e),
            ) from e
        except OSError as e:
            _discard(partial)
            if e.errno in DISK_FULL:
                raise disk_full_error(Path(e.filename or partial), e) from e
            raise
        except BaseException:
            _discard(partial)
            raise
    return written, extras, len(kept)


def _discard(partial: Path) -> None:
    """Remove the partial directory of a run that failed, whatever is left of it."""
    import shutil  # here: it imports the compression modules, and only a failed run needs it

    shutil.rmtree(partial, ignore_errors=True)


def finish_installed(dst: Path) -> None:
    """Remove the journal from an output renamed into place: the last step, which a run killed just
    after its final rename left undone (then `convert --resume` finishes it)."""
    (dst / JOURNAL_NAME).unlink(missing_ok=True)  # unlink removes a link itself, never its target


def _write_shards(
    partial: Path,
    plan: ConversionPlan,
    todo: list[ShardPlan],
    journal: Journal,
    workers: int,
    durable: bool,
    progress: Callable[[int, int], None] | None,
    hooks: ShardHooks | None = None,
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
    direct = writes_directly(todo_bytes)
    if hooks is not None:
        for shard in todo:
            hooks.before_shard(shard)
            path = partial / shard.filename
            write_shard(path, shard, durable=durable, progress=report, stop=stop, threads=workers, direct=direct)
            journal.record(path)
            hooks.after_shard(shard, path)
        return todo_bytes
    # Fewer shards than workers: the spare threads copy parts of the same shard.
    threads = max(1, workers // max(1, len(todo)))
    at_once = max(1, min(workers, len(todo)))

    def write_and_record(shard: ShardPlan) -> None:
        path = partial / shard.filename
        write_shard(
            path,
            shard,
            durable=durable,
            progress=report,
            stop=stop,
            threads=threads,
            shards_at_once=at_once,
            direct=direct,
        )
        journal.record(path)

    run_threaded(write_and_record, todo, workers=workers, stop=stop)
    return todo_bytes


def write_index(path: Path, plan: ConversionPlan, provenance: dict[str, str], *, durable: bool) -> None:
    """The safetensors index of `plan`, with the metadata that records how it was made."""
    metadata = {
        "total_size": plan.total_size,
        "total_parameters": plan.total_parameters,
        "fusemoe_ckpt_version": package_version(),
        "fusemoe_ckpt_family": plan.family.name,
        **provenance,
        "fusemoe_ckpt_fused_layers": len(plan.fused_modules),
        "fusemoe_ckpt_experts": plan.num_experts,
        **({"fusemoe_ckpt_dtype": plan.dtype} if plan.dtype else {}),
        **({"fusemoe_ckpt_dequantized": True} if plan.dequantized else {}),
    }
    weight_map = plan.tensor_to_filename
    # A plan's dict is in planning order; a plan of runs (plan/expert_runs.py's ShardsByName) lists its
    # tensors in file order already, and would make every name to sort them.
    in_order = not isinstance(weight_map, dict)
    entries = weight_map.items() if in_order else sorted(weight_map.items(), key=lambda kv: natural_key(kv[0]))
    write_new_file_parts(path, _index_texts(metadata, entries), durable=durable)


def _index_texts(metadata: dict, entries: Iterable[tuple[str, str]]) -> Iterator[bytes]:
    """json.dumps({"metadata": metadata, "weight_map": dict(entries)}, indent=2) + "\n" in parts of
    about INDEX_CHUNK bytes: the index of 300k tensors is not held whole, nor its dict."""
    quote = encode_basestring_ascii  # json.dumps of one string, without its dispatch
    head = json.dumps({"metadata": metadata}, indent=2)
    parts = [head.removesuffix("\n}"), ',\n  "weight_map": {']
    size = 0
    separator = "\n    "
    for name, filename in entries:
        text = f"{separator}{quote(name)}: {quote(filename)}"
        parts.append(text)
        size += len(text)
        separator = ",\n    "
        if size >= INDEX_CHUNK:
            yield "".join(parts).encode("utf-8")
            parts.clear()
            size = 0
    parts.append("}\n}\n" if separator == "\n    " else "\n  }\n}\n")
    yield "".join(parts).encode("utf-8")


def _copy_side_files(root: Path, partial: Path, extras: list[str], config: dict | None, *, durable: bool) -> None:
    """Copy the side files; config.json is written from `config` instead where the plan changes it."""
    for relative in extras:
        target = partial / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative == CONFIG_NAME and config is not None:
            write_new_file(target, (json.dumps(config, indent=2) + "\n").encode("utf-8"), durable=durable)
        else:
            # Opened as the shards are: a file swapped for a FIFO since it was listed cannot block.
            with (
                os.fdopen(open_regular(root / relative)[0], "rb") as source,
                os.fdopen(open_own_file(target, "its output", exclusive=True), "wb") as copy,
            ):
                while chunk := source.read(SIDE_FILE_CHUNK):
                    copy.write(chunk)
                if durable:
                    copy.flush()
                    os.fsync(copy.fileno())
        if durable and target.parent != partial:
            fsync_path(target.parent)
