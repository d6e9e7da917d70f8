"""Plan a conversion from headers alone: every output tensor, the byte ranges that fill it, its shard.

The plan is pure data. Nothing here reads tensor bytes or writes files, so convert, dry runs and
checks can all share it.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, FamilyError
from .families import Family
from .patterns import ExpertMerge, map_key
from .safetensors_format import TensorInfo, encode_header
from .source import SourceCheckpoint, SourceTensor

SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"


@dataclass(frozen=True)
class Piece:
    """A run of bytes copied verbatim from a source file."""

    file: Path
    offset: int
    length: int


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output and the source pieces that make it, in order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(piece.length for piece in self.pieces)


@dataclass(frozen=True)
class FusedGroup:
    """A fused tensor made from `num_experts` experts of `len(source_keys) // num_experts` projections."""

    target: str
    num_experts: int
    source_keys: tuple[str, ...]


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


def plan_conversion(source: SourceCheckpoint, family: Family, *, max_shard_size: int) -> ConversionPlan:
    """Map every source tensor through `family`, fuse the experts, and lay out the output shards.

    Raises:
        FamilyError: an expert group is incomplete or inconsistent.
        CheckpointError: two source tensors would land on the same output key.
    """
    renames = family.all_renames()
    passthrough: dict[str, SourceTensor] = {}
    members: dict[str, dict[int, dict[int, SourceTensor]]] = defaultdict(lambda: defaultdict(dict))
    merge_of: dict[str, ExpertMerge] = {}

    for key in sorted(source.tensors, key=natural_key):
        tensor = source.tensors[key]
        mapping = map_key(key, renames, family.merges)
        if mapping.merge is None:
            _claim(passthrough, mapping.target, tensor)
            continue
        expert = _expert_id(mapping.expert, key)
        slot_members = members[mapping.target][mapping.slot]
        if expert in slot_members:
            raise FamilyError(
                f"{key}: expert {expert} of {mapping.target} appears twice (also {slot_members[expert].name})"
            )
        slot_members[expert] = tensor
        merge_of[mapping.target] = mapping.merge

    outputs: dict[str, OutputTensor] = {
        name: OutputTensor(name, t.dtype, t.shape, (Piece(t.file, t.offset, t.nbytes),))
        for name, t in passthrough.items()
    }
    fused_groups = []
    for target in sorted(members, key=natural_key):
        if target in outputs:
            raise CheckpointError(f"{target}: both a fused tensor and a tensor of the checkpoint")
        tensor, group = _fuse(target, merge_of[target], members[target], family)
        outputs[target] = tensor
        fused_groups.append(group)
    _refuse_leftover_experts(passthrough, fused_groups, family)

    ordered = sorted(outputs.values(), key=lambda t: natural_key(t.name))
    shards = _assign_shards(ordered, fused_groups, max_shard_size)
    plan = ConversionPlan(family=family, shards=shards, fused_groups=fused_groups)
    for shard in shards:
        shard.header = _shard_header(shard.tensors)
        for tensor in shard.tensors:
            plan.tensor_to_filename[tensor.name] = shard.filename
    return plan


def _claim(passthrough: dict[str, SourceTensor], target: str, tensor: SourceTensor) -> None:
    if target in passthrough:
        raise CheckpointError(f"{tensor.name}: renamed to {target!r}, which {passthrough[target].name!r} also becomes")
    passthrough[target] = tensor


def _expert_id(text: str, key: str) -> int:
    if not text.isdigit():
        raise FamilyError(f"{key}: expert index {text!r} is not a number")
    return int(text)


def _fuse(
    target: str, merge: ExpertMerge, slots: dict[int, dict[int, SourceTensor]], family: Family
) -> tuple[OutputTensor, FusedGroup]:
    """Check one expert group is complete and uniform, then lay out its fused tensor:
    for each expert in order, each slot's bytes in turn (gate rows, then up rows)."""
    some_key = next(iter(next(iter(slots.values())).values())).name
    for slot, pattern in enumerate(merge.sources):
        if slot not in slots:
            raise FamilyError(
                f"{target}: no tensor matches {pattern!r} (family {family.name}), "
                f"though {some_key} matches its sibling pattern"
            )
    num_experts = max(max(experts) + 1 for experts in slots.values())
    for slot in range(len(merge.sources)):
        for expert in range(num_experts):
            if expert not in slots[slot]:
                present = min(slots[slot])
                missing = _sibling_key(slots[slot][present].name, present, expert)
                raise FamilyError(
                    f"{missing}: missing: expert {expert} of {num_experts} for {target} (family {family.name})"
                )
    first = slots[0][0]
    for slot in range(len(merge.sources)):
        reference = slots[slot][0]
        for tensor in slots[slot].values():
            if tensor.dtype != reference.dtype or tensor.shape != reference.shape:
                raise FamilyError(
                    f"{tensor.name}: {tensor.dtype} {list(tensor.shape)} differs from "
                    f"{reference.name}: {reference.dtype} {list(reference.shape)}"
                )
        if reference.dtype != first.dtype or not reference.shape or reference.shape[1:] != first.shape[1:]:
            raise FamilyError(
                f"{reference.name}: {reference.dtype} {list(reference.shape)} cannot be "
                f"concatenated with {first.name}: {first.dtype} {list(first.shape)}"
            )
    ordered_slots = [slots[slot] for slot in range(len(merge.sources))]
    pieces = _coalesce(
        Piece(experts[e].file, experts[e].offset, experts[e].nbytes)
        for e in range(num_experts)
        for experts in ordered_slots
    )
    rows = sum(experts[0].shape[0] for experts in ordered_slots)
    shape = (num_experts, rows, *first.shape[1:])
    keys = tuple(experts[e].name for e in range(num_experts) for experts in ordered_slots)
    return (
        OutputTensor(target, first.dtype, shape, tuple(pieces)),
        FusedGroup(target=target, num_experts=num_experts, source_keys=keys),
    )


def _sibling_key(key: str, expert: int, other: int) -> str:
    """`key` with its expert index changed from `expert` to `other`."""
    return re.sub(rf"experts\.{expert}\.", f"experts.{other}.", key, count=1)


def _coalesce(pieces) -> list[Piece]:
    """Merge pieces that continue each other in the same file into one longer copy."""
    merged: list[Piece] = []
    for piece in pieces:
        if piece.length == 0:
            continue
        last = merged[-1] if merged else None
        if last and last.file == piece.file and last.offset + last.length == piece.offset:
            merged[-1] = Piece(last.file, last.offset, last.length + piece.length)
        else:
            merged.append(piece)
    return merged


def _refuse_leftover_experts(passthrough: dict[str, SourceTensor], groups: list[FusedGroup], family: Family) -> None:
    """Refuse per-expert tensors the rule does not fuse (quantization scales, say) beside fused ones:
    the result would hold both layouts and load wrong."""
    modules = {g.target.rpartition(".")[0] + "." for g in groups}
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
    return encode_header(infos, {"format": "pt"})
