"""Plan a conversion from headers alone: every output tensor, the byte ranges that fill it, its shard.

The plan is pure data. Nothing here reads tensor bytes or writes files, so convert, dry runs and
checks can all share it.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

from ..errors import CheckpointError, FamilyError
from ..reading.safetensors_format import HEADER_ALIGNMENT, PAGE_SIZE, TensorInfo, encode_header
from ..reading.source import SourceCheckpoint, SourceTensor
from ..rules.families import Family
from ..rules.patterns import Converter, ExpertMerge, TransposeExperts, map_key
from .cast import cast_of
from .operations import FusedGroup, OutputTensor, Piece, Slots, concatenate, fuse_experts, transpose_experts

SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"


@dataclass
class ShardPlan:
    """One output shard: its file name, tensors in file order, and the header that describes them."""

    filename: str
    tensors: list[OutputTensor]
    header: bytes = b""

    @property
    def data_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_size(self) -> int:
        return len(self.header) + self.data_size


@dataclass
class ConversionPlan:
    """Everything convert will write, named by direction."""

    family: Family
    shards: list[ShardPlan]
    fused_groups: list[FusedGroup]
    tensor_to_filename: dict[str, str] = field(default_factory=dict)
    dtype: str | None = None  # the floating dtype tensors are cast to; None keeps every dtype

    @property
    def tensors(self) -> dict[str, OutputTensor]:
        """Every output tensor by name."""
        return {t.name: t for shard in self.shards for t in shard.tensors}

    @property
    def total_size(self) -> int:
        return sum(shard.data_size for shard in self.shards)

    @property
    def total_parameters(self) -> int:
        return sum(math.prod(t.shape) for shard in self.shards for t in shard.tensors)

    @property
    def fused_modules(self) -> list[str]:
        """The expert modules that were fused, e.g. `model.layers.3.mlp.experts`."""
        return sorted({g.target.rpartition(".")[0] for g in self.fused_groups}, key=natural_key)

    @property
    def num_experts(self) -> int:
        """Experts fused, counted once per module (a gate_up/down pair of E experts counts E)."""
        per_module = {g.target.rpartition(".")[0]: g.num_experts for g in self.fused_groups}
        return sum(per_module.values())


def natural_key(name: str) -> list:
    """Sort key with numbers compared as numbers: layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def plan_conversion(
    source: SourceCheckpoint, family: Family, *, max_shard_size: int, dtype: str | None = None
) -> ConversionPlan:
    """Map every source tensor through `family`, fuse the experts, and lay out the output shards.

    With `dtype` (a safetensors dtype such as "BF16"), floating tensors are planned cast to it.

    Raises:
        FamilyError: an expert group is incomplete or inconsistent.
        CheckpointError: two source tensors would land on the same output key.
    """
    renames = family.all_renames()
    passthrough: dict[str, SourceTensor] = {}
    groups: dict[str, Slots] = defaultdict(lambda: defaultdict(dict))
    converter_of: dict[str, Converter] = {}

    for key in sorted(source.tensors, key=natural_key):
        tensor = source.tensors[key]
        mapping = map_key(key, renames, family.converters)
        if mapping.converter is None:
            _claim(passthrough, mapping.target, tensor)
            continue
        expert = None if mapping.expert is None else _expert_id(mapping.expert, key)
        members = groups[mapping.target][mapping.slot]
        if expert in members:
            what = mapping.target if expert is None else f"expert {expert} of {mapping.target}"
            raise FamilyError(f"{key}: {what} appears twice (also {members[expert].name})")
        members[expert] = tensor
        converter_of[mapping.target] = mapping.converter

    outputs: dict[str, OutputTensor] = {
        name: OutputTensor(name, t.dtype, t.shape, (Piece(t.file, t.offset, t.nbytes),))
        for name, t in passthrough.items()
    }
    _refuse_missing_merges(groups, converter_of, family)
    num_experts = _expected_experts(groups, converter_of, source.config)
    # Modules in order, and within one the family's converter order, so gate keys are checked before down keys.
    position = {converter: i for i, converter in enumerate(family.converters)}
    fused_groups = []
    for target in sorted(groups, key=lambda t: (natural_key(t.rpartition(".")[0]), position[converter_of[t]])):
        if target in outputs:
            raise CheckpointError(f"{target}: both a converted tensor and a tensor of the checkpoint")
        tensor, group = _apply(target, converter_of[target], groups[target], family, source.config, num_experts)
        outputs[target] = tensor
        fused_groups.append(group)
    _refuse_leftover_experts(passthrough, fused_groups, family)

    ordered = sorted((cast_tensor(t, dtype) for t in outputs.values()), key=lambda t: natural_key(t.name))
    return lay_out(family, ordered, fused_groups, max_shard_size, dtype=dtype)


def lay_out(
    family: Family,
    tensors: list[OutputTensor],
    groups: list[FusedGroup],
    max_shard_size: int,
    *,
    dtype: str | None = None,
) -> ConversionPlan:
    """Put `tensors` (in file order) into shards, headers included."""
    shards = _assign_shards(tensors, groups, max_shard_size)
    plan = ConversionPlan(family=family, shards=shards, fused_groups=groups, dtype=dtype)
    for shard in shards:
        shard.header = _shard_header(shard.tensors)
        for tensor in shard.tensors:
            plan.tensor_to_filename[tensor.name] = shard.filename
    return plan


def cast_tensor(tensor: OutputTensor, dtype: str | None) -> OutputTensor:
    """`tensor` with its pieces cast to `dtype` where it is floating and of another dtype."""
    cast = cast_of(tensor.dtype, dtype)
    if cast is None:
        return tensor
    pieces = tuple(replace(piece, cast=cast) for piece in tensor.pieces)
    return OutputTensor(tensor.name, dtype, tensor.shape, pieces)


def _apply(
    target: str, converter: Converter, slots: Slots, family: Family, config: dict | None, num_experts: int
) -> tuple[OutputTensor, FusedGroup]:
    if isinstance(converter, ExpertMerge):
        return fuse_experts(target, converter, slots, family.name, num_experts)
    if isinstance(converter, TransposeExperts):
        return transpose_experts(target, slots, family.name, config_hidden_size(config))
    return concatenate(target, converter, slots, family.name)


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


EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _expected_experts(groups: dict[str, Slots], converter_of: dict[str, Converter], config: dict | None) -> int:
    """How many experts every fused module must hold: config.json's count where it gives one, else the
    highest expert id in the checkpoint plus one (so a missing last expert is noticed too)."""
    ids = [
        expert
        for target, slots in groups.items()
        if isinstance(converter_of[target], ExpertMerge)
        for members in slots.values()
        for expert in members
    ]
    seen = max(ids, default=-1) + 1
    declared = _config_int(config, EXPERT_COUNT_FIELDS)
    if declared is not None and seen > declared:
        raise FamilyError(f"the checkpoint has expert {seen - 1}, but config.json declares {declared} experts")
    return declared if declared is not None and ids else seen


def _refuse_missing_merges(groups: dict[str, Slots], converter_of: dict[str, Converter], family: Family) -> None:
    """Refuse a module that has some of the family's fused tensors but not all (gate_up without down)."""
    merges = [c for c in family.converters if isinstance(c, ExpertMerge)]
    present: dict[str, dict[Converter, str]] = defaultdict(dict)
    for target, converter in converter_of.items():
        if isinstance(converter, ExpertMerge):
            present[target.rpartition(".")[0]][converter] = target
    for module in sorted(present, key=natural_key):
        for merge in merges:
            if merge not in present[module]:
                other = next(iter(present[module].values()))
                some_key = next(iter(next(iter(groups[other].values())).values())).name
                raise FamilyError(
                    f"{module}.{merge.target.rpartition('.')[2]}: no tensor matches {merge.sources[0]!r} "
                    f"(family {family.name}), though {some_key} is one of its experts"
                )


def _claim(passthrough: dict[str, SourceTensor], target: str, tensor: SourceTensor) -> None:
    if target in passthrough:
        raise CheckpointError(f"{tensor.name}: renamed to {target!r}, which {passthrough[target].name!r} also becomes")
    passthrough[target] = tensor


def _expert_id(text: str, key: str) -> int:
    if not text.isdigit():
        raise FamilyError(f"{key}: expert index {text!r} is not a number")
    return int(text)


def _refuse_leftover_experts(passthrough: dict[str, SourceTensor], groups: list[FusedGroup], family: Family) -> None:
    """Refuse per-expert tensors the rule does not fuse (quantization scales, say) beside fused ones:
    the result would hold both layouts and load wrong."""
    modules = {g.target.rpartition(".")[0] + "." for g in groups if g.num_experts}
    if not modules:
        return
    for name, tensor in passthrough.items():
        module, _, rest = name.partition(".experts.")
        prefix = module + ".experts."
        if rest and rest.split(".")[0].isdigit() and prefix in modules:
            raise FamilyError(
                f"{tensor.name}: per-expert tensor that family {family.name} does not fuse; "
                "it would be left beside the fused experts (quantized checkpoints are not supported)"
            )


def _assign_shards(tensors: list[OutputTensor], groups: list[FusedGroup], max_shard_size: int) -> list[ShardPlan]:
    """Greedy sharding like huggingface_hub's splitter, keeping a module's fused tensors together
    when they fit in one shard; a tensor larger than the limit gets a shard of its own."""
    module_of = {g.target: g.target.rpartition(".")[0] for g in groups}
    units: list[list[OutputTensor]] = []
    for tensor in tensors:
        module = module_of.get(tensor.name)
        if module is not None and units and module_of.get(units[-1][0].name) == module:
            units[-1].append(tensor)
        else:
            units.append([tensor])

    bins: list[list[OutputTensor]] = [[]]
    current = 0
    for unit in units:
        size = sum(t.nbytes for t in unit)
        pieces = [unit] if size <= max_shard_size else [[t] for t in unit]
        for part in pieces:
            part_size = sum(t.nbytes for t in part)
            if bins[-1] and current + part_size > max_shard_size:
                bins.append([])
                current = 0
            bins[-1].extend(part)
            current += part_size
    count = len(bins)
    return [
        ShardPlan(filename=SHARD_NAME.format(index=i + 1, count=count), tensors=contents)
        for i, contents in enumerate(bins)
    ]


def _shard_header(tensors: list[OutputTensor]) -> bytes:
    infos = []
    position = 0
    for tensor in tensors:
        infos.append(TensorInfo(tensor.name, tensor.dtype, tensor.shape, position, position + tensor.nbytes))
        position += tensor.nbytes
    return encode_header(infos, {"format": "pt"}, data_start_residue=_page_residue(tensors))


def _page_residue(tensors: list[OutputTensor]) -> int:
    """Where, modulo a page, the shard's data should start so that the most copied bytes keep their
    source's offset within a page: those the kernel copies as whole pages."""
    weights: Counter[int] = Counter()
    position = 0
    for tensor in tensors:
        if all(p.transpose is None and p.cast is None for p in tensor.pieces):
            at = position
            for piece in tensor.pieces:
                weights[(piece.offset - at) % PAGE_SIZE] += piece.length
                at += piece.length
        position += tensor.nbytes
    aligned = {residue: n for residue, n in weights.items() if residue % HEADER_ALIGNMENT == 0}
    return max(aligned, key=lambda residue: (aligned[residue], -residue)) if aligned else 0
