"""dots3_note (the whole dots.note model) and dots3_note_vision_encoder (its vision encoder alone) from
sources under the released key names, checked against transformers 5.24 itself: inside the whole
model the vision encoder's rule is scoped to `model.vision_tower`, the text model's expert merge to
`model.language_model` and the audio encoder's renames to `model.audio_tower`; every key and byte is
what transformers holds, strict accelerate dispatch loads it, outputs are equal, and the
multi-token-prediction layer transformers ignores is dropped and counted."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from accelerate import init_empty_weights, load_checkpoint_and_dispatch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForImageTextToText,
    Dots3NoteForConditionalGeneration,
    Dots3NoteVisionModel,
)

from fusemoe_ckpt import convert, unfuse, verify  # noqa: E402
from fusemoe_ckpt.cli import cli  # noqa: E402

from .conftest import load_checkpoint  # noqa: E402
from .fp8_models import load_checkpoint_or_file  # noqa: E402
from .released_models import (  # noqa: E402
    DOTS3_TEXT_EXPERTS,
    DOTS3_VISION_EXPERTS_COUNT,
    dots3_checkpoint,
    dots3_vision_checkpoint,
)
from .test_bad_input import refuse  # noqa: E402
from .test_released_names import assert_same_tensors  # noqa: E402


def _held(model_class, src, out):
    model = model_class.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(out, save_original_format=False)
    return load_checkpoint_or_file(out)


def _dispatched(model_class, ours):
    config = AutoConfig.from_pretrained(ours)
    with init_empty_weights():
        model = model_class._from_config(config, dtype=torch.float32)
    model = load_checkpoint_and_dispatch(model, str(ours), device_map={"": "cpu"}, strict=True)
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    return model.eval()


@pytest.fixture(scope="module")
def dots3(tmp_path_factory):
    """(released-name source, our conversion, convert's result) of a tiny dots.note."""
    root = tmp_path_factory.mktemp("dots3")
    src = dots3_checkpoint(root / "src")
    result = convert(src, root / "ours", max_shard_size="30KB")
    return src, root / "ours", result


def test_dots3_note_released_names_give_what_transformers_holds(dots3, tmp_path):
    """The text experts fused under `model.language_model`, the vision experts (fc1/fc3/fc2, three of
    them where the text model has four) under `model.vision_tower`, and every rename of the root,
    Dots3NoteModel, vision and audio rules: every key and byte as transformers holds them."""
    src, ours, result = dots3
    theirs = _held(AutoModelForImageTextToText, src, tmp_path / "theirs")
    fused = load_checkpoint(ours)
    assert_same_tensors(fused, theirs)
    assert fused["model.language_model.layers.1.mlp.experts.gate_up_proj"].shape[0] == DOTS3_TEXT_EXPERTS
    assert fused["model.vision_tower.blocks.1.mlp.experts.gate_up_proj"].shape[0] == DOTS3_VISION_EXPERTS_COUNT
    assert sorted(result.plan.fused_modules) == [
        "model.language_model.layers.1.mlp.experts",
        "model.vision_tower.blocks.1.mlp.experts",
    ]
    assert len(result.plan.shards) > 1


def test_dots3_note_drops_the_mtp_layer_and_says_so(dots3):
    src, ours, result = dots3
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = sorted(k for k in weight_map if k.startswith("model.layers.46."))
    assert mtp and sorted(result.plan.dropped) == mtp
    assert f", {len(mtp)} tensors dropped that transformers ignores at load (" in result.summary()
    assert not [k for k in load_checkpoint(ours) if ".layers.46." in k]


def test_dots3_note_strict_dispatch_and_logits(dots3):
    src, ours, _ = dots3
    model = _dispatched(Dots3NoteForConditionalGeneration, ours)
    reference = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    tokens = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)
    assert verify(src, ours, load_check=True).problems == {}


def test_dots3_note_converts_from_config_json_without_a_warning(dots3, tmp_path):
    """config.json's model_type names the dots3_note rule: no --family, no hint, no override warning."""
    src, _, _ = dots3
    result = CliRunner().invoke(cli, ["convert", "-q", str(src), str(tmp_path / "out")])
    assert (result.exit_code, result.stderr) == (0, "")


def test_dots3_note_unfuse_converts_back(dots3, tmp_path):
    """unfuse(convert(x)) is what transformers saves in the original format after loading x, and
    converting it again gives convert(x) byte for byte."""
    src, ours, _ = dots3
    unfuse(ours, tmp_path / "back", max_shard_size="30KB")
    AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).save_pretrained(tmp_path / "theirs")
    back = load_checkpoint(tmp_path / "back")
    assert_same_tensors(back, load_checkpoint_or_file(tmp_path / "theirs"))
    (tmp_path / "back" / "config.json").write_text((src / "config.json").read_text())
    convert(tmp_path / "back", tmp_path / "again")
    assert_same_tensors(load_checkpoint(tmp_path / "again"), load_checkpoint(ours))


def test_dots3_note_vision_experts_beyond_vision_config_are_refused(tmp_path):
    """The vision encoder's experts are counted by vision_config, not by the text model's count."""
    src = dots3_checkpoint(tmp_path / "src", shards=1)
    config = json.loads((src / "config.json").read_text())
    config["vision_config"]["num_local_experts"] = 2
    (src / "config.json").write_text(json.dumps(config))
    message = refuse(tmp_path, src, tmp_path / "dst")
    assert message == "the checkpoint has expert 2, but config.json's vision_config declares 2 experts"


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    root = tmp_path_factory.mktemp("dots3_vision")
    src = dots3_vision_checkpoint(root / "src")
    convert(src, root / "ours", max_shard_size="10KB")
    return src, root / "ours"


def test_dots3_note_vision_encoder_alone_gives_what_transformers_holds(vision, tmp_path):
    src, ours = vision
    assert_same_tensors(load_checkpoint(ours), _held(Dots3NoteVisionModel, src, tmp_path / "theirs"))
    model = _dispatched(Dots3NoteVisionModel, ours)
    reference = Dots3NoteVisionModel.from_pretrained(src, dtype=torch.float32).eval()
    pixels = torch.arange(16 * 12, dtype=torch.float32).reshape(16, 12) / 100
    grid = torch.tensor([[1, 4, 4]])
    with torch.no_grad():
        ours_out, theirs_out = model(pixels, grid), reference(pixels, grid)
    assert torch.equal(ours_out.last_hidden_state, theirs_out.last_hidden_state)
    assert torch.equal(ours_out.pooler_output, theirs_out.pooler_output)
    assert verify(src, ours, load_check=True).problems == {}


def test_dots3_note_vision_encoder_unfuse_converts_back(vision, tmp_path):
    src, ours = vision
    unfuse(ours, tmp_path / "back")
    assert_same_tensors(load_checkpoint(tmp_path / "back"), load_checkpoint(src))


def test_dots3_note_scale_twins_keep_their_scope():
    """transformers' FP8 quantizer copies each expert merge with its scope: the vision encoder's scale
    twin fuses only under `model.vision_tower.`."""
    from fusemoe_ckpt.reading.quantization_records import Quantization
    from fusemoe_ckpt.rules.families import family_by_name
    from fusemoe_ckpt.rules.quantized import for_quantization

    rule = for_quantization(family_by_name("dots3_note"), Quantization("fp8", (128, 128), "float", "dynamic"))
    scale = "vision_encoder.blocks.1.mlp.experts.0.fc1.weight_scale_inv"
    assert rule.map_key(scale).target == "model.vision_tower.blocks.1.mlp.experts.gate_up_proj_scale_inv"
    assert rule.map_key("model.layers.1.mlp.experts.0.fc1.weight_scale_inv").converter is None
