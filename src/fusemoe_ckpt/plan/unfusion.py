"""The way back: split fused tensors into per-expert ones and undo the family's renames.

Names come from the family table reversed the way transformers reverses it when it saves the
original format (`revert_weight_conversion`): at most one converter's target, then the family's
renames in reverse order, each with target and source swapped (the legacy renames and prefix
changes stay, as in transformers). Every name is then checked forward: convert must map it back to the fused key it
came from, else unfuse refuses, naming the key. Splitting is byte ranges again, so the writer and
its bounded memory are convert's.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from itertools import pairwise

from ..errors import FamilyError
from ..naming import natural_key
from ..reading.quantization import quantization_of
from ..reading.safetensors_format import DTYPE_SIZES
from ..reading.source import CONFIG_NAME, SourceCheckpoint
from ..reading.tensor_table import SourceTensor
from ..rules.families import Family
from ..rules.patterns import (
    ChunkForRope,
    Concatenate,
    ConcatenateShards,
    Converter,
    ExpertMerge,
    GroupRename,
    SplitBySize,
    Transpose,
    TransposeExperts,
    active_groups,
    map_key,
    rename_all,
)
from ..rules.quantized import for_quantization
from .conversion import config_hidden_size
from .expert_runs import ExpertRun, Member, Unit, lay_out_units
from .layout import ConversionPlan, lay_out
from .operations import hidden_axis, rope_order, row_pieces, shard_count, transposed_pieces
from .pieces import FusedGroup, OutputTensor, Piece, coalesce


def plan_unfuse(source: SourceCheckpoint, family: Family, *, max_shard_size: int) -> ConversionPlan:
    """Every tensor of a fused checkpoint under its original name; fused ones split per expert.

    Raises:
        FamilyError: a tensor is still per expert, a fused shape cannot be split, or a reversed
            name would not convert back to the key it came from.
    """
    family = for_quantization(family, quantization_of(source.config, source.root / CONFIG_NAME))
    reverse_renames = tuple(r.reversed() for r in reversed(family.renames) if not getattr(r, "prefix_change", False))
    hidden_size = config_hidden_size(source.config)
    try:
        plan = _plan_in_runs(source, family, reverse_renames, hidden_size, max_shard_size)
    except FamilyError:
        plan = None  # planned again tensor by tensor, which names the problem
    if plan is None:
        plan = _plan_each(source, family, reverse_renames, hidden_size, max_shard_size)
    return plan


# (key, name before renames, part, converter, slot, expert) of an output tensor
PlannedPart = tuple[str, str, OutputTensor, Converter | None, int | None, int | None]


def _plan_each(
    source: SourceCheckpoint, family: Family, reverse_renames: tuple, hidden_size: int | None, max_shard_size: int
) -> ConversionPlan:
    """The plan with an object for every output tensor: for what `_plan_in_runs` cannot hold in
    runs, and the one that finds and names what is wrong with a checkpoint."""
    parts, _, _ = _source_parts(source, family, hidden_size, runs=False)
    reverse_active, _ = active_groups([p[1] for p in parts], reverse_renames)
    named = [(key, rename_all(unrenamed, reverse_renames, reverse_active), *rest) for key, unrenamed, *rest in parts]
    forward_active, _ = active_groups([n[1] for n in named], family.all_renames(), family.model)
    outputs: dict[str, OutputTensor] = {}
    names_of: dict[str, list[str]] = defaultdict(list)
    converter_of: dict[str, Converter] = {}
    for key, name, part, converter, slot, expert in named:
        _check_forward(name, key, family, converter, slot, expert, forward_active)
        if name in outputs:
            raise FamilyError(f"{key}: unfuses to {name!r}, which another tensor also becomes")
        outputs[name] = _renamed(part, name)
        if converter is not None:
            names_of[key].append(name)
            converter_of[key] = converter
    groups = [
        FusedGroup.of(key, f"split_{type(converter_of[key]).__name__}", len(names), names)
        for key, names in names_of.items()
    ]
    del parts, named  # every output is in `outputs` now; laying out makes the headers, the largest part
    ordered = sorted(outputs.values(), key=lambda t: natural_key(t.name))
    del outputs
    return lay_out(family, ordered, groups, max_shard_size)


def _plan_in_runs(
    source: SourceCheckpoint, family: Family, reverse_renames: tuple, hidden_size: int | None, max_shard_size: int
) -> ConversionPlan | None:
    """The plan with the tensors each module's fused experts split into held as one `ExpertRun`:
    a few records instead of an object per output tensor. None where the names do not fit runs
    (a name that is no `{prefix}{expert}{suffix}`, runs that would interleave in file order, two
    tensors of one name): `_plan_each` plans those.

    Raises:
        FamilyError: what `_plan_each` refuses, not always naming the first key it names.
    """
    parts, merged, converted = _source_parts(source, family, hidden_size, runs=True)
    if not merged:
        return None

    def names_before_renames() -> Iterator[str]:
        yield from (p[1] for p in parts)
        for key, tensor, converter in merged:
            for expert in range(tensor.shape[0]):
                for text in converter.source_texts(expert):
                    yield _replace_target(key, converter, text)

    reverse_active = _active(names_before_renames, reverse_renames)
    named = [(key, rename_all(unrenamed, reverse_renames, reverse_active), *rest) for key, unrenamed, *rest in parts]
    templates: dict[str, list[tuple[str, str]]] = {}
    for key, tensor, converter in merged:
        templates[key] = []
        for slot in range(len(converter.sources)):
            texts = (converter.source_texts(e)[slot] for e in range(tensor.shape[0]))
            names = (rename_all(_replace_target(key, converter, t), reverse_renames, reverse_active) for t in texts)
            template = _template(names)
            if template is None:
                return None
            templates[key].append(template)

    def names_after_renames() -> Iterator[str]:
        yield from (n[1] for n in named)
        for key, tensor, _ in merged:
            for expert in range(tensor.shape[0]):
                for prefix, suffix in templates[key]:
                    yield f"{prefix}{expert}{suffix}"

    forward_active = _active(names_after_renames, family.all_renames(), family.model)
    names_of: dict[str, list[str]] = defaultdict(list)
    units: list[Unit] = []
    for key, name, part, converter, slot, expert in named:
        _check_forward(name, key, family, converter, slot, expert, forward_active)
        units.append(_renamed(part, name))
        if converter is not None:
            names_of[key].append(name)
    # The slots of a module's fused tensors under one prefix become the members of one run.
    members: dict[tuple[str, int], list[tuple[str, str, int, Member]]] = defaultdict(list)
    for key, tensor, converter in merged:
        experts, slots = tensor.shape[0], len(converter.sources)
        rows = tensor.shape[1] // slots
        shape = (rows, *tensor.shape[2:])
        size = DTYPE_SIZES[tensor.dtype] * math.prod(shape)
        for slot, (prefix, suffix) in enumerate(templates[key]):
            for expert in range(experts):
                _check_forward(f"{prefix}{expert}{suffix}", key, family, converter, slot, expert, forward_active)
            member = Member(suffix, tensor.dtype, shape, tensor.file, tensor.offset + slot * size, slots * size, size)
            members[prefix, experts].append((f"{prefix}0{suffix}", key, slot, member))
    for (prefix, experts), found in members.items():
        found.sort(key=lambda m: natural_key(m[0]))
        units.append(ExpertRun(prefix, experts, tuple(m[3] for m in found)))
    units.sort(key=lambda u: natural_key(u.name if isinstance(u, OutputTensor) else u.name(0)))
    if not _strictly_ordered(units):
        return None
    made: dict[str, FusedGroup] = {}
    for key, tensor, converter in merged:
        prefix, suffix = templates[key][0]
        count = tensor.shape[0] * len(templates[key])
        made[key] = FusedGroup(key, f"split_{type(converter).__name__}", count, f"{prefix}0{suffix}", count)
    for p in parts:
        if p[3] is not None:  # a fused tensor of no experts splits into nothing, and makes no group
            made[p[0]] = FusedGroup.of(p[0], f"split_{type(p[3]).__name__}", len(names_of[p[0]]), names_of[p[0]])
    groups = [made[key] for key in converted if key in made]
    return lay_out_units(family, units, groups, max_shard_size)


def _source_parts(
    source: SourceCheckpoint, family: Family, hidden_size: int | None, *, runs: bool
) -> tuple[list[PlannedPart], list[tuple[str, SourceTensor, ExpertMerge]], list[str]]:
    """The output tensors of every source tensor before renames; with `runs`, the fused tensors of
    two or more experts that an `ExpertMerge` made are set aside whole instead of split. Also every
    key a converter made, in plan order (that of the fused groups)."""
    parts: list[PlannedPart] = []
    merged: list[tuple[str, SourceTensor, ExpertMerge]] = []
    converted: list[str] = []
    chunks: dict[str, dict[int, SourceTensor]] = defaultdict(dict)
    chunk_of: dict[str, ChunkForRope] = {}
    for key in sorted(source.tensors, key=natural_key):
        tensor = source.tensors[key]
        already = map_key(key, (), family.converters).converter
        if isinstance(already, ExpertMerge | Concatenate | ConcatenateShards | ChunkForRope | Transpose):
            raise FamilyError(
                f"{key}: already in the per-expert layout of family {family.name}; unfuse takes a fused checkpoint"
            )
        converter = next((c for c in family.converters if c.match_output(key)), None)
        if isinstance(converter, ChunkForRope):
            match = converter.match_output(key)
            joined = key[: match.start()] + converter.source_texts()[0] + key[match.end() :]
            chunks[joined][converter.output_slot(match)] = tensor
            chunk_of[joined] = converter
        elif converter is None:
            whole = OutputTensor(key, tensor.dtype, tensor.shape, (_whole(tensor),))
            parts.append((key, key, whole, None, None, None))
        elif runs and isinstance(converter, ExpertMerge) and _splits_evenly(tensor, len(converter.sources)):
            merged.append((key, tensor, converter))
            converted.append(key)
        else:
            parts += [
                (key, name, part, converter, slot, expert)
                for name, part, slot, expert in _split(tensor, converter, hidden_size, source.config)
            ]
            converted.append(key)
    for joined in sorted(chunks, key=natural_key):
        first, tensor = _join_chunks(joined, chunks[joined], chunk_of[joined], source.config)
        parts.append((first, joined, tensor, chunk_of[joined], 0, None))
        converted.append(first)
    return parts, merged, list(dict.fromkeys(converted))


def _splits_evenly(tensor: SourceTensor, slots: int) -> bool:
    """A fused [experts, rows, cols] tensor of two or more experts with `slots` equal parts each."""
    return len(tensor.shape) >= 3 and tensor.shape[0] >= 2 and tensor.shape[1] % slots == 0


def _renamed(part: OutputTensor, name: str) -> OutputTensor:
    return part if part.name == name else OutputTensor(name, part.dtype, part.shape, part.pieces)


def _active(names: Callable[[], Iterable[str]], renames: tuple, model=None) -> frozenset[GroupRename]:
    """The group renames `names` activate (`active_groups`); none, without reading a name, where
    `renames` has no group rename."""
    if not any(isinstance(rename, GroupRename) for rename in renames):
        return frozenset()
    return active_groups(names(), renames, model)[0]


def _template(names: Iterator[str]) -> tuple[str, str] | None:
    """(prefix, suffix) such that name e of `names` is `{prefix}{e}{suffix}`, or None."""
    first, second = next(names), next(names)
    common = len(os.path.commonprefix([first, second]))
    prefix = first[:common]
    rest = os.path.commonprefix([first[common:][::-1], second[common:][::-1]])
    suffix = first[len(first) - len(rest) :] if rest else ""
    if first != f"{prefix}0{suffix}" or second != f"{prefix}1{suffix}":
        return None
    if any(name != f"{prefix}{expert}{suffix}" for expert, name in enumerate(names, start=2)):
        return None
    return prefix, suffix


def _strictly_ordered(units: list[Unit]) -> bool:
    """Every name of `units`, in turn, after the one before in natural order: the file order
    `_plan_each` sorts into, and no name twice.

    Within a run this follows from its form: where the prefix ends and every suffix starts with a
    non-digit, the natural key of `{prefix}{e}{suffix}` is the prefix's, then e, then the suffix's,
    so names go expert by expert and, within one, in the order of their suffixes. Between units,
    the last name of one must come before the first of the next."""
    last = None
    for unit in units:
        if isinstance(unit, OutputTensor):
            first = final = unit.name
        else:
            if unit.prefix[-1:].isdigit() or any(m.suffix[:1].isdigit() for m in unit.members):
                return False
            suffixes = [natural_key(m.suffix) for m in unit.members]
            if any(not a < b for a, b in pairwise(suffixes)):
                return False
            first, final = unit.name(0), unit.name(len(unit) - 1)
        if last is not None and not last < natural_key(first):
            return False
        last = natural_key(final)
    return True


def _join_chunks(
    joined: str, found: dict[int, SourceTensor], converter: ChunkForRope, config: dict | None
) -> tuple[str, OutputTensor]:
    """The fused source tensor (`wqkv`) again: the parts concatenated on dim 0 in target order, the
    rows of rotary parts put back in interleaved order (transformers' `PermuteForRope(inverse=True)`
    then `Concatenate`). Returns (the key of the first part, the joined tensor)."""
    names = converter.output_names(joined.replace(converter.source_texts()[0], _plain(converter.targets[0]), 1))
    for slot, name in enumerate(names):
        if slot not in found:
            raise FamilyError(f"{name}: missing: the {converter.targets[slot]} part of {joined}")
    first = found[0]
    # `Split`'s parts (q, k, v of grouped-query attention) differ in rows; `Chunk`'s are equal.
    sized = isinstance(converter, SplitBySize)
    for tensor in found.values():
        same = tensor.shape[1:] == first.shape[1:] and bool(tensor.shape) if sized else tensor.shape == first.shape
        if tensor.dtype != first.dtype or not same:
            raise FamilyError(
                f"{tensor.name}: {tensor.dtype} {list(tensor.shape)} cannot be joined with "
                f"{first.name}: {first.dtype} {list(first.shape)}"
            )
    pieces: list[Piece] = []
    total = 0
    for slot in range(len(names)):
        tensor = found[slot]
        rows = tensor.shape[0] if tensor.shape else 0
        total += rows
        pieces += row_pieces(tensor, 0, rows, rope_order(converter, config, slot, tensor, rows, inverse=True))
    shape = (total, *first.shape[1:])
    return first.name, OutputTensor(joined, first.dtype, shape, tuple(coalesce(pieces)))


def _plain(pattern: str) -> str:
    return pattern.removeprefix("^").replace(r"\.", ".")


def _whole(tensor: SourceTensor) -> Piece:
    return Piece(tensor.file, tensor.offset, tensor.nbytes)


def _replace_target(key: str, converter: Converter, text: str) -> str:
    match = converter.match_output(key)
    return key[: match.start()] + text + key[match.end() :]


Part = tuple[str, OutputTensor, int | None, int | None]


def _split(tensor: SourceTensor, converter: Converter, hidden_size: int | None, config: dict | None) -> list[Part]:
    """(name before renames, tensor, source slot, expert) for each tensor the fused one came from."""
    if isinstance(converter, TransposeExperts):
        return [(tensor.name, _turn_back(tensor, hidden_size), 0, None)]
    if isinstance(converter, Transpose):
        # `Transpose(1, 2)` is its own inverse: each expert turned back, under the source name.
        if len(tensor.shape) != 3:
            raise FamilyError(f"{tensor.name}: {list(tensor.shape)} is not a fused [experts, rows, cols] tensor")
        name = _replace_target(tensor.name, converter, converter.source_texts()[0])
        pieces, shape = transposed_pieces(tensor)
        return [(name, OutputTensor(name, tensor.dtype, shape, pieces), 0, None)]
    if isinstance(converter, ConcatenateShards):
        return _split_shards(tensor, converter, config)
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
    shape = (rows, *rest)  # one tuple for every part: a fused tensor of 384 experts has 768 or more
    for expert in range(experts):
        texts = converter.source_texts(expert if isinstance(converter, ExpertMerge) else None)
        for slot, text in enumerate(texts):
            offset = tensor.offset + (expert * slots + slot) * size
            name = _replace_target(tensor.name, converter, text)
            part = OutputTensor(name, tensor.dtype, shape, (Piece(tensor.file, offset, size),))
            parts.append((name, part, slot, expert if isinstance(converter, ExpertMerge) else None))
    return parts


def _split_shards(tensor: SourceTensor, converter: ConcatenateShards, config: dict | None) -> list[Part]:
    """The shards again: equal row blocks, as many as config.json declares (transformers' `Chunk`)."""
    count = shard_count(converter, config)
    if not tensor.shape or tensor.shape[0] % count:
        raise FamilyError(
            f"{tensor.name}: {list(tensor.shape)} does not split into {count} equal shards on dim 0 "
            f"({converter.count_field} of config.json)"
        )
    rows = tensor.shape[0] // count
    size = tensor.nbytes // count
    parts = []
    for shard in range(count):
        name = _replace_target(tensor.name, converter, converter.source_texts(shard)[0])
        part = OutputTensor(
            name, tensor.dtype, (rows, *tensor.shape[1:]), (Piece(tensor.file, tensor.offset + shard * size, size),)
        )
        parts.append((name, part, 0, shard))
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
    name: str,
    key: str,
    family: Family,
    converter: Converter | None,
    slot: int | None,
    expert: int | None,
    active: frozenset[GroupRename] = frozenset(),
) -> None:
    """Refuse a reversed name that convert would not map back to `key` (a rename that cannot be undone)."""
    mapping = family.map_key(name, active)
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
