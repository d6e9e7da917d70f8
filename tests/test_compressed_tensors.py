"""compressed-tensors checkpoints: `convert --dequantize` writes what transformers 5.24 holds.

The sources are tiny models quantized by the compressed-tensors package's own compressors
(tests/ct_models.py); the oracle is `from_pretrained(..., CompressedTensorsConfig(dequantize=True))`,
whose routed experts are also what a plain `from_pretrained` holds (it dequantizes experts always).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from fusemoe_ckpt import verify
from fusemoe_ckpt.cli import cli

from .ct_models import compress, ct_checkpoint, scheme_config
from .fp8_models import load_checkpoint_or_file
from .test_bad_input import refuse
from .test_fp8 import assert_same_tensors

pytest.importorskip("compressed_tensors")


def held_dequantized(root: Path, out: Path, *, dequantize: bool = True) -> dict[str, torch.Tensor]:
    """What transformers holds for `root`, saved as it holds it."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = CompressedTensorsConfig(dequantize=True) if dequantize else None
    model = AutoModelForCausalLM.from_pretrained(root, quantization_config=config)
    model.save_pretrained(out, save_original_format=False)
    return load_checkpoint_or_file(out)


def convert_cli(src: Path, dst: Path, *options: str):
    result = CliRunner().invoke(cli, ["convert", str(src), str(dst), "--dequantize", "--quiet", *options])
    assert result.exit_code == 0, result.output
    return result


CASES = [
    ("qwen3_moe", "w4a16", torch.bfloat16, False),
    ("qwen3_moe", "w8a16", torch.bfloat16, False),
    ("qwen3_moe", "w8a16", torch.float16, False),
    ("qwen3_moe", "w4a16_tensor", torch.bfloat16, False),
    ("qwen3_moe", "w4a16", torch.float32, False),
    ("qwen3_moe", "fp8_dynamic", torch.bfloat16, False),
    ("qwen3_moe", "fp8_tensor", torch.float16, False),
    ("mixtral", "w4a16", torch.bfloat16, False),
    ("deepseek_v3", "w4a16", torch.bfloat16, True),
]


@pytest.mark.parametrize(("model_type", "scheme", "scale_dtype", "experts_only"), CASES)
def test_dequantized_is_what_transformers_holds(tmp_path, model_type, scheme, scale_dtype, experts_only):
    src = ct_checkpoint(tmp_path / "src", model_type, scheme, scale_dtype=scale_dtype, experts_only=experts_only)
    convert_cli(src, tmp_path / "dst", "--max-shard-size", "300KB")
    ours = load_checkpoint_or_file(tmp_path / "dst")
    assert_same_tensors(ours, held_dequantized(src, tmp_path / "held"))
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert "quantization_config" not in config
    assert verify(src, tmp_path / "dst").ok
    if scale_dtype == torch.float32 and SCHEME_BITS[scheme]:
        # transformers keeps the dtype compressed-tensors returns for packed experts: float32 scales,
        # float32 experts in a bfloat16 model; the other layers become bfloat16.
        assert ours["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.float32
        assert ours["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


SCHEME_BITS = {"w4a16": 4, "w8a16": 8, "w4a16_tensor": 4, "fp8_dynamic": None, "fp8_tensor": None}


def test_dtype_casts_the_dequantized_values(tmp_path):
    """`--dtype float32` writes the values transformers holds, widened: every weight float32."""
    src = ct_checkpoint(tmp_path / "src", "qwen3_moe", "w4a16")
    convert_cli(src, tmp_path / "bf16")
    convert_cli(src, tmp_path / "f32", "--dtype", "float32")
    narrow, wide = load_checkpoint_or_file(tmp_path / "bf16"), load_checkpoint_or_file(tmp_path / "f32")
    assert sorted(narrow) == sorted(wide)
    for key, tensor in narrow.items():
        assert wide[key].dtype == torch.float32, key
        assert torch.equal(wide[key], tensor.float()), key
    assert verify(src, tmp_path / "f32").ok


def test_experts_are_what_a_plain_from_pretrained_holds(tmp_path):
    """Without dequantize=True, transformers keeps attention compressed but dequantizes the experts."""
    src = ct_checkpoint(tmp_path / "src", "qwen3_moe", "w4a16")
    convert_cli(src, tmp_path / "dst")
    ours = load_checkpoint_or_file(tmp_path / "dst")
    from transformers import AutoModelForCausalLM

    # In memory: saving this model re-compresses what it holds compressed.
    held = AutoModelForCausalLM.from_pretrained(src).state_dict()
    experts = [key for key in held if ".experts." in key]
    assert len(experts) == 4
    assert_same_tensors({k: ours[k] for k in experts}, {k: held[k] for k in experts})


def test_inspect_and_unfuse(tmp_path):
    src = ct_checkpoint(tmp_path / "src", "qwen3_moe", "w4a16")
    result = CliRunner().invoke(cli, ["inspect", str(src), "--dequantize", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["quantization"] == {
        "method": "compressed-tensors",
        "block": None,
        "scale_fmt": "float",
        "activation_scheme": "dynamic",
        "expert_dtype": "int4",
        "dequantize": True,
        "scheme": "pack-quantized int4, group 32 scales",
        "dropped_tensors": 0,
    }
    assert report["renamed_tensors"] == 0  # x.weight_packed written as x.weight is no rename
    module = report["moe_modules"][0]
    assert (module["experts"], module["quantization"]["dequantized"]) == (4, True)
    assert module["quantization"]["block"] == [1, 32]
    assert report["output"]["total_bytes"] > report["total_bytes"]  # int4 becomes bfloat16
    convert_cli(src, tmp_path / "dst")
    result = CliRunner().invoke(cli, ["unfuse", str(tmp_path / "dst"), str(tmp_path / "back"), "--quiet"])
    assert result.exit_code == 0, result.output
    back = load_checkpoint_or_file(tmp_path / "back")
    fused = load_checkpoint_or_file(tmp_path / "dst")
    gate_up = fused["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(back["model.layers.1.mlp.experts.2.up_proj.weight"], gate_up[2, 256:])


def test_without_dequantize_one_line_says_how(tmp_path):
    src = ct_checkpoint(tmp_path / "src", "qwen3_moe", "w4a16")
    message = refuse(tmp_path, src, tmp_path / "dst")
    assert message == (
        f"{src / 'config.json'}: a compressed-tensors checkpoint (experts pack-quantized int4, group 32 "
        "scales): transformers dequantizes its experts at load, so they must be dequantized to be fused; convert "
        "with --dequantize (floating weights, config.json without quantization_config)"
    )


@pytest.fixture(scope="module")
def w4_source(tmp_path_factory) -> Path:
    return ct_checkpoint(tmp_path_factory.mktemp("ct") / "src", "qwen3_moe", "w4a16", shards=1)


def _edited(tmp_path: Path, src: Path, edit) -> Path:
    """A copy of `src` whose tensors (one shard) and config pass through `edit(tensors, config)`."""
    copy = tmp_path / "edited"
    shutil.copytree(src, copy)
    shard = next(copy.glob("model-*.safetensors"))
    tensors = load_file(shard)
    config = json.loads((copy / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    index["weight_map"] = dict.fromkeys(tensors, shard.name)
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    (copy / "config.json").write_text(json.dumps(config))
    return copy


EXPERT = "model.layers.1.mlp.experts.2.up_proj"


def _wrong_packed(tensors, config):
    tensors[f"{EXPERT}.weight_packed"] = tensors[f"{EXPERT}.weight_packed"][:, :16].contiguous()


def _missing_scale(tensors, config):
    del tensors[f"{EXPERT}.weight_scale"]


def _missing_shape(tensors, config):
    del tensors[f"{EXPERT}.weight_shape"]


def _missing_packed(tensors, config):
    del tensors[f"{EXPERT}.weight_packed"]


def _packed_and_plain(tensors, config):
    tensors[f"{EXPERT}.weight"] = torch.zeros(256, 256, dtype=torch.bfloat16)


def _group_48(tensors, config):
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 48


def _asymmetric(tensors, config):
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False


def _static_activations(tensors, config):
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {
        "num_bits": 8,
        "type": "float",
        "strategy": "tensor",
        "dynamic": False,
        "symmetric": True,
    }


def _nvfp4(tensors, config):
    config["quantization_config"]["config_groups"]["group_0"]["format"] = "nvfp4-pack-quantized"


def _sparsity(tensors, config):
    config["quantization_config"]["sparsity_config"] = {"format": "sparse-24-bitmask"}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            _wrong_packed,
            f"{EXPERT}.weight_packed: shape [256, 16] does not hold {EXPERT}.weight_shape [256, 256] "
            "of 4-bit values: expected [256, 32] ({shard})",
        ),
        (_missing_scale, f"{EXPERT}.weight_scale: missing: the weight_scale of {EXPERT}.weight_packed ({{shard}})"),
        (_missing_shape, f"{EXPERT}.weight_shape: missing: the weight_shape of {EXPERT}.weight_packed ({{shard}})"),
        (
            _missing_packed,
            f"{EXPERT}.weight_scale: a compressed-tensors companion without its weight ({EXPERT}.weight_packed "
            f"or an FP8 {EXPERT}.weight) ({{shard}})",
        ),
        (
            _packed_and_plain,
            f"{EXPERT}.weight: stored beside {EXPERT}.weight_packed, which compressed-tensors stores instead of it "
            "({shard})",
        ),
        (
            _group_48,
            "model.layers.0.mlp.experts.0.down_proj.weight_packed: 256 columns are not a multiple of "
            "group_size 48, as compressed-tensors requires to dequantize it ({shard})",
        ),
        (
            _asymmetric,
            "{config}: quantization_config.config_groups.group_0: asymmetric experts (weight_zero_point) "
            "are not supported: transformers 5.24 cannot dequantize them at load",
        ),
        (
            _static_activations,
            "{config}: quantization_config.config_groups.group_0.input_activations: static input "
            "activations quantization is not supported (transformers' dequantized model has no place for its "
            "scales); only dynamic input activations",
        ),
        (
            _nvfp4,
            "{config}: quantization_config.config_groups.group_0.format 'nvfp4-pack-quantized' is not "
            "supported: fusemoe-ckpt dequantizes pack-quantized (int4, int8) and float-quantized / naive-quantized "
            "(FP8)",
        ),
        (
            _sparsity,
            "{config}: quantization_config.sparsity_config is set: compressed-tensors sparsity is not "
            "supported (a dequantized weight would not be the model's)",
        ),
    ],
    ids=[
        "wrong-packed-shape",
        "missing-scale",
        "missing-shape",
        "missing-packed",
        "packed-and-plain",
        "group-size",
        "asymmetric-experts",
        "static-activations",
        "nvfp4",
        "sparsity",
    ],
)
def test_bad_input_one_line(tmp_path, w4_source, edit, expected):
    src = _edited(tmp_path, w4_source, edit)
    shard = next(src.glob("model-*.safetensors"))
    message = refuse(tmp_path, src, tmp_path / "dst", "--dequantize")
    assert message == expected.format(shard=shard, config=src / "config.json")


@pytest.mark.parametrize(("scheme", "bits"), [("w4a16_asym", 4), ("w8a16_asym", 8)])
def test_zero_points_match_the_decompressor(scheme, bits):
    """Asymmetric layers (not experts, which transformers cannot load) against compressed-tensors itself."""
    import numpy as np
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from fusemoe_ckpt.plan.dequantize import dequantize_rows, scale_values, zero_point_values
    from fusemoe_ckpt.reading.quantization_records import Scales, ZeroPoints

    torch.manual_seed(0)
    weight = torch.randn(40, 64, dtype=torch.bfloat16)
    state = compress(weight, scheme)
    group = scheme_config(scheme)["config_groups"]["group_0"]
    expected = BaseCompressor.get_value_from_registry("pack-quantized").decompress(
        state, QuantizationScheme.model_validate(group)
    )["weight"]
    grid = tuple(state["weight_scale"].shape)
    block = (1, 64 // grid[1])
    zero = state["weight_zero_point"]
    scales = Scales(
        "s",
        Path("f"),
        0,
        "BF16",
        grid,
        block,
        (40, 64),
        "I32",
        bits=bits,
        zero_points=ZeroPoints("z", Path("f"), 0, zero.numel() * 4, bits),
        rounding="BF16",
    )
    grid_values = scale_values(state["weight_scale"].view(torch.uint8).numpy().tobytes(), scales)
    zeros = zero_point_values(zero.numpy().tobytes(), scales)
    packed = state["weight_packed"].numpy().tobytes()
    row_bytes = scales.row_bytes
    out = b"".join(
        bytes(
            dequantize_rows(
                packed[start : start + 7 * row_bytes], start // row_bytes, grid_values, scales, "BF16", zeros
            )
        )
        for start in range(0, len(packed), 7 * row_bytes)
    )
    ours = torch.frombuffer(bytearray(out), dtype=torch.bfloat16).view(40, 64)
    assert np.array_equal(ours.view(torch.int16).numpy(), expected.view(torch.int16).numpy())


def test_kimi_k25_int4_experts_as_released(tmp_path):
    """Kimi-K2.5 ships its routed experts as pack-quantized INT4 (group 32; 8 here, for tiny experts),
    every other layer in floating point and listed in `ignore`. transformers dequantizes the experts at
    load, and a plain `from_pretrained` holds exactly what `convert --dequantize` writes."""
    from transformers import AutoModelForImageTextToText

    from .conftest import load_checkpoint, write_checkpoint
    from .released_models import kimi_checkpoint

    plain = kimi_checkpoint(tmp_path / "plain")
    tensors = {}
    for i, (key, value) in enumerate(sorted(load_checkpoint(plain).items())):
        if ".experts." in key and key.endswith(".weight"):
            module = key.removesuffix(".weight")
            compressed = compress(value, "w4a16", scale_dtype=torch.float32, seed=i, group_size=8)
            tensors |= {f"{module}.{name}": t.contiguous() for name, t in compressed.items()}
        else:
            tensors[key] = value
    config = json.loads((plain / "config.json").read_text())
    ignore = [
        "lm_head",
        r"re:.*self_attn.*",
        r"re:.*shared_experts.*",
        r"re:.*mlp\.(gate|up|down)_proj.*",
        r"re:.*vision_tower.*",
        r"re:.*mm_projector.*",
    ]
    config["quantization_config"] = scheme_config("w4a16", group_size=8, ignore=ignore)
    src = write_checkpoint(tmp_path / "src", tensors, shards=3, config=config)
    message = refuse(tmp_path, src, tmp_path / "dst")
    assert "a compressed-tensors checkpoint" in message and "convert with --dequantize" in message
    convert_cli(src, tmp_path / "dst", "--max-shard-size", "40KB")
    held = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).state_dict()
    assert_same_tensors(load_checkpoint(tmp_path / "dst"), {k: v.contiguous() for k, v in held.items()})
    assert verify(src, tmp_path / "dst").ok


def test_mixed_schemes_asymmetric_dense_layers(tmp_path):
    """Two config groups, as Kimi-style mixed configs have: int4 experts (`re:.*experts.*`) and
    asymmetric int8 attention per channel (`Linear`); transformers picks each layer's group."""
    from compressed_tensors.quantization import QuantizationConfig

    from .conftest import write_checkpoint

    plain = ct_checkpoint(tmp_path / "plain", "qwen3_moe", "w4a16", experts_only=True)
    tensors = load_checkpoint_or_file(plain)
    for key in [k for k in tensors if ".self_attn." in k and k.endswith("_proj.weight")]:
        module = key.removesuffix(".weight")
        compressed = compress(tensors.pop(key), "w8a16_asym", seed=len(tensors))
        tensors |= {f"{module}.{name}": t.contiguous() for name, t in compressed.items()}
    assert "model.layers.1.self_attn.o_proj.weight_zero_point" in tensors
    experts = scheme_config("w4a16", targets=["re:.*experts.*"])["config_groups"]["group_0"]
    dense = scheme_config("w8a16_asym", targets=["Linear"])["config_groups"]["group_0"]
    mixed = QuantizationConfig(
        config_groups={"experts": experts, "attention": dense},
        format="mixed-precision",
        quantization_status="compressed",
        ignore=["lm_head", "re:.*mlp.gate$"],
    )
    config = json.loads((plain / "config.json").read_text())
    config["quantization_config"] = json.loads(json.dumps(mixed.model_dump() | {"quant_method": "compressed-tensors"}))
    src = write_checkpoint(tmp_path / "src", tensors, shards=2, config=config)
    convert_cli(src, tmp_path / "dst")
    assert_same_tensors(load_checkpoint_or_file(tmp_path / "dst"), held_dequantized(src, tmp_path / "held"))
