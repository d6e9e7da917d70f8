"""Killed, interrupted and concurrent conversions: --resume finishes them bit for bit, a lock keeps
two converts from writing one DST."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fusemoe_ckpt.cli import cli
from fusemoe_ckpt.write.journal import JOURNAL_NAME
from fusemoe_ckpt.write.lock import lock_path

from .conftest import PAUSE_LAUNCHER, QWEN3_CONFIG, expert_tensors, write_checkpoint
from .test_bad_input import one_line_error, partial_of, refuse, snapshot

# Each layer's fused pair (4 experts x 2 x 48 + 4 x 48 bytes) gets a shard of its own: 8 shards or more.
SHARD_LIMIT = "600"
OPTIONS = ["--max-shard-size", SHARD_LIMIT, "--workers", "1"]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """Six layers of four experts over three source shards."""
    return write_checkpoint(tmp_path / "src", expert_tensors(layers=6), shards=3, config=QWEN3_CONFIG)


@pytest.fixture
def reference(src: Path, tmp_path: Path) -> Path:
    """The same conversion, never interrupted."""
    ref = tmp_path / "ref"
    result = CliRunner().invoke(cli, ["convert", "-q", str(src), str(ref), *OPTIONS])
    assert (result.exit_code, result.output) == (0, "")
    return ref


def files_of(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones included) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def start_paused(src: Path, dst: Path, point: str, count: int, *options: str) -> subprocess.Popen:
    """Start `convert SRC DST` in a subprocess and wait until it pauses at `point` for the `count`-th time."""
    flag = dst.parent / f"paused-{point}-{count}"
    env = os.environ | {"PYTHONDONTWRITEBYTECODE": "1"}
    pause = f"{point}:{count}:{flag}"
    command = [sys.executable, PAUSE_LAUNCHER, pause, "cli", "convert", "-q", str(src), str(dst), *OPTIONS, *options]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not flag.exists():
        if process.poll() is not None:
            pytest.fail(f"convert ended before pausing at {point}:{count}: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"convert did not reach {point}:{count}")
        time.sleep(0.02)
    flag.unlink()
    return process


def stop(process: subprocess.Popen, sig: signal.Signals) -> tuple[int, str]:
    """Send `sig`, wait for the process; its exit code and stderr."""
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=30)
    return process.returncode, stderr


def kill_at(src: Path, dst: Path, point: str, count: int, *options: str) -> None:
    """SIGKILL a conversion paused at `point`, and remove the lock file it leaves (a later run would
    remove it, which `refuse` would count as a change; that a stale one never blocks is tested below)."""
    code, _ = stop(start_paused(src, dst, point, count, *options), signal.SIGKILL)
    assert code == -signal.SIGKILL
    lock_path(dst).unlink()


def journaled(dst: Path) -> dict[str, dict]:
    """The shard lines of the journal left in DST's partial directory, by file name."""
    lines = (partial_of(dst) / JOURNAL_NAME).read_text().splitlines()
    assert json.loads(lines[0])["fingerprint"]
    return {entry["shard"]: entry for entry in map(json.loads, lines[1:])}


def resume(src: Path, dst: Path, *options: str) -> str:
    """Run `convert --resume` to success; its summary line."""
    result = CliRunner().invoke(cli, ["convert", str(src), str(dst), *OPTIONS, "--resume", *options])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return result.stdout


@pytest.mark.parametrize(
    ("point", "count"),
    [("piece", 1), ("piece", 9), ("shard-done", 1), ("shard-done", 3), ("install", 1)],
    ids=["first-range", "mid-shard", "after-1-shard", "after-3-shards", "before-rename"],
)
def test_killed_conversion_resumes_to_the_same_bytes(src, reference, tmp_path, point, count):
    """SIGKILL at several points, then --resume: the shards recorded as complete are kept as they are
    (same inode, same mtime), the rest is redone, and every file equals an uninterrupted run's."""
    dst = tmp_path / "dst"
    code, _ = stop(start_paused(src, dst, point, count), signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not dst.exists()
    recorded = journaled(dst)
    shards = sorted(p.name for p in partial_of(dst).glob("*.safetensors"))
    if point == "shard-done":
        assert len(recorded) == count
    if point == "piece":
        # The shard being written is on disk but not recorded: it must be redone, not kept.
        (unrecorded,) = set(shards) - set(recorded)
        if count > 1:
            assert (partial_of(dst) / unrecorded).stat().st_size < (reference / unrecorded).stat().st_size
    if point == "install":
        assert sorted(recorded) == sorted(name for name in files_of(reference) if name.endswith(".safetensors"))
    identity = {name: (partial_of(dst) / name).stat() for name in recorded}

    summary = resume(src, dst)

    assert files_of(dst) == files_of(reference)
    for name, before in identity.items():
        after = (dst / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    kept = f" ({len(recorded)} kept from the interrupted run)" if recorded else ""
    assert f"{len(list(reference.glob('*.safetensors')))} shards{kept}," in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "ref", "src"]


def test_sigterm_and_two_workers(src, reference, tmp_path):
    """SIGTERM (a scheduler's first signal) with two writers mid-shard stops the run as ^C does: the
    completed shards kept, one line, exit 143 (128 + 15, as a shell reports it); --resume finishes."""
    dst = tmp_path / "dst"
    code, stderr = stop(start_paused(src, dst, "piece", 12, "--workers", "2"), signal.SIGTERM)
    assert code == 143
    assert stderr == (
        f"Error: interrupted by SIGTERM; {partial_of(dst)} keeps the completed shards; rerun with --resume to "
        "continue, or remove it\n"
    )
    assert journaled(dst)
    assert not lock_path(dst).exists()
    resume(src, dst, "--workers", "2")
    assert files_of(dst) == files_of(reference)


def test_interrupt_keeps_the_partial_directory_and_says_how_to_resume(src, reference, tmp_path):
    """^C: exit 130, one line naming the partial directory and --resume; then --resume finishes."""
    dst = tmp_path / "dst"
    code, stderr = stop(start_paused(src, dst, "shard-done", 2), signal.SIGINT)
    assert code == 130
    assert stderr == (
        f"Error: interrupted; {partial_of(dst)} keeps the completed shards; rerun with --resume to continue, "
        "or remove it\n"
    )
    assert len(journaled(dst)) == 2
    assert not lock_path(dst).exists()
    resume(src, dst)
    assert files_of(dst) == files_of(reference)


def test_without_resume_a_killed_run_is_reported(src, tmp_path):
    """A plain re-run does not reuse the partial directory; --overwrite without --resume starts over."""
    dst = tmp_path / "dst"
    kill_at(src, dst, "shard-done", 2)
    message = refuse(tmp_path, src, dst, *OPTIONS)
    assert message.startswith(f"{partial_of(dst)}: left by an interrupted conversion; pass --resume")
    result = CliRunner().invoke(cli, ["convert", str(src), str(dst), *OPTIONS, "--overwrite"])
    assert result.exit_code == 0
    assert "kept from the interrupted run" not in result.stdout


@pytest.mark.parametrize(
    "change",
    ["--max-shard-size", "--family", "touched-source"],
)
def test_resume_refuses_a_partial_directory_of_another_plan(src, tmp_path, change):
    """Shards planned from other options or a changed source file are never reused."""
    dst = tmp_path / "dst"
    kill_at(src, dst, "shard-done", 2)
    options = [*OPTIONS, "--resume"]
    if change == "--max-shard-size":
        options += ["--max-shard-size", "700"]
    elif change == "--family":
        options += ["--family", "mixtral"]  # matches no expert key: a copy-through plan
    else:
        shard = src / "model-00002-of-00003.safetensors"
        os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1))
    message = refuse(tmp_path, src, dst, *options)
    assert message == (
        f"{partial_of(dst)}: was written from a different source, family, --max-shard-size or fusemoe-ckpt "
        "version; remove it or pass --overwrite to start over"
    )


def test_resume_with_overwrite_starts_over_a_partial_directory_of_another_plan(src, tmp_path):
    """--resume --overwrite resumes when it can and otherwise starts over, as the refusal advises."""
    dst = tmp_path / "dst"
    kill_at(src, dst, "shard-done", 2)
    summary = resume(src, dst, "--max-shard-size", "700", "--overwrite")
    assert "kept from the interrupted run" not in summary
    assert not partial_of(dst).exists()
    reference = tmp_path / "ref700"
    CliRunner().invoke(cli, ["convert", "-q", str(src), str(reference), *OPTIONS, "--max-shard-size", "700"])
    assert files_of(dst) == files_of(reference)


def test_resume_redoes_shards_changed_or_torn_since(src, reference, tmp_path):
    """A recorded shard rewritten or truncated after the crash, a journal line cut short, a stray file:
    the shard is redone, the stray file dropped, and the output is still exact."""
    dst = tmp_path / "dst"
    stop(start_paused(src, dst, "shard-done", 4), signal.SIGKILL)
    partial = partial_of(dst)
    first, second, third, _ = sorted(journaled(dst))
    (partial / first).write_bytes((partial / first).read_bytes())  # same bytes, new mtime
    with open(partial / second, "r+b") as f:
        f.truncate(100)
    with open(partial / JOURNAL_NAME, "a") as f:
        f.write('{"shard": "model-000')
    (partial / "stray.txt").write_text("not ours")
    summary = resume(src, dst)
    assert "(2 kept from the interrupted run)" in summary
    assert files_of(dst) == files_of(reference)
    assert third in files_of(dst)


def test_resume_without_journal_is_refused(src, tmp_path):
    dst = tmp_path / "dst"
    partial_of(dst).mkdir()
    (partial_of(dst) / "model-00001-of-00009.safetensors").write_bytes(b"old")
    message = refuse(tmp_path, src, dst, "--resume")
    assert message == (
        f"{partial_of(dst)}: has no journal ({JOURNAL_NAME}), so its shards cannot be trusted; "
        "remove it or pass --overwrite to start over"
    )


def test_unflushed_shards_of_another_boot_are_redone(src, reference, tmp_path):
    """Shards recorded by a --no-fsync run are trusted only while the machine has not restarted."""
    dst = tmp_path / "dst"
    stop(start_paused(src, dst, "shard-done", 3, "--no-fsync"), signal.SIGKILL)
    journal = partial_of(dst) / JOURNAL_NAME
    lines = journal.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["durable"] is False
    assert "kept" in resume_copy(src, tmp_path, dst, "same-boot")
    header["boot_id"] = "another-boot"
    journal.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    assert "kept" not in resume(src, dst)
    assert files_of(dst) == files_of(reference)


def resume_copy(src: Path, tmp_path: Path, dst: Path, name: str) -> str:
    """Resume a copy of DST's partial directory into a sibling DST, leaving the original as it is."""
    other = tmp_path / name
    subprocess.run(["cp", "-a", str(partial_of(dst)), str(partial_of(other))], check=True)
    # cp gives the copies new inodes, so point their journal lines at them.
    journal = partial_of(other) / JOURNAL_NAME
    lines = journal.read_text().splitlines()
    fixed = [lines[0]]
    for line in lines[1:]:
        entry = json.loads(line)
        st = (partial_of(other) / entry["shard"]).stat()
        fixed.append(json.dumps(entry | {"inode": st.st_ino, "mtime_ns": st.st_mtime_ns}))
    journal.write_text("\n".join(fixed) + "\n")
    return resume(src, other, "--no-fsync")


def test_resume_without_a_partial_directory_converts(src, reference, tmp_path):
    """--resume is safe to pass always: with nothing to resume it is a plain conversion."""
    dst = tmp_path / "dst"
    assert "kept" not in resume(src, dst)
    assert files_of(dst) == files_of(reference)


# --- the lock ---------------------------------------------------------------------------------------


def test_second_convert_into_the_same_destination_fails_fast(src, reference, tmp_path):
    """While one convert runs, another into the same DST fails at once naming the holder; after a
    SIGKILL the stale lock file does not block, and --resume finishes and removes it."""
    dst = tmp_path / "dst"
    first = start_paused(src, dst, "shard-done", 1)
    started = time.monotonic()
    before = snapshot(tmp_path)
    result = CliRunner().invoke(cli, ["convert", str(src), str(dst), *OPTIONS, "--resume"])
    assert one_line_error(result) == (
        f"{dst}: another convert (process {first.pid}) is writing it and holds {lock_path(dst)}; "
        "wait for it to finish or stop it"
    )
    assert time.monotonic() - started < 5
    assert snapshot(tmp_path) == before
    stop(first, signal.SIGKILL)
    assert lock_path(dst).exists()
    resume(src, dst)
    assert not lock_path(dst).exists()
    assert files_of(dst) == files_of(reference)


def test_lock_held_by_another_process_is_named(src, tmp_path):
    """The lock is the flock, not the file: a held lock refuses, with the pid written in the file."""
    dst = tmp_path / "dst"
    with open(lock_path(dst), "w") as held:
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        message = refuse(tmp_path, src, dst)
    assert message == f"{dst}: another convert (process 4242) is writing it and holds {lock_path(dst)}; " + (
        "wait for it to finish or stop it"
    )


# --- a DST that already holds this conversion -------------------------------------------------------


def test_killed_just_after_the_final_rename_resume_says_complete(src, reference, tmp_path):
    """SIGKILL after the partial directory became DST but before its journal was removed: DST is
    complete, and `convert --resume` (a scheduler's re-run) used to fail with "exists and is not
    empty". It says complete, exits 0, writes nothing and finishes the last step."""
    dst = tmp_path / "dst"
    kill_at(src, dst, "installed", 1)
    assert (dst / JOURNAL_NAME).exists() and not partial_of(dst).exists()
    shards = {p.name: p.stat() for p in dst.glob("*.safetensors")}
    result = CliRunner().invoke(cli, ["convert", str(src), str(dst), *OPTIONS, "--resume"])
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    assert result.stdout == f"already complete: {dst} holds this conversion (13 shards, 3.98 KB); nothing written\n"
    assert files_of(dst) == files_of(reference)
    for name, before in shards.items():
        assert (dst / name).stat().st_mtime_ns == before.st_mtime_ns


def test_a_rerun_with_resume_of_a_finished_conversion_exits_0(src, reference, tmp_path):
    before = snapshot(reference)
    result = CliRunner().invoke(cli, ["convert", "-q", str(src), str(reference), *OPTIONS, "--resume"])
    assert (result.exit_code, result.output) == (0, "")
    assert snapshot(reference) == before


def test_without_resume_the_error_says_dst_is_this_conversion(src, reference, tmp_path):
    message = refuse(tmp_path, src, reference, *OPTIONS)
    assert message == (
        f"{reference}: exists and is not empty: it already holds this conversion of {src}; "
        "pass --resume to accept it as complete, or --overwrite to convert again"
    )


@pytest.mark.parametrize("options", [["--resume"], []], ids=["resume", "plain"])
def test_another_conversion_in_dst_is_still_refused(src, reference, tmp_path, options):
    """Another --max-shard-size plans other shards: DST is not this conversion, resume or not."""
    message = refuse(tmp_path, src, reference, "--max-shard-size", "5GB", *options)
    assert message == f"{reference}: exists and is not empty; pass --overwrite to replace it"


def test_overwrite_with_resume_converts_again(src, reference, tmp_path):
    """--overwrite asks for a new conversion, even of a DST that holds this one (batch relies on it
    to replace a DST whose bytes verify found wrong)."""
    before = {p.name: p.stat().st_ino for p in reference.glob("*.safetensors")}
    result = CliRunner().invoke(cli, ["convert", "-q", str(src), str(reference), *OPTIONS, "--resume", "--overwrite"])
    assert (result.exit_code, result.output) == (0, "")
    assert all((reference / name).stat().st_ino != inode for name, inode in before.items())
