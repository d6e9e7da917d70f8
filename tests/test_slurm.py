"""examples/slurm_batch.sbatch on a real Slurm (tests/slurm_cluster.py): a job array over a small zoo
takes disjoint shares, a broken entry fails only its own task, a resubmission skips what is done,
a task cancelled in the middle of an entry resumes byte for byte, and a time-limit kill is recorded
as `interrupted`. Skipped, saying why, where Slurm is not installed or the tests do not run as root
(scripts/install_slurm.sh installs it; scripts/test.sh runs that)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fusemoe_ckpt.batch.cluster import parse_shard, select
from fusemoe_ckpt.batch.manifest import load_manifest
from fusemoe_ckpt.cli import cli

from .conftest import PAUSE_LAUNCHER, QWEN3_CONFIG, expert_tensors, write_checkpoint
from .slurm_cluster import SlurmCluster, missing_reason
from .test_batch import write_manifest
from .test_resume import files_of

SBATCH = Path(__file__).resolve().parent.parent / "examples" / "slurm_batch.sbatch"
TASKS = 3
# Several shards per entry, one copy thread: an entry can be stopped after its first shard.
SLOW = {"max_shard_size": 600, "workers": 1}


@pytest.fixture(scope="module")
def slurm():
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = SlurmCluster()
    cluster.start()
    yield cluster
    cluster.stop()


def job_environment(root: Path, manifest: Path, *, pause: Path | None = None) -> dict[str, str]:
    """The settings the example reads: the environment to activate, the manifest, where reports and
    logs go; with `pause`, the command runs through tests/pause_launcher.py and waits after the
    entry's first shard, creating the file `pause`."""
    bin_dir = Path(sys.prefix) / "bin"
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != str(bin_dir))
    env = {"MANIFEST": str(manifest), "REPORTS": str(root / "reports"), "LOGS": str(root / "logs")}
    if (bin_dir / "activate").is_file():
        # Not on PATH: only the example's activation of FUSEMOE_VENV can find fusemoe-ckpt.
        env |= {"PATH": path or "/usr/bin:/bin", "FUSEMOE_VENV": sys.prefix}
    else:  # the tests run outside a virtual environment
        env |= {"FUSEMOE_VENV": "", "FUSEMOE_CKPT": f"{sys.executable} -m fusemoe_ckpt"}
    if pause is not None:
        env["FUSEMOE_CKPT"] = f"{sys.executable} {PAUSE_LAUNCHER} shard-done:1:{pause} cli"
    return env


def report_of(root: Path, job: str, task: int = 0) -> dict:
    return json.loads((root / "reports" / f"{job}_{task}.json").read_text())


def log_of(root: Path, job: str, task: int = 0) -> list[str]:
    return (root / "logs" / f"fusemoe-zoo-{job}_{task}.out").read_text().splitlines()


def by_name(report: dict) -> dict[str, dict]:
    return {Path(e["dst"]).name: e for e in report["entries"]}


def wait_for_file(path: Path, slurm: SlurmCluster, job: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        states = {r["JobState"] for r in slurm.jobs(job)}
        assert states <= {"PENDING", "RUNNING", "CONFIGURING"}, f"job {job} is {states} before pausing"
        assert time.monotonic() < deadline, f"job {job} did not pause within {timeout} s\n{slurm.logs()}"
        time.sleep(0.1)


def exit_status(record: dict) -> int:
    return int(record["ExitCode"].split(":")[0])


def test_the_example_array_job_on_a_real_slurm(slurm, tmp_path):
    root = tmp_path
    if " " in str(root) + PAUSE_LAUNCHER + sys.prefix:
        pytest.skip("the example splits FUSEMOE_CKPT on spaces")
    zoo = root / "zoo"
    names = [f"m{i}" for i in range(5)]
    for i, name in enumerate(names):
        write_checkpoint(zoo / name, expert_tensors(layers=1, experts=2 + i), config=QWEN3_CONFIG)
    (zoo / "broken").mkdir()
    (zoo / "broken" / "config.json").write_text(json.dumps(QWEN3_CONFIG))
    manifest = write_manifest(
        zoo / "zoo.jsonl", [{"src": n, "dst": f"out/{n}"} for n in [*names[:2], "broken", *names[2:]]]
    )
    for name in ("cancelled", "timed"):
        write_checkpoint(zoo / name, expert_tensors(layers=6), shards=3, config=QWEN3_CONFIG)
        write_manifest(zoo / f"{name}.jsonl", [{"src": name, "dst": f"out/{name}", **SLOW}])
    reference = root / "reference"
    options = ["--max-shard-size", "600"]
    converted = CliRunner().invoke(cli, ["convert", "-q", str(zoo / "cancelled"), str(reference), *options])
    assert converted.exit_code == 0, converted.output

    # Submitted first: slurmctld checks time limits every 30 s, the wait runs while the rest is tested.
    timed_flag, cancelled_flag = root / "timed-paused", root / "cancelled-paused"
    timed = slurm.sbatch(
        SBATCH, "--array=0", env=job_environment(root, zoo / "timed.jsonl", pause=timed_flag), cwd=root
    )
    cancelled = slurm.sbatch(
        SBATCH, "--array=0", env=job_environment(root, zoo / "cancelled.jsonl", pause=cancelled_flag), cwd=root
    )
    first = slurm.sbatch(SBATCH, f"--array=0-{TASKS - 1}", env=job_environment(root, manifest), cwd=root)
    # The README's resubmission, queued at once: it runs when every task of the first has ended.
    after_first = f"--dependency=afterany:{first}"
    again = slurm.sbatch(SBATCH, f"--array=0-{TASKS - 1}", after_first, env=job_environment(root, manifest), cwd=root)

    # A time limit reached in the middle of an entry. TimeLimit=0 puts it in the past at once: Slurm
    # counts limits in minutes, and a one-minute job would make the test wait a minute more.
    wait_for_file(timed_flag, slurm, timed)
    slurm.run("scontrol", "update", f"JobId={timed}", "TimeLimit=0")

    # scancel in the middle of an entry: interrupted, its first shard kept; resubmitted, it resumes.
    wait_for_file(cancelled_flag, slurm, cancelled)
    slurm.run("scancel", cancelled)
    [record] = slurm.wait(cancelled, timeout=60)
    assert record["JobState"] == "CANCELLED"
    report = report_of(root, cancelled)
    entry = by_name(report)["cancelled"]
    partial = zoo / "out" / ".cancelled.fusemoe-partial"
    assert (entry["status"], entry["signal"]) == ("interrupted", "SIGTERM")
    assert entry["error"] == (
        f"interrupted by SIGTERM; {partial} keeps what was completed; run the batch again to resume"
    )
    assert report["signal"] == "SIGTERM"
    log = log_of(root, cancelled)
    assert log[-2].startswith("1 of 1 entries: 0 converted, 0 skipped, 0 failed, 1 interrupted, ")
    assert log[-1] == (
        "Error: interrupted by SIGTERM; batch stopped, 0 of 1 entries not run; run the same command again to resume"
    )
    assert partial.is_dir()
    resumed = slurm.sbatch(SBATCH, "--array=0", env=job_environment(root, zoo / "cancelled.jsonl"), cwd=root)

    # The array: disjoint and complete shares, the broken entry failing its own task only.
    tasks = slurm.wait(first, timeout=120)
    entries = load_manifest(manifest)
    taken = []
    for record in tasks:
        task = int(record["ArrayTaskId"])
        report = report_of(root, first, task)
        expected = [e.dst_text for e in select(entries, parse_shard(f"{task}/{TASKS}"))]
        assert [str(Path(e["dst"]).relative_to(zoo)) for e in report["entries"]] == expected
        assert report["shard"] == {"index": task, "count": TASKS, "by": "dst"}
        taken += expected
        statuses = {Path(e["dst"]).name: e["status"] for e in report["entries"]}
        assert statuses == {name: "failed" if name == "broken" else "converted" for name in statuses}
        assert (record["JobState"], exit_status(record)) == (
            ("FAILED", 1) if "broken" in statuses else ("COMPLETED", 0)
        ), log_of(root, first, task)
    assert sorted(taken) == sorted(e.dst_text for e in entries)

    # The resubmission: every finished entry skipped, only the broken one tried (and failing) again.
    for record in slurm.wait(again, timeout=60):
        report = report_of(root, again, int(record["ArrayTaskId"]))
        for entry in report["entries"]:
            assert entry["status"] == ("failed" if entry["dst"].endswith("broken") else "skipped"), entry
    # Reports are per job: the first pass's are still there.
    assert len(list((root / "reports").glob(f"{first}_*.json"))) == TASKS

    [record] = slurm.wait(resumed, timeout=60)
    assert (record["JobState"], exit_status(record)) == ("COMPLETED", 0), log_of(root, resumed)
    entry = by_name(report_of(root, resumed))["cancelled"]
    assert entry["status"] == "converted" and entry["kept_shards"] >= 1
    assert 0 < entry["bytes_written"] < entry["bytes"]
    assert files_of(zoo / "out" / "cancelled") == files_of(reference)  # byte for byte an uninterrupted run

    # The time limit: Slurm's SIGTERM, recorded as interrupted, the batch done before KillWait.
    [record] = slurm.wait(timed, timeout=60)
    assert record["JobState"] == "TIMEOUT"
    report = report_of(root, timed)
    entry = by_name(report)["timed"]
    assert (entry["status"], entry["signal"], report["signal"]) == ("interrupted", "SIGTERM", "SIGTERM")
    assert (zoo / "out" / ".timed.fusemoe-partial").is_dir()
    assert log_of(root, timed)[-1].startswith("Error: interrupted by SIGTERM; batch stopped")


def test_the_example_runs_outside_slurm_with_the_variables_slurm_sets(tmp_path):
    """Without Slurm (where the test above is skipped): the script creates its folders, activates the
    environment, names its report and log by job and task, and exits with the batch's status."""
    root = tmp_path
    write_checkpoint(root / "zoo" / "m", expert_tensors(layers=1), config=QWEN3_CONFIG)
    manifest = write_manifest(root / "zoo" / "zoo.jsonl", [{"src": "m", "dst": "out/m"}])
    slurm = {"SLURM_JOB_ID": "43", "SLURM_ARRAY_JOB_ID": "42", "SLURM_ARRAY_TASK_ID": "1"}
    slurm |= {"SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_JOB_NAME": "fusemoe-zoo"}
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    environ |= job_environment(root, manifest) | slurm | {"HF_HOME": str(root / "hf-home")}
    result = subprocess.run(["bash", str(SBATCH)], env=environ, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.stderr, list((root / "logs").glob("*")))
    assert (result.stdout, result.stderr) == ("", "")  # all in the log
    log = log_of(root, "42", 1)
    assert log[-1].startswith("1 of 1 entries: 1 converted, 0 skipped, 0 failed, ")
    assert by_name(report_of(root, "42", 1))["m"]["status"] == "converted"
    # A manifest error: exit 2, the one-line error last in the log.
    manifest.write_text('{"src": "m"}\n')
    result = subprocess.run(["bash", str(SBATCH)], env=environ, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert log_of(root, "42", 1)[-1] == f'Error: {manifest}:1: field "dst" is missing (a local directory)'
