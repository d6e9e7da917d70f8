"""The family table: which keys are routed experts and how transformers 5 renames them.

Each entry is data copied from transformers' `conversion_mapping.py`; adding a family is adding one
entry here. `tests/test_family_sync.py` compares this table with the installed transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import FamilyError
from .model_keys import ModelKeys
from .patterns import (
    Chunk,
    ChunkForRope,
    Concatenate,
    ConcatenateShards,
    Converter,
    ExpertMerge,
    GroupRename,
    Rename,
    Renaming,
    Scope,
    SplitBySize,
    Transpose,
    TransposeExperts,
    map_key,
)


@dataclass(frozen=True)
class Family:
    """One conversion rule and the model types (or architecture class names) that use it.

    `renames` and `converters` are transformers' `WeightRenaming`s (and `GroupWeightRename`s) and
    `WeightConverter`s for these model types, each list in transformers' order. `model` holds what
    transformers decides from the model class (base-model prefix, renames taken back, keys ignored).
    `quantizer_renames` are the renames a quantizer puts before all others (rules/quantized.py).
    """

    name: str
    model_types: tuple[str, ...]
    converters: tuple[Converter, ...]
    renames: tuple[Renaming, ...] = ()
    model: ModelKeys = ModelKeys()
    quantizer_renames: tuple[Rename, ...] = ()

    @property
    def source_patterns(self) -> tuple[str, ...]:
        return tuple(source for converter in self.converters for source in converter.sources)

    def all_renames(self) -> tuple[Renaming, ...]:
        # transformers appends its "legacy" renamings to every model's own list; a quantizer puts its own first.
        return self.quantizer_renames + self.renames + LEGACY_RENAMES

    def map_key(self, key: str, active: frozenset[GroupRename] = frozenset()):
        return map_key(key, self.all_renames(), self.converters, self.model, active)


LEGACY_RENAMES = (
    Rename(("LayerNorm.gamma",), "LayerNorm.weight"),
    Rename(("LayerNorm.beta",), "LayerNorm.bias"),
    Rename((".weight_g",), ".parametrizations.weight.original0"),
    Rename((".weight_v",), ".parametrizations.weight.original1"),
    Rename((r"^model\.language_model\.model", r"^language_model\.model\.model"), "model.language_model"),
)


def _gated(prefix: str, gate: str, up: str, down: str) -> tuple[ExpertMerge, ...]:
    """The usual pair: gate and up stacked and concatenated into gate_up_proj, down stacked."""
    return (
        ExpertMerge((f"{prefix}.*.{gate}.weight", f"{prefix}.*.{up}.weight"), f"{prefix}.gate_up_proj"),
        ExpertMerge((f"{prefix}.*.{down}.weight",), f"{prefix}.down_proj"),
    )


def _under(scope: Scope, transforms: tuple) -> tuple:
    """A sub-model's rule as transformers applies it inside a whole model: each transform scoped to
    the sub-model's module path (`get_model_conversion_mapping`)."""
    return tuple(replace(transform, scope=scope) for transform in transforms)


QWEN2_MOE = _gated("mlp.experts", "gate_proj", "up_proj", "down_proj")
MIXTRAL_EXPERTS = _gated(".experts", "w1", "w3", "w2")
ESCAPED_W_EXPERTS = _gated(r"\.experts", "w1", "w3", "w2")  # deepseek_v4, kimi_linear, mistral_large4...
LINEAR_ATTENTION_RENAMES = (
    Rename((r"self_attn\.f_a_proj\.",), "self_attn.forget_gate.f_a_proj."),
    Rename((r"self_attn\.f_b_proj\.",), "self_attn.forget_gate.f_b_proj."),
    Rename((r"self_attn\.dt_bias",), "self_attn.forget_gate.dt_bias"),
    Rename((r"self_attn\.A_log",), "self_attn.forget_gate.A_log"),
)
GLM5_NEXT_RENAMES = (
    *LINEAR_ATTENTION_RENAMES,
    Rename(("hc_attn_fn",), "attn_hc.fn"),
    Rename(("hc_attn_base",), "attn_hc.base"),
    Rename(("hc_attn_scale",), "attn_hc.scale"),
    Rename(("hc_ffn_fn",), "ffn_hc.fn"),
    Rename(("hc_ffn_base",), "ffn_hc.base"),
    Rename(("hc_ffn_scale",), "ffn_hc.scale"),
)
GLM5_NEXT_IGNORED = (r"layers\.45\.", r"layers\.\d+\.shared_head\.")  # the multi-token-prediction layer
GLM5_NEXT_FP32 = (
    "A_log",
    "attn_hc.base",
    "attn_hc.scale",
    "conv1d",
    "dt_bias",
    "e_score_correction_bias",
    "ffn_hc.base",
    "ffn_hc.scale",
    "gate.weight",
)
NEMOTRON_H_RENAMES = (Rename(("backbone.",), "model."),)
NEMOTRON_H_EXPERTS = (
    ExpertMerge(("mixer.experts.*.up_proj.weight",), "mixer.experts.up_proj"),
    ExpertMerge(("mixer.experts.*.down_proj.weight",), "mixer.experts.down_proj"),
)
# Nemotron 3.5 Transcribe's language model is a NemotronHModel at `model.language_model`.
NEMO_LANGUAGE_MODEL = Scope("language_model", "model", config="text_config")
_DIARIZATION = r"^perception\.encoder\.diarization_model\.sortformer_modules\."
DOTS3_VISION_RENAMES = (
    Rename((r"^post_trunk_norm\.",), "norm."),
    Rename((r"^adapter\.",), "merger."),
    Rename((r"(blocks\.\d+)\.norm_1\.",), r"\1.norm1."),
    Rename((r"(blocks\.\d+)\.norm_2\.",), r"\1.norm2."),
    Rename((r"(blocks\.\d+\.mlp)\.fc1\.",), r"\1.gate_proj."),
    Rename((r"(blocks\.\d+\.mlp)\.fc2\.",), r"\1.down_proj."),
    Rename((r"(blocks\.\d+\.mlp)\.fc3\.",), r"\1.up_proj."),
    Rename((r"\.mlp\.gate_weight",), ".mlp.gate.weight"),
    Rename((r"\.mlp\.router_bias",), ".mlp.e_score_correction_bias"),
)
DOTS3_VISION_EXPERTS = (
    ExpertMerge((".mlp.experts.*.fc1.weight", ".mlp.experts.*.fc3.weight"), ".mlp.experts.gate_up_proj"),
    ExpertMerge((".mlp.experts.*.fc2.weight",), ".mlp.experts.down_proj"),
)
DOTS3_AUDIO_RENAMES = (
    Rename((r"^audio_adapter\.",), "adapter."),
    Rename((r"^adapter\.proj\.0\.",), "adapter.norm."),
    Rename((r"^adapter\.proj\.1\.",), "adapter.fc1."),
    Rename((r"^adapter\.proj\.3\.",), "adapter.fc2."),
    Rename((r"dots_encoder\.speech_encoder\.",), "speech_encoder."),
    Rename((r"speech_encoder\.(conv2d[123]|conv_out)\.",), r"speech_encoder.conv_stem.\1."),
    Rename((r"conv_stem\.conv2d1\.",), "conv_stem.convs.0."),
    Rename((r"conv_stem\.conv2d2\.",), "conv_stem.convs.1."),
    Rename((r"conv_stem\.conv2d3\.",), "conv_stem.convs.2."),
    Rename((r"(speech_encoder\.layers\.\d+\.self_attn)\.out_proj\.",), r"\1.o_proj."),
    Rename((r"\.self_attn_layer_norm\.",), ".input_layernorm."),
    Rename((r"\.final_layer_norm\.",), ".post_attention_layernorm."),
    Rename((r"(speech_encoder\.layers\.\d+)\.fc1\.",), r"\1.mlp.gate_up_proj."),
    Rename((r"(speech_encoder\.layers\.\d+)\.fc2\.",), r"\1.mlp.down_proj."),
    Rename((r"^speech_encoder\.(conv_stem|layers|layer_norm)\.",), r"\1."),
)
# Inside Dots3NoteForConditionalGeneration: Dots3NoteModel at `model` (its rule applies to every key,
# with or without `model.`), its text model, vision encoder and audio encoder, each rule scoped there.
DOTS3_MODEL = Scope("", "model")
DOTS3_TEXT = Scope("language_model", "model", config="text_config")
DOTS3_VISION = Scope("vision_tower", "model", config="vision_config")
DOTS3_AUDIO = Scope("audio_tower", "model", config="audio_config")
QKV_CONV = Concatenate(
    ("self_attn.q_conv1d.weight", "self_attn.k_conv1d.weight", "self_attn.v_conv1d.weight"),
    "self_attn.conv1d.weight",
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="qwen2_moe",
        model_types=(
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
        ),  # fmt: skip
        converters=QWEN2_MOE,
    ),
    Family(
        name="mixtral",
        model_types=("mixtral", "minimax"),
        converters=MIXTRAL_EXPERTS,
        renames=(Rename((".block_sparse_moe.",), ".mlp."),),
    ),
    Family(
        name="axk1",
        model_types=("axk1",),
        converters=QWEN2_MOE,
        renames=(Rename(("post_mlp_layernorm",), "mlp.post_mlp_layernorm"),),
        model=ModelKeys(
            prefix="model",
            head=("lm_head",),
            # The rename hits the norm already under `mlp.`: `mlp.mlp.post_mlp_layernorm`.
            kept=(r"model\.layers\.\d+\.mlp\.post_mlp_layernorm\.weight",),
            # transformers' `mlp\.post_mlp_layernorm` drops only the dense layers' norms, which the model
            # lacks; which layers are dense is the config's, so that one is not applied (the MoE layers' are kept).
            ignored=("inv_freq",),
            keep_in_fp32=("e_score_correction_bias", "gate.weight"),
        ),
    ),
    Family(
        name="axk2",
        model_types=("axk2",),
        converters=QWEN2_MOE,
        renames=(
            Rename(("W_down",), "mlp.fc1"),
            Rename(("W_up",), "mlp.fc2"),
            Rename((r"self_attn\.q_b_proj\.",), "self_attn.q_gate_proj."),
        ),
    ),
    Family(
        name="bailing_hybrid",
        model_types=("bailing_hybrid",),
        converters=(
            *QWEN2_MOE,
            Concatenate(("q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight"), "conv1d.weight"),
        ),
        renames=(
            Rename((r"^model\.word_embeddings\.",), "model.embed_tokens."),
            Rename((r"\.attention\.",), ".self_attn."),
            Rename((r"self_attn\.f_proj\.",), "self_attn.forget_gate.f_proj."),
            Rename((r"self_attn\.dt_bias",), "self_attn.forget_gate.dt_bias"),
            Rename((r"self_attn\.A_log",), "self_attn.forget_gate.A_log"),
            Rename((r"\.self_attn\.dense\.",), ".self_attn.o_proj."),
            Rename((r"\.mlp\.gate\.expert_bias",), ".mlp.gate.e_score_correction_bias"),
        ),
    ),
    Family(
        name="deepseek_ocr2",
        model_types=("deepseek_ocr2",),
        converters=QWEN2_MOE,
        renames=(
            Rename((r"sam_model\.blocks\.(\d+)\.norm1\.",), r"vision_tower.sam_encoder.layers.\1.layer_norm1."),
            Rename((r"sam_model\.blocks\.(\d+)\.norm2\.",), r"vision_tower.sam_encoder.layers.\1.layer_norm2."),
            Rename((r"sam_model\.blocks\.(\d+)\.attn\.",), r"vision_tower.sam_encoder.layers.\1.attn."),
            Rename((r"sam_model\.blocks\.(\d+)\.mlp\.",), r"vision_tower.sam_encoder.layers.\1.mlp."),
            Rename((r"sam_model\.patch_embed\.proj\.",), "vision_tower.sam_encoder.patch_embed.projection."),
            Rename((r"sam_model\.pos_embed",), "vision_tower.sam_encoder.pos_embed"),
            Rename((r"sam_model\.neck\.0\.",), "vision_tower.sam_encoder.neck.conv1."),
            Rename((r"sam_model\.neck\.1\.",), "vision_tower.sam_encoder.neck.layer_norm1."),
            Rename((r"sam_model\.neck\.2\.",), "vision_tower.sam_encoder.neck.conv2."),
            Rename((r"sam_model\.neck\.3\.",), "vision_tower.sam_encoder.neck.layer_norm2."),
            Rename((r"sam_model\.net_2\.",), "vision_tower.sam_encoder.proj.conv1."),
            Rename((r"sam_model\.net_3\.",), "vision_tower.sam_encoder.proj.conv2."),
            Rename((r"qwen2_model\.model\.model\.layers\.",), "vision_tower.vision_encoder.layers."),
            Rename((r"qwen2_model\.model\.model\.norm\.",), "vision_tower.vision_encoder.norm."),
            Rename((r"qwen2_model\.query_768\.",), "vision_tower.query_768_resolution."),
            Rename((r"qwen2_model\.query_1024\.",), "vision_tower.query_1024_resolution."),
            Rename((r"projector\.layers\.",), "multi_modal_projector."),
            Rename(("view_seperator",), "view_separator"),
            Rename((r"(^|model\.)embed_tokens\.",), r"\1language_model.embed_tokens."),
            Rename((r"(^|model\.)layers\.",), r"\1language_model.layers."),
            Rename((r"(^|model\.)norm\.",), r"\1language_model.norm."),
        ),
        model=ModelKeys(
            prefix="model",
            head=("lm_head",),
            # `(^|model\.)layers\.` also hits `model.language_model.layers.` (`language_model.` ends in
            # `model.`), and so on: the language model's own names, all but per-expert ones, are taken back.
            kept=(
                r"model\.language_model\.(embed_tokens|norm)\.weight",
                r"model\.language_model\.layers\.\d+\.(?!mlp\.experts\.\d+\.).*",
            ),
            keep_in_fp32=("gate.weight",),
        ),
    ),
    Family(
        name="ernie4_5_moe",
        model_types=("ernie4_5_moe",),
        converters=QWEN2_MOE,
        renames=(Rename(("mlp.moe_statics.e_score_correction_bias",), "mlp.gate.moe_statics.e_score_correction_bias"),),
    ),
    Family(
        name="exaone_moe",
        model_types=("exaone_moe",),
        converters=QWEN2_MOE,
        renames=(Rename(("mlp.e_score_correction_bias",), "mlp.gate.e_score_correction_bias"),),
    ),  # fmt: skip
    Family(
        name="flint",
        model_types=("flint",),
        converters=QWEN2_MOE,
        renames=(Rename(("self_attn.softmax_offset",), "self_attn.sinks"),),
    ),  # fmt: skip
    Family(
        name="glm5_next",
        model_types=("glm5_next",),
        converters=(*QWEN2_MOE, QKV_CONV),
        renames=GLM5_NEXT_RENAMES,
        model=ModelKeys(
            prefix="model",
            head=("lm_head",),
            # The FP8 quantizer's `.scale` -> `.weight_scale_inv` hits the hyper-connection scales.
            kept=(r"model\.language_model\.layers\.\d+\.(attn_hc|ffn_hc)\.scale",),
            ignored=GLM5_NEXT_IGNORED,
            keep_in_fp32=GLM5_NEXT_FP32,
        ),
    ),
    Family(
        # The text model alone (Glm5NextTextModel): its modules are the top level, no prefix is added.
        name="glm5_next_text",
        model_types=("glm5_next_text",),
        converters=(*QWEN2_MOE, QKV_CONV),
        renames=GLM5_NEXT_RENAMES,
        model=ModelKeys(
            prefix="model",
            head=("embed_tokens", "hc_head", "layers", "norm"),
            kept=(r"layers\.\d+\.(attn_hc|ffn_hc)\.scale",),
            ignored=GLM5_NEXT_IGNORED,
            keep_in_fp32=GLM5_NEXT_FP32,
        ),
    ),
    Family(
        name="hy_v3",
        model_types=("hy_v3",),
        converters=QWEN2_MOE,
        renames=(
            Rename((r"mlp\.router\.gate\.weight",), "mlp.gate.weight"),
            Rename((r"mlp\.expert_bias",), "mlp.e_score_correction_bias"),
            Rename((r"mlp\.shared_mlp\.",), "mlp.shared_experts."),
        ),
    ),
    Family(
        name="jamba",
        model_types=("jamba",),
        converters=_gated("feed_forward.experts", "gate_proj", "up_proj", "down_proj"),
    ),
    Family(
        name="kimi_linear",
        model_types=("kimi_linear",),
        converters=(QKV_CONV, *ESCAPED_W_EXPERTS),
        renames=(*LINEAR_ATTENTION_RENAMES, Rename((r"\.block_sparse_moe\.",), r"\.mlp\.")),
    ),
    Family(
        name="deepseek_v4",
        model_types=("deepseek_v4",),
        converters=ESCAPED_W_EXPERTS,
        renames=(
            Rename((r"\.attn\.",), r".self_attn."),
            Rename((r"\.ffn\.",), r".mlp."),
            Rename((r"\.indexer\.compressor\.",), r"\.compressor\.indexer\."),
            Rename((r"^embed\.weight",), "embed_tokens.weight"),
            Rename((r"^head\.weight",), "lm_head.weight"),
            Rename((r"^hc_head_fn",), "hc_head.hc_fn"),
            Rename((r"^hc_head_base",), "hc_head.hc_base"),
            Rename((r"^hc_head_scale",), "hc_head.hc_scale"),
            Rename((r"\.attn_norm\.",), r".input_layernorm."),
            Rename((r"\.ffn_norm\.",), r".post_attention_layernorm."),
            Rename((r"\.hc_attn_fn",), r".attn_hc.fn"),
            Rename((r"\.hc_attn_base",), r".attn_hc.base"),
            Rename((r"\.hc_attn_scale",), r".attn_hc.scale"),
            Rename((r"\.hc_ffn_fn",), r".ffn_hc.fn"),
            Rename((r"\.hc_ffn_base",), r".ffn_hc.base"),
            Rename((r"\.hc_ffn_scale",), r".ffn_hc.scale"),
            Rename((r"\.attn_sink",), r".sinks"),
            Rename((r"\.indexer\.weights_proj\.",), r"\.compressor\.indexer\.scorer\.weights_proj\."),
            Rename((r"\.indexer\.wq_b\.",), r"\.compressor\.indexer\.q_b_proj\."),
            Rename((r"\.norm\.",), r"\.kv_norm\."),
            Rename((r"\.ape",), r"\.position_bias"),
            Rename((r"\.wq_a\.",), r".q_a_proj."),
            Rename((r"\.self_attn\.wq_b\.",), r"\.self_attn\.q_b_proj\."),
            Rename((r"\.wkv\.",), r".kv_proj."),
            Rename((r"\.wgate\.",), r".gate_proj."),
            Rename((r"\.wo_a\.",), r".o_a_proj."),
            Rename((r"\.wo_b\.",), r".o_b_proj."),
            Rename((r"\.q_norm\.",), r".q_a_norm."),
            Rename((r"\.gate\.bias",), r".gate.e_score_correction_bias"),
            Rename((r"\.shared_experts\.w1\.",), r".shared_experts.gate_proj."),
            Rename((r"\.shared_experts\.w2\.",), r".shared_experts.down_proj."),
            Rename((r"\.shared_experts\.w3\.",), r".shared_experts.up_proj."),
        ),
        model=ModelKeys(
            prefix="model",
            head=("lm_head",),
            # `\.norm\.` -> `.kv_norm.` hits the final norm, and the FP8 quantizer's `.scale` ->
            # `.weight_scale_inv` the hyper-connection scales, of a checkpoint already in transformers' names.
            kept=(r"model\.norm\.weight", r"model\.layers\.\d+\.attn_hc\.scale", r"model\.layers\.\d+\.ffn_hc\.scale"),
            ignored=(r"(^|\.)mtp\..*",),
            keep_in_fp32=(
                "attn_hc",
                "ffn_hc",
                "hc_head",
                "sinks",
                "position_bias",
                "e_score_correction_bias",
                "q_a_norm",
                "kv_norm",
                "input_layernorm",
                "post_attention_layernorm",
                "norm",
            ),
        ),
    ),
    Family(
        name="kimi_k25",
        model_types=("kimi_k25",),
        converters=(
            ChunkForRope(
                ("wqkv",),
                "attn.q_proj",
                targets=("attn.q_proj", "attn.k_proj", "attn.v_proj"),
                rope=("q_proj", "k_proj"),
                rope_config="vision_config",
                default_heads=16,  # Kimi_K25VisionConfig's; the released config.json says vt_num_attention_heads
            ),
            *QWEN2_MOE,
        ),
        renames=(
            Rename(("language_model.model",), "model.language_model"),
            Rename(("language_model.lm_head",), "lm_head"),
            GroupRename(
                (r"vision_tower.encoder.blocks.(\d+).norm0", r"vision_tower.encoder.blocks.(\d+).norm1"),
                (r"vision_tower.encoder.blocks.\1.norm1", r"vision_tower.encoder.blocks.\1.norm2"),
            ),
            GroupRename(
                (r"vision_tower.encoder.blocks.(\d+).mlp.fc0", r"vision_tower.encoder.blocks.(\d+).mlp.fc1"),
                (r"vision_tower.encoder.blocks.\1.mlp.fc1", r"vision_tower.encoder.blocks.\1.mlp.fc2"),
            ),
            Rename((r"vision_tower.encoder.blocks.(\d+).wo",), r"vision_tower.encoder.blocks.\1.attn.proj"),
            Rename(("vision_tower.encoder",), "model.vision_tower"),
            Rename(("mm_projector.proj.0",), "model.mm_projector.in_proj"),
            Rename(("mm_projector.proj.2",), "model.mm_projector.out_proj"),
            Rename(("blocks",), "layers"),
            Rename(
                ("vision_tower.patch_embed.pos_emb.weight",),
                "model.vision_tower.patch_embed.pos_emb.position_embeddings",
            ),
        ),
        model=ModelKeys(
            prefix="model",
            head=("lm_head",),
            ignored=(r"model\.layers\.61.*",),  # DeepSeek-V3's multi-token-prediction layer
            keep_in_fp32=("e_score_correction_bias", "gate.weight"),
        ),
    ),
    Family(
        name="kolibri1",
        model_types=("kolibri1",),
        converters=QWEN2_MOE,
        renames=(
            Rename(("moe.router.expert_bias",), "mlp.gate.e_score_correction_bias"),
            Rename(("post_attn_norm",), "post_self_attn_layernorm"),
            Rename(("post_ffn_norm",), "post_mlp_layernorm"),
        ),
    ),
    Family(
        name="laguna",
        model_types=("laguna",),
        converters=QWEN2_MOE,
        renames=(
            Rename(("mlp.experts.e_score_correction_bias",), "mlp.gate.e_score_correction_bias"),
            Rename(("mlp.shared_expert.",), "mlp.shared_experts."),
        ),
        model=ModelKeys(
            prefix="model",
            head=("lm_head",),
            # `mlp.shared_expert.` (its dots any character) also hits `mlp.shared_experts.`.
            kept=(r"model\.layers\.\d+\.mlp\.shared_experts\..*",),
        ),
    ),
    Family(name="lfm2_moe", model_types=("lfm2_moe",), converters=_gated("feed_forward.experts", "w1", "w3", "w2")),
    Family(
        name="mimo_v2_flash",
        model_types=("mimo_v2_flash",),
        converters=QWEN2_MOE,
        renames=(Rename(("self_attn.attention_sink_bias",), "self_attn.sinks"),),
    ),  # fmt: skip
    Family(
        name="minimax_m2",
        model_types=("minimax_m2",),
        converters=MIXTRAL_EXPERTS,
        renames=(
            Rename((".block_sparse_moe.",), ".mlp."),
            Rename((".block_sparse_moe.e_score_correction_bias",), ".mlp.e_score_correction_bias"),
        ),
    ),
    Family(
        name="minimax_m3_vl",
        model_types=("minimax_m3_vl",),
        converters=(
            *ESCAPED_W_EXPERTS,
            Concatenate((r"\.gate_proj.weight", r"\.up_proj.weight"), r"\.gate_up_proj.weight"),
        ),
        renames=(
            Rename((r"^language_model\.lm_head",), "lm_head"),
            Rename((r"^language_model\.model\.",), "model.language_model."),
            Rename(
                (r"^vision_tower\.vision_model\.embeddings\.patch_embedding\.",),
                "model.vision_tower.embeddings.proj.",
            ),
            Rename((r"^vision_tower\.vision_model\.encoder\.layers\.",), "model.vision_tower.layers."),
            Rename((r"^vision_tower\.vision_model\.pre_layrnorm\.",), "model.vision_tower.pre_layrnorm."),
            Rename((r"^multi_modal_projector\.linear_1\.",), "model.multi_modal_projector.linear_1."),
            Rename((r"^multi_modal_projector\.linear_2\.",), "model.multi_modal_projector.linear_2."),
            Rename((r"^patch_merge_mlp\.linear_1\.",), "model.multi_modal_projector.merge_linear_1."),
            Rename((r"^patch_merge_mlp\.linear_2\.",), "model.multi_modal_projector.merge_linear_2."),
            Rename((r"\.block_sparse_moe\.(experts|gate|shared_experts)\.",), r"\.mlp\.\1\."),
            Rename((r"\.block_sparse_moe\.e_score_correction_bias",), r"\.mlp\.gate\.e_score_correction_bias"),
            Rename((r"\.self_attn\.index_q_proj\.",), ".self_attn.indexer.q_proj."),
            Rename((r"\.self_attn\.index_k_proj\.",), ".self_attn.indexer.k_proj."),
            Rename((r"\.self_attn\.index_q_norm\.",), ".self_attn.indexer.q_norm."),
            Rename((r"\.self_attn\.index_k_norm\.",), ".self_attn.indexer.k_norm."),
        ),
    ),
    Family(
        name="mistral_large4_text",
        model_types=("mistral_large4_text",),
        converters=ESCAPED_W_EXPERTS,
        renames=(
            Rename((r"\.attention\.",), r"\.self_attn\."),
            Rename((r"\.wq\.",), ".q_proj."),
            Rename((r"\.wkv_a_with_mqa\.",), r"\.kv_a_proj_with_mqa\."),
            Rename((r"\.wkv_b\.",), ".kv_b_proj."),
            Rename((r"\.attention_norm\.",), r"\.input_layernorm\."),
            Rename((r"\.ffn_norm\.",), r"\.post_attention_layernorm\."),
            Rename((r"\.kv_a_norm\.",), r"\.kv_a_layernorm\."),
            Rename((r"\.feed_forward\.",), r"\.mlp\."),
            Rename((r"\.gate\.",), r"\.mlp.gate\."),
            Rename((r"\.experts\.",), r"\.mlp.experts\."),
            Rename((r"\.shared_experts\.",), r"\.mlp.shared_experts\."),
            Rename((r"\.ssmax_scaling.s",), r"\.softmax_scaling.scale"),
            Rename((r"\.ssmax_scaling.b",), r"\.softmax_scaling.bias"),
        ),
        model=ModelKeys(
            prefix="model",
            head=("embed_tokens", "layers", "norm", "rotary_emb"),  # MistralLarge4TextModel: no prefix added
            # `\.gate\.`, `\.experts\.`, `\.shared_experts\.` -> `.mlp.…` also hit the MoE block already
            # under `mlp.`, and the FP8 quantizer's `.scale` the softmax scalings.
            kept=(
                r"layers\.\d+\.mlp\.(gate\.weight|experts\.(gate_up_proj|down_proj)(_scale_inv)?)",
                r"layers\.\d+\.mlp\.shared_experts\..*",
                r"layers\.\d+\.self_attn\.(indexer\.)?softmax_scaling\.scale",
            ),
            ignored=(r"mtp_dspark\..*",),
            keep_in_fp32=("mlp.gate.weight", "rotary_emb"),
        ),
    ),
    Family(
        name="sarvam_moe",
        model_types=("sarvam_moe",),
        converters=(
            *QWEN2_MOE,
            # Grouped-query attention: the fused rows [q|k|v] are split by each target's size.
            SplitBySize(
                ("query_key_value",),
                "q_proj",
                targets=("q_proj", "k_proj", "v_proj"),
                heads=(("num_attention_heads", 64), ("num_key_value_heads", 4), ("num_key_value_heads", 4)),
                default_head_dim=64,  # SarvamMoEConfig's defaults
            ),
        ),
        renames=(
            Rename((r"^model\.word_embeddings\.",), "model.embed_tokens."),
            Rename((r"\.attention\.",), ".self_attn."),
            Rename((r"\.self_attn\.dense\.",), ".self_attn.o_proj."),
            Rename((r"\.self_attn\.query_layernorm\.",), ".self_attn.q_norm."),
            Rename((r"\.self_attn\.key_layernorm\.",), ".self_attn.k_norm."),
            Rename((r"\.mlp\.gate\.expert_bias",), ".mlp.gate.e_score_correction_bias"),
        ),
    ),
    Family(
        # Dots3NoteVisionModel alone: its modules are the top level, no prefix is added.
        name="dots3_note_vision_encoder",
        model_types=("dots3_note_vision_encoder",),
        converters=DOTS3_VISION_EXPERTS,
        renames=DOTS3_VISION_RENAMES,
        model=ModelKeys(
            prefix="model",
            head=("blocks", "merger", "norm", "patch_embed", "rotary_pos_emb"),
            keep_in_fp32=("e_score_correction_bias", "gate.weight"),
        ),
    ),
    Family(
        # The whole dots.note model: text, vision and audio, each under its sub-model's rule.
        name="dots3_note",
        model_types=("dots3_note",),
        converters=(*_under(DOTS3_TEXT, QWEN2_MOE), *_under(DOTS3_VISION, DOTS3_VISION_EXPERTS)),
        renames=(
            Rename((r"^audio_encoder\.audio_adapter\.",), "audio_adapter."),
            Rename((r"^(vision_encoder|audio_encoder|audio_adapter)\.",), r"model.\1."),
            Rename((r"^model\.(.+)",), r"\1", prefix_change=True, scope=DOTS3_MODEL),
            Rename((r"^(embed_tokens|layers|norm)\.",), r"language_model.\1.", scope=DOTS3_MODEL),
            Rename((r"^vision_encoder\.",), "vision_tower.", scope=DOTS3_MODEL),
            Rename((r"^audio_encoder\.",), "audio_tower.", scope=DOTS3_MODEL),
            Rename((r"^audio_adapter\.",), "audio_tower.audio_adapter.", scope=DOTS3_MODEL),
            *_under(DOTS3_VISION, DOTS3_VISION_RENAMES),
            *_under(DOTS3_AUDIO, DOTS3_AUDIO_RENAMES),
        ),
        model=ModelKeys(
            prefix="model",
            head=("lm_head",),
            ignored=(r"^model\.(language_model\.)?layers\.46\.", r"^model\.(language_model\.)?mtp\."),  # MTP
            keep_in_fp32=("e_score_correction_bias", "gate.weight"),
        ),
    ),
    Family(name="nemotron_h", model_types=("nemotron_h",), converters=NEMOTRON_H_EXPERTS, renames=NEMOTRON_H_RENAMES),
    Family(
        # NeMo's export of Nemotron 3.5 Transcribe: audio encoders, a Nemotron-H language model whose
        # experts are stored fused as (in_features, out_features), and a word-timestamp head.
        name="nemo_speechlm",
        model_types=("nemo_speechlm",),
        converters=(
            Chunk(
                (r"\.attn\.w_qkv\.weight",),
                r"\.self_attn\.q_proj\.weight",
                targets=tuple(rf"\.self_attn\.{part}_proj\.weight" for part in "qkv"),
            ),
            Transpose((r"\.mixer\.experts\.gate_and_up_projs",), r"\.mixer\.experts\.up_proj"),
            Transpose((r"\.mixer\.experts\.down_projs",), r"\.mixer\.experts\.down_proj"),
            *_under(NEMO_LANGUAGE_MODEL, NEMOTRON_H_EXPERTS),
        ),
        renames=(
            Rename((r"^perception\.encoder\.asr_encoder\.",), r"^model\.audio_tower\.asr_encoder\."),
            Rename(
                (r"^perception\.encoder\.diarization_model\.encoder\.",),
                r"^model\.audio_tower\.diarization_model\.model\.audio_tower\.",
            ),
            Rename((r"^ctc_timestamp\.decoder\.transformer\.",), r"^model\.word_timestamp_encoder\."),
            Rename((r"^ctc_timestamp\.decoder\.upsample\.",), r"^model\.word_timestamp_encoder\.upsampler\."),
            Rename((r"^ctc_timestamp\.decoder\.decoder_layers\.0\.",), r"^word_timestamp_head\."),
            Rename((_DIARIZATION + r"encoder_proj\.",), r"^model\.audio_tower\.diarization_model\.model\.proj\."),
            Rename(
                (_DIARIZATION + r"subpixel_upsample\.",),
                r"^model\.audio_tower\.diarization_model\.model\.upsampler\.conv\.",
            ),
            Rename(
                (_DIARIZATION + r"first_hidden_to_hidden\.",),
                r"^model\.audio_tower\.diarization_model\.classifier\.dense\.",
            ),
            Rename(
                (_DIARIZATION + r"single_hidden_to_spks\.",),
                r"^model\.audio_tower\.diarization_model\.classifier\.out_proj\.",
            ),
            Rename((_DIARIZATION + r"learnable_sil_emb",), r"^model\.audio_tower\.diarization_model\.silence_embeds"),
            Rename((r"^perception\.encoder\.asr_norm\.",), r"^model\.audio_tower\.asr_norm\."),
            Rename((r"^perception\.encoder\.diar_norm\.",), r"^model\.audio_tower\.speaker_norm\."),
            Rename((r"^perception\.proj\.",), r"^model\.multi_modal_projector\."),
            Rename((r"^llm\.model\.embed_tokens\.",), r"^model\.language_model\.embeddings\."),
            Rename((r"^llm\.model\.norm\.",), r"^model\.language_model\.norm_f\."),
            Rename((r"^llm\.model\.layers\.",), r"^model\.language_model\.layers\."),
            Rename((r"^llm\.lm_head\.",), r"^lm_head\."),
            Rename((r"\.pre_encode\.proj\.",), r"\.embedder\.projection\."),
            Rename((r"\.embed_norm\.",), r"\.input_layer_norm\."),
            Rename((r"\.final_norm\.",), r"\.layer_norm\."),
            Rename((r"\.norm1\.",), r"\.layer_norm1\."),
            Rename((r"\.norm2\.",), r"\.layer_norm2\."),
            Rename((r"\.attn\.out_proj\.",), r"\.self_attn\.o_proj\."),
            Rename((r"\.attn\.q_norm\.",), r"\.self_attn\.q_norm\."),
            Rename((r"\.attn\.k_norm\.",), r"\.self_attn\.k_norm\."),
            Rename((r"\.ffn\.net\.0\.",), r"\.mlp\.fc1\."),
            Rename((r"\.ffn\.net\.3\.",), r"\.mlp\.fc2\."),
            Rename((r"\.mixer\._fp32_params\.A_log",), r"\.mixer\.A_log"),
            Rename((r"\.mixer\._fp32_params\.D",), r"\.mixer\.D"),
            Rename((r"\.mixer\._fp32_params\.dt_bias",), r"\.mixer\.dt_bias"),
            *_under(NEMO_LANGUAGE_MODEL, NEMOTRON_H_RENAMES),
        ),
        model=ModelKeys(
            prefix="model",
            head=("lm_head", "word_timestamp_head"),
            # The multi-token-prediction head, the feature extractors' constants, an unused speaker head,
            # TransformerEngine metadata and the word-timestamp head's constants.
            ignored=(
                r"^llm\.mtp\.",
                "mtp.*",  # the Nemotron-H language model's own
                r"^perception\.preprocessor\.",
                r"^perception\.encoder\.diarization_model\.preprocessor\.",
                r"^perception\.encoder\.diarization_model\.sortformer_modules\.hidden_to_spks\.",
                r"\._extra_state$",
                r"^ctc_timestamp\.decoder\.residual_scale$",
                r"^ctc_timestamp\.decoder\.upsample_factor$",
                r"^ctc_timestamp\.tokenizer\.model_proto$",
            ),
            keep_in_fp32=("audio_tower", "multi_modal_projector", "e_score_correction_bias", "gate.weight"),
        ),
    ),
    Family(
        name="phimoe",
        model_types=("phimoe",),
        converters=MIXTRAL_EXPERTS,
        renames=(Rename((".block_sparse_moe.",), ".mlp."), Rename((".gate.weight",), ".router.weight")),
    ),
    Family(
        name="qwen3_5_moe_text",
        model_types=("qwen3_5_moe_text",),
        converters=QWEN2_MOE,
        renames=(Rename((r"^model\.language_model\.(.+)",), r"model\.\1", prefix_change=True),),
    ),
    Family(
        name="qwen4_exp_text",
        model_types=("qwen4_exp_text",),
        converters=(
            *QWEN2_MOE,
            # The n-gram embedding is stored in `split_ngram_parts` row shards.
            ConcatenateShards(
                ("ngram_embedding.shard_*.weight",),
                "ngram_embedding.weight",
                count_field="split_ngram_parts",
                default_count=512,  # Qwen4ExpTextConfig's
            ),
        ),
        renames=(Rename((r"^model\.language_model\.(.+)",), r"model\.\1", prefix_change=True),),
        model=ModelKeys(
            prefix="model",
            head=("lm_head",),
            ignored=(r"^model.visual.*", r"^mtp.*"),  # the vision tower and multi-token prediction
        ),
    ),
    Family(
        name="qwen3_vl_moe",
        model_types=("qwen3_vl_moe",),
        converters=(
            TransposeExperts(("mlp.experts.gate_up_proj",), "mlp.experts.gate_up_proj"),
            TransposeExperts(("mlp.experts.down_proj",), "mlp.experts.down_proj"),
        ),
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
    """Families whose expert patterns match at least one of `keys`; of several families with the same
    expert patterns only the first in the table is named, and a whole model's family (scoped
    sub-model rules) never."""
    keys = list(keys)
    names, seen = [], set()
    for family in FAMILIES:
        if any(c.scope is not None for c in family.converters):
            continue  # a whole model's rule (dots3_note) presumes that model's sub-models: never a hint
        merges = tuple(c for c in family.converters if isinstance(c, ExpertMerge))
        if merges and merges not in seen and any(isinstance(family.map_key(k).converter, ExpertMerge) for k in keys):
            names.append(family.name)
        seen.add(merges)
    return names
