"""What transformers decides by looking at the model it loads into, derived here from its meta model
and compared with the static `ModelKeys` of each family that has them: the base-model prefix it adds,
the renames it takes back (a key already in the model's names that the renames would take out of
the model), the keys it ignores at load, the modules it holds in float32, and the head count
`PermuteForRope` falls back to. Each is derived with and without the FP8 quantizer (whose `.scale`
rename adds take-backs), through transformers' own `rename_source_key`."""

from __future__ import annotations

import copy
import re

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from accelerate import init_empty_weights  # noqa: E402
from transformers import AutoConfig  # noqa: E402
from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: E402
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key  # noqa: E402
from transformers.quantizers.auto import AutoHfQuantizer  # noqa: E402

from fusemoe_ckpt.reading.quantization_records import Quantization  # noqa: E402
from fusemoe_ckpt.rules.families import FAMILIES, family_for_config  # noqa: E402
from fusemoe_ckpt.rules.model_keys import ModelKeys  # noqa: E402
from fusemoe_ckpt.rules.patterns import ChunkForRope  # noqa: E402
from fusemoe_ckpt.rules.quantized import for_quantization  # noqa: E402

from .fp8_models import capable_gpu  # noqa: E402
from .tiny_models import AUTO_CLASS, BASE, FULL_KWARGS, TESTED_ELSEWHERE, TINY_MODELS  # noqa: E402

FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
# Every model type whose family has model facts: each must be end-to-end tested too.
WITH_MODEL_KEYS = sorted(t for f in FAMILIES if f.model != ModelKeys() for t in f.model_types)


# transformers' FP8 quantizer cannot build Nemotron-H's experts (its config has no hidden_act), so a
# quantized nemo_speechlm is no model transformers loads: its facts are derived unquantized only.
NO_FP8_MODEL = {"nemo_speechlm"}
CASES = [
    pytest.param(t, q, id=f"{t}-{'fp8' if q else 'bf16'}")
    for t in WITH_MODEL_KEYS
    for q in (False, True)
    if not (q and t in NO_FP8_MODEL)
]


def test_every_family_with_model_keys_is_covered():
    assert WITH_MODEL_KEYS == [
        "axk1",
        "deepseek_ocr2",
        "deepseek_v4",
        "dots3_note",
        "dots3_note_vision_encoder",
        "glm5_next",
        "glm5_next_text",
        "kimi_k25",
        "laguna",
        "mistral_large4_text",
        "nemo_speechlm",
        "qwen4_exp_text",
    ]
    assert set(WITH_MODEL_KEYS) <= set(TINY_MODELS) | set(TESTED_ELSEWHERE)


def _meta_model(model_type: str, quantized: bool):
    """transformers' model of the tiny config on the meta device, FP8-quantized as on a capable GPU."""
    if model_type == "dots3_note_vision_encoder":  # the vision encoder alone, as dots3_note's holds it
        kwargs = copy.deepcopy(TINY_MODELS["dots3_note"]["vision_config"])
    else:
        kwargs = copy.deepcopy(TINY_MODELS[model_type] if model_type in FULL_KWARGS else BASE | TINY_MODELS[model_type])
    if quantized:
        kwargs["quantization_config"] = FP8
    config = AutoConfig.for_model(model_type, **kwargs)
    with init_empty_weights():
        if model_type == "dots3_note_vision_encoder":
            model = transformers.Dots3NoteVisionModel._from_config(config)
        else:
            model = getattr(transformers, AUTO_CLASS.get(model_type, "AutoModelForCausalLM")).from_config(config)
    quantizer = None
    if quantized:
        quantizer = AutoHfQuantizer.from_config(config.quantization_config, pre_quantized=True)
        quantizer.preprocess_model(model)
    return model, quantizer


def _transformers_names(model, quantizer, keys) -> tuple[dict[str, str], set[str]]:
    """For each checkpoint key, the name transformers loads it under (`convert_and_load_state_dict_in_model`:
    renames, converters, base-model prefix, and the rename taken back when it leaves the model); and
    the keys whose rename it took back."""
    mapping = get_model_conversion_mapping(model, hf_quantizer=quantizer)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    prefix = model.base_model_prefix
    names, taken_back = {}, set()
    for key in sorted(keys):
        renamed, _ = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:
            renamed, _ = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
            taken_back.add(key)
        names[key] = renamed
    return names, taken_back


@pytest.mark.parametrize(("model_type", "quantized"), CASES)
def test_renames_taken_back_are_the_static_table(model_type, quantized):
    """The model's keys that transformers keeps as they are because the renames would take them out of
    the model are among those `ModelKeys.kept` matches (`model.norm.weight` for deepseek_v4, and with
    the FP8 quantizer's `.scale` rename also the hyper-connection scales), and every other key the
    table keeps is one transformers loads under its own name anyway: one table serves both."""
    family = family_for_config({"model_type": model_type})
    with capable_gpu():
        model, quantizer = _meta_model(model_type, quantized)
    meta = model.state_dict()
    names, taken_back = _transformers_names(model, quantizer, meta)
    kept = {key for key in meta if family.model.keeps(key)}
    assert taken_back <= kept
    assert all(names[key] == key for key in kept)
    if model_type == "deepseek_v4":
        assert "model.norm.weight" in taken_back
        assert any(key.endswith("attn_hc.scale") for key in taken_back) == quantized


@pytest.mark.parametrize(("model_type", "quantized"), CASES)
def test_model_keys_and_their_prefixless_names_map_as_transformers_maps_them(model_type, quantized):
    """Every key of the model, and the same key without the base-model prefix, is loaded by
    transformers under the name fusemoe-ckpt maps it to: the prefix is added where (and only where)
    transformers adds it by looking at the model, and taken-back renames stay taken back."""
    family = family_for_config({"model_type": model_type})
    quantization = Quantization("fp8", (128, 128), "float", "dynamic") if quantized else None
    rule = for_quantization(family, quantization, rename_scales=True)
    with capable_gpu():
        model, quantizer = _meta_model(model_type, quantized)
    meta = model.state_dict()
    prefix = family.model.prefix + "."
    keys = set(meta) | {key.removeprefix(prefix) for key in meta}
    names, _ = _transformers_names(model, quantizer, keys)
    ours = {key: rule.map_key(key).target for key in keys}
    assert {k: v for k, v in ours.items() if names[k] in meta} == {k: v for k, v in names.items() if v in meta}


@pytest.mark.parametrize("model_type", WITH_MODEL_KEYS)
def test_model_class_facts(model_type):
    """The base-model prefix and the head modules outside it, the keys ignored at load (and no key of
    the model among them, so dropping what they match drops only what transformers drops), the
    modules held in float32, and the head-count default of PermuteForRope's sub-config."""
    family = family_for_config({"model_type": model_type})
    model, _ = _meta_model(model_type, quantized=False)
    assert model.base_model_prefix == family.model.prefix
    assert sorted(name for name, _ in model.named_children() if name != model.base_model_prefix) == sorted(
        family.model.head
    )
    # transformers ignores only unexpected keys: a pattern that matches keys the model has (axk1's
    # `mlp\.post_mlp_layernorm`, of its dense layers only) is no static fact, and is not applied.
    unexpected_only = [
        p
        for p in model._keys_to_ignore_on_load_unexpected or []
        if not any(re.search(p, k) for k in model.state_dict())
    ]
    assert sorted(unexpected_only) == sorted(family.model.ignored)
    assert not [key for key in model.state_dict() if family.model.ignores(key)]
    assert sorted(model._keep_in_fp32_modules_strict or []) == sorted(family.model.keep_in_fp32)
    for converter in family.converters:
        if isinstance(converter, ChunkForRope) and converter.rope:
            sub_config = getattr(model.config, converter.rope_config)
            assert type(sub_config)().num_attention_heads == converter.default_heads
            assert re.fullmatch(r"\w+", converter.rope_config)
