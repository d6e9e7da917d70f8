"""Tiny checkpoints under the key names of the released DeepSeek-V4 and Kimi-K2.5 checkpoints.

transformers' own "original format" save does not give these names back (it keeps `model.` before
the layers of DeepSeek-V4 and writes `language_model.model.blocks.N` for Kimi-K2.5), so a test
source is built here from a tiny random model: its in-memory state dict renamed to the released
names by the tables below, written by hand from the released checkpoints' index files (not from
fusemoe-ckpt's rules), and the fused experts split per expert. Each builder checks that transformers
itself loads the result with no key missing or unexpected, so the names are the oracle's, not ours.

The quantized DeepSeek-V4 source is stored as the released one is: every linear layer transformers'
FP8 quantizer replaces is F8_E4M3 with an F8_E8M0 `.scale` per 128x128 block, routed experts are FP4
(two E2M1 values per I8 byte) with an F8_E8M0 `.scale` per row and 32 values, norms are BF16 (which
transformers holds in float32), the hash router's table is I32, the router weight is F32 and the
multi-token-prediction layer (`mtp.0.*`) is there for transformers to ignore.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import torch

from .conftest import write_checkpoint
from .fp8_models import capable_gpu
from .tiny_models import TINY_MODELS

# In-memory name (after `model.`) -> released name, applied in order.
DSV4_RELEASED = [
    (r"^embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^hc_head\.hc_", "hc_head_"),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.", ".hc_attn_"),
    (r"\.ffn_hc\.", ".hc_ffn_"),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.compressor\.", ".attn.compressor."),
    (r"\.self_attn\.sinks$", ".attn.attn_sink"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."),
    (r"\.position_bias$", ".ape"),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.gate_proj\.", ".wgate."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.wgate\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
]
DSV4_EXPERTS = ("w1", "w3", "w2")  # gate, up, down
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0 = torch.float8_e8m0fnu
FP8_QUANTIZATION = {
    "quant_method": "fp8",
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "scale_fmt": "ue8m0",
    "weight_block_size": [128, 128],
}


def dsv4_released_name(key: str) -> str:
    key = key.removeprefix("model.")
    for pattern, replacement in DSV4_RELEASED:
        key = re.sub(pattern, replacement, key)
    return key


def dsv4_config(**overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model("deepseek_v4", **(TINY_MODELS["deepseek_v4"] | overrides))


def _per_expert(
    tensors: dict[str, torch.Tensor], name: str, value: torch.Tensor, *, suffix: str = "weight", rename=None
) -> None:
    """A fused `…experts.gate_up_proj` or `…down_proj` of in-memory name `name` as released per-expert
    tensors (`…experts.E.w1.weight`, or with `suffix` "scale" its scale)."""
    prefix = (rename or dsv4_released_name)(name.rpartition(".")[0]) + "."
    gate, up, down = DSV4_EXPERTS
    for expert in range(value.shape[0]):
        if name.endswith("gate_up_proj"):
            g, u = value[expert].chunk(2)
            tensors[f"{prefix}{expert}.{gate}.{suffix}"] = g.contiguous()
            tensors[f"{prefix}{expert}.{up}.{suffix}"] = u.contiguous()
        else:
            tensors[f"{prefix}{expert}.{down}.{suffix}"] = value[expert].contiguous()


def dsv4_checkpoint(root: Path, *, shards: int = 3, seed: int = 0, mtp: bool = True) -> Path:
    """A tiny float32 DeepSeek-V4 under the released names, with an `mtp.0` layer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = dsv4_config()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            _per_expert(tensors, key, value)
        else:
            tensors[dsv4_released_name(key)] = value.contiguous()
    if mtp:
        tensors |= _mtp_tensors(tensors, quantized=False)
    src = write_checkpoint(root, tensors, shards=shards, config=json.loads(config.to_json_string()))
    _assert_transformers_loads_every_key(src, mtp=mtp)
    return src


def _mtp_tensors(tensors: dict[str, torch.Tensor], *, quantized: bool) -> dict[str, torch.Tensor]:
    """A few tensors of the released multi-token-prediction layer, copied from layer 1's."""
    mtp = {}
    for key, value in tensors.items():
        if key.startswith("layers.1.") and (".ffn.experts.0." in key or "norm" in key or ".attn.wq_a." in key):
            mtp["mtp.0." + key.removeprefix("layers.1.")] = value.clone()
    mtp["mtp.0.e_proj.weight" if not quantized else "mtp.0.enorm.weight"] = torch.ones(4, dtype=torch.bfloat16)
    return mtp


def _assert_transformers_loads_every_key(src: Path, *, mtp: bool, gpu_path: bool = False) -> None:
    from transformers import AutoModelForCausalLM

    with capable_gpu() if gpu_path else _nothing():
        _, info = AutoModelForCausalLM.from_pretrained(src, output_loading_info=True, device_map="cpu")
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set()), info


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fp8_blocks(weight: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(F8_E4M3 weight, F8_E8M0 scale per 128x128 block): power-of-two scales that differ by block."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / 128), math.ceil(cols / 128))
    exponents = torch.randint(120, 128, grid, generator=generator)
    scale = (exponents.float() - 127).exp2()
    spread = scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    quantized = (weight.float() * 16 / spread).clamp(-448, 448).to(torch.float8_e4m3fn)
    return quantized, scale.to(E8M0)


def _fp4_rows(rows: int, cols: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(I8 [rows, cols / 2] of random E2M1 pairs, F8_E8M0 [rows, cols / 32] scales)."""
    packed = torch.randint(0, 256, (rows, cols // 2), generator=generator, dtype=torch.int32).to(torch.uint8)
    scale = (torch.randint(118, 124, (rows, math.ceil(cols / 32)), generator=generator).float() - 127).exp2()
    return packed.view(torch.int8), scale.to(E8M0)


def dsv4_fp8_checkpoint(root: Path, *, shards: int = 3, seed: int = 0, mtp: bool = True) -> Path:
    """A tiny DeepSeek-V4 stored as the released checkpoint (see the module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.auto import AutoHfQuantizer

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # o_lora_rank 128: FP8GroupedLinear splits the scale rows of o_a_proj by group, one 128-row block or more each.
    config = dsv4_config(hidden_size=64, moe_intermediate_size=64, vocab_size=96, o_lora_rank=128)
    document = json.loads(config.to_json_string()) | {
        "quantization_config": FP8_QUANTIZATION,
        "expert_dtype": "fp4",  # at the top, as the released config.json has it
        "dtype": "bfloat16",
    }
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with capable_gpu():
        quantized_config = type(config).from_dict(document)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(quantized_config, dtype=torch.bfloat16)
        quantizer = AutoHfQuantizer.from_config(quantized_config.quantization_config, pre_quantized=True)
        quantizer.preprocess_model(skeleton)
    held = skeleton.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        name = dsv4_released_name(key)
        if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            rows, cols = value.shape[1:]
            packed, scales = zip(*(_fp4_rows(rows, cols, generator) for _ in range(value.shape[0])), strict=True)
            _per_expert(tensors, key, torch.stack(packed))
            _per_expert(tensors, key, torch.stack(scales), suffix="scale")
        elif key + "_scale_inv" in held:
            tensors[name], tensors[name.removesuffix(".weight") + ".scale"] = _fp8_blocks(value, generator)
        elif key.endswith(".tid2eid"):
            tensors[name] = torch.randint(0, config.n_routed_experts, value.shape, generator=generator).int()
        elif key.endswith(".gate.weight"):
            tensors[name] = value.float()
        elif held[key].dtype == torch.float32 and "norm" in key:
            tensors[name] = value.to(torch.bfloat16)  # released norms are BF16; transformers holds them in F32
        else:
            tensors[name] = value.to(held[key].dtype) if held[key].is_floating_point() else value
    if mtp:
        tensors |= _mtp_tensors(tensors, quantized=True)
    src = write_checkpoint(root, tensors, shards=shards, config=document)
    _assert_transformers_loads_every_key(src, mtp=mtp, gpu_path=True)
    return src


# Kimi-K2.5: in-memory name -> released name, applied in order (q, k and v are joined into wqkv apart).
KIMI_RELEASED = [
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.patch_embed\.pos_emb\.position_embeddings$", "vision_tower.patch_embed.pos_emb.weight"),
    (r"^model\.vision_tower\.patch_embed\.", "vision_tower.patch_embed."),
    (r"^model\.vision_tower\.final_layernorm\.", "vision_tower.encoder.final_layernorm."),
    (r"^model\.vision_tower\.layers\.(\d+)\.norm1\.", r"vision_tower.encoder.blocks.\1.norm0."),
    (r"^model\.vision_tower\.layers\.(\d+)\.norm2\.", r"vision_tower.encoder.blocks.\1.norm1."),
    (r"^model\.vision_tower\.layers\.(\d+)\.mlp\.fc1\.", r"vision_tower.encoder.blocks.\1.mlp.fc0."),
    (r"^model\.vision_tower\.layers\.(\d+)\.mlp\.fc2\.", r"vision_tower.encoder.blocks.\1.mlp.fc1."),
    (r"^model\.vision_tower\.layers\.(\d+)\.attn\.proj\.", r"vision_tower.encoder.blocks.\1.wo."),
    (r"^model\.mm_projector\.in_proj\.", "mm_projector.proj.0."),
    (r"^model\.mm_projector\.out_proj\.", "mm_projector.proj.2."),
    (r"^model\.mm_projector\.", "mm_projector."),
]
KIMI_VISION_HEADS = 16  # Kimi_K25VisionConfig's default, which the released config.json leaves to it


def kimi_released_name(key: str) -> str:
    for pattern, replacement in KIMI_RELEASED:
        key = re.sub(pattern, replacement, key)
    return key


def _interleaved(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k rows as the checkpoint stores them: transformers' `PermuteForRope(inverse=True)`."""
    rows = tensor.shape[0]
    half = rows // heads // 2
    return tensor.reshape(heads, 2, half, -1).transpose(1, 2).reshape(tensor.shape).contiguous()


def kimi_config():
    from transformers import AutoConfig

    kwargs = json.loads(json.dumps(TINY_MODELS["kimi_k25"]))
    kwargs["text_config"]["model_type"] = "kimi_k2"  # as released; transformers reads it as deepseek_v3
    kwargs["vision_config"] |= {"hidden_size": 64, "num_attention_heads": KIMI_VISION_HEADS}
    kwargs["projection_hidden_size"] = 64
    return AutoConfig.for_model("kimi_k25", **kwargs)


def kimi_checkpoint(root: Path, *, shards: int = 3, seed: int = 0) -> Path:
    """A tiny float32 Kimi-K2.5 under the released names; config.json names the vision heads as the
    released one does (`vt_num_attention_heads`), so transformers uses its default head count."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    config = kimi_config()
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in model.state_dict().items():
        found = re.fullmatch(r"model\.vision_tower\.layers\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)", key)
        if found:
            block, part, kind = found.groups()
            stored = _interleaved(value, KIMI_VISION_HEADS) if part in "qk" else value
            qkv.setdefault(f"vision_tower.encoder.blocks.{block}.wqkv.{kind}", {})[part] = stored
        elif key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            prefix = kimi_released_name(key.rpartition(".")[0]) + "."
            for expert in range(value.shape[0]):
                if key.endswith("gate_up_proj"):
                    gate, up = value[expert].chunk(2)
                    tensors[f"{prefix}{expert}.gate_proj.weight"] = gate.contiguous()
                    tensors[f"{prefix}{expert}.up_proj.weight"] = up.contiguous()
                else:
                    tensors[f"{prefix}{expert}.down_proj.weight"] = value[expert].contiguous()
        else:
            tensors[kimi_released_name(key)] = value.contiguous()
    for name, parts in qkv.items():
        tensors[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    document = json.loads(config.to_json_string())
    document["text_config"]["model_type"] = "kimi_k2"
    vision = document["vision_config"]
    vision["vt_num_attention_heads"] = vision.pop("num_attention_heads")
    src = write_checkpoint(root, tensors, shards=shards, config=document)
    loaded, info = AutoModelForImageTextToText.from_pretrained(src, output_loading_info=True, dtype=torch.float32)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set()), info
    expected = model.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    return src


# Nemotron 3.5 Transcribe as NeMo exports it: in-memory name -> released name, applied in order
# (q, k and v joined into w_qkv, and the experts stored fused as (in_features, out_features), apart).
NEMO_RELEASED = [
    (r"^model\.audio_tower\.asr_encoder\.", "perception.encoder.asr_encoder."),
    (r"^model\.audio_tower\.diarization_model\.model\.audio_tower\.", "perception.encoder.diarization_model.encoder."),
    (r"^model\.audio_tower\.diarization_model\.model\.proj\.", "SORTFORMER.encoder_proj."),
    (r"^model\.audio_tower\.diarization_model\.model\.upsampler\.conv\.", "SORTFORMER.subpixel_upsample."),
    (r"^model\.audio_tower\.diarization_model\.classifier\.dense\.", "SORTFORMER.first_hidden_to_hidden."),
    (r"^model\.audio_tower\.diarization_model\.classifier\.out_proj\.", "SORTFORMER.single_hidden_to_spks."),
    (r"^model\.audio_tower\.diarization_model\.silence_embeds$", "SORTFORMER.learnable_sil_emb"),
    (r"^SORTFORMER\.", "perception.encoder.diarization_model.sortformer_modules."),
    (r"^model\.audio_tower\.asr_norm\.", "perception.encoder.asr_norm."),
    (r"^model\.audio_tower\.speaker_norm\.", "perception.encoder.diar_norm."),
    (r"^model\.multi_modal_projector\.", "perception.proj."),
    (r"^model\.word_timestamp_encoder\.upsampler\.", "ctc_timestamp.decoder.upsample."),
    (r"^model\.word_timestamp_encoder\.", "ctc_timestamp.decoder.transformer."),
    (r"^word_timestamp_head\.", "ctc_timestamp.decoder.decoder_layers.0."),
    (r"^model\.language_model\.embeddings\.", "llm.model.embed_tokens."),
    (r"^model\.language_model\.norm_f\.", "llm.model.norm."),
    (r"^model\.language_model\.layers\.", "llm.model.layers."),
    (r"^lm_head\.", "llm.lm_head."),
    (r"\.embedder\.projection\.", ".pre_encode.proj."),
    (r"\.input_layer_norm\.", ".embed_norm."),
    (r"\.layer_norm\.", ".final_norm."),
    (r"\.layer_norm1\.", ".norm1."),
    (r"\.layer_norm2\.", ".norm2."),
    (r"\.self_attn\.o_proj\.", ".attn.out_proj."),
    (r"\.self_attn\.q_norm\.", ".attn.q_norm."),
    (r"\.self_attn\.k_norm\.", ".attn.k_norm."),
    (r"\.mlp\.fc1\.", ".ffn.net.0."),
    (r"\.mlp\.fc2\.", ".ffn.net.3."),
    (r"\.mixer\.(A_log|D|dt_bias)$", r".mixer._fp32_params.\1"),
]
# What the export holds that transformers ignores at load: (name, dtype, shape).
NEMO_IGNORED = [
    ("llm.mtp.layers.0.norm.weight", torch.float32, (16,)),
    ("perception.preprocessor.featurizer.window", torch.float32, (8,)),
    ("perception.encoder.diarization_model.preprocessor.featurizer.fb", torch.float32, (1, 8, 4)),
    ("perception.encoder.diarization_model.sortformer_modules.hidden_to_spks.weight", torch.float32, (2, 8)),
    ("perception.encoder.asr_encoder.layers.0.attn.w_qkv._extra_state", torch.uint8, (6,)),
    ("ctc_timestamp.decoder.residual_scale", torch.float32, ()),
    ("ctc_timestamp.decoder.upsample_factor", torch.int64, ()),
    ("ctc_timestamp.tokenizer.model_proto", torch.uint8, (12,)),
]


def nemo_released_name(key: str) -> str:
    for pattern, replacement in NEMO_RELEASED:
        key = re.sub(pattern, replacement, key)
    return key


def nemo_config():
    from transformers import AutoConfig

    return AutoConfig.for_model("nemo_speechlm", **copy.deepcopy(TINY_MODELS["nemo_speechlm"]))


def nemo_checkpoint(root: Path, *, shards: int = 3, seed: int = 0, ignored: bool = True) -> Path:
    """A tiny float32 Nemotron 3.5 Transcribe under the names of NeMo's export, with the tensors
    transformers ignores at load (NEMO_IGNORED) beside them."""
    from transformers import AutoModelForPreTraining

    torch.manual_seed(seed)
    config = nemo_config()
    model = AutoModelForPreTraining.from_config(config, dtype=torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in model.state_dict().items():
        found = re.fullmatch(r"(.*)\.self_attn\.([qkv])_proj\.weight", key)
        if found and "language_model" not in key:
            qkv.setdefault(nemo_released_name(found.group(1)) + ".attn.w_qkv.weight", {})[found.group(2)] = value
        elif key.endswith(".mixer.experts.up_proj"):
            name = nemo_released_name(key).removesuffix("up_proj") + "gate_and_up_projs"
            tensors[name] = value.transpose(1, 2).contiguous()
        elif key.endswith(".mixer.experts.down_proj"):
            tensors[nemo_released_name(key) + "s"] = value.transpose(1, 2).contiguous()
        else:
            tensors[nemo_released_name(key)] = value.contiguous()
    for name, parts in qkv.items():
        tensors[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if ignored:
        for name, dtype, shape in NEMO_IGNORED:
            tensors[name] = torch.ones(shape, dtype=dtype)
    document = json.loads(config.to_json_string()) | {
        "architectures": ["Nemotron3_5TranscribeForConditionalGeneration"]
    }
    src = write_checkpoint(root, tensors, shards=shards, config=document)
    loaded, info = AutoModelForPreTraining.from_pretrained(src, output_loading_info=True, dtype=torch.float32)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set()), info
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    return src


# dots.note (dots3_note) as released: in-memory name -> released name, applied in order (experts apart).
DOTS3_RELEASED = [
    (r"^model\.language_model\.", "model."),
    (r"^model\.vision_tower\.norm\.", "vision_encoder.post_trunk_norm."),
    (r"^model\.vision_tower\.merger\.", "vision_encoder.adapter."),
    (r"^model\.vision_tower\.", "vision_encoder."),
    (r"^(vision_encoder\.blocks\.\d+)\.norm1\.", r"\1.norm_1."),
    (r"^(vision_encoder\.blocks\.\d+)\.norm2\.", r"\1.norm_2."),
    (r"^(vision_encoder\.blocks\.\d+\.mlp)\.gate_proj\.", r"\1.fc1."),
    (r"^(vision_encoder\.blocks\.\d+\.mlp)\.down_proj\.", r"\1.fc2."),
    (r"^(vision_encoder\.blocks\.\d+\.mlp)\.up_proj\.", r"\1.fc3."),
    (r"^(vision_encoder\..*)\.mlp\.gate\.weight$", r"\1.mlp.gate_weight"),
    (r"^(vision_encoder\..*)\.mlp\.e_score_correction_bias$", r"\1.mlp.router_bias"),
    (r"^model\.audio_tower\.adapter\.norm\.", "audio_encoder.audio_adapter.proj.0."),
    (r"^model\.audio_tower\.adapter\.fc1\.", "audio_encoder.audio_adapter.proj.1."),
    (r"^model\.audio_tower\.adapter\.fc2\.", "audio_encoder.audio_adapter.proj.3."),
    (r"^model\.audio_tower\.conv_stem\.convs\.0\.", "model.audio_tower.conv_stem.conv2d1."),
    (r"^model\.audio_tower\.conv_stem\.convs\.1\.", "model.audio_tower.conv_stem.conv2d2."),
    (r"^model\.audio_tower\.conv_stem\.convs\.2\.", "model.audio_tower.conv_stem.conv2d3."),
    (r"^model\.audio_tower\.conv_stem\.", "model.audio_tower."),
    (r"^model\.audio_tower\.", "audio_encoder.dots_encoder.speech_encoder."),
    (r"^(audio_encoder\..*)\.self_attn\.o_proj\.", r"\1.self_attn.out_proj."),
    (r"^(audio_encoder\..*)\.input_layernorm\.", r"\1.self_attn_layer_norm."),
    (r"^(audio_encoder\..*)\.post_attention_layernorm\.", r"\1.final_layer_norm."),
    (r"^(audio_encoder\..*layers\.\d+)\.mlp\.gate_up_proj\.", r"\1.fc1."),
    (r"^(audio_encoder\..*layers\.\d+)\.mlp\.down_proj\.", r"\1.fc2."),
]
DOTS3_VISION_EXPERTS = ("fc1", "fc3", "fc2")  # gate, up, down
DOTS3_TEXT_EXPERTS = TINY_MODELS["dots3_note"]["text_config"]["n_routed_experts"]
# unlike the text model's: each sub-model's config counts its own
DOTS3_VISION_EXPERTS_COUNT = TINY_MODELS["dots3_note"]["vision_config"]["num_local_experts"]


def dots3_released_name(key: str) -> str:
    for pattern, replacement in DOTS3_RELEASED:
        key = re.sub(pattern, replacement, key)
    return key


def dots3_config():
    from transformers import AutoConfig

    return AutoConfig.for_model("dots3_note", **copy.deepcopy(TINY_MODELS["dots3_note"]))


def _dots3_tensors(state: dict[str, torch.Tensor], rename) -> dict[str, torch.Tensor]:
    """`state` under released names: renamed, the fused experts split per expert (the text model's
    as gate_proj/up_proj/down_proj, the vision encoder's as fc1/fc3/fc2)."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            tensors[rename(key)] = value.contiguous()
            continue
        prefix = rename(key.rpartition(".")[0]) + "."
        names = DOTS3_VISION_EXPERTS if "blocks." in key else ("gate_proj", "up_proj", "down_proj")
        for expert in range(value.shape[0]):
            if key.endswith("gate_up_proj"):
                gate, up = value[expert].chunk(2)
                tensors[f"{prefix}{expert}.{names[0]}.weight"] = gate.contiguous()
                tensors[f"{prefix}{expert}.{names[1]}.weight"] = up.contiguous()
            else:
                tensors[f"{prefix}{expert}.{names[2]}.weight"] = value[expert].contiguous()
    return tensors


def dots3_checkpoint(root: Path, *, shards: int = 3, seed: int = 0) -> Path:
    """A tiny float32 dots.note under the released names, with a multi-token-prediction layer
    (`model.layers.46.*`, as the released one has after its 46 layers) for transformers to ignore."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    config = dots3_config()
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    tensors = _dots3_tensors(model.state_dict(), dots3_released_name)
    for key, value in list(tensors.items()):
        if key.startswith("model.layers.1.") and (".mlp.experts." in key or "norm" in key):
            tensors["model.layers.46." + key.removeprefix("model.layers.1.")] = value.clone()
    document = json.loads(config.to_json_string()) | {"architectures": ["Dots3NoteForConditionalGeneration"]}
    src = write_checkpoint(root, tensors, shards=shards, config=document)
    loaded, info = AutoModelForImageTextToText.from_pretrained(src, output_loading_info=True, dtype=torch.float32)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set()), info
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    return src


def dots3_vision_checkpoint(root: Path, *, shards: int = 2, seed: int = 0) -> Path:
    """A tiny float32 dots.note vision encoder alone (model_type dots3_note_vision_encoder), under the
    released vision encoder's names without the `vision_encoder.` before them."""
    from transformers import Dots3NoteVisionModel

    torch.manual_seed(seed)
    config = dots3_config().vision_config
    model = Dots3NoteVisionModel._from_config(config, dtype=torch.float32)

    def rename(key: str) -> str:
        return dots3_released_name("model.vision_tower." + key).removeprefix("vision_encoder.")

    tensors = _dots3_tensors(model.state_dict(), rename)
    document = json.loads(config.to_json_string()) | {"architectures": ["Dots3NoteVisionModel"]}
    src = write_checkpoint(root, tensors, shards=shards, config=document)
    loaded, info = Dots3NoteVisionModel.from_pretrained(src, output_loading_info=True, dtype=torch.float32)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set()), info
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    return src
