"""The output layout: which shard holds each output tensor, and each shard's header.

Pure data, like the rest of the plan: tensors go into shards greedily in file order (a module's
fused tensors kept together), and each header is padded so copied bytes keep their page offset.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..naming import natural_key
from ..reading.safetensors_format import HEADER_ALIGNMENT, PAGE_SIZE, TensorInfo, encode_header
from ..rules.families import Family
from .pieces import FusedGroup, OutputTensor, copies, plain

if TYPE_CHECKING:
    from ..reading.quantization_records import Quantization

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
        return self.header_size + self.data_size

    @property
    def header_size(self) -> int:
        return len(self.header)

    def header_chunks(self) -> Iterator[bytes]:
        """The header in consecutive parts: a shard of very many tensors may make it as it is written."""
        yield self.header


@dataclass
class ConversionPlan:
    """Everything convert will write, named by direction."""

    family: Family
    shards: list[ShardPlan]
    fused_groups: list[FusedGroup]
    tensor_to_filename: dict[str, str] = field(default_factory=dict)
    dtype: str | None = None  # the floating dtype tensors are cast to; None keeps every dtype
    quantization: Quantization | None = None  # of the source, as config.json declares it
    dequantized: bool = False  # quantized weights planned dequantized, their scales consumed
    dropped: list[str] = field(default_factory=list)  # source keys deliberately not written
    config: dict | None = None  # the config.json to write instead of copying the source's

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
        """The expert modules that were fused, e.g. `model.layers.3.mlp.experts` (not a q/k/v split or a
        concatenation, which hold no experts)."""
        return sorted({g.target.rpartition(".")[0] for g in self.fused_groups if g.num_experts}, key=natural_key)

    @property
    def num_experts(self) -> int:
        """Experts fused, counted once per module (a gate_up/down pair of E experts counts E)."""
        per_module = {g.target.rpartition(".")[0]: g.num_experts for g in self.fused_groups}
        return sum(per_module.values())


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
    return encode_header(infos, {"format": "pt"}, data_start_residue=page_residue(tensors))


def page_residue(tensors: list[OutputTensor]) -> int:
    """Where, modulo a page, the shard's data should start so that the most copied bytes keep their
    source's offset within a page: those the kernel copies as whole pages."""
    weights: Counter[int] = Counter()
    position = 0
    for tensor in tensors:
        if plain(tensor.pieces) or all(p.transpose is None and p.cast is None for p in tensor.pieces):
            at = position
            for file, offset, length in copies(tensor.pieces):
                if file is not None:
                    weights[(offset - at) % PAGE_SIZE] += length
                at += length
        position += tensor.nbytes
    aligned = {residue: n for residue, n in weights.items() if residue % HEADER_ALIGNMENT == 0}
    return max(aligned, key=lambda residue: (aligned[residue], -residue)) if aligned else 0
