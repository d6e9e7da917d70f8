"""inspect: the plan described from headers alone, as text and as the documented JSON schema."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from pathlib import Path

import torch
from click.testing import CliRunner

from fusemoe_ckpt import convert
from fusemoe_ckpt.cli import cli
from fusemoe_ckpt.commands.inspect import PLAN_BYTES_PER_TENSOR, inspect_checkpoint

from .conftest import HIDDEN, INTERMEDIATE, expert_tensors, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
EXPERT_BYTES = INTERMEDIATE * HIDDEN * 4

# The schema README.md documents: every key and the type of its value.
SCHEMA = {
    "schema_version": int,
    "source": str,
    "family": str,
    "model_type": (str, type(None)),
    "already_fused": bool,
    "source_files": int,
    "source_tensors": int,
    "total_bytes": int,
    "fuse_bytes": int,
    "passthrough_bytes": int,
    "renamed_tensors": int,
    "ignored_tensors": int,
    "quantization": (dict, type(None)),
    "moe_modules": list,
    "output": dict,
    "peak_memory": dict,
}
MODULE_SCHEMA = {
    "module": str,
    "state": str,
    "experts": int,
    "intermediate_size": int,
    "hidden_size": int,
    "dtype": str,
    "bytes": int,
    "quantization": (dict, type(None)),
}
OUTPUT_SCHEMA = {"dtype": (str, type(None)), "max_shard_size": int, "tensors": int, "total_bytes": int, "shards": list}
SHARD_SCHEMA = {"filename": str, "tensors": int, "bytes": int}
MEMORY_SCHEMA = {"bytes": int, "workers": int, "buffer_bytes_per_worker": int, "header_bytes": int, "plan_bytes": int}


def _check_types(data: dict, schema: dict) -> None:
    assert set(data) == set(schema)
    for key, kind in schema.items():
        assert isinstance(data[key], kind) and not (kind is int and isinstance(data[key], bool)), key


def _inspect_json(*args: str) -> dict:
    result = CliRunner().invoke(cli, ["inspect", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_json_schema_keys_and_types(qwen_checkpoint):
    data = _inspect_json(str(qwen_checkpoint))
    _check_types(data, SCHEMA)
    _check_types(data["output"], OUTPUT_SCHEMA)
    _check_types(data["peak_memory"], MEMORY_SCHEMA)
    for module in data["moe_modules"]:
        _check_types(module, MODULE_SCHEMA)
    for shard in data["output"]["shards"]:
        _check_types(shard, SHARD_SCHEMA)
    assert data["schema_version"] == 1


def test_per_expert_checkpoint_is_described(qwen_checkpoint):
    data = _inspect_json(str(qwen_checkpoint))
    expert_bytes = 2 * 4 * 3 * EXPERT_BYTES
    all_bytes = sum(t.numel() * 4 for t in expert_tensors().values())
    assert {k: data[k] for k in ("family", "model_type", "already_fused", "source_files", "source_tensors")} == {
        "family": "qwen2_moe",
        "model_type": "qwen3_moe",
        "already_fused": False,
        "source_files": 3,
        "source_tensors": len(expert_tensors()),
    }
    assert (data["total_bytes"], data["fuse_bytes"], data["passthrough_bytes"]) == (
        all_bytes,
        expert_bytes,
        all_bytes - expert_bytes,
    )
    assert data["renamed_tensors"] == 0
    assert data["moe_modules"] == [
        {
            "module": f"model.layers.{layer}.mlp.experts",
            "state": "per_expert",
            "experts": 4,
            "intermediate_size": INTERMEDIATE,
            "hidden_size": HIDDEN,
            "dtype": "F32",
            "bytes": 4 * 3 * EXPERT_BYTES,
            "quantization": None,
        }
        for layer in range(2)
    ]


def test_planned_shards_are_the_shards_convert_writes(qwen_checkpoint, tmp_path):
    data = _inspect_json("--max-shard-size", "600", str(qwen_checkpoint))
    convert(qwen_checkpoint, tmp_path / "out", max_shard_size=600)
    written = {p.name: p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors")}
    assert {s["filename"]: s["bytes"] for s in data["output"]["shards"]} == written
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert data["output"]["tensors"] == len(index["weight_map"])
    assert data["output"]["total_bytes"] == index["metadata"]["total_size"]


def test_cast_halves_the_output(qwen_checkpoint, tmp_path):
    data = _inspect_json("--dtype", "bfloat16", str(qwen_checkpoint))
    assert data["output"]["dtype"] == "BF16"
    assert data["output"]["total_bytes"] == data["total_bytes"] // 2
    assert data["moe_modules"][0]["dtype"] == "F32"


def test_already_fused_and_transposed_states(qwen_checkpoint, tmp_path):
    convert(qwen_checkpoint, tmp_path / "fused")
    fused = _inspect_json(str(tmp_path / "fused"))
    assert fused["already_fused"] is True and fused["fuse_bytes"] == 0
    assert [m["state"] for m in fused["moe_modules"]] == ["fused", "fused"]
    assert fused["moe_modules"][1]["intermediate_size"] == INTERMEDIATE

    prefix = "model.language_model.layers.0.mlp.experts."
    vl = {f"{prefix}gate_up_proj": torch.zeros(2, 4, 6), f"{prefix}down_proj": torch.zeros(2, 3, 4)}
    config = {"model_type": "qwen3_vl_moe", "text_config": {"hidden_size": 4}}
    data = _inspect_json(str(write_checkpoint(tmp_path / "vl", vl, config=config)))
    assert data["already_fused"] is False and data["fuse_bytes"] == data["total_bytes"]
    assert data["moe_modules"] == [
        {
            "module": "model.language_model.layers.0.mlp.experts",
            "state": "fused_transposed",
            "experts": 2,
            "intermediate_size": 3,
            "hidden_size": 4,
            "dtype": "F32",
            "bytes": (2 * 4 * 6 + 2 * 3 * 4) * 4,
            "quantization": None,
        }
    ]


def test_peak_memory_model(qwen_checkpoint):
    report = inspect_checkpoint(qwen_checkpoint, workers=3)
    memory = report.to_json()["peak_memory"]
    headers = sum(8 + struct.unpack("<Q", p.read_bytes()[:8])[0] for p in qwen_checkpoint.glob("*.safetensors"))
    assert memory["header_bytes"] == headers
    assert memory["plan_bytes"] == PLAN_BYTES_PER_TENSOR * len(expert_tensors())
    assert memory["bytes"] == 3 * memory["buffer_bytes_per_worker"] + headers + memory["plan_bytes"]


def test_text_report(qwen_checkpoint):
    result = CliRunner().invoke(cli, ["inspect", str(qwen_checkpoint)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "family: qwen2_moe (model_type qwen3_moe)"
    assert lines[1].startswith("engines on the fused layout of qwen3_moe: load it: ")
    assert lines[3:6] == [
        "MoE modules: 2",
        "  model.layers.0.mlp.experts: per_expert, E=4 I=3 H=4 F32, 576 B",
        "  model.layers.1.mlp.experts: per_expert, E=4 I=3 H=4 F32, 576 B",
    ]
    assert lines[-1].startswith("expected peak memory: ")


def test_a_100_shard_index(tmp_path):
    """The benchmark's synthetic Qwen3-30B-A3B-shaped index: 100 shards, 48 MoE layers of 128 experts."""
    spec = importlib.util.spec_from_file_location("bench_inspect", ROOT / "scripts" / "bench_inspect.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    count = bench.write_index(tmp_path / "big")
    report = inspect_checkpoint(tmp_path / "big")
    assert len(report.source.shard_files) == 100 and len(report.source.tensors) == count
    assert [(m.experts, m.state) for m in report.modules] == [(128, "per_expert")] * 48


def test_inspect_reads_no_tensor_bytes(qwen_checkpoint, monkeypatch):
    """Headers only: the calls that read or copy tensor bytes are never made."""
    import os

    def refuse(*args, **kwargs):
        raise AssertionError("inspect read tensor bytes")

    for name in ("pread", "preadv", "copy_file_range"):
        monkeypatch.setattr(os, name, refuse)
    assert inspect_checkpoint(qwen_checkpoint).fuse_bytes == 2 * 4 * 3 * EXPERT_BYTES


def _flatten(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        path = f"{prefix}{key}"
        keys.add(path)
        if isinstance(value, dict):
            keys |= _flatten(value, f"{path}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            keys |= _flatten(value[0], f"{path}[].")
    return keys


def test_readme_documents_every_json_key(qwen_checkpoint):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### `inspect --json` schema") :]
    section = section[: section.index("\n## ")]
    documented = set(re.findall(r"^\| `([^`]+)` \|", section, re.MULTILINE))
    assert documented == _flatten(inspect_checkpoint(qwen_checkpoint).to_json())
