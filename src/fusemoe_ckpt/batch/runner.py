"""Convert a model zoo: every entry of a manifest in a process of its own, with a report.

An entry's failure, crash or out-of-memory kill is recorded and the others go on. A finished entry
is skipped on re-run and an interrupted one resumes (worker.py decides which), so running the
same command again after a failure, a time limit or a lost node does only what is left.
"""

from __future__ import annotations

import dataclasses
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

from ..errors import CheckpointError, FusemoeError, Interrupted, UsageError, interrupted_by
from ..reading.json_document import read_json
from ..sizes import format_size
from ..write.workers import default_workers
from .cluster import ALL, Shard, select
from .manifest import Entry, load_manifest

# 2: interrupted entries have their own status and the signal (1 recorded them as failed).
REPORT_VERSION = 2
# What an entry's process runs, followed by the entry as JSON and the file its result goes to.
WORKER_COMMAND = (sys.executable, "-m", "fusemoe_ckpt.batch.worker")
STATUSES = ("converted", "skipped", "failed", "interrupted", "pending")
# Shown in the summary only when some entry has them.
_RARE_STATUSES = ("interrupted", "pending")
# An entry process ended by these stopped at a safe point: run again to resume it.
_INTERRUPTING = (signal.SIGINT, signal.SIGTERM)


class BatchError(FusemoeError):
    """One or more entries of a batch failed or were interrupted; the report says which and why."""


class BatchInterrupted(Interrupted):
    """The batch itself was stopped by ^C or SIGTERM: its running entries were interrupted (keeping
    their completed shards), the rest not started. `result` holds every entry as it ended."""

    def __init__(self, message: str, *, signal: signal.Signals, result: BatchResult) -> None:
        super().__init__(message, signal=signal)
        self.result = result


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
    signal: str | None = None  # the signal that interrupted the entry, e.g. "SIGTERM"
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
            "signal": self.signal,
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
    signal: str | None = None  # the signal that stopped the batch itself, e.g. "SIGTERM"

    @property
    def failed(self) -> list[EntryResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def interrupted(self) -> list[EntryResult]:
        return [r for r in self.results if r.status == "interrupted"]

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
            "signal": self.signal,
            "counts": self.counts(),
            "entries": [r.to_json() for r in self.results],
        }

    def table(self) -> list[str]:
        """The report for people: a row per entry, each error on the line below its row, a summary."""
        rows = [f"{'line':>5}  {'status':<11}  {'seconds':>8}  {'size':>10}  dst"]
        for r in self.results:
            size = format_size(r.bytes) if r.bytes is not None else "-"
            rows.append(f"{r.entry.line:>5}  {r.status:<11}  {r.seconds:>8.1f}  {size:>10}  {r.entry.dst_text}")
            if r.error:
                rows.append(f"{'':>5}  error: {r.error}")
        rows.append(self.summary())
        return rows

    def summary(self) -> str:
        counts = self.counts()
        done = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s] or s not in _RARE_STATUSES)
        where = "" if self.shard.count == 1 else f" (shard {self.shard} by {self.shard_by})"
        return f"{len(self.results)} of {self.manifest_entries} entries{where}: {done}, {self.seconds:.1f} s"

    def raise_if_failed(self) -> None:
        """Raise BatchError when an entry failed or was interrupted: running again is worth it."""
        left = [r for r in self.results if r.status in ("failed", "interrupted")]
        if not left:
            return
        kinds = {r.status for r in left}
        what = "failed" if kinds == {"failed"} else "were interrupted" if kinds == {"interrupted"} else None
        if what is None:
            what = "failed or were interrupted"
            names = ", ".join(f"{r.entry.dst_text} (line {r.entry.line}, {r.status})" for r in left)
        else:
            names = ", ".join(f"{r.entry.dst_text} (line {r.entry.line})" for r in left)
        raise BatchError(f"{len(left)} of {len(self.results)} entries {what}: {names}")


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

    An entry without `workers` gets its share of the CPUs this process may use (see
    `write.workers.default_workers`), so `jobs` entries together use the CPUs a task was given.

    Returns the results whatever they are; `BatchResult.raise_if_failed` raises for failures.

    Raises:
        ManifestError: the manifest is invalid (nothing has run).
        UsageError: `check_bytes` with a `stream` entry, whose source is deleted as it is converted.
        BatchInterrupted: ^C, or SIGTERM where the caller turns it into `Interrupted` (the CLI does,
            with `interrupts.signals_as_interrupts`): the running entries are interrupted, keeping
            their completed shards for the next run, the rest not started, the report written with
            them as `interrupted` and `pending`; `.result` holds it. The scratch folder is removed.
    """
    if jobs < 1:
        raise UsageError(f"jobs must be at least 1, not {jobs}")
    started = time.perf_counter()
    entries, selected = plan_batch(manifest, shard=shard, shard_by=shard_by)
    streamed = next((entry for entry in selected if entry.stream), None)
    if check_bytes and streamed is not None:
        raise UsageError(
            f'{manifest}:{streamed.line}: field "stream": --verify reads the source, which a streamed entry '
            "deletes as it goes; verify a local convert"
        )
    result = BatchResult(Path(manifest).absolute(), shard, shard_by, len(entries), [EntryResult(e) for e in selected])
    lock = threading.Lock()
    children: set[subprocess.Popen] = set()
    stopping = threading.Event()

    def write_report() -> None:
        result.seconds = time.perf_counter() - started
        if report is not None:
            _write_json(Path(report), result.to_json())

    def run_one(outcome: EntryResult, scratch: Path) -> None:
        entry = outcome.entry
        if entry.workers is None:
            workers = default_workers(dequantize=entry.dequantize, sharing=min(jobs, len(result.results)))
            entry = dataclasses.replace(entry, workers=workers)
        if not _run_in_process(outcome, entry, scratch, check_bytes, children, lock, stopping):
            return
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
        except KeyboardInterrupt as e:
            sig = interrupted_by(e)
            _interrupt(children, lock, stopping, sig)
            pool.shutdown(wait=True, cancel_futures=True)
            with lock:
                result.signal = sig.name
                write_report()
            left = result.counts()["pending"]
            raise BatchInterrupted(
                f"batch stopped, {left} of {len(result.results)} entries not run; run the same command again to resume",
                signal=sig,
                result=result,
            ) from None
        pool.shutdown()
    with lock:
        write_report()
    return result


def _run_in_process(
    outcome: EntryResult,
    entry: Entry,
    scratch: Path,
    check_bytes: bool,
    children: set[subprocess.Popen],
    lock: threading.Lock,
    stopping: threading.Event,
) -> bool:
    """Run `entry` in a process of its own and record how it ended in `outcome`; False when the batch
    was stopping and it was not started."""
    result_file = scratch / f"entry-{entry.line}.json"
    command = [*WORKER_COMMAND, json.dumps(entry.to_json()), str(result_file)]
    if check_bytes:
        command.append("--verify")
    started = time.perf_counter()
    with lock:  # under the lock that _interrupt takes: a process is either interrupted or never started
        if stopping.is_set():
            return False
        process = subprocess.Popen(
            command,
            env=_child_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
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
        code = process.returncode
        outcome.status, outcome.error = "failed", _died(code, stderr.decode("utf-8", "replace"))
        if -code in _INTERRUPTING:  # stopped before it could record how: nothing lost, run again
            outcome.status, outcome.signal = "interrupted", signal.Signals(-code).name
        return True
    outcome.status = found["status"]
    outcome.error = found.get("error")
    outcome.signal = found.get("signal")
    outcome.bytes = found.get("bytes")
    outcome.bytes_written = found.get("bytes_written", 0)
    outcome.kept_shards = found.get("kept_shards", 0)
    outcome.warnings = found.get("warnings", [])
    outcome.pushed_to = found.get("pushed_to")
    return True


def _interrupt(
    children: set[subprocess.Popen],
    lock: threading.Lock,
    stopping: threading.Event,
    sig: signal.Signals,
    grace: float = 2.0,
) -> None:
    """Interrupt the running entries with `sig`: each stops at a safe point, keeping its completed
    shards for the next run; start no more.

    A ^C at a terminal reaches the entry processes too (one process group), and Slurm signals every
    process of the job; Kubernetes and `kill` signal this one only. So they get `sig` from us only
    if still running after `grace` seconds (and ignore it if already stopping).
    """
    with lock:
        stopping.set()
        running = list(children)
    deadline = time.monotonic() + grace
    for child in running:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.send_signal(sig)


def _died(code: int, stderr: str) -> str:
    """The error line of an entry process that ended without a result: killed, or crashed."""
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        why = " (out of memory? the kernel's OOM killer sends it)" if -code == signal.SIGKILL else ""
        if -code in _INTERRUPTING:
            why = " before it could record a result"
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
