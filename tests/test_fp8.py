"""FP8 block-quantized checkpoints: fused weights and scales exactly as transformers 5.24 holds them on
its GPU path, `--dequantize` bit for bit like its CPU path (and right where that one is wrong),
verify and unfuse of both, and one-line refusals of what cannot be held."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fusemoe_ckpt import convert, inspect_checkpoint, unfuse, verify
from fusemoe_ckpt.cli import cli

from .conftest import load_checkpoint, write_checkpoint
from .fp8_models import (
    BLOCK,
    QUANTIZATION,
    capable_gpu,
    dequantize_blocks,
    fp8_checkpoint,
    fp8_model_on_meta,
    held_by_transformers,
    quantize_blocks,
    use_reference_kernel,
)
from .test_bad_input import one_line_error, refuse

pytest.importorskip("transformers")

MODEL_TYPES = ["deepseek_v3", "qwen3_moe", "glm4_moe", "minimax_m2", "mixtral"]


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """The same keys, and for each the same dtype, shape and bytes."""
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert (ours[key].dtype, ours[key].shape) == (theirs[key].dtype, theirs[key].shape), key
        assert torch.equal(ours[key].view(torch.uint8), theirs[key].view(torch.uint8)), key


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fused_fp8_is_what_transformers_holds_on_its_gpu_path(tmp_path, model_type):
    """Fused F8_E4M3 experts with their scales fused the same way, every other tensor as stored, and
    config.json unchanged: key for key and byte for byte transformers 5.24's in-memory FP8 model.
    If a transformers release holds FP8 experts otherwise (interleaved gate/up rows, say), this fails."""
    src = fp8_checkpoint(tmp_path / "src", model_type)
    result = convert(src, tmp_path / "fused", max_shard_size="300KB")
    assert len(result.plan.shards) > 2
    theirs = held_by_transformers(src, tmp_path / "transformers", gpu_path=True)
    ours = load_checkpoint(tmp_path / "fused")
    assert_same_tensors(ours, theirs)
    expert = "model.layers.1.mlp.experts"
    assert ours[f"{expert}.gate_up_proj"].dtype == torch.float8_e4m3fn
    assert ours[f"{expert}.gate_up_proj_scale_inv"].shape == (4, 2 * 256 // BLOCK, 256 // BLOCK)
    assert (tmp_path / "fused" / "config.json").read_text() == (src / "config.json").read_text()
    assert "fp8 weights and scales fused" in result.summary()


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen3_moe"])
def test_fused_fp8_loads_with_strict_dispatch_and_gives_the_same_logits(tmp_path, model_type):
    """The FP8 model skeleton (transformers' quantizer, on meta) loads the fused checkpoint with strict
    accelerate dispatch: every parameter and buffer equals from_pretrained(original FP8), and a
    forward pass through the reference FP8 kernel gives the same logits."""
    from accelerate import load_checkpoint_and_dispatch
    from transformers import AutoModelForCausalLM

    src = fp8_checkpoint(tmp_path / "src", model_type)
    convert(src, tmp_path / "fused")
    use_reference_kernel()
    with capable_gpu():
        model = fp8_model_on_meta(tmp_path / "fused")
        model = load_checkpoint_and_dispatch(model, str(tmp_path / "fused"), device_map={"": "cpu"}, strict=True)
        reference = AutoModelForCausalLM.from_pretrained(src, device_map="cpu")
    ours = dict(model.named_parameters()) | dict(model.named_buffers())
    theirs = dict(reference.named_parameters()) | dict(reference.named_buffers())
    assert not [name for name, tensor in ours.items() if tensor.device.type == "meta"]
    assert_same_tensors({k: v.data for k, v in ours.items()}, {k: v.data for k, v in theirs.items()})
    tokens = torch.arange(1, 9).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens).logits, reference.eval()(tokens).logits)


def test_dequantize_is_bit_identical_to_transformers_cpu_path(tmp_path):
    """Where every dimension is a multiple of the block, --dequantize writes exactly the bf16 tensors
    transformers' CPU dequantization holds, fused; config.json loses its quantization_config."""
    src = fp8_checkpoint(tmp_path / "src", "qwen3_moe")
    result = convert(src, tmp_path / "bf16", dequantize=True)
    assert "fp8 dequantized" in result.summary()
    theirs = held_by_transformers(src, tmp_path / "transformers", gpu_path=False)
    assert_same_tensors(load_checkpoint(tmp_path / "bf16"), theirs)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config == {
        k: v for k, v in json.loads((src / "config.json").read_text()).items() if k != "quantization_config"
    }
    assert verify(src, tmp_path / "bf16").ok


def test_dequantize_is_right_where_transformers_infers_the_block_wrong(tmp_path):
    """DeepSeek-V3's kv_a_proj_with_mqa has 576 rows over 5 scale rows: transformers' CPU path infers the
    block as 576 // 5 and refuses to load. --dequantize uses weight_block_size, so each row uses scale
    row i // 128; the output loads with strict dispatch on the CPU and gives the logits of a model
    holding the correctly dequantized original."""
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import AutoConfig, AutoModelForCausalLM

    src = fp8_checkpoint(tmp_path / "src", "deepseek_v3")
    convert(src, tmp_path / "bf16", dequantize=True)
    original = load_checkpoint(src)
    ours = load_checkpoint(tmp_path / "bf16")
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert original[key].shape == (576, 256) and original[key + "_scale_inv"].shape == (5, 2)
    assert torch.equal(ours[key], dequantize_blocks(original[key], original[key + "_scale_inv"]))
    experts = "model.layers.1.mlp.experts"
    gate_up = torch.stack(
        [
            torch.cat(
                [
                    dequantize_blocks(
                        original[f"{experts}.{e}.{name}.weight"], original[f"{experts}.{e}.{name}.weight_scale_inv"]
                    )
                    for name in ("gate_proj", "up_proj")
                ]
            )
            for e in range(4)
        ]
    )
    assert torch.equal(ours[f"{experts}.gate_up_proj"], gate_up)

    config = AutoConfig.from_pretrained(tmp_path / "bf16")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = load_checkpoint_and_dispatch(model, str(tmp_path / "bf16"), device_map={"": "cpu"}, strict=True)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    reference.load_state_dict(_correctly_dequantized(original, config), strict=False)
    tokens = torch.arange(1, 9).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens).logits, reference.eval()(tokens).logits)

    # What transformers 5.24 does with the original on a CPU: it cannot dequantize that weight.
    with pytest.raises(RuntimeError, match="automatic conversion of the weights"):
        AutoModelForCausalLM.from_pretrained(src, device_map="cpu")


def _correctly_dequantized(original: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The original checkpoint dequantized by the format's definition and fused in plain torch."""
    plain = {
        key: dequantize_blocks(tensor, original[key + "_scale_inv"]) if tensor.dtype == torch.float8_e4m3fn else tensor
        for key, tensor in original.items()
        if not key.endswith("_scale_inv")
    }
    for layer in range(config.first_k_dense_replace, config.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts"
        experts = range(config.n_routed_experts)
        plain[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([plain.pop(f"{p}.{e}.gate_proj.weight"), plain.pop(f"{p}.{e}.up_proj.weight")]) for e in experts]
        )
        plain[f"{p}.down_proj"] = torch.stack([plain.pop(f"{p}.{e}.down_proj.weight") for e in experts])
    return plain


def test_dequantize_to_float16(tmp_path):
    """--dtype float16 with --dequantize: FP8 weights dequantized straight to float16 (rounded once),
    bf16 tensors cast."""
    src = fp8_checkpoint(tmp_path / "src", "qwen3_moe")
    convert(src, tmp_path / "f16", dequantize=True, dtype="float16")
    original, ours = load_checkpoint(src), load_checkpoint(tmp_path / "f16")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(ours[key], dequantize_blocks(original[key], original[key + "_scale_inv"], torch.float16))
    assert ours["model.embed_tokens.weight"].dtype == torch.float16
    assert verify(src, tmp_path / "f16").ok


@pytest.mark.parametrize("dequantize", [False, True], ids=["fused-fp8", "dequantized"])
def test_verify_proves_each_output_and_finds_a_changed_byte(tmp_path, dequantize):
    src = fp8_checkpoint(tmp_path / "src", "qwen3_moe", shards=2)
    dst = tmp_path / "dst"
    convert(src, dst, dequantize=dequantize)
    assert verify(src, dst, load_check=True).ok  # the FP8 skeleton (or the bf16 one) asks for exactly DST's keys
    key = "model.layers.1.mlp.experts.gate_up_proj"
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = dst / index["weight_map"][key]
    from safetensors import safe_open

    with safe_open(shard, "pt") as f:
        header_len = int.from_bytes(shard.read_bytes()[:8], "little")
        start = json.loads(shard.read_bytes()[8 : 8 + header_len])[key]["data_offsets"][0]
        assert key in f.keys()  # noqa: SIM118
    data = bytearray(shard.read_bytes())
    data[8 + header_len + start + 1000] ^= 0x01
    shard.write_bytes(bytes(data))
    result = verify(src, dst)
    assert list(result.problems) == [key]
    assert "first at byte 1000" in result.problems[key][0]


def test_unfuse_gives_back_the_per_expert_weights_and_scales(tmp_path):
    src = fp8_checkpoint(tmp_path / "src", "deepseek_v3")
    convert(src, tmp_path / "fused")
    unfuse(tmp_path / "fused", tmp_path / "back")
    assert_same_tensors(load_checkpoint(tmp_path / "back"), load_checkpoint(src))


def test_block_sparse_moe_scales_are_renamed_with_their_weights(tmp_path):
    """Mixtral-style w1/w3/w2 under block_sparse_moe: scales renamed to mlp and fused as [w1; w3]."""
    src = fp8_checkpoint(tmp_path / "src", "mixtral")
    convert(src, tmp_path / "fused")
    original, ours = load_checkpoint(src), load_checkpoint(tmp_path / "fused")
    old = "model.layers.0.block_sparse_moe.experts"
    expected = torch.stack(
        [
            torch.cat([original[f"{old}.{e}.w1.weight_scale_inv"], original[f"{old}.{e}.w3.weight_scale_inv"]])
            for e in range(4)
        ]
    )
    assert torch.equal(ours["model.layers.0.mlp.experts.gate_up_proj_scale_inv"], expected)
    assert not [key for key in ours if "block_sparse_moe" in key]


def test_inspect_shows_the_quantization(tmp_path):
    src = fp8_checkpoint(tmp_path / "src", "qwen3_moe", shards=1)
    data = inspect_checkpoint(src).to_json()
    assert data["quantization"] == {
        "method": "fp8",
        "block": [128, 128],
        "scale_fmt": "float",
        "activation_scheme": "dynamic",
        "expert_dtype": "fp8",
        "dequantize": False,
        "scheme": None,
        "dropped_tensors": 0,
    }
    module = data["moe_modules"][0]
    assert (module["dtype"], module["intermediate_size"], module["hidden_size"]) == ("F8_E4M3", 256, 256)
    assert module["quantization"] == {
        "dtype": "F8_E4M3",
        "scale_dtype": "F32",
        "block": [128, 128],
        "dequantized": False,
    }
    planned = inspect_checkpoint(src, dequantize=True).to_json()
    assert planned["moe_modules"][0]["quantization"]["dequantized"] is True
    assert planned["output"]["total_bytes"] > data["output"]["total_bytes"]
    text = CliRunner().invoke(cli, ["inspect", str(src)]).output
    assert "quantization: fp8, block 128x128, scale_fmt float: kept, scales fused beside the weights" in text
    assert "F8_E4M3 with F32 scales per 128x128 block" in text


# Bad input, with tiny by-eye tensors: two layers of two experts, I = H = 128, one block each.


def tiny_fp8_source(tmp_path: Path, *, edit=None, quantization=QUANTIZATION, rows: int = 128) -> Path:
    """Per-expert FP8 weights (expert e of layer l holds 10 l + e, scale 0.5) with their scales."""
    tensors = {"model.embed_tokens.weight": torch.ones(8, 128, dtype=torch.bfloat16)}
    for layer in range(2):
        for expert in range(2):
            p = f"model.layers.{layer}.mlp.experts.{expert}"
            for name, shape in (("gate_proj", (rows, 128)), ("up_proj", (rows, 128)), ("down_proj", (128, rows))):
                weight, scale = quantize_blocks(torch.full(shape, float(10 * layer + expert)))
                tensors[f"{p}.{name}.weight"], tensors[f"{p}.{name}.weight_scale_inv"] = weight, scale
    if edit is not None:
        edit(tensors)
    config = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 2}
    if quantization is not None:
        config["quantization_config"] = quantization
    return write_checkpoint(tmp_path / "src", tensors, shards=2, config=config)


def _without(key: str):
    return lambda tensors: tensors.pop(key)


def _set(key: str, value: torch.Tensor):
    return lambda tensors: tensors.__setitem__(key, value)


E1 = "model.layers.1.mlp.experts.1"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _without(f"{E1}.up_proj.weight_scale_inv"),
            f"{E1}.up_proj.weight_scale_inv: missing: the scale of F8_E4M3 tensor {E1}.up_proj.weight",
        ),
        (
            _set(f"{E1}.up_proj.weight_scale_inv", torch.ones(2, 1)),
            f"{E1}.up_proj.weight_scale_inv: shape [2, 1] does not match {E1}.up_proj.weight [128, 128]: "
            "expected [1, 1] for weight_block_size [128, 128]",
        ),
        (
            _set(f"{E1}.up_proj.weight_scale_inv", torch.ones(1, 1, dtype=torch.int32)),
            f"{E1}.up_proj.weight_scale_inv: dtype I32 is not a scale dtype (F32, BF16, F8_E8M0, U8)",
        ),
        (
            _set(f"{E1}.up_proj.weight", torch.ones(128, 128)),
            f"{E1}.up_proj.weight_scale_inv: a scale of F32 tensor '{E1}.up_proj.weight'",
        ),
        (
            _set(f"{E1}.up_proj.extra_scale_inv", torch.ones(1, 1)),
            f"{E1}.up_proj.extra_scale_inv: a scale of no tensor '{E1}.up_proj.extra'",
        ),
        (
            _set(f"{E1}.up_proj.input_scale", torch.ones(1)),
            f"{E1}.up_proj.input_scale: a static activation scale transformers 5.24 does not load for experts",
        ),
        (
            _set(f"{E1}.up_proj.qweight", torch.ones(16, 128, dtype=torch.int32)),
            f"{E1}.up_proj.qweight: per-expert tensor that family qwen2_moe does not fuse",
        ),
    ],
    ids=[
        "missing-scale",
        "wrong-scale-shape",
        "wrong-scale-dtype",
        "scale-of-plain-weight",
        "scale-of-no-tensor",
        "static-input-scale",
        "gptq-tensor",
    ],
)
def test_bad_fp8_input_is_refused_by_key(tmp_path, edit, message):
    src = tiny_fp8_source(tmp_path, edit=edit)
    assert refuse(tmp_path, src, tmp_path / "dst").startswith(message)


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        (
            {"quant_method": "gptq", "bits": 4},
            "quantization_config.quant_method 'gptq' is not supported: transformers 5.24 does not fuse GPTQ experts",
        ),
        (
            {"quant_method": "awq"},
            "quantization_config.quant_method 'awq' is not supported: transformers 5.24 does not fuse AWQ experts",
        ),
        ({"quant_method": "bitsandbytes"}, "quantization_config.quant_method 'bitsandbytes' is not supported"),
        (QUANTIZATION | {"weight_block_size": [64, 64]}, "shape [1, 1] does not match"),
        (
            QUANTIZATION | {"weight_block_size": [128]},
            "quantization_config.weight_block_size [128] is not [rows, cols]",
        ),
    ],
    ids=["gptq", "awq", "unknown", "block-mismatch", "malformed-block"],
)
def test_unsupported_or_inconsistent_quantization_config(tmp_path, quantization, message):
    src = tiny_fp8_source(tmp_path, quantization=quantization)
    assert message in refuse(tmp_path, src, tmp_path / "dst")


def test_intermediate_size_off_the_block_is_refused_with_both_shapes(tmp_path):
    """I = 192: concatenating the experts' scales gives 2 * ceil(192/128) = 4 rows, transformers
    allocates ceil(384/128) = 3 and reads them per 128 fused rows: refused, pointing at --dequantize."""
    src = tiny_fp8_source(tmp_path, rows=192)
    message = refuse(tmp_path, src, tmp_path / "dst")
    assert message == (
        "model.layers.0.mlp.experts: FP8 experts with intermediate size 192, not a multiple of the 128-row block: "
        "concatenated scales gate_up_proj_scale_inv [2, 4, 1], transformers allocates [2, 3, 1] and reads them "
        "per 128 fused rows; convert with --dequantize"
    )
    result = CliRunner().invoke(cli, ["convert", "-q", "--dequantize", str(src), str(tmp_path / "bf16")])
    assert result.exit_code == 0, result.output
    fused = load_checkpoint(tmp_path / "bf16")["model.layers.1.mlp.experts.gate_up_proj"]
    assert fused.shape == (2, 384, 128) and fused.dtype == torch.bfloat16
    assert [fused[e].unique().tolist() for e in range(2)] == [[10.0], [11.0]]


def test_dequantize_needs_a_quantized_checkpoint(tmp_path):
    src = tiny_fp8_source(
        tmp_path, quantization=None, edit=lambda t: [t.pop(k) for k in list(t) if k.endswith("_scale_inv")] and None
    )
    src_text = str(src)
    result = CliRunner().invoke(cli, ["convert", "--dequantize", src_text, str(tmp_path / "dst")])
    assert one_line_error(result, 2) == f"{src_text}: --dequantize: config.json declares no quantization_config"


def test_by_eye_dequantization(tmp_path):
    """Expert e of layer l holds 10 l + e in every element: dequantized and fused, each expert's rows
    read back as its value, whatever the scale the quantizer chose."""
    src = tiny_fp8_source(tmp_path)
    convert(src, tmp_path / "bf16", dequantize=True, max_shard_size="100KB")
    ours = load_checkpoint(tmp_path / "bf16")
    for layer in range(2):
        gate_up = ours[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        assert [gate_up[e].unique().tolist() for e in range(2)] == [[10.0 * layer], [10.0 * layer + 1]]
    assert sorted(k for k in ours if "experts" in k) == [
        f"model.layers.{layer}.mlp.experts.{name}" for layer in range(2) for name in ("down_proj", "gate_up_proj")
    ]


def test_e8m0_and_bf16_scales_dequantize_like_torch(tmp_path):
    """Scales stored as E8M0 exponents (scale_fmt ue8m0) or in bf16 dequantize as transformers
    computes them: decoded to float32, one multiply, one rounding."""
    weight = torch.randn(256, 384).clamp(-3, 3).to(torch.float8_e4m3fn)
    exponents = torch.randint(120, 135, (2, 3), dtype=torch.uint8)
    for scale in (exponents.view(torch.float8_e8m0fnu), torch.rand(2, 3).to(torch.bfloat16)):
        tensors = {
            "model.layers.0.mlp.down_proj.weight": weight,
            "model.layers.0.mlp.down_proj.weight_scale_inv": scale,
        }
        root = tmp_path / str(scale.dtype)
        config = {"model_type": "qwen3_moe", "quantization_config": QUANTIZATION | {"scale_fmt": "ue8m0"}}
        write_checkpoint(root, tensors, config=config)
        convert(root, tmp_path / f"{scale.dtype}-out", dequantize=True)
        ours = load_checkpoint(tmp_path / f"{scale.dtype}-out")["model.layers.0.mlp.down_proj.weight"]
        assert torch.equal(ours, dequantize_blocks(weight, scale.float()))


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"),
    [("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2), ("F8_E8M0", torch.float8_e8m0fnu)],
)
def test_every_code_decodes_as_torch_decodes_it(dtype, torch_dtype):
    from fusemoe_ckpt.plan.dequantize import decode

    codes = torch.arange(256, dtype=torch.uint8)
    theirs = codes.view(torch_dtype).float()
    ours = torch.from_numpy(decode(bytes(codes.tolist()), dtype).copy())
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours[~ours.isnan()].view(torch.int32), theirs[~theirs.isnan()].view(torch.int32))


@pytest.mark.parametrize("output", ["BF16", "F16", "F32"])
def test_rounding_is_torchs(output):
    """float32 products rounded to the output dtype exactly as `.to()` rounds them: ties to even,
    overflow to inf, subnormals, signed zeros."""
    from fusemoe_ckpt.plan.dequantize import _encode

    generator = torch.Generator().manual_seed(0)
    values = torch.randn(1 << 16, generator=generator) * torch.logspace(-45, 38, 1 << 16)
    values[:6] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 3.4e38, 1.0 + 2**-8])
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[output]
    assert bytes(_encode(values.numpy(), output)) == values.to(dtype).view(torch.uint8).numpy().tobytes()


def test_load_check_asks_an_fp8_output_for_its_scales(tmp_path):
    """--load-check builds the model through transformers' FP8 quantizer: a fused FP8 output without
    its expert scales is missing keys the model has."""
    from safetensors.torch import load_file, save_file

    src = fp8_checkpoint(tmp_path / "src", "qwen3_moe", shards=1)
    dst = tmp_path / "dst"
    convert(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    scale = "model.layers.0.mlp.experts.gate_up_proj_scale_inv"
    shard = dst / index["weight_map"].pop(scale)
    tensors = load_file(shard)
    del tensors[scale]
    save_file(tensors, shard, metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    problems = verify(src, dst, load_check=True).problems
    assert "Qwen3MoeForCausalLM has it but DST does not" in " ".join(problems[scale])


def test_batch_entry_dequantizes_and_then_skips(tmp_path):
    """A manifest entry with "dequantize": true converts dequantized, and a re-run skips it as finished."""
    src = tiny_fp8_source(tmp_path)
    manifest = tmp_path / "zoo.jsonl"
    manifest.write_text(json.dumps({"src": str(src), "dst": "out", "dequantize": True}) + "\n")
    first = CliRunner().invoke(cli, ["batch", str(manifest)])
    assert first.exit_code == 0, first.output
    assert load_checkpoint(tmp_path / "out")["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    again = CliRunner().invoke(cli, ["batch", str(manifest)])
    assert again.exit_code == 0 and "1 skipped" in again.output
    manifest.write_text(json.dumps({"src": str(src), "dst": "out"}) + "\n")
    changed = CliRunner().invoke(cli, ["batch", str(manifest)])
    assert changed.exit_code == 1
    assert "family/dtype/dequantized qwen2_moe/None/True recorded, qwen2_moe/None/False planned" in changed.output


@pytest.mark.parametrize("scale_shape", [(), (1,), (256,), (256, 1)], ids=["scalar", "one", "rows", "rows-by-one"])
def test_per_tensor_and_per_channel_scales_dequantize(tmp_path, scale_shape):
    """Without weight_block_size a scale covers the whole matrix or one row: q[i, j] * s (or s[i])."""
    weight = torch.randn(256, 384).clamp(-3, 3).to(torch.float8_e4m3fn)
    scale = torch.rand(scale_shape) + 0.5
    tensors = {"model.layers.0.mlp.down_proj.weight": weight, "model.layers.0.mlp.down_proj.weight_scale_inv": scale}
    config = {"model_type": "qwen3_moe", "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}
    src = write_checkpoint(tmp_path / "src", tensors, config=config)
    convert(src, tmp_path / "bf16", dequantize=True)
    ours = load_checkpoint(tmp_path / "bf16")["model.layers.0.mlp.down_proj.weight"]
    expected = (weight.float() * scale.float().reshape(-1, 1)).to(torch.bfloat16)
    assert torch.equal(ours, expected)
    assert verify(src, tmp_path / "bf16").ok
