"""The operations of a family rule, laid out as byte pieces: stack experts, concatenate, transpose,
chunk with a rotary row permutation.

Each function checks its group of source tensors (complete, uniform) and returns the output tensor
(or tensors) with the ordered pieces that fill it. Only transposition changes bytes; the others are
pure copies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import FamilyError
from ..naming import natural_key
from ..reading.safetensors_format import DTYPE_SIZES
from ..reading.tensor_table import SourceTensor
from ..rules.patterns import ChunkForRope, ConcatenateShards, Converter, ExpertMerge, SplitBySize
from .pieces import FusedGroup, OutputTensor, Piece, PieceRuns, coalesce, compact, piece_of, zeros

# The in-memory fused layout of transformers 5: which axis holds the hidden size.
HIDDEN_AXIS = {"gate_up_proj": 2, "up_proj": 2, "down_proj": 1}


# slot -> expert id (None for tensors that are not per expert) -> tensor
Slots = dict[int, dict[int | None, SourceTensor]]


def first_member(groups: Iterable[Slots]) -> str:
    """The first key in natural order among the members of `groups` (the one an error names)."""
    return min((t.name for slots in groups for members in slots.values() for t in members.values()), key=natural_key)


def _require_slots(target: str, converter: Converter, slots: Slots, family: str) -> None:
    for slot, pattern in enumerate(converter.sources):
        if slot not in slots:
            raise FamilyError(
                f"{target}: no tensor matches {pattern!r} (family {family}), "
                f"though {first_member([slots])} matches its sibling"
            )


def _check_concatenable(tensors: list[SourceTensor]) -> None:
    first = tensors[0]
    for tensor in tensors:
        if tensor.dtype != first.dtype or not tensor.shape or tensor.shape[1:] != first.shape[1:]:
            raise FamilyError(
                f"{tensor.name}: {tensor.dtype} {list(tensor.shape)} cannot be concatenated with "
                f"{first.name}: {first.dtype} {list(first.shape)}"
            )


def fuse_experts(
    target: str, merge: ExpertMerge, slots: Slots, family: str, num_experts: int, zero_experts: int = 0
) -> tuple[OutputTensor, FusedGroup]:
    """Stack experts 0..E-1 (and concatenate gate with up): for each expert in order, each slot's
    bytes in turn (gate rows, then up rows). Then `zero_experts` more (LongCat-Flash's identity
    experts, which transformers gives gate/up rows it never reads): their rows as stored, or zeros
    where the checkpoint holds none."""
    _require_slots(target, merge, slots, family)
    for slot in range(len(merge.sources)):
        for expert in range(num_experts):
            if expert not in slots[slot]:
                present = min(slots[slot])
                missing = _sibling_key(slots[slot][present].name, present, expert)
                raise FamilyError(
                    f"{missing}: missing: expert {expert} of {num_experts} for {target} (family {family})"
                )
    first = slots[0][0]
    for slot in range(len(merge.sources)):
        reference = slots[slot][0]
        differing = [t for t in slots[slot].values() if t.dtype != reference.dtype or t.shape != reference.shape]
        if differing:
            tensor = min(differing, key=lambda t: natural_key(t.name))
            raise FamilyError(
                f"{tensor.name}: {tensor.dtype} {list(tensor.shape)} differs from "
                f"{reference.name}: {reference.dtype} {list(reference.shape)}"
            )
    _check_concatenable([slots[slot][0] for slot in range(len(merge.sources))])
    ordered_slots = [slots[slot] for slot in range(len(merge.sources))]
    total = num_experts + zero_experts
    if any(t.scales is not None for experts in ordered_slots for t in experts.values()):
        pieces = compact(
            piece_of(experts[e]) if e in experts else zeros(experts[0].nbytes)
            for e in range(total)
            for experts in ordered_slots
        )
    else:
        pieces = PieceRuns.of_copies(
            (t.file, t.offset, t.nbytes) if (t := experts.get(e)) is not None else (None, 0, experts[0].nbytes)
            for e in range(total)
            for experts in ordered_slots
        )
    rows = sum(experts[0].shape[0] for experts in ordered_slots)
    shape = (total, rows, *first.shape[1:])
    present = sum(len(experts) for experts in ordered_slots)
    return (
        OutputTensor(target, first.dtype, shape, pieces),
        FusedGroup(target, "merge_experts", total, first.name, present),
    )


def _sibling_key(key: str, expert: int, other: int) -> str:
    """`key` with its expert index changed from `expert` to `other`."""
    return re.sub(rf"experts\.{expert}\.", f"experts.{other}.", key, count=1)


def concatenate(target: str, converter: Converter, slots: Slots, family: str) -> tuple[OutputTensor, FusedGroup]:
    """One tensor per source, joined along dim 0 in source order (q, k, v convolutions, say)."""
    _require_slots(target, converter, slots, family)
    tensors = []
    for slot in range(len(converter.sources)):
        found = slots[slot]
        if list(found) != [None]:
            raise FamilyError(f"{target}: {converter.sources[slot]!r} must match one tensor, not {len(found)}")
        tensors.append(found[None])
    _check_concatenable(tensors)
    shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
    return (
        OutputTensor(target, tensors[0].dtype, shape, tuple(coalesce(piece_of(t) for t in tensors))),
        FusedGroup.of(target, "concatenate", 0, [t.name for t in tensors]),
    )


def shard_count(converter: ConcatenateShards, config: dict | None) -> int:
    """How many shards config.json declares (its `text_config` first), or transformers' default.

    Raises:
        FamilyError: the value is not a positive integer.
    """
    config = config or {}
    text_config = config.get("text_config")
    scopes = [text_config] if isinstance(text_config, dict) else []
    found = next((s[converter.count_field] for s in [*scopes, config] if converter.count_field in s), None)
    found = converter.default_count if found is None else found
    if not isinstance(found, int) or isinstance(found, bool) or found <= 0:
        raise FamilyError(f"config.json: {converter.count_field} {found!r} is not a positive integer")
    return found


def concatenate_shards(
    target: str, converter: ConcatenateShards, slots: Slots, family: str, config: dict | None
) -> tuple[OutputTensor, FusedGroup]:
    """Shards 0..N-1 of one tensor joined along dim 0 in shard order (the n-gram embedding, say),
    N from config.json; a missing shard or one past N is refused."""
    _require_slots(target, converter, slots, family)
    found = slots[0]
    count = shard_count(converter, config)
    beyond = sorted(shard for shard in found if shard >= count)
    if beyond:
        raise FamilyError(
            f"{found[beyond[0]].name}: shard {beyond[0]} of {target}, but config.json declares "
            f"{converter.count_field} {count} ({found[beyond[0]].file})"
        )
    missing = [shard for shard in range(count) if shard not in found]
    if missing:
        some = min(found.values(), key=lambda t: natural_key(t.name))
        raise FamilyError(
            f"{target}: shard {missing[0]} of {count} ({converter.count_field} of config.json) is missing, "
            f"though {some.name} is one of them"
        )
    tensors = [found[shard] for shard in range(count)]
    _check_concatenable(tensors)
    shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
    return (
        OutputTensor(target, tensors[0].dtype, shape, tuple(coalesce(piece_of(t) for t in tensors))),
        FusedGroup.of(target, "concatenate_shards", 0, [t.name for t in tensors]),
    )


def hidden_axis(tensor: SourceTensor, target: str, hidden_size: int | None) -> int:
    """The axis of fused expert tensor `target` that transformers holds at hidden_size.

    Raises:
        FamilyError: not a 3-D fused expert tensor, or no hidden_size to tell its orientation.
    """
    kind = target.rpartition(".")[2]
    if len(tensor.shape) != 3 or kind not in HIDDEN_AXIS:
        raise FamilyError(f"{tensor.name}: expected a fused [experts, rows, cols] tensor, got {list(tensor.shape)}")
    if hidden_size is None:
        raise FamilyError(f"{tensor.name}: config.json gives no hidden_size to tell the orientation of fused experts")
    return HIDDEN_AXIS[kind]


def transpose_experts(
    target: str, slots: Slots, family: str, hidden_size: int | None
) -> tuple[OutputTensor, FusedGroup]:
    """A fused [E, a, b] tensor turned to [E, b, a] when its hidden axis is not where transformers
    holds it (as `Transpose(1, 2, check_dims=True)` does); each expert is a piece written transposed."""
    tensor = slots[0][None]
    axis = hidden_axis(tensor, target, hidden_size)
    experts, rows, cols = tensor.shape
    if tensor.shape[axis] == hidden_size:
        pieces: tuple[Piece, ...] = (piece_of(tensor),)
        shape = tensor.shape
    elif tensor.shape[3 - axis] == hidden_size:
        pieces, shape = transposed_pieces(tensor)
    else:
        raise FamilyError(f"{tensor.name}: shape {list(tensor.shape)} has no axis of hidden_size {hidden_size}")
    return (
        OutputTensor(target, tensor.dtype, shape, pieces),
        FusedGroup(target, "transpose_experts", experts, tensor.name, 1),
    )


def transposed_pieces(tensor: SourceTensor) -> tuple[tuple[Piece, ...], tuple[int, int, int]]:
    """A fused [E, a, b] tensor as E pieces, each expert's matrix written transposed, and the
    [E, b, a] shape they make."""
    experts, rows, cols = tensor.shape
    size = rows * cols * DTYPE_SIZES[tensor.dtype]
    pieces = tuple(Piece(tensor.file, tensor.offset + e * size, size, transpose=(rows, cols)) for e in range(experts))
    return pieces, (experts, cols, rows)


def transpose(target: str, slots: Slots) -> tuple[OutputTensor, FusedGroup]:
    """A fused [E, a, b] tensor turned to [E, b, a], whatever its shape (`Transpose(1, 2)`).

    Raises:
        FamilyError: the tensor is not 3-D (naming key and file).
    """
    tensor = slots[0][None]
    if len(tensor.shape) != 3:
        raise FamilyError(
            f"{tensor.name}: expected a fused [experts, rows, cols] tensor to transpose, got {list(tensor.shape)} "
            f"({tensor.file})"
        )
    pieces, shape = transposed_pieces(tensor)
    return OutputTensor(target, tensor.dtype, shape, pieces), FusedGroup(target, "transpose", shape[0], tensor.name, 1)


def rope_rows(rows: int, heads: int, *, inverse: bool = False) -> list[int]:
    """For each output row of `PermuteForRope`, the input row it is: within each head of 2h rows,
    rows 0, 2, 4, ... then 1, 3, 5, ... (interleaved rotary pairs to halves); `inverse` undoes it."""
    half = rows // heads // 2
    forward = [h * 2 * half + i * 2 + j for h in range(heads) for j in range(2) for i in range(half)]
    if not inverse:
        return forward
    backward = [0] * rows
    for out_row, in_row in enumerate(forward):
        backward[in_row] = out_row
    return backward


def rope_heads(converter: ChunkForRope, config: dict | None, where: str) -> int:
    """The head count `PermuteForRope` reads: `num_attention_heads` of the converter's sub-config in
    config.json, or transformers' default for that config class where it is absent.

    Raises:
        FamilyError: the value is not a positive integer (`where` names config.json).
    """
    sub = (config or {}).get(converter.rope_config)
    value = sub.get("num_attention_heads", converter.default_heads) if isinstance(sub, dict) else None
    value = converter.default_heads if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise FamilyError(f"{where}: {converter.rope_config}.num_attention_heads {value!r} is not a positive integer")
    return value


def rope_order(
    converter: ChunkForRope, config: dict | None, slot: int, tensor: SourceTensor, rows: int, *, inverse: bool = False
) -> list[int] | None:
    """The row order of target `slot`'s `rows` rows of `tensor`: `PermuteForRope`'s (or, `inverse`,
    its undoing) for a rotary target, None (rows as stored) for any other.

    Raises:
        FamilyError: the rows do not divide into the config's heads of rotary pairs, named by key and file.
    """
    if not converter.permuted(converter.targets[slot]):
        return None
    heads = rope_heads(converter, config, "config.json")
    if rows % (2 * heads):
        raise FamilyError(
            f"{tensor.name}: its {rows} rows of {converter.targets[slot]} do not divide into "
            f"{heads} heads ({converter.rope_config}.num_attention_heads) of rotary pairs ({tensor.file})"
        )
    return rope_rows(rows, heads, inverse=inverse)


def row_pieces(tensor: SourceTensor, start: int, rows: int, order: list[int] | None = None) -> tuple[Piece, ...]:
    """Rows start..start+rows of `tensor` (dim 0) as pieces, in `order` (relative row numbers) if given."""
    row_bytes = tensor.nbytes // tensor.shape[0]
    order = range(rows) if order is None else order
    return tuple(coalesce(Piece(tensor.file, tensor.offset + (start + row) * row_bytes, row_bytes) for row in order))


def chunk_for_rope(
    target: str, converter: ChunkForRope, slots: Slots, family: str, config: dict | None
) -> tuple[list[OutputTensor], FusedGroup]:
    """One tensor split on dim 0 into one equal part per target (q, k, v rows of a fused qkv), the
    parts of rotary targets with their rows permuted head by head (`Chunk` then `PermuteForRope`)."""
    _require_slots(target, converter, slots, family)
    tensor = slots[0][None]
    sizes = part_rows(converter, config, tensor)
    outputs, start = [], 0
    for i, name in enumerate(converter.output_names(target)):
        rows = sizes[i]
        pieces = row_pieces(tensor, start, rows, rope_order(converter, config, i, tensor, rows))
        start += rows
        outputs.append(OutputTensor(name, tensor.dtype, (rows, *tensor.shape[1:]), pieces))
    kind = "split" if isinstance(converter, SplitBySize) else "chunk_for_rope" if converter.rope else "chunk"
    return outputs, FusedGroup(target, kind, 0, tensor.name, 1)


def split_sizes(converter: SplitBySize, config: dict | None) -> list[int]:
    """The rows of each target of a `SplitBySize`: its head count times the head dimension, from
    config.json or transformers' config defaults.

    Raises:
        FamilyError: a value is not a positive integer.
    """
    config = config or {}

    def value(name: str, default: int) -> int:
        found = config.get(name)
        found = default if found is None else found
        if not isinstance(found, int) or isinstance(found, bool) or found <= 0:
            raise FamilyError(f"config.json: {name} {found!r} is not a positive integer")
        return found

    head_dim = value("head_dim", converter.default_head_dim)
    return [value(name, default) * head_dim for name, default in converter.heads]


def part_rows(converter: ChunkForRope, config: dict | None, tensor: SourceTensor) -> list[int]:
    """The rows of each target of `tensor`: equal parts (`Chunk`), or sized from config.json (`Split`).

    Raises:
        FamilyError: the parts do not add up to the tensor's rows (naming key and file).
    """
    parts = len(converter.targets)
    rows = tensor.shape[0] if tensor.shape else 0
    if isinstance(converter, SplitBySize):
        sizes = split_sizes(converter, config)
        if not tensor.shape or sum(sizes) != rows:
            fields = " + ".join(f"{name} x head_dim" for name, _ in converter.heads)
            raise FamilyError(
                f"{tensor.name}: shape {list(tensor.shape)} does not split into {sizes} rows "
                f"({fields} of config.json) on dim 0 ({tensor.file})"
            )
        return sizes
    if not tensor.shape or rows % parts:
        raise FamilyError(
            f"{tensor.name}: shape {list(tensor.shape)} does not split into {parts} equal parts on dim 0 "
            f"({tensor.file})"
        )
    return [rows // parts] * parts
