"""Tiny compressed-tensors MoE checkpoints, quantized by the compressed-tensors package's own compressors.

A checkpoint is a tiny random model of a model type saved per expert, as llm-compressor writes one:
each quantized linear layer's state dict (`weight`, `weight_scale`, `weight_zero_point`) goes through
the compressor its scheme's format names (`pack-quantized`: `weight_packed` int32, `weight_scale`,
`weight_shape` and, asymmetric, a packed `weight_zero_point`; `float-quantized`: an F8_E4M3 `weight`
and its `weight_scale`), and config.json carries compressed-tensors' own `QuantizationConfig`.
Scales come from compressed-tensors' `calculate_qparams` over each group, channel or tensor, then
spread by powers of two so a scale applied to the wrong group is visible.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .conftest import write_checkpoint
from .fp8_models import BLOCK_SPARSE_MOE, is_quantized, original_bf16

# Released schemes: W4A16 (Kimi-K2.5's experts, group 32), W8A16 per channel, asymmetric W4 by group,
# and FP8 weights per channel (FP8_DYNAMIC: activations quantized on the fly) or per tensor.
SCHEMES = {
    "w4a16": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
    "w4a16_asym": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32},
    "w8a16": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
    "w8a16_asym": {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "channel"},
    "w4a16_tensor": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "tensor"},
    "fp8_dynamic": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"},
    "fp8_tensor": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"},
}
DYNAMIC_FP8_ACTIVATIONS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}


def scheme_config(
    scheme: str, *, targets: list[str] | None = None, ignore: list[str] | None = None, group_size: int | None = None
) -> dict:
    """config.json's `quantization_config` for `scheme` (with another `group_size`, for tiny models), as
    compressed-tensors serialises it."""
    from compressed_tensors.quantization import QuantizationConfig

    weights = SCHEMES[scheme] | ({"group_size": group_size} if group_size else {})
    fp8 = weights["type"] == "float"
    group = {
        "targets": targets or ["Linear"],
        "weights": weights,
        "input_activations": DYNAMIC_FP8_ACTIVATIONS if scheme == "fp8_dynamic" else None,
        "format": "float-quantized" if fp8 else "pack-quantized",
    }
    config = QuantizationConfig(
        config_groups={"group_0": group},
        format=group["format"],
        quantization_status="compressed",
        ignore=ignore if ignore is not None else ["lm_head"],
    )
    return json.loads(json.dumps(config.model_dump(exclude_none=False) | {"quant_method": "compressed-tensors"}))


def compress(
    weight: torch.Tensor, scheme: str, *, scale_dtype=torch.bfloat16, seed: int = 0, group_size: int | None = None
) -> dict:
    """The compressed state dict of one linear `weight` under `scheme`, by compressed-tensors' compressor."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    config = scheme_config(scheme, group_size=group_size)["config_groups"]["group_0"]
    scheme_object = QuantizationScheme.model_validate(config)
    args = scheme_object.weights
    rows, cols = weight.shape
    generator = torch.Generator().manual_seed(seed)
    if args.strategy == "group":
        view = weight.float().view(rows, cols // args.group_size, args.group_size)
        low, high = view.amin(dim=-1), view.amax(dim=-1)
    elif args.strategy == "channel":
        low, high = weight.float().amin(dim=1, keepdim=True), weight.float().amax(dim=1, keepdim=True)
    else:
        low, high = weight.float().amin().reshape(1), weight.float().amax().reshape(1)
    scale, zero_point = calculate_qparams(low, high, args)
    spread = 2.0 ** torch.randint(-3, 4, scale.shape, generator=generator).float()
    scale = (scale.float() * spread).to(scale_dtype)
    state = {"weight": weight.to(scale_dtype), "weight_scale": scale}
    if not args.symmetric:
        state["weight_zero_point"] = zero_point.to(torch.int8)
    compressor = BaseCompressor.get_value_from_registry(config["format"])
    return compressor.compress(state, scheme_object)


def ct_checkpoint(
    root: Path,
    model_type: str,
    scheme: str,
    *,
    experts_only: bool = False,
    scale_dtype=torch.bfloat16,
    shards: int = 3,
    seed: int = 0,
) -> Path:
    """Write a per-expert compressed-tensors checkpoint of a tiny random `model_type` model.

    With `experts_only`, only routed experts are quantized (targets `re:.*experts.*`, as Kimi-K2.5).
    """
    config, original = original_bf16(root, model_type, seed=seed)
    tensors = {}
    for i, (key, tensor) in enumerate(sorted(original.items())):
        if model_type in BLOCK_SPARSE_MOE:
            key = key.replace(".mlp.", ".block_sparse_moe.")
        if is_quantized(key, tensor) and (".experts." in key or not experts_only):
            module = key.removesuffix(".weight")
            for name, value in compress(tensor, scheme, scale_dtype=scale_dtype, seed=seed + i).items():
                tensors[f"{module}.{name}"] = value.contiguous()
        else:
            tensors[key] = tensor
    ignore = ["lm_head", "re:.*mlp.gate$"]
    targets = ["re:.*experts.*"] if experts_only else ["Linear"]
    quantization = scheme_config(scheme, targets=targets, ignore=ignore)
    document = config.to_dict() | {"quantization_config": quantization, "dtype": "bfloat16"}
    return write_checkpoint(root, tensors, shards=shards, config=json.loads(json.dumps(document)))
