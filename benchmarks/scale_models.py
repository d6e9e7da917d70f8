"""Synthetic per-expert checkpoints with the tensor counts of real MoE models and tiny tensors.

Only the number of tensors (and the length of their names) matters to planning and to memory; the
bytes do not, because they move through the kernel. Each model here has the real names and counts:

- `qwen3-30b-a3b`: 48 layers x 128 experts, Qwen3 attention with q/k norms (18,867 tensors, 16 shards)
- `deepseek-v3`: 61 layers (3 dense, 58 of 256 experts with a shared expert), MLA attention, BF16
  (45,395 tensors; the MTP layer that transformers drops is left out)
- `kimi-k2`: DeepSeek-V3's layout with 61 layers, 1 dense and 60 of 384 experts (69,975 tensors)
- `kimi-k2-fp8`: the same in FP8, every linear weight with its `weight_scale_inv` (139,583 tensors)
- `moe-140k`: 61 layers x 768 experts x 3 projections in BF16 (141,096 tensors)
- `moe-300k`: 61 layers x 1,640 experts in BF16 (300,672 tensors)
- `moe-140k-wide`: moe-140k with every dimension 32 times larger (2.3 GB instead of 2.3 MB)

Every matrix is 2 x 4 (hidden 4, expert intermediate 2; FP8 blocks of 2 x 2, so a scale is 1 x 2),
vectors are 4 long (q/k norms 2, the head size). The Qwen3-shaped configs are complete enough for
transformers to build the model, so the transformers route can load them. The layout is the Hub's:
module order split into shards of about `TENSORS_PER_SHARD` tensors (Kimi-K2's FP8 release holds
about 2,300 per shard), each file's tensors in name order as the safetensors library writes them,
and a sorted index.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from fusemoe_ckpt.reading.safetensors_format import DTYPE_SIZES, TensorInfo, encode_header

GENERATOR_VERSION = 2
HIDDEN, INTERMEDIATE, HEAD_DIM, BLOCK = 4, 2, 2, 2
TENSORS_PER_SHARD = 2300
INDEX_NAME = "model.safetensors.index.json"

Tensor = tuple[str, str, tuple[int, ...]]  # name, dtype, shape


@dataclass(frozen=True)
class ScaleModel:
    """The key layout of one model: which attention, how many dense and MoE layers, FP8 or not."""

    name: str
    model_type: str
    layers: int
    dense_layers: int
    experts: int
    attention: str  # "qwen3" (q/k/v/o with q/k norms) or "mla" (DeepSeek-V3's)
    shared_expert: bool
    fp8: bool
    shards: int | None = None  # None: about TENSORS_PER_SHARD tensors per shard
    width: int = 1  # every dimension times this: the same names and counts, more bytes

    def tensors(self) -> list[Tensor]:
        """Every tensor in module order (the order of the model's state dict)."""
        weight = "F8_E4M3" if self.fp8 else "BF16"
        hidden, intermediate = HIDDEN * self.width, INTERMEDIATE * self.width
        out: list[Tensor] = [("model.embed_tokens.weight", "BF16", (16, hidden))]

        def linear(name: str, rows: int = intermediate, cols: int = hidden) -> None:
            out.append((f"{name}.weight", weight, (rows, cols)))
            if self.fp8:
                out.append((f"{name}.weight_scale_inv", "F32", (-(-rows // BLOCK), -(-cols // BLOCK))))

        def vector(name: str, size: int = hidden, dtype: str = "BF16") -> None:
            out.append((name, dtype, (size,)))

        for layer in range(self.layers):
            p = f"model.layers.{layer}"
            vector(f"{p}.input_layernorm.weight")
            if self.attention == "qwen3":
                for projection in ("q", "k", "v"):
                    linear(f"{p}.self_attn.{projection}_proj")
                linear(f"{p}.self_attn.o_proj", hidden, intermediate)
                vector(f"{p}.self_attn.q_norm.weight", HEAD_DIM * self.width)
                vector(f"{p}.self_attn.k_norm.weight", HEAD_DIM * self.width)
            else:
                for projection in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
                    linear(f"{p}.self_attn.{projection}", hidden, hidden)
                vector(f"{p}.self_attn.q_a_layernorm.weight")
                vector(f"{p}.self_attn.kv_a_layernorm.weight")
            if layer < self.dense_layers:
                for projection in ("gate_proj", "up_proj"):
                    linear(f"{p}.mlp.{projection}")
                linear(f"{p}.mlp.down_proj", hidden, intermediate)
            else:
                out.append((f"{p}.mlp.gate.weight", "BF16", (self.experts, hidden)))
                if self.attention == "mla":
                    out.append((f"{p}.mlp.gate.e_score_correction_bias", "F32", (self.experts,)))
                for e in range(self.experts):
                    linear(f"{p}.mlp.experts.{e}.gate_proj")
                    linear(f"{p}.mlp.experts.{e}.up_proj")
                    linear(f"{p}.mlp.experts.{e}.down_proj", hidden, intermediate)
                if self.shared_expert:
                    linear(f"{p}.mlp.shared_experts.gate_proj")
                    linear(f"{p}.mlp.shared_experts.up_proj")
                    linear(f"{p}.mlp.shared_experts.down_proj", hidden, intermediate)
            vector(f"{p}.post_attention_layernorm.weight")
        out += [("model.norm.weight", "BF16", (hidden,)), ("lm_head.weight", "BF16", (16, hidden))]
        return out

    def count(self) -> int:
        return len(self.tensors())

    def config(self) -> dict:
        config = {
            "architectures": ["Qwen3MoeForCausalLM" if self.model_type == "qwen3_moe" else "DeepseekV3ForCausalLM"],
            "model_type": self.model_type,
            "hidden_size": HIDDEN * self.width,
            "moe_intermediate_size": INTERMEDIATE * self.width,
            "intermediate_size": INTERMEDIATE * self.width,
            "num_hidden_layers": self.layers,
            "vocab_size": 16,
            "torch_dtype": "bfloat16",
            "tie_word_embeddings": False,
        }
        if self.model_type == "qwen3_moe":
            # A config transformers builds the model from (the transformers route loads these).
            heads = INTERMEDIATE * self.width // (HEAD_DIM * self.width)
            config |= {
                "num_experts": self.experts,
                "num_experts_per_tok": 2,
                "num_attention_heads": heads,
                "num_key_value_heads": heads,
                "head_dim": HEAD_DIM * self.width,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
            }
        else:
            config |= {"n_routed_experts": self.experts, "first_k_dense_replace": self.dense_layers}
        if self.fp8:
            config["quantization_config"] = {
                "quant_method": "fp8",
                "activation_scheme": "dynamic",
                "weight_block_size": [BLOCK, BLOCK],
            }
        return config


MODELS = {
    m.name: m
    for m in (
        ScaleModel("qwen3-30b-a3b", "qwen3_moe", 48, 0, 128, "qwen3", False, False, shards=16),
        ScaleModel("deepseek-v3", "deepseek_v3", 61, 3, 256, "mla", True, False),
        ScaleModel("kimi-k2", "deepseek_v3", 61, 1, 384, "mla", True, False),
        ScaleModel("kimi-k2-fp8", "deepseek_v3", 61, 1, 384, "mla", True, True),
        ScaleModel("moe-140k", "qwen3_moe", 61, 0, 768, "qwen3", False, False),
        ScaleModel("moe-300k", "qwen3_moe", 61, 0, 1640, "qwen3", False, False),
        # moe-140k with every dimension 32 times larger: 2.3 GB instead of 2.3 MB, the same tensors.
        ScaleModel("moe-140k-wide", "qwen3_moe", 61, 0, 768, "qwen3", False, False, width=32),
    )
}


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return DTYPE_SIZES[dtype] * math.prod(shape)


def write_checkpoint(root: Path, model: ScaleModel) -> None:
    """Shards, index and config.json of `model` into the new directory `root`, atomically (renamed
    into place when complete). Each file's data is written in one piece: a few MB here, 2.3 GB for
    the widest model, never more than a shard."""
    tensors = model.tensors()
    shards = model.shards or max(1, -(-len(tensors) // TENSORS_PER_SHARD))
    per_shard = -(-len(tensors) // shards)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(shards):
        members = sorted(tensors[i * per_shard : (i + 1) * per_shard])
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        infos, position = [], 0
        for name, dtype, shape in members:
            infos.append(TensorInfo(name, dtype, shape, position, position + nbytes(dtype, shape)))
            position += nbytes(dtype, shape)
            weight_map[name] = filename
        # Bytes that are valid values of every dtype here: 0x3c is a normal FP8 and a positive scale.
        (partial / filename).write_bytes(encode_header(infos, {"format": "pt"}) + b"\x3c" * position)
        total += position
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (partial / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (partial / "config.json").write_text(json.dumps(model.config(), indent=2) + "\n")
    os.sync()
    partial.rename(root)


def ensure_checkpoint(workdir: Path, model: ScaleModel) -> Path:
    """The cached checkpoint of `model` in `workdir`, generated first if missing."""
    root = workdir / f"scale-{model.name}-g{GENERATOR_VERSION}"
    if not root.is_dir():
        write_checkpoint(root, model)
    return root
