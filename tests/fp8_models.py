"""Tiny FP8 block-quantized MoE checkpoints, and transformers 5.24 holding them as on a capable GPU.

A checkpoint is a tiny random model of a model type, saved per expert as the released FP8 checkpoints
are (DeepSeek-V3, Qwen3-FP8, GLM-4.5-FP8, MiniMax-M2; Mixtral-style `block_sparse_moe` w1/w3/w2):
every linear layer transformers' FP8 quantizer replaces (not embeddings, routers, norms or lm_head)
is F8_E4M3 with an F32 `weight_scale_inv` per 128x128 block. Block scales differ by powers of two,
so a scale applied to the wrong block is visible in every comparison.

transformers keeps FP8 weights only on a GPU of compute capability >= 8.9 and dequantizes
everywhere else. Its in-memory layout has no device branch, so `capable_gpu()` makes the quantizer
believe one is present: `FineGrainedFP8HfQuantizer.validate_environment` consults only
`torch.cuda.is_available()` and `torch.cuda.get_device_capability()`, patched for the duration.
FP8 matmuls go through a kernel transformers downloads from the Hub; `use_reference_kernel()`
registers a pure-torch one in its kernel mapping instead (dequantize the blocks, then matmul).
"""

from __future__ import annotations

import contextlib
import json
import math
import types
from pathlib import Path

import torch

from .conftest import load_checkpoint, write_checkpoint

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
QUANTIZATION = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}

_COMMON = {
    "vocab_size": 256,
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
# deepseek_v3: kv_lora_rank 512 + rope 64 gives kv_a_proj_with_mqa 576 rows over 5 scale rows, as in DeepSeek-V3.
TINY_FP8 = {
    "deepseek_v3": {
        "intermediate_size": 512,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "num_key_value_heads": 2,
        "q_lora_rank": 256,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 64,
        "v_head_dim": 128,
    },
    "qwen3_moe": {
        "intermediate_size": 512,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "num_key_value_heads": 1,
        "head_dim": 128,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "glm4_moe": {
        "intermediate_size": 512,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "num_key_value_heads": 1,
        "head_dim": 128,
    },
    "minimax_m2": {"num_local_experts": 4, "num_experts_per_tok": 2, "num_key_value_heads": 1, "head_dim": 128},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "num_key_value_heads": 1, "head_dim": 128},
}
# Released Mixtral and MiniMax-M2 checkpoints name their experts block_sparse_moe.experts.E.w1/w3/w2.
BLOCK_SPARSE_MOE = ("mixtral", "minimax_m2")


def tiny_config(model_type: str, moe_intermediate: int = 256):
    from transformers import AutoConfig

    sizes = {"moe_intermediate_size": moe_intermediate} if "moe" in model_type or "deepseek" in model_type else {}
    if model_type in BLOCK_SPARSE_MOE:
        sizes = {"intermediate_size": moe_intermediate}
    return AutoConfig.for_model(model_type, **_COMMON, **TINY_FP8[model_type], **sizes)


def quantize_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F8_E4M3 weight, F32 scale per BLOCK x BLOCK block) with weight ~= q * scale."""
    rows, cols = weight.shape
    grid_rows, grid_cols = math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
    padded = torch.zeros(grid_rows * BLOCK, grid_cols * BLOCK)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(grid_rows, BLOCK, grid_cols, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    quantized = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized.view(grid_rows * BLOCK, grid_cols * BLOCK)[:rows, :cols].contiguous(), scale.contiguous()


def dequantize_blocks(quantized: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """The format's definition: q[i, j] * scale[i // BLOCK, j // BLOCK], in float32, rounded once."""
    rows, cols = quantized.shape
    expanded = scale.float().repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return (quantized.float() * expanded).to(dtype)


def is_quantized(key: str, tensor: torch.Tensor) -> bool:
    """A weight the FP8 quantizer replaces: every 2-D linear weight but embeddings, routers and lm_head."""
    if tensor.ndim != 2 or not key.endswith(".weight"):
        return False
    return not ("embed_tokens" in key or key.startswith("lm_head") or key.endswith(".gate.weight"))


def original_bf16(root: Path, model_type: str, *, moe_intermediate: int = 256, seed: int = 0):
    """(config, tensors) of a tiny random bf16 `model_type` model, saved beside `root` in the original
    format (one tensor per expert) and read back, to be quantized into a checkpoint at `root`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, moe_intermediate)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.05)
    original = root.parent / f"{root.name}-bf16"
    model.save_pretrained(original)
    return config, load_checkpoint_or_file(original)


def fp8_checkpoint(root: Path, model_type: str, *, moe_intermediate: int = 256, shards: int = 3, seed: int = 0):
    """Write a per-expert FP8 checkpoint of a tiny random `model_type` model over `shards` files."""
    config, original = original_bf16(root, model_type, moe_intermediate=moe_intermediate, seed=seed)
    tensors = {}
    for key, tensor in original.items():
        if model_type in BLOCK_SPARSE_MOE:
            key = key.replace(".mlp.", ".block_sparse_moe.")
        if is_quantized(key, tensor):
            # Scales that differ by powers of two from block to block.
            rows, cols = tensor.shape
            factors = 2.0 ** torch.randint(-4, 5, (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))).float()
            spread = factors.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
            tensors[key], tensors[f"{key}_scale_inv"] = quantize_blocks(tensor.float() * spread)
        else:
            tensors[key] = tensor
    document = config.to_dict() | {"quantization_config": QUANTIZATION, "dtype": "bfloat16"}
    return write_checkpoint(root, tensors, shards=shards, config=json.loads(json.dumps(document)))


def load_checkpoint_or_file(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = root / "model.safetensors"
    return load_file(single) if single.exists() else load_checkpoint(root)


@contextlib.contextmanager
def capable_gpu():
    """Make transformers' FP8 quantizer see a compute capability 9.0 GPU, so it keeps FP8 weights."""
    saved = torch.cuda.is_available, torch.cuda.get_device_capability
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    try:
        yield
    finally:
        torch.cuda.is_available, torch.cuda.get_device_capability = saved


def held_by_transformers(root: Path, out: Path, *, gpu_path: bool, device_map: str = "cpu") -> dict[str, torch.Tensor]:
    """What `from_pretrained(root)` holds, as `save_pretrained(save_original_format=False)` writes it."""
    from transformers import AutoModelForCausalLM

    with capable_gpu() if gpu_path else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(root, device_map=device_map)
    model.save_pretrained(out, save_original_format=False)
    return load_checkpoint_or_file(out)


def fp8_model_on_meta(root: Path):
    """The model of `root`'s config.json with transformers' FP8 module replacement, on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.auto import AutoHfQuantizer

    config = AutoConfig.from_pretrained(root)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    quantizer = AutoHfQuantizer.from_config(config.quantization_config, pre_quantized=True)
    quantizer.preprocess_model(model)
    return model


_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Two E2M1 values per I8 byte, the low nibble first, as float32 twice as wide."""
    table = torch.tensor(_FP4_VALUES)
    codes = packed.view(torch.uint8).long()
    return torch.stack([table[codes & 0xF], table[codes >> 4]], dim=-1).flatten(-2)


def _dequantized(weight: torch.Tensor, scale: torch.Tensor, block_size) -> torch.Tensor:
    if weight.dtype == torch.int8:  # FP4 experts: a scale per row and 32 values, whatever block_size says
        values = _unpack_fp4(weight)
        rows, cols = values.shape[-2:]
        block_size = (rows // scale.shape[-2], -(-cols // scale.shape[-1]))
        weight = values
    rows, cols = weight.shape[-2:]
    if block_size is None:
        return weight.float() * scale.float()
    expanded = scale.float().repeat_interleave(block_size[0], -2)[..., :rows, :]
    return weight.float() * expanded.repeat_interleave(block_size[1], -1)[..., :cols]


def _matmul(input, weight, weight_scale_inv, block_size, output_dtype, activation_scale=None):
    return (input.float() @ _dequantized(weight, weight_scale_inv, block_size).T).to(output_dtype)


def _matmul_batched(input, weight, weight_scale_inv, block_size=None, expert_ids=None, **_):
    out = input.new_zeros(input.shape[0], weight.shape[-2])
    for expert in expert_ids.unique().tolist():
        if expert < weight.shape[0]:
            rows = expert_ids == expert
            out[rows] = _matmul(input[rows], weight[expert], weight_scale_inv[expert], block_size, input.dtype)
    return out


def _matmul_grouped(input, weight, weight_scale_inv, offsets=None, block_size=None, **_):
    out = input.new_zeros(input.shape[0], weight.shape[-2])
    start = 0
    for expert, end in enumerate(int(end) for end in offsets.tolist()):
        if end > start:
            out[start:end] = _matmul(
                input[start:end], weight[expert], weight_scale_inv[expert], block_size, input.dtype
            )
        start = end
    return out


def use_reference_kernel() -> None:
    """Serve transformers' FP8 matmuls from a pure-torch reference registered in its kernel mapping
    (`hub_kernels._KERNEL_MODULE_MAPPING`, returned before any download), instead of the Hub kernel."""
    import transformers.integrations.finegrained_fp8 as finegrained_fp8
    import transformers.integrations.hub_kernels as hub_kernels

    module = types.ModuleType("finegrained_fp8_reference")
    module.matmul_2d, module.matmul_batched, module.matmul_grouped = _matmul, _matmul_batched, _matmul_grouped
    hub_kernels._KERNEL_MODULE_MAPPING["finegrained-fp8"] = module
    finegrained_fp8._FINEGRAINED_FP8 = None
    finegrained_fp8.is_kernels_available = lambda *args, **kwargs: True  # the `kernels` package is not needed
