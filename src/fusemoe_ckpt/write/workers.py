"""How many copy threads a conversion uses by default: the CPUs this process may use, not the machine's.

A Slurm task, a container or `taskset` gets a few CPUs of a large machine; `os.cpu_count()` counts
them all, and threads beyond the allocation only queue for it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Copying is bound by the disks: past a few threads more of them rarely help.
MAX_COPY_WORKERS = 4


def usable_cpus(environ: Mapping[str, str] | None = None) -> int:
    """The CPUs this process may use: its affinity mask (which taskset, cgroup cpusets and Slurm's
    task/affinity set), and no more than Slurm's SLURM_CPUS_PER_TASK where that is set, since a
    cluster without CPU binding allocates CPUs it does not pin."""
    environ = os.environ if environ is None else environ
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = os.cpu_count() or 1
    allocated = environ.get("SLURM_CPUS_PER_TASK", "")
    if allocated.isdigit() and int(allocated) > 0:
        cpus = min(cpus, int(allocated))
    return max(1, cpus)


def default_workers(*, dequantize: bool = False, sharing: int = 1, environ: Mapping[str, str] | None = None) -> int:
    """Copy threads when none are asked for: min(4, CPUs); every CPU for `dequantize` (arithmetic,
    not copying).

    Args:
        sharing: conversions that run at once on these CPUs (a batch's `--jobs`); each gets its share.
    """
    share = max(1, usable_cpus(environ) // max(1, sharing))
    return share if dequantize else min(MAX_COPY_WORKERS, share)
