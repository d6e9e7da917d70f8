"""A Hub repo for `--stream` tests: layers large enough that shards count in pages, filled as
everywhere in the tests (expert e of layer l holds 10*l + e), saved the way save_pretrained saves:
tensors in order, a new shard when the current one is full, so a layer's experts span two shards."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fusemoe_ckpt.naming import natural_key

from .conftest import QWEN3_CONFIG

HIDDEN = 64
INTERMEDIATE = 32
LAYERS = 4
EXPERTS = 8
# One layer's experts: 8 experts x 3 matrices x 32 x 64 float32 = 196,608 bytes; an output shard
# of at most 200 kB holds one layer's fused pair.
OUTPUT_SHARD = "200KB"


def stream_tensors() -> dict[str, torch.Tensor]:
    tensors = {"model.embed_tokens.weight": torch.full((16, HIDDEN), 0.25)}
    for layer in range(LAYERS):
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = torch.full((EXPERTS, HIDDEN), 0.75)
        for expert in range(EXPERTS):
            value = 10 * layer + expert
            prefix = f"model.layers.{layer}.mlp.experts.{expert}."
            tensors[f"{prefix}gate_proj.weight"] = torch.full((INTERMEDIATE, HIDDEN), float(value))
            tensors[f"{prefix}up_proj.weight"] = torch.full((INTERMEDIATE, HIDDEN), value + 0.5)
            tensors[f"{prefix}down_proj.weight"] = torch.full((HIDDEN, INTERMEDIATE), float(-value))
    tensors["model.norm.weight"] = torch.ones(HIDDEN)
    return tensors


def write_stream_repo(root: Path, *, shards: int = 4) -> Path:
    """The checkpoint in `shards` files filled in key order, with an index, config and tokenizer files."""
    root.mkdir(parents=True)
    tensors = stream_tensors()
    names = sorted(tensors, key=natural_key)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    before = 0
    for name in names:  # a tensor goes to the shard its first byte falls in, evenly over the files
        groups[before * shards // total].append(name)
        before += tensors[name].numel() * tensors[name].element_size()
    weight_map = {}
    for i, group in enumerate(groups):
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({name: tensors[name] for name in group}, root / filename, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(group, filename)
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(QWEN3_CONFIG | {"hidden_size": HIDDEN, "num_experts": EXPERTS}))
    (root / "tokenizer_config.json").write_text("{}\n")
    (root / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# Stream MoE\n")
    return root
