"""SIGTERM handled as ^C (scancel, a time limit, preemption, a pod's deletion), and the exit codes a
scheduler tells apart: 0 done, 1 worth running again, 2 fix it first, 130/143 interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import fusemoe_ckpt.batch.runner as runner
from fusemoe_ckpt import verify
from fusemoe_ckpt.cli import cli
from fusemoe_ckpt.errors import Interrupted, interrupted_by

from .conftest import PAUSE_LAUNCHER, QWEN3_CONFIG, expert_tensors, write_checkpoint
from .test_batch import entries_of, wait_for, write_manifest

SIGTERM_TWICE = """
import os, signal, time
from fusemoe_ckpt.errors import Interrupted, interrupted_by
from fusemoe_ckpt.interrupts import signals_as_interrupts

before = signal.getsignal(signal.SIGTERM)
with signals_as_interrupts():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # cut short by the handler
        print("not interrupted")
    except Interrupted as e:
        print("interrupted by", interrupted_by(e).name)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeat, during the cleanup the first one started
        time.sleep(0.1)
        print("repeat ignored")
print("handler restored", signal.getsignal(signal.SIGTERM) is before)
"""


def test_sigterm_raises_the_interruption_once_and_the_handler_comes_back():
    """In a process of its own: were the handler missing, SIGTERM would end pytest itself."""
    result = subprocess.run([sys.executable, "-c", SIGTERM_TWICE], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == ["interrupted by SIGTERM", "repeat ignored", "handler restored True"]


def test_a_plain_keyboard_interrupt_is_sigint_and_causes_are_followed():
    assert interrupted_by(KeyboardInterrupt()) == signal.SIGINT
    try:
        try:
            raise Interrupted(signal=signal.SIGTERM)
        except Interrupted as e:
            raise KeyboardInterrupt("wrapped") from e
    except KeyboardInterrupt as wrapped:
        assert interrupted_by(wrapped) == signal.SIGTERM


@pytest.fixture
def two_entries(tmp_path: Path) -> Path:
    root = tmp_path / "zoo"
    for name in ("a", "b"):
        write_checkpoint(root / name, expert_tensors(layers=3), config=QWEN3_CONFIG)
    entries = [{"src": n, "dst": f"out/{n}", "max_shard_size": 600, "workers": 1} for n in ("a", "b")]
    return write_manifest(root / "zoo.jsonl", entries)


@pytest.mark.parametrize("target", ["batch", "group"])
def test_sigterm_stops_a_batch_like_ctrl_c_and_the_next_run_resumes(two_entries, tmp_path, target):
    """SIGTERM to the batch alone (Kubernetes, `kill`: passed on to its entries after a grace period) or
    to every process at once (Slurm's scancel and time limit): the running entry stops keeping its
    completed shards and is recorded `interrupted` with the signal, the rest stays `pending`, the table
    is printed, the scratch folder removed, exit 143; the next run resumes."""
    root = two_entries.parent
    flag, report, scratch = tmp_path / "paused", tmp_path / "report.json", tmp_path / "tmp"
    scratch.mkdir()
    command = [sys.executable, PAUSE_LAUNCHER, f"shard-done:1:{flag}", "cli", "batch", str(two_entries)]
    process = subprocess.Popen(
        [*command, "--report", str(report)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"TMPDIR": str(scratch)},
        start_new_session=True,  # a process group of its own, as a Slurm job step has
    )
    try:
        wait_for(flag, process)
        if target == "batch":
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    assert process.returncode == 143, stderr
    assert stderr.splitlines()[-1] == (
        "Error: interrupted by SIGTERM; batch stopped, 1 of 2 entries not run; run the same command again to resume"
    )
    summary = stdout.splitlines()[-1]
    assert summary.startswith("2 of 2 entries: 0 converted, 0 skipped, 0 failed, 1 interrupted, 1 pending, ")
    partial = root / "out" / ".a.fusemoe-partial"
    document = json.loads(report.read_text())
    assert document["signal"] == "SIGTERM"
    assert document["counts"] == {"converted": 0, "skipped": 0, "failed": 0, "interrupted": 1, "pending": 1}
    a, b = entries_of(report)["a"], entries_of(report)["b"]
    assert (a["status"], a["signal"], a["error"]) == (
        "interrupted",
        "SIGTERM",
        f"interrupted by SIGTERM; {partial} keeps what was completed; run the batch again to resume",
    )
    assert b["status"] == "pending"
    assert partial.is_dir() and not (root / "out" / "b").exists()
    assert list(scratch.iterdir()) == []  # the batch's scratch folder is gone
    flag.unlink()
    result = CliRunner().invoke(cli, ["batch", str(two_entries), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert [e["kept_shards"] > 0 for e in entries_of(report).values()] == [True, False]
    assert all(verify(root / n, root / "out" / n).ok for n in ("a", "b"))


def test_an_entry_process_ended_by_sigterm_is_interrupted_not_failed(two_entries, tmp_path, monkeypatch):
    """An entry process that SIGTERM ends before it can record a result (say, still starting) lost
    nothing: `interrupted`, and the batch exits 1 as for any entry worth running again."""
    suicide = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    monkeypatch.setattr(runner, "WORKER_COMMAND", (sys.executable, "-c", suicide))
    report = tmp_path / "report.json"
    result = CliRunner().invoke(cli, ["batch", str(two_entries), "--report", str(report)])
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[-1] == "Error: 2 of 2 entries were interrupted: out/a (line 1), out/b (line 2)"
    for entry in entries_of(report).values():
        assert (entry["status"], entry["signal"]) == ("interrupted", "SIGTERM")
        assert entry["error"] == (
            "the entry's process was killed by SIGTERM before it could record a result; run again to resume it"
        )


def test_exit_codes_tell_done_from_worth_rerunning_from_fix_it_first(two_entries, tmp_path):
    broken = two_entries.parent / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(QWEN3_CONFIG))
    ok = CliRunner().invoke(cli, ["batch", str(two_entries)])
    assert ok.exit_code == 0, ok.output
    with_broken = write_manifest(tmp_path / "broken.jsonl", [{"src": str(broken), "dst": str(tmp_path / "out")}])
    assert CliRunner().invoke(cli, ["batch", str(with_broken)]).exit_code == 1
    bad = write_manifest(tmp_path / "bad.jsonl", [{"src": str(broken), "dst": "x", "dtype": "fp8"}])
    assert CliRunner().invoke(cli, ["batch", str(bad)]).exit_code == 2
    assert CliRunner().invoke(cli, ["batch", str(two_entries), "--shard", "2/2"]).exit_code == 2
    assert CliRunner().invoke(cli, ["batch", str(two_entries), "--jobs", "0"]).exit_code == 2


@pytest.mark.parametrize("command", ["batch", "convert"])
def test_help_lists_the_exit_codes(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    lines = result.output.splitlines()
    status = lines.index("  Exit status:")
    codes = [line.split()[0] for line in lines[status + 1 :] if line.startswith("    ") and line.split()[0].isdigit()]
    assert codes == ["0", "1", "2", "130", "143"]
    assert "SIGTERM" in result.output and "SIGINT" in result.output
