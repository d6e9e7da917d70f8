"""The records a plan is made of: byte pieces of source files, the output tensors they fill, and
the groups of source tensors a converter turned into one output tensor."""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..reading.safetensors_format import DTYPE_SIZES
from ..reading.tensor_table import SourceTensor

if TYPE_CHECKING:
    from ..reading.quantization_records import Scales


@dataclass(frozen=True, slots=True)
class Piece:
    """A run of `length` bytes from a source file; with `transpose` = (rows, cols), a row-major matrix
    that is written transposed; with `cast` = (source dtype, output dtype), elements converted; with
    `scales` too, a quantized matrix dequantized by its scales into the output dtype. With no `file`,
    `length` zero bytes: rows transformers allocates that the checkpoint does not hold."""

    file: Path | None
    offset: int
    length: int
    transpose: tuple[int, int] | None = None
    cast: tuple[str, str] | None = None
    scales: Scales | None = None

    @property
    def out_length(self) -> int:
        """Bytes this piece puts in the output: `length`, unless a cast changes the element size."""
        if self.cast is None:
            return self.length
        source, output = self.cast
        if self.scales is not None:  # packed integers hold several values per byte
            return self.scales.shape[0] * self.scales.shape[1] * DTYPE_SIZES[output]
        return self.length // DTYPE_SIZES[source] * DTYPE_SIZES[output]


@dataclass(frozen=True, slots=True)
class OutputTensor:
    """One tensor of the output and the source pieces that make it, in order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: Sequence[Piece]  # a tuple, or PieceRuns for the many plain copies of fused experts

    @property
    def nbytes(self) -> int:
        if isinstance(self.pieces, PieceRuns):
            return self.pieces.total_length
        return sum(piece.out_length for piece in self.pieces)


class PieceRuns(Sequence[Piece]):
    """Plain copies (no transpose, cast or scales) as three arrays instead of an object each.

    A fused tensor of 768 experts is up to 1,536 pieces, a frontier checkpoint's plan 300k: as
    Piece objects with their offsets that is about 130 bytes a piece, here 18. Each Piece is made
    again when it is read.
    """

    __slots__ = ("_files", "_file_ids", "_offsets", "_lengths")

    def __init__(self, pieces: Iterable[Piece]) -> None:
        self._build((piece.file, piece.offset, piece.length) for piece in pieces)

    @classmethod
    def of_copies(cls, copies: Iterable[tuple[Path | None, int, int]]) -> PieceRuns:
        """(file, offset, length) copies (no file: zeros), each continuing the one before in the same
        file merged into it, as `coalesce` merges pieces; no Piece is made."""
        runs = cls.__new__(cls)
        runs._build(copies, merge=True)
        return runs

    def _build(self, copies: Iterable[tuple[Path | None, int, int]], merge: bool = False) -> None:
        files: dict[Path | None, int] = {}
        file_ids, offsets, lengths = array("I"), array("q"), array("q")
        last_file, end = -1, -1
        for file, offset, length in copies:
            if merge:
                if length == 0:
                    continue
                if offset == end and file is not None and (file is last_file or file == last_file):
                    lengths[-1] += length
                    end += length
                    continue
                last_file, end = file, offset + length
            file_ids.append(files.setdefault(file, len(files)))
            offsets.append(offset)
            lengths.append(length)
        self._files, self._file_ids, self._offsets, self._lengths = tuple(files), file_ids, offsets, lengths

    def copies(self) -> Iterator[tuple[Path | None, int, int]]:
        """(file, offset, length) of each piece, without making the pieces."""
        files = self._files
        for file_id, offset, length in zip(self._file_ids, self._offsets, self._lengths):  # noqa: B905 (equal lengths)
            yield files[file_id], offset, length

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self)[index]
        return Piece(self._files[self._file_ids[index]], self._offsets[index], self._lengths[index])

    def __iter__(self) -> Iterator[Piece]:
        files = self._files
        for file_id, offset, length in zip(self._file_ids, self._offsets, self._lengths):  # noqa: B905 (equal lengths)
            yield Piece(files[file_id], offset, length)

    @property
    def total_length(self) -> int:
        return sum(self._lengths)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"PieceRuns({list(self)!r})"


@dataclass(frozen=True, slots=True)
class FusedGroup:
    """An output tensor built by a converter from `sources` source tensors, the first `first_source`.

    Only the first key is kept, not every key: a plan of 300k experts would otherwise keep every name
    of the source alive (30 MB) after its tensor map is let go.
    """

    target: str
    operation: str
    num_experts: int
    first_source: str
    sources: int

    @classmethod
    def of(cls, target: str, operation: str, num_experts: int, keys: Sequence[str]) -> FusedGroup:
        return cls(target, operation, num_experts, keys[0], len(keys))


def zeros(length: int) -> Piece:
    """`length` zero bytes."""
    return Piece(None, 0, length)


def piece_of(tensor: SourceTensor) -> Piece:
    """All of `tensor`'s bytes as one piece (dequantized, if the plan says so)."""
    if tensor.scales is None:
        return Piece(tensor.file, tensor.offset, tensor.nbytes)
    cast = (tensor.scales.quantized_dtype, tensor.dtype)
    return Piece(tensor.file, tensor.offset, tensor.nbytes, cast=cast, scales=tensor.scales)


def plain(pieces: Sequence[Piece]) -> bool:
    """Whether every piece is a copy of bytes as they are (no transpose, cast or scales)."""
    return isinstance(pieces, PieceRuns) or all(
        p.transpose is None and p.cast is None and p.scales is None for p in pieces
    )


def transposed(pieces: Sequence[Piece]) -> bool:
    """Whether any piece is written transposed."""
    return not isinstance(pieces, PieceRuns) and any(p.transpose is not None for p in pieces)


def copies(pieces: Sequence[Piece]) -> Iterator[tuple[Path | None, int, int]]:
    """(file, offset, length) of each piece (no file: zeros)."""
    if isinstance(pieces, PieceRuns):
        return pieces.copies()
    return ((p.file, p.offset, p.length) for p in pieces)


def compact(pieces: Iterable[Piece]) -> Sequence[Piece]:
    """`pieces` coalesced, as PieceRuns when every one is a plain copy, else as a tuple."""
    merged = coalesce(pieces)
    if all(p.transpose is None and p.cast is None and p.scales is None for p in merged):
        return PieceRuns(merged)
    return tuple(merged)


def coalesce(pieces: Iterable[Piece]) -> list[Piece]:
    """Merge pieces that continue each other in the same file into one longer copy."""
    merged: list[Piece] = []
    for piece in pieces:
        if piece.length == 0:
            continue
        last = merged[-1] if merged else None
        if (
            last
            and last.transpose is None
            and piece.transpose is None
            and last.scales is None
            and piece.scales is None
            and last.cast == piece.cast
            and last.file == piece.file
            and last.offset + last.length == piece.offset
        ):
            merged[-1] = Piece(last.file, last.offset, last.length + piece.length, cast=last.cast)
        else:
            merged.append(piece)
    return merged
