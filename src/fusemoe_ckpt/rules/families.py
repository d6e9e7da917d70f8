"""The family table: which keys are routed experts and how transformers 5 renames them.

Each entry is data copied from transformers' `conversion_mapping.py`; adding a family is adding one
entry here. `tests/test_family_sync.py` compares this table with the installed transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FamilyError
from .model_keys import ModelKeys
from .patterns import (
    ChunkForRope,
    Concatenate,
    ConcatenateShards,
    Converter,
    ExpertMerge,
    GroupRename,
    Rename,
    Renaming,
    SplitBySize,
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
        name="nemotron_h",
        model_types=("nemotron_h",),
        converters=(
            ExpertMerge(("mixer.experts.*.up_proj.weight",), "mixer.experts.up_proj"),
            ExpertMerge(("mixer.experts.*.down_proj.weight",), "mixer.experts.down_proj"),
        ),
        renames=(Rename(("backbone.",), "model."),),
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

# Model types whose transformers rule merges experts but needs an operation convert cannot do
# faithfully; they are refused by name rather than converted half-way.
REFUSED: dict[str, str] = {
    "dots3_note_vision_encoder": "a rule scoped to the vision encoder inside a dots3_note model",
    "nemo_speechlm": "Chunk of w_qkv and an unconditional Transpose of the mixer experts",
}

# Whole models whose checkpoint holds a sub-model of a refused model type: no family rule covers all
# their keys, so none is suggested for them either.
CONTAINS_REFUSED: dict[str, str] = {"dots3_note": "dots3_note_vision_encoder"}

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
    expert patterns only the first in the table is named."""
    keys = list(keys)
    names, seen = [], set()
    for family in FAMILIES:
        merges = tuple(c for c in family.converters if isinstance(c, ExpertMerge))
        if merges and merges not in seen and any(isinstance(family.map_key(k).converter, ExpertMerge) for k in keys):
            names.append(family.name)
        seen.add(merges)
    return names
