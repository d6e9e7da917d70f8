"""A checkpoint's tensors by name, held as columns: what a frontier checkpoint's 300k tensors cost.

A `SourceTensor` is where one tensor's bytes live. A `TensorTable` holds many of them without an
object or a string per tensor: the names one after another in one buffer, the offsets and kinds in
arrays, and a hash table of the names for lookups, about 80 bytes a tensor beside its name's
length instead of 200. It is a read-only mapping from name to `SourceTensor`, in the order the
tensors were added; each `SourceTensor` is made when asked for, and planning that needs only some
of them refers to the rest by row number.
"""

from __future__ import annotations

from array import array
from collections.abc import ItemsView, Iterable, Iterator, Mapping, ValuesView
from pathlib import Path
from typing import TYPE_CHECKING

from .safetensors_format import TensorInfo

if TYPE_CHECKING:
    from .quantization_records import Scales

# dtype, shape, file, size in bytes, and the scales of a weight planned dequantized (else None)
Kind = tuple[str, tuple[int, ...], Path, int, "Scales | None"]


class SourceTensor:
    """Where one source tensor's bytes live: `name`, `dtype`, `shape`, `file`, `offset`, `nbytes`, and
    `scales`, set on a quantized weight planned dequantized (`dtype` is then the dtype it becomes).

    Immutable. What the experts of a shard have in common (dtype, shape, file, size) is one shared
    tuple, a tensor holding only its name, offset and that tuple.
    """

    __slots__ = ("name", "offset", "_kind")

    name: str
    offset: int
    _kind: Kind

    def __init__(
        self,
        name: str,
        dtype: str,
        shape: tuple[int, ...],
        file: Path,
        offset: int,
        nbytes: int,
        scales: Scales | None = None,
    ) -> None:
        _set(self, name, offset, (dtype, shape, file, nbytes, scales))

    dtype = property(lambda self: self._kind[0])
    shape = property(lambda self: self._kind[1])
    file = property(lambda self: self._kind[2])
    nbytes = property(lambda self: self._kind[3])
    scales = property(lambda self: self._kind[4])

    def replace(self, **changes: object) -> SourceTensor:
        """A copy with `changes` (field names as the constructor's)."""
        return SourceTensor(**{**dict(zip(_FIELDS, self._values(), strict=True)), **changes})

    def _values(self) -> tuple:
        dtype, shape, file, nbytes, scales = self._kind
        return self.name, dtype, shape, file, self.offset, nbytes, scales

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"SourceTensor is immutable: cannot set {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SourceTensor):
            return NotImplemented
        return (self.name, self.offset, self._kind) == (other.name, other.offset, other._kind)

    def __hash__(self) -> int:
        return hash((self.name, self.offset, self._kind))

    def __reduce__(self):
        return SourceTensor, self._values()

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={v!r}" for f, v in zip(_FIELDS, self._values(), strict=True))
        return f"SourceTensor({fields})"


_FIELDS = ("name", "dtype", "shape", "file", "offset", "nbytes", "scales")
_SET_NAME = SourceTensor.__dict__["name"].__set__
_SET_OFFSET = SourceTensor.__dict__["offset"].__set__
_SET_KIND = SourceTensor.__dict__["_kind"].__set__


def _set(tensor: SourceTensor, name: str, offset: int, kind: Kind) -> None:
    _SET_NAME(tensor, name)
    _SET_OFFSET(tensor, offset)
    _SET_KIND(tensor, kind)


def _make(name: str, offset: int, kind: Kind) -> SourceTensor:
    tensor = object.__new__(SourceTensor)
    _set(tensor, name, offset, kind)
    return tensor


# Names are stored as UTF-8; a JSON header may spell a lone surrogate, which round-trips this way.
_ENCODING, _ERRORS = "utf-8", "surrogatepass"


class TensorTable(Mapping[str, SourceTensor]):
    """Name -> `SourceTensor`, in the order added, held as columns (see the module).

    Filled by `add` while a checkpoint is read, then only read. `without` gives the same table with
    some names left out, sharing its columns.
    """

    def __init__(self, expected: int = 0) -> None:
        """`expected`: how many rows are coming, if known (the hash table is sized for them at once)."""
        self._names = bytearray()  # every name's UTF-8 bytes, one after another
        self._ends = array("Q")  # where each row's name ends in _names
        self._offsets = array("Q")
        self._kind_rows = array("I")  # each row's index into _kinds
        self._kinds: list[Kind] = []
        self._kind_ids: dict[Kind, int] = {}
        self._hashes = array("q")  # each row's hash(name)
        # open addressing: row + 1, 0 for empty; at most half full
        self._slots = array("i", [0]) * max(8, 1 << (2 * expected).bit_length())
        self._hidden: frozenset[int] = frozenset()

    @classmethod
    def of(cls, tensors: Iterable[SourceTensor], expected: int = 0) -> TensorTable:
        """A table of `tensors`, the first of each name kept (`expected`: as the constructor's)."""
        table = cls(expected)
        table._extend((t.name, t.offset, table._kind_id(t._kind)) for t in tensors)
        return table

    def add_tensor(self, tensor: SourceTensor) -> int:
        """`add` of `tensor`'s fields."""
        return self.add(tensor.name, tensor.offset, tensor._kind)

    def add(self, name: str, offset: int, kind: Kind) -> int:
        """Add a row; returns -1, or the row already holding `name` (the table is left unchanged)."""
        found = self._extend(((name, offset, self._kind_id(kind)),))
        return -1 if found is None else found[1]

    def add_shard(self, path: Path, data_start: int, infos: Iterable[TensorInfo]) -> tuple[str, int] | None:
        """Add the tensors of the shard at `path` whose data starts at `data_start`, the first of each
        name kept; returns the first name already held and the row holding it, or None."""
        kind_ids: dict[tuple, int] = {}

        def rows() -> Iterator[tuple[str, int, int]]:
            for info in infos:
                kind_id = kind_ids.get(key := (info.dtype, info.shape, info.nbytes))
                if kind_id is None:
                    kind_id = kind_ids[key] = self._kind_id((info.dtype, info.shape, path, info.nbytes, None))
                yield info.name, data_start + info.start, kind_id

        return self._extend(rows())

    def _kind_id(self, kind: Kind) -> int:
        if kind[4] is not None:  # a weight's scales are its own: nothing to share
            self._kinds.append(kind)
            return len(self._kinds) - 1
        kind_id = self._kind_ids.get(kind)
        if kind_id is None:
            kind_id = self._kind_ids[kind] = len(self._kinds)
            self._kinds.append(kind)
        return kind_id

    def _extend(self, rows: Iterable[tuple[str, int, int]]) -> tuple[str, int] | None:
        """Append `rows` (name, offset, kind id), skipping a name already held; returns the first name
        skipped and the row holding it, or None. One loop for every row: reading 300k is most of it."""
        names, ends, offsets, kind_rows, hashes = self._names, self._ends, self._offsets, self._kind_rows, self._hashes
        first = None
        for name, offset, kind_id in rows:
            h = hash(name)
            row, slot = self._find(name, h)
            if row >= 0:
                first = first or (name, row)
            else:
                row = len(offsets)
                names += name.encode(_ENCODING, _ERRORS)
                ends.append(len(names))
                offsets.append(offset)
                kind_rows.append(kind_id)
                hashes.append(h)
                self._slots[slot] = row + 1
                if 2 * (row + 1) > len(self._slots):
                    self._grow()
        return first

    def _find(self, name: str, h: int) -> tuple[int, int]:
        """(the row holding `name`, whose hash is `h`, or -1; the slot it is in, or the empty one it
        would go in)."""
        slots, hashes = self._slots, self._hashes
        mask = len(slots) - 1
        slot = h & mask
        while (row := slots[slot] - 1) >= 0:
            if hashes[row] == h and self.name(row) == name:
                return row, slot
            slot = (slot + 1) & mask
        return -1, slot

    def row(self, name: str) -> int:
        """The row holding `name`, or -1."""
        row = self._find(name, hash(name))[0]
        return -1 if row in self._hidden else row

    def kind(self, row: int) -> Kind:
        """The dtype, shape, file, size and scales of `row`'s tensor."""
        return self._kinds[self._kind_rows[row]]

    def name(self, row: int) -> str:
        return self._names[self._ends[row - 1] if row else 0 : self._ends[row]].decode(_ENCODING, _ERRORS)

    def tensor(self, row: int, name: str | None = None) -> SourceTensor:
        """The tensor of `row` (`name`: its name, when the caller has it already)."""
        return _make(self.name(row) if name is None else name, self._offsets[row], self._kinds[self._kind_rows[row]])

    def rows(self) -> Iterator[tuple[int, str]]:
        """(row, name) of every tensor, in order."""
        names, hidden, start = self._names, self._hidden, 0
        for row, end in enumerate(self._ends):
            if row not in hidden:
                yield row, names[start:end].decode(_ENCODING, _ERRORS)
            start = end

    def may_name(self, text: str) -> bool:
        """False when no name holds `text` (one search of the names' bytes: a pass over every name
        for a suffix no name has is skipped)."""
        return text.encode(_ENCODING, _ERRORS) in self._names

    def without(self, names: Iterable[str]) -> TensorTable:
        """This table less `names` (itself when there are none), sharing its columns."""
        hidden = {row for name in names if (row := self.row(name)) >= 0}
        if not hidden:
            return self
        table = object.__new__(TensorTable)
        table.__dict__.update(self.__dict__)
        table._hidden = self._hidden | hidden
        return table

    def start_of_each_file(self) -> dict[Path, int]:
        """The smallest offset of a tensor in each file."""
        kinds, hidden, found = self._kinds, self._hidden, {}
        for row, (offset, k) in enumerate(zip(self._offsets, self._kind_rows, strict=True)):
            file = kinds[k][2]
            if row not in hidden and offset < found.get(file, offset + 1):
                found[file] = offset
        return found

    @property
    def total_bytes(self) -> int:
        kinds, hidden = self._kinds, self._hidden
        return sum(kinds[k][3] for row, k in enumerate(self._kind_rows) if row not in hidden)

    def __getitem__(self, name: str) -> SourceTensor:
        row = self.row(name)
        if row < 0:
            raise KeyError(name)
        return self.tensor(row, name)

    def get(self, name: str, default: SourceTensor | None = None) -> SourceTensor | None:
        row = self.row(name)
        return default if row < 0 else self.tensor(row, name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.row(name) >= 0

    def __iter__(self) -> Iterator[str]:
        return (name for _, name in self.rows())

    @property
    def row_count(self) -> int:
        """How many rows there are, those `without` leaves out included: every row number is below."""
        return len(self._offsets)

    def __len__(self) -> int:
        return len(self._offsets) - len(self._hidden)

    def items(self) -> ItemsView[str, SourceTensor]:
        return _Items(self)

    def values(self) -> ValuesView[SourceTensor]:
        return _Values(self)

    def __reduce__(self):
        # Hashes of names differ between processes: rebuild rather than copy the hash table.
        return TensorTable.of, (list(self.values()),)

    def _grow(self) -> None:
        slots = array("i", [0]) * (2 * len(self._slots))
        mask = len(slots) - 1
        for row, h in enumerate(self._hashes):
            slot = h & mask
            while slots[slot]:
                slot = (slot + 1) & mask
            slots[slot] = row + 1
        self._slots = slots


class _Items(ItemsView):
    def __iter__(self) -> Iterator[tuple[str, SourceTensor]]:
        table = self._mapping
        for row, name in table.rows():
            yield name, table.tensor(row, name)


class _Values(ValuesView):
    def __iter__(self) -> Iterator[SourceTensor]:
        table = self._mapping
        for row, name in table.rows():
            yield table.tensor(row, name)
