"""On a GPU: converted checkpoints dispatched with accelerate give the logits transformers gives.

Skipped where CUDA is absent. The realistic-size test needs about 8 GB of GPU memory and 10 GB of disk.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from accelerate import init_empty_weights, load_checkpoint_and_dispatch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from fusemoe_ckpt import convert  # noqa: E402

from .tiny_models import BASE, TINY_MODELS  # noqa: E402

GPU_FAMILIES = ["qwen3_moe", "qwen2_moe", "deepseek_v3", "mixtral", "phimoe", "olmoe", "glm4_moe"]


def _dispatch(path, dtype, device_map):
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return load_checkpoint_and_dispatch(model, str(path), device_map=device_map, dtype=dtype, strict=True).eval()


def _on_meta(model) -> list[str]:
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]


@pytest.mark.parametrize("model_type", GPU_FAMILIES)
def test_auto_dispatch_on_gpu_matches_from_pretrained(model_type, tmp_path):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **(BASE | TINY_MODELS[model_type]))
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(
        tmp_path / "original", max_shard_size="20KB"
    )
    convert(tmp_path / "original", tmp_path / "fused", max_shard_size="30KB")

    model = _dispatch(tmp_path / "fused", torch.float32, "auto")
    assert _on_meta(model) == []
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "original", dtype=torch.float32, device_map="cuda")
    input_ids = (torch.arange(12).unsqueeze(0) % config.vocab_size).cuda()
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reference(input_ids).logits)


REALISTIC = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "tie_word_embeddings": False,
}


@pytest.mark.skipif(not os.environ.get("FUSEMOE_LARGE_GPU_TEST"), reason="set FUSEMOE_LARGE_GPU_TEST=1 (3 GB)")
def test_realistic_qwen3_moe_layers_load_and_run(tmp_path):
    """Two Qwen3-30B-A3B layers in bf16 (about 3 GB): convert, dispatch onto the GPU, forward."""
    config = AutoConfig.for_model("qwen3_moe", **REALISTIC)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "original", max_shard_size="1GB")
    del model
    torch.cuda.empty_cache()
    result = convert(tmp_path / "original", tmp_path / "fused")
    assert result.bytes_written > 2e9

    model = _dispatch(tmp_path / "fused", torch.bfloat16, "auto")
    assert _on_meta(model) == []
    input_ids = torch.arange(64, device="cuda").unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids).logits
    del model
    torch.cuda.empty_cache()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "original", dtype=torch.bfloat16, device_map="cuda")
    with torch.no_grad():
        expected = reference(input_ids).logits
    assert logits.shape == (1, 64, REALISTIC["vocab_size"])
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, expected)
