"""The family table against the installed transformers' conversion mapping.

When transformers adds a model type that merges experts, or changes the rule of one we know, a test
here fails and names the model type: no model type whose rule touches experts is refused. A whole
model whose sub-models bring their own rules (transformers scopes each to its module path) is
compared with the list transformers builds for its model.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import transformers  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from transformers.conversion_mapping import (  # noqa: E402
    _build_checkpoint_conversion_mapping,
    get_model_conversion_mapping,
)
from transformers.core_model_loading import (  # noqa: E402
    Chunk,
    GroupWeightRename,
    MergeModulelist,
    PermuteForRope,
    Transpose,
    WeightConverter,
    WeightRenaming,
)

from fusemoe_ckpt.rules.families import FAMILIES, LEGACY_RENAMES, Family, family_for_config  # noqa: E402
from fusemoe_ckpt.rules.patterns import (  # noqa: E402
    ChunkForRope,
    ConcatenateShards,
    GroupRename,
    Scope,
    SplitBySize,
)

from .released_models import dots3_config, nemo_config  # noqa: E402

MAPPING = _build_checkpoint_conversion_mapping()


def _touches_experts(transforms) -> bool:
    """A rule that stacks per-expert tensors, or turns fused experts around."""
    for t in transforms:
        if not isinstance(t, WeightConverter):
            continue
        if any(isinstance(op, MergeModulelist) for op in t.operations):
            return True
        if any(isinstance(op, Transpose) for op in t.operations) and "experts" in str(t._original_source_patterns):
            return True
    return False


# Whole models whose families hold their sub-models' scoped rules: (config builder, auto class).
WHOLE_MODELS = {
    "dots3_note": (dots3_config, "AutoModelForImageTextToText"),
    "nemo_speechlm": (nemo_config, "AutoModelForPreTraining"),
}

EXPERT_RULES = sorted(name for name, transforms in MAPPING.items() if _touches_experts(transforms))


def _operation(converter: WeightConverter) -> str:
    """Our converter class for a transformers converter, or what makes it unsupported."""
    ops = converter.operations
    kinds = [type(op).__name__ for op in ops]
    if kinds == ["MergeModulelist"] and ops[0].dim == 0:
        return "ExpertMerge"
    if kinds == ["MergeModulelist", "Concatenate"] and (ops[0].dim, ops[1].dim) == (0, 1):
        return "ExpertMerge"
    wildcard = any("*" in s for s in converter._original_source_patterns)
    if kinds == ["Concatenate"] and ops[0].dim == 0 and not wildcard:
        return "Concatenate"
    if kinds == ["Concatenate"] and ops[0].dim == 0 and wildcard and ops[0].num_shards_attribute:
        return f"ConcatenateShards(count_field={ops[0].num_shards_attribute!r})"
    if len(ops) == 1 and isinstance(ops[0], Transpose) and (ops[0].dim0, ops[0].dim1) == (1, 2):
        return "TransposeExperts" if ops[0].check_dims else "Transpose"
    if (
        kinds == ["Chunk"]
        and (ops[0].dim, ops[0].num_shards_attribute) == (0, None)
        and len(converter._original_source_patterns) == 1
    ):
        return "Chunk"
    if (
        kinds == ["Chunk", "PermuteForRope"]
        and isinstance(ops[0], Chunk)
        and (ops[0].dim, ops[0].num_shards_attribute) == (0, None)
        and isinstance(ops[1], PermuteForRope)
        and not ops[1].inverse
        and len(converter._original_source_patterns) == 1
    ):
        rope = ops[1]
        return f"ChunkForRope(rope={tuple(rope.permute_layer_names or ())}, rope_config={rope.subconfig_key!r})"
    if kinds == ["Split"] and ops[0].dim == 0 and len(converter._original_source_patterns) == 1 and not wildcard:
        return "SplitBySize"
    return "unsupported: " + " + ".join(kinds) + (" over a wildcard" if wildcard else "")


def _targets(transform) -> str | tuple[str, ...]:
    """A transform's target, or all of them where one source becomes several (a group, a chunk)."""
    targets = tuple(transform._original_target_patterns)
    return targets if isinstance(transform, GroupWeightRename) or len(targets) > 1 else targets[0]


def _transformers_rule(transforms) -> tuple[list, list]:
    renames = [
        (type(t).__name__, tuple(t._original_source_patterns), _targets(t))
        for t in transforms
        if isinstance(t, WeightRenaming)
    ]
    converters = [
        (_operation(t), tuple(t._original_source_patterns), _targets(t))
        for t in transforms
        if isinstance(t, WeightConverter)
    ]
    return renames, converters


def _our_operation(converter) -> str:
    if isinstance(converter, ConcatenateShards):
        return f"ConcatenateShards(count_field={converter.count_field!r})"
    if isinstance(converter, SplitBySize):
        return "SplitBySize"
    if isinstance(converter, ChunkForRope) and converter.rope:
        return f"ChunkForRope(rope={converter.rope}, rope_config={converter.rope_config!r})"
    return type(converter).__name__


def _our_rename(rename) -> tuple:
    if isinstance(rename, GroupRename):
        return ("GroupWeightRename", rename.sources, rename.targets)
    return ("PrefixChange" if rename.prefix_change else "WeightRenaming", rename.sources, rename.target)


def _our_rule(family: Family, scope: Scope | None = None) -> tuple[list, list]:
    """The family's transforms of one scope (by default the unscoped ones: the model type's own rule)."""
    renames = [_our_rename(r) for r in family.renames if getattr(r, "scope", None) == scope]
    converters = [
        (_our_operation(c), c.sources, c.targets if isinstance(c, ChunkForRope) else c.target)
        for c in family.converters
        if c.scope == scope
    ]
    return renames, converters


def _family_for(name: str) -> Family | None:
    return family_for_config({"model_type": name}) or family_for_config({"architectures": [name]})


def test_transformers_has_expert_rules():
    """Guards the walk itself: if it found nothing, every test below would pass vacuously."""
    assert {"qwen2_moe", "mixtral", "qwen3_vl_moe"} <= set(EXPERT_RULES)


@pytest.mark.parametrize("name", EXPERT_RULES)
def test_rule_matches_transformers(name):
    """Every model type whose transformers rule touches experts has our exact rule: none is refused."""
    renames, converters = _transformers_rule(MAPPING[name])
    family = _family_for(name)
    assert family is not None, f"{name}: transformers fuses its experts but fusemoe-ckpt has no family for it"
    assert not [c for c in converters if c[0].startswith("unsupported")], (name, converters)
    ours = _our_rule(family)
    assert ours == (renames, converters), f"{name}: rule differs from transformers"


def test_every_model_type_we_claim_has_that_rule_in_transformers():
    for family in FAMILIES:
        for name in family.model_types:
            assert name in EXPERT_RULES or name in WHOLE_MODELS, (
                f"{name} (family {family.name}) has no expert rule in transformers"
            )


def _scoped_transforms(model) -> list[tuple]:
    """transformers' list for `model` (without the legacy renames), each transform with its scope."""
    listed = []
    for t in get_model_conversion_mapping(model, add_legacy=False):
        kind = _operation(t) if isinstance(t, WeightConverter) else type(t).__name__
        scope = None if t.scope_prefix is None else (t.scope_prefix, t.base_model_prefix)
        listed.append((kind, tuple(t._original_source_patterns), _targets(t), scope))
    return listed


def _our_scoped_transforms(family: Family) -> list[tuple]:
    """Our family as the same kind of list: its renames, then its converters, each with its scope."""

    def where(t):
        scope = getattr(t, "scope", None)
        return None if scope is None else (scope.prefix, scope.base)

    renames = [(*_our_rename(r), where(r)) for r in family.renames]
    converters = [
        (_our_operation(c), c.sources, c.targets if isinstance(c, ChunkForRope) else c.target, where(c))
        for c in family.converters
    ]
    return renames + converters


@pytest.mark.parametrize("model_type", sorted(WHOLE_MODELS))
def test_whole_model_rules_match_transformers_scoped_rules(model_type):
    """A whole model's family is the list transformers builds for its model: the root rule, then each
    sub-model's rule scoped to its module path (dots3_note's text, vision and audio rules;
    nemo_speechlm's Nemotron-H language model), in transformers' order."""
    build, auto_class = WHOLE_MODELS[model_type]
    with init_empty_weights():
        model = getattr(transformers, auto_class).from_config(build())
    family = family_for_config({"model_type": model_type})
    theirs = _scoped_transforms(model)
    assert any(scope is not None for *_, scope in theirs)

    # transformers applies every renaming in list order, then the first converter that matches in
    # list order: the two sequences, each transform with its scope, are the whole semantics.
    def split(listed):
        renames = [t for t in listed if t[0] in ("WeightRenaming", "PrefixChange", "GroupWeightRename")]
        return renames, [t for t in listed if t not in renames]

    assert split(_our_scoped_transforms(family)) == split(theirs)


def test_legacy_renames_match_transformers():
    legacy = [(tuple(t._original_source_patterns), t._original_target_patterns[0]) for t in MAPPING["legacy"]]
    assert [(r.sources, r.target) for r in LEGACY_RENAMES] == legacy
