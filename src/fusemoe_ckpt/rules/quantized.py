"""The family rule of a quantized checkpoint, as transformers' quantizer extends it.

For FP8 (`quantizers/base.py::update_weight_conversions`), every converter whose sources all end in
`.weight` and whose target the quantized model holds a scale for gets a twin right after it, with
`_scale_inv` appended to each source and to the target and the same operations:
`mlp.experts.*.gate_proj.weight_scale_inv` and `…up_proj.weight_scale_inv` become
`mlp.experts.gate_up_proj_scale_inv`, stacked and concatenated exactly like the weights. Routed
experts always get such a scale (`FP8Experts`); other fused targets are not twinned here, and
plan/quantization.py refuses a scale left beside a weight they fuse.

The quantizer also puts two renames before the model's own (`update_weight_conversions` of the FP8
quantizer): a DeepSeek-V4 scale `x.scale` and a Mistral `x.qscale_weight` become `x.weight_scale_inv`.
They are applied to a checkpoint that names its scales so: elsewhere they rename nothing transformers
keeps (a model's own `attn_hc.scale` is renamed and taken back, which is no rename at all).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ..reading.quantization import SCALE_SUFFIX
from .families import Family
from .patterns import Converter, ExpertMerge, Rename

if TYPE_CHECKING:
    from ..reading.quantization_records import Quantization

# The FP8 quantizer's renames, before every other (transformers' `FineGrainedFP8HfQuantizer`).
SCALE_RENAMES = (
    Rename((r"^(.+)\.scale",), r"\1.weight_scale_inv"),
    Rename((r"\.qscale_weight",), ".weight_scale_inv"),
)


def for_quantization(
    family: Family, quantization: Quantization | None, *, fuse_scales: bool = True, rename_scales: bool = False
) -> Family:
    """`family` with the converters transformers adds for `quantization` (none when None): the scale
    twins, unless not `fuse_scales` (a dequantized output, whose scales are consumed); and with
    `rename_scales` (a checkpoint naming scales `x.scale`), the quantizer's renames."""
    if quantization is None:
        return family
    converters: list[Converter] = []
    for converter in family.converters:
        converters.append(converter)
        twin = scale_twin(converter) if fuse_scales else None
        if twin is not None:
            converters.append(twin)
    return replace(family, converters=tuple(converters), quantizer_renames=SCALE_RENAMES if rename_scales else ())


def scale_twin(converter: Converter) -> Converter | None:
    """The converter that fuses the scales of `converter`'s weights, or None if it fuses no `.weight`."""
    if not isinstance(converter, ExpertMerge) or not all(s.endswith(".weight") for s in converter.sources):
        return None
    # transformers' quantizer copies the converter with its scope (a sub-model's merge stays scoped).
    sources = tuple(s + SCALE_SUFFIX for s in converter.sources)
    return type(converter)(sources, converter.target + SCALE_SUFFIX, scope=converter.scope)


def is_scale_twin(converter: Converter) -> bool:
    return converter.target.endswith(SCALE_SUFFIX)
