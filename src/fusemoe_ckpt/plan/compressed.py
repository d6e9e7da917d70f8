"""Plan a compressed-tensors checkpoint dequantized: every compressed linear layer becomes one
floating `weight` that carries its scales, as transformers holds it after dequantizing at load.

A packed layer `x` stores `x.weight_packed` (int32 words, each row padded to whole words),
`x.weight_scale` (per group, channel or tensor), `x.weight_shape` (its rows and columns) and, when
asymmetric, `x.weight_zero_point` (packed along the rows); an FP8 layer stores an F8_E4M3
`x.weight` and its `x.weight_scale`. Each is checked against the scheme and against the others.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import CheckpointError
from ..naming import natural_key
from ..reading.compressed_tensors import (
    PACKED,
    PACKED_SUFFIX,
    REFUSED_SUFFIXES,
    SCALE_SUFFIX,
    SHAPE_SUFFIX,
    ZERO_POINT_SUFFIX,
    CompressedTensors,
    WeightScheme,
    stored_shape,
)
from ..reading.quantization_records import Scales, ZeroPoints
from ..reading.quantized_dtypes import FP8_WEIGHT_DTYPES
from ..reading.tensor_table import SourceTensor, TensorTable

# Scales compressed-tensors writes: the model's dtype, or float32.
_SCALE_DTYPES = ("BF16", "F16", "F32")


def compressed_view(
    source: Mapping[str, SourceTensor], compressed: CompressedTensors, output: str, *, forced: bool = False
) -> TensorTable:
    """The `source` tensors with every compressed layer `x` planned as `x.weight` dequantized to
    `output`, its companions consumed. Packed routed experts become their scales' dtype unless
    `forced` (`--dtype`): transformers keeps the dtype compressed-tensors returns for them, a
    float32 expert in a bfloat16 model where the scales are float32.

    Raises:
        CheckpointError: a companion missing, left over or of the wrong dtype or shape, a packed
            shape that does not hold the stored one, a group size that does not divide the columns;
            named by key and file.
    """
    tensors = TensorTable(len(source))
    consumed: set[str] = set()
    for key in sorted(source, key=natural_key):
        tensor = source[key]
        if key.endswith(REFUSED_SUFFIXES):
            raise CheckpointError(
                f"{key}: a compressed-tensors {key.rpartition('.')[2]}, of a scheme fusemoe-ckpt does not "
                f"dequantize ({tensor.file})"
            )
        if key.endswith(PACKED_SUFFIX):
            module = key.removesuffix(PACKED_SUFFIX)
            scheme = compressed.scheme_of(key)
            if module + ".weight" in source:
                raise CheckpointError(
                    f"{module}.weight: stored beside {key}, which compressed-tensors stores instead of it "
                    f"({source[module + '.weight'].file})"
                )
            scales, used = _packed(module, source, scheme)
        elif key.endswith(".weight") and tensor.dtype in FP8_WEIGHT_DTYPES:
            module = key.removesuffix(".weight")
            scheme = compressed.scheme_of(key)
            scales, used = _float8(module, source, scheme)
        else:
            continue
        consumed |= used
        held = scales.dtype if scales.bits is not None and ".experts." in key and not forced else output
        tensors.add_tensor(tensor.replace(name=module + ".weight", dtype=held, shape=scales.shape, scales=scales))
    for key in sorted(source, key=natural_key):
        if key in consumed or key in tensors:
            continue
        if key.endswith((SCALE_SUFFIX, SHAPE_SUFFIX, ZERO_POINT_SUFFIX)):
            module = key.rpartition(".")[0]
            raise CheckpointError(
                f"{key}: a compressed-tensors companion without its weight ({module}.weight_packed or an FP8 "
                f"{module}.weight) ({source[key].file})"
            )
        tensors.add_tensor(source[key])
    return tensors


def _packed(module: str, source: dict[str, SourceTensor], scheme: WeightScheme) -> tuple[Scales, set[str]]:
    packed = source[module + PACKED_SUFFIX]
    if scheme.format != PACKED:
        raise CheckpointError(
            f"{packed.name}: a packed weight, but its config group's format is {scheme.format} ({packed.file})"
        )
    if packed.dtype != "I32" or len(packed.shape) != 2:
        raise CheckpointError(
            f"{packed.name}: {packed.dtype} {list(packed.shape)}, not an I32 matrix of packed weights ({packed.file})"
        )
    shape_tensor = _companion(source, module, SHAPE_SUFFIX, packed)
    rows, cols = stored_shape(
        shape_tensor.name, shape_tensor.file, shape_tensor.offset, shape_tensor.dtype, shape_tensor.shape
    )
    words = -(-cols * scheme.bits // 32)
    if tuple(packed.shape) != (rows, words):
        raise CheckpointError(
            f"{packed.name}: shape {list(packed.shape)} does not hold {shape_tensor.name} [{rows}, {cols}] "
            f"of {scheme.bits}-bit values: expected [{rows}, {words}] ({packed.file})"
        )
    scale = _companion(source, module, SCALE_SUFFIX, packed)
    grid, block = _grid(scale, packed, (rows, cols), scheme)
    used = {packed.name, shape_tensor.name, scale.name}
    zero_points = None
    zero_key = module + ZERO_POINT_SUFFIX
    if not scheme.symmetric:
        zero = _companion(source, module, ZERO_POINT_SUFFIX, packed)
        expected = (-(-grid[0] * scheme.bits // 32), grid[1])
        if zero.dtype != "I32" or tuple(zero.shape) != expected:
            raise CheckpointError(
                f"{zero.name}: {zero.dtype} {list(zero.shape)}, expected I32 {list(expected)}: the zero points "
                f"of {scheme.bits}-bit {packed.name}, packed along the rows ({zero.file})"
            )
        zero_points = ZeroPoints(zero.name, zero.file, zero.offset, zero.nbytes, scheme.bits)
        used.add(zero.name)
    elif zero_key in source:
        raise CheckpointError(
            f"{zero_key}: a zero point, but the config group's weights are symmetric ({source[zero_key].file})"
        )
    scales = Scales(
        scale.name,
        scale.file,
        scale.offset,
        scale.dtype,
        grid,
        block,
        (rows, cols),
        "I32",
        bits=scheme.bits,
        zero_points=zero_points,
        rounding=scale.dtype,
    )
    return scales, used


def _float8(module: str, source: dict[str, SourceTensor], scheme: WeightScheme) -> tuple[Scales, set[str]]:
    weight = source[module + ".weight"]
    if scheme.kind != "float":
        raise CheckpointError(
            f"{weight.name}: an {weight.dtype} weight, but its config group quantizes to {scheme.kind}"
            f"{scheme.bits} ({weight.file})"
        )
    if len(weight.shape) != 2:
        raise CheckpointError(f"{weight.name}: {weight.dtype} {list(weight.shape)} is not a matrix ({weight.file})")
    scale = _companion(source, module, SCALE_SUFFIX, weight)
    grid, block = _grid(scale, weight, weight.shape, scheme)
    # transformers dequantizes FP8 experts in float32 and rounds once to the model's dtype; other
    # layers go through compressed-tensors, which multiplies in the scale's dtype.
    rounding = None if ".experts." in weight.name else scale.dtype
    scales = Scales(
        scale.name, scale.file, scale.offset, scale.dtype, grid, block, weight.shape, weight.dtype, rounding=rounding
    )
    return scales, {scale.name}


def _companion(source: dict[str, SourceTensor], module: str, suffix: str, of: SourceTensor) -> SourceTensor:
    tensor = source.get(module + suffix)
    if tensor is None:
        raise CheckpointError(f"{module}{suffix}: missing: the {suffix[1:]} of {of.name} ({of.file})")
    return tensor


def _grid(
    scale: SourceTensor, weight: SourceTensor, shape: tuple[int, int], scheme: WeightScheme
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(grid, block) of `scale` for a matrix of `shape` under `scheme`'s strategy."""
    rows, cols = shape
    if scale.dtype not in _SCALE_DTYPES:
        raise CheckpointError(
            f"{scale.name}: dtype {scale.dtype} is not a scale dtype ({', '.join(_SCALE_DTYPES)}) ({scale.file})"
        )
    if scheme.strategy == "group":
        size = scheme.group_size
        if cols % size:
            raise CheckpointError(
                f"{weight.name}: {cols} columns are not a multiple of group_size {size}, as compressed-tensors "
                f"requires to dequantize it ({weight.file})"
            )
        grid, block, accepted = (rows, cols // size), (1, size), [(rows, cols // size)]
    elif scheme.strategy == "channel":
        grid, block, accepted = (rows, 1), (1, cols), [(rows, 1)]
    else:
        grid, block, accepted = (1, 1), (rows, cols), [(1,), (1, 1), ()]
    if tuple(scale.shape) not in accepted:
        raise CheckpointError(
            f"{scale.name}: shape {list(scale.shape)} does not match {weight.name} [{rows}, {cols}] with "
            f"{scheme.strategy} scales: expected {list(accepted[0])} ({scale.file})"
        )
    return grid, block
