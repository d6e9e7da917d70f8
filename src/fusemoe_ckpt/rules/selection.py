"""Choose the family rule of a source checkpoint: `--family`, else the one config.json names."""

from __future__ import annotations

from ..errors import FamilyError
from ..reading.source import SourceCheckpoint
from .families import Family, families_matching, family_by_name, family_for_config


def override_warning(source: SourceCheckpoint, family: Family) -> str | None:
    """A warning when `--family` chose `family` where config.json's model type maps to another rule
    (or to none): convert and verify then prove DST equals the plan, not that the plan is the model's."""
    config = source.config or {}
    named = family_for_config(config)
    if named is not None and named.name == family.name:
        return None
    what = f"family {named.name}" if named is not None else "no family rule"
    return (
        f"--family {family.name} overrides config.json's model_type {config.get('model_type')!r} ({what}); "
        "check the result against the model with `fusemoe-ckpt verify --load-check SRC DST`"
    )


def resolve_family(source: SourceCheckpoint, name: str | None) -> Family:
    """`--family` if given, else the family config.json names.

    Raises:
        FamilyError: config.json names no known model type; the message lists the families whose
            expert patterns match the checkpoint's keys.
    """
    if name is not None:
        return family_by_name(name)
    config = source.config or {}
    model_type = config.get("model_type")
    family = family_for_config(source.config)
    if family is not None:
        return family
    matching = families_matching(source.tensors)
    hint = (
        f"families whose expert keys match this checkpoint: {', '.join(matching)}"
        if matching
        else "no family's expert keys match this checkpoint"
    )
    # An empty config.json is there, and names no model type: not "no config.json".
    has_config = source.config is not None
    what = f"model_type {model_type!r} has no family rule" if has_config else "no config.json to choose a family"
    raise FamilyError(f"{source.root}: {what}; pass --family NAME ({hint})")
