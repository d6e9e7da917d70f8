"""The family table: which keys are routed experts and how transformers 5 renames them.

Each entry is data copied from transformers' `conversion_mapping.py`; adding a family is adding one
entry here. `tests/test_family_sync.py` compares this table with the installed transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FamilyError
from .patterns import ExpertMerge, Rename, map_key


@dataclass(frozen=True)
class Family:
    """One conversion rule and the model types (or architecture class names) that use it."""

    name: str
    model_types: tuple[str, ...]
    merges: tuple[ExpertMerge, ...]
    renames: tuple[Rename, ...] = ()

    @property
    def source_patterns(self) -> tuple[str, ...]:
        return tuple(source for merge in self.merges for source in merge.sources)

    def all_renames(self) -> tuple[Rename, ...]:
        # transformers appends its "legacy" renamings to every model's own list.
        return self.renames + LEGACY_RENAMES

    def map_key(self, key: str):
        return map_key(key, self.all_renames(), self.merges)


LEGACY_RENAMES = (
    Rename(("LayerNorm.gamma",), "LayerNorm.weight"),
    Rename(("LayerNorm.beta",), "LayerNorm.bias"),
    Rename((".weight_g",), ".parametrizations.weight.original0"),
    Rename((".weight_v",), ".parametrizations.weight.original1"),
    Rename((r"^model\.language_model\.model", r"^language_model\.model\.model"), "model.language_model"),
)


def _gated(prefix: str, gate: str, up: str, down: str, *, dot: str = "") -> tuple[ExpertMerge, ...]:
    """The usual pair: gate and up stacked and concatenated into gate_up_proj, down stacked."""
    return (
        ExpertMerge(
            (f"{dot}{prefix}.*.{gate}.weight", f"{dot}{prefix}.*.{up}.weight"),
            f"{dot}{prefix}.gate_up_proj",
        ),
        ExpertMerge((f"{dot}{prefix}.*.{down}.weight",), f"{dot}{prefix}.down_proj"),
    )


QWEN2_MOE_TYPES = (
    "qwen2_moe",
    "afmoe",
    "beam",
    "cohere2_moe",
    "deepseek_v2",
    "deepseek_v3",
    "deepseek_v32",
    "dots1",
    "flex_olmo",
    "glm4_moe",
    "glm4_moe_lite",
    "glm4v_moe",
    "glm_moe_dsa",
    "hunyuan_v1_moe",
    "longcat_flash",
    "mellum",
    "olmoe",
    "qwen3_moe",
    "qwen3_next",
    "qwen3_omni_moe",
    "qwen3_omni_moe_text",
    "qwen3_omni_moe_thinker",
    "sarvam_mla",
    "solar_open",
    "Dots3NoteTextModel",
    "UnlimitedOcrTextModel",
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="qwen2_moe",
        model_types=QWEN2_MOE_TYPES,
        merges=_gated("mlp.experts", "gate_proj", "up_proj", "down_proj"),
    ),
    Family(
        name="ernie4_5_moe",
        model_types=("ernie4_5_moe",),
        merges=_gated("mlp.experts", "gate_proj", "up_proj", "down_proj"),
        renames=(
            Rename(
                ("mlp.moe_statics.e_score_correction_bias",),
                "mlp.gate.moe_statics.e_score_correction_bias",
            ),
        ),
    ),
    Family(
        name="exaone_moe",
        model_types=("exaone_moe",),
        merges=_gated("mlp.experts", "gate_proj", "up_proj", "down_proj"),
        renames=(Rename(("mlp.e_score_correction_bias",), "mlp.gate.e_score_correction_bias"),),
    ),
    Family(
        name="mixtral",
        model_types=("mixtral", "minimax"),
        renames=(Rename((".block_sparse_moe.",), ".mlp."),),
        merges=_gated("experts", "w1", "w3", "w2", dot="."),
    ),
    Family(
        name="phimoe",
        model_types=("phimoe",),
        renames=(
            Rename((".block_sparse_moe.",), ".mlp."),
            Rename((".gate.weight",), ".router.weight"),
        ),
        merges=_gated("experts", "w1", "w3", "w2", dot="."),
    ),
    Family(
        name="lfm2_moe",
        model_types=("lfm2_moe",),
        merges=_gated("feed_forward.experts", "w1", "w3", "w2"),
    ),
    Family(
        name="jamba",
        model_types=("jamba",),
        merges=_gated("feed_forward.experts", "gate_proj", "up_proj", "down_proj"),
    ),
)

FAMILIES_BY_NAME = {family.name: family for family in FAMILIES}


def family_by_name(name: str) -> Family:
    try:
        return FAMILIES_BY_NAME[name]
    except KeyError:
        known = ", ".join(sorted(FAMILIES_BY_NAME))
        raise FamilyError(f"unknown family {name!r}; known families: {known}") from None


def family_for_config(config: dict | None) -> Family | None:
    """The family for a config.json: an architecture class name first, then `model_type`."""
    if not config:
        return None
    candidates = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    candidates.append(config.get("model_type"))
    for candidate in candidates:
        for family in FAMILIES:
            if candidate in family.model_types:
                return family
    return None


def families_matching(keys) -> list[str]:
    """Names of the families whose expert patterns match at least one of `keys`."""
    keys = list(keys)
    return [family.name for family in FAMILIES if any(family.map_key(key).merge is not None for key in keys)]
