"""One manifest entry, run in a process of its own by `fusemoe-ckpt batch`.

`python -m fusemoe_ckpt.batch.worker ENTRY_JSON RESULT_FILE [--verify]`: skip the entry if DST
already holds its finished conversion, else convert with resume, then push if asked; the outcome
goes to RESULT_FILE as JSON. A crash, a kill or the OOM killer ends only this process: the batch
sees no result file and records the exit status instead.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from ..commands.convert import convert
from ..commands.verify import verify
from ..errors import CheckpointError, DestinationError, interrupted_by, one_line
from ..interrupts import signals_as_interrupts
from ..plan.cast import output_dtype
from ..plan.conversion import plan_for
from ..reading.safetensors_format import read_header
from ..reading.source import INDEX_NAME, read_index, resolve_inside
from ..write.destination import partial_path
from .manifest import Entry

_COMMIT = 40  # hex digits of a full commit id: the only revision a finished Hub output can be checked against


def run_entry(entry: Entry, *, check_bytes: bool = False) -> dict:
    """Skip, or convert (resuming an interrupted run), then push; what happened, as the report's fields.

    Raises:
        FusemoeError: the conversion, the check or the push failed; DST exists and is not this
            entry's conversion and the entry does not say `overwrite`.
    """
    reason = unfinished_reason(entry, check_bytes=check_bytes)
    outcome = {"status": "skipped", "bytes_written": 0, "kept_shards": 0, "warnings": []}
    if reason is not None:
        if _holds_files(entry.dst) and not entry.overwrite:
            raise DestinationError(
                f"{entry.dst}: exists and is not this entry's finished conversion ({reason}); "
                'set "overwrite": true in the manifest to replace it, or remove it'
            )
        # overwrite=True only replaces a DST refused just above unless the entry allows it; with
        # resume it also starts over a partial directory that belongs to another plan.
        result = convert(
            entry.src,
            entry.dst,
            family=entry.family,
            max_shard_size=entry.max_shard_size,
            overwrite=True,
            resume=True,
            workers=entry.workers,
            dtype=entry.dtype,
            dequantize=entry.dequantize,
            revision=entry.revision,
            download_progress=False,
        )
        if check_bytes:
            checked = verify(result.source_dir, entry.dst, family=result.plan.family.name, dtype=entry.dtype)
            checked.raise_if_failed()
        outcome.update(
            status="converted",
            bytes_written=result.bytes_written,
            kept_shards=result.kept_shards,
            warnings=result.warnings,
        )
    if entry.push_to_hub is not None:
        from ..hub.push import push_to_hub  # huggingface_hub is imported only when the Hub is used

        # Again after a skip too: a push that failed last time is retried, and upload_folder skips
        # the files the repo already has.
        pushed = push_to_hub(entry.dst, entry.push_to_hub, private=entry.private or None, progress=False)
        outcome["pushed_to"] = pushed.url
    outcome["bytes"] = _tree_bytes(entry.dst)
    return outcome


def unfinished_reason(entry: Entry, *, check_bytes: bool = False) -> str | None:
    """None when DST holds this entry's finished conversion, else why not, in a few words.

    Convert renames DST into place only once every file is written, so a DST with an index is
    complete. What is checked is that it is *this entry's* conversion. For a local source: the
    plan is recomputed from the source headers and DST's index must map the planned keys to the
    planned shards, each with the planned size and header (dtypes, shapes, offsets), the family
    and dtype as planned. For a Hub source, without downloading (and for a local source since
    removed): the index records the same source (and commit, when the entry pins one), family and
    dtype, and every shard's header holds the keys the index maps to it. With `check_bytes`,
    verify compares every byte as well.

    Raises:
        FusemoeError: the source cannot be read or planned.
    """
    if not entry.dst.is_dir():
        return "it is not a directory" if entry.dst.exists() else "no output yet"
    try:
        weight_map, metadata = read_index(entry.dst / INDEX_NAME)
    except CheckpointError:
        return f"no readable {INDEX_NAME}"
    if "fusemoe_ckpt_family" not in metadata:
        return "not written by fusemoe-ckpt"
    recorded = (
        metadata.get("fusemoe_ckpt_family"),
        metadata.get("fusemoe_ckpt_dtype"),
        metadata.get("fusemoe_ckpt_dequantized") is True,
    )
    # A local source removed after its conversion (to free the space) leaves only what DST records.
    if entry.hub or not Path(entry.src).exists():
        reason = _recorded_reason(entry, weight_map, metadata)
        source = None
        if reason is None and check_bytes:
            if not entry.hub:
                return "the source is gone, so its bytes cannot be verified"
            from ..hub.download import download_checkpoint

            source = download_checkpoint(entry.src, revision=entry.revision, progress=False).path
    else:
        _, plan = plan_for(
            entry.src,
            family=entry.family,
            max_shard_size=entry.max_shard_size,
            dtype=entry.dtype,
            dequantize=entry.dequantize,
        )
        reason = _plan_reason(entry, plan, weight_map, recorded)
        source = entry.src
    if reason is None and check_bytes:
        checked = verify(source, entry.dst, family=recorded[0], dtype=recorded[1])
        if not checked.ok:
            return f"verify found {len(checked.problems)} mismatching keys or files"
    return reason


def _plan_reason(entry: Entry, plan, weight_map: dict[str, str], recorded: tuple) -> str | None:
    if recorded != (plan.family.name, plan.dtype, plan.dequantized):
        planned = f"{plan.family.name}/{plan.dtype}/{plan.dequantized}"
        return f"family/dtype/dequantized {'/'.join(map(str, recorded))} recorded, {planned} planned"
    if weight_map != plan.tensor_to_filename:
        return "its index maps other keys or shards than planned"
    for shard in plan.shards:
        path = entry.dst / shard.filename
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size != shard.file_size or f.read(len(shard.header)) != shard.header:
                    return f"{shard.filename} differs from the planned size or header"
        except OSError:
            return f"{shard.filename} is missing or unreadable"
    return None


def _recorded_reason(entry: Entry, weight_map: dict[str, str], metadata: dict) -> str | None:
    source = metadata.get("fusemoe_ckpt_source")
    if source != entry.src:
        return f"converted from {source}"
    commit = metadata.get("fusemoe_ckpt_source_revision")
    if entry.revision is not None and len(entry.revision) == _COMMIT and entry.revision != commit:
        return f"converted from commit {commit}"
    if entry.family is not None and metadata.get("fusemoe_ckpt_family") != entry.family:
        return f"converted with family {metadata.get('fusemoe_ckpt_family')}"
    if metadata.get("fusemoe_ckpt_dtype") != output_dtype(entry.dtype):
        return f"converted with dtype {metadata.get('fusemoe_ckpt_dtype')}"
    if (metadata.get("fusemoe_ckpt_dequantized") is True) != entry.dequantize:
        return "converted with --dequantize" if entry.dequantize is False else "converted without --dequantize"
    index_path = entry.dst / INDEX_NAME
    for shard in sorted(set(weight_map.values())):
        try:
            header = read_header(resolve_inside(entry.dst, index_path, shard))
        except CheckpointError:
            return f"{shard} is missing or invalid"
        if set(header.tensors) != {key for key, name in weight_map.items() if name == shard}:
            return f"{shard} holds other keys than the index maps to it"
    return None


def _holds_files(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    """Run one entry and write its outcome; the exit status is 0, 1 (failed), or 128 + the signal
    that interrupted it (130 for SIGINT, 143 for SIGTERM)."""
    args = sys.argv[1:] if argv is None else argv
    entry = Entry.from_json(json.loads(args[0]))
    result_file = Path(args[1])
    if hasattr(signal, "SIGXFSZ"):
        # Past a file size limit the write must fail with EFBIG, as in `convert`, not kill the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # SIGTERM (scancel, a time limit, preemption) stops the entry as ^C does. Until the outcome is
    # written a repeated signal (the batch passing on one Slurm already sent) is ignored.
    with signals_as_interrupts((signal.SIGINT, signal.SIGTERM)):
        try:
            outcome = run_entry(entry, check_bytes="--verify" in args[2:])
            code = 0
        except KeyboardInterrupt as e:
            sig = interrupted_by(e)
            partial = partial_path(entry.dst)
            kept = f"{partial} keeps what was completed" if partial.exists() else "nothing was kept"
            # Not convert's own advice (--resume): the batch resumes by itself when run again.
            error = f"interrupted by {sig.name}; {kept}; run the batch again to resume"
            outcome, code = {"status": "interrupted", "signal": sig.name, "error": error}, 128 + sig
        except Exception as e:  # noqa: BLE001 - one entry's error of any kind is recorded, not raised
            outcome, code = {"status": "failed", "error": one_line(e)}, 1
        written = result_file.with_name(result_file.name + ".new")
        written.write_text(json.dumps(outcome), encoding="utf-8")
        os.replace(written, result_file)
    return code


if __name__ == "__main__":
    sys.exit(main())
