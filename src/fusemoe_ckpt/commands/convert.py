"""`convert`: open the source (downloading a Hub repo first), plan it, write the plan to DST."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DestinationError, UsageError
from ..hub.repo_id import is_hub_source
from ..memory import release_free_memory
from ..plan.conversion import plan_for
from ..plan.layout import ConversionPlan
from ..reading.source import SourceCheckpoint
from ..rules.selection import override_warning
from ..sizes import format_size
from ..write.destination import (
    check_destination,
    check_no_partial,
    check_paths,
    holds_files,
    partial_path,
    resolve_destination,
)
from ..write.lock import DestinationLock
from ..write.output import finish_installed, write_plan
from ..write.workers import default_workers

if TYPE_CHECKING:
    from ..hub.stream import StreamReport


@dataclass
class ConvertResult:
    """What a conversion did, for the summary line."""

    destination: Path
    plan: ConversionPlan
    bytes_written: int
    seconds: float
    copied_files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    kept_shards: int = 0
    source_dir: Path | None = None
    already_complete: bool = False  # DST held this conversion already (--resume): nothing written
    streamed: StreamReport | None = None  # with `stream`: what was downloaded and pushed

    @property
    def nothing_to_fuse(self) -> bool:
        return not self.plan.fused_groups

    def summary(self) -> str:
        pushed = self.streamed.pushed if self.streamed else None
        if self.already_complete and pushed is not None:
            return (
                f"already complete: {self.destination} records this conversion pushed to {pushed.url} "
                f"(commit {pushed.commit[:8]}, {len(self.plan.shards)} shards, {format_size(self.plan.total_size)}); "
                "nothing written or uploaded"
            )
        if self.already_complete:
            return (
                f"already complete: {self.destination} holds this conversion ({len(self.plan.shards)} shards, "
                f"{format_size(self.plan.total_size)}); nothing written"
            )
        rate = self.bytes_written / self.seconds / 1e9 if self.seconds > 0 else float("inf")
        kept = f" ({self.kept_shards} kept from the interrupted run)" if self.kept_shards else ""
        return (
            f"{len(self.plan.fused_modules)} layers fused, {self.plan.num_experts} experts{self._quantized()}"
            f"{self._zero_rows()}{self._ignored()}, "
            f"{format_size(self.bytes_written)} written in {len(self.plan.shards)} shards{kept}, "
            f"{self.seconds:.1f} s, {rate:.2f} GB/s -> {self.destination}{self._streamed()}"
        )

    def _streamed(self) -> str:
        report = self.streamed
        if report is None:
            return ""
        pushed = f"; {report.pushed.summary()}" if report.pushed else ""
        return (
            f" (streamed: {format_size(report.downloaded_bytes)} of source shards fetched, at most "
            f"{format_size(report.peak_source_bytes)} of them on disk at once){pushed}"
        )

    def _zero_rows(self) -> str:
        filled = sum(1 for t in self.plan.tensors.values() for p in t.pieces if p.file is None)
        return f", {filled // 2} zero experts' gate/up rows written as zeros" if filled else ""

    def _quantized(self) -> str:
        plan = self.plan
        if plan.quantization is None:
            return ""
        if not plan.dequantized:
            return f", {plan.quantization.method} weights and scales fused"
        scales = [key for key in plan.dropped if not self._ignored_at_load(key)]
        dropped = f" ({len(scales)} activation scales dropped)" if scales else ""
        return f", {plan.quantization.method} dequantized{dropped}"

    def _ignored_at_load(self, key: str) -> bool:
        family = self.plan.family
        return family.model.ignores(family.map_key(key).target)

    def _ignored(self) -> str:
        ignored = [key for key in self.plan.dropped if self._ignored_at_load(key)]
        if not ignored:
            return ""
        patterns = ", ".join(self.plan.family.model.ignored)
        return f", {len(ignored)} tensors dropped that transformers ignores at load ({patterns})"


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    family: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    resume: bool = False,
    workers: int | None = None,
    durable: bool = True,
    dtype: str | None = None,
    dequantize: bool = False,
    progress: Callable[[int, int], None] | None = None,
    revision: str | None = None,
    download_progress: bool = True,
    stream: bool = False,
    push_to: str | None = None,
    private: bool | None = None,
) -> ConvertResult:
    """Write the fused checkpoint of `src` to `dst`.

    Args:
        family: a family name; by default chosen from config.json.
        max_shard_size: upper bound of an output shard's tensor bytes ("5GB", or an int).
        overwrite: replace a non-empty `dst`, and discard a partial directory unless `resume`.
        resume: keep the shards an interrupted conversion of the same plan completed; without a
            partial directory, start afresh.
        workers: copy threads; default min(4, CPUs this process may use: its affinity, Slurm's
            SLURM_CPUS_PER_TASK), or with `dequantize` every one of them. Shards are written at once,
            and with fewer shards than workers, parts of one shard too.
        durable: fsync every file and directory before recording a shard and before the final rename.
        dtype: "bfloat16", "float16" or "float32": cast floating tensors to it while copying (the
            only path that imports torch); integer, boolean and FP8 tensors are copied untouched.
        dequantize: write quantized (FP8) weights dequantized by their scales, to `dtype` or else
            config.json's dtype, and config.json without its quantization_config.
        progress: called as progress(bytes_just_written, total_bytes), from worker threads.
        revision: branch, tag or commit of a Hub repo id `src`.
        download_progress: show huggingface_hub's progress bars while downloading `src`.
        stream: with a Hub repo `src`: fetch its shards one at a time, as the plan needs them, into a
            folder beside `dst` instead of the HF cache, each deleted once the output shards that read
            it are written.
        push_to: with `stream`: pre-upload each output shard to this Hub repo as it completes, delete
            it locally, and commit everything at the end; `dst` keeps the small files and a record
            of the upload.
        private: visibility of a `push_to` repo created here.

    Raises:
        FusemoeError: bad input or destination, a full disk; `dst` is then left as it was and the
            partial directory removed. HubError when a repo id cannot be downloaded.
        ConversionInterrupted: ^C, or SIGTERM where the caller turns it into `Interrupted` (the CLI
            does); the partial directory is kept for `resume`.
    """
    started = time.perf_counter()
    src_path = Path(src).absolute()
    dst_path, warnings = resolve_destination(Path(dst).absolute())
    provenance = {"fusemoe_ckpt_source": str(src)}
    if stream or push_to is not None:
        if not (stream and is_hub_source(src)):
            raise UsageError(
                f"{src}: --stream applies to a Hub repo id SRC"
                if stream
                else "convert pushes as it writes only with --stream; push a finished DST with push"
            )
        check_destination(dst_path)
        if holds_files(dst_path) and not overwrite:
            from ..hub.push_record import recorded_push_reason
            from ..write.finished import recorded_reason

            options = {"source": str(src), "revision": revision, "family": family, "dtype": dtype}
            if push_to is None:
                recorded = recorded_reason(dst_path, dequantize=dequantize, **options)
            else:
                recorded = recorded_push_reason(dst_path, repo_id=push_to, dequantize=dequantize, **options)
            if not (resume and recorded is None):
                _refuse_non_empty(dst_path, str(src), this_conversion=recorded is None)
        check_no_partial(partial_path(dst_path), resume=resume, overwrite=overwrite)
        if workers is None:
            workers = default_workers(dequantize=dequantize)
        source, plan, written, extras, kept, report = _convert_streamed(
            str(src),
            dst_path,
            revision=revision,
            push_to=push_to,
            private=private,
            progress=progress,
            download_progress=download_progress,
            plan_options={"family": family, "max_shard_size": max_shard_size, "dtype": dtype, "dequantize": dequantize},
            write_options={"overwrite": overwrite, "resume": resume, "workers": workers, "durable": durable},
        )
        return ConvertResult(
            destination=dst_path,
            plan=plan,
            bytes_written=written,
            seconds=time.perf_counter() - started,
            copied_files=extras,
            warnings=warnings + _warnings(source, plan, family),
            kept_shards=kept,
            streamed=report,
            already_complete=report.already_complete,
        )
    if is_hub_source(src):
        from ..hub.download import download_checkpoint  # huggingface_hub is imported only for Hub sources

        # Before a download that may take hours.
        check_destination(dst_path)
        if holds_files(dst_path) and not (overwrite or resume):
            from ..write.finished import recorded_reason

            recorded = recorded_reason(
                dst_path, source=str(src), revision=revision, family=family, dtype=dtype, dequantize=dequantize
            )
            _refuse_non_empty(dst_path, str(src), this_conversion=recorded is None)
        check_no_partial(partial_path(dst_path), resume=resume, overwrite=overwrite)
        hub_source = download_checkpoint(str(src), revision=revision, progress=download_progress)
        src_path = hub_source.path
        provenance = {"fusemoe_ckpt_source": hub_source.repo_id, "fusemoe_ckpt_source_revision": hub_source.commit}
    elif revision is not None:
        raise UsageError(f"{src}: a revision applies to a Hub repo id, and this is a local path")
    check_paths(src_path, dst_path)
    if workers is None:
        workers = default_workers(dequantize=dequantize)
    source, plan = plan_for(src_path, family=family, max_shard_size=max_shard_size, dtype=dtype, dequantize=dequantize)
    planned = len(source.tensors)
    source = source.without_tensors()  # the plan holds every byte range; the tensor map is let go
    release_free_memory(planned)
    if holds_files(dst_path) and not overwrite:
        from ..write.finished import planned_reason  # asked only of a DST that holds files

        if resume and _finish_if_complete(dst_path, plan):
            # Killed just after the final rename, or run again by a scheduler: nothing left to do.
            return ConvertResult(
                destination=dst_path,
                plan=plan,
                bytes_written=0,
                seconds=time.perf_counter() - started,
                warnings=warnings + _warnings(source, plan, family),
                kept_shards=len(plan.shards),
                source_dir=src_path,
                already_complete=True,
            )
        _refuse_non_empty(dst_path, str(src), this_conversion=planned_reason(dst_path, plan) is None)
    written, extras, kept = write_plan(
        source,
        plan,
        provenance,
        dst_path,
        overwrite=overwrite,
        resume=resume,
        workers=workers,
        durable=durable,
        progress=progress,
    )
    return ConvertResult(
        destination=dst_path,
        plan=plan,
        bytes_written=written,
        seconds=time.perf_counter() - started,
        copied_files=extras,
        warnings=warnings + _warnings(source, plan, family),
        kept_shards=kept,
        source_dir=src_path,
    )


def _convert_streamed(
    repo_id: str,
    dst: Path,
    *,
    revision: str | None,
    push_to: str | None,
    private: bool | None,
    progress: Callable[[int, int], None] | None,
    download_progress: bool,
    plan_options: dict,
    write_options: dict,
) -> tuple[SourceCheckpoint, ConversionPlan, int, list[str], int, StreamReport]:
    """Pin the repo, lay its shards out as placeholders beside DST, plan them, and write the plan
    fetching each source shard just in time (and pushing each output shard, with `push_to`). The
    report says `already_complete` when DST held this conversion, or recorded its finished push,
    already (`--resume` run again): nothing written or uploaded."""
    from ..hub.calls import hub_errors, progress_bars  # huggingface_hub is imported only for Hub sources
    from ..hub.fetch import pin_repo
    from ..hub.stream import StreamHooks, StreamReport, lay_out_scratch, remove_scratch, scratch_path
    from ..hub.stream_push import PushingHooks, recorded_push_result

    scratch = scratch_path(dst)
    what = f"{repo_id}@{revision}" if revision else repo_id
    dst.parent.mkdir(parents=True, exist_ok=True)
    with progress_bars(download_progress):
        try:
            with hub_errors(what):
                repo = pin_repo(repo_id, revision)
            # Named by the pinned commit from here on: a repo rewritten since (the commit gone) says so.
            with hub_errors(f"{repo.repo_id}@{repo.commit}"):
                streamed = lay_out_scratch(repo, scratch, progress=download_progress)
                source, plan = plan_for(scratch, **plan_options)
                if holds_files(dst) and not write_options["overwrite"]:  # --resume: done already?
                    from ..write.finished import planned_reason

                    if _finish_if_complete(dst, plan, push_to=push_to):
                        remove_scratch(scratch)
                        pushed = recorded_push_result(dst, push_to) if push_to is not None else None
                        return source, plan, 0, [], len(plan.shards), StreamReport(0, 0, pushed, True)
                    _refuse_non_empty(dst, repo_id, this_conversion=planned_reason(dst, plan) is None)
                if push_to is None:
                    hooks = StreamHooks(streamed, plan, progress=download_progress)
                else:
                    hooks = PushingHooks(streamed, plan, repo_id=push_to, private=private, progress=download_progress)
                provenance = {"fusemoe_ckpt_source": repo.repo_id, "fusemoe_ckpt_source_revision": repo.commit}
                written, extras, kept = write_plan(
                    source, plan, provenance, dst, progress=progress, hooks=hooks, **write_options
                )
        except KeyboardInterrupt:
            raise  # the downloads are kept for --resume, as the written shards are
        except BaseException:
            remove_scratch(scratch)
            raise
        remove_scratch(scratch)
    pushed = getattr(hooks, "result", None)
    return source, plan, written, extras, kept, StreamReport(hooks.downloaded_bytes, hooks.peak_sources, pushed)


def _finish_if_complete(dst: Path, plan: ConversionPlan, *, push_to: str | None = None) -> bool:
    """Whether `dst` holds `plan`'s output (with `push_to`: the small files and the record of its
    finished push to that repo); if so, finish the step a run killed just after its final rename left
    undone. Under the lock: a convert writing DST right now is refused, not raced."""
    from ..hub.push_record import planned_push_reason
    from ..write.finished import planned_reason

    with DestinationLock(dst):
        if push_to is None:
            reason = planned_reason(dst, plan)
        else:
            reason = planned_push_reason(dst, plan, repo_id=push_to)
        if reason is not None:
            return False
        finish_installed(dst)
        return True


def _refuse_non_empty(dst: Path, src: str, this_conversion: bool) -> None:
    """Refuse a DST that holds files (without --overwrite), saying so when it is this conversion already.

    Raises:
        DestinationError: always.
    """
    if this_conversion:
        raise DestinationError(
            f"{dst}: exists and is not empty: it already holds this conversion of {src}; "
            "pass --resume to accept it as complete, or --overwrite to convert again"
        )
    raise DestinationError(f"{dst}: exists and is not empty; pass --overwrite to replace it")


def _warnings(source: SourceCheckpoint, plan: ConversionPlan, family: str | None) -> list[str]:
    warnings = []
    overridden = override_warning(source, plan.family) if family is not None else None
    if overridden is not None:
        warnings.append(overridden)
    if source.config and "auto_map" in source.config:
        warnings.append(
            f"{source.root / 'config.json'}: has auto_map (remote code); remote modeling code "
            "expects per-expert weights and will not load the fused layout"
        )
    return warnings
