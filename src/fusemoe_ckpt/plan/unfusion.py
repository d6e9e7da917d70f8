"""The way back: split fused tensors into per-expert ones and undo the family's renames.

Names come from the family table reversed the way transformers reverses it when it saves the
original format (`revert_weight_conversion`): at most one converter's target, then the family's
renames in reverse order, each with target and source swapped (the legacy renames and prefix
changes stay, as in transformers). Every name is then checked forward: convert must map it back to the fused key it
came from, else unfuse refuses, naming the key. Splitting is byte ranges again, so the writer and
its bounded memory are convert's.
"""

from __future__ import annotations

from ..errors import FamilyError
from ..naming import natural_key
from ..reading.quantization import quantization_of
from ..reading.safetensors_format import DTYPE_SIZES
from ..reading.source import CONFIG_NAME, SourceCheckpoint, SourceTensor
from ..rules.families import Family
from ..rules.patterns import Concatenate, Converter, ExpertMerge, Rename, TransposeExperts, map_key
from ..rules.quantized import for_quantization
from .conversion import config_hidden_size
from .layout import ConversionPlan, lay_out
from .operations import hidden_axis
from .pieces import FusedGroup, OutputTensor, Piece


def plan_unfuse(source: SourceCheckpoint, family: Family, *, max_shard_size: int) -> ConversionPlan:
    """Every tensor of a fused checkpoint under its original name; fused ones split per expert.

    Raises:
        FamilyError: a tensor is still per expert, a fused shape cannot be split, or a reversed
            name would not convert back to the key it came from.
    """
    family = for_quantization(family, quantization_of(source.config, source.root / CONFIG_NAME))
    reverse_renames = tuple(r.reversed() for r in reversed(family.renames) if not r.prefix_change)
    hidden_size = config_hidden_size(source.config)
    outputs: dict[str, OutputTensor] = {}
    groups: list[FusedGroup] = []
    for key in sorted(source.tensors, key=natural_key):
        tensor = source.tensors[key]
        already = map_key(key, (), family.converters).converter
        if isinstance(already, ExpertMerge | Concatenate):
            raise FamilyError(
                f"{key}: already in the per-expert layout of family {family.name}; unfuse takes a fused checkpoint"
            )
        converter = next((c for c in family.converters if c.match_output(key)), None)
        if converter is None:
            parts = [(key, OutputTensor(key, tensor.dtype, tensor.shape, (_whole(tensor),)), None, None)]
        else:
            parts = _split(tensor, converter, hidden_size)
        names = []
        for unrenamed, part, slot, expert in parts:
            name = _rename_all(unrenamed, reverse_renames)
            _check_forward(name, key, family, converter, slot, expert)
            if name in outputs:
                raise FamilyError(f"{key}: unfuses to {name!r}, which another tensor also becomes")
            outputs[name] = OutputTensor(name, part.dtype, part.shape, part.pieces)
            names.append(name)
        if converter is not None:
            groups.append(FusedGroup(key, f"split_{type(converter).__name__}", len(parts), tuple(names)))
    ordered = sorted(outputs.values(), key=lambda t: natural_key(t.name))
    return lay_out(family, ordered, groups, max_shard_size)


def _whole(tensor: SourceTensor) -> Piece:
    return Piece(tensor.file, tensor.offset, tensor.nbytes)


def _rename_all(key: str, renames: tuple[Rename, ...]) -> str:
    for rename in renames:
        key = rename.apply(key)
    return key


def _replace_target(key: str, converter: Converter, text: str) -> str:
    match = converter.match_output(key)
    return key[: match.start()] + text + key[match.end() :]


Part = tuple[str, OutputTensor, int | None, int | None]


def _split(tensor: SourceTensor, converter: Converter, hidden_size: int | None) -> list[Part]:
    """(name before renames, tensor, source slot, expert) for each tensor the fused one came from."""
    if isinstance(converter, TransposeExperts):
        return [(tensor.name, _turn_back(tensor, hidden_size), 0, None)]
    slots = len(converter.sources)
    if isinstance(converter, ExpertMerge):
        if len(tensor.shape) < 3 or tensor.shape[1] % slots:
            raise FamilyError(
                f"{tensor.name}: {list(tensor.shape)} is not a fused [experts, rows, cols] tensor of "
                f"{slots} equal parts per expert"
            )
        experts, rows, rest = tensor.shape[0], tensor.shape[1] // slots, tensor.shape[2:]
    else:
        if not tensor.shape or tensor.shape[0] % slots:
            raise FamilyError(f"{tensor.name}: {list(tensor.shape)} does not split into {slots} equal parts on dim 0")
        experts, rows, rest = 1, tensor.shape[0] // slots, tensor.shape[1:]
    size = DTYPE_SIZES[tensor.dtype] * rows
    for dim in rest:
        size *= dim
    parts = []
    for expert in range(experts):
        texts = converter.source_texts(expert if isinstance(converter, ExpertMerge) else None)
        for slot, text in enumerate(texts):
            offset = tensor.offset + (expert * slots + slot) * size
            name = _replace_target(tensor.name, converter, text)
            part = OutputTensor(name, tensor.dtype, (rows, *rest), (Piece(tensor.file, offset, size),))
            parts.append((name, part, slot, expert if isinstance(converter, ExpertMerge) else None))
    return parts


def _turn_back(tensor: SourceTensor, hidden_size: int | None) -> OutputTensor:
    """A fused expert tensor in transformers' orientation turned back to the stored one (hidden axis
    moved), exactly when convert would have turned the stored one: when the other axis is not also
    hidden_size."""
    axis = hidden_axis(tensor, tensor.name, hidden_size)
    experts, rows, cols = tensor.shape
    if tensor.shape[axis] != hidden_size:
        raise FamilyError(
            f"{tensor.name}: {list(tensor.shape)} is not in transformers' orientation (hidden_size {hidden_size} "
            f"on axis {axis}); it is not convert's output"
        )
    if tensor.shape[3 - axis] == hidden_size:
        return OutputTensor(tensor.name, tensor.dtype, tensor.shape, (_whole(tensor),))
    size = rows * cols * DTYPE_SIZES[tensor.dtype]
    pieces = tuple(Piece(tensor.file, tensor.offset + e * size, size, transpose=(rows, cols)) for e in range(experts))
    return OutputTensor(tensor.name, tensor.dtype, (experts, cols, rows), pieces)


def _check_forward(
    name: str, key: str, family: Family, converter: Converter | None, slot: int | None, expert: int | None
) -> None:
    """Refuse a reversed name that convert would not map back to `key` (a rename that cannot be undone)."""
    mapping = family.map_key(name)
    expected_expert = None if expert is None else str(expert)
    if (
        mapping.target == key
        and mapping.converter is converter
        and (converter is None or (mapping.slot, mapping.expert) == (slot, expected_expert))
    ):
        return
    raise FamilyError(
        f"{key}: cannot be unfused unambiguously for family {family.name}: the reversed renames give {name!r}, "
        f"which convert maps to {mapping.target!r}"
    )
