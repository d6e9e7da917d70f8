"""End to end against transformers itself: tiny random models of each family, saved per-expert,
converted, and compared with what transformers writes and loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from accelerate import init_empty_weights, load_checkpoint_and_dispatch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from fusemoe_ckpt import convert  # noqa: E402

from .conftest import load_checkpoint  # noqa: E402

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

# model_type -> tiny config overrides. Each must give per-expert keys in the original format.
TINY_MODELS: dict[str, dict] = {
    "qwen3_moe": {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 8,
        "shared_expert_intermediate_size": 12,
    },
    "deepseek_v3": {
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 8,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "kv_lora_rank": 8,
        "q_lora_rank": 8,
        "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 4,
        "v_head_dim": 8,
        "num_key_value_heads": 2,
    },
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
        "use_mamba_kernels": False,
    },
}


def _tiny_model(model_type: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **(BASE | TINY_MODELS[model_type]))
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def family_case(request, tmp_path_factory):
    """(model_type, original per-expert dir, transformers' fused dir, our converted dir)."""
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    model = _tiny_model(model_type)
    original, reference, ours = root / "original", root / "reference", root / "ours"
    model.save_pretrained(original, max_shard_size="20KB")
    model.save_pretrained(reference, save_original_format=False)
    convert(original, ours, max_shard_size="30KB")
    return model_type, original, reference, ours


def _keys(root: Path) -> list[str]:
    return list(json.loads((root / "model.safetensors.index.json").read_text())["weight_map"])


def _reference_tensors(root: Path) -> dict[str, torch.Tensor]:
    if (root / "model.safetensors.index.json").exists():
        return load_checkpoint(root)
    with safe_open(root / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator


def test_original_is_per_expert_and_sharded(family_case):
    _, original, _, _ = family_case
    keys = _keys(original)
    assert any(".experts.0." in k for k in keys), "the tiny model must be saved per expert"
    assert len(set(json.loads((original / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1


def test_tensors_equal_transformers_fused_save(family_case):
    """Same keys, dtypes, shapes and bytes as save_pretrained(save_original_format=False)."""
    _, _, reference, ours = family_case
    expected = _reference_tensors(reference)
    actual = load_checkpoint(ours)
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        got = actual[name]
        assert (got.dtype, got.shape) == (tensor.dtype, tensor.shape), name
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_strict_dispatch_and_logits(family_case):
    """Strict accelerate dispatch leaves nothing on meta, and logits equal from_pretrained(original)."""
    model_type, original, _, ours = family_case
    config = AutoConfig.from_pretrained(ours)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    model = load_checkpoint_and_dispatch(model, str(ours), device_map={"": "cpu"}, strict=True).eval()
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    assert on_meta == []

    reference = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    input_ids = torch.arange(10).unsqueeze(0) % config.vocab_size
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reference(input_ids).logits), model_type


def test_original_layout_fails_strict_dispatch(tmp_path):
    """The problem this tool solves: exact-key loading cannot take the per-expert layout."""
    model = _tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "original")
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    with pytest.raises((AttributeError, RuntimeError, KeyError, ValueError)):
        load_checkpoint_and_dispatch(empty, str(tmp_path / "original"), device_map={"": "cpu"}, strict=True)


def test_builtin_example_loads_through_accelerate(tmp_path):
    """The README's demo: the built-in example, converted, loads strictly and matches from_pretrained."""
    import subprocess
    import sys

    from fusemoe_ckpt.example import write_example

    write_example(tmp_path / "tiny")
    convert(tmp_path / "tiny", tmp_path / "fused")
    script = Path(__file__).parent.parent / "examples" / "load_with_accelerate.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "fused"), str(tmp_path / "tiny")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "none on meta" in result.stdout
    assert f"logits equal to from_pretrained({tmp_path / 'tiny'}): True" in result.stdout
