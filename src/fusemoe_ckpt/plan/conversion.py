"""Plan a conversion from headers alone: every output tensor and the byte ranges that fill it.

The plan is pure data. Nothing here reads tensor bytes or writes files, so convert, inspect, verify
and resume all share it. Where the tensors go is layout.py's business.
"""

from __future__ import annotations

import os
from array import array
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

from ..cycles import collector_paused
from ..errors import CheckpointError, FamilyError, UsageError
from ..naming import FirstError, natural_key
from ..reading.quantization import quantization_of
from ..reading.source import EXPERT_COUNT_FIELDS, SourceCheckpoint, open_checkpoint
from ..reading.tensor_table import SourceTensor, TensorTable
from ..rules.families import Family
from ..rules.key_templates import key_mapper
from ..rules.patterns import (
    ChunkForRope,
    ConcatenateShards,
    Converter,
    ExpertMerge,
    Transpose,
    TransposeExperts,
    active_groups,
)
from ..rules.quantized import for_quantization
from ..rules.selection import resolve_family
from ..sizes import parse_size
from .cast import cast_of, output_dtype
from .layout import ConversionPlan, lay_out
from .operations import (
    Slots,
    chunk_for_rope,
    concatenate,
    concatenate_shards,
    first_member,
    fuse_experts,
    transpose,
    transpose_experts,
)
from .pieces import FusedGroup, OutputTensor, piece_of
from .quantization import (
    CONFIG_DTYPES,
    check_fused_scales,
    dequantized_dtype,
    dequantized_view,
    names_scales_dot_scale,
    paired_scales,
    refuse_expert_activation_scales,
)

if TYPE_CHECKING:
    from ..reading.quantization_records import Quantization


def plan_for(
    src: str | os.PathLike,
    *,
    family: str | None = None,
    max_shard_size: str | int = "5GB",
    dtype: str | None = None,
    dequantize: bool = False,
) -> tuple[SourceCheckpoint, ConversionPlan]:
    """Open `src` and plan its conversion, touching no tensor bytes.

    Args:
        dtype: "bfloat16", "float16" or "float32" to cast floating tensors to; None keeps them.
        dequantize: plan quantized weights dequantized (to `dtype`, else config.json's dtype).
    """
    with collector_paused():
        source = open_checkpoint(src)
        chosen = resolve_family(source, family)
        plan = plan_conversion(
            source, chosen, max_shard_size=parse_size(max_shard_size), dtype=output_dtype(dtype), dequantize=dequantize
        )
    return source, plan


def plan_conversion(
    source: SourceCheckpoint,
    family: Family,
    *,
    max_shard_size: int,
    dtype: str | None = None,
    dequantize: bool = False,
) -> ConversionPlan:
    """Map every source tensor through `family`, fuse the experts, and lay out the output shards.

    With `dtype` (a safetensors dtype such as "BF16"), floating tensors are planned cast to it. A
    quantized checkpoint keeps its quantization (scales fused beside the weights, as transformers'
    quantizer fuses them), or with `dequantize` every quantized weight becomes floating.

    Raises:
        FamilyError: an expert group is incomplete or inconsistent.
        CheckpointError: two source tensors would land on the same output key; a quantization that
            is unsupported or inconsistent.
        UsageError: `dequantize` of a checkpoint that is not quantized.
    """
    quantization = quantization_of(source.config, source.root / "config.json")
    if dequantize and quantization is None:
        raise UsageError(f"{source.root}: --dequantize: config.json declares no quantization_config")
    stored = source.tensors
    if quantization is not None and quantization.compressed is not None:
        stored = _compressed_view(source, quantization, dequantize, dtype)
    dot_scales = quantization is not None and names_scales_dot_scale(stored, quantization)
    family = for_quantization(family, quantization, fuse_scales=not dequantize, rename_scales=dot_scales)
    renames = family.all_renames()
    active, unguarded = active_groups(stored, renames, family.model)
    _refuse_unguarded(unguarded, stored)
    mapping_of = key_mapper(renames, family.converters, family.model, active)
    # Keys transformers ignores at load (multi-token-prediction layers, say) are dropped as it drops them.
    # (Mapped again below: a frontier checkpoint's 300k mappings held at once would be 100 MB.)
    ignored = []
    if family.model.ignored:
        ignored = sorted((key for key in stored if family.model.ignores(mapping_of(key).target)), key=natural_key)
    tensors = stored.without(ignored)
    dropped, config = [], None
    if dequantize or quantization is not None:
        # Keys already in the model's names that the renames would spoil are no scales, whatever their name.
        named = tensors.without([key for key in tensors if family.model.keeps(key)]) if family.model.kept else tensors
    if dequantize:
        if quantization.compressed is None:
            output = dequantized_dtype(source.config, dtype)
            scales = paired_scales(named, quantization)
            tensors, dropped = dequantized_view(tensors, scales, output)
        config = {k: v for k, v in source.config.items() if k != "quantization_config"}
    elif quantization is not None:
        paired_scales(named, quantization, keep=False)
        refuse_expert_activation_scales(tensors)
    passthrough: dict[str, SourceTensor] = {}
    # Expert tensors are held as rows of the table until their group is fused: no object per tensor.
    groups: dict[str, dict[int, _Members]] = defaultdict(lambda: defaultdict(_Members))
    converter_of: dict[str, Converter] = {}
    # The keys are taken in the checkpoint's order, not sorted: what the first of two keys in natural
    # order decides (which is named "also", which error is reported) is decided by comparing the two.
    first_error = FirstError()
    expert_ids: dict[str, int] = {}
    for row, key in tensors.rows():
        mapping = mapping_of(key)
        if mapping.converter is None:
            _claim(passthrough, mapping.target, tensors.tensor(row, key), first_error)
            continue
        if mapping.expert is None:
            expert = None
        elif (expert := expert_ids.get(mapping.expert)) is None:
            if not _is_number(mapping.expert):
                first_error.add(key, FamilyError(f"{key}: expert index {mapping.expert!r} is not a number"))
                continue
            expert = expert_ids[mapping.expert] = int(mapping.expert)
        members = groups[mapping.target][mapping.slot]
        other = members.setdefault(expert, row)
        if other != row:
            what = mapping.target if expert is None else f"expert {expert} of {mapping.target}"
            earlier, later = _in_natural_order(tensors.tensor(other), tensors.tensor(row, key))
            first_error.add(later.name, FamilyError(f"{later.name}: {what} appears twice (also {earlier.name})"))
            members.put(expert, other if earlier.name != key else row)
        converter_of[mapping.target] = mapping.converter
    first_error.raise_first()

    outputs: dict[str, OutputTensor] = {
        name: OutputTensor(name, t.dtype, t.shape, (piece_of(t),)) for name, t in passthrough.items()
    }
    _refuse_missing_merges(groups, converter_of, family, tensors)
    counts = _expected_experts_by_config(groups, converter_of, source.config)
    # Modules in order, and within one the family's converter order, so gate keys are checked before down keys.
    position = {converter: i for i, converter in enumerate(family.converters)}
    fused_groups = []
    for target in sorted(groups, key=lambda t: (natural_key(t.rpartition(".")[0]), position[converter_of[t]])):
        converter = converter_of[target]
        # transformers gives LongCat-Flash's zero experts gate/up rows (never read), but no down rows.
        num_experts, zero_experts = counts[_sub_config_name(converter)]
        extra = zero_experts if isinstance(converter, ExpertMerge) and len(converter.sources) == 2 else 0
        # Each group is let go once made into its output: its members are one entry per source tensor.
        made, group = _apply(
            target, converter, _slots(groups.pop(target), tensors), family, source.config, num_experts, extra
        )
        for tensor in made:
            if tensor.name in outputs:
                raise CheckpointError(f"{tensor.name}: both a converted tensor and a tensor of the checkpoint")
            outputs[tensor.name] = tensor
        fused_groups.append(group)
    _refuse_leftover_experts(passthrough, fused_groups, family)
    del passthrough, groups
    if quantization is not None and not dequantize:
        check_fused_scales(outputs, fused_groups, quantization, tensors)

    held = held_dtypes(family, source.config, dtype)
    ordered = sorted((cast_tensor(t, held(t.name)) for t in outputs.values()), key=lambda t: natural_key(t.name))
    plan = lay_out(family, ordered, fused_groups, max_shard_size, dtype=dtype)
    plan.quantization, plan.dequantized, plan.config = quantization, dequantize, config
    plan.dropped = sorted(dropped + ignored, key=natural_key)
    return plan


def held_dtypes(family: Family, config: dict | None, dtype: str | None):
    """For each output key, the floating dtype to plan it in (None: as stored).

    Without `dtype`, tensors keep their dtype; with it, floating tensors are cast to it. For a
    family whose model class keeps modules in float32 (`ModelKeys.keep_in_fp32`), the dtype
    transformers holds: the model's dtype (`dtype`, else config.json's) for every floating tensor,
    float32 for those it keeps in float32 when that dtype is 16-bit.
    """
    keep = family.model.keep_in_fp32
    model_dtype = dtype or (CONFIG_DTYPES.get(_config_dtype(config)) if keep else None)
    if not keep or model_dtype is None:
        return lambda name: dtype
    if model_dtype not in ("BF16", "F16"):
        return lambda name: model_dtype
    return lambda name: "F32" if family.model.holds_in_fp32(name) else model_dtype


def _config_dtype(config: dict | None) -> str | None:
    config = config or {}
    return config.get("dtype") or config.get("torch_dtype")


def _compressed_view(
    source: SourceCheckpoint, quantization: Quantization, dequantize: bool, dtype: str | None
) -> TensorTable:
    """The tensors of a compressed-tensors checkpoint with every compressed layer planned dequantized."""
    if not dequantize:
        scheme = quantization.compressed.experts.describe()
        raise CheckpointError(
            f"{source.root / 'config.json'}: a compressed-tensors checkpoint (experts {scheme}): "
            "transformers dequantizes its experts at load, so they must be dequantized to be fused; convert "
            "with --dequantize (floating weights, config.json without quantization_config)"
        )
    from .compressed import compressed_view  # compressed-tensors checkpoints only

    output = dequantized_dtype(source.config, dtype)
    return compressed_view(source.tensors, quantization.compressed, output, forced=dtype is not None)


def _refuse_unguarded(unguarded: dict[str, str], tensors: dict[str, SourceTensor]) -> None:
    """A key a group rename renames only after its guard, in a checkpoint whose guard keys stop short."""
    if unguarded:
        key = min(unguarded, key=natural_key)
        raise FamilyError(
            f"{unguarded[key]}: missing: the key that tells transformers to rename {key} "
            f"({tensors[key].file}); other blocks have theirs"
        )


def cast_tensor(tensor: OutputTensor, dtype: str | None) -> OutputTensor:
    """`tensor` with its pieces cast to `dtype` where it is floating and of another dtype (a weight
    planned dequantized is already planned in its output dtype)."""
    cast = cast_of(tensor.dtype, dtype)
    if cast is None or any(piece.scales is not None for piece in tensor.pieces):
        return tensor
    pieces = tuple(replace(piece, cast=cast) for piece in tensor.pieces)
    return OutputTensor(tensor.name, dtype, tensor.shape, pieces)


def _apply(
    target: str,
    converter: Converter,
    slots: Slots,
    family: Family,
    config: dict | None,
    num_experts: int,
    zero_experts: int = 0,
) -> tuple[list[OutputTensor], FusedGroup]:
    if isinstance(converter, ChunkForRope):
        return chunk_for_rope(target, converter, slots, family.name, config)
    if isinstance(converter, ExpertMerge):
        tensor, group = fuse_experts(target, converter, slots, family.name, num_experts, zero_experts)
    elif isinstance(converter, ConcatenateShards):
        tensor, group = concatenate_shards(target, converter, slots, family.name, config)
    elif isinstance(converter, TransposeExperts):
        tensor, group = transpose_experts(target, slots, family.name, config_hidden_size(config))
    elif isinstance(converter, Transpose):
        tensor, group = transpose(target, slots)
    else:
        tensor, group = concatenate(target, converter, slots, family.name)
    return [tensor], group


def _config_int(config: dict | None, names: tuple[str, ...]) -> int | None:
    """The first integer among `names` in config.json, looking in `text_config` first."""
    config = config or {}
    text_config = config.get("text_config")
    for scope in (text_config if isinstance(text_config, dict) else {}, config):
        for name in names:
            value = scope.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def config_hidden_size(config: dict | None) -> int | None:
    return _config_int(config, ("hidden_size",))


def _sub_config_name(converter: Converter) -> str:
    return converter.scope.config if converter.scope is not None else ""


def _expected_experts_by_config(
    groups: dict[str, dict[int, _Members]], converter_of: dict[str, Converter], config: dict | None
) -> dict[str, tuple[int, int]]:
    """`_expected_experts` for each sub-model: a scoped converter's experts are counted by its
    sub-config of config.json (a vision encoder's `vision_config`), the others by config.json."""
    counts = {}
    for name in {_sub_config_name(c) for c in converter_of.values()}:
        mine = {t: g for t, g in groups.items() if _sub_config_name(converter_of[t]) == name}
        sub = (config or {}).get(name) if name else config
        counts[name] = _expected_experts(mine, converter_of, sub if isinstance(sub, dict) else None, name)
    return counts


def _expected_experts(
    groups: dict[str, dict[int, _Members]], converter_of: dict[str, Converter], config: dict | None, where: str = ""
) -> tuple[int, int]:
    """(routed experts every fused module must hold, zero experts after them in gate_up only).

    Routed experts: config.json's count where it gives one, else the highest expert id in the
    checkpoint plus one (so a missing last expert is noticed too). Zero experts: LongCat-Flash's
    `zero_expert_num` identity experts, whose gate/up rows a checkpoint may or may not store.
    """
    zero = _config_int(config, ("zero_expert_num",)) or 0
    highest = {}
    for target, slots in groups.items():
        converter = converter_of[target]
        if isinstance(converter, ExpertMerge):
            for members in slots.values():
                for expert in members:
                    if expert > highest.get(len(converter.sources), -1):
                        highest[len(converter.sources)] = expert
    declared = _config_int(config, EXPERT_COUNT_FIELDS)
    if not highest:
        return 0, 0
    seen = max(highest.values()) + 1
    if declared is None:
        return seen, 0
    for sources, expert in highest.items():
        allowed = declared + (zero if sources == 2 else 0)
        if expert >= allowed:
            zeros = f" and {zero} zero experts" if zero and sources == 2 else ""
            what = f"config.json's {where}" if where else "config.json"
            raise FamilyError(f"the checkpoint has expert {expert}, but {what} declares {declared} experts{zeros}")
    return declared, zero


def _refuse_missing_merges(
    groups: dict[str, dict[int, _Members]], converter_of: dict[str, Converter], family: Family, tensors: TensorTable
) -> None:
    """Refuse a module that has some of the family's fused tensors but not all (gate_up without down)."""
    merges = [c for c in family.converters if isinstance(c, ExpertMerge)]
    present: dict[str, dict[Converter, str]] = defaultdict(dict)
    for target, converter in converter_of.items():
        if isinstance(converter, ExpertMerge):
            present[target.rpartition(".")[0]][converter] = target
    for module in sorted(present, key=natural_key):
        # A module's merges are those of its sub-model's rule (one scope).
        scopes = {converter.scope for converter in present[module]}
        for merge in (m for m in merges if m.scope in scopes):
            if merge not in present[module]:
                some_key = first_member(
                    _slots(slots, tensors) for target, slots in groups.items() if target in present[module].values()
                )
                raise FamilyError(
                    f"{module}.{merge.target.rpartition('.')[2]}: no tensor matches {merge.sources[0]!r} "
                    f"(family {family.name}), though {some_key} is one of its experts"
                )


def _claim(passthrough: dict[str, SourceTensor], target: str, tensor: SourceTensor, first_error: FirstError) -> None:
    other = passthrough.get(target, tensor)
    if other is not tensor:
        earlier, later = _in_natural_order(other, tensor)
        message = f"{later.name}: renamed to {target!r}, which {earlier.name!r} also becomes"
        first_error.add(later.name, CheckpointError(message))
        tensor = earlier
    passthrough[target] = tensor


def _in_natural_order(a: SourceTensor, b: SourceTensor) -> tuple[SourceTensor, SourceTensor]:
    return (a, b) if natural_key(a.name) <= natural_key(b.name) else (b, a)


class _Members:
    """One slot of a group being gathered: the table row of each expert's tensor, in an array by expert
    id (-1 for none), or in a dict for the tensor that is not per expert (None) and for ids far beyond
    the others (the array would be mostly holes). 8 bytes an expert instead of an object and a dict entry.
    """

    __slots__ = ("_rows", "_others")

    def __init__(self) -> None:
        self._rows = array("q")
        self._others: dict[int | None, int] = {}

    def setdefault(self, expert: int | None, row: int) -> int:
        """The row already held for `expert`, else `row`, now held for it."""
        rows, others = self._rows, self._others
        if expert is None or expert in others or expert >= 2 * len(rows) + 1024:
            return others.setdefault(expert, row)
        if expert >= len(rows):
            rows.extend(array("q", [-1]) * (expert + 1 - len(rows)))
        if rows[expert] < 0:
            rows[expert] = row
            return row
        return rows[expert]

    def put(self, expert: int | None, row: int) -> None:
        if expert is not None and expert not in self._others and expert < len(self._rows):
            self._rows[expert] = row
        else:
            self._others[expert] = row

    def __iter__(self) -> Iterator[int | None]:
        """The expert ids held (None for a tensor that is not per expert)."""
        yield from (expert for expert, row in enumerate(self._rows) if row >= 0)
        yield from self._others

    def tensors(self, table: TensorTable) -> dict[int | None, SourceTensor]:
        """expert id -> tensor: this slot as operations take it."""
        found = {expert: table.tensor(row) for expert, row in enumerate(self._rows) if row >= 0}
        found.update((expert, table.tensor(row)) for expert, row in self._others.items())
        return found


def _slots(group: dict[int, _Members], table: TensorTable) -> Slots:
    """A gathered group as operations take it: slot -> expert id -> tensor."""
    return {slot: members.tensors(table) for slot, members in group.items()}


def _is_number(text: str) -> bool:
    # ASCII digits only: str.isdigit() also takes '²' (which int() refuses) and '١' (which it reads as 1).
    return text.isascii() and text.isdigit()


def _refuse_leftover_experts(passthrough: dict[str, SourceTensor], groups: list[FusedGroup], family: Family) -> None:
    """Refuse per-expert tensors the rule does not fuse (quantization scales, say) beside fused ones:
    the result would hold both layouts and load wrong."""
    modules = {g.target.rpartition(".")[0] + "." for g in groups if g.num_experts}
    if not modules:
        return
    for name, tensor in passthrough.items():
        module, _, rest = name.partition(".experts.")
        prefix = module + ".experts."
        if rest and _is_number(rest.split(".")[0]) and prefix in modules:
            raise FamilyError(
                f"{tensor.name}: per-expert tensor that family {family.name} does not fuse; "
                "it would be left beside the fused experts"
            )
