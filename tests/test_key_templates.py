"""Mapping keys once per template: which patterns cannot tell numbers apart, which families map by
template, and that the mappings equal those of each key (tests/test_transformers_families.py checks
the same over every tiny model's keys)."""

from __future__ import annotations

import pytest

import fusemoe_ckpt.rules.key_templates as key_templates
from fusemoe_ckpt.rules.families import FAMILIES, Family, family_by_name
from fusemoe_ckpt.rules.key_templates import _NotBlind, check_pattern, map_keys, number_blind
from fusemoe_ckpt.rules.model_keys import ModelKeys
from fusemoe_ckpt.rules.patterns import ExpertMerge, GroupRename, Rename, _alternation

from .key_variants import assert_maps_alike, number_variants

# Families whose patterns name a number (`proj.0`, `neck.0`, `decoder_layers.0`): their keys are
# mapped one by one.
NOT_BLIND = {"deepseek_ocr2", "dots3_note", "kimi_k25", "nemo_speechlm"}


def test_families_that_cannot_map_by_template_are_those_whose_patterns_name_numbers():
    refused = {f.name: number_blind(f.all_renames(), f.converters, f.model) for f in FAMILIES}
    assert {name for name, reason in refused.items() if reason} == NOT_BLIND
    assert "'(?P<s0>sam_model\\\\.neck\\\\.0\\\\.)'" in refused["deepseek_ocr2"]


@pytest.mark.parametrize(
    "pattern",
    [
        r"\.experts.*\.w1.weight(?!\w)",  # `.` and `1` beside letters match no number
        r"^model\.(.+)",  # anchored: ends on a number only at the key's start
        r"(blocks\.\d+)\.norm_1\.",
        r"(^|model\.)layers\.",
        r"layers\.\d+\.mlp\.(gate\.weight|experts\.(gate_up_proj|down_proj)(_scale_inv)?)",
        r"a[^.]*\.b",
    ],
)
def test_patterns_blind_to_numbers(pattern):
    check_pattern(_alternation((pattern,), expert_groups=True).pattern)


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"layers\.45\.", "names a number"),
        (r"layers\.\d\.", "one digit: 7 but not 10"),
        (r"layers\.\d{2}\.", "a bounded repeat"),
        (r"layers\..\.", "any one character between dots"),
        (r"layers\.(\d+)\.x\.\1\.", "a backreference"),
        (r"(?<=\.)\d+\.x", "a lookbehind"),
        (r"\d+\.x", "could start inside a number"),
        (r"x\.\d+?", "a lazy repeat at the end"),
        (r"x\.\d*\d*\.", "two repeats over one number"),
        (r"(?i)layers\.", "a flag"),
        (r"x\b", "a word boundary"),
    ],
)
def test_patterns_that_could_tell_numbers_apart_are_refused(pattern, why):
    with pytest.raises(_NotBlind):
        check_pattern(pattern)


def test_a_replacement_that_could_land_elsewhere_is_left_to_each_key():
    # transformers replaces the first occurrence of the matched text: with 5 and 5, the `.5.b` of
    # `a.5.b_x` (no match there: `_` follows), with 5 and 6 the one matched. Read with every number
    # as one sign, `.#.b` occurs before the match: the template cannot vouch, each key maps itself.
    family = Family("t", ("t",), converters=(), renames=(Rename((r"\.\d+\.b",), ".c"),))
    keys = ["a.5.b_x.5.b", "a.5.b_x.6.b", "a.7.b_x.7.b", "a.5.c_x.5.b"]
    assert [m.target for m in map_keys(keys, family.renames, (), ModelKeys()).values()] == [
        "a.c_x.5.b",
        "a.5.b_x.c",
        "a.c_x.7.b",
        "a.5.c_x.c",
    ]
    assert_maps_alike(keys, family, renames=family.renames)
    args = (family.renames, (), ModelKeys(), frozenset())
    assert key_templates._recipe(("a", ".b_x", ".b"), 2, args) is None
    assert key_templates._recipe(("a", ".c_x", ".b"), 2, args) == ("a.{0}.c_x.c", None, 0, None)


def test_a_number_glued_to_a_name_is_left_to_each_key():
    # `x.5` renamed to `y5`: the number would no longer be a component of its own, which a later
    # pattern with a pinned digit (`y5\.`) could tell apart.
    family = Family("t", ("t",), converters=(), renames=(Rename((r"x\.",), "y"), Rename((r"y5\.",), "five.")))
    keys = number_variants(["a.x.5.w", "a.x.6.w"])
    assert number_blind(family.renames, (), ModelKeys()) is None
    assert map_keys(["a.x.5.w"], family.renames, (), ModelKeys())["a.x.5.w"].target == "a.five.w"
    assert_maps_alike(keys, family, renames=family.renames)


def test_numbers_copied_by_a_rename_and_expert_ids_come_back():
    merge = ExpertMerge(("mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"), "mlp.experts.gate_up_proj")
    family = Family(
        "t",
        ("t",),
        converters=(merge,),
        renames=(Rename((r"(blocks\.\d+)\.norm_1\.",), r"\1.norm1."),),
        model=ModelKeys(prefix="model", kept=(r"model\.layers\.\d+\.kept\..*",)),
    )
    keys = number_variants(
        [
            "layers.3.mlp.experts.3.gate_proj.weight",
            "layers.3.mlp.experts.12.up_proj.weight",
            "vision.blocks.2.norm_1.weight",
            "model.layers.4.kept.norm_1.weight",
            "0.weight",
            "w1.layers.2.x",
        ]
    )
    assert number_blind(family.renames, family.converters, family.model) is None
    mapped = map_keys(keys, family.renames, family.converters, family.model)
    fused = mapped["layers.123456.mlp.experts.007.gate_proj.weight"]
    assert (fused.target, fused.slot, fused.expert) == ("model.layers.123456.mlp.experts.gate_up_proj", 0, "007")
    assert mapped["vision.blocks.10.norm_1.weight"].target == "model.vision.blocks.10.norm1.weight"
    assert_maps_alike(keys, family, renames=family.renames)


def test_a_family_that_names_numbers_maps_each_key():
    family = family_by_name("kimi_k25")
    keys = number_variants(
        ["mm_projector.proj.0.weight", "mm_projector.proj.2.weight", "language_model.model.layers.0.x"]
    )
    assert number_blind(family.all_renames(), family.converters, family.model) is not None
    assert_maps_alike(keys, family)


def test_group_renames_map_alike():
    group = GroupRename((r"(blocks\.\d+)\.norm0", r"(blocks\.\d+)\.norm1"), (r"\1.norm1", r"\1.norm2"))
    family = Family("t", ("t",), converters=(), renames=(group,))
    keys = number_variants(["blocks.0.norm0.weight", "blocks.0.norm1.weight", "blocks.1.norm0.weight"])
    assert number_blind(family.renames, (), ModelKeys()) is None
    assert_maps_alike(keys, family, renames=family.renames)
