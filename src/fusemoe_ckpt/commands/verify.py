"""Prove that a converted checkpoint is its source's plan: keys, dtypes, shapes, headers, every byte.

The plan is recomputed from SRC; DST is read as untrusted input, file by file, so one broken shard
names its own keys instead of stopping the check. Bytes are compared as streams: each side is read
in bounded chunks (a transposed expert in bands of output rows, as the writer does), never a whole tensor.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, FusemoeError
from ..memory import release_free_memory
from ..naming import natural_key
from ..plan.conversion import plan_for
from ..plan.layout import ConversionPlan
from ..plan.pieces import OutputTensor
from ..reading.converted import check_recorded, recorded_metadata
from ..reading.files import open_regular, read_exact
from ..reading.index_scan import read_index
from ..reading.safetensors_format import ShardHeader, TensorInfo, read_header
from ..reading.source import INDEX_NAME, SINGLE_NAME, resolve_inside
from ..sizes import format_size
from ..write.streams import piece_chunks


class VerificationError(FusemoeError):
    """DST is not what the plan of SRC says it must be."""


@dataclass(frozen=True)
class StoredTensor:
    """Where DST holds one tensor."""

    info: TensorInfo
    file: Path
    offset: int


@dataclass
class VerifyResult:
    """What verify checked, and every problem found, by tensor key (or file, for file-wide ones)."""

    source: Path
    destination: Path
    plan: ConversionPlan
    problems: dict[str, list[str]]
    tensors_checked: int
    bytes_compared: int
    seconds: float
    load_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """One line per mismatching key (or file), in key order."""
        return [f"{key}: {'; '.join(self.problems[key])}" for key in sorted(self.problems, key=natural_key)]

    def summary(self) -> str:
        also = ", loads strictly on the meta model" if self.load_checked else ""
        if self.ok:
            return (
                f"verified: {self.tensors_checked} tensors, {format_size(self.bytes_compared)} equal to the plan "
                f"of {self.source} (family {self.plan.family.name}{also}), {self.seconds:.1f} s"
            )
        return (
            f"{self.destination} differs from the plan of {self.source}: {len(self.problems)} mismatching "
            f"keys or files of {len(self.plan.tensor_to_filename)} planned tensors"
        )

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise VerificationError(self.summary())


@dataclass
class _Destination:
    tensors: dict[str, StoredTensor] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


def verify(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    family: str | None = None,
    dtype: str | None = None,
    load_check: bool = False,
    chunk: int | None = None,
) -> VerifyResult:
    """Compare `dst` with the plan of `src`, streaming every byte; never raises for a mismatch.

    Args:
        family: the family rule; by default the one DST's index records, else config.json's.
        dtype: the cast convert was given; by default the one DST's index records.
        load_check: also build the model from DST's config on the meta device (needs transformers)
            and check DST's keys and shapes against its state dict.
        chunk: bytes read at once from each side (default streams.READ_CHUNK).

    Raises:
        FusemoeError: SRC cannot be planned, or `load_check` without transformers.
    """
    started = time.perf_counter()
    src_path, dst_path = Path(src), Path(dst)
    recorded = recorded_metadata(dst_path / INDEX_NAME)
    family = family or recorded.get("fusemoe_ckpt_family")
    dtype = dtype or recorded.get("fusemoe_ckpt_dtype")
    dequantized = recorded.get("fusemoe_ckpt_dequantized") is True
    # The source's tensor map is let go here: only the plan is compared with DST.
    plan = plan_for(src_path, family=family, dtype=dtype, dequantize=dequantized)[1]
    release_free_memory()

    problems: dict[str, list[str]] = defaultdict(list)
    stored = _read_destination(dst_path, problems)
    expected = plan.tensors
    checked = compared = 0
    for name in sorted(expected.keys() | stored.tensors.keys(), key=natural_key):
        if name not in stored.tensors:
            if name not in problems:
                problems[name].append(f"missing from {dst_path}")
            continue
        if name not in expected:
            problems[name].append("not in the plan of the source (unexpected key)")
            continue
        checked += 1
        compared += _compare(expected[name], stored.tensors[name], problems, chunk)
    _check_total_size(stored, problems)
    if load_check:
        from .load_check import load_check_problems

        shapes = {name: tensor.info.shape for name, tensor in stored.tensors.items()}
        for key, message in load_check_problems(dst_path, shapes):
            problems[key].append(message)
    return VerifyResult(
        source=src_path,
        destination=dst_path,
        plan=plan,
        problems=dict(problems),
        tensors_checked=checked,
        bytes_compared=compared,
        seconds=time.perf_counter() - started,
        load_checked=load_check,
    )


def _read_destination(root: Path, problems: dict[str, list[str]]) -> _Destination:
    """DST's index and shard headers, read with our parser and with safetensors; every fault is
    recorded against the keys it affects."""
    found = _Destination()
    index_path = root / INDEX_NAME
    if index_path.exists():
        try:
            weight_map, metadata = read_index(index_path)
        except CheckpointError as e:
            problems[INDEX_NAME].append(str(e))
            return found
        try:
            check_recorded(metadata, index_path)
            found.metadata = metadata
        except CheckpointError as e:
            # Tampered provenance is a fault of DST, not a reason to leave its tensors unchecked.
            problems[INDEX_NAME].append(str(e))
    elif (root / SINGLE_NAME).exists():
        weight_map = None
    else:
        problems[str(root)].append(f"no {INDEX_NAME} or {SINGLE_NAME}")
        return found

    names = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_NAME]
    for shard in names:
        mapped = [k for k, v in weight_map.items() if v == shard] if weight_map is not None else []
        try:
            path = resolve_inside(root, index_path, shard) if weight_map is not None else root / shard
            header = read_header(path)
            _safetensors_agrees(path, header)
        except CheckpointError as e:
            for key in mapped or [shard]:
                problems[key].append(f"shard {shard} is invalid: {e}")
            continue
        for name, info in header.tensors.items():
            listed = weight_map.get(name, shard) if weight_map is not None else shard
            if weight_map is not None and name not in weight_map:
                problems[name].append(f"stored in {shard} but not listed in the index")
            elif listed != shard:
                problems[name].append(f"stored in {shard} but the index maps it to {listed}")
            else:
                found.tensors[name] = StoredTensor(info, path, header.data_start + info.start)
        for key in mapped:
            if key not in header.tensors:
                problems[key].append(f"the index maps it to {shard}, which lacks it")
    return found


def _safetensors_agrees(path: Path, header: ShardHeader) -> None:
    """Open the shard with safetensors itself: it must accept the file and see our header."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            seen = {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: safetensors cannot open it: {e}") from e
    ours = {name: (info.dtype, info.shape) for name, info in header.tensors.items()}
    if seen != ours:
        raise CheckpointError(f"{path}: safetensors reads a different header than ours")


def _compare(expected: OutputTensor, stored: StoredTensor, problems: dict[str, list[str]], chunk: int | None) -> int:
    """Compare one tensor, recording what differs; returns the bytes compared."""
    info = stored.info
    if (info.dtype, info.shape) != (expected.dtype, expected.shape):
        problems[expected.name].append(
            f"{info.dtype} {list(info.shape)} in {stored.file.name}, planned {expected.dtype} {list(expected.shape)}"
        )
        return 0
    position = 0
    fds: dict[Path, int] = {}
    try:
        # Opened as the headers were, so a file swapped for a FIFO since cannot block the check.
        dst_fd = fds.setdefault(stored.file, open_regular(stored.file, what="shard file")[0])
        for piece in expected.pieces:
            if piece.file is not None and piece.file not in fds:
                fds[piece.file] = open_regular(piece.file, what="shard file")[0]
            for want in piece_chunks(fds.get(piece.file, -1), piece, chunk=chunk):
                have = read_exact(dst_fd, stored.offset + position, len(want), stored.file)
                if have != want:
                    at = position + _first_difference(have, want)
                    problems[expected.name].append(f"bytes differ from the plan, first at byte {at} of the tensor")
                    return position
                position += len(want)
    except (CheckpointError, OSError) as e:
        problems[expected.name].append(f"cannot be read: {e}")
    finally:
        for fd in fds.values():
            os.close(fd)
    return position


def _first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """Index of the first byte where `a` and `b` differ (they are known to differ), by bisection."""
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


def _check_total_size(stored: _Destination, problems: dict[str, list[str]]) -> None:
    declared = stored.metadata.get("total_size")
    actual = sum(t.info.nbytes for t in stored.tensors.values())
    if isinstance(declared, int) and declared != actual and not problems:
        problems[INDEX_NAME].append(f"metadata.total_size is {declared}, but its tensors hold {actual} bytes")
