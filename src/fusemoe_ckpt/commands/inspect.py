"""What convert would do to a checkpoint, from its headers alone: the plan, summarised.

`Inspection.to_json()` is a stable schema (`SCHEMA_VERSION`, documented in README.md): new keys
may be added, existing ones keep their name and type.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property

from ..naming import natural_key
from ..plan.conversion import plan_for
from ..plan.layout import ConversionPlan
from ..plan.operations import HIDDEN_AXIS
from ..plan.pieces import OutputTensor, copies, plain, transposed
from ..reading.quantization import ACTIVATION_SCALE_NAMES, SCALE_SUFFIX
from ..reading.quantized_dtypes import FP4_WEIGHT_DTYPE
from ..reading.source import SourceCheckpoint
from ..rules.consumers import verdict_line
from ..rules.families import Family
from ..rules.patterns import ExpertMerge, TransposeExperts
from ..rules.quantized import is_scale_twin
from ..sizes import format_size, parse_size
from ..write.streams import DEQUANTIZE_CHUNK, READ_CHUNK
from ..write.workers import default_workers
from ..write.writer import FALLBACK_BUFFER

SCHEMA_VERSION = 1
# Python memory of planning per source tensor (the source's tensor table, a shard's parsed header,
# output tensors, pieces): tracemalloc measured a 154-byte peak per tensor on a 100-shard, 18,771-tensor
# index (scripts/bench_inspect.py), about 180 at 141k tensors (190 with FP8 scales) and 140 at 301k;
# rounded up for the allocator's fragmentation.
PLAN_BYTES_PER_TENSOR = 250


@dataclass(frozen=True)
class MoeModule:
    """One module of routed experts, as it is in the source."""

    module: str
    state: str  # "per_expert", "fused" or "fused_transposed" (fused, hidden axis where transformers does not hold it)
    experts: int
    intermediate_size: int
    hidden_size: int
    dtype: str
    nbytes: int
    # {"dtype", "scale_dtype", "block", "dequantized"} of quantized experts, else None
    quantization: dict | None = None


@dataclass
class Inspection:
    source: SourceCheckpoint
    plan: ConversionPlan
    modules: list[MoeModule]
    fuse_bytes: int
    workers: int
    max_shard_size: int

    @property
    def already_fused(self) -> bool:
        return self.fuse_bytes == 0

    @property
    def renamed_tensors(self) -> int:
        converted = {g.target for g in self.plan.fused_groups}
        source = self.source.tensors
        # A compressed-tensors layer `x.weight_packed` is written as `x.weight`: the same layer, not renamed.
        return sum(
            1
            for name in self.plan.tensor_to_filename
            if name not in source
            and name not in converted
            and not (name.endswith(".weight") and name + "_packed" in source)
        )

    @cached_property  # read twice by a report, each a pass over every tensor
    def buffer_bytes_per_worker(self) -> int:
        """The most tensor bytes one writer holds at once: the read/write fallback buffer, a cast
        chunk in and out, a transposed expert as read and as turned, or a dequantized chunk."""
        largest = FALLBACK_BUFFER
        for tensor in self.plan.tensors.values():
            for piece in () if plain(tensor.pieces) else tensor.pieces:
                if piece.scales is not None:
                    largest = max(largest, DEQUANTIZE_CHUNK)  # rows, their float32 values, the rounding, output
                elif piece.transpose is not None:
                    largest = max(largest, 2 * piece.length + (min(READ_CHUNK, piece.length) if piece.cast else 0))
                elif piece.cast is not None:
                    chunk = min(READ_CHUNK, piece.length)
                    largest = max(largest, chunk + chunk * piece.out_length // piece.length)
        return largest

    @cached_property  # read twice by a report, each a pass over every tensor
    def header_bytes(self) -> int:
        return sum(self.source.tensors.start_of_each_file().values())

    @property
    def peak_memory_bytes(self) -> int:
        """workers x buffer per worker, plus the raw headers and the plan's Python objects."""
        plan_bytes = PLAN_BYTES_PER_TENSOR * len(self.source.tensors)
        return self.workers * self.buffer_bytes_per_worker + self.header_bytes + plan_bytes

    def to_json(self) -> dict:
        """The documented `inspect --json` schema."""
        total = self.source.total_bytes
        return {
            "schema_version": SCHEMA_VERSION,
            "source": str(self.source.root),
            "family": self.plan.family.name,
            "model_type": (self.source.config or {}).get("model_type"),
            "already_fused": self.already_fused,
            "source_files": len(self.source.shard_files),
            "source_tensors": len(self.source.tensors),
            "total_bytes": total,
            "fuse_bytes": self.fuse_bytes,
            "passthrough_bytes": total - self.fuse_bytes,
            "renamed_tensors": self.renamed_tensors,
            "ignored_tensors": len(_ignored(self.plan)),
            "quantization": _described(self.plan),
            "moe_modules": [
                {
                    "module": m.module,
                    "state": m.state,
                    "experts": m.experts,
                    "intermediate_size": m.intermediate_size,
                    "hidden_size": m.hidden_size,
                    "dtype": m.dtype,
                    "bytes": m.nbytes,
                    "quantization": m.quantization,
                }
                for m in self.modules
            ],
            "output": {
                "dtype": self.plan.dtype,
                "max_shard_size": self.max_shard_size,
                "tensors": len(self.plan.tensor_to_filename),
                "total_bytes": self.plan.total_size,
                "shards": [
                    {"filename": s.filename, "tensors": len(s.tensors), "bytes": s.file_size} for s in self.plan.shards
                ],
            },
            "peak_memory": {
                "bytes": self.peak_memory_bytes,
                "workers": self.workers,
                "buffer_bytes_per_worker": self.buffer_bytes_per_worker,
                "header_bytes": self.header_bytes,
                "plan_bytes": PLAN_BYTES_PER_TENSOR * len(self.source.tensors),
            },
        }

    def lines(self) -> list[str]:
        """The report for people, one fact per line."""
        data = self.to_json()
        model_type = f" (model_type {data['model_type']})" if data["model_type"] else ""
        state = "already fused: nothing to fuse" if self.already_fused else f"{format_size(self.fuse_bytes)} to fuse"
        lines = [
            f"family: {data['family']}{model_type}",
            f"source: {data['source_tensors']} tensors in {data['source_files']} files, "
            f"{format_size(data['total_bytes'])}; {state}, {format_size(data['passthrough_bytes'])} to pass through"
            + (f", {data['renamed_tensors']} tensors renamed" if data["renamed_tensors"] else ""),
            f"MoE modules: {len(self.modules)}",
        ]
        if data["model_type"]:
            lines.insert(1, verdict_line(data["model_type"]))
        if data["quantization"]:
            q = data["quantization"]
            block = f"block {q['block'][0]}x{q['block'][1]}" if q["block"] else "per-tensor/per-channel scales"
            fate = "dequantized" if q["dequantize"] else "kept, scales fused beside the weights"
            if q.get("scheme"):
                lines.append(f"quantization: {q['method']}, experts {q['scheme']}: {fate}")
            else:
                lines.append(f"quantization: {q['method']}, {block}, scale_fmt {q['scale_fmt']}: {fate}")
        lines += [
            f"  {m.module}: {m.state}, E={m.experts} I={m.intermediate_size} H={m.hidden_size} {m.dtype}"
            f"{_scales_note(m.quantization)}, {format_size(m.nbytes)}"
            for m in self.modules
        ]
        output = data["output"]
        cast = f", cast to {output['dtype']}" if output["dtype"] else ""
        lines.append(
            f"output: {output['tensors']} tensors in {len(output['shards'])} shards of at most "
            f"{format_size(self.max_shard_size)}, {format_size(output['total_bytes'])}{cast}"
        )
        lines += [f"  {s['filename']}: {s['tensors']} tensors, {format_size(s['bytes'])}" for s in output["shards"]]
        memory = data["peak_memory"]
        lines.append(
            f"expected peak memory: {format_size(memory['bytes'])} = {memory['workers']} workers x "
            f"{format_size(memory['buffer_bytes_per_worker'])} buffer + {format_size(memory['header_bytes'])} "
            f"of headers + {format_size(memory['plan_bytes'])} of plan"
        )
        return lines


def _described(plan: ConversionPlan) -> dict | None:
    q = plan.quantization
    if q is None:
        return None
    return {
        "method": q.method,
        "block": list(q.block) if q.block else None,
        "scale_fmt": q.scale_fmt,
        "activation_scheme": q.activation_scheme,
        "expert_dtype": q.expert_dtype,
        "dequantize": plan.dequantized,
        "scheme": q.compressed.experts.describe() if q.compressed is not None else None,
        "dropped_tensors": len([k for k in plan.dropped if k.rpartition(".")[2] in ACTIVATION_SCALE_NAMES]),
    }


def _ignored(plan: ConversionPlan) -> list[str]:
    """Source tensors dropped because transformers ignores them at load (`mtp.*` of DeepSeek-V4)."""
    family = plan.family
    return [key for key in plan.dropped if family.model.ignores(family.map_key(key).target)]


def _scales_note(quantization: dict | None) -> str:
    if quantization is None:
        return ""
    block = "x".join(map(str, quantization["block"]))
    return f" with {quantization['scale_dtype']} scales per {block} block"


def inspect_checkpoint(
    src: str | os.PathLike,
    *,
    family: str | None = None,
    max_shard_size: str | int = "5GB",
    dtype: str | None = None,
    workers: int | None = None,
    dequantize: bool = False,
) -> Inspection:
    """Plan the conversion of `src` and describe it; reads headers only."""
    source, plan = plan_for(src, family=family, max_shard_size=max_shard_size, dtype=dtype, dequantize=dequantize)
    return Inspection(
        source=source,
        plan=plan,
        modules=_moe_modules(plan),
        fuse_bytes=_fuse_bytes(source, plan),
        workers=workers or default_workers(dequantize=dequantize),
        max_shard_size=parse_size(max_shard_size),
    )


def _fuse_bytes(source: SourceCheckpoint, plan: ConversionPlan) -> int:
    """Source bytes that a converter moves into a new layout (a fused tensor already in transformers'
    orientation is only renamed, so it counts as passed through)."""
    outputs = plan.tensors
    total = 0
    for group in plan.fused_groups:
        if group.operation == "transpose_experts" and not transposed(outputs[group.target].pieces):
            continue
        # The pieces' source bytes: a packed weight planned dequantized is keyed by the weight it becomes.
        total += sum(length for file, _, length in copies(outputs[group.target].pieces) if file is not None)
    return total


def _moe_modules(plan: ConversionPlan) -> list[MoeModule]:
    by_module: dict[str, list[tuple[OutputTensor, int, str]]] = defaultdict(list)
    operation = {g.target: g.operation for g in plan.fused_groups}
    outputs = plan.tensors
    for tensor in outputs.values():
        sources = _expert_sources(plan.family, tensor.name)
        if sources and len(tensor.shape) == 3:
            state = {"merge_experts": "per_expert", "transpose_experts": "fused"}.get(
                operation.get(tensor.name), "fused"
            )
            if transposed(tensor.pieces):
                state = "fused_transposed"
            by_module[tensor.name.rpartition(".")[0]].append((tensor, sources, state))
    modules = []
    for module in sorted(by_module, key=natural_key):
        entries = by_module[module]
        tensor, sources, _ = min(entries, key=lambda e: e[1])  # one source (down_proj) gives I directly
        axis = HIDDEN_AXIS.get(tensor.name.rpartition(".")[2], 2)
        first = tensor.pieces[0] if tensor.pieces else None
        shape = _logical_shape(tensor)
        modules.append(
            MoeModule(
                module=module,
                state=entries[0][2],
                experts=shape[0],
                intermediate_size=shape[3 - axis] // sources,
                hidden_size=shape[axis],
                dtype=first.cast[0] if first is not None and first.cast else tensor.dtype,
                nbytes=sum(length for t, _, _ in entries for _, _, length in copies(t.pieces)),
                quantization=_quantization(tensor, outputs),
            )
        )
    return modules


def _logical_shape(tensor: OutputTensor) -> tuple[int, ...]:
    """The shape of the values a fused expert tensor holds: FP4 experts pack two in each I8 byte."""
    if tensor.dtype == FP4_WEIGHT_DTYPE and tensor.shape:
        return (*tensor.shape[:-1], tensor.shape[-1] * 2)
    return tensor.shape


def _quantization(tensor: OutputTensor, outputs: dict[str, OutputTensor]) -> dict | None:
    """How a module's experts are quantized: fused with their scales, or planned dequantized."""
    scales = tensor.pieces[0].scales if tensor.pieces else None
    if scales is not None:
        return {
            "dtype": scales.quantized_dtype,
            "scale_dtype": scales.dtype,
            "block": list(scales.block),
            "dequantized": True,
        }
    fused_scales = outputs.get(tensor.name + SCALE_SUFFIX)
    if fused_scales is None:
        return None
    _, rows, cols = _logical_shape(tensor)
    _, grid_rows, grid_cols = fused_scales.shape
    block = [-(-rows // grid_rows), -(-cols // grid_cols)]
    return {"dtype": tensor.dtype, "scale_dtype": fused_scales.dtype, "block": block, "dequantized": False}


def _expert_sources(family: Family, name: str) -> int:
    """How many per-expert sources the converter that outputs `name` has (2 for gate_up), or 0."""
    for converter in family.converters:
        if is_scale_twin(converter):
            continue
        if isinstance(converter, ExpertMerge | TransposeExperts) and converter.match_output(name):
            return len(converter.sources) if isinstance(converter, ExpertMerge) else _transposed_sources(name)
    return 0


def _transposed_sources(name: str) -> int:
    return 2 if name.endswith("gate_up_proj") else 1
