"""verify: a fresh conversion passes; one flipped byte, one key dropped from the index, one truncated
shard each fail, naming exactly the keys they touch."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import fusemoe_ckpt.write.output as output_module
from fusemoe_ckpt import UsageError, convert
from fusemoe_ckpt.cli import cli
from fusemoe_ckpt.commands.verify import verify
from fusemoe_ckpt.reading.safetensors_format import read_header

from .conftest import MIXTRAL_CONFIG, expert_tensors, write_checkpoint

GATE_UP_1 = "model.layers.1.mlp.experts.gate_up_proj"


def _weight_map(root: Path) -> dict[str, str]:
    return json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.fixture
def converted(qwen_checkpoint, tmp_path) -> Path:
    """The qwen checkpoint converted into several small shards."""
    convert(qwen_checkpoint, tmp_path / "out", max_shard_size=600)
    assert len(set(_weight_map(tmp_path / "out").values())) > 2
    return tmp_path / "out"


def test_fresh_conversion_passes(qwen_checkpoint, converted):
    result = verify(qwen_checkpoint, converted)
    assert result.problems == {}
    assert result.tensors_checked == len(_weight_map(converted)) == 8
    assert result.bytes_compared == result.plan.total_size


def test_fresh_conversions_pass_mixtral_cast_and_transposed(tmp_path):
    tensors = expert_tensors(prefix="model.layers.{layer}.block_sparse_moe.experts.{expert}.", names=("w1", "w3", "w2"))
    mixtral = write_checkpoint(tmp_path / "mixtral", tensors, shards=2, config=MIXTRAL_CONFIG)
    convert(mixtral, tmp_path / "mixtral-bf16", dtype="bfloat16")
    assert verify(mixtral, tmp_path / "mixtral-bf16", chunk=8).problems == {}

    prefix = "model.language_model.layers.0.mlp.experts."
    vl = {
        f"{prefix}gate_up_proj": torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6),
        f"{prefix}down_proj": torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4),
    }
    config = {"model_type": "qwen3_vl_moe", "text_config": {"hidden_size": 4}}
    src = write_checkpoint(tmp_path / "vl", vl, config=config)
    convert(src, tmp_path / "vl-fused")
    assert verify(src, tmp_path / "vl-fused", chunk=8).problems == {}


def test_recorded_dtype_is_used_and_a_wrong_one_is_reported(qwen_checkpoint, tmp_path):
    convert(qwen_checkpoint, tmp_path / "out", dtype="float16")
    assert verify(qwen_checkpoint, tmp_path / "out").ok
    wrong = verify(qwen_checkpoint, tmp_path / "out", dtype="bfloat16")
    assert len(wrong.problems) == 8
    assert wrong.problems[GATE_UP_1] == ["F16 [4, 6, 4] in model-00001-of-00001.safetensors, planned BF16 [4, 6, 4]"]


def test_one_flipped_byte_names_the_tensor_and_the_byte(qwen_checkpoint, converted):
    shard = converted / _weight_map(converted)[GATE_UP_1]
    header = read_header(shard)
    offset, _ = header.absolute_range(GATE_UP_1)
    data = bytearray(shard.read_bytes())
    data[offset + 50] ^= 0x01
    shard.write_bytes(bytes(data))
    result = verify(qwen_checkpoint, converted, chunk=16)
    assert result.problems == {GATE_UP_1: ["bytes differ from the plan, first at byte 50 of the tensor"]}


def test_a_key_dropped_from_the_index_is_named(qwen_checkpoint, converted):
    index_path = converted / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"].pop(GATE_UP_1)
    index_path.write_text(json.dumps(index))
    result = verify(qwen_checkpoint, converted)
    assert result.problems == {GATE_UP_1: [f"stored in {shard} but not listed in the index"]}


def test_a_truncated_shard_names_every_key_it_holds(qwen_checkpoint, converted):
    weight_map = _weight_map(converted)
    shard = weight_map[GATE_UP_1]
    path = converted / shard
    path.write_bytes(path.read_bytes()[:-7])
    result = verify(qwen_checkpoint, converted)
    assert set(result.problems) == {k for k, v in weight_map.items() if v == shard}
    for messages in result.problems.values():
        assert len(messages) == 1
        assert messages[0].startswith(f"shard {shard} is invalid: ")
        assert "-byte data buffer" in messages[0]


def test_a_missing_shard_names_every_key_it_held(qwen_checkpoint, converted):
    weight_map = _weight_map(converted)
    shard = weight_map[GATE_UP_1]
    (converted / shard).unlink()
    result = verify(qwen_checkpoint, converted)
    assert set(result.problems) == {k for k, v in weight_map.items() if v == shard}
    assert all("shard file not found" in m[0] for m in result.problems.values())


def test_keys_the_plan_lacks_or_dst_lacks(converted, tmp_path):
    """Against a source without the final norm and with one more plain tensor: both keys named."""
    tensors = expert_tensors()
    del tensors["model.norm.weight"]
    tensors["model.extra.weight"] = torch.zeros(2)
    other = write_checkpoint(tmp_path / "other", tensors, config={"model_type": "qwen3_moe"})
    result = verify(other, converted)
    assert result.problems == {
        "model.extra.weight": [f"missing from {converted}"],
        "model.norm.weight": ["not in the plan of the source (unexpected key)"],
    }


def test_cli_passes_with_one_line(qwen_checkpoint, converted):
    result = CliRunner().invoke(cli, ["verify", str(qwen_checkpoint), str(converted)])
    assert result.exit_code == 0, result.output
    assert re.fullmatch(
        r"verified: 8 tensors, [\d.]+ KB equal to the plan of .*/src \(family qwen2_moe\), [\d.]+ s\n", result.output
    )


def test_cli_fails_with_one_line_per_key_then_the_summary(qwen_checkpoint, converted):
    index_path = converted / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.norm.weight"], index["weight_map"][GATE_UP_1]
    index_path.write_text(json.dumps(index))
    result = CliRunner().invoke(cli, ["verify", str(qwen_checkpoint), str(converted)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == [GATE_UP_1, "model.norm.weight"]
    assert lines[2] == (
        f"Error: {converted} differs from the plan of {qwen_checkpoint}: "
        "2 mismatching keys or files of 8 planned tensors"
    )
    assert len(lines) == 3


def test_convert_verify_passes(qwen_checkpoint, tmp_path):
    result = CliRunner().invoke(cli, ["convert", "--verify", str(qwen_checkpoint), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    first, second = result.output.splitlines()
    assert first.startswith("2 layers fused, 8 experts") and second.startswith("verified: 8 tensors")


def test_convert_verify_fails_when_the_output_is_damaged(qwen_checkpoint, tmp_path, monkeypatch):
    install = output_module.install

    def install_then_damage(partial, dst):
        install(partial, dst)
        shard = next(dst.glob("*.safetensors"))
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))

    monkeypatch.setattr(output_module, "install", install_then_damage)
    result = CliRunner().invoke(cli, ["convert", "-q", "--verify", str(qwen_checkpoint), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.splitlines()[0].startswith("model.norm.weight: bytes differ from the plan")
    assert result.output.splitlines()[-1].startswith("Error: ")


def test_load_check_passes_and_names_what_the_model_lacks(tmp_path):
    pytest.importorskip("transformers")
    from fusemoe_ckpt.commands.example import write_example

    write_example(tmp_path / "tiny")
    convert(tmp_path / "tiny", tmp_path / "fused")
    assert verify(tmp_path / "tiny", tmp_path / "fused", load_check=True).ok

    config_path = tmp_path / "fused" / "config.json"
    config = json.loads(config_path.read_text())
    layers = config["num_hidden_layers"]
    config["num_hidden_layers"] = layers - 1
    config_path.write_text(json.dumps(config))
    problems = verify(tmp_path / "tiny", tmp_path / "fused", load_check=True).problems
    last = f"model.layers.{layers - 1}."
    assert problems and all(key.startswith(last) for key in problems)
    assert all("strict dispatch refuses it" in messages[0] for messages in problems.values())


def test_load_check_without_transformers_says_so(qwen_checkpoint, converted, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UsageError, match=r"^--load-check needs transformers: pip install transformers$"):
        verify(qwen_checkpoint, converted, load_check=True)
