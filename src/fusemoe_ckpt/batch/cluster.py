"""Which entries of a manifest one task of a cluster job runs: shard I of N, disjoint and complete.

Every task reads the same manifest and picks its own share, so a Slurm job array or a Kubernetes
Indexed Job spreads a zoo with no coordinator. By default an entry belongs to shard
`sha256(dst) mod N`: adding, removing or reordering other entries never moves it to another shard,
so tasks that read the manifest before and after an edit still never take the same entry. `index`
(position in the manifest mod N) balances exactly instead, e.g. one entry per task.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UsageError
from . import SHARD_BY

if TYPE_CHECKING:
    from .manifest import Entry
# Kubernetes gives an Indexed Job's pods their index but not the number of completions.
K8S_COUNT_VARIABLE = "FUSEMOE_SHARD_COUNT"
_REQUIRED = object()


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0 <= index < count), and where that came from."""

    index: int
    count: int
    origin: str = "--shard"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


ALL = Shard(0, 1, "default")


def parse_shard(text: str, *, origin: str = "--shard") -> Shard:
    """`I/N` as a Shard.

    Raises:
        UsageError: not two whole numbers with 0 <= I < N.
    """
    index_text, slash, count_text = text.partition("/")
    try:
        index, count = int(index_text), int(count_text)
    except ValueError:
        index = count = -1
    if not slash or count < 1 or not 0 <= index < count:
        raise UsageError(f"{origin} {text!r} is not I/N with 0 <= I < N, e.g. 0/4")
    return Shard(index, count, origin)


def resolve_shard(text: str | None, environ: Mapping[str, str] | None = None) -> Shard:
    """`--shard` if given; else a Slurm array task's or a Kubernetes Indexed Job pod's; else all entries."""
    if text is not None:
        return parse_shard(text)
    return shard_from_environment(os.environ if environ is None else environ) or ALL


def shard_from_environment(environ: Mapping[str, str]) -> Shard | None:
    """The shard of this task from Slurm's or Kubernetes' variables; None outside a job array.

    Slurm: SLURM_ARRAY_TASK_ID, minus SLURM_ARRAY_TASK_MIN (an array may start at 1), divided by
    SLURM_ARRAY_TASK_STEP, of SLURM_ARRAY_TASK_COUNT tasks. Kubernetes: JOB_COMPLETION_INDEX of
    FUSEMOE_SHARD_COUNT, which the Job must set to its `completions`.

    Raises:
        UsageError: the variables are incomplete, or the array is not an evenly spaced range.
    """
    if "SLURM_ARRAY_TASK_ID" in environ:
        return _slurm_shard(environ)
    if "JOB_COMPLETION_INDEX" in environ:
        if K8S_COUNT_VARIABLE not in environ:
            raise UsageError(
                f"JOB_COMPLETION_INDEX is set but {K8S_COUNT_VARIABLE} is not; set it to the Indexed Job's "
                "completions (Kubernetes does not pass that count to the pod), or pass --shard I/N"
            )
        index = _whole(environ, "JOB_COMPLETION_INDEX")
        count = _whole(environ, K8S_COUNT_VARIABLE)
        origin = f"JOB_COMPLETION_INDEX={index} of {K8S_COUNT_VARIABLE}={count}"
        return parse_shard(f"{index}/{count}", origin=origin)
    return None


def _slurm_shard(environ: Mapping[str, str]) -> Shard:
    task = _whole(environ, "SLURM_ARRAY_TASK_ID")
    first = _whole(environ, "SLURM_ARRAY_TASK_MIN", default=0)
    step = _whole(environ, "SLURM_ARRAY_TASK_STEP", default=1)
    last = _whole(environ, "SLURM_ARRAY_TASK_MAX", default=None)
    count = _whole(environ, "SLURM_ARRAY_TASK_COUNT", default=None)
    if count is None:
        if last is None:
            raise UsageError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; pass --shard I/N")
        count = (last - first) // step + 1
    origin = f"SLURM_ARRAY_TASK_ID={task} (min {first}, step {step}, count {count})"
    evenly_spaced = step >= 1 and (task - first) % step == 0 and (last is None or last - first == (count - 1) * step)
    if not evenly_spaced or not 0 <= (task - first) // step < count:
        raise UsageError(
            f"{origin} is not one task of an evenly spaced array (--array=0-{count - 1}, or with a :step); "
            "pass --shard I/N"
        )
    return Shard((task - first) // step, count, origin)


def _whole(environ: Mapping[str, str], name: str, *, default: object = _REQUIRED) -> int | None:
    if name not in environ:
        if default is _REQUIRED:
            raise UsageError(f"{name} is not set")
        return default
    try:
        return int(environ[name])
    except ValueError:
        raise UsageError(f"{name}={environ[name]!r} is not a whole number") from None


def shard_of(entry: Entry, position: int, count: int, *, by: str = "dst") -> int:
    """The shard `entry`, at `position` in its manifest, belongs to among `count`."""
    import hashlib  # here: only sharding by dst needs it

    if by == "index":
        return position % count
    if by != "dst":
        raise UsageError(f"shard by {by!r}: choose one of {', '.join(SHARD_BY)}")
    key = os.path.normpath(entry.dst_text).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % count


def select(entries: Sequence[Entry], shard: Shard, *, by: str = "dst") -> list[Entry]:
    """The entries of `shard`, in manifest order."""
    return [
        entry for position, entry in enumerate(entries) if shard_of(entry, position, shard.count, by=by) == shard.index
    ]
