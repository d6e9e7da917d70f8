"""Small checkpoints you can read by eye: expert e of layer l is filled with the value 10*l + e."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

# Runs fusemoe-ckpt paused at a chosen point (a script, so tests start it as a process of its own).
PAUSE_LAUNCHER = str(Path(__file__).with_name("pause_launcher.py"))

HIDDEN = 4
INTERMEDIATE = 3


def expert_tensors(
    layers: int = 2,
    experts: int = 4,
    *,
    prefix: str = "model.layers.{layer}.mlp.experts.{expert}.",
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Per-expert tensors plus a few plain ones. Gate holds v, up holds v + 0.5, down holds -v,
    where v = 10 * layer + expert, so any misplaced row is visible."""
    gate, up, down = names
    tensors = {"model.embed_tokens.weight": torch.full((8, HIDDEN), 0.25, dtype=dtype)}
    for layer in range(layers):
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = torch.full((experts, HIDDEN), 0.75, dtype=dtype)
        for expert in range(experts):
            value = 10 * layer + expert
            p = prefix.format(layer=layer, expert=expert)
            tensors[f"{p}{gate}.weight"] = torch.full((INTERMEDIATE, HIDDEN), value, dtype=dtype)
            tensors[f"{p}{up}.weight"] = torch.full((INTERMEDIATE, HIDDEN), value + 0.5, dtype=dtype)
            tensors[f"{p}{down}.weight"] = torch.full((HIDDEN, INTERMEDIATE), -value, dtype=dtype)
    tensors["model.norm.weight"] = torch.ones(HIDDEN, dtype=dtype)
    return tensors


def write_checkpoint(
    root: Path,
    tensors: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    config: dict | None = None,
    single_file: bool = False,
) -> Path:
    """Save `tensors` round-robin over `shards` files with an index (or as one model.safetensors)."""
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    if single_file:
        save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
        return root
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        members = {name: tensors[name] for name in names[i::shards]}
        save_file(members, root / filename, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(members, filename)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def load_checkpoint(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, through safetensors itself."""
    index = json.loads((root / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for filename in sorted(set(index["weight_map"].values())):
        loaded = load_file(root / filename)
        assert {k for k, v in index["weight_map"].items() if v == filename} == set(loaded)
        tensors |= loaded
    return tensors


QWEN3_CONFIG = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}
MIXTRAL_CONFIG = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}


@pytest.fixture
def qwen_checkpoint(tmp_path: Path) -> Path:
    """Two layers of four experts spread round-robin over three shards, with a config."""
    return write_checkpoint(tmp_path / "src", expert_tensors(), shards=3, config=QWEN3_CONFIG)
