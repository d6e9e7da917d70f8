"""Which inference and quantization engines load the fused layout, per model type: the one table.

Engines read a checkpoint by its model type (config.json's `model_type`), not by fusemoe-ckpt's
family rule, so the table is keyed by model type. Each row says what one engine, at the version
tested, does with a fused checkpoint of that model type, and how that is known: a source file and
function read, or a command run (`confirmed=True`), or what people who tried it report and the
sources here could not settle (`confirmed=False`). A model type an engine's row does not name is
"unknown" for that engine: nobody checked, and nothing is guessed.

The model card (`hub/model_card.py`), `fusemoe-ckpt consumers` and `inspect` all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from .families import FAMILIES

LOADS = "loads"  # reads the fused layout as it is
NEEDS_UNFUSE = "needs_unfuse"  # refuses it with an error: give it `fusemoe-ckpt unfuse`'s output
WRONG = "wrong"  # accepts it and serves or saves experts that are not the checkpoint's
UNKNOWN = "unknown"  # not checked
STATUSES = (LOADS, NEEDS_UNFUSE, WRONG, UNKNOWN)


@dataclass(frozen=True)
class Engine:
    """A loader people point at a Hub repo, at the version whose behaviour the table records."""

    name: str
    version: str


@dataclass(frozen=True)
class Support:
    """What one engine does with a fused checkpoint of one model type, and how that is known."""

    engine: Engine
    model_type: str
    status: str
    detail: str
    evidence: str
    confirmed: bool


VLLM = Engine("vLLM", "0.33")
VLLM_TRANSFORMERS = Engine("vLLM Transformers backend", "0.33")
SGLANG = Engine("SGLang", "0.5.23")
LLAMA_CPP = Engine("llama.cpp convert_hf_to_gguf.py", "of llama-cpp-python 0.3.36")
MLX_LM = Engine("mlx-lm load", "0.32")
MLX_LM_SHARDED = Engine("mlx-lm sharded_load", "0.32")
LLM_COMPRESSOR = Engine("llm-compressor", "0.14")
TENSORRT_LLM = Engine("TensorRT-LLM", "")  # the version tried was not recorded

ENGINES: tuple[Engine, ...] = (
    VLLM,
    VLLM_TRANSFORMERS,
    SGLANG,
    LLAMA_CPP,
    MLX_LM,
    MLX_LM_SHARDED,
    LLM_COMPRESSOR,
    TENSORRT_LLM,
)

_REPORTED = "reported by users who ran it"
_VLLM_WHEEL = "vllm 0.33.0 wheel (pip download vllm==0.33.0 --no-deps), read"
_VLLM_FUSED_PATH = (
    "layers/fused_moe/routed_experts.py RoutedExperts.load_weights asks get_expert_mapping(include_fused=True), "
    "whose `experts.gate_up_proj` entries chunk the [E, 2I, H] tensor into w1 and w3 and `experts.down_proj` "
    "fills w2"
)
_SGLANG_WHEEL = "sglang 0.5.23 wheel (pip download sglang==0.5.23 --no-deps), read"
_GGUF_RUN = (
    "ran scripts/check_gguf_consumers.py: tiny transformers-5 models saved per expert and fused "
    "(save_original_format=False), both converted with --outtype bf16"
)
_MLX_SOURCE = (
    "mlx-lm 0.32.0 source (commit d78bf58): Model.sanitize in mlx_lm/models/{file} stacks only "
    "per-expert keys ({keys}) into switch_mlp; no fused name is mapped"
)
_MLX_RUN = "ran scripts/check_mlx_consumers.py (mlx-lm 0.32.0, mlx CPU) on the tiny models of check_gguf_consumers.py"
_MLX_FILES = (
    ("qwen3_moe", "qwen3_moe.py", "mlp.experts.N.{gate,up,down}_proj", "the experts"),
    ("mixtral", "mixtral.py", "block_sparse_moe.experts.N.w1/w2/w3", "the experts and the router"),
    ("deepseek_v3", "deepseek_v3.py", "mlp.experts.N.{gate,up,down}_proj", "the experts"),
)
_LLMC_RUN = (
    "ran scripts/check_llmcompressor_consumers.py (llmcompressor 0.14.0, transformers 5.17.0, CPU): "
    "AutoModelForCausalLM.from_pretrained under load_quantizable_moe, logits against plain transformers "
    "on the per-expert original"
)
_LLMC_SOURCE = (
    "llmcompressor 0.14.0 wheel: load_quantizable_moe (modeling/moe/linearize.py) registers for "
    "{model_type} the per-expert load mapping of ARCH_TO_2D_MAPPINGS['qwen2_moe'] "
    "(modeling/moe/conversion_mappings.py), which drops the fused converters and renames only "
    "`experts.N.*`, so the fused keys match nothing"
)

SUPPORT: tuple[Support, ...] = (
    # vLLM native loaders
    Support(
        VLLM,
        "qwen3_moe",
        LOADS,
        "native Qwen3MoeForCausalLM loader",
        f"{_VLLM_WHEEL}: models/qwen3_moe.py Qwen3MoeModel.load_weights hands the experts to AutoWeightsLoader, "
        f"which calls the MoE layer's load_weights; {_VLLM_FUSED_PATH}",
        True,
    ),
    Support(
        VLLM,
        "mixtral",
        NEEDS_UNFUSE,
        "stops: AutoWeightsLoader's ValueError, no module or parameter named `...mlp` (its modules say "
        "`block_sparse_moe`)",
        f"{_VLLM_WHEEL}: models/mixtral.py keeps transformers' pre-5 module name `block_sparse_moe`, and "
        "MixtralModel.hf_to_vllm_mapper maps no `mlp.` (the name transformers 5, and so the fused checkpoint, "
        "uses) back to it; AutoWeightsLoader (models/utils.py) raises on a name no module has",
        True,
    ),
    *(
        Support(
            VLLM,
            model_type,
            NEEDS_UNFUSE,
            "stops: KeyError on 'model.layers.N.mlp.experts.gate_up_proj'",
            f"{_VLLM_WHEEL}: models/deepseek_v2.py DeepseekV2Model.load_weights (also DeepseekV3ForCausalLM's) "
            "matches experts through fused_moe_make_expert_params_mapping, the legacy mapping without fused "
            "entries, so the fused name falls through to params_dict[name]",
            True,
        )
        for model_type in ("deepseek_v2", "deepseek_v3")
    ),
    *(
        Support(
            VLLM_TRANSFORMERS,
            model_type,
            LOADS,
            "--model-impl transformers: transformers' own module names, its 3D experts replaced by vLLM's MoE layer",
            f"{_VLLM_WHEEL}: models/transformers/moe.py swaps transformers' 3D experts for vLLM's MoE layer, "
            "whose TransformersRoutedExperts.get_expert_mapping covers gate_proj/up_proj and w1/w3 names, "
            f"fused included; {_VLLM_FUSED_PATH}; the checkpoint's names are transformers 5's own",
            True,
        )
        for model_type in ("qwen3_moe", "mixtral")
    ),
    # SGLang
    Support(
        SGLANG,
        "qwen3_moe",
        WRONG,
        "Qwen3MoeForCausalLM.load_weights skips the fused expert names without a word; the experts stay uninitialised",
        f"{_SGLANG_WHEEL}: models/qwen3_moe.py Qwen3MoeForCausalLM.load_weights: `mlp.experts.gate_up_proj` "
        "matches no expert mapping (make_expert_params_mapping has per-expert names only) and "
        "`if name not in params_dict: continue` drops it, with no log line",
        True,
    ),
    Support(
        SGLANG,
        "mixtral",
        WRONG,
        "MixtralForCausalLM.load_weights logs 'Parameter ... not found in params_dict' and skips the fused experts "
        "and the router (`mlp.`, where its modules say `block_sparse_moe.`); they stay uninitialised",
        f"{_SGLANG_WHEEL}: models/mixtral.py MixtralForCausalLM.load_weights maps per-expert w1/w2/w3 only, "
        "and a name not in params_dict gets logger.warning and nothing else",
        True,
    ),
    *(
        Support(
            SGLANG,
            model_type,
            LOADS,
            "the DeepSeek loader splits `experts.gate_up_proj` into w1/w3 per expert",
            f"{_SGLANG_WHEEL}: models/deepseek_common/deepseek_weight_loader.py _load_fused_expert_tensor, "
            "called from DeepseekV2WeightLoaderMixin (DeepseekV2ForCausalLM and DeepseekV3ForCausalLM), "
            "maps `.experts.gate_up_proj` to w13 (chunk(2) per expert: gate, then up) and `.experts.down_proj` to w2",
            True,
        )
        for model_type in ("deepseek_v2", "deepseek_v3")
    ),
    # llama.cpp's converter
    Support(
        LLAMA_CPP,
        "qwen3_moe",
        LOADS,
        "writes the same GGUF as from the per-expert original",
        f"{_GGUF_RUN}: both exit 0, the same 27 tensors, shapes, types and bytes "
        "(conversion/qwen.py Qwen2MoeModel.modify_tensors splits `mlp.experts.gate_up_proj`)",
        True,
    ),
    Support(
        LLAMA_CPP,
        "mixtral",
        NEEDS_UNFUSE,
        "stops: ValueError: Can not map tensor 'model.layers.0.mlp.experts.gate_up_proj'",
        f"{_GGUF_RUN}: the per-expert original converts, the fused one exits 1",
        True,
    ),
    Support(
        LLAMA_CPP,
        "deepseek_v3",
        NEEDS_UNFUSE,
        "stops: ValueError: Unprocessed experts: ['model.layers.1.mlp.experts.down_proj', ...]",
        f"{_GGUF_RUN}: the per-expert original converts, the fused one exits 1 "
        "(conversion/deepseek.py prepare_tensors)",
        True,
    ),
    # mlx-lm
    *(
        Support(
            MLX_LM,
            model_type,
            NEEDS_UNFUSE,
            "mlx_lm.load (strict=True) refuses it: ValueError: Received N parameters not in model",
            f"{_MLX_RUN}: the fused checkpoint is refused strict, the original loads; "
            + _MLX_SOURCE.format(file=file, keys=keys)
            + "; utils.load_model passes strict=True to load_weights",
            True,
        )
        for model_type, file, keys, _ in _MLX_FILES
    ),
    *(
        Support(
            MLX_LM_SHARDED,
            model_type,
            WRONG,
            f"sharded_load (strict=False) ignores the fused names and serves {what} as initialised",
            f"{_MLX_RUN}: not strict, the fused checkpoint loads without an error and {what} differ from "
            "the original's; "
            + _MLX_SOURCE.format(file=file, keys=keys)
            + "; utils.sharded_load calls load_model(..., strict=False)",
            True,
        )
        for model_type, file, keys, what in _MLX_FILES
    ),
    # llm-compressor
    *(
        Support(
            LLM_COMPRESSOR,
            model_type,
            WRONG,
            "load_quantizable_moe builds per-expert Linear modules the fused keys do not fill: no error, the "
            "experts re-initialised (transformers' load report lists them MISSING), and saved so",
            f"{_LLMC_RUN}: the original gives the reference logits, the fused checkpoint other ones; "
            + _LLMC_SOURCE.format(model_type=model_type),
            True,
        )
        for model_type in ("qwen3_moe", "deepseek_v3")
    ),
    Support(
        LLM_COMPRESSOR,
        "mixtral",
        LOADS,
        "load_quantizable_moe loads through transformers' own mixtral mapping, then linearizes the loaded experts",
        f"{_LLMC_RUN}: the fused checkpoint gives the reference logits; llmcompressor 0.14.0 wheel: mixtral "
        "maps to transformers' own `mixtral` conversion pattern, which has no entry in ARCH_TO_2D_MAPPINGS, "
        "so has_linearize_load_mappings is False and load_quantizable_moe calls from_pretrained unchanged, "
        "then linearize_moe on the loaded model",
        True,
    ),
    # TensorRT-LLM
    Support(TENSORRT_LLM, "qwen2_moe", LOADS, "splits the fused experts at load", _REPORTED, False),
    Support(TENSORRT_LLM, "qwen3_moe", LOADS, "splits the fused experts at load", _REPORTED, False),
    Support(TENSORRT_LLM, "mixtral", LOADS, "splits the fused experts at load", _REPORTED, False),
)


def consumers_of(model_type: str) -> list[Support]:
    """One row per engine, in ENGINES order, for `model_type`; `unknown` where the engine's row is missing."""
    found = {(s.engine, s.model_type): s for s in SUPPORT}
    return [
        found.get((engine, model_type))
        or Support(engine, model_type, UNKNOWN, "not checked", "no check recorded for this model type", False)
        for engine in ENGINES
    ]


def model_types() -> list[str]:
    """Every model type the table has at least one checked row for."""
    return sorted({s.model_type for s in SUPPORT})


def checked_model_type(model_type: str) -> str:
    """`model_type` if the table or a family rule knows it (a family's unchecked types read "unknown"),
    else a usage error naming the recorded ones."""
    if model_type not in model_types() and not any(model_type in f.model_types for f in FAMILIES):
        known = ", ".join(model_types())
        raise UsageError(
            f"unknown model type {model_type!r}: no family rule or engine check names it; checked: {known}"
        )
    return model_type


def engine_label(engine: Engine) -> str:
    return f"{engine.name} {engine.version}" if engine.version else f"{engine.name} (version not recorded)"


def by_status(model_type: str) -> dict[str, list[Support]]:
    """The rows of `model_type` grouped by status, every status present (possibly empty), in STATUSES order."""
    rows = consumers_of(model_type)
    return {status: [s for s in rows if s.status == status] for status in STATUSES}


def verdict_line(model_type: str) -> str:
    """One line on which engines load a fused `model_type` checkpoint, for inspect's report."""
    groups = by_status(model_type)
    parts = [
        f"{label}: {', '.join(engine_label(s.engine) for s in groups[status])}"
        for status, label in (
            (LOADS, "load it"),
            (NEEDS_UNFUSE, "need unfuse"),
            (WRONG, "load it WRONG"),
        )
        if groups[status]
    ]
    if not parts:
        return f"engines on the fused layout of {model_type}: none checked (fusemoe-ckpt consumers)"
    unknown = f"; {len(groups[UNKNOWN])} unchecked" if groups[UNKNOWN] else ""
    return f"engines on the fused layout of {model_type}: {'; '.join(parts)}{unknown} (fusemoe-ckpt consumers)"
