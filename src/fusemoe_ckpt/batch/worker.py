"""One manifest entry, run in a process of its own by `fusemoe-ckpt batch`.

`python -m fusemoe_ckpt.batch.worker ENTRY_JSON RESULT_FILE [--verify]`: skip the entry if DST
already holds its finished conversion (or, streamed and pushed, records its finished push), else
convert with resume, then push if asked (a streamed entry pushes as it converts); the outcome goes
to RESULT_FILE as JSON. A crash, a kill or the OOM killer ends only this process: the batch
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
from ..errors import DestinationError, interrupted_by, one_line
from ..hub.push_record import PushRecord, finished_push, recorded_push_reason
from ..interrupts import signals_as_interrupts
from ..plan.conversion import plan_for
from ..reading.converted import recorded_metadata
from ..reading.json_document import parse_json
from ..reading.source import INDEX_NAME
from ..write.destination import holds_files, partial_path
from ..write.finished import planned_reason, read_finished, recorded_reason
from .manifest import Entry


def run_entry(entry: Entry, *, check_bytes: bool = False) -> dict:
    """Skip, or convert (resuming an interrupted run), then push; what happened, as the report's fields.

    Raises:
        FusemoeError: the conversion, the check or the push failed; DST exists and is not this
            entry's conversion and the entry does not say `overwrite`.
    """
    reason = unfinished_reason(entry, check_bytes=check_bytes)
    outcome = {"status": "skipped", "bytes_written": 0, "kept_shards": 0, "warnings": []}
    if reason is not None:
        if holds_files(entry.dst) and not entry.overwrite:
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
            stream=entry.stream,
            push_to=entry.push_to_hub if entry.stream else None,
            private=(entry.private or None) if entry.stream else None,
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
    if entry.stream and entry.push_to_hub is not None:
        # Pushed as it was converted: DST's record names the final commit, converted now or before.
        record = finished_push(entry.dst, entry.push_to_hub)
        outcome["pushed_to"] = record.url if isinstance(record, PushRecord) else None
    elif entry.push_to_hub is not None:
        from ..hub.push import push_to_hub  # huggingface_hub is imported only when the Hub is used

        # Again after a skip too: a push that failed last time is retried, and upload_folder skips
        # the files the repo already has.
        pushed = push_to_hub(entry.dst, entry.push_to_hub, private=entry.private or None, progress=False)
        outcome["pushed_to"] = pushed.url
    outcome["bytes"] = _tree_bytes(entry.dst)
    return outcome


def unfinished_reason(entry: Entry, *, check_bytes: bool = False) -> str | None:
    """None when DST holds this entry's finished conversion, else why not, in a few words.

    For a local source the plan is recomputed from the source headers and DST must hold it
    (write/finished.py: planned keys, shards, sizes, headers, family and dtype). For a Hub source,
    without downloading (and for a local source since removed): DST's index records the same source
    (and commit, when the entry pins one), family and dtype, and every shard's header holds the keys
    the index maps to it. A streamed entry that pushes keeps no shards: DST's index records the same
    and its push record the final commit to `push_to_hub` and every shard of the index with its size
    and sha256 (hub/push_record.py). With `check_bytes`, verify compares every byte as well.

    Raises:
        FusemoeError: the source cannot be read or planned.
    """
    # A local source removed after its conversion (to free the space) leaves only what DST records.
    if entry.hub or not Path(entry.src).exists():
        options = {
            "source": entry.src,
            "revision": entry.revision,
            "family": entry.family,
            "dtype": entry.dtype,
            "dequantize": entry.dequantize,
        }
        if entry.stream and entry.push_to_hub is not None:
            # The shards are on the Hub, not in DST: the push record proves them (hub/push_record.py).
            return recorded_push_reason(entry.dst, repo_id=entry.push_to_hub, **options)
        reason = recorded_reason(entry.dst, **options)
        source = None
        if reason is None and check_bytes:
            if not entry.hub:
                return "the source is gone, so its bytes cannot be verified"
            from ..hub.download import download_checkpoint

            source = download_checkpoint(entry.src, revision=entry.revision, progress=False).path
    else:
        found = read_finished(entry.dst)
        if isinstance(found, str):
            # Before planning: a source that cannot be planned is the conversion's error to report.
            return found
        _, plan = plan_for(
            entry.src,
            family=entry.family,
            max_shard_size=entry.max_shard_size,
            dtype=entry.dtype,
            dequantize=entry.dequantize,
        )
        reason = planned_reason(entry.dst, plan)
        source = entry.src
    if reason is None and check_bytes:
        metadata = recorded_metadata(entry.dst / INDEX_NAME)
        checked = verify(
            source, entry.dst, family=metadata.get("fusemoe_ckpt_family"), dtype=metadata.get("fusemoe_ckpt_dtype")
        )
        if not checked.ok:
            return f"verify found {len(checked.problems)} mismatching keys or files"
    return reason


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    """Run one entry and write its outcome; the exit status is 0, 1 (failed), or 128 + the signal
    that interrupted it (130 for SIGINT, 143 for SIGTERM)."""
    args = sys.argv[1:] if argv is None else argv
    entry = Entry.from_json(parse_json(args[0].encode("utf-8"), "the entry argument"))
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
