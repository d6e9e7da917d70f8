"""The records a plan is made of: byte pieces of source files, the output tensors they fill, and
the groups of source tensors a converter turned into one output tensor."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..reading.quantization import Scales
from ..reading.safetensors_format import DTYPE_SIZES
from ..reading.source import SourceTensor


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
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(piece.out_length for piece in self.pieces)


@dataclass(frozen=True, slots=True)
class FusedGroup:
    """An output tensor built by a converter from `source_keys`."""

    target: str
    operation: str
    num_experts: int
    source_keys: tuple[str, ...]


def zeros(length: int) -> Piece:
    """`length` zero bytes."""
    return Piece(None, 0, length)


def piece_of(tensor: SourceTensor) -> Piece:
    """All of `tensor`'s bytes as one piece (dequantized, if the plan says so)."""
    if tensor.scales is None:
        return Piece(tensor.file, tensor.offset, tensor.nbytes)
    cast = (tensor.scales.quantized_dtype, tensor.dtype)
    return Piece(tensor.file, tensor.offset, tensor.nbytes, cast=cast, scales=tensor.scales)


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
