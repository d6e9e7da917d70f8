"""Plan a quantized (FP8) checkpoint: every quantized weight paired with its scales and checked, then
either kept quantized (the scales fused beside the weights, as transformers' GPU path holds them) or
planned dequantized (the scales consumed, the weight written in a floating dtype).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING

from ..errors import CheckpointError, FamilyError
from ..naming import FirstError, natural_key
from ..reading.quantization import (
    ACTIVATION_SCALE_NAMES,
    DOT_SCALE,
    SCALE_SUFFIX,
    scale_grid,
    scale_keys,
    weight_of_scale,
)
from ..reading.quantized_dtypes import FP4_BLOCK, FP4_WEIGHT_DTYPE, SCALE_SIZES
from ..reading.tensor_table import SourceTensor, TensorTable
from .pieces import FusedGroup, OutputTensor

if TYPE_CHECKING:
    from ..reading.quantization_records import Quantization, Scales

# config.json's dtype names, as safetensors names them: what a dequantized weight becomes by default.
CONFIG_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def paired_scales(table: TensorTable, quantization: Quantization, *, keep: bool = True) -> dict[str, Scales]:
    """The scales of every quantized tensor in `table`, by the quantized tensor's key; with
    `keep` False, the checks alone (a plan that keeps the weights quantized needs no Scales record
    per weight: 70k of them at Kimi-K2 FP8, about 10 MB).

    A scale is `x.weight_scale_inv`, or `x.scale` (DeepSeek-V4) where `x.weight` is quantized.

    Raises:
        CheckpointError: a quantized tensor without its scale, a scale without its quantized tensor,
            a scale of the wrong dtype or a shape that does not match the block; named by key.
    """
    quantized_dtypes = quantization.weight_dtypes
    found: dict[str, Scales] = {}
    passed: set[tuple] = set()  # (dtype, shape) of weight and scale that pass the checks
    first_error = FirstError()
    # By row: a tensor is made only where its scale is checked or an error names its file. A scale
    # found by its weight is a scale of a quantized tensor; the others are looked at after.
    scale_rows, claimed = array("q"), bytearray(table.row_count)
    for row, key in table.rows():
        if _is_scale(key, table):
            scale_rows.append(row)
            continue
        dtype, shape = table.kind(row)[:2]
        if dtype not in quantized_dtypes:
            continue
        names = scale_keys(key)
        scale_row = next((r for name in names if (r := table.row(name)) >= 0), -1)
        if scale_row < 0:
            tensor = table.tensor(row, key)
            first_error.add(key, partial(_missing_scale, key, tensor, names, table, quantization))
            continue
        claimed[scale_row] = 1
        kind = (dtype, shape, *table.kind(scale_row)[:2])
        if not keep and kind in passed:
            continue  # _scales depends on these alone: checked already
        try:
            scales = _scales(table.tensor(row, key), table.tensor(scale_row), quantization)
        except CheckpointError as error:
            first_error.add(key, error)
            continue
        passed.add(kind)
        if keep:
            found[key] = scales
    for row in scale_rows:
        if not claimed[row]:
            key = table.name(row)
            weight = weight_of_scale(key)
            quantized = table.row(weight)
            if quantized < 0 or table.kind(quantized)[0] not in quantized_dtypes:
                what = "no tensor" if quantized < 0 else f"{table.kind(quantized)[0]} tensor"
                first_error.add(key, CheckpointError(f"{key}: a scale of {what} {weight!r} ({table.kind(row)[2]})"))
    first_error.raise_first()
    return found


def _missing_scale(
    key: str, tensor: SourceTensor, names: tuple[str, ...], tensors: dict[str, SourceTensor], quantization: Quantization
) -> CheckpointError:
    """The error for quantized `key` without a scale, the scale named as this checkpoint names its
    scales (`x.scale`, DeepSeek-V4, or `x.weight_scale_inv`): as the scales of the quantized tensors
    before `key` in natural order are named, or before any, as every key named like a scale of a
    present weight. (The first error in natural order: every quantized tensor before it has its scale.)"""
    order = natural_key(key)
    before = [
        scale
        for k, t in tensors.items()
        if t.dtype in quantization.weight_dtypes
        and not _is_scale(k, tensors)
        and natural_key(k) < order
        and (scale := _scale_key(scale_keys(k), tensors)) is not None
    ]
    named = before or [k for k in tensors if (w := weight_of_scale(k)) is not None and w in tensors]
    missing = names[-1] if any(name.endswith(DOT_SCALE) for name in named) else names[0]
    return CheckpointError(f"{missing}: missing: the scale of {tensor.dtype} tensor {key} ({tensor.file})")


def _scale_key(names: tuple[str, ...], tensors: dict[str, SourceTensor]) -> str | None:
    """The first of a quantized tensor's possible scale keys `names` that the checkpoint holds."""
    return next((name for name in names if name in tensors), None)


def _is_scale(key: str, tensors: dict[str, SourceTensor]) -> bool:
    """Whether `key` is a scale: named `x.weight_scale_inv`, or `x.scale` beside an `x.weight`."""
    weight = weight_of_scale(key)
    return weight is not None and (key.endswith(SCALE_SUFFIX) or weight in tensors)


def names_scales_dot_scale(tensors: TensorTable, quantization: Quantization) -> bool:
    """Whether the checkpoint names the scale of a quantized `x.weight` `x.scale` (DeepSeek-V4)."""
    if not tensors.may_name(DOT_SCALE):
        return False
    for key in tensors:
        if key.endswith(DOT_SCALE):
            weight = tensors.get(weight_of_scale(key))
            if weight is not None and weight.dtype in quantization.weight_dtypes:
                return True
    return False


def _scales(tensor: SourceTensor, scale: SourceTensor, quantization: Quantization) -> Scales:
    if scale.dtype not in SCALE_SIZES:
        raise CheckpointError(
            f"{scale.name}: dtype {scale.dtype} is not a scale dtype ({', '.join(SCALE_SIZES)}) ({scale.file})"
        )
    if len(tensor.shape) not in (2, 3):
        raise CheckpointError(f"{tensor.name}: a quantized tensor of shape {list(tensor.shape)}, not a matrix")
    # A fused [E, rows, cols] tensor has one grid per expert.
    experts = tensor.shape[:-2]
    if scale.shape[: len(experts)] != experts and experts:
        raise CheckpointError(
            f"{scale.name}: shape {list(scale.shape)} does not start with the {experts[0]} experts of {tensor.name}"
        )
    shape, block = tensor.shape[-2:], quantization.block
    if tensor.dtype == FP4_WEIGHT_DTYPE:
        # Two FP4 values per byte; transformers allocates one scale per row and 32 values, E8M0 or F32.
        shape, block = (shape[0], 2 * shape[1]), FP4_BLOCK
        expected = "F8_E8M0" if quantization.scale_fmt == "ue8m0" else "F32"
        if scale.dtype != expected:
            raise CheckpointError(
                f"{scale.name}: dtype {scale.dtype}, but transformers holds the scales of FP4 experts as "
                f"{expected} (scale_fmt {quantization.scale_fmt}) ({scale.file})"
            )
    try:
        grid, block = scale_grid(shape, block, scale.shape[len(experts) :])
    except ValueError as e:
        raise CheckpointError(
            f"{scale.name}: shape {list(scale.shape)} does not match {tensor.name} {list(tensor.shape)}: "
            f"{e} ({scale.file})"
        ) from None
    from ..reading.quantization_records import Scales  # a quantized checkpoint's records

    return Scales(scale.name, scale.file, scale.offset, scale.dtype, grid, block, shape, tensor.dtype)


def refuse_expert_activation_scales(tensors: TensorTable) -> None:
    """Static activation scales of experts: transformers 5.24 leaves them unloaded (and `input_scale`
    anywhere), so a fused FP8 output would not load them either."""
    if not any(map(tensors.may_name, ACTIVATION_SCALE_NAMES)):
        return
    found = [
        key
        for key in tensors
        if (name := key.rpartition(".")[2]) == "input_scale" or (name == "activation_scale" and ".experts." in key)
    ]
    if found:
        key = min(found, key=natural_key)
        raise FamilyError(
            f"{key}: a static activation scale transformers 5.24 does not load for "
            f"{'experts' if '.experts.' in key else 'any layer (it reads activation_scale)'}; "
            "convert with --dequantize, which drops activation scales"
        )


def dequantized_view(source: TensorTable, scales: dict[str, Scales], output: str) -> tuple[TensorTable, list[str]]:
    """The `source` tensors with every quantized matrix planned dequantized to `output`, its scale
    consumed; activation scales dropped (a dequantized model has none). Returns (tensors, dropped keys).

    Raises:
        CheckpointError: a quantized tensor that is not one matrix (a fused [E, rows, cols] one), or
            FP4 experts (not dequantized here yet).
    """
    dropped = []
    consumed = {s.name for s in scales.values()}

    def kept() -> Iterator[SourceTensor]:
        for key, tensor in source.items():
            if key in consumed:
                continue
            if key.rpartition(".")[2] in ACTIVATION_SCALE_NAMES:
                dropped.append(key)
                continue
            scale = scales.get(key)
            if scale is None:
                yield tensor
            elif tensor.dtype == FP4_WEIGHT_DTYPE:
                raise CheckpointError(
                    f"{key}: FP4 experts cannot be dequantized by fusemoe-ckpt yet; convert without --dequantize "
                    "(the fused FP4 layout transformers holds on a GPU)"
                )
            elif len(tensor.shape) != 2:
                raise CheckpointError(
                    f"{key}: fused {tensor.dtype} experts {list(tensor.shape)} cannot be dequantized; "
                    "unfuse the checkpoint first, or convert it without --dequantize"
                )
            else:
                yield tensor.replace(dtype=output, scales=scale)

    tensors = TensorTable.of(kept(), expected=len(source))
    return tensors, sorted(dropped, key=natural_key)


def dequantized_dtype(config: dict | None, dtype: str | None) -> str:
    """What dequantized weights become: `dtype` if given, else config.json's dtype, else BF16."""
    if dtype is not None:
        return dtype
    named = (config or {}).get("dtype") or (config or {}).get("torch_dtype")
    return CONFIG_DTYPES.get(named, "BF16")


def check_fused_scales(
    outputs: dict[str, OutputTensor],
    groups: list[FusedGroup],
    quantization: Quantization,
    tensors: dict[str, SourceTensor],
) -> None:
    """Refuse what transformers cannot hold as fused FP8 (or FP4).

    - A concatenation (gate then up) whose parts do not end on a block boundary: transformers reads
      the scale of fused row r at r // block rows, which is then another part's scale, and it
      allocates max(ceil(2I/B), 2) rows where concatenation gives 2 * ceil(I/B).
    - Experts in another dtype than the one `expert_dtype` makes transformers allocate.
    - A scale left beside a weight that a converter without a scale twin fused (it would not load).
    """
    for group in groups:
        if not group.num_experts:
            continue
        if not group.target.endswith(SCALE_SUFFIX):
            _check_expert_dtype(outputs[group.target], quantization, group)
            continue
        first = group.first_source
        weight = tensors[weight_of_scale(first)]
        fp4 = weight.dtype == FP4_WEIGHT_DTYPE
        if quantization.block is None and not fp4:
            continue
        parts = group.sources // group.num_experts
        rows = weight.shape[0]
        block_rows, block_cols = _scales(weight, tensors[first], quantization).block
        if parts > 1 and rows % block_rows:
            fused = outputs[group.target].shape
            cols = weight.shape[1]
            allocated = [group.num_experts, max(-(-parts * rows // block_rows), 2), -(-cols // block_cols)]
            module = group.target.rpartition(".")[0]
            raise FamilyError(
                f"{module}: FP8 experts with intermediate size {rows}, not a multiple of the {block_rows}-row "
                f"block: concatenated scales {group.target.rpartition('.')[2]} {list(fused)}, transformers "
                f"allocates {allocated} and reads them per {block_rows} fused rows; convert with --dequantize"
            )
    for name in sorted(outputs, key=natural_key):
        if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) not in outputs:
            raise FamilyError(
                f"{name}: the scale of a weight this family fuses without its scales; convert with --dequantize"
            )


def _check_expert_dtype(fused: OutputTensor, quantization: Quantization, group: FusedGroup) -> None:
    fp4 = quantization.expert_dtype == "fp4"
    if fp4 != (fused.dtype == FP4_WEIGHT_DTYPE) and (fp4 or fused.dtype in quantization.weight_dtypes):
        held = "I8 (FP4 packed)" if fp4 else "FP8"
        raise FamilyError(
            f"{group.first_source}: {fused.dtype} experts, but quantization_config's expert_dtype "
            f"{quantization.expert_dtype!r} makes transformers hold {fused.name} as {held}"
        )
