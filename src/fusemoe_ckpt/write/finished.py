"""Does DST already hold a finished conversion, and is it this one? Decided from DST's index and shard
headers, without reading a tensor byte.

Convert renames DST into place only once every file is written, so a DST with an index written by
fusemoe-ckpt is complete; what is left to check is that it is *this* conversion. `convert --resume`
and `convert` without `--overwrite` ask (a run killed just after its final rename, a job re-run by a
scheduler), and batch asks before every entry.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError
from ..plan.cast import output_dtype
from ..plan.layout import ConversionPlan
from ..reading.converted import read_converted_index
from ..reading.files import open_regular
from ..reading.safetensors_format import read_header
from ..reading.source import INDEX_NAME, resolve_inside
from .journal import starts_with_header

_COMMIT = 40  # hex digits of a full commit id: the only revision a finished Hub output can be checked against


def planned_reason(dst: Path, plan: ConversionPlan, *, pushed: dict[str, int] | None = None) -> str | None:
    """None when `dst` holds the output of `plan`, else why not, in a few words.

    `dst`'s index must map the planned keys to the planned shards, each with the planned size and
    header (dtypes, shapes, offsets), and record the planned family, dtype and dequantization. Tensor
    bytes are not compared: verify does that.

    Args:
        pushed: for an output whose shards were uploaded instead of kept (name -> size, as the push
            record lists them): each planned shard must be listed with its planned size.
    """
    found = read_finished(dst)
    if isinstance(found, str):
        return found
    weight_map, metadata = found
    recorded = (
        metadata.get("fusemoe_ckpt_family"),
        metadata.get("fusemoe_ckpt_dtype"),
        metadata.get("fusemoe_ckpt_dequantized") is True,
    )
    if recorded != (plan.family.name, plan.dtype, plan.dequantized):
        planned = f"{plan.family.name}/{plan.dtype}/{plan.dequantized}"
        return f"family/dtype/dequantized {'/'.join(map(str, recorded))} recorded, {planned} planned"
    if weight_map != plan.tensor_to_filename:
        return "its index maps other keys or shards than planned"
    if pushed is not None:
        for shard in plan.shards:
            if pushed.get(shard.filename) != shard.file_size:
                return f"{shard.filename} is not recorded as pushed with its planned size"
        return None
    for shard in plan.shards:
        try:
            fd, st = open_regular(dst / shard.filename)
        except CheckpointError:
            return f"{shard.filename} is missing or unreadable"
        with os.fdopen(fd, "rb") as f:
            try:
                if st.st_size != shard.file_size or not starts_with_header(f, shard):
                    return f"{shard.filename} differs from the planned size or header"
            except OSError:
                return f"{shard.filename} is missing or unreadable"
    return None


def recorded_reason(
    dst: Path,
    *,
    source: str,
    revision: str | None = None,
    family: str | None = None,
    dtype: str | None = None,
    dequantize: bool = False,
    pushed: dict[str, int] | None = None,
) -> str | None:
    """None when `dst`'s index records a conversion of `source` with these options, and every shard
    holds the keys the index maps to it (or, with `pushed`, is listed there); else why not. For a
    source that cannot be planned without downloading it (a Hub repo) or that is gone: what DST
    records is all there is to go by.

    Args:
        source: as the index records it (a repo id, or the path as convert was given it).
        revision: checked only when a full commit id (a branch may have moved on since).
        family: checked when given; by default the one config.json names was used.
        pushed: for an output whose shards were uploaded instead of kept, the shards the push
            record lists (name -> size).
    """
    found = read_finished(dst)
    if isinstance(found, str):
        return found
    weight_map, metadata = found
    recorded_source = metadata.get("fusemoe_ckpt_source")
    if recorded_source != source:
        return f"converted from {recorded_source}"
    commit = metadata.get("fusemoe_ckpt_source_revision")
    if revision is not None and len(revision) == _COMMIT and revision != commit:
        return f"converted from commit {commit}"
    if family is not None and metadata.get("fusemoe_ckpt_family") != family:
        return f"converted with family {metadata.get('fusemoe_ckpt_family')}"
    if metadata.get("fusemoe_ckpt_dtype") != output_dtype(dtype):
        return f"converted with dtype {metadata.get('fusemoe_ckpt_dtype')}"
    if (metadata.get("fusemoe_ckpt_dequantized") is True) != dequantize:
        return "converted with --dequantize" if not dequantize else "converted without --dequantize"
    if pushed is not None:
        missing = sorted(set(weight_map.values()) - set(pushed))
        return f"{missing[0]} is not recorded as pushed" if missing else None
    index_path = dst / INDEX_NAME
    for shard in sorted(set(weight_map.values())):
        try:
            header = read_header(resolve_inside(dst, index_path, shard))
        except CheckpointError:
            return f"{shard} is missing or invalid"
        if set(header.tensors) != {key for key, name in weight_map.items() if name == shard}:
            return f"{shard} holds other keys than the index maps to it"
    return None


def read_finished(dst: Path) -> tuple[dict[str, str], dict] | str:
    """DST's weight map and metadata, or why DST is no finished fusemoe-ckpt output (of any source)."""
    if not dst.is_dir():
        return "it is not a directory" if os.path.lexists(dst) else "no output yet"
    try:
        weight_map, metadata = read_converted_index(dst / INDEX_NAME)
    except CheckpointError:
        return f"no readable {INDEX_NAME}"
    if "fusemoe_ckpt_family" not in metadata:
        return "not written by fusemoe-ckpt"
    return weight_map, metadata
