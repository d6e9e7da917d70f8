"""Tiny configs of transformers 5 MoE model types, for the end-to-end family tests.

`AutoConfig.for_model(model_type, **(BASE | TINY_MODELS[model_type]))`, except the nested
vision-language configs in FULL_KWARGS, which are the whole kwargs. Models are built with
AUTO_CLASS (default AutoModelForCausalLM); those in NO_LOGITS have no lm_head, so their
`last_hidden_state` is compared instead of logits. Each config builds in float32 on CPU without
optional kernels, has at least one routed MoE layer, and keeps every size tiny.
"""

BASE = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}

# Text block shared by the nested (FULL_KWARGS) configs.
_TEXT = dict(BASE)
# MLA attention (DeepSeek-style) and DeepSeek-style MoE pieces.
_MLA = {
    "kv_lora_rank": 8,
    "q_lora_rank": 8,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
    "num_key_value_heads": 2,
}
_MOE = {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8}
_GLM5_NEXT_TEXT = {
    "num_key_value_heads": 2,  # must equal num_attention_heads
    "q_lora_rank": 8,
    "kv_lora_rank": 8,
    "qk_rope_head_dim": 0,  # must be 0 (NoPE DSA)
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    **_MOE,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "index_topk": 4,
    "index_kpool": 2,  # index_topk % index_kpool == 0
    "index_head_dim": 8,
    "index_n_heads": 2,
    "linear_head_dim": 8,
    "linear_num_heads": 2,
    "linear_conv_kernel_dim": 2,
    "hc_mult": 2,
    "hc_sinkhorn_iters": 2,
    "pad_token_id": None,
    "layer_types": ["linear_attention", "indexed_attention"],
    "mlp_layer_types": ["dense", "sparse"],
}
_MISTRAL_LARGE4_TEXT = {
    **_MLA,
    **_MOE,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "index_topk": 4,
    "index_head_dim": 8,
    "index_n_heads": 2,
    "head_dim": 4,
}

TINY_MODELS: dict[str, dict] = {
    "qwen3_moe": {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 8,
        "shared_expert_intermediate_size": 12,
    },
    "deepseek_v3": {**_MLA, **_MOE, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "ernie4_5_moe": {
        "moe_num_experts": 4,
        "moe_k": 2,
        "moe_intermediate_size": 8,
        "moe_num_shared_experts": 1,
        "moe_layer_start_index": 0,
        "moe_layer_end_index": 1,
        "head_dim": 8,
    },
    "exaone_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 8,
        "num_shared_experts": 1,
        "head_dim": 8,
        "layer_types": ["sliding_attention", "full_attention"],
        "mlp_layer_types": ["dense", "sparse"],
    },
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "minimax": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "head_dim": 8,
        "layer_types": ["linear_attention", "full_attention"],
        "block_size": 16,
    },
    "phimoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "lfm2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 8,
        "num_dense_layers": 1,
        "layer_types": ["full_attention", "conv"],
    },
    "jamba": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "expert_layer_period": 1,
        "expert_layer_offset": 0,
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "mamba_d_state": 4,
        "mamba_d_conv": 2,
        "mamba_expand": 2,
        "mamba_dt_rank": 4,
    },
    "axk1": {
        **_MLA,
        **_MOE,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "mlp_layer_types": ["dense", "sparse"],
    },
    "axk2": {
        **_MLA,
        **_MOE,
        "n_shared_experts": 1,
        "mlp_layer_types": ["dense", "sparse"],
        "index_topk": 4,
        "index_head_dim": 8,
        "index_n_heads": 2,
        "head_dim": 8,
        "gated_norm_rank": 4,
    },
    "glm5_next": {
        # Flat text fields are forwarded into text_config by Glm5NextConfig (BC path); vision nested.
        **_GLM5_NEXT_TEXT,
        "vision_config": {
            "depth": 1,
            "hidden_size": 16,
            "num_heads": 2,
            "image_size": 8,
            "patch_size": 2,
            "out_hidden_size": 16,
            "intermediate_size": 24,
            "projection_intermediate_size": 24,
        },
    },
    "glm5_next_text": dict(_GLM5_NEXT_TEXT),
    "nemotron_h": {
        "num_hidden_layers": 3,  # an attention layer is needed, else forward fails in Cache.get_seq_length
        "layers_block_type": ["mamba", "attention", "moe"],
        "head_dim": 8,
        "ssm_state_size": 4,
        "mamba_num_heads": 4,
        "mamba_head_dim": 4,
        "n_groups": 1,
        "conv_kernel": 2,
        "chunk_size": 8,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 8,
        "moe_shared_expert_intermediate_size": 8,
    },
    "bailing_hybrid": {
        **_MLA,
        "num_local_experts": 4,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 8,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "head_dim": 8,
        "num_mtp_layers": 0,
        "layer_group_size": 2,
        "pad_token_id": None,
    },
    "minimax_m2": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8},
    "kolibri1": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 8,
        "shared_expert_intermediate_size": 8,
        "head_dim": 8,
        "sliding_window": 4,
    },
    "mimo_v2_flash": {
        **_MOE,
        "head_dim": 8,
        "v_head_dim": 8,
        "sliding_window": 4,
        "n_group": 1,
        "topk_group": 1,
        "mlp_layer_types": ["dense", "sparse"],
        "layer_types": ["full_attention", "sliding_attention"],
    },
    "flint": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 8,
        "shared_expert_intermediate_size": 8,
        "head_dim": 8,
        "sliding_window": 4,
        "mlp_only_layers": [0],  # default [0, 1] would leave no MoE layer
    },
    "hy_v3": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "num_shared_experts": 1,
        "moe_intermediate_size": 8,
        "head_dim": 8,
        "mlp_layer_types": ["dense", "sparse"],
    },
    "qwen3_5_moe_text": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 8,
        "shared_expert_intermediate_size": 8,
        "head_dim": 8,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "linear_num_key_heads": 1,
        "linear_num_value_heads": 2,
        "layer_types": ["linear_attention", "full_attention"],
    },
    "laguna": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 8,
        "shared_expert_intermediate_size": 8,
        "head_dim": 8,
        "sliding_window": 4,
    },
    "kimi_linear": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 8,
        "n_shared_experts": 1,
        "kv_lora_rank": 8,
        "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 4,
        "v_head_dim": 8,
        "num_key_value_heads": 2,
        "linear_head_dim": 8,
        "linear_num_heads": 2,
        "layer_types": ["linear_attention", "full_attention"],
        "mlp_layer_types": ["dense", "sparse"],
        "pad_token_id": None,
    },
    "mistral_large4_text": dict(_MISTRAL_LARGE4_TEXT),
    "qwen3_vl_moe": {  # FULL_KWARGS
        "tie_word_embeddings": False,
        "text_config": _TEXT
        | {
            "head_dim": 8,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 12,  # 2I != H, so the stored orientation is not ambiguous
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
            },
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_heads": 2,
            "patch_size": 2,
            "out_hidden_size": 16,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [1],
        },
    },
    "minimax_m3_vl": {  # FULL_KWARGS
        "tie_word_embeddings": False,
        "projector_hidden_size": 16,
        "text_config": _TEXT
        | {
            "head_dim": 8,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "dense_intermediate_size": 24,
            "shared_intermediate_size": 8,
            "rotary_dim": 4,
            "index_n_heads": 1,
            "index_head_dim": 8,
            "index_block_size": 2,
            "index_topk_blocks": 2,
            "index_local_blocks": 1,
            "mlp_layer_types": ["dense", "sparse"],
            "layer_types": ["full_attention", "minimax_m3_sparse"],
        },
        "vision_config": {
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 8,
            "patch_size": 2,
        },
    },
    "deepseek_ocr2": {  # FULL_KWARGS
        "tie_word_embeddings": False,
        "text_config": _TEXT
        | {
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 8,
            "n_shared_experts": 1,
            "mlp_layer_types": ["dense", "sparse"],
        },
        "vision_config": {
            "sam_config": {
                "hidden_size": 16,
                "output_channels": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
                "window_size": 2,
                "global_attn_indexes": [0],
                "downsample_channels": [8, 16],
            },
            "encoder_config": dict(_TEXT),
        },
    },
    "glm4_moe": {**_MOE, "n_shared_experts": 1, "first_k_dense_replace": 1, "head_dim": 8},
    "deepseek_v2": {**_MLA, **_MOE, "n_shared_experts": 1, "first_k_dense_replace": 1},
    "hunyuan_v1_moe": {"num_experts": 4, "moe_topk": 2, "head_dim": 8},
    "qwen3_next": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 8,
        "shared_expert_intermediate_size": 8,
        "head_dim": 8,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "linear_num_key_heads": 1,
        "linear_num_value_heads": 2,
        "layer_types": ["linear_attention", "full_attention"],
    },
    "dots1": {**_MOE, "n_shared_experts": 1, "first_k_dense_replace": 1},
    "flex_olmo": {"num_experts": 4, "num_experts_per_tok": 2, "pad_token_id": None},
    "glm_moe_dsa": {
        **_MLA,
        **_MOE,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "index_topk": 4,
        "index_head_dim": 8,
        "index_n_heads": 2,
        "head_dim": 4,
    },
    "longcat_flash": {
        # num_hidden_layers=2 -> num_layers=1 (each longcat layer holds 2 attention + 2 dense MLP sublayers + 1 MoE)
        "num_layers": 1,
        "ffn_hidden_size": 24,
        "q_lora_rank": 8,
        "kv_lora_rank": 8,
        "qk_nope_head_dim": 4,
        "qk_rope_head_dim": 4,
        "head_dim": 4,
        "v_head_dim": 8,
        "num_key_value_heads": 2,
        "n_routed_experts": 4,
        "moe_topk": 2,
        # transformers gives zero (identity) experts gate/up rows but no down rows; released checkpoints
        # store none of them (tests/test_longcat.py)
        "zero_expert_num": 2,
        "expert_ffn_hidden_size": 8,
    },
}

# Nested configs: pass TINY_MODELS[t] as the full kwargs, do NOT merge with BASE.
FULL_KWARGS = {"qwen3_vl_moe", "minimax_m3_vl", "deepseek_ocr2"}

AUTO_CLASS = {
    "glm5_next": "AutoModelForImageTextToText",
    "glm5_next_text": "AutoModel",  # no CausalLM mapping: Glm5NextTextModel (no lm_head)
    "mistral_large4_text": "AutoModel",  # no CausalLM mapping: MistralLarge4TextModel (no lm_head)
    "qwen3_vl_moe": "AutoModelForImageTextToText",
    "minimax_m3_vl": "AutoModelForImageTextToText",
    "deepseek_ocr2": "AutoModelForImageTextToText",
}

# Base models without lm_head: output has .last_hidden_state, not .logits.
NO_LOGITS = {"glm5_next_text", "mistral_large4_text"}
