"""Planning holds a few hundred bytes per source tensor, not every parsed header nor a dict per
header entry: frontier models have 140k to 300k tensors (benchmarks/bench_scale.py measures the
whole process)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tracemalloc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusemoe_ckpt import convert
from fusemoe_ckpt.plan.conversion import plan_conversion, plan_for
from fusemoe_ckpt.reading.index_scan import read_index, summarize_index
from fusemoe_ckpt.reading.safetensors_format import TensorInfo, encode_header
from fusemoe_ckpt.reading.source import open_checkpoint
from fusemoe_ckpt.rules.selection import resolve_family
from fusemoe_ckpt.version import package_version
from fusemoe_ckpt.write.journal import plan_fingerprint

from .conftest import QWEN3_CONFIG, expert_tensors, write_checkpoint


def _peak_per_tensor(call, count: int) -> float:
    return _traced_peak(call) / count


def test_opening_and_planning_hold_little_per_tensor(tmp_path):
    tensors = expert_tensors(layers=2, experts=128, dtype=torch.bfloat16)
    src = write_checkpoint(tmp_path / "src", tensors, shards=8, config=QWEN3_CONFIG)
    # Every parsed header held at once, a target string per key and every sort key's own texts
    # peaked at about 695 and 1035 bytes a tensor here; with one header at a time and shared
    # strings, about 415 and 735.
    assert _peak_per_tensor(lambda: open_checkpoint(src), len(tensors)) < 550
    assert _peak_per_tensor(lambda: plan_for(src), len(tensors)) < 850


# Run in a process of its own: planning interns strings (keys mapped to, the texts natural_key
# compares) in a table of the whole process that grows by megabytes whenever an add fills it, whoever
# adds. How full it is depends on every module imported and test run before, so in the test process
# the growth landed inside the measurement or not by the order tests ran in. Alone, a first unfuse
# interns what the measured one uses, and nothing else runs between them.
_UNFUSE_PEAKS = """
import sys, tracemalloc
from pathlib import Path
from fusemoe_ckpt.commands.unfuse import unfuse
from fusemoe_ckpt.naming import natural_key
from fusemoe_ckpt.plan import expert_runs
from fusemoe_ckpt.plan.unfusion import plan_unfuse
from fusemoe_ckpt.reading.source import open_checkpoint
from fusemoe_ckpt.rules.selection import resolve_family
from fusemoe_ckpt.write import output

fused, work = Path(sys.argv[1]), Path(sys.argv[2])
first = unfuse(fused, work / "first")
source = open_checkpoint(fused)
held = [natural_key(name) for name in [*first.plan.tensor_to_filename, *source.tensors]]
held += [sys.intern(key) for key in source.tensors]
family = resolve_family(source, None)

def peak(call):
    tracemalloc.start()
    result = call()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak

planning = peak(lambda: plan_unfuse(source, family, max_shard_size=10**9))
expert_runs.HEADER_CHUNK = output.INDEX_CHUNK = 4096
print(planning, peak(lambda: unfuse(fused, work / "back", workers=2)))
"""


def test_unfuse_holds_no_object_per_output_tensor(tmp_path):
    """unfuse writes 3076 per-expert tensors here, as a frontier model's 300k: its memory must not
    grow with them (a name template and offsets per module, headers and index made as written)."""
    tensors = expert_tensors(layers=2, experts=512, dtype=torch.bfloat16)
    src = write_checkpoint(tmp_path / "src", tensors, shards=4, config=QWEN3_CONFIG)
    convert(src, tmp_path / "fused")
    run = subprocess.run(
        [sys.executable, "-c", _UNFUSE_PEAKS, str(tmp_path / "fused"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    planning, writing = (int(n) / len(tensors) for n in run.stdout.split())
    # An object per output tensor peaked at about 805 bytes a tensor planning and 870 writing; with
    # runs, about 55 and 35 (the buffers that headers and the index are written through made small).
    assert planning < 200
    assert writing < 200


def test_a_source_tensor_is_its_name_and_a_few_dozen_bytes(tmp_path):
    tensors = expert_tensors(layers=4, experts=256, dtype=torch.bfloat16)
    src = write_checkpoint(tmp_path / "src", tensors, shards=8, config=QWEN3_CONFIG)
    tracemalloc.start()
    try:
        source = open_checkpoint(src)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    names = sum(len(name.encode()) for name in source.tensors)
    # A dict of name strings to objects holding an offset: about 175 bytes a tensor beside the
    # name's own characters here (a string's header and hash, the dict entry, the object, the
    # offset); the names in one buffer and the rest in columns and a hash table: about 45.
    assert (held - names) / len(tensors) < 60


def test_planning_holds_little_beyond_the_source(tmp_path):
    tensors = expert_tensors(layers=4, experts=256, dtype=torch.bfloat16)
    src = write_checkpoint(tmp_path / "src", tensors, shards=8, config=QWEN3_CONFIG)
    source = open_checkpoint(src)
    family = resolve_family(source, None)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        plan = plan_conversion(source, family, max_shard_size=5 * 10**9)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert plan.fused_modules
    # Every key sorted by its numbers at once, every mapping, copies of the tensor map and an object
    # per fused piece: about 380 bytes a tensor here; keys taken in order, each group let go once
    # fused and pieces as arrays: about 85.
    assert (peak - before) / len(tensors) < 150


def _traced_peak(call) -> int:
    tracemalloc.start()
    try:
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak


@pytest.mark.parametrize("sort_keys", [True, False], ids=["sorted", "unsorted"])
def test_index_of_100k_tensors_is_read_in_bounded_memory(tmp_path, sort_keys):
    """The index is read a chunk at a time: its entries are never all held (8 bytes a name, to prove
    none repeats, where they are not in sorted order)."""
    names = [f"model.layers.{i // 1000}.mlp.experts.{i % 1000}.gate_proj.weight" for i in range(100_000)]
    weight_map = {name: f"model-{i // 2000 + 1:05d}-of-00050.safetensors" for i, name in enumerate(names)}
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(
        json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}, indent=2, sort_keys=sort_keys)
    )
    del weight_map
    # Parsed whole, about 400 bytes a tensor (40 MB); chunk by chunk, about 4 MB in all.
    assert _traced_peak(lambda: read_index(path)) > 16_000_000
    assert _traced_peak(lambda: summarize_index(path)) < 8_000_000


def test_experts_share_their_dtype_shape_and_target_strings(tmp_path):
    src = write_checkpoint(tmp_path / "src", expert_tensors(experts=8), shards=2, config=QWEN3_CONFIG)
    source = open_checkpoint(src)
    gates = [t for name, t in source.tensors.items() if name.endswith("gate_proj.weight")]
    assert len({id(t.dtype) for t in gates}) == 1
    assert len({id(t.shape) for t in gates}) <= 2  # one per shard at most


@settings(max_examples=50, deadline=None)
@given(
    # "__metadata__" is the key of a header's metadata: no tensor can have that name.
    names=st.lists(st.text(min_size=1, max_size=12).filter(lambda n: n != "__metadata__"), unique=True, max_size=6),
    metadata=st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
)
def test_header_written_entry_by_entry_is_the_json_of_the_whole(names, metadata):
    entries = [TensorInfo(name, "BF16", (i, 2), 4 * i * i, 4 * i * (i + 1)) for i, name in enumerate(names)]
    whole = {"__metadata__": metadata}
    for info in entries:
        whole[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [info.start, info.end]}
    text = json.dumps(whole, separators=(",", ":")).encode()
    for residue in (None, 0, 8, 4088):
        header = encode_header(entries, metadata, data_start_residue=residue)
        length = int.from_bytes(header[:8], "little")
        assert length == len(header) - 8
        assert header[8:].rstrip(b" ") == text
        assert len(header) % 8 == 0 if residue is None else len(header) % 4096 == residue


def _fingerprint_of_the_whole_document(source, plan) -> str:
    """The resume fingerprint as json.dumps of one document: what plan_fingerprint feeds piece by piece."""
    files = []
    for path in source.shard_files:
        st = os.stat(path)
        files.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    shards = [
        [
            shard.filename,
            hashlib.sha256(shard.header).hexdigest(),
            [
                [p.file and str(p.file.resolve()), p.offset, p.length, p.transpose]
                for t in shard.tensors
                for p in t.pieces
            ],
        ]
        for shard in plan.shards
    ]
    document = {"version": package_version(), "family": plan.family.name, "files": files, "shards": shards}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def test_fingerprint_fed_piece_by_piece_is_the_hash_of_the_whole_document(tmp_path):
    tensors = expert_tensors(experts=8)
    src = write_checkpoint(tmp_path / "src", tensors, shards=3, config=QWEN3_CONFIG)
    source, plan = plan_for(src, max_shard_size=400)
    assert len(plan.shards) > 1
    assert plan_fingerprint(source, plan) == _fingerprint_of_the_whole_document(source, plan)
    # Pieces cast on the way are hashed by their byte ranges alone, as before.
    source, plan = plan_for(src, max_shard_size=400, dtype="float16")
    assert plan_fingerprint(source, plan) == _fingerprint_of_the_whole_document(source, plan)
