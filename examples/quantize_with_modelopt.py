"""Before quantizing: a fused checkpoint, loaded on the meta device and dispatched by accelerate,
then quantized and exported with NVIDIA modelopt.

    fusemoe-ckpt convert ./Qwen3-30B-A3B ./Qwen3-30B-A3B-fused
    python examples/quantize_with_modelopt.py ./Qwen3-30B-A3B-fused ./Qwen3-30B-A3B-fp8 [--format fp8|nvfp4]

This is the route that works end to end on fused experts with modelopt 0.47: the bf16 weights are
dispatched (device_map="auto" spreads them over the GPUs and, past their memory, the CPU), modelopt
inserts its quantizers and calibrates them on a few prompts, and `export_hf_checkpoint` writes the
quantized checkpoint. modelopt's low-memory mode (`init_quantized_weights`, which compresses the weights
before loading them) loads every parameter of a fused checkpoint but stops on a gap of its own: the
per-expert weight quantizers' `_amax` buffers stay on the meta device.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from transformers import AutoConfig, AutoModelForCausalLM

CALIBRATION_PROMPTS = 8


def load_fused(path: str, dtype: torch.dtype = torch.bfloat16):
    """The model built on the meta device and filled by exact key: what the fused layout is for."""
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return load_checkpoint_and_dispatch(model, path, device_map="auto", dtype=dtype, strict=True).eval()


def quantize_and_export(fused_dir: str, export_dir: str, quant_format: str = "fp8") -> torch.Tensor:
    """Quantize the dispatched model, run a forward pass, export it; returns the quantized logits."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    model = load_fused(fused_dir)
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    prompts = [(torch.arange(32, device=device) * (i + 1)) % vocab for i in range(CALIBRATION_PROMPTS)]

    def forward_loop(m):
        with torch.no_grad():
            for ids in prompts:
                m(ids.unsqueeze(0))

    config = {"fp8": mtq.FP8_DEFAULT_CFG, "nvfp4": mtq.NVFP4_DEFAULT_CFG}[quant_format]
    model = mtq.quantize(model, config, forward_loop)
    with torch.no_grad():
        logits = model(prompts[0].unsqueeze(0)).logits
    export_hf_checkpoint(model, export_dir=export_dir)
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fused_dir")
    parser.add_argument("export_dir")
    parser.add_argument("--format", choices=["fp8", "nvfp4"], default="fp8")
    args = parser.parse_args()
    logits = quantize_and_export(args.fused_dir, args.export_dir, args.format)
    print(f"quantized forward pass: logits {tuple(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}")
    print(f"exported {args.format} checkpoint to {args.export_dir}")


if __name__ == "__main__":
    main()
