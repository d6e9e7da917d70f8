"""`fusemoe-ckpt batch`: a zoo with a broken entry, re-runs, shards over several processes, a killed
entry resumed, and the Slurm / Kubernetes variables choosing the same shard as --shard."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fusemoe_ckpt import verify
from fusemoe_ckpt.batch.cluster import parse_shard, select, shard_from_environment
from fusemoe_ckpt.batch.manifest import load_manifest
from fusemoe_ckpt.cli import cli
from fusemoe_ckpt.write.lock import lock_path

from .conftest import MIXTRAL_CONFIG, PAUSE_LAUNCHER, QWEN3_CONFIG, expert_tensors, write_checkpoint
from .test_bad_input import one_line_error, snapshot
from .test_resume import files_of

MIXTRAL_PREFIX = "model.layers.{layer}.block_sparse_moe.experts.{expert}."


def mixtral_tensors(layers: int = 2) -> dict:
    tensors = expert_tensors(layers, prefix=MIXTRAL_PREFIX, names=("w1", "w3", "w2"))
    return {k.replace(".mlp.gate.", ".block_sparse_moe.gate."): v for k, v in tensors.items()}


def write_manifest(path: Path, entries: list[dict | str]) -> Path:
    """One JSON object per line (a string is written as it is: a comment, a blank, a broken line)."""
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries))
    return path


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    """Three tiny models (qwen3_moe over 3 shards, mixtral, qwen3_moe cast to bfloat16) and a
    source with a config but no weights. Paths are relative to the manifest's directory."""
    root = tmp_path / "zoo"
    write_checkpoint(root / "models" / "qwen", expert_tensors(), shards=3, config=QWEN3_CONFIG)
    write_checkpoint(root / "models" / "mixtral", mixtral_tensors(), shards=2, config=MIXTRAL_CONFIG)
    write_checkpoint(root / "models" / "wide", expert_tensors(layers=3, experts=2), config=QWEN3_CONFIG)
    (root / "models" / "broken").mkdir()
    (root / "models" / "broken" / "config.json").write_text(json.dumps(QWEN3_CONFIG))
    return write_manifest(
        root / "zoo.jsonl",
        [
            "# a zoo: one conversion per line",
            {"src": "models/qwen", "dst": "out/qwen", "max_shard_size": 600},
            {"src": "models/mixtral", "dst": "out/mixtral", "family": "mixtral", "workers": 1},
            "",
            {"src": "models/broken", "dst": "out/broken"},
            {"src": "./models/wide", "dst": "out/wide", "dtype": "bfloat16"},
        ],
    )


def batch(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, ["batch", *map(str, args)], env=env)


def statuses(report: Path) -> dict[str, str]:
    """dst (relative to the zoo) -> status, from a JSON report."""
    document = json.loads(report.read_text())
    root = Path(document["manifest"]).parent
    return {str(Path(e["dst"]).relative_to(root)): e["status"] for e in document["entries"]}


def entries_of(report: Path) -> dict[str, dict]:
    document = json.loads(report.read_text())
    return {Path(e["dst"]).name: e for e in document["entries"]}


def test_broken_entry_fails_alone_and_the_report_names_it(zoo, tmp_path):
    report = tmp_path / "report.json"
    result = batch(zoo, "--jobs", "2", "--report", report)
    assert result.exit_code == 1, result.output
    expected_error = one_line_error(
        CliRunner().invoke(cli, ["convert", str(zoo.parent / "models/broken"), str(tmp_path / "x")])
    )
    assert result.stderr.splitlines()[-1] == "Error: 1 of 4 entries failed: out/broken (line 5)"
    document = json.loads(report.read_text())
    assert document["schema_version"] == 2
    assert document["signal"] is None
    assert document["counts"] == {"converted": 3, "skipped": 0, "failed": 1, "interrupted": 0, "pending": 0}
    assert document["shard"] == {"index": 0, "count": 1, "by": "dst"}
    assert [e["line"] for e in document["entries"]] == [2, 3, 5, 6]
    entries = entries_of(report)
    assert entries["broken"]["status"] == "failed"
    assert entries["broken"]["error"] == expected_error
    assert entries["broken"]["bytes"] is None
    for name in ("qwen", "mixtral", "wide"):
        entry = entries[name]
        assert entry["status"] == "converted"
        assert entry["error"] is None
        assert entry["bytes"] == sum(p.stat().st_size for p in Path(entry["dst"]).rglob("*") if p.is_file())
        assert verify(entry["src"], entry["dst"]).ok
    assert len(list((zoo.parent / "out" / "qwen").glob("*.safetensors"))) > 1  # max_shard_size was passed on
    # The table: a header, a row per entry, the error under its row, the summary.
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["line", "status", "seconds", "size", "dst"]
    assert [line.split()[:2] for line in lines[1:4]] == [["2", "converted"], ["3", "converted"], ["5", "failed"]]
    assert lines[4].strip() == f"error: {expected_error}"
    assert lines[5].split()[:2] == ["6", "converted"]
    assert lines[6].startswith("4 of 4 entries: 3 converted, 0 skipped, 1 failed, ")


def test_rerun_skips_finished_entries_and_retries_the_failed_one(zoo, tmp_path):
    report = tmp_path / "report.json"
    first = batch(zoo, "--report", report)
    assert first.exit_code == 1
    bytes_before = {name: e["bytes"] for name, e in entries_of(report).items()}
    out = zoo.parent / "out"
    before = snapshot(out)
    second = batch(zoo, "--report", report)
    assert second.exit_code == 1
    assert statuses(report) == {
        "out/qwen": "skipped",
        "out/mixtral": "skipped",
        "out/broken": "failed",
        "out/wide": "skipped",
    }
    assert snapshot(out) == before  # not a file rewritten, not even touched
    assert {name: e["bytes"] for name, e in entries_of(report).items()} == bytes_before
    assert all(e["bytes_written"] == 0 for e in entries_of(report).values())
    # Fix the broken source: only it is converted.
    write_checkpoint(zoo.parent / "models" / "broken", expert_tensors(layers=1), config=QWEN3_CONFIG)
    third = batch(zoo, "--report", report, "--verify")
    assert third.exit_code == 0, third.output
    assert set(statuses(report).values()) == {"skipped", "converted"}
    assert statuses(report)["out/broken"] == "converted"


def test_a_finished_entry_whose_source_was_removed_is_still_skipped(zoo, tmp_path):
    """Zoo owners delete the per-expert originals once converted: DST's own record then decides.
    (Written `./models/qwen`: a missing `models/qwen` would read as a Hub repo id.)"""
    manifest = write_manifest(zoo, [{"src": "./models/qwen", "dst": "out/qwen"}])
    assert batch(manifest).exit_code == 0
    shutil.rmtree(zoo.parent / "models" / "qwen")
    report = tmp_path / "report.json"
    assert batch(manifest, "--report", report).exit_code == 0
    assert statuses(report) == {"out/qwen": "skipped"}
    # Without the source, its bytes cannot be compared: --verify says so rather than skipping.
    assert batch(manifest, "--report", report, "--verify").exit_code == 1
    assert "(the source is gone, so its bytes cannot be verified)" in entries_of(report)["qwen"]["error"]


def test_a_dst_that_is_not_the_entrys_conversion_is_not_skipped(zoo, tmp_path):
    manifest = write_manifest(zoo, [{"src": "models/qwen", "dst": "out/qwen"}])
    assert batch(manifest).exit_code == 0
    dst = zoo.parent / "out" / "qwen"
    # Other options than the output was written with: refused, with what to do.
    write_manifest(manifest, [{"src": "models/qwen", "dst": "out/qwen", "max_shard_size": 600}])
    report = tmp_path / "report.json"
    assert batch(manifest, "--report", report).exit_code == 1
    assert entries_of(report)["qwen"]["error"] == (
        f"{dst}: exists and is not this entry's finished conversion (its index maps other keys or shards "
        'than planned); set "overwrite": true in the manifest to replace it, or remove it'
    )
    write_manifest(manifest, [{"src": "models/qwen", "dst": "out/qwen", "max_shard_size": 600, "overwrite": True}])
    assert batch(manifest, "--report", report).exit_code == 0
    assert statuses(report) == {"out/qwen": "converted"}
    assert batch(manifest, "--report", report).exit_code == 0
    assert statuses(report) == {"out/qwen": "skipped"}
    # A flipped byte keeps every header: the plan check skips it, --verify does not.
    shard = sorted(dst.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert batch(manifest, "--report", report).exit_code == 0
    assert batch(manifest, "--report", report, "--verify").exit_code == 0
    assert statuses(report) == {"out/qwen": "converted"}  # "overwrite": true lets it redo the entry
    assert verify(zoo.parent / "models" / "qwen", dst).ok


def test_shards_in_parallel_processes_convert_each_entry_exactly_once(tmp_path):
    """Three processes with --shard 0/3, 1/3, 2/3 at once: disjoint, complete, each entry converted once."""
    root = tmp_path / "zoo"
    names = [f"m{i}" for i in range(6)]
    for i, name in enumerate(names):
        write_checkpoint(root / name, expert_tensors(layers=1, experts=2 + i), config=QWEN3_CONFIG)
    manifest = write_manifest(root / "zoo.jsonl", [{"src": n, "dst": f"out/{n}"} for n in names])
    count = 3
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "fusemoe_ckpt", "batch", str(manifest), "--shard", f"{i}/{count}"]
            + ["--report", str(tmp_path / f"report-{i}.json")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
    reports = [statuses(tmp_path / f"report-{i}.json") for i in range(count)]
    taken = [dst for report in reports for dst in report]
    assert sorted(taken) == sorted(f"out/{n}" for n in names)  # complete, and no entry twice
    assert all(status == "converted" for report in reports for status in report.values())
    for i, report in enumerate(reports):
        expected = [e.dst_text for e in select(load_manifest(manifest), parse_shard(f"{i}/{count}"))]
        assert list(report) == expected


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_entries_killed_mid_run_are_recorded_and_resume_on_rerun(tmp_path):
    """SIGKILL each entry's process after its first shard (as the OOM killer would): the batch goes
    on, reports both as killed, and a re-run keeps their completed shards and finishes them exactly."""
    root = tmp_path / "zoo"
    for name in ("a", "b"):
        write_checkpoint(root / name, expert_tensors(layers=6), shards=3, config=QWEN3_CONFIG)
    options = {"max_shard_size": 600, "workers": 1}
    manifest = write_manifest(root / "zoo.jsonl", [{"src": n, "dst": f"out/{n}", **options} for n in ("a", "b")])
    reference = tmp_path / "reference"
    CliRunner().invoke(cli, ["convert", "-q", str(root / "a"), str(reference), "--max-shard-size", "600"])
    flag = tmp_path / "paused"
    report = tmp_path / "report.json"
    command = [
        sys.executable,
        PAUSE_LAUNCHER,
        f"shard-done:1:{flag}",
        "cli",
        "batch",
        str(manifest),
        "--report",
        str(report),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name in ("a", "b"):  # one entry at a time (--jobs 1), in manifest order
        wait_for(flag, process)
        flag.unlink()
        pid = int(lock_path(root / "out" / name).read_text())
        os.kill(pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    for entry in entries_of(report).values():
        assert entry["status"] == "failed"
        assert entry["error"] == (
            "the entry's process was killed by SIGKILL (out of memory? the kernel's OOM killer sends it); "
            "run again to resume it"
        )
    result = batch(manifest, "--report", report)
    assert result.exit_code == 0, result.output
    for name, entry in entries_of(report).items():
        assert entry["status"] == "converted"
        assert entry["kept_shards"] == 1
        assert 0 < entry["bytes_written"] < entry["bytes"]
        assert verify(root / name, root / "out" / name).ok
        # Byte for byte an uninterrupted run's files (the index differs only in the source it records).
        shards = {k: v for k, v in files_of(root / "out" / name).items() if k.endswith(".safetensors")}
        assert shards == {k: v for k, v in files_of(reference).items() if k.endswith(".safetensors")}


SLURM_AND_K8S = [
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}, "2/4"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}, "2/4"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}, "0/3"),
    (
        {"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_MAX": "16"}
        | {"SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "4"},
        "2/4",
    ),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_MAX": "7"}, "0/3"),
    ({"JOB_COMPLETION_INDEX": "1", "FUSEMOE_SHARD_COUNT": "3"}, "1/3"),
]


@pytest.mark.parametrize(("environ", "flag"), SLURM_AND_K8S, ids=lambda v: v if isinstance(v, str) else None)
def test_cluster_variables_pick_the_same_shard_as_the_flag(zoo, environ, flag):
    shard = shard_from_environment(environ)
    assert (shard.index, shard.count) == (parse_shard(flag).index, parse_shard(flag).count)
    entries = load_manifest(zoo)
    for by in ("dst", "index"):
        assert select(entries, shard, by=by) == select(entries, parse_shard(flag), by=by)
    # Through the command line too: the same entries listed.
    cleared = dict.fromkeys(["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"])
    from_env = batch(zoo, "--dry-run", "--shard-by", "index", env=cleared | environ)
    from_flag = batch(zoo, "--dry-run", "--shard-by", "index", "--shard", flag, env=cleared)
    assert from_env.exit_code == from_flag.exit_code == 0, from_env.output
    assert from_env.stdout.splitlines()[:-1] == from_flag.stdout.splitlines()[:-1]
    assert not (zoo.parent / "out").exists()


def test_dry_run_runs_all_entries_outside_a_cluster(zoo):
    result = batch(zoo, "--dry-run", env=dict.fromkeys(["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"]))
    assert result.exit_code == 0
    assert result.stdout.splitlines()[-1] == "4 of 4 entries in shard 0/1 (default, by dst)"
    assert f"{zoo.parent / 'models' / 'qwen'} -> {zoo.parent / 'out' / 'qwen'}" in result.stdout


@pytest.mark.parametrize(
    ("environ", "args", "message"),
    [
        ({}, ["--shard", "3/3"], "--shard '3/3' is not I/N with 0 <= I < N, e.g. 0/4"),
        ({}, ["--shard", "one"], "--shard 'one' is not I/N with 0 <= I < N, e.g. 0/4"),
        (
            {"JOB_COMPLETION_INDEX": "0"},
            [],
            "JOB_COMPLETION_INDEX is set but FUSEMOE_SHARD_COUNT is not; set it to the Indexed Job's completions "
            "(Kubernetes does not pass that count to the pod), or pass --shard I/N",
        ),
        (
            {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7"}
            | {"SLURM_ARRAY_TASK_COUNT": "3"},
            [],
            "SLURM_ARRAY_TASK_ID=7 (min 1, step 1, count 3) is not one task of an evenly spaced array "
            "(--array=0-2, or with a :step); pass --shard I/N",
        ),
        (
            {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"},
            [],
            "SLURM_ARRAY_TASK_ID='x' is not a whole number",
        ),
    ],
)
def test_bad_shards_are_one_line_errors(zoo, environ, args, message):
    cleared = dict.fromkeys(
        ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "JOB_COMPLETION_INDEX"]
    )
    assert one_line_error(batch(zoo, *args, env=cleared | environ), 2) == message


def test_shard_by_dst_is_stable_when_the_manifest_changes(tmp_path):
    """Entries added or reordered never move the others to another shard (by index, they would)."""
    first = [{"src": f"s{i}", "dst": f"out/m{i}"} for i in range(12)]
    edited = [{"src": "new", "dst": "out/new"}, *reversed(first)]
    before = load_manifest(write_manifest(tmp_path / "a.jsonl", first))
    after = load_manifest(write_manifest(tmp_path / "b.jsonl", edited))
    for i in range(3):
        shard = parse_shard(f"{i}/3")
        old = {e.dst_text for e in select(before, shard)}
        new = {e.dst_text for e in select(after, shard)} - {"out/new"}
        assert old == new
    shares = [len(select(before, parse_shard(f"{i}/3"))) for i in range(3)]
    assert sum(shares) == 12 and all(shares)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"src": "a" "dst": "b"}'],
            "{m}:1: not valid JSON: Expecting ',' delimiter at column 13",
        ),
        (['["a", "b"]'], '{m}:1: not a JSON object; write {{"src": ..., "dst": ...}}'),
        (["# only a comment", ""], "{m}: no entries; write one JSON object per line with at least src and dst"),
        (
            [{"src": "a", "dst": "b", "dtpye": "bfloat16"}],
            "{m}:1: unknown field 'dtpye'; did you mean 'dtype'? known fields: src, dst, family, max_shard_size, "
            "dtype, dequantize, revision, stream, push_to_hub, private, workers, overwrite",
        ),
        (["", {"src": "a"}], '{m}:2: field "dst" is missing (a local directory)'),
        ([{"src": "a", "dst": ""}], "{m}:1: field \"dst\": '' is not a local directory"),
        (
            [{"src": "a", "dst": "b", "dtype": "fp8"}],
            "{m}:1: field \"dtype\": 'fp8' is not one of bfloat16, float16, float32",
        ),
        ([{"src": "a", "dst": "b", "workers": 0}], '{m}:1: field "workers": 0 is not a whole number of at least 1'),
        ([{"src": "a", "dst": "b", "overwrite": "yes"}], "{m}:1: field \"overwrite\": 'yes' is not true or false"),
        (
            [{"src": "a", "dst": "b", "max_shard_size": "5 parsecs"}],
            "{m}:1: field \"max_shard_size\": max shard size '5 parsecs' is not a number of bytes or a number "
            "followed by TB, GB, MB or KB",
        ),
        (
            [{"src": "a", "dst": "b", "family": "nope"}],
            "{m}:1: field \"family\": unknown family 'nope'; known families: ",
        ),
        (
            [{"src": "a", "dst": "b", "private": True}],
            '{m}:1: field "private": applies to the repo push_to_hub creates; set push_to_hub too',
        ),
        (
            [{"src": "./a", "dst": "b", "revision": "main"}],
            "{m}:1: field \"revision\": applies to a Hub repo id, and src './a' is a local path",
        ),
        (
            [{"src": "./a", "dst": "b", "stream": True}],
            "{m}:1: field \"stream\": applies to a Hub repo id, and src './a' is a local path",
        ),
        ([{"src": "a/b", "dst": "b", "stream": "yes"}], "{m}:1: field \"stream\": 'yes' is not true or false"),
        (
            [{"src": "a", "dst": "out/x"}, {"src": "b", "dst": "out/../out/x/"}],
            "{m}:2: field \"dst\": 'out/../out/x/' is also the dst of line 1; every entry needs its own dst",
        ),
    ],
)
def test_manifest_errors_name_the_line_and_field_and_run_nothing(tmp_path, lines, message):
    manifest = write_manifest(tmp_path / "zoo.jsonl", lines)
    error = one_line_error(batch(manifest), 2)  # 2: fix the manifest, running again will not help
    expected = message.format(m=manifest)
    assert error.startswith(expected) if expected.endswith(": ") else error == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo.jsonl"]


def test_verify_is_refused_with_a_streamed_entry_before_anything_runs(tmp_path):
    """--verify reads the source, which a streamed entry deletes as it goes."""
    manifest = write_manifest(
        tmp_path / "zoo.jsonl",
        [
            {"src": "org/a", "dst": "a"},
            {"src": "org/b", "dst": "b", "stream": True},
            {"src": "./c", "dst": "c", "stream": False},
        ],
    )
    assert [entry.stream for entry in load_manifest(manifest)] == [False, True, False]
    assert one_line_error(batch(manifest, "--verify"), 2) == (
        f'{manifest}:2: field "stream": --verify reads the source, which a streamed entry deletes as it '
        "goes; verify a local convert"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo.jsonl"]


def test_cluster_examples_run_batch_and_agree_on_the_count():
    examples = Path(__file__).resolve().parent.parent / "examples"
    sbatch = (examples / "slurm_batch.sbatch").read_text()
    assert "#SBATCH --array=" in sbatch and "FUSEMOE_CKPT=${FUSEMOE_CKPT:-fusemoe-ckpt}" in sbatch
    assert 'exec $FUSEMOE_CKPT batch "$MANIFEST"' in sbatch  # tests/test_slurm.py runs it
    assert subprocess.run(["bash", "-n", str(examples / "slurm_batch.sbatch")]).returncode == 0
    job = (examples / "k8s_indexed_job.yaml").read_text()
    assert "completionMode: Indexed" in job and "exec fusemoe-ckpt batch " in job
    # Exit 2 (a manifest error) fails the Job instead of being retried.
    assert re.search(r"- action: FailJob.*\n\s+onExitCodes:\n\s+containerName: batch\n.*\n\s+values: \[2\]", job)
    completions = re.search(r"^  completions: (\d+)$", job, re.MULTILINE).group(1)
    count = re.search(r'name: FUSEMOE_SHARD_COUNT\n\s+value: "(\d+)"', job).group(1)
    assert completions == count


def test_interrupted_batch_stops_its_entries_and_says_how_to_resume(tmp_path):
    """^C to the batch alone (not at a terminal, so not to its entry processes): the running entry is
    interrupted keeping its partial output, the rest is not started, the report says so, exit 130."""
    root = tmp_path / "zoo"
    for name in ("a", "b"):
        write_checkpoint(root / name, expert_tensors(layers=3), config=QWEN3_CONFIG)
    entries = [{"src": n, "dst": f"out/{n}", "max_shard_size": 600, "workers": 1} for n in ("a", "b")]
    manifest = write_manifest(root / "zoo.jsonl", entries)
    flag, report = tmp_path / "paused", tmp_path / "report.json"
    command = [
        sys.executable,
        PAUSE_LAUNCHER,
        f"shard-done:1:{flag}",
        "cli",
        "batch",
        str(manifest),
        "--report",
        str(report),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(flag, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.splitlines()[-1] == (
        "Error: interrupted; batch stopped, 1 of 2 entries not run; run the same command again to resume"
    )
    a, b = entries_of(report)["a"], entries_of(report)["b"]
    partial = root / "out" / ".a.fusemoe-partial"
    assert (a["status"], a["signal"], a["error"]) == (
        "interrupted",
        "SIGINT",
        f"interrupted by SIGINT; {partial} keeps what was completed; run the batch again to resume",
    )
    assert b["status"] == "pending"
    assert json.loads(report.read_text())["signal"] == "SIGINT"
    assert partial.is_dir() and not (root / "out" / "b").exists()
    flag.unlink()
    assert batch(manifest, "--report", report).exit_code == 0
    assert [e["kept_shards"] > 0 for e in entries_of(report).values()] == [True, False]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            [{"src": "./m/a", "dst": "out/a"}, {"src": "./m/b", "dst": "m/a", "overwrite": True}],
            "{m}:2: field \"dst\": 'm/a' is the src of line 1 ({root}/m/a); no entry may write where another reads",
        ),
        (
            [{"src": "./m/a", "dst": "out/a"}, {"src": "./m/b", "dst": "m/a/fused"}],
            "{m}:2: field \"dst\": 'm/a/fused' lies inside the src of line 1 ({root}/m/a); "
            "no entry may write where another reads",
        ),
        (
            [{"src": "./m/a", "dst": "out/a"}, {"src": "./x", "dst": "m"}],
            "{m}:2: field \"dst\": 'm' holds the src of line 1 ({root}/m/a); no entry may write where another reads",
        ),
        (
            [{"src": "./m/a", "dst": "out/a"}, {"src": "./m/b", "dst": "out/a/b"}],
            "{m}:2: field \"dst\": 'out/a/b' lies inside the dst of line 1; no entry may write inside another's output",
        ),
        (
            [{"src": "./m/a", "dst": "out/a/b"}, {"src": "./m/b", "dst": "out/a"}],
            "{m}:1: field \"dst\": 'out/a/b' lies inside the dst of line 2; no entry may write inside another's output",
        ),
    ],
    ids=["dst-is-src", "dst-inside-src", "dst-holds-src", "dst-inside-dst", "dst-inside-a-later-dst"],
)
def test_entries_that_write_where_others_read_or_write_are_refused_up_front(tmp_path, lines, message):
    """An entry whose dst is another's src (with overwrite) used to replace that source, and with --jobs 2
    the outcome depended on timing: refused before anything runs, naming both lines."""
    manifest = write_manifest(tmp_path / "zoo.jsonl", lines)
    assert one_line_error(batch(manifest, "--jobs", "2"), exit_code=2) == message.format(m=manifest, root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo.jsonl"]


def test_a_chain_through_a_symlink_is_found_too(tmp_path):
    """Paths are compared resolved: a dst reached through a link to another entry's src is that src."""
    (tmp_path / "m" / "a").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "m")
    manifest = write_manifest(
        tmp_path / "zoo.jsonl", [{"src": "./m/a", "dst": "out/a"}, {"src": "./m/b", "dst": "alias/a"}]
    )
    assert one_line_error(batch(manifest), exit_code=2).startswith(
        f"{manifest}:2: field \"dst\": 'alias/a' is the src of line 1"
    )
