"""unfuse plans a module's per-expert outputs as one run: the same plan, bytes and index as an
object per tensor, made tensor by tensor as they are written."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusemoe_ckpt import convert
from fusemoe_ckpt.commands.unfuse import unfuse
from fusemoe_ckpt.plan import expert_runs, unfusion
from fusemoe_ckpt.plan.expert_runs import StreamedShard
from fusemoe_ckpt.plan.unfusion import plan_unfuse
from fusemoe_ckpt.reading.source import open_checkpoint
from fusemoe_ckpt.rules.selection import resolve_family
from fusemoe_ckpt.write import direct as direct_module
from fusemoe_ckpt.write import output
from fusemoe_ckpt.write import writer as writer_module
from fusemoe_ckpt.write.journal import plan_fingerprint

from .conftest import MIXTRAL_CONFIG, QWEN3_CONFIG, expert_tensors, load_checkpoint, write_checkpoint


def _fused(tmp_path, tensors, config):
    src = write_checkpoint(tmp_path / "src", tensors, shards=2, config=config)
    convert(src, tmp_path / "fused", max_shard_size=700)
    return open_checkpoint(tmp_path / "fused")


def _mixtral_tensors(experts: int):
    tensors = expert_tensors(
        experts=experts, prefix="model.layers.{layer}.block_sparse_moe.experts.{expert}.", names=("w1", "w3", "w2")
    )
    return {k.replace(".mlp.gate.", ".block_sparse_moe.gate."): v for k, v in tensors.items()}


@pytest.mark.parametrize("config", ["qwen3", "mixtral"])
@pytest.mark.parametrize("max_shard_size", [10**9, 500, 40])
def test_runs_plan_exactly_what_a_tensor_by_tensor_plan_does(tmp_path, monkeypatch, config, max_shard_size):
    # 12 experts: names of experts 10 and 11 sort after 9 in file order, as numbers.
    if config == "qwen3":
        source = _fused(tmp_path, expert_tensors(experts=12), QWEN3_CONFIG)
    else:
        source = _fused(tmp_path, _mixtral_tensors(12), MIXTRAL_CONFIG)
    monkeypatch.setattr(expert_runs, "HEADER_CHUNK", 100)  # a header in many parts
    family = resolve_family(source, None)
    plan = plan_unfuse(source, family, max_shard_size=max_shard_size)
    with monkeypatch.context() as patched:
        patched.setattr(unfusion, "_plan_in_runs", lambda *args: None)
        each = plan_unfuse(source, family, max_shard_size=max_shard_size)

    assert all(isinstance(shard, StreamedShard) for shard in plan.shards)
    assert [s.filename for s in plan.shards] == [s.filename for s in each.shards]
    assert len(plan.shards) == 1 if max_shard_size == 10**9 else len(plan.shards) > 2
    for ours, theirs in zip(plan.shards, each.shards, strict=True):
        assert list(ours.tensors) == theirs.tensors
        assert b"".join(ours.header_chunks()) == ours.header == theirs.header
        assert (ours.header_size, ours.data_size, ours.file_size) == (
            len(theirs.header),
            theirs.data_size,
            theirs.file_size,
        )
        assert ours.tensors[-1] == theirs.tensors[-1] and list(ours.tensors[1:3]) == theirs.tensors[1:3]
    assert list(plan.tensor_to_filename.items()) == list(each.tensor_to_filename.items())
    assert dict(plan.tensor_to_filename) == each.tensor_to_filename
    assert "model.layers.1.mlp.experts.99.gate_proj.weight" not in plan.tensor_to_filename
    assert plan.fused_groups == each.fused_groups
    assert plan.total_size == each.total_size and plan.total_parameters == each.total_parameters
    assert plan_fingerprint(source, plan) == plan_fingerprint(source, each)


def test_the_expert_tensors_of_a_module_are_one_run(tmp_path):
    source = _fused(tmp_path, expert_tensors(experts=12), QWEN3_CONFIG)
    plan = plan_unfuse(source, resolve_family(source, None), max_shard_size=10**9)
    runs = [unit for unit in plan.shards[0].tensors.units if isinstance(unit, expert_runs.ExpertRun)]
    assert [(run.prefix, run.experts, [m.suffix for m in run.members]) for run in runs] == [
        (f"model.layers.{layer}.mlp.experts.", 12, [".down_proj.weight", ".gate_proj.weight", ".up_proj.weight"])
        for layer in (0, 1)
    ]


def test_several_copy_threads_write_the_same_bytes(tmp_path):
    src = write_checkpoint(tmp_path / "src", expert_tensors(experts=12), shards=2, config=QWEN3_CONFIG)
    convert(src, tmp_path / "fused")
    unfuse(tmp_path / "fused", tmp_path / "one", workers=1)
    unfuse(tmp_path / "fused", tmp_path / "three", workers=3)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "three").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes(), name


@settings(max_examples=50, deadline=None)
@given(
    names=st.lists(st.text(min_size=1, max_size=12), unique=True, max_size=8),
    metadata=st.dictionaries(st.text(max_size=6), st.integers() | st.text(max_size=6), max_size=3),
    chunk=st.integers(1, 64),
)
def test_index_written_in_parts_is_the_json_of_the_whole(names, metadata, chunk):
    entries = [(name, f"model-{i:05d}.safetensors") for i, name in enumerate(names)]
    whole = json.dumps({"metadata": metadata, "weight_map": dict(entries)}, indent=2) + "\n"
    original = output.INDEX_CHUNK
    output.INDEX_CHUNK = chunk
    try:
        parts = list(output._index_texts(metadata, entries))
    finally:
        output.INDEX_CHUNK = original
    assert b"".join(parts).decode() == whole


def test_a_tensor_among_the_expert_names_is_planned_tensor_by_tensor(tmp_path):
    """Runs would interleave with a plain tensor named inside a module's experts: that plan keeps an
    object per tensor, and the output is as before."""
    tensors = expert_tensors(experts=4)
    convert(write_checkpoint(tmp_path / "src", tensors, config=QWEN3_CONFIG), tmp_path / "converted")
    fused = load_checkpoint(tmp_path / "converted")
    extra = {"model.layers.0.mlp.experts.2.extra.weight": torch.full((2,), 7.0)}  # convert would refuse it
    write_checkpoint(tmp_path / "fused", fused | extra, shards=2, config=QWEN3_CONFIG)
    source = open_checkpoint(tmp_path / "fused")
    plan = plan_unfuse(source, resolve_family(source, None), max_shard_size=10**9)
    assert not any(isinstance(shard, StreamedShard) for shard in plan.shards)
    names = list(plan.tensor_to_filename)
    assert (
        names.index("model.layers.0.mlp.experts.2.extra.weight")
        == names.index("model.layers.0.mlp.experts.2.down_proj.weight") + 1
    )
    unfuse(tmp_path / "fused", tmp_path / "back")
    back = load_checkpoint(tmp_path / "back")
    assert sorted(back) == sorted(tensors | extra)
    assert all(torch.equal(back[name], tensor) for name, tensor in (tensors | extra).items())


def test_a_fused_tensor_of_no_experts_splits_into_nothing_beside_runs(tmp_path, monkeypatch):
    converted = convert(
        write_checkpoint(tmp_path / "src", expert_tensors(experts=3), config=QWEN3_CONFIG), tmp_path / "converted"
    )
    assert converted.plan.fused_groups
    fused = load_checkpoint(tmp_path / "converted")
    fused["model.layers.0.mlp.experts.gate_up_proj"] = torch.zeros((0, 6, 4))
    fused["model.layers.0.mlp.experts.down_proj"] = torch.zeros((0, 4, 3))
    source = open_checkpoint(write_checkpoint(tmp_path / "fused", fused, config=QWEN3_CONFIG))
    family = resolve_family(source, None)
    plan = plan_unfuse(source, family, max_shard_size=10**9)
    monkeypatch.setattr(unfusion, "_plan_in_runs", lambda *args: None)
    each = plan_unfuse(source, family, max_shard_size=10**9)
    assert isinstance(plan.shards[0], StreamedShard)
    assert list(plan.tensor_to_filename.items()) == list(each.tensor_to_filename.items())
    assert not any(".layers.0.mlp.experts" in name for name in plan.tensor_to_filename)
    assert plan.fused_groups == each.fused_groups


def test_a_header_made_in_parts_is_written_directly_as_through_the_page_cache(tmp_path, monkeypatch):
    src = write_checkpoint(tmp_path / "src", expert_tensors(experts=12), shards=2, config=QWEN3_CONFIG)
    convert(src, tmp_path / "fused")
    monkeypatch.setattr(expert_runs, "HEADER_CHUNK", 100)
    monkeypatch.setattr(direct_module, "CHUNK", direct_module.ALIGN)
    opened = []

    def spying_enable(fd):
        opened.append(direct_module.enable_direct(fd))
        return opened[-1]

    monkeypatch.setattr(writer_module, "enable_direct", spying_enable)
    monkeypatch.setattr(writer_module, "page_cache_absorbs", lambda nbytes: False)  # as for a frontier model
    unfuse(tmp_path / "fused", tmp_path / "direct")
    if not opened or not all(opened):
        pytest.skip(f"{tmp_path}: the filesystem refuses direct I/O")
    monkeypatch.setattr(writer_module, "DIRECT_IO", False)
    unfuse(tmp_path / "fused", tmp_path / "buffered")
    names = sorted(p.name for p in (tmp_path / "buffered").iterdir())
    assert sorted(p.name for p in (tmp_path / "direct").iterdir()) == names
    for name in names:
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "buffered" / name).read_bytes(), name
