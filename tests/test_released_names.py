"""deepseek_v4 (and kimi_k25) from sources under the key names of their released checkpoints, checked
against transformers 5.24 itself: the same keys, dtypes, shapes and bytes as what it holds (on its
GPU path for the FP8/FP4 checkpoint), strict accelerate dispatch with nothing left on meta, and the
same logits as `from_pretrained(source)`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from accelerate import init_empty_weights, load_checkpoint_and_dispatch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText  # noqa: E402

from fusemoe_ckpt import convert, inspect_checkpoint, unfuse, verify  # noqa: E402

from .conftest import load_checkpoint  # noqa: E402
from .fp8_models import (  # noqa: E402
    capable_gpu,
    fp8_model_on_meta,
    held_by_transformers,
    load_checkpoint_or_file,
    use_reference_kernel,
)
from .released_models import (  # noqa: E402
    KIMI_VISION_HEADS,
    dsv4_checkpoint,
    dsv4_fp8_checkpoint,
    kimi_checkpoint,
)
from .test_bad_input import refuse  # noqa: E402


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """The same keys, and for each the same dtype, shape and bytes."""
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert (ours[key].dtype, ours[key].shape) == (theirs[key].dtype, theirs[key].shape), key
        assert torch.equal(ours[key].reshape(-1).view(torch.uint8), theirs[key].reshape(-1).view(torch.uint8)), key


def _logits(model, tokens):
    with torch.no_grad():
        return model.eval()(tokens).logits


@pytest.fixture(scope="module")
def dsv4(tmp_path_factory):
    """(released-name source, our conversion, convert's result) of a tiny float32 DeepSeek-V4."""
    root = tmp_path_factory.mktemp("dsv4")
    src = dsv4_checkpoint(root / "src")
    result = convert(src, root / "ours", max_shard_size="30KB")
    return src, root / "ours", result


def test_dsv4_released_names_give_what_transformers_holds(dsv4, tmp_path):
    src, ours, result = dsv4
    assert any(
        key.startswith("layers.0.attn.wq_a")
        for key in json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    )
    theirs = held_by_transformers(src, tmp_path / "theirs", gpu_path=False)
    assert_same_tensors(load_checkpoint(ours), theirs)
    assert len(result.plan.shards) > 1


def test_dsv4_drops_the_mtp_layer_and_says_so(dsv4):
    src, ours, result = dsv4
    mtp = sorted(
        k for k in json.loads((src / "model.safetensors.index.json").read_text())["weight_map"] if k.startswith("mtp.")
    )
    assert mtp and result.plan.dropped == mtp
    assert f", {len(mtp)} tensors dropped that transformers ignores at load ((^|\\.)mtp\\..*)" in result.summary()
    assert not [k for k in load_checkpoint(ours) if "mtp" in k]


def test_dsv4_strict_dispatch_and_logits(dsv4):
    src, ours, _ = dsv4
    config = AutoConfig.from_pretrained(ours)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = load_checkpoint_and_dispatch(model, str(ours), device_map={"": "cpu"}, strict=True)
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tokens = torch.arange(10).unsqueeze(0)
    assert torch.equal(_logits(model, tokens), _logits(reference, tokens))
    assert verify(src, ours, load_check=True).problems == {}


def test_dsv4_unfuse_gives_transformers_own_original_format_and_converts_back(dsv4, tmp_path):
    """unfuse(convert(x)) is what transformers saves in the original format after loading x (its own
    names: `model.layers.N.attn…`, `head.weight`, `model.norm.weight`), and converting that again
    gives convert(x) byte for byte: the renames taken back (`model.norm.weight`) are taken back here."""
    src, ours, _ = dsv4
    unfuse(ours, tmp_path / "back", max_shard_size="25KB")
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(tmp_path / "theirs")
    assert_same_tensors(load_checkpoint(tmp_path / "back"), load_checkpoint_or_file(tmp_path / "theirs"))
    assert "model.norm.weight" in load_checkpoint(tmp_path / "back")
    (tmp_path / "back" / "config.json").write_text((src / "config.json").read_text())
    convert(tmp_path / "back", tmp_path / "again")
    assert_same_tensors(load_checkpoint(tmp_path / "again"), load_checkpoint(ours))


@pytest.fixture(scope="module")
def dsv4_fp8(tmp_path_factory):
    """(source as released: FP8 linears, FP4 experts, E8M0 `.scale`s; our conversion) of a tiny DeepSeek-V4."""
    root = tmp_path_factory.mktemp("dsv4_fp8")
    src = dsv4_fp8_checkpoint(root / "src")
    result = convert(src, root / "ours", max_shard_size="60KB")
    return src, root / "ours", result


def test_dsv4_fp8_fp4_is_what_transformers_holds_on_its_gpu_path(dsv4_fp8, tmp_path):
    """FP4 experts fuse by concatenation with their per-row E8M0 scales: gate_up_proj I8 [E, 2I, H/2]
    with gate_up_proj_scale_inv F8_E8M0 [E, 2I, H/32], down_proj I8 [E, H, I/2] with [E, H, I/32];
    FP8 linears keep F8_E4M3 weights with their `.scale` renamed weight_scale_inv; BF16 norms are
    held in float32 and the F32 router weight in bfloat16, as transformers holds them."""
    src, ours, result = dsv4_fp8
    theirs = held_by_transformers(src, tmp_path / "theirs", gpu_path=True)
    fused = load_checkpoint(ours)
    assert_same_tensors(fused, theirs)
    experts = "model.layers.1.mlp.experts"
    shapes = {
        name: (fused[f"{experts}.{name}"].dtype, tuple(fused[f"{experts}.{name}"].shape))
        for name in ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv")
    }
    assert shapes == {
        "gate_up_proj": (torch.int8, (4, 128, 32)),
        "gate_up_proj_scale_inv": (torch.float8_e8m0fnu, (4, 128, 2)),
        "down_proj": (torch.int8, (4, 64, 32)),
        "down_proj_scale_inv": (torch.float8_e8m0fnu, (4, 64, 2)),
    }
    assert fused["model.layers.1.self_attn.q_a_proj.weight"].dtype == torch.float8_e4m3fn
    assert fused["model.layers.1.self_attn.q_a_proj.weight_scale_inv"].dtype == torch.float8_e8m0fnu
    assert fused["model.layers.1.input_layernorm.weight"].dtype == torch.float32
    assert fused["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert "fp8 weights and scales fused" in result.summary()
    assert (ours / "config.json").read_text() == (src / "config.json").read_text()


def test_dsv4_fp8_fp4_strict_dispatch_and_logits(dsv4_fp8):
    """The FP8 skeleton takes the output with strict dispatch; every parameter and buffer equals
    from_pretrained(original) on the GPU path (accelerate holds the I32 hash table in the buffer's
    int64, with the same values), and the logits through a reference FP8/FP4 kernel are equal."""
    src, ours, _ = dsv4_fp8
    use_reference_kernel()
    with capable_gpu():
        model = fp8_model_on_meta(ours)
        model = load_checkpoint_and_dispatch(model, str(ours), device_map={"": "cpu"}, strict=True)
        reference = AutoModelForCausalLM.from_pretrained(src, device_map="cpu")
    mine = dict(model.named_parameters()) | dict(model.named_buffers())
    theirs = dict(reference.named_parameters()) | dict(reference.named_buffers())
    assert sorted(mine) == sorted(theirs)
    assert not [name for name, tensor in mine.items() if tensor.device.type == "meta"]
    for name, tensor in theirs.items():
        got = mine[name].data.to(tensor.dtype) if name.endswith(".tid2eid") else mine[name].data
        assert (got.dtype, got.shape) == (tensor.dtype, tensor.shape), name
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.data.reshape(-1).view(torch.uint8)), name
    tokens = torch.arange(1, 9).unsqueeze(0)
    assert torch.equal(_logits(model, tokens), _logits(reference, tokens))


def test_dsv4_fp8_fp4_verify_and_unfuse_round_trip(dsv4_fp8, tmp_path):
    """verify proves the fused FP4/FP8 output; unfuse gives per-expert FP4 weights and their scales
    (under transformers' scale name, weight_scale_inv), which convert back to the same bytes."""
    src, ours, _ = dsv4_fp8
    with capable_gpu():
        assert verify(src, ours, load_check=True).problems == {}
    unfuse(ours, tmp_path / "back")
    back = load_checkpoint(tmp_path / "back")
    original = load_checkpoint(src)
    expert = "model.layers.1.ffn.experts.3"
    assert torch.equal(back[f"{expert}.w3.weight"], original["layers.1.ffn.experts.3.w3.weight"])
    assert torch.equal(
        back[f"{expert}.w3.weight_scale_inv"].view(torch.uint8),
        original["layers.1.ffn.experts.3.w3.scale"].view(torch.uint8),
    )
    convert(tmp_path / "back", tmp_path / "again")
    assert_same_tensors(load_checkpoint(tmp_path / "again"), load_checkpoint(ours))


def test_dsv4_fp4_experts_are_not_dequantized(dsv4_fp8, tmp_path):
    src, _, _ = dsv4_fp8
    message = refuse(tmp_path, src, tmp_path / "dst", "--dequantize")
    assert re.fullmatch(r"layers\.\d+\.ffn\.experts\.\d+\.w\d\.weight: FP4 experts cannot be dequantized .*", message)


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """(released-name source, our conversion) of a tiny float32 Kimi-K2.5 whose config.json leaves the
    vision head count to transformers' default, as the released one does."""
    root = tmp_path_factory.mktemp("kimi")
    src = kimi_checkpoint(root / "src")
    convert(src, root / "ours", max_shard_size="40KB")
    return src, root / "ours"


def test_kimi_released_names_give_what_transformers_holds(kimi, tmp_path):
    """Group renames (norm0/norm1 -> norm1/norm2, fc0/fc1 -> fc1/fc2), wqkv split into q/k/v with the
    q and k rows permuted per head (16 heads, the config class default), the prefix, the experts."""
    src, ours = kimi
    reference = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
    reference.save_pretrained(tmp_path / "theirs", save_original_format=False)
    fused = load_checkpoint(ours)
    assert_same_tensors(fused, load_checkpoint_or_file(tmp_path / "theirs"))
    original = load_checkpoint(src)
    wqkv = original["vision_tower.encoder.blocks.1.wqkv.weight"]
    q = fused["model.vision_tower.layers.1.attn.q_proj.weight"]
    half = q.shape[0] // KIMI_VISION_HEADS // 2
    assert torch.equal(q[1], wqkv[2]) and torch.equal(q[half], wqkv[1])  # within a head: even rows, then odd
    assert torch.equal(fused["model.vision_tower.layers.1.attn.v_proj.weight"], wqkv[2 * q.shape[0] :])
    assert torch.equal(
        fused["model.vision_tower.layers.1.norm2.weight"], original["vision_tower.encoder.blocks.1.norm1.weight"]
    )


def test_kimi_strict_dispatch_and_logits(kimi):
    src, ours = kimi
    config = AutoConfig.from_pretrained(ours)
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model = load_checkpoint_and_dispatch(model, str(ours), device_map={"": "cpu"}, strict=True)
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    reference = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
    tokens = torch.arange(10).unsqueeze(0)
    assert torch.equal(_logits(model, tokens), _logits(reference, tokens))
    assert verify(src, ours, load_check=True).problems == {}


def test_kimi_unfuse_gives_transformers_own_original_format_and_converts_back(kimi, tmp_path):
    """unfuse joins q/k/v into wqkv (rows put back in interleaved order) and undoes the group renames,
    giving what transformers saves in the original format (`language_model.model.blocks.N…`, its
    own reverse of `blocks` -> `layers`); converting that again gives the same bytes."""
    src, ours = kimi
    unfuse(ours, tmp_path / "back", max_shard_size="25KB")
    AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).save_pretrained(tmp_path / "theirs")
    back = load_checkpoint(tmp_path / "back")
    assert_same_tensors(back, load_checkpoint_or_file(tmp_path / "theirs"))
    assert torch.equal(
        back["vision_tower.encoder.blocks.1.wqkv.weight"],
        load_checkpoint(src)["vision_tower.encoder.blocks.1.wqkv.weight"],
    )
    (tmp_path / "back" / "config.json").write_text((src / "config.json").read_text())
    convert(tmp_path / "back", tmp_path / "again")
    assert_same_tensors(load_checkpoint(tmp_path / "again"), load_checkpoint(ours))


def _copy_source(src: Path, dst: Path, *, edit_tensors=None, edit_config=None) -> Path:
    """A copy of `src` with its tensors or its config.json edited."""
    from .conftest import write_checkpoint

    tensors = load_checkpoint(src)
    config = json.loads((src / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    return write_checkpoint(dst, tensors, shards=2, config=config)


def _pop(*keys):
    return lambda tensors: [tensors.pop(key) for key in keys]


def _heads(value):
    return lambda config: config["vision_config"].__setitem__("num_attention_heads", value)


@pytest.mark.parametrize(
    ("edit_tensors", "edit_config", "message"),
    [
        (
            _pop("vision_tower.encoder.blocks.1.norm0.weight", "vision_tower.encoder.blocks.1.norm0.bias"),
            None,
            r"vision_tower\.encoder\.blocks\.1\.norm0\.bias: missing: the key that tells transformers to rename "
            r"vision_tower\.encoder\.blocks\.1\.norm1\.bias \(.*\.safetensors\); other blocks have theirs",
        ),
        (
            None,
            _heads(3),
            r"vision_tower\.encoder\.blocks\.0\.wqkv\.bias: its 64 rows of attn\.q_proj do not divide into 3 heads "
            r"\(vision_config\.num_attention_heads\) of rotary pairs \(.*\.safetensors\)",
        ),
        (None, _heads(0), r"config\.json: vision_config\.num_attention_heads 0 is not a positive integer"),
        (
            lambda t: t.__setitem__("vision_tower.encoder.blocks.0.wqkv.bias", torch.zeros(190)),
            None,
            r"vision_tower\.encoder\.blocks\.0\.wqkv\.bias: shape \[190\] does not split into 3 equal parts on dim 0 "
            r"\(.*\.safetensors\)",
        ),
        (
            None,
            lambda c: c.__setitem__(
                "quantization_config", {"quant_method": "compressed-tensors", "format": "pack-quantized"}
            ),
            r".*config\.json: quantization_config\.config_groups is not an object of config groups",
        ),
    ],
    ids=[
        "missing-guard",
        "heads-do-not-divide",
        "heads-not-positive",
        "qkv-rows-not-divisible",
        "compressed-tensors-without-groups",
    ],
)
def test_bad_kimi_input_is_refused_in_one_line(kimi, tmp_path, edit_tensors, edit_config, message):
    src = _copy_source(kimi[0], tmp_path / "src", edit_tensors=edit_tensors, edit_config=edit_config)
    assert re.fullmatch(message, refuse(tmp_path, src, tmp_path / "dst"))


def _fp4_scale_as_f32(tensors):
    key = "layers.1.ffn.experts.2.w3.scale"
    tensors[key] = tensors[key].float()


def _fp4_experts_as_fp8(tensors):
    for key in [k for k in tensors if k.startswith("layers.2.ffn.experts.") and k.endswith(".weight")]:
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] * 2, dtype=torch.float8_e4m3fn)
        tensors[key.removesuffix(".weight") + ".scale"] = torch.ones(1, 1).to(torch.float8_e8m0fnu)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _fp4_scale_as_f32,
            r"layers\.1\.ffn\.experts\.2\.w3\.scale: dtype F32, but transformers holds the scales of FP4 experts as "
            r"F8_E8M0 \(scale_fmt ue8m0\) \(.*\.safetensors\)",
        ),
        (
            _fp4_experts_as_fp8,
            r"layers\.2\.ffn\.experts\.0\.w1\.weight: F8_E4M3 experts, but quantization_config's expert_dtype 'fp4' "
            r"makes transformers hold model\.layers\.2\.mlp\.experts\.gate_up_proj as I8 \(FP4 packed\)",
        ),
        (
            _pop("layers.1.ffn.experts.3.w2.scale"),
            r"layers\.1\.ffn\.experts\.3\.w2\.scale: missing: "
            r"the scale of I8 tensor layers\.1\.ffn\.experts\.3\.w2\.weight .*",
        ),
    ],
    ids=["fp4-scale-dtype", "fp8-experts-declared-fp4", "missing-fp4-scale"],
)
def test_bad_dsv4_fp8_input_is_refused_in_one_line(dsv4_fp8, tmp_path, edit, message):
    src = _copy_source(dsv4_fp8[0], tmp_path / "src", edit_tensors=edit)
    assert re.fullmatch(message, refuse(tmp_path, src, tmp_path / "dst"))


def test_dsv4_fp8_fp4_inspect(dsv4_fp8):
    """inspect counts the ignored mtp tensors and gives FP4 experts in values, not packed bytes."""
    src, _, result = dsv4_fp8
    report = inspect_checkpoint(src).to_json()
    assert report["ignored_tensors"] == len(result.plan.dropped) > 0
    assert report["quantization"]["expert_dtype"] == "fp4"
    assert report["quantization"]["dropped_tensors"] == 0
    module = next(m for m in report["moe_modules"] if m["module"] == "model.layers.1.mlp.experts")
    assert (module["experts"], module["intermediate_size"], module["hidden_size"], module["dtype"]) == (4, 64, 64, "I8")
    assert module["quantization"] == {"dtype": "I8", "scale_dtype": "F8_E8M0", "block": [1, 32], "dequantized": False}


@pytest.mark.parametrize("case", ["dsv4", "dsv4_fp8", "kimi"])
def test_a_converted_checkpoint_converts_to_itself(case, request, tmp_path):
    """Already in transformers' names, a fused output is copied through: `model.norm.weight` (and the
    hyper-connection scales `attn_hc.scale`) keep their names, as transformers takes those renames back."""
    ours = request.getfixturevalue(case)[1]
    result = convert(ours, tmp_path / "again")
    assert result.nothing_to_fuse
    assert_same_tensors(load_checkpoint(tmp_path / "again"), load_checkpoint(ours))
