"""compressed-tensors checkpoints (llm-compressor's output): what `quantization_config` says, and
which configurations fusemoe-ckpt dequantizes exactly as transformers does.

transformers 5.24 dequantizes the routed experts of these checkpoints at load (its quantizer's
`CompressedTensorsDequantize` runs before the expert merge), so their fused layout is floating.
Accepted, for `convert --dequantize`:

- `pack-quantized` integer weights of 4 or 8 bits (`weight_packed` int32, `weight_scale`,
  `weight_shape`, and for asymmetric schemes a packed `weight_zero_point`), with `group`,
  `channel` or `tensor` scales;
- `float-quantized` and `naive-quantized` FP8 weights (an F8_E4M3 `weight` and its `weight_scale`)
  with `channel` or `tensor` scales.

Asymmetric schemes (a packed `weight_zero_point`) are read for layers other than routed experts;
transformers 5.24 fails on asymmetric experts, so they are refused. Packed experts are held in the
dtype of their scales, as transformers holds them (it keeps what compressed-tensors returns).

Activations quantized on the fly (`dynamic`, as FP8_DYNAMIC) are fine: a dequantized model computes in
its floating dtype, as transformers' dequantized model does. Everything else is refused by name:
static activation or output quantization and KV-cache schemes (scales a dequantized model has no
place for), block-scaled FP8 (transformers cannot dequantize such experts), NVFP4/MXFP4 and other
formats, other bit widths, sparsity and transforms (a dequantized weight would not be the model's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from .files import open_regular, read_exact

PACKED = "pack-quantized"
FLOAT_FORMATS = ("float-quantized", "naive-quantized")
# The tensors one compressed linear layer `x` stores beside or instead of `x.weight`.
PACKED_SUFFIX = ".weight_packed"
SCALE_SUFFIX = ".weight_scale"
SHAPE_SUFFIX = ".weight_shape"
ZERO_POINT_SUFFIX = ".weight_zero_point"
# Companions of schemes refused here; found in a checkpoint, they are named.
REFUSED_SUFFIXES = (".weight_global_scale", ".input_scale", ".input_zero_point", ".input_global_scale")
_STRATEGIES = ("group", "channel", "tensor")


@dataclass(frozen=True, slots=True)
class WeightScheme:
    """How one config group quantizes weights."""

    format: str
    kind: str  # "int" or "float"
    bits: int
    strategy: str  # "group", "channel" or "tensor"
    group_size: int | None
    symmetric: bool

    def describe(self) -> str:
        group = f" {self.group_size}" if self.strategy == "group" else ""
        symmetric = "" if self.symmetric else " asymmetric"
        return f"{self.format} {self.kind}{self.bits}{symmetric}, {self.strategy}{group} scales"


@dataclass(frozen=True, slots=True)
class CompressedTensors:
    """The weight schemes transformers applies: one for routed experts, one for the other layers."""

    experts: WeightScheme
    dense: WeightScheme

    def scheme_of(self, key: str) -> WeightScheme:
        """The scheme of the weight `key`: transformers picks the experts' group for expert weights."""
        return self.experts if ".experts." in key else self.dense


def compressed_tensors_of(spec: dict, path: Path) -> CompressedTensors:
    """Parse a compressed-tensors `quantization_config`.

    transformers picks the experts' scheme as the config group whose `re:` targets mention experts,
    else the first group with class-name targets (`Linear`); the other layers' as the first group
    without such targets (`integrations/compressed_tensors.py`). The same choice is made here.

    Raises:
        CheckpointError: a configuration fusemoe-ckpt cannot dequantize as transformers does, named.
    """
    where = f"{path}: quantization_config"
    for field in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if spec.get(field):
            raise CheckpointError(
                f"{where}.{field} is set: compressed-tensors {field.removesuffix('_config')} "
                "is not supported (a dequantized weight would not be the model's)"
            )
    status = spec.get("quantization_status")
    if status not in (None, "compressed"):
        raise CheckpointError(f"{where}.quantization_status {status!r} is not 'compressed'")
    groups = spec.get("config_groups")
    if not isinstance(groups, dict) or not groups or not all(isinstance(g, dict) for g in groups.values()):
        raise CheckpointError(f"{where}.config_groups is not an object of config groups")
    named = list(groups.items())

    def targets(group: dict) -> list:
        found = group.get("targets")
        return found if isinstance(found, list) else []

    def mentions_experts(group: dict) -> bool:
        return any(isinstance(t, str) and t.startswith("re:") and "experts" in t for t in targets(group))

    experts = next((item for item in named if mentions_experts(item[1])), None)
    experts = experts or next(
        (item for item in named if any(isinstance(t, str) and not t.startswith("re:") for t in targets(item[1]))),
        named[0],
    )
    dense = next((item for item in named if not mentions_experts(item[1])), named[0])
    default_format = spec.get("format")
    expert_scheme = _scheme(*experts, default_format, where)
    if not expert_scheme.symmetric:
        # Its expert path builds a module without the zero points and fails ("Asymmetric quant requires
        # zero-point values"), so no transformers model holds these experts.
        raise CheckpointError(
            f"{where}.config_groups.{experts[0]}: asymmetric experts (weight_zero_point) are not supported: "
            "transformers 5.24 cannot dequantize them at load"
        )
    return CompressedTensors(expert_scheme, _scheme(*dense, default_format, where))


def _scheme(name: str, group: dict, default_format: object, where: str) -> WeightScheme:
    where = f"{where}.config_groups.{name}"
    for field in ("input_activations", "output_activations"):
        args = group.get(field)
        if args is None:
            continue
        if not isinstance(args, dict):
            raise CheckpointError(f"{where}.{field} is not an object")
        if field == "output_activations" or args.get("dynamic") not in (True, "local"):
            raise CheckpointError(
                f"{where}.{field}: static {field.replace('_', ' ')} quantization is not supported "
                "(transformers' dequantized model has no place for its scales); only dynamic input activations"
            )
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{where}.weights: no weight quantization to dequantize")
    form = group.get("format") or default_format
    kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
    group_size, symmetric = weights.get("group_size"), weights.get("symmetric", True)
    if form == PACKED:
        if kind != "int" or bits not in (4, 8):
            raise CheckpointError(f"{where}.weights: {kind}{bits} in {PACKED} is not supported (int4 or int8)")
    elif form in FLOAT_FORMATS:
        if kind != "float" or bits != 8:
            raise CheckpointError(f"{where}.weights: {kind}{bits} in {form} is not supported (float8)")
        if not symmetric:
            raise CheckpointError(f"{where}.weights: asymmetric FP8 is not supported")
    else:
        raise CheckpointError(
            f"{where}.format {form!r} is not supported: fusemoe-ckpt dequantizes {PACKED} (int4, int8) "
            f"and {' / '.join(FLOAT_FORMATS)} (FP8)"
        )
    if strategy not in _STRATEGIES or (form != PACKED and strategy == "group"):
        allowed = _STRATEGIES if form == PACKED else _STRATEGIES[1:]
        raise CheckpointError(
            f"{where}.weights.strategy {strategy!r} is not supported for {form} ({', '.join(allowed)})"
        )
    whole = isinstance(group_size, int) and not isinstance(group_size, bool)
    if strategy == "group" and not (whole and group_size > 0):
        raise CheckpointError(f"{where}.weights.group_size {group_size!r} is not a positive whole number")
    if not isinstance(symmetric, bool):
        raise CheckpointError(f"{where}.weights.symmetric {symmetric!r} is not true or false")
    if not symmetric and strategy == "tensor":
        raise CheckpointError(f"{where}.weights: asymmetric per-tensor scales are not supported")
    return WeightScheme(form, kind, bits, strategy, group_size if strategy == "group" else None, symmetric)


def stored_shape(name: str, file: Path, offset: int, dtype: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """The values of a `weight_shape` tensor: the (rows, columns) of the matrix packed beside it. It is
    the one tensor whose values a plan needs (16 bytes; the header alone cannot tell the columns of a
    packed row apart from its padding).

    Raises:
        CheckpointError: not two positive integers, named by key and file.
    """
    sizes = {"I64": 8, "I32": 4}
    if dtype not in sizes or tuple(shape) != (2,):
        raise CheckpointError(f"{name}: {dtype} {list(shape)}, not the two I64 sizes of a matrix ({file})")
    fd = open_regular(file, what="shard file")[0]
    try:
        data = read_exact(fd, offset, 2 * sizes[dtype], file)
    finally:
        os.close(fd)
    rows, cols = (int.from_bytes(data[i : i + sizes[dtype]], "little", signed=True) for i in (0, sizes[dtype]))
    if rows <= 0 or cols <= 0:
        raise CheckpointError(f"{name}: [{rows}, {cols}] is not the shape of a matrix ({file})")
    return rows, cols
