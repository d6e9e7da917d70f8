"""Convert a model zoo: every entry of a manifest in a process of its own, with a report.

An entry's failure, crash or out-of-memory kill is recorded and the others go on. A finished entry
is skipped on re-run and an interrupted one resumes (worker.py decides which), so running the
same command again after a failure, a time limit or a lost node does only what is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, FusemoeError, UsageError
from ..reading.json_document import read_json
from ..sizes import format_size
from .cluster import ALL, Shard, select
from .manifest import Entry, load_manifest

REPORT_VERSION = 1
# What an entry's process runs, followed by the entry as JSON and the file its result goes to.
WORKER_COMMAND = (sys.executable, "-m", "fusemoe_ckpt.batch.worker")
STATUSES = ("converted", "skipped", "failed", "pending")


class BatchError(FusemoeError):
    """One or more entries of a batch failed; the report says which and why."""


@dataclass
class EntryResult:
    """What happened to one entry: `pending` until its process ends."""

    entry: Entry
    status: str = "pending"
    seconds: float = 0.0
    bytes: int | None = None  # size of every file at DST once converted or skipped
    bytes_written: int = 0  # by this run: less than `bytes` when resumed, 0 when skipped
    kept_shards: int = 0
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    pushed_to: str | None = None

    def to_json(self) -> dict:
        entry = self.entry
        return {
            "line": entry.line,
            "src": entry.src,
            "dst": str(entry.dst),
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "bytes": self.bytes,
            "bytes_written": self.bytes_written,
            "kept_shards": self.kept_shards,
            "error": self.error,
            "warnings": self.warnings,
            "pushed_to": self.pushed_to,
        }


@dataclass
class BatchResult:
    """Every entry of this shard with its outcome, in manifest order."""

    manifest: Path
    shard: Shard
    shard_by: str
    manifest_entries: int
    results: list[EntryResult]
    seconds: float = 0.0

    @property
    def failed(self) -> list[EntryResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        return all(r.status in ("converted", "skipped") for r in self.results)

    def counts(self) -> dict[str, int]:
        return {status: sum(r.status == status for r in self.results) for status in STATUSES}

    def to_json(self) -> dict:
        return {
            "schema_version": REPORT_VERSION,
            "manifest": str(self.manifest),
            "shard": {"index": self.shard.index, "count": self.shard.count, "by": self.shard_by},
            "manifest_entries": self.manifest_entries,
            "seconds": round(self.seconds, 3),
            "counts": self.counts(),
            "entries": [r.to_json() for r in self.results],
        }

    def table(self) -> list[str]:
        """The report for people: a row per entry, each error on the line below its row, a summary."""
        rows = [f"{'line':>5}  {'status':<9}  {'seconds':>8}  {'size':>10}  dst"]
        for r in self.results:
            size = format_size(r.bytes) if r.bytes is not None else "-"
            rows.append(f"{r.entry.line:>5}  {r.status:<9}  {r.seconds:>8.1f}  {size:>10}  {r.entry.dst_text}")
            if r.error:
                rows.append(f"{'':>5}  error: {r.error}")
        rows.append(self.summary())
        return rows

    def summary(self) -> str:
        counts = self.counts()
        done = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s] or s != "pending")
        where = "" if self.shard.count == 1 else f" (shard {self.shard} by {self.shard_by})"
        return f"{len(self.results)} of {self.manifest_entries} entries{where}: {done}, {self.seconds:.1f} s"

    def raise_if_failed(self) -> None:
        if self.failed:
            names = ", ".join(f"{r.entry.dst_text} (line {r.entry.line})" for r in self.failed)
            raise BatchError(f"{len(self.failed)} of {len(self.results)} entries failed: {names}")


def plan_batch(
    manifest: str | os.PathLike, *, shard: Shard = ALL, shard_by: str = "dst"
) -> tuple[list[Entry], list[Entry]]:
    """(every entry of the manifest, the entries of `shard`), validated, nothing run."""
    entries = load_manifest(manifest)
    return entries, select(entries, shard, by=shard_by)


def run_batch(
    manifest: str | os.PathLike,
    *,
    jobs: int = 1,
    shard: Shard = ALL,
    shard_by: str = "dst",
    check_bytes: bool = False,
    report: str | os.PathLike | None = None,
    on_result: Callable[[EntryResult], None] | None = None,
) -> BatchResult:
    """Run the entries of `shard`, `jobs` at a time, each as `python -m fusemoe_ckpt.batch.worker`.

    Args:
        jobs: entries run at once (processes), each with its own `workers` threads.
        shard: which share of the manifest to run (see sharding.py); by default all of it.
        shard_by: "dst" (stable across manifest edits) or "index" (exactly balanced).
        check_bytes: verify every byte of each conversion, and of a finished DST before skipping it.
        report: a JSON file rewritten (atomically) as each entry ends, so a killed batch leaves one.
        on_result: called with each EntryResult as its entry ends, from worker threads, one at a time.

    Returns the results whatever they are; `BatchResult.raise_if_failed` raises for failures.

    Raises:
        ManifestError: the manifest is invalid (nothing has run).
        KeyboardInterrupt: ^C; the running entries are interrupted (their partial output kept for
            the next run), the report written, the rest not started.
    """
    if jobs < 1:
        raise UsageError(f"jobs must be at least 1, not {jobs}")
    started = time.perf_counter()
    entries, selected = plan_batch(manifest, shard=shard, shard_by=shard_by)
    result = BatchResult(Path(manifest).absolute(), shard, shard_by, len(entries), [EntryResult(e) for e in selected])
    lock = threading.Lock()
    children: set[subprocess.Popen] = set()
    stopping = threading.Event()

    def write_report() -> None:
        result.seconds = time.perf_counter() - started
        if report is not None:
            _write_json(Path(report), result.to_json())

    def run_one(outcome: EntryResult, scratch: Path) -> None:
        if stopping.is_set():
            return
        _run_in_process(outcome, scratch, check_bytes, children, lock)
        with lock:
            write_report()
            if on_result is not None:
                on_result(outcome)

    with tempfile.TemporaryDirectory(prefix="fusemoe-batch-") as scratch:
        write_report()
        pool = ThreadPoolExecutor(max_workers=jobs)
        try:
            futures = [pool.submit(run_one, outcome, Path(scratch)) for outcome in result.results]
            for future in futures:
                future.result()
        except KeyboardInterrupt:
            stopping.set()
            _interrupt(children, lock)
            pool.shutdown(wait=True, cancel_futures=True)
            with lock:
                write_report()
            left = result.counts()["pending"]
            raise KeyboardInterrupt(
                f"batch stopped, {left} of {len(result.results)} entries not run; run the same command again to resume"
            ) from None
        pool.shutdown()
    with lock:
        write_report()
    return result


def _run_in_process(
    outcome: EntryResult, scratch: Path, check_bytes: bool, children: set[subprocess.Popen], lock: threading.Lock
) -> None:
    entry = outcome.entry
    result_file = scratch / f"entry-{entry.line}.json"
    command = [*WORKER_COMMAND, json.dumps(entry.to_json()), str(result_file)]
    if check_bytes:
        command.append("--verify")
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=_child_environment(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    with lock:
        children.add(process)
    try:
        _, stderr = process.communicate()
    finally:
        with lock:
            children.discard(process)
    outcome.seconds = time.perf_counter() - started
    try:
        found = read_json(result_file)
    except CheckpointError:
        outcome.status, outcome.error = "failed", _died(process.returncode, stderr.decode("utf-8", "replace"))
        return
    outcome.status = found["status"]
    outcome.error = found.get("error")
    outcome.bytes = found.get("bytes")
    outcome.bytes_written = found.get("bytes_written", 0)
    outcome.kept_shards = found.get("kept_shards", 0)
    outcome.warnings = found.get("warnings", [])
    outcome.pushed_to = found.get("pushed_to")


def _interrupt(children: set[subprocess.Popen], lock: threading.Lock, grace: float = 2.0) -> None:
    """Interrupt the running entries, as ^C does: each keeps its partial output for the next run.

    A ^C at a terminal reaches the entry processes too (one process group); they get a SIGINT of
    ours only if still running after `grace` seconds, so a second one does not cut their cleanup.
    """
    with lock:
        running = list(children)
    deadline = time.monotonic() + grace
    for child in running:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGINT)


def _died(code: int, stderr: str) -> str:
    """The error line of an entry process that ended without a result: killed, or crashed."""
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        why = " (out of memory? the kernel's OOM killer sends it)" if -code == signal.SIGKILL else ""
        return f"the entry's process was killed by {name}{why}; run again to resume it"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else "no message"
    return f"the entry's process exited with status {code} and no result: {last}"


def _child_environment() -> dict[str, str]:
    """This environment, with this copy of fusemoe_ckpt first on the path, so the entry processes
    run the same code as the batch, installed or not."""
    package_root = str(Path(__file__).resolve().parents[2])
    paths = [package_root, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = path.with_name(f".{path.name}.new")
    fresh.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(fresh, path)
