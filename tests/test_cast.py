"""convert --dtype: floating tensors cast exactly as torch's `.to()`, everything else untouched."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import fusemoe_ckpt.write.streams as streams
from fusemoe_ckpt import UsageError, convert
from fusemoe_ckpt.cli import cli

from .conftest import QWEN3_CONFIG, expert_tensors, load_checkpoint, write_checkpoint

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture
def mixed_dtype_checkpoint(tmp_path):
    """Random float32 experts (values that round differently in each dtype), plus a float64, a
    bfloat16, an int64 and a bool tensor that pass through."""
    generator = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=generator) * 300 for k, v in expert_tensors().items()}
    tensors["model.layers.0.mlp.gate.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), 1e-40])
    tensors["model.rotary.inv_freq64"] = torch.randn(5, dtype=torch.float64, generator=generator)
    tensors["model.already_bf16"] = torch.randn(6, generator=generator).to(torch.bfloat16)
    tensors["model.position_ids"] = torch.arange(7)
    tensors["model.mask"] = torch.tensor([True, False, True])
    return write_checkpoint(tmp_path / "src", tensors, shards=3, config=QWEN3_CONFIG)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_cast_bytes_equal_torch_to(mixed_dtype_checkpoint, tmp_path, monkeypatch, dtype):
    """Fused then cast equals torch's own cast of the fused tensor, byte for byte; read in 16-byte
    chunks so every tensor is cast in several pieces."""
    monkeypatch.setattr(streams, "READ_CHUNK", 16)
    plain = load_checkpoint(convert(mixed_dtype_checkpoint, tmp_path / "plain").destination)
    cast = load_checkpoint(convert(mixed_dtype_checkpoint, tmp_path / "cast", dtype=dtype).destination)
    assert cast.keys() == plain.keys()
    for name, tensor in plain.items():
        expected = tensor.to(DTYPES[dtype]) if tensor.is_floating_point() else tensor
        assert (cast[name].dtype, cast[name].shape) == (expected.dtype, expected.shape), name
        assert _as_bytes(cast[name]) == _as_bytes(expected), name


def test_index_and_headers_describe_the_cast(mixed_dtype_checkpoint, tmp_path):
    result = convert(mixed_dtype_checkpoint, tmp_path / "out", dtype="bfloat16")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    tensors = load_checkpoint(tmp_path / "out")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["fusemoe_ckpt_dtype"] == "BF16"
    assert result.plan.dtype == "BF16"
    assert {str(t.dtype) for t in tensors.values()} == {"torch.bfloat16", "torch.int64", "torch.bool"}


def test_transposed_experts_are_cast_after_turning(tmp_path):
    experts, hidden, inter = 2, 4, 3
    prefix = "model.language_model.layers.0.mlp.experts."
    gate_up = torch.randn(experts, hidden, 2 * inter, generator=torch.Generator().manual_seed(1))
    down = torch.randn(experts, inter, hidden, generator=torch.Generator().manual_seed(2))
    config = {"model_type": "qwen3_vl_moe", "text_config": {"hidden_size": hidden}}
    tensors = {f"{prefix}gate_up_proj": gate_up, f"{prefix}down_proj": down}
    src = write_checkpoint(tmp_path / "src", tensors, config=config)
    fused = load_checkpoint(convert(src, tmp_path / "out", dtype="float16").destination)
    assert _as_bytes(fused[f"{prefix}gate_up_proj"]) == _as_bytes(gate_up.transpose(1, 2).to(torch.float16))
    assert _as_bytes(fused[f"{prefix}down_proj"]) == _as_bytes(down.transpose(1, 2).to(torch.float16))


def test_cli_dtype_option(qwen_checkpoint, tmp_path):
    result = CliRunner().invoke(cli, ["convert", "-q", "--dtype", "float16", str(qwen_checkpoint), str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    down = load_checkpoint(tmp_path / "o")["model.layers.1.mlp.experts.down_proj"]
    assert down.dtype == torch.float16
    assert [down[e, 0, 0].item() for e in range(4)] == [-10, -11, -12, -13]


def test_cli_refuses_an_unknown_dtype(qwen_checkpoint, tmp_path):
    result = CliRunner().invoke(cli, ["convert", "--dtype", "int8", str(qwen_checkpoint), str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "'int8' is not one of 'bfloat16', 'float16', 'float32'" in result.output


def test_library_refuses_an_unknown_dtype(qwen_checkpoint, tmp_path):
    with pytest.raises(UsageError, match=r"dtype 'fp4' is not one of bfloat16, float16, float32"):
        convert(qwen_checkpoint, tmp_path / "o", dtype="fp4")
    assert not (tmp_path / "o").exists()
