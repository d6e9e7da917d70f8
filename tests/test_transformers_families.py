"""End to end against transformers itself: tiny random models of each family, saved per-expert,
converted, and compared with what transformers writes and loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from accelerate import init_empty_weights, load_checkpoint_and_dispatch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from fusemoe_ckpt import convert  # noqa: E402
from fusemoe_ckpt.commands.unfuse import unfuse  # noqa: E402
from fusemoe_ckpt.commands.verify import verify  # noqa: E402
from fusemoe_ckpt.errors import FamilyError  # noqa: E402
from fusemoe_ckpt.rules.families import FAMILIES, family_for_config  # noqa: E402

from .conftest import load_checkpoint  # noqa: E402
from .key_variants import assert_maps_alike, number_variants  # noqa: E402
from .tiny_models import AUTO_CLASS, BASE, FULL_KWARGS, TINY_MODELS  # noqa: E402

# Checkpoints of these model types store fused experts in the other orientation: we write that
# layout ourselves, since transformers saves the in-memory one.
TRANSPOSED = {"qwen3_vl_moe"}
# A model transformers did not load from a checkpoint saves nemo_speechlm's experts per expert (its
# Nemotron-H language model's rule reversed); unfuse gives NeMo's fused (in, out) layout, which is
# what transformers saves after loading a released checkpoint (tests/test_nemo_speechlm.py).
UNFUSED_AS_RELEASED = {"nemo_speechlm"}


def _auto_class(model_type: str):
    return getattr(transformers, AUTO_CLASS.get(model_type, "AutoModelForCausalLM"))


def _tiny_model(model_type: str):
    torch.manual_seed(0)
    kwargs = TINY_MODELS[model_type] if model_type in FULL_KWARGS else BASE | TINY_MODELS[model_type]
    config = AutoConfig.for_model(model_type, **kwargs)
    return _auto_class(model_type).from_config(config, dtype=torch.float32).eval()


def _output(model, input_ids):
    with torch.no_grad():
        out = model(input_ids=input_ids)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") and not hasattr(out, "logits") else out.logits


def _store_transposed(root: Path) -> None:
    """Rewrite a saved checkpoint with its fused experts as [E, H, 2I] and [E, I, H]."""
    for shard in root.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in tensors:
            if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                tensors[name] = tensors[name].transpose(1, 2).contiguous()
        save_file(tensors, shard, metadata={"format": "pt"})


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def family_case(request, tmp_path_factory):
    """(model_type, original per-expert dir, transformers' fused dir, our converted dir)."""
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    model = _tiny_model(model_type)
    original, reference, ours = root / "original", root / "reference", root / "ours"
    model.save_pretrained(original, max_shard_size="20KB")
    if model_type in TRANSPOSED:
        _store_transposed(original)
    model.save_pretrained(reference, save_original_format=False)
    convert(original, ours, max_shard_size="30KB")
    return model_type, original, reference, ours


def _keys(root: Path) -> list[str]:
    return list(json.loads((root / "model.safetensors.index.json").read_text())["weight_map"])


def _reference_tensors(root: Path) -> dict[str, torch.Tensor]:
    if (root / "model.safetensors.index.json").exists():
        return load_checkpoint(root)
    with safe_open(root / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator


def test_original_is_per_expert_and_sharded(family_case):
    model_type, original, reference, _ = family_case
    keys = _keys(original)
    if model_type in TRANSPOSED:
        stored, expected = load_checkpoint(original), _reference_tensors(reference)
        turned = [k for k in stored if stored[k].shape != expected[k].shape]
        assert turned and all(stored[k].shape == expected[k].transpose(1, 2).shape for k in turned)
    else:
        assert any(".experts.0." in k for k in keys), "the tiny model must be saved per expert"
    assert len(set(json.loads((original / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1


def test_tensors_equal_transformers_fused_save(family_case):
    """Same keys, dtypes, shapes and bytes as save_pretrained(save_original_format=False)."""
    _, _, reference, ours = family_case
    expected = _reference_tensors(reference)
    actual = load_checkpoint(ours)
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        got = actual[name]
        assert (got.dtype, got.shape) == (tensor.dtype, tensor.shape), name
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_strict_dispatch_and_logits(family_case):
    """Strict accelerate dispatch leaves nothing on meta, and logits equal from_pretrained(original)."""
    model_type, original, _, ours = family_case
    auto_class = _auto_class(model_type)
    config = AutoConfig.from_pretrained(ours)
    with init_empty_weights():
        model = auto_class.from_config(config, dtype=torch.float32)
    model.tie_weights()
    model = load_checkpoint_and_dispatch(model, str(ours), device_map={"": "cpu"}, strict=True).eval()
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    assert on_meta == []

    reference = auto_class.from_pretrained(original, dtype=torch.float32).eval()
    vocab = getattr(config, "vocab_size", None) or config.get_text_config().vocab_size
    input_ids = torch.arange(10).unsqueeze(0) % vocab
    assert torch.equal(_output(model, input_ids), _output(reference, input_ids)), model_type


def test_verify_and_load_check_pass(family_case):
    """verify proves every byte against the plan, and the meta model of the config wants exactly DST's keys."""
    _, original, _, ours = family_case
    result = verify(original, ours, load_check=True)
    assert result.problems == {}
    assert result.tensors_checked == len(_keys(ours))


def test_unfuse_gives_back_transformers_own_per_expert_save(family_case, tmp_path):
    """unfuse(convert(x)) == x where x is what save_pretrained writes in the original format: the same
    keys, dtypes, shapes and bytes (qwen3_vl_moe: turned back to its stored orientation)."""
    model_type, original, _, ours = family_case
    unfuse(ours, tmp_path / "back", max_shard_size="25KB")
    if model_type in UNFUSED_AS_RELEASED:
        # What transformers saves depends on the rule it loaded with; unfuse gives the released layout.
        (tmp_path / "back" / "config.json").write_text((original / "config.json").read_text())
        convert(tmp_path / "back", tmp_path / "again")
        again, fused = load_checkpoint(tmp_path / "again"), load_checkpoint(ours)
        assert sorted(again) == sorted(fused)
        assert all(
            torch.equal(again[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
            for k, v in fused.items()
        )
        return
    expected, actual = load_checkpoint(original), load_checkpoint(tmp_path / "back")
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        got = actual[name]
        assert (got.dtype, got.shape) == (tensor.dtype, tensor.shape), name
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_load_check_names_what_the_per_expert_layout_lacks(tmp_path):
    """The check that passes on every converted model fails on the original layout, key by key."""
    from fusemoe_ckpt import open_checkpoint
    from fusemoe_ckpt.commands.load_check import load_check_problems

    model = _tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "original")
    shapes = {k: t.shape for k, t in open_checkpoint(tmp_path / "original").tensors.items()}
    problems = dict(load_check_problems(tmp_path / "original", shapes))
    assert {k for k in problems if ".experts." in k} == {k for k in shapes if ".experts." in k} | {
        f"model.layers.{layer}.mlp.experts.{name}" for layer in range(2) for name in ("gate_up_proj", "down_proj")
    }
    assert problems["model.layers.0.mlp.experts.gate_up_proj"] == (
        "Qwen3MoeForCausalLM has it but DST does not: dispatch would leave it on meta"
    )
    assert problems["model.layers.0.mlp.experts.3.up_proj.weight"] == (
        "not in Qwen3MoeForCausalLM built from DST's config (strict dispatch refuses it)"
    )
    assert not [k for k in problems if ".experts." not in k]


def test_original_layout_fails_strict_dispatch(tmp_path):
    """The problem this tool solves: exact-key loading cannot take the per-expert layout."""
    model = _tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "original")
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    with pytest.raises((AttributeError, RuntimeError, KeyError, ValueError)):
        load_checkpoint_and_dispatch(empty, str(tmp_path / "original"), device_map={"": "cpu"}, strict=True)


def test_builtin_example_loads_through_accelerate(tmp_path):
    """The README's demo: the built-in example, converted, loads strictly and matches from_pretrained."""
    import subprocess
    import sys

    from fusemoe_ckpt.commands.example import write_example

    write_example(tmp_path / "tiny")
    convert(tmp_path / "tiny", tmp_path / "fused")
    script = Path(__file__).parent.parent / "examples" / "load_with_accelerate.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "fused"), str(tmp_path / "tiny")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "none on meta" in result.stdout
    assert f"logits equal to from_pretrained({tmp_path / 'tiny'}): True" in result.stdout


# Model types whose renames would spoil keys already in transformers' names (`ModelKeys.kept`):
# laguna's `mlp.shared_expert.` also hits `mlp.shared_experts.`, deepseek_ocr2's `(^|model\.)layers\.`
# hits `model.language_model.layers.`, mistral_large4_text's `\.gate\.` hits `mlp.gate.`, axk1's
# `post_mlp_layernorm` hits `mlp.post_mlp_layernorm`. glm5_next's take-backs are FP8-only: test_model_keys
# checks them, with the FP8 quantizer's renames, key for key against transformers.
TAKEN_BACK = ["axk1", "deepseek_ocr2", "laguna", "mistral_large4_text"]


@pytest.mark.parametrize("model_type", TAKEN_BACK)
def test_transformers_own_layout_converts_to_itself(model_type, tmp_path):
    """A checkpoint already in transformers' in-memory names converts to exactly what transformers
    holds from it: the renames it takes back are taken back, not applied (they used to spoil
    `model.layers.N.mlp.shared_experts.*` of laguna into `mlp.shared_experts..*`, say)."""
    model = _tiny_model(model_type)
    reference, ours = tmp_path / "reference", tmp_path / "ours"
    model.save_pretrained(reference, save_original_format=False, max_shard_size="20KB")
    convert(reference, ours, max_shard_size="30KB")
    expected, actual = load_checkpoint(reference), load_checkpoint(ours)
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        got = actual[name]
        assert (got.dtype, got.shape) == (tensor.dtype, tensor.shape), name
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    # and transformers loads ours as it loads its own save.
    theirs = _auto_class(model_type).from_pretrained(reference, dtype=torch.float32).state_dict()
    held = _auto_class(model_type).from_pretrained(ours, dtype=torch.float32).state_dict()
    assert sorted(held) == sorted(theirs)
    assert all(torch.equal(held[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            {"num_key_value_heads": 2},
            r"model\.layers\.0\.attention\.query_key_value\.(weight|bias): shape \[32(, 16)?\] does not split into "
            r"\[16, 16, 16\] rows \(num_attention_heads x head_dim \+ num_key_value_heads x head_dim \+ "
            r"num_key_value_heads x head_dim of config\.json\) on dim 0 \(.*original/model-\d+-of-\d+\.safetensors\)$",
        ),
        ({"head_dim": "8"}, r"config\.json: head_dim '8' is not a positive integer"),
    ],
    ids=["rows-do-not-add-up", "head-dim-not-an-int"],
)
def test_sarvam_split_sizes_that_do_not_fit_are_refused(tmp_path, edit, message):
    """The q/k/v sizes come from config.json: where they do not add up to the fused rows, convert
    refuses, naming the key, its shape, the sizes and the file, and writes nothing."""
    original = tmp_path / "original"
    _tiny_model("sarvam_moe").save_pretrained(original, max_shard_size="20KB")
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps(config | edit))
    with pytest.raises(FamilyError, match=message):
        convert(original, tmp_path / "ours")
    assert not (tmp_path / "ours" / "model.safetensors.index.json").exists()


def test_qwen4_exp_drops_the_mtp_and_vision_tensors_transformers_ignores(tmp_path):
    """`mtp.*` and `model.visual.*` (released beside the text model) are dropped, as transformers
    ignores them at load; the rest is exactly transformers' fused save."""
    model = _tiny_model("qwen4_exp_text")
    original, reference, ours = tmp_path / "original", tmp_path / "reference", tmp_path / "ours"
    model.save_pretrained(original, max_shard_size="20KB")
    model.save_pretrained(reference, save_original_format=False)
    extra = {
        "mtp.layers.0.mlp.gate.weight": torch.ones(4, 16),
        "model.visual.blocks.0.attn.qkv.weight": torch.ones(8, 4),
    }
    save_file(extra, original / "extra.safetensors", metadata={"format": "pt"})
    index = json.loads((original / "model.safetensors.index.json").read_text())
    index["weight_map"] |= dict.fromkeys(extra, "extra.safetensors")
    (original / "model.safetensors.index.json").write_text(json.dumps(index))
    result = convert(original, ours, max_shard_size="30KB")
    assert sorted(result.plan.dropped) == sorted(extra)
    assert "2 tensors dropped that transformers ignores at load (^model.visual.*, ^mtp.*)" in result.summary()
    expected, actual = _reference_tensors(reference), load_checkpoint(ours)
    assert sorted(actual) == sorted(expected)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        (
            2,
            r"ngram_embedding\.shard_2\.weight: shard 2 of .*ngram_embedding\.weight, but config\.json declares "
            r"split_ngram_parts 2 \(.*original/model.*\.safetensors\)$",
        ),
        (8, r"ngram_embedding\.weight: shard 4 of 8 \(split_ngram_parts of config\.json\) is missing"),
    ],
    ids=["shard-past-the-count", "shard-missing"],
)
def test_qwen4_exp_shards_that_do_not_match_the_config_are_refused(tmp_path, parts, message):
    original = tmp_path / "original"
    _tiny_model("qwen4_exp_text").save_pretrained(original, max_shard_size="20KB")
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps(config | {"split_ngram_parts": parts}))
    with pytest.raises(FamilyError, match=message):
        convert(original, tmp_path / "ours")


def test_keys_map_alike_by_template(family_case):
    """Mapping keys once per template (numbers put back) gives what mapping each key gives: for the
    model's family over its keys with other numbers, and for every family over its keys."""
    model_type, original, reference, _ = family_case
    keys = _keys(original) + list(_reference_tensors(reference))
    family = family_for_config(json.loads((original / "config.json").read_text()))
    assert family is not None, model_type
    assert_maps_alike(number_variants(keys), family)
    for family in FAMILIES:
        assert_maps_alike(keys, family)
