"""What a quantized checkpoint is planned with: its `Quantization` (from config.json), and the `Scales`
(with `ZeroPoints`) of each quantized matrix planned dequantized.

Imported only where a checkpoint declares a `quantization_config`: a plain checkpoint's modules name
these records in annotations alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .quantized_dtypes import FP4_WEIGHT_DTYPE, FP8_WEIGHT_DTYPES, SCALE_BYTES

if TYPE_CHECKING:
    from .compressed_tensors import CompressedTensors


# No slots: one per checkpoint (Scales and ZeroPoints, one per quantized matrix, keep them).
@dataclass(frozen=True)
class Quantization:
    """What `quantization_config` says, as far as the layout depends on it."""

    method: str
    block: tuple[int, int] | None  # (rows, cols) of one scale; None: per tensor or per channel
    scale_fmt: str
    activation_scheme: str
    expert_dtype: str = "fp8"  # "fp4": routed experts are FP4 packed in I8; compressed-tensors: "int4", "int8"
    compressed: CompressedTensors | None = None  # compressed-tensors: its weight schemes

    @property
    def weight_dtypes(self) -> tuple[str, ...]:
        """The dtypes of quantized weights, each with a scale."""
        return FP8_WEIGHT_DTYPES + ((FP4_WEIGHT_DTYPE,) if self.expert_dtype == "fp4" else ())

    def describe(self) -> str:
        if self.compressed is not None:
            return f"{self.method} ({self.compressed.experts.describe()})"
        block = f"block {self.block[0]}x{self.block[1]}" if self.block else "per-tensor/per-channel scales"
        experts = ", FP4 experts" if self.expert_dtype == "fp4" else ""
        return f"{self.method} ({block}, scale_fmt {self.scale_fmt}, {self.activation_scheme} activations{experts})"


@dataclass(frozen=True, slots=True)
class Scales:
    """The scales of one quantized matrix of `shape`, stored as `quantized_dtype`: element [i, j] is
    `q[i, j] * scale[i // block rows, j // block cols]` (`name` is the scale tensor's key)."""

    name: str
    file: Path
    offset: int
    dtype: str
    grid: tuple[int, int]
    block: tuple[int, int]
    shape: tuple[int, int]
    quantized_dtype: str
    # compressed-tensors: integers of `bits` bits packed in int32 words, each row padded to whole words.
    bits: int | None = None
    zero_points: ZeroPoints | None = None
    # The dtype the product is rounded to first (compressed-tensors multiplies in the scale's dtype).
    rounding: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.grid) * SCALE_BYTES[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Stored bytes of one row of the quantized matrix."""
        cols = self.shape[1]
        return cols if self.bits is None else -(-cols * self.bits // 32) * 4


@dataclass(frozen=True, slots=True)
class ZeroPoints:
    """Zero points of an asymmetric compressed-tensors matrix: one per scale, `bits`-bit integers packed
    in int32 words along the rows (a [ceil(rows * bits / 32), grid cols] tensor named `name`)."""

    name: str
    file: Path
    offset: int
    nbytes: int
    bits: int
