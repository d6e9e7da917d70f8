"""unfuse, the inverse of convert: unfuse(convert(x)) has exactly x's keys and bytes."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner

from fusemoe_ckpt import FamilyError, convert
from fusemoe_ckpt.cli import cli
from fusemoe_ckpt.commands.unfuse import unfuse

from .conftest import MIXTRAL_CONFIG, QWEN3_CONFIG, expert_tensors, load_checkpoint, write_checkpoint


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert (actual[name].dtype, actual[name].shape) == (tensor.dtype, tensor.shape), name
        assert torch.equal(actual[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def _round_trip(src, tmp_path, **unfuse_options) -> dict[str, torch.Tensor]:
    convert(src, tmp_path / "fused", max_shard_size=700)
    unfuse(tmp_path / "fused", tmp_path / "back", **unfuse_options)
    return load_checkpoint(tmp_path / "back")


def _mixtral_tensors() -> dict[str, torch.Tensor]:
    tensors = expert_tensors(prefix="model.layers.{layer}.block_sparse_moe.experts.{expert}.", names=("w1", "w3", "w2"))
    return {k.replace(".mlp.gate.", ".block_sparse_moe.gate."): v for k, v in tensors.items()}


def test_qwen_round_trip(qwen_checkpoint, tmp_path):
    _assert_same(_round_trip(qwen_checkpoint, tmp_path, max_shard_size=500), load_checkpoint(qwen_checkpoint))


def test_mixtral_round_trip_undoes_the_rename(tmp_path):
    """Fused keys live under .mlp.; the way back restores .block_sparse_moe. for gate and experts."""
    src = write_checkpoint(tmp_path / "src", _mixtral_tensors(), shards=2, config=MIXTRAL_CONFIG)
    back = _round_trip(src, tmp_path)
    _assert_same(back, load_checkpoint(src))
    assert torch.all(back["model.layers.1.block_sparse_moe.experts.3.w3.weight"] == 13.5)


def test_bfloat16_and_single_file_round_trip(tmp_path):
    tensors = expert_tensors(layers=3, experts=5, dtype=torch.bfloat16)
    src = write_checkpoint(tmp_path / "src", tensors, single_file=True, config=QWEN3_CONFIG)
    _assert_same(_round_trip(src, tmp_path), tensors)


def test_qwen3_vl_moe_returns_to_the_stored_orientation(tmp_path):
    prefix = "model.language_model.layers.0.mlp.experts."
    tensors = {
        f"{prefix}gate_up_proj": torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6),
        f"{prefix}down_proj": torch.arange(3 * 3 * 4, dtype=torch.bfloat16).reshape(3, 3, 4),
        "model.language_model.norm.weight": torch.ones(4),
    }
    config = {"model_type": "qwen3_vl_moe", "text_config": {"hidden_size": 4}}
    src = write_checkpoint(tmp_path / "src", tensors, shards=2, config=config)
    _assert_same(_round_trip(src, tmp_path), tensors)


def test_concatenated_qkv_convolutions_split_in_equal_thirds(tmp_path):
    """kimi_linear's q/k/v conv1d, concatenated on dim 0, come back as thirds (as transformers' Chunk)."""
    tensors = _mixtral_tensors()
    for layer in range(2):
        for i, name in enumerate("qkv"):
            tensors[f"model.layers.{layer}.self_attn.{name}_conv1d.weight"] = torch.full((4, 1, 2), 10 * layer + i)
    src = write_checkpoint(tmp_path / "src", tensors, shards=2, config={"model_type": "kimi_linear"})
    fused = load_checkpoint(convert(src, tmp_path / "fused").destination)
    assert fused["model.layers.1.self_attn.conv1d.weight"].shape == (12, 1, 2)
    unfuse(tmp_path / "fused", tmp_path / "back")
    _assert_same(load_checkpoint(tmp_path / "back"), load_checkpoint(src))


def test_a_qkv_that_does_not_split_evenly_is_refused(tmp_path):
    tensors = {"model.layers.0.self_attn.conv1d.weight": torch.zeros(7, 1, 2)}
    src = write_checkpoint(tmp_path / "src", tensors, config={"model_type": "kimi_linear"})
    with pytest.raises(FamilyError, match=r"^model\.layers\.0\.self_attn\.conv1d\.weight: \[7, 1, 2\] does not split"):
        unfuse(src, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_per_expert_input_is_refused(qwen_checkpoint, tmp_path):
    with pytest.raises(FamilyError, match=r"already in the per-expert layout of family qwen2_moe"):
        unfuse(qwen_checkpoint, tmp_path / "back")


def test_a_key_convert_would_rename_is_refused(tmp_path):
    """A fused mixtral checkpoint cannot hold .block_sparse_moe.: its original name is unknowable."""
    fused = load_checkpoint(
        convert(
            write_checkpoint(tmp_path / "src", _mixtral_tensors(), config=MIXTRAL_CONFIG), tmp_path / "fused"
        ).destination
    )
    fused["model.layers.0.block_sparse_moe.extra.weight"] = torch.zeros(2)
    odd = write_checkpoint(tmp_path / "odd", fused, config=MIXTRAL_CONFIG)
    message = (
        "model.layers.0.block_sparse_moe.extra.weight: cannot be unfused unambiguously for family mixtral: the "
        "reversed renames give 'model.layers.0.block_sparse_moe.extra.weight', which convert maps to "
        "'model.layers.0.mlp.extra.weight'"
    )
    with pytest.raises(FamilyError, match=f"^{re.escape(message)}$"):
        unfuse(odd, tmp_path / "back")


def test_cli_unfuse(qwen_checkpoint, tmp_path):
    convert(qwen_checkpoint, tmp_path / "fused")
    result = CliRunner().invoke(cli, ["unfuse", str(tmp_path / "fused"), str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    assert re.fullmatch(
        r"4 fused tensors split into 24, [\d.]+ KB written in 1 shards, [\d.]+ s -> .*/back\n", result.output
    )
    _assert_same(load_checkpoint(tmp_path / "back"), load_checkpoint(qwen_checkpoint))


def test_cli_unfuse_error_is_one_line(qwen_checkpoint, tmp_path):
    result = CliRunner().invoke(cli, ["unfuse", str(qwen_checkpoint), str(tmp_path / "back")])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("Error: model.layers.0.mlp.experts.0.")


def test_inspect_verify_unfuse_do_not_import_torch(qwen_checkpoint, tmp_path):
    """Only a cast loads torch: the other commands stay as light as convert."""
    import subprocess
    import sys

    convert(qwen_checkpoint, tmp_path / "fused")
    code = (
        "import sys\n"
        "from fusemoe_ckpt import inspect_checkpoint, unfuse, verify\n"
        f"inspect_checkpoint({str(qwen_checkpoint)!r})\n"
        f"verify({str(qwen_checkpoint)!r}, {str(tmp_path / 'fused')!r}).raise_if_failed()\n"
        f"unfuse({str(tmp_path / 'fused')!r}, {str(tmp_path / 'back')!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()
