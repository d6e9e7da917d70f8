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


# FP8 on the GPU: transformers keeps FP8 weights on a capability >= 8.9 device (the H100 is 9.0).


def _fp8_dispatched(fused, device_map):
    from .fp8_models import fp8_model_on_meta

    model = fp8_model_on_meta(fused)
    return load_checkpoint_and_dispatch(model, str(fused), device_map=device_map, strict=True).eval()


def _same_state(ours, theirs) -> list[str]:
    """Names whose parameter or buffer differs in dtype, shape or bytes (or is missing on one side)."""
    a = dict(ours.named_parameters()) | dict(ours.named_buffers())
    b = dict(theirs.named_parameters()) | dict(theirs.named_buffers())
    differing = sorted(a.keys() ^ b.keys())
    for name in a.keys() & b.keys():
        x, y = a[name].data, b[name].data
        if (x.dtype, x.shape) != (y.dtype, y.shape) or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            differing.append(name)
    return differing


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen3_moe"])
def test_fp8_fused_dispatch_on_gpu_matches_from_pretrained(model_type, tmp_path):
    """Fused FP8 loaded by strict dispatch onto the GPU holds exactly what from_pretrained(original FP8)
    holds there, every parameter and buffer, and gives the same logits through the reference kernel."""
    from .fp8_models import fp8_checkpoint, use_reference_kernel

    src = fp8_checkpoint(tmp_path / "src", model_type)
    convert(src, tmp_path / "fused", max_shard_size="300KB")
    use_reference_kernel()
    model = _fp8_dispatched(tmp_path / "fused", "auto")
    assert _on_meta(model) == []
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    reference = AutoModelForCausalLM.from_pretrained(src, device_map="cuda").eval()
    assert reference.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn  # not dequantized
    assert _same_state(model, reference) == []
    input_ids = torch.arange(1, 13, device="cuda").unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reference(input_ids).logits)


DEEPSEEK_V3_LAYER = {
    "vocab_size": 1024,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "first_k_dense_replace": 0,
    "num_hidden_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "tie_word_embeddings": False,
}


def _random_fp8(shape) -> torch.Tensor:
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda")
    codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes
    return codes.view(torch.float8_e4m3fn).cpu()


@pytest.mark.skipif(not os.environ.get("FUSEMOE_LARGE_GPU_TEST"), reason="set FUSEMOE_LARGE_GPU_TEST=1 (12 GB)")
def test_deepseek_v3_sized_fp8_layer_converts_loads_and_runs(tmp_path):
    """One MoE layer shaped like DeepSeek-V3 (256 experts, hidden 7168, moe_intermediate 2048, FP8 with
    128x128 block scales, 11.6 GB): convert in a process of its own (time and peak RSS printed),
    dispatch onto the GPU, every parameter equal to from_pretrained(original), logits equal."""
    import json
    import subprocess
    import sys
    import time

    from safetensors.torch import save_file

    from .fp8_models import QUANTIZATION, use_reference_kernel

    torch.manual_seed(0)
    config = AutoConfig.for_model("deepseek_v3", **DEEPSEEK_V3_LAYER)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    src = tmp_path / "src"
    src.mkdir()
    document = config.to_dict() | {"quantization_config": QUANTIZATION, "dtype": "bfloat16"}
    (src / "config.json").write_text(json.dumps(document))
    # The original (per-expert) key names and shapes, from the keys the model saves.
    per_expert = {}
    for name, tensor in skeleton.state_dict().items():
        shape = tuple(tensor.shape)
        if ".experts.gate_up_proj" in name or ".experts.down_proj" in name:
            experts, rows, cols = shape
            projections = ("gate_proj", "up_proj") if "gate_up" in name else ("down_proj",)
            module = name.rpartition(".")[0]
            for e in range(experts):
                for projection in projections:
                    per_expert[f"{module}.{e}.{projection}.weight"] = (rows // len(projections), cols)
        else:
            per_expert[name] = shape
    weight_map, shard, shard_bytes, count = {}, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, count
        count += 1
        filename = f"model-{count:05d}.safetensors"
        save_file(shard, src / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
        shard, shard_bytes = {}, 0

    for name, shape in per_expert.items():
        quantized = len(shape) == 2 and name.endswith(".weight") and not name.endswith(".gate.weight")
        quantized = quantized and "embed_tokens" not in name and not name.startswith("lm_head")
        if quantized:
            shard[name] = _random_fp8(shape)
            grid = (-(-shape[0] // 128), -(-shape[1] // 128))
            shard[name + "_scale_inv"] = torch.rand(grid) * 1e-3 + 1e-4
        elif name.endswith("e_score_correction_bias") or "norm" in name:
            shard[name] = torch.rand(shape)
        else:
            shard[name] = torch.randn(shape, dtype=torch.bfloat16) * 0.02
        shard_bytes += shard[name].nbytes
        if shard_bytes > 4e9:
            flush()
    flush()
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    script = (
        "import sys; from fusemoe_ckpt.cli import main; sys.argv = ['fusemoe-ckpt', 'convert', '-q', "
        f"'--workers', '16', {str(src)!r}, {str(tmp_path / 'fused')!r}]\n"
        "try:\n    main()\nfinally:\n"
        "    hwm = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
        "    print(f'peak RSS {int(hwm) / 1024:.1f} MiB', file=sys.stderr)"
    )
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    size = sum(p.stat().st_size for p in src.iterdir())
    print(f"\nconvert {size / 1e9:.2f} GB FP8 DeepSeek-V3 layer: {seconds:.2f} s, {done.stderr.strip()}")

    use_reference_kernel()
    model = _fp8_dispatched(tmp_path / "fused", {"": "cuda"})
    reference = AutoModelForCausalLM.from_pretrained(src, device_map="cuda").eval()
    assert reference.model.layers[0].mlp.experts.gate_up_proj.shape == (256, 4096, 7168)
    assert reference.model.layers[0].mlp.experts.gate_up_proj_scale_inv.shape == (256, 32, 56)
    assert _same_state(model, reference) == []
    input_ids = torch.arange(1, 33, device="cuda").unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids).logits
        assert torch.isfinite(logits).all()
        assert torch.equal(logits, reference(input_ids).logits)
