"""Convert a checkpoint: open, plan, write every shard into a temporary sibling, then rename it into place."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from .errors import DestinationError, FamilyError, UsageError
from .families import REFUSED, Family, families_matching, family_by_name, family_for_config
from .plan import ConversionPlan, natural_key, plan_conversion
from .sizes import format_size, parse_size
from .source import INDEX_NAME, SourceCheckpoint, open_checkpoint
from .writer import write_shard

# Weight files of any format, and their indexes: never copied beside the converted shards.
WEIGHT_EXTENSIONS = ("safetensors", "bin", "pt", "pth", "ckpt", "h5", "msgpack", "gguf", "onnx", "onnx_data", "npz")
_WEIGHT_FILE = re.compile(rf"\.({'|'.join(WEIGHT_EXTENSIONS)})(\.index\.json)?$")
PARTIAL_SUFFIX = ".fusemoe-partial"
# `org/name` as the Hub spells it; tried only when no local path of that name exists.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


@dataclass
class ConvertResult:
    """What a conversion did, for the summary line."""

    destination: Path
    plan: ConversionPlan
    bytes_written: int
    seconds: float
    copied_files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def nothing_to_fuse(self) -> bool:
        return not self.plan.fused_groups

    def summary(self) -> str:
        rate = self.bytes_written / self.seconds / 1e9 if self.seconds > 0 else float("inf")
        return (
            f"{len(self.plan.fused_modules)} layers fused, {self.plan.num_experts} experts, "
            f"{format_size(self.bytes_written)} written in {len(self.plan.shards)} shards, "
            f"{self.seconds:.1f} s, {rate:.2f} GB/s -> {self.destination}"
        )


def resolve_family(source: SourceCheckpoint, name: str | None) -> Family:
    """`--family` if given, else the family config.json names.

    Raises:
        FamilyError: config.json names no known model type; the message lists the families whose
            expert patterns match the checkpoint's keys.
    """
    if name is not None:
        return family_by_name(name)
    config = source.config or {}
    model_type = config.get("model_type")
    if model_type in REFUSED:
        raise FamilyError(
            f"{source.root}: model_type {model_type!r} is not supported: its transformers rule needs "
            f"{REFUSED[model_type]}"
        )
    family = family_for_config(source.config)
    if family is not None:
        return family
    matching = families_matching(source.tensors)
    hint = (
        f"families whose expert keys match this checkpoint: {', '.join(matching)}"
        if matching
        else "no family's expert keys match this checkpoint"
    )
    what = f"model_type {model_type!r} has no family rule" if source.config else "no config.json to choose a family"
    raise FamilyError(f"{source.root}: {what}; pass --family NAME ({hint})")


def plan_for(src: str | os.PathLike, *, family: str | None = None, max_shard_size: str | int = "5GB"):
    """Open `src` and plan its conversion, touching no tensor bytes."""
    source = open_checkpoint(src)
    chosen = resolve_family(source, family)
    return source, plan_conversion(source, chosen, max_shard_size=parse_size(max_shard_size))


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    family: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    workers: int | None = None,
    durable: bool = True,
    progress: Callable[[int, int], None] | None = None,
    revision: str | None = None,
    download_progress: bool = True,
) -> ConvertResult:
    """Write the fused checkpoint of `src` to `dst`.

    `src` is a local directory or, when no such path exists, a Hub repo id (`org/name`), downloaded
    into the Hugging Face cache first (only the index, its shards and the non-weight files).

    Args:
        family: a family name; by default chosen from config.json.
        max_shard_size: upper bound of an output shard's tensor bytes ("5GB", or an int).
        overwrite: replace a non-empty `dst`.
        workers: shards written at once (threads); default min(4, CPU count).
        durable: fsync every file and directory before the final rename.
        progress: called as progress(bytes_just_written, total_bytes), from worker threads.
        revision: branch, tag or commit of a Hub repo id `src`.
        download_progress: show huggingface_hub's progress bars while downloading `src`.

    Raises:
        FusemoeError: bad input or destination; `dst` is then left as it was. HubError when a repo id
            cannot be downloaded.
    """
    started = time.perf_counter()
    src_path, dst_path = Path(src).absolute(), Path(dst).absolute()
    provenance = {"fusemoe_ckpt_source": str(src)}
    if is_hub_source(src):
        from .hub import download_checkpoint  # huggingface_hub is imported only for Hub sources

        _check_destination(dst_path, overwrite)  # before a download that may take hours
        _check_no_partial(_partial_path(dst_path), overwrite)
        hub_source = download_checkpoint(str(src), revision=revision, progress=download_progress)
        src_path = hub_source.path
        provenance = {"fusemoe_ckpt_source": hub_source.repo_id, "fusemoe_ckpt_source_revision": hub_source.commit}
    elif revision is not None:
        raise UsageError(f"{src}: a revision applies to a Hub repo id, and this is a local path")
    _check_paths(src_path, dst_path, overwrite)
    source, plan = plan_for(src_path, family=family, max_shard_size=max_shard_size)
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if workers < 1:
        raise UsageError(f"workers must be at least 1, not {workers}")

    partial = _partial_path(dst_path)
    _check_no_partial(partial, overwrite)
    if partial.exists():
        shutil.rmtree(partial)
    extras = _extra_files(source)
    _check_free_space(dst_path.parent, plan, source.root, extras)
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    partial.mkdir()
    total = sum(s.file_size for s in plan.shards)
    report = (lambda n: progress(n, total)) if progress else None
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            jobs = [
                pool.submit(write_shard, partial / s.filename, s, durable=durable, progress=report) for s in plan.shards
            ]
            for job in jobs:
                job.result()
        _write_index(partial / INDEX_NAME, plan, provenance, durable=durable)
        for relative in extras:
            target = partial / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.root / relative, target)
        if durable:
            _fsync_dir(partial)
        _install(partial, dst_path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return ConvertResult(
        destination=dst_path,
        plan=plan,
        bytes_written=total,
        seconds=time.perf_counter() - started,
        copied_files=extras,
        warnings=_warnings(source),
        source=provenance["fusemoe_ckpt_source"],
    )


def is_hub_source(src: str | os.PathLike) -> bool:
    """True when `src` names no existing local path but reads as a Hub repo id (`org/name`)."""
    text = os.fspath(src)
    return (
        not Path(text).exists()
        and _REPO_ID.fullmatch(text) is not None
        and ".." not in text
        and "--" not in text
        and not text.endswith(".")
    )


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src or real_dst.is_relative_to(real_src):
        raise DestinationError(f"{dst}: destination is inside the source {src}")
    if real_src.is_relative_to(real_dst):
        raise DestinationError(f"{dst}: destination contains the source {src}")
    _check_destination(dst, overwrite)


def _partial_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}{PARTIAL_SUFFIX}"


def _check_no_partial(partial: Path, overwrite: bool) -> None:
    if partial.exists() and not overwrite:
        raise DestinationError(f"{partial}: left by an interrupted conversion; remove it or pass --overwrite")


def _check_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise DestinationError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise DestinationError(f"{dst}: exists and is not empty; pass --overwrite to replace it")


def _extra_files(source: SourceCheckpoint) -> list[str]:
    """Relative paths of the files to copy as they are: config, tokenizer, card... never weights."""
    extras = []
    for folder, dirnames, filenames in os.walk(source.root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or _WEIGHT_FILE.search(name):
                continue
            extras.append(os.path.relpath(os.path.join(folder, name), source.root))
    return sorted(extras, key=natural_key)


def _check_free_space(parent: Path, plan: ConversionPlan, root: Path, extras: list[str]) -> None:
    probe = parent
    while not probe.exists():
        probe = probe.parent
    needed = sum(s.file_size for s in plan.shards) + sum((root / e).stat().st_size for e in extras)
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DestinationError(f"{parent}: needs {format_size(needed)} but only {format_size(free)} is free")


def _write_index(path: Path, plan: ConversionPlan, provenance: dict[str, str], *, durable: bool) -> None:
    index = {
        "metadata": {
            "total_size": plan.total_size,
            "total_parameters": plan.total_parameters,
            "fusemoe_ckpt_version": version("fusemoe-ckpt"),
            "fusemoe_ckpt_family": plan.family.name,
            **provenance,
            "fusemoe_ckpt_fused_layers": len(plan.fused_modules),
            "fusemoe_ckpt_experts": plan.num_experts,
        },
        "weight_map": dict(sorted(plan.tensor_to_filename.items(), key=lambda kv: natural_key(kv[0]))),
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
        if durable:
            f.flush()
            os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(partial: Path, dst: Path) -> None:
    """Move the finished output into place; an existing `dst` is set aside until the move succeeds."""
    if not dst.exists():
        os.rename(partial, dst)
        return
    if not any(dst.iterdir()):
        dst.rmdir()
        os.rename(partial, dst)
        return
    replaced = dst.parent / f".{dst.name}.fusemoe-replaced"
    shutil.rmtree(replaced, ignore_errors=True)
    os.rename(dst, replaced)
    os.rename(partial, dst)
    shutil.rmtree(replaced)


def _warnings(source: SourceCheckpoint) -> list[str]:
    warnings = []
    if source.config and "auto_map" in source.config:
        warnings.append(
            f"{source.root / 'config.json'}: has auto_map (remote code); remote modeling code "
            "expects per-expert weights and will not load the fused layout"
        )
    return warnings
