"""`unfuse`: the way back, for consumers that still want per-expert tensors (plan/unfusion.py
plans it; the writer and its bounded memory are convert's)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..cycles import collector_paused
from ..plan.layout import ConversionPlan
from ..plan.unfusion import plan_unfuse
from ..reading.source import open_checkpoint
from ..rules.selection import resolve_family
from ..sizes import format_size, parse_size
from ..write.destination import check_paths, refuse_non_empty, resolve_destination
from ..write.output import write_plan


@dataclass
class UnfuseResult:
    destination: Path
    plan: ConversionPlan
    bytes_written: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        split = len(self.plan.fused_groups)
        pieces = sum(g.sources for g in self.plan.fused_groups)
        return (
            f"{split} fused tensors split into {pieces}, {format_size(self.bytes_written)} written in "
            f"{len(self.plan.shards)} shards, {self.seconds:.1f} s -> {self.destination}"
        )


def unfuse(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    family: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    workers: int | None = None,
    durable: bool = True,
    progress=None,
) -> UnfuseResult:
    """Write the per-expert checkpoint of the fused checkpoint `src` to `dst` (the inverse of convert).

    Raises:
        FusemoeError: bad input or destination; `dst` is then left as it was.
    """
    started = time.perf_counter()
    src_path = Path(src).absolute()
    dst_path, warnings = resolve_destination(Path(dst).absolute())
    check_paths(src_path, dst_path)
    refuse_non_empty(dst_path, overwrite)
    with collector_paused():
        source = open_checkpoint(src_path)
        chosen = resolve_family(source, family)
        plan = plan_unfuse(source, chosen, max_shard_size=parse_size(max_shard_size))
    total, _, _ = write_plan(
        source,
        plan,
        {"fusemoe_ckpt_source": str(src)},
        dst_path,
        overwrite=overwrite,
        workers=workers,
        durable=durable,
        progress=progress,
    )
    return UnfuseResult(dst_path, plan, total, time.perf_counter() - started, warnings)
