"""Copy threads default to the CPUs this process may use (its affinity, Slurm's allocation), not the machine's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fusemoe_ckpt import inspect_checkpoint
from fusemoe_ckpt.write.workers import MAX_COPY_WORKERS, default_workers, usable_cpus

AFFINITY = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.mark.parametrize(
    ("slurm", "expected"),
    [(None, AFFINITY), ("1", 1), (str(AFFINITY + 8), AFFINITY), ("0", AFFINITY), ("two", AFFINITY)],
)
def test_slurm_cpus_per_task_caps_the_affinity_never_raises_it(slurm, expected):
    environ = {} if slurm is None else {"SLURM_CPUS_PER_TASK": slurm}
    assert usable_cpus(environ) == expected


def test_defaults_follow_the_usable_cpus():
    one = {"SLURM_CPUS_PER_TASK": "1"}
    assert default_workers(environ=one) == 1
    assert default_workers(dequantize=True, environ=one) == 1
    assert default_workers(environ={}) == min(MAX_COPY_WORKERS, AFFINITY)
    assert default_workers(dequantize=True, environ={}) == AFFINITY
    # A batch running entries at once gives each its share, at least one.
    assert default_workers(dequantize=True, sharing=AFFINITY + 1, environ={}) == 1
    assert default_workers(dequantize=True, sharing=2, environ={}) == max(1, AFFINITY // 2)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity (Linux)")
def test_a_process_pinned_to_one_cpu_uses_one_thread():
    """As `taskset -c 0`, a cgroup cpuset or Slurm's task/affinity leave it: one CPU of the machine's."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from fusemoe_ckpt.write.workers import default_workers; print(default_workers(environ={}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "1"


def test_inspect_reports_the_threads_convert_would_use(qwen_checkpoint, monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert inspect_checkpoint(qwen_checkpoint).to_json()["peak_memory"]["workers"] == 1
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert inspect_checkpoint(qwen_checkpoint).to_json()["peak_memory"]["workers"] == min(4, AFFINITY)
