"""A built-in tiny Qwen3-MoE checkpoint in the per-expert layout, written without torch.

It is small enough to read, real enough for transformers to build and run: the README's first
command converts it and loads the result through accelerate dispatch.
"""

from __future__ import annotations

import json
import math
import struct
from array import array
from pathlib import Path

from ..reading.safetensors_format import TensorInfo, encode_header

CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "moe_intermediate_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def _shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, heads, kv, d = (config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"))
    i, vocab = config["moe_intermediate_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        shapes |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (heads * d, h),
            f"{p}.self_attn.k_proj.weight": (kv * d, h),
            f"{p}.self_attn.v_proj.weight": (kv * d, h),
            f"{p}.self_attn.o_proj.weight": (h, heads * d),
            f"{p}.self_attn.q_norm.weight": (d,),
            f"{p}.self_attn.k_norm.weight": (d,),
            f"{p}.mlp.gate.weight": (config["num_experts"], h),
        }
        for e in range(config["num_experts"]):
            shapes |= {
                f"{p}.mlp.experts.{e}.gate_proj.weight": (i, h),
                f"{p}.mlp.experts.{e}.up_proj.weight": (i, h),
                f"{p}.mlp.experts.{e}.down_proj.weight": (h, i),
            }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    return shapes


def _values(name: str, count: int, seed: int) -> array:
    """Deterministic small floats; norm weights are ones, as a freshly built model has them."""
    if name.endswith("norm.weight"):
        return array("f", [1.0] * count)
    state = seed
    out = array("f")
    for _ in range(count):
        state = (state * 1103515245 + 12345) % 2**31
        out.append((state / 2**31 - 0.5) * 0.2)
    return out


def _write_safetensors(path: Path, tensors: dict[str, array], shapes: dict[str, tuple[int, ...]]) -> None:
    infos, position = [], 0
    for name, values in tensors.items():
        nbytes = len(values) * 4
        infos.append(TensorInfo(name, "F32", shapes[name], position, position + nbytes))
        position += nbytes
    with open(path, "wb") as f:
        f.write(encode_header(infos, {"format": "pt"}))
        for values in tensors.values():
            f.write(struct.pack(f"<{len(values)}f", *values))


def write_example(directory: str | Path) -> Path:
    """Write the tiny per-expert checkpoint (two shards, index, config) into `directory`."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    shapes = _shapes(CONFIG)
    names = list(shapes)
    halves = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for filename, members in halves.items():
        tensors = {}
        for name in members:
            tensors[name] = _values(name, math.prod(shapes[name]), seed=sum(map(ord, name)))
            weight_map[name] = filename
        _write_safetensors(root / filename, tensors, shapes)
    total = sum(4 * math.prod(shape) for shape in shapes.values())
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    (root / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    return root
