"""Read and write safetensors headers without touching tensor data.

A safetensors file is an 8-byte little-endian header length, a JSON header, then the data buffer.
Every header is treated as untrusted: each check below names the file and the key it failed on.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple

from ..errors import CheckpointError
from .files import open_regular
from .json_document import parse_json, shorten

# Same cap as the safetensors library: a header larger than this is refused before it is read.
MAX_HEADER_BYTES = 100_000_000
# Header and data start are aligned to this many bytes, as safetensors itself writes them.
HEADER_ALIGNMENT = 8
# The kernel copies file bytes page by page; a copy whose source and destination offsets differ by a
# whole number of pages moves pages, any other copy shifts every byte (twice as slow here).
PAGE_SIZE = 4096
# safetensors holds shapes, element counts and bit counts in a usize.
_MAX_SIZE = 2**64 - 1

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
# Each dtype name once: a header repeats it for every tensor, and a checkpoint of 300k tensors keeps them all.
_DTYPE_NAMES = {name: name for name in DTYPE_SIZES}


class TensorInfo(NamedTuple):
    """One tensor entry of a safetensors header; offsets are relative to the data buffer.

    A named tuple: a header of thousands of entries makes one each, and a tuple is made in a third of
    the time of a frozen dataclass."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


# No slots: one per file, and slots=True builds the class twice at import.
@dataclass(frozen=True)
class ShardHeader:
    """The parsed header of one safetensors file."""

    path: Path
    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    def absolute_range(self, name: str) -> tuple[int, int]:
        """File offset and length of tensor `name`'s bytes."""
        info = self.tensors[name]
        return self.data_start + info.start, info.nbytes


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    return DTYPE_SIZES[dtype] * math.prod(shape)


def read_header(path: Path) -> ShardHeader:
    """Parse and validate the header of the safetensors file at `path`.

    Raises:
        CheckpointError: the file is missing, not a regular file, or its header is malformed.
    """
    fd, st = open_regular(path, what="shard file")
    file_size = st.st_size
    with os.fdopen(fd, "rb") as f:
        if file_size < 8:
            raise CheckpointError(f"{path}: truncated: {file_size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + header_len > file_size:
            raise CheckpointError(
                f"{path}: truncated: header length {header_len} runs past the end of the {file_size}-byte file"
            )
        raw = f.read(header_len)
    if len(raw) != header_len:
        raise CheckpointError(f"{path}: truncated while reading: header of {header_len} bytes, read {len(raw)}")
    parsed = parse_json(
        raw,
        path,
        subject="header is not valid UTF-8 JSON",
        # serde keeps the last of duplicate keys, a reader of the first sees another tensor: refuse both.
        on_duplicate=lambda key: f"header names tensor {key!r} twice",
    )
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    data_start = 8 + header_len
    tensors, metadata = _validate_entries(path, parsed, file_size - data_start)
    return ShardHeader(path=path, data_start=data_start, tensors=tensors, metadata=metadata)


def _validate_entries(path: Path, parsed: dict, data_len: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    # null is how serde writes "no metadata"; any other non-object (false, 0, "") is malformed.
    metadata = parsed.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # each shape once: the experts of a shard share a few
    # (dtype, *shape) of an entry that passed every check -> (its shape, its byte count)
    checked: dict[tuple, tuple[tuple[int, ...], int]] = {}
    for name, entry in parsed.items():
        tensors[name] = _known_entry(name, entry, data_len, checked) or _parse_entry(
            path, name, entry, data_len, shapes, checked
        )
    # safetensors requires the tensors to tile the data buffer exactly: no overlap, no gap.
    position = 0
    for info in sorted(tensors.values(), key=_START_END):
        if info.start < position:
            raise CheckpointError(f"{path}: tensor {info.name!r} overlaps the tensor before it")
        if info.start > position:
            raise CheckpointError(
                f"{path}: tensor {info.name!r} starts at {info.start}, leaving a gap after {position}"
            )
        position = info.end
    if position != data_len:
        raise CheckpointError(
            f"{path}: tensors cover {position} bytes but the data buffer holds {data_len} (truncated or padded file)"
        )
    return tensors, metadata


_START_END = attrgetter("start", "end")


def _known_entry(name: str, entry: object, data_len: int, checked: dict) -> TensorInfo | None:
    """The entry when its dtype and shape are those of an entry already checked and its offsets are
    integers inside the buffer, as many bytes apart as they need; else None (`_parse_entry` checks
    it and says what is wrong). A header repeats a few dtypes and shapes for thousands of tensors."""
    if type(entry) is not dict:
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if type(dtype) is not str or type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
        return None
    # Exact ints only: True and 1.0 are equal to 1, and hash alike, but no size.
    if not set(map(type, shape)) <= _INT:
        return None
    known = checked.get((dtype, *shape))
    start, end = offsets
    if known is None or type(start) is not int or type(end) is not int:
        return None
    if not 0 <= start <= end <= data_len or end - start != known[1]:
        return None
    return TensorInfo(name, _DTYPE_NAMES[dtype], known[0], start, end)


_INT = frozenset((int,))


def _parse_entry(
    path: Path,
    name: str,
    entry: object,
    data_len: int,
    shapes: dict[tuple[int, ...], tuple[int, ...]],
    checked: dict[tuple, tuple[tuple[int, ...], int]],
) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: tensor {name!r}: entry is not a JSON object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{path}: tensor {name!r}: unknown dtype {shorten(dtype)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r}: shape {shorten(shape)} is not a list of sizes")
    if _overflows(dtype, shape):
        raise CheckpointError(
            f"{path}: tensor {name!r}: shape {shorten(shape)} overflows a 64-bit size (safetensors refuses it too)"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {shorten(offsets)} is not [start, end]")
    start, end = offsets
    if not start <= end <= data_len:
        raise CheckpointError(
            f"{path}: tensor {name!r}: data_offsets [{start}, {end}] outside the {data_len}-byte data buffer"
        )
    expected = tensor_nbytes(dtype, shape)
    if end - start != expected:
        raise CheckpointError(f"{path}: tensor {name!r}: {end - start} bytes but {dtype} {shape} needs {expected}")
    if all(type(d) is int for d in shape):
        checked[(dtype, *shape)] = (shapes.setdefault(tuple(shape), tuple(shape)), expected)
    shape = shapes.setdefault(tuple(shape), tuple(shape))
    return TensorInfo(name=name, dtype=_DTYPE_NAMES[dtype], shape=shape, start=start, end=end)


def _overflows(dtype: str, shape: list[int]) -> bool:
    """Whether safetensors' own check fails: a dimension, or the running product of the dimensions
    (in order, from 1), or that count in bits, past a 64-bit size. `[0, 2**64]` holds no element and
    still overflows, as `[2**32, 2**32, 0]` does."""
    count = 1
    for dimension in shape:
        count *= dimension
        if dimension > _MAX_SIZE or count > _MAX_SIZE:
            return True
    return count * DTYPE_SIZES[dtype] * 8 > _MAX_SIZE


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def encode_header(
    entries: Iterable[TensorInfo], metadata: dict[str, str], *, data_start_residue: int | None = None
) -> bytes:
    """Length prefix plus JSON header, space-padded so the data buffer starts 8-byte aligned, and with
    `data_start_residue` (a multiple of 8) at that offset modulo PAGE_SIZE."""
    out = bytearray(8)  # the length, set below
    for text in header_texts(entries, metadata):
        out += text
    length = padded_header_length(len(out) - 8, data_start_residue)
    out += b" " * (length + 8 - len(out))
    struct.pack_into("<Q", out, 0, length)
    return bytes(out)


def header_texts(entries: Iterable[TensorInfo], metadata: dict[str, str]) -> Iterator[bytes]:
    """The JSON header in consecutive parts, unpadded: what json.dumps(separators=(",", ":")) gives
    for {"__metadata__": ..., name: entry, ...}, entry by entry (json.dumps writes ASCII), so a shard
    of 300k small tensors needs no dict of 300k dicts, nor the whole text at once, to say it."""
    # What json.dumps gives for one string, without its dispatch: a header of 300k names calls it 600k times.
    quote = encode_basestring_ascii
    yield b'{"__metadata__":' + json.dumps(dict(metadata), separators=(",", ":")).encode()
    for info in entries:
        shape = ",".join(map(str, info.shape))
        yield (
            f',{quote(info.name)}:{{"dtype":{quote(info.dtype)},"shape":[{shape}],'
            f'"data_offsets":[{info.start},{info.end}]}}'
        ).encode()
    yield b"}"


def padded_header_length(json_length: int, data_start_residue: int | None = None) -> int:
    """The header length (after the 8-byte prefix) of `json_length` bytes of JSON padded with spaces:
    the data buffer starts 8-byte aligned, or at `data_start_residue` modulo PAGE_SIZE."""
    if data_start_residue is None:
        return json_length + -json_length % HEADER_ALIGNMENT
    return json_length + (data_start_residue - 8 - json_length) % PAGE_SIZE
