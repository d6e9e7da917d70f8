"""deepseek_v4 (and kimi_k25) from sources under the key names of their released checkpoints, checked
against transformers 5.24 itself: the same keys, dtypes, shapes and bytes as what it holds (on its
GPU path for the FP8/FP4 checkpoint), strict accelerate dispatch with nothing left on meta, and the
same logits as `from_pretrained(source)`."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from accelerate import init_empty_weights, load_checkpoint_and_dispatch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from fusemoe_ckpt import convert, unfuse, verify  # noqa: E402

from .conftest import load_checkpoint  # noqa: E402
from .fp8_models import (  # noqa: E402
    capable_gpu,
    fp8_model_on_meta,
    held_by_transformers,
    load_checkpoint_or_file,
    use_reference_kernel,
)
from .released_models import dsv4_checkpoint, dsv4_fp8_checkpoint  # noqa: E402
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
