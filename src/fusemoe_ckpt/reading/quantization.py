"""A checkpoint's quantization, from config.json's `quantization_config`: which format, which blocks.

fusemoe-ckpt reads FP8 block-quantized checkpoints (`quant_method: "fp8"`: F8_E4M3 weights, each
with a `weight_scale_inv` over `weight_block_size` blocks, F32 or E8M0 scales). Other methods are
refused by name, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

FP8_WEIGHT_DTYPES = ("F8_E4M3", "F8_E5M2")
# F32 (scale_fmt "float"), BF16, and E8M0 exponents (scale_fmt "ue8m0") stored as F8_E8M0 or raw U8.
SCALE_SIZES = {"F32": 4, "BF16": 2, "F8_E8M0": 1, "U8": 1}
SCALE_SUFFIX = "_scale_inv"  # `weight` -> `weight_scale_inv`, and `gate_up_proj` -> `gate_up_proj_scale_inv`
# Static activation scales: transformers 5.24 loads `activation_scale` of plain linears, never of experts.
ACTIVATION_SCALE_NAMES = ("activation_scale", "input_scale")

_REFUSED_METHODS = {
    "gptq": "transformers 5.24 does not fuse GPTQ experts (qweight/qzeros/scales stay per expert)",
    "awq": "transformers 5.24 does not fuse AWQ experts (qweight/qzeros/scales stay per expert)",
    "compressed-tensors": "compressed-tensors experts must be dequantized, which fusemoe-ckpt does not do yet",
}


@dataclass(frozen=True, slots=True)
class Quantization:
    """What `quantization_config` says, as far as the layout depends on it."""

    method: str
    block: tuple[int, int] | None  # (rows, cols) of one scale; None: per tensor or per channel
    scale_fmt: str
    activation_scheme: str

    def describe(self) -> str:
        block = f"block {self.block[0]}x{self.block[1]}" if self.block else "per-tensor/per-channel scales"
        return f"{self.method} ({block}, scale_fmt {self.scale_fmt}, {self.activation_scheme} activations)"


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

    @property
    def nbytes(self) -> int:
        return math.prod(self.grid) * SCALE_SIZES[self.dtype]


def quantization_of(config: dict | None, path: Path) -> Quantization | None:
    """The quantization config.json at `path` declares, or None.

    Raises:
        CheckpointError: a method fusemoe-ckpt does not handle, or a malformed FP8 config; the
            message names config.json, the field and why.
    """
    spec = (config or {}).get("quantization_config")
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise CheckpointError(f"{path}: quantization_config is not a JSON object")
    method = spec.get("quant_method")
    if method != "fp8":
        reason = _REFUSED_METHODS.get(method, "fusemoe-ckpt reads FP8 block-quantized checkpoints (quant_method fp8)")
        raise CheckpointError(f"{path}: quantization_config.quant_method {method!r} is not supported: {reason}")
    expert_dtype = spec.get("expert_dtype", "fp8")
    if expert_dtype != "fp8":
        raise CheckpointError(f"{path}: quantization_config.expert_dtype {expert_dtype!r} is not supported (only fp8)")
    block = spec.get("weight_block_size")
    if block is not None:
        if not (isinstance(block, list) and len(block) == 2 and all(_positive(b) for b in block)):
            raise CheckpointError(f"{path}: quantization_config.weight_block_size {block!r} is not [rows, cols]")
        block = (block[0], block[1])
    scale_fmt = spec.get("scale_fmt") or "float"
    activation_scheme = spec.get("activation_scheme") or "dynamic"
    if scale_fmt not in ("float", "ue8m0"):
        raise CheckpointError(f"{path}: quantization_config.scale_fmt {scale_fmt!r} is not 'float' or 'ue8m0'")
    if activation_scheme not in ("dynamic", "static"):
        raise CheckpointError(
            f"{path}: quantization_config.activation_scheme {activation_scheme!r} is not 'dynamic' or 'static'"
        )
    return Quantization("fp8", block, scale_fmt, activation_scheme)


def scale_grid(
    shape: tuple[int, ...], block: tuple[int, int] | None, scale_shape: tuple[int, ...]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(grid, block) of the scales of a weight of `shape`: with weight_block_size, a grid of
    ceil(rows / block rows) x ceil(cols / block cols) (a partial last block is fine: the index is
    `i // block rows`); without, one scale ([], [1]) or one per row ([rows], [rows, 1]).

    Raises:
        ValueError: `scale_shape` is not such a grid; the message says which it should be.
    """
    rows, cols = shape
    if block is not None:
        expected = (-(-rows // block[0]), -(-cols // block[1]))
        if tuple(scale_shape) != expected:
            raise ValueError(f"expected {list(expected)} for weight_block_size {list(block)}")
        return expected, block
    if tuple(scale_shape) in ((), (1,), (1, 1)):
        return (1, 1), (rows, cols)
    if tuple(scale_shape) in ((rows,), (rows, 1)):
        return (rows, 1), (1, cols)
    raise ValueError(f"expected [], [1], [{rows}] or [{rows}, 1] (no weight_block_size)")


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
