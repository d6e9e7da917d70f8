"""nemo_speechlm (Nemotron 3.5 Transcribe) from a source under the key names of NeMo's export, checked
against transformers 5.24 itself: the same keys, dtypes, shapes and bytes as what it holds, strict
accelerate dispatch, the same logits as `from_pretrained(source)`, and the tensors it ignores at
load dropped and counted."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from accelerate import init_empty_weights, load_checkpoint_and_dispatch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForPreTraining  # noqa: E402

from fusemoe_ckpt import convert, unfuse, verify  # noqa: E402

from .conftest import load_checkpoint  # noqa: E402
from .fp8_models import load_checkpoint_or_file  # noqa: E402
from .released_models import NEMO_IGNORED, nemo_checkpoint  # noqa: E402
from .test_bad_input import refuse  # noqa: E402
from .test_released_names import assert_same_tensors  # noqa: E402

EXPERTS = "model.language_model.layers.2.mixer.experts"


@pytest.fixture(scope="module")
def nemo(tmp_path_factory):
    """(released-name source, our conversion, convert's result) of a tiny Nemotron 3.5 Transcribe."""
    root = tmp_path_factory.mktemp("nemo")
    src = nemo_checkpoint(root / "src")
    result = convert(src, root / "ours", max_shard_size="20KB")
    return src, root / "ours", result


def _held(src, out):
    model = AutoModelForPreTraining.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(out, save_original_format=False)
    return load_checkpoint_or_file(out)


def test_nemo_released_names_give_what_transformers_holds(nemo, tmp_path):
    """w_qkv chunked into q, k and v; the experts stored (in, out) transposed to transformers'
    up_proj [E, I, H] and down_proj [E, H, I]; ~40 renames: every key and byte as transformers holds."""
    src, ours, result = nemo
    theirs = _held(src, tmp_path / "theirs")
    fused = load_checkpoint(ours)
    assert_same_tensors(fused, theirs)
    stored = load_checkpoint(src)["llm.model.layers.2.mixer.experts.gate_and_up_projs"]
    assert stored.shape == (4, 16, 8) and fused[f"{EXPERTS}.up_proj"].shape == (4, 8, 16)
    assert torch.equal(fused[f"{EXPERTS}.up_proj"], stored.transpose(1, 2))
    assert len(result.plan.shards) > 1
    # One MoE layer: the q/k/v splits of the encoders are no fused expert modules.
    assert result.plan.fused_modules == ["model.language_model.layers.2.mixer.experts"]
    assert result.summary().startswith("1 layers fused, 4 experts, 8 tensors dropped")


def test_nemo_drops_what_transformers_ignores_and_says_so(nemo):
    """The MTP head, feature-extractor constants, the unused speaker head, TransformerEngine
    `_extra_state` and the word-timestamp constants: dropped, each named in the plan, counted in the summary."""
    src, ours, result = nemo
    dropped = sorted(name for name, _, _ in NEMO_IGNORED)
    assert sorted(result.plan.dropped) == dropped
    assert f", {len(dropped)} tensors dropped that transformers ignores at load (" in result.summary()
    assert not set(load_checkpoint(ours)) & {name for name in dropped}


def test_nemo_strict_dispatch_and_logits(nemo):
    src, ours, _ = nemo
    config = AutoConfig.from_pretrained(ours)
    with init_empty_weights():
        model = AutoModelForPreTraining.from_config(config, dtype=torch.float32)
    model = load_checkpoint_and_dispatch(model, str(ours), device_map={"": "cpu"}, strict=True)
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    reference = AutoModelForPreTraining.from_pretrained(src, dtype=torch.float32)
    tokens = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        ours_logits, their_logits = model.eval()(tokens).logits, reference.eval()(tokens).logits
    assert torch.equal(ours_logits, their_logits)
    assert verify(src, ours, load_check=True).problems == {}


def test_nemo_unfuse_gives_transformers_own_original_format_and_converts_back(nemo, tmp_path):
    """unfuse(convert(x)) is what transformers saves in the original format after loading x (w_qkv
    joined, the experts turned back to (in, out), NeMo's names), and converting it again gives
    convert(x) byte for byte."""
    src, ours, _ = nemo
    unfuse(ours, tmp_path / "back", max_shard_size="20KB")
    AutoModelForPreTraining.from_pretrained(src, dtype=torch.float32).save_pretrained(tmp_path / "theirs")
    back = load_checkpoint(tmp_path / "back")
    assert_same_tensors(back, load_checkpoint_or_file(tmp_path / "theirs"))
    assert "llm.model.layers.2.mixer.experts.gate_and_up_projs" in back
    (tmp_path / "back" / "config.json").write_text((src / "config.json").read_text())
    convert(tmp_path / "back", tmp_path / "again")
    assert_same_tensors(load_checkpoint(tmp_path / "again"), load_checkpoint(ours))


def _one_file_source(tmp_path, tensors):
    src = tmp_path / "src"
    src.mkdir()
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "nemo_speechlm"}))
    return src


def test_nemo_qkv_rows_that_do_not_divide_are_refused(tmp_path):
    key = "perception.encoder.asr_encoder.layers.0.attn.w_qkv.weight"
    src = _one_file_source(tmp_path, {key: torch.zeros(16, 4)})
    message = refuse(tmp_path, src, tmp_path / "dst")
    assert message == f"{key}: shape [16, 4] does not split into 3 equal parts on dim 0 ({src / 'model.safetensors'})"


def test_nemo_experts_that_are_not_3d_are_refused(tmp_path):
    key = "llm.model.layers.2.mixer.experts.down_projs"
    src = _one_file_source(tmp_path, {key: torch.zeros(4, 8)})
    message = refuse(tmp_path, src, tmp_path / "dst")
    file = src / "model.safetensors"
    assert message == f"{key}: expected a fused [experts, rows, cols] tensor to transpose, got [4, 8] ({file})"


def test_transpose_reads_large_experts_in_bounded_bands(nemo, tmp_path, monkeypatch):
    """An expert matrix larger than the read chunk is turned in bands of output rows, each a strided
    read of the same columns of every stored row: every band within the chunk, the bytes those of
    the whole transpose, and convert (with a chunk smaller than one expert) still what transformers holds."""
    import os

    from fusemoe_ckpt.plan.pieces import Piece
    from fusemoe_ckpt.write import streams

    matrix = torch.arange(7 * 5, dtype=torch.float32).reshape(7, 5)
    path = tmp_path / "matrix.bin"
    path.write_bytes(b"pad" + matrix.numpy().tobytes())
    piece = Piece(path, 3, matrix.nbytes, transpose=(7, 5))
    fd = os.open(path, os.O_RDONLY)
    try:
        bands = list(streams.piece_chunks(fd, piece, chunk=7 * 4 * 2))
    finally:
        os.close(fd)
    assert [len(band) for band in bands] == [56, 56, 28]
    assert b"".join(bands) == matrix.T.contiguous().numpy().tobytes()

    src, ours, _ = nemo
    monkeypatch.setattr(streams, "READ_CHUNK", 64)  # one stored expert matrix is 16 x 8 x 4 = 512 bytes
    convert(src, tmp_path / "banded", max_shard_size="20KB")
    assert_same_tensors(load_checkpoint(tmp_path / "banded"), load_checkpoint(ours))
