"""Per-expert output tensors held as a few records, not one object each: unfuse's output.

A fused checkpoint of 61 layers of 384 experts unfuses into 141k to 300k tensors; one object per
tensor (its name, piece, header entry and index line) is hundreds of megabytes. Here the tensors a
module's fused tensors split into are one `ExpertRun`: a name template and, for each fused tensor's
slot, the offset arithmetic of its experts. Shards are ranges of the file order; a tensor, its
header entry and its index line exist only while they are written.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import ItemsView, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import overload

from ..naming import natural_key
from ..reading.safetensors_format import TensorInfo, header_texts, padded_header_length
from ..rules.families import Family
from .layout import SHARD_NAME, ConversionPlan, ShardPlan, page_residue
from .pieces import FusedGroup, OutputTensor, Piece

# Header bytes made at a time while a header is written or hashed.
HEADER_CHUNK = 1 << 20
HEADER_METADATA = {"format": "pt"}


@dataclass(frozen=True, slots=True)
class Member:
    """One slot of a fused tensor across its experts: expert e is `length` bytes at
    `offset + e * stride` of `file`, named `{prefix}{e}{suffix}`."""

    suffix: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    stride: int
    length: int


@dataclass(frozen=True, slots=True)
class ExpertRun:
    """The output tensors `{prefix}{e}{suffix}` of experts 0 to `experts - 1`: expert by expert,
    each expert's members in order."""

    prefix: str
    experts: int
    members: tuple[Member, ...]

    def __len__(self) -> int:
        return self.experts * len(self.members)

    def name(self, index: int) -> str:
        expert, slot = divmod(index, len(self.members))
        return f"{self.prefix}{expert}{self.members[slot].suffix}"

    def tensor(self, index: int) -> OutputTensor:
        expert, slot = divmod(index, len(self.members))
        m = self.members[slot]
        piece = Piece(m.file, m.offset + expert * m.stride, m.length)
        return OutputTensor(f"{self.prefix}{expert}{m.suffix}", m.dtype, m.shape, (piece,))


Unit = OutputTensor | ExpertRun


class Tensors(Sequence[OutputTensor]):
    """Output tensors `start` to `stop` of the file order that `units` make, each made when asked for."""

    def __init__(self, units: Sequence[Unit], starts: Sequence[int], start: int, stop: int) -> None:
        self.units = units
        self.starts = starts  # the file-order index of each unit's first tensor
        self.start = start
        self.stop = stop

    def __len__(self) -> int:
        return self.stop - self.start

    @overload
    def __getitem__(self, index: int) -> OutputTensor: ...
    @overload
    def __getitem__(self, index: slice) -> Tensors: ...
    def __getitem__(self, index):
        if isinstance(index, slice):
            first, last, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(first, last, step)]
            return Tensors(self.units, self.starts, self.start + first, self.start + max(first, last))
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        at = self.start + index % len(self)
        unit = bisect_right(self.starts, at) - 1
        found = self.units[unit]
        return found if isinstance(found, OutputTensor) else found.tensor(at - self.starts[unit])

    def name(self, index: int) -> str:
        """The name of tensor `index` (0 to len - 1) of this range."""
        at = self.start + index
        unit = bisect_right(self.starts, at) - 1
        found = self.units[unit]
        return found.name if isinstance(found, OutputTensor) else found.name(at - self.starts[unit])

    def _spans(self) -> Iterator[tuple[Unit, int, int]]:
        """(unit, first, stop) of each unit this range covers, as indices into the unit."""
        unit = bisect_right(self.starts, self.start) - 1
        while unit < len(self.units) and self.starts[unit] < self.stop:
            begin = self.starts[unit]
            found = self.units[unit]
            size = 1 if isinstance(found, OutputTensor) else len(found)
            first, stop = max(self.start, begin) - begin, min(self.stop, begin + size) - begin
            if first < stop:
                yield found, first, stop
            unit += 1

    def __iter__(self) -> Iterator[OutputTensor]:
        for unit, first, stop in self._spans():
            if isinstance(unit, OutputTensor):
                yield unit
            else:
                tensor = unit.tensor
                for i in range(first, stop):
                    yield tensor(i)

    def names(self) -> Iterator[str]:
        for unit, first, stop in self._spans():
            if isinstance(unit, OutputTensor):
                yield unit.name
            else:
                name = unit.name
                for i in range(first, stop):
                    yield name(i)

    def entries(self) -> Iterator[tuple[str, str, tuple[int, ...], int]]:
        """(name, dtype, shape, bytes) of each tensor, in turn: what its header entry says."""
        for unit, first, stop in self._spans():
            if isinstance(unit, OutputTensor):
                yield unit.name, unit.dtype, unit.shape, unit.nbytes
            else:
                name, members = unit.name, unit.members
                for i in range(first, stop):
                    m = members[i % len(members)]
                    yield name(i), m.dtype, m.shape, m.length

    def sizes(self) -> Iterator[tuple[str, int]]:
        """(name, bytes) of each tensor, in turn."""
        for unit, first, stop in self._spans():
            if isinstance(unit, OutputTensor):
                yield unit.name, unit.nbytes
            else:
                name, members = unit.name, unit.members
                for i in range(first, stop):
                    yield name(i), members[i % len(members)].length


class StreamedShard(ShardPlan):
    """A shard whose tensors are a range of the file order and whose header is made as it is read:
    the header of 300k tensors is tens of megabytes. `header` makes it whole, for callers that ask."""

    def __init__(self, filename: str, tensors: Tensors) -> None:
        self.filename = filename
        self.tensors = tensors
        self._residue = page_residue(tensors)
        json_length = 0
        infos = self._infos()
        for text in header_texts(infos, HEADER_METADATA):
            json_length += len(text)
        self._data_size = infos.data_size
        self._header_length = padded_header_length(json_length, self._residue)

    @property
    def header(self) -> bytes:  # type: ignore[override]
        return b"".join(self.header_chunks())

    @property
    def data_size(self) -> int:
        return self._data_size

    @property
    def header_size(self) -> int:
        return 8 + self._header_length

    def header_chunks(self) -> Iterator[bytes]:
        """What `encode_header` gives for these tensors, about HEADER_CHUNK bytes at a time."""
        chunk = bytearray(struct.pack("<Q", self._header_length))
        written = 0
        for text in header_texts(self._infos(), HEADER_METADATA):
            chunk += text
            if len(chunk) >= HEADER_CHUNK:
                written += len(chunk)
                yield bytes(chunk)
                chunk.clear()
        chunk += b" " * (self.header_size - written - len(chunk))
        yield bytes(chunk)

    def _infos(self) -> _Infos:
        return _Infos(self.tensors)


class _Infos:
    """The header entries of `tensors`, in turn; once all are read, `data_size` is their bytes."""

    def __init__(self, tensors: Tensors) -> None:
        self.tensors = tensors
        self.data_size = 0

    def __iter__(self) -> Iterator[TensorInfo]:
        position = 0
        for name, dtype, shape, size in self.tensors.entries():
            yield TensorInfo(name, dtype, shape, position, position + size)
            position += size
        self.data_size = position


class ShardsByName(Mapping[str, str]):
    """The shard file of every output tensor (`tensor_to_filename`), iterated in file order, which is
    natural name order: a name is looked up by bisection."""

    def __init__(self, shards: list[StreamedShard]) -> None:
        self.shards = shards

    def __len__(self) -> int:
        return sum(len(shard.tensors) for shard in self.shards)

    def __iter__(self) -> Iterator[str]:
        for shard in self.shards:
            yield from shard.tensors.names()

    def __getitem__(self, name: str) -> str:
        if not isinstance(name, str):
            raise KeyError(name)
        key = natural_key(name)
        for shard in self.shards:
            tensors = shard.tensors
            low, high = 0, len(tensors)
            while low < high:
                middle = (low + high) // 2
                if natural_key(tensors.name(middle)) < key:
                    low = middle + 1
                else:
                    high = middle
            if low < len(tensors) and tensors.name(low) == name:
                return shard.filename
        raise KeyError(name)

    def items(self) -> ItemsView[str, str]:
        return _InOrder(self)


class _InOrder(ItemsView[str, str]):
    """The items of a `ShardsByName`, read in file order rather than looked up one by one."""

    _mapping: ShardsByName

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for shard in self._mapping.shards:
            for name in shard.tensors.names():
                yield name, shard.filename


def lay_out_units(family: Family, units: list[Unit], groups: list[FusedGroup], max_shard_size: int) -> ConversionPlan:
    """What `lay_out` plans for the tensors `units` make (in file order): the same shards and
    headers, each shard a range of the units."""
    starts = list(accumulate((1 if isinstance(u, OutputTensor) else len(u) for u in units), initial=0))
    total = starts.pop()
    everything = Tensors(units, starts, 0, total)
    bounds = _shard_bounds(everything, groups, max_shard_size)
    shards = [
        StreamedShard(SHARD_NAME.format(index=i + 1, count=len(bounds)), everything[first:stop])
        for i, (first, stop) in enumerate(bounds)
    ]
    return ConversionPlan(family=family, shards=shards, fused_groups=groups, tensor_to_filename=ShardsByName(shards))


def _shard_bounds(tensors: Tensors, groups: list[FusedGroup], max_shard_size: int) -> list[tuple[int, int]]:
    """The (first, stop) tensor indices of each shard `layout._assign_shards` makes: greedy, a
    module's fused tensors kept together when they fit in one shard."""
    module_of = {g.target: g.target.rpartition(".")[0] for g in groups}
    starts = [0]
    current = 0
    unit: list[int] = []  # sizes of the tensors of the unit being gathered
    unit_module = None
    at = 0

    def place(unit: list[int], first: int) -> None:
        nonlocal current
        parts = [unit] if sum(unit) <= max_shard_size else [[size] for size in unit]
        for part in parts:
            part_size = sum(part)
            if first > starts[-1] and current + part_size > max_shard_size:
                starts.append(first)
                current = 0
            current += part_size
            first += len(part)

    for name, size in tensors.sizes():
        module = module_of.get(name)
        if module is not None and unit and unit_module == module:
            unit.append(size)
        else:
            if unit:
                place(unit, at - len(unit))
            unit, unit_module = [size], module
        at += 1
    if unit:
        place(unit, at - len(unit))
    return list(zip(starts, [*starts[1:], at], strict=True))
