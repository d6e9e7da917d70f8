"""convert on checkpoints you can read by eye: expert e of layer l holds 10*l + e."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fusemoe_ckpt import FamilyError, convert

from .conftest import (
    HIDDEN,
    INTERMEDIATE,
    MIXTRAL_CONFIG,
    QWEN3_CONFIG,
    expert_tensors,
    load_checkpoint,
    write_checkpoint,
)

EXPERT_BYTES = INTERMEDIATE * HIDDEN * 4  # one float32 gate, up or down tensor


def _index(root: Path) -> dict:
    return json.loads((root / "model.safetensors.index.json").read_text())


def test_fused_tensors_in_expert_order_gate_rows_before_up(qwen_checkpoint, tmp_path):
    convert(qwen_checkpoint, tmp_path / "out")
    fused = load_checkpoint(tmp_path / "out")
    for layer in range(2):
        gate_up = fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = fused[f"model.layers.{layer}.mlp.experts.down_proj"]
        assert gate_up.shape == (4, 2 * INTERMEDIATE, HIDDEN)
        assert down.shape == (4, HIDDEN, INTERMEDIATE)
        for expert in range(4):
            value = 10 * layer + expert
            assert torch.all(gate_up[expert, :INTERMEDIATE] == value)
            assert torch.all(gate_up[expert, INTERMEDIATE:] == value + 0.5)
            assert torch.all(down[expert] == -value)


def test_key_set_is_passthrough_plus_fused(qwen_checkpoint, tmp_path):
    convert(qwen_checkpoint, tmp_path / "out")
    expected = {
        "model.embed_tokens.weight",
        "model.norm.weight",
        *(f"model.layers.{layer}.mlp.gate.weight" for layer in range(2)),
        *(f"model.layers.{layer}.mlp.experts.{p}" for layer in range(2) for p in ("gate_up_proj", "down_proj")),
    }
    assert set(_index(tmp_path / "out")["weight_map"]) == expected
    source = load_checkpoint(qwen_checkpoint)
    fused = load_checkpoint(tmp_path / "out")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight"):
        assert torch.equal(fused[name], source[name])


def test_experts_of_one_layer_spread_over_shards(tmp_path):
    """Round-robin over 5 shards puts each expert's three tensors in different files."""
    src = write_checkpoint(tmp_path / "src", expert_tensors(layers=1, experts=6), shards=5, config=QWEN3_CONFIG)
    shards_of_layer = {filename for name, filename in _index(src)["weight_map"].items() if ".experts." in name}
    assert len(shards_of_layer) == 5
    convert(src, tmp_path / "out")
    gate_up = load_checkpoint(tmp_path / "out")["model.layers.0.mlp.experts.gate_up_proj"]
    assert [gate_up[e, 0, 0].item() for e in range(6)] == [0, 1, 2, 3, 4, 5]


def test_index_metadata_and_shard_names(qwen_checkpoint, tmp_path):
    result = convert(qwen_checkpoint, tmp_path / "out", max_shard_size=2 * 4 * 2 * EXPERT_BYTES)
    index = _index(tmp_path / "out")
    files = sorted(set(index["weight_map"].values()))
    count = len(files)
    assert count == len(result.plan.shards) > 1
    assert files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    metadata = index["metadata"]
    assert metadata["total_size"] == sum(t.numel() * 4 for t in load_checkpoint(tmp_path / "out").values())
    assert metadata["fusemoe_ckpt_family"] == "qwen2_moe"
    assert metadata["fusemoe_ckpt_source"] == str(qwen_checkpoint)
    assert metadata["fusemoe_ckpt_version"]
    for filename in files:
        with safe_open(tmp_path / "out" / filename, "pt") as f:
            assert f.metadata() == {"format": "pt"}


def test_shard_size_limit_and_fused_pair_kept_together(qwen_checkpoint, tmp_path):
    """A layer's gate_up (8 experts' worth) and down (4) fit 13 expert-tensors: kept in one shard."""
    limit = 13 * EXPERT_BYTES
    convert(qwen_checkpoint, tmp_path / "out", max_shard_size=limit)
    weight_map = _index(tmp_path / "out")["weight_map"]
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts."
        assert weight_map[prefix + "gate_up_proj"] == weight_map[prefix + "down_proj"]
    for filename in set(weight_map.values()):
        with safe_open(tmp_path / "out" / filename, "pt") as f:
            assert sum(f.get_tensor(k).nbytes for k in f.keys()) <= limit  # noqa: SIM118


def test_tensor_over_the_limit_gets_its_own_shard(qwen_checkpoint, tmp_path):
    """gate_up_proj (8 expert tensors) exceeds a 5-tensor limit: alone in its shard, not refused."""
    convert(qwen_checkpoint, tmp_path / "out", max_shard_size=5 * EXPERT_BYTES)
    weight_map = _index(tmp_path / "out")["weight_map"]
    for layer in range(2):
        filename = weight_map[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        assert [k for k, v in weight_map.items() if v == filename] == [f"model.layers.{layer}.mlp.experts.gate_up_proj"]
    assert len(load_checkpoint(tmp_path / "out")) == len(weight_map)


def test_mixtral_renames_block_sparse_moe(tmp_path):
    tensors = expert_tensors(prefix="model.layers.{layer}.block_sparse_moe.experts.{expert}.", names=("w1", "w3", "w2"))
    tensors = {k.replace(".mlp.gate.", ".block_sparse_moe.gate."): v for k, v in tensors.items()}
    src = write_checkpoint(tmp_path / "src", tensors, shards=2, config=MIXTRAL_CONFIG)
    convert(src, tmp_path / "out")
    fused = load_checkpoint(tmp_path / "out")
    assert not [k for k in fused if "block_sparse_moe" in k]
    assert torch.all(fused["model.layers.1.mlp.experts.gate_up_proj"][3, :INTERMEDIATE] == 13)
    assert torch.all(fused["model.layers.1.mlp.experts.gate_up_proj"][3, INTERMEDIATE:] == 13.5)
    assert "model.layers.0.mlp.gate.weight" in fused


def test_single_file_source_and_bf16(tmp_path):
    src = write_checkpoint(
        tmp_path / "src", expert_tensors(dtype=torch.bfloat16), single_file=True, config=QWEN3_CONFIG
    )
    convert(src, tmp_path / "out")
    down = load_checkpoint(tmp_path / "out")["model.layers.1.mlp.experts.down_proj"]
    assert down.dtype == torch.bfloat16
    assert [down[e, 0, 0].item() for e in range(4)] == [-10, -11, -12, -13]


def test_copies_non_weight_files_and_never_weights(qwen_checkpoint, tmp_path):
    for name in (
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
        "LICENSE",
    ):
        (qwen_checkpoint / name).write_text(name)
    for name in (
        "pytorch_model.bin",
        "consolidated.pth",
        "model.pt",
        "extra.safetensors",
        "pytorch_model.bin.index.json",
    ):
        (qwen_checkpoint / name).write_text("weights")
    (qwen_checkpoint / "original").mkdir()
    (qwen_checkpoint / "original" / "params.json").write_text("{}")
    (qwen_checkpoint / "original" / "consolidated.00.pth").write_text("weights")
    convert(qwen_checkpoint, tmp_path / "out")
    out = tmp_path / "out"
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    shards = sorted(set(_index(out)["weight_map"].values()))
    assert names == sorted(
        [
            "LICENSE",
            "README.md",
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model.safetensors.index.json",
            "original/params.json",
            "tokenizer.json",
            "tokenizer_config.json",
            *shards,
        ]
    )
    assert (out / "tokenizer.json").read_text() == "tokenizer.json"


def test_already_fused_is_copied_through(qwen_checkpoint, tmp_path):
    convert(qwen_checkpoint, tmp_path / "once")
    result = convert(tmp_path / "once", tmp_path / "twice")
    assert result.nothing_to_fuse
    once, twice = load_checkpoint(tmp_path / "once"), load_checkpoint(tmp_path / "twice")
    assert once.keys() == twice.keys()
    assert all(torch.equal(once[k], twice[k]) for k in once)


def test_source_is_not_modified(qwen_checkpoint, tmp_path):
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in qwen_checkpoint.rglob("*")}
    convert(qwen_checkpoint, tmp_path / "out")
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in qwen_checkpoint.rglob("*")} == before


def test_overwrite_replaces_destination_and_empty_destination_is_fine(qwen_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    convert(qwen_checkpoint, out)
    (out / "stale.txt").write_text("old")
    convert(qwen_checkpoint, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_failure_mid_write_leaves_no_destination(qwen_checkpoint, tmp_path, monkeypatch):
    """An error after some shards are written removes the partial output and creates no DST."""
    import fusemoe_ckpt.write.output as output_module

    def broken_index(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(output_module, "write_index", broken_index)
    with pytest.raises(OSError, match="disk on fire"):
        convert(qwen_checkpoint, tmp_path / "out", max_shard_size=4 * EXPERT_BYTES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_per_expert_tensors_the_rule_does_not_fuse_are_refused(tmp_path):
    """Quantization scales beside fused weights would load wrong: refused, naming the key."""
    tensors = expert_tensors(layers=1, experts=2)
    tensors["model.layers.0.mlp.experts.1.gate_proj.weight_scale_inv"] = torch.ones(1, 1)
    src = write_checkpoint(tmp_path / "src", tensors, config=QWEN3_CONFIG)
    with pytest.raises(FamilyError, match=r"model\.layers\.0\.mlp\.experts\.1\.gate_proj\.weight_scale_inv"):
        convert(src, tmp_path / "out")


# Modules a local convert without a cast never runs, each a cost of its start-up (BENCHMARKS.md, Start-up).
NOT_IMPORTED_BY_CONVERT = (
    "torch",
    "concurrent.futures",  # plain threads write the shards
    "logging",  # imported by concurrent.futures
    "shutil",  # with zlib, bz2 and lzma: only removing a tree needs it
    "ctypes",  # malloc_trim after planning many tensors, write-behind of a shard larger than one stretch
    "fusemoe_ckpt.batch.cluster",
    "fusemoe_ckpt.hub.push_record",  # a DST that holds files, or --stream
    "fusemoe_ckpt.write.finished",
    "fusemoe_ckpt.plan.expert_runs",  # unfuse's
    "fusemoe_ckpt.reading.compressed_tensors",  # a compressed-tensors checkpoint's
    "fusemoe_ckpt.plan.compressed",
    "fusemoe_ckpt.reading.quantization_records",  # a quantized checkpoint's records
)
# Data classes only a quantized checkpoint makes (each costs its generated methods at import).
NOT_DEFINED_BY_CONVERT = ("Quantization", "Scales", "ZeroPoints")


def test_convert_imports_neither_torch_nor_what_it_does_not_run(qwen_checkpoint, tmp_path):
    code = (
        "import sys; from fusemoe_ckpt.cli import main; sys.argv = ['fusemoe-ckpt', 'convert', "
        f"{str(qwen_checkpoint)!r}, {str(tmp_path / 'out')!r}, '--quiet']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        f"imported = [name for name in {NOT_IMPORTED_BY_CONVERT!r} if name in sys.modules]\n"
        "assert not imported, f'imported: {imported}'\n"
        "defined = [f'{m}.{n}' for m, module in list(sys.modules.items()) if m.startswith('fusemoe_ckpt') "
        f"for n in {NOT_DEFINED_BY_CONVERT!r} if isinstance(getattr(module, n, None), type)]\n"
        "assert not defined, f'defined: {defined}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_qwen3_vl_moe_experts_are_turned_to_the_in_memory_orientation(tmp_path):
    """Stored [E, H, 2I] and [E, I, H] become [E, 2I, H] and [E, H, I], expert by expert."""
    experts, hidden, inter = 3, 4, 3
    prefix = "model.language_model.layers.0.mlp.experts."
    gate_up = torch.arange(experts * hidden * 2 * inter, dtype=torch.float32).reshape(experts, hidden, 2 * inter)
    down = torch.arange(experts * inter * hidden, dtype=torch.bfloat16).reshape(experts, inter, hidden)
    tensors = {
        f"{prefix}gate_up_proj": gate_up,
        f"{prefix}down_proj": down,
        "model.language_model.norm.weight": torch.ones(4),
    }
    config = {"model_type": "qwen3_vl_moe", "text_config": {"hidden_size": hidden}}
    src = write_checkpoint(tmp_path / "src", tensors, shards=2, config=config)
    result = convert(src, tmp_path / "out")
    fused = load_checkpoint(tmp_path / "out")
    assert torch.equal(fused[f"{prefix}gate_up_proj"], gate_up.transpose(1, 2))
    assert torch.equal(fused[f"{prefix}down_proj"], down.transpose(1, 2))
    assert result.plan.num_experts == experts

    again = convert(tmp_path / "out", tmp_path / "again")
    assert all(piece.transpose is None for shard in again.plan.shards for t in shard.tensors for piece in t.pieces)
    assert torch.equal(load_checkpoint(tmp_path / "again")[f"{prefix}gate_up_proj"], gate_up.transpose(1, 2))


def test_mixed_checkpoint_fuses_only_what_is_per_expert(qwen_checkpoint, tmp_path):
    """Layers already fused pass through; a block still per expert (say an MTP layer) is fused."""
    fused_once = load_checkpoint(convert(qwen_checkpoint, tmp_path / "fused").destination)
    mixed = {k: v for k, v in fused_once.items() if not k.startswith("model.layers.1.")}
    mixed |= {k: v for k, v in load_checkpoint(qwen_checkpoint).items() if k.startswith("model.layers.1.")}
    src = write_checkpoint(tmp_path / "mixed", mixed, shards=2, config=QWEN3_CONFIG)
    result = convert(src, tmp_path / "out")
    assert result.plan.fused_modules == ["model.layers.1.mlp.experts"]
    out = load_checkpoint(tmp_path / "out")
    assert out.keys() == fused_once.keys()
    assert all(torch.equal(out[k], fused_once[k]) for k in out)


def test_one_shard_copied_by_several_threads_is_identical(qwen_checkpoint, tmp_path):
    """Spare workers copy parts of one shard at once; the file is the same byte for byte."""
    convert(qwen_checkpoint, tmp_path / "one", workers=1)
    result = convert(qwen_checkpoint, tmp_path / "four", workers=4)
    assert len(result.plan.shards) == 1
    for name in sorted(p.name for p in (tmp_path / "one").iterdir()):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "four" / name).read_bytes(), name


def test_split_evenly_keeps_every_piece_once_in_order():
    from fusemoe_ckpt.write.writer import split_evenly

    sizes = [5, 1, 1, 1, 8, 2, 2]
    for parts in range(1, 9):
        runs = split_evenly(sizes, parts)
        assert [i for run in runs for i in run] == list(range(len(sizes)))
        assert 1 <= len(runs) <= parts
    assert [len(run) for run in split_evenly(sizes, 2)] == [4, 3]
    assert split_evenly([], 4) == []


def test_shard_data_starts_on_the_page_offset_of_its_sources(tmp_path):
    """The header is padded so copied bytes keep their offset within a page: the kernel moves pages."""
    tensors = expert_tensors(layers=1, experts=2)
    src = write_checkpoint(tmp_path / "src", tensors, single_file=True, config=QWEN3_CONFIG)
    result = convert(src, tmp_path / "out")
    shard = result.plan.shards[0]
    at = len(shard.header)
    aligned = 0
    for tensor in shard.tensors:
        for piece in tensor.pieces:
            aligned += piece.length * ((piece.offset - at) % 4096 == 0)
            at += piece.length
    weights = {}
    at = 0
    for tensor in shard.tensors:
        for piece in tensor.pieces:
            residue = (piece.offset - at) % 4096
            weights[residue] = weights.get(residue, 0) + piece.length
            at += piece.length
    assert aligned == max(n for r, n in weights.items() if r % 8 == 0)
    assert len(shard.header) % 8 == 0
    assert torch.equal(load_checkpoint(tmp_path / "out")["model.norm.weight"], tensors["model.norm.weight"])
