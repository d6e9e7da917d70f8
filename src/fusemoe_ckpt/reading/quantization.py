"""A checkpoint's quantization, from config.json's `quantization_config`: which format, which blocks.

fusemoe-ckpt reads FP8 block-quantized checkpoints (`quant_method: "fp8"`: F8_E4M3 weights, each
with a `weight_scale_inv` over `weight_block_size` blocks, F32 or E8M0 scales), and the DeepSeek-V4
variant whose routed experts are FP4 (`expert_dtype: "fp4"`: two E2M1 values packed in each I8 byte,
one scale per row and 32 values) and whose scales are named `.scale`; compressed-tensors
checkpoints are read by `compressed_tensors.py` (dequantized only). Other methods are refused by
name, with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError

if TYPE_CHECKING:
    from .quantization_records import Quantization

# The quant_method compressed_tensors.py reads (imported only for such a checkpoint).
COMPRESSED_TENSORS = "compressed-tensors"
SCALE_SUFFIX = "_scale_inv"  # `weight` -> `weight_scale_inv`, and `gate_up_proj` -> `gate_up_proj_scale_inv`
# DeepSeek-V4 names the scale of `x.weight` `x.scale`; transformers' FP8 quantizer renames it `x.weight_scale_inv`.
DOT_SCALE = ".scale"
# Static activation scales: transformers 5.24 loads `activation_scale` of plain linears, never of experts.
ACTIVATION_SCALE_NAMES = ("activation_scale", "input_scale")
EXPERT_DTYPES = ("fp8", "fp4")
# Model types whose config class moves a top-level `expert_dtype` into quantization_config (DeepSeek-V4
# checkpoints ship it beside quantization_config).
_EXPERT_DTYPE_AT_TOP = ("deepseek_v4",)

_REFUSED_METHODS = {
    "gptq": "transformers 5.24 does not fuse GPTQ experts (qweight/qzeros/scales stay per expert)",
    "awq": "transformers 5.24 does not fuse AWQ experts (qweight/qzeros/scales stay per expert)",
}


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
    if method == COMPRESSED_TENSORS:
        from .compressed_tensors import compressed_tensors_of
        from .quantization_records import Quantization

        compressed = compressed_tensors_of(spec, path)
        experts = compressed.experts
        stored = "fp8" if experts.kind == "float" else f"int{experts.bits}"
        return Quantization(method, None, "float", "dynamic", stored, compressed=compressed)
    if method != "fp8":
        reason = _REFUSED_METHODS.get(method, "fusemoe-ckpt reads FP8 block-quantized checkpoints (quant_method fp8)")
        raise CheckpointError(f"{path}: quantization_config.quant_method {method!r} is not supported: {reason}")
    expert_dtype = spec.get("expert_dtype")
    if expert_dtype is None and config.get("model_type") in _EXPERT_DTYPE_AT_TOP:
        expert_dtype = config.get("expert_dtype")
    expert_dtype = expert_dtype or "fp8"
    if expert_dtype not in EXPERT_DTYPES:
        raise CheckpointError(
            f"{path}: quantization_config.expert_dtype {expert_dtype!r} is not supported (fp8 or fp4)"
        )
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
    from .quantization_records import Quantization

    return Quantization("fp8", block, scale_fmt, activation_scheme, expert_dtype)


def scale_keys(weight: str) -> tuple[str, ...]:
    """The keys the scale of quantized tensor `weight` may have: `weight_scale_inv`, or DeepSeek-V4's `.scale`."""
    if weight.endswith(".weight"):
        return weight + SCALE_SUFFIX, weight.removesuffix(".weight") + DOT_SCALE
    return (weight + SCALE_SUFFIX,)


def weight_of_scale(key: str) -> str | None:
    """The key of the weight that scale `key` belongs to by its name, or None if `key` is no scale name."""
    if key.endswith(SCALE_SUFFIX):
        return key.removesuffix(SCALE_SUFFIX)
    if key.endswith(DOT_SCALE):
        return key.removesuffix(DOT_SCALE) + ".weight"
    return None


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
