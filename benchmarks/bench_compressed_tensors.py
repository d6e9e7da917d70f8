"""Time `fusemoe-ckpt convert --dequantize` on a compressed-tensors checkpoint of INT4 experts.

    .venv/bin/python benchmarks/bench_compressed_tensors.py --experts 64 --repeats 3

The source is one MoE layer in llm-compressor's pack-quantized W4A16 layout (Kimi-K2.5's experts):
per expert `weight_packed` int32 words of pseudo-random 4-bit values, a `weight_scale` per group of
32 columns (`--scale-dtype`, bf16 by default) and `weight_shape`, experts 768 x 2048 and 2048 x 768,
and config.json's compressed-tensors quantization_config. It reports the median wall time, GB/s of
bf16 output written and peak RSS (GNU time) of `convert --dequantize --no-fsync`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, GROUP = 2048, 768, 32


def write_source(root: Path, experts: int, scale_dtype: torch.dtype) -> None:
    root.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for expert in range(experts):
        for name, (rows, cols) in {
            "gate_proj": (INTERMEDIATE, HIDDEN),
            "up_proj": (INTERMEDIATE, HIDDEN),
            "down_proj": (HIDDEN, INTERMEDIATE),
        }.items():
            prefix = f"model.layers.0.mlp.experts.{expert}.{name}."
            words = torch.randint(-(2**31), 2**31, (rows, cols // 8), generator=generator, dtype=torch.int64)
            tensors[prefix + "weight_packed"] = words.to(torch.int32)
            scales = 2.0 ** torch.randint(-12, -4, (rows, cols // GROUP), generator=generator)
            tensors[prefix + "weight_scale"] = scales.to(scale_dtype)
            tensors[prefix + "weight_shape"] = torch.tensor([rows, cols])
    save_file(tensors, root / "model.safetensors")
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP}
    quantization = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": weights}},
    }
    config = {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": HIDDEN,
        "num_experts": experts,
        "dtype": "bfloat16",
        "quantization_config": quantization,
    }
    (root / "config.json").write_text(json.dumps(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    cli = Path(sys.executable).with_name("fusemoe-ckpt")
    with tempfile.TemporaryDirectory() as work:
        src, dst = Path(work) / "src", Path(work) / "dst"
        write_source(src, args.experts, getattr(torch, args.scale_dtype))
        command = [str(cli), "convert", str(src), str(dst), "--dequantize", "--no-fsync", "--quiet"]
        command += ["--workers", str(args.workers)] if args.workers else []
        times, peaks = [], []
        for _ in range(args.repeats):
            shutil.rmtree(dst, ignore_errors=True)
            start = time.perf_counter()
            done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, check=True)
            times.append(time.perf_counter() - start)
            peaks.append(int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1]) / 1024)
        written = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
        source = (src / "model.safetensors").stat().st_size
        median = statistics.median(times)
        print(
            f"{args.experts} int4 experts, {args.scale_dtype} scales: {source / 1e6:.0f} MB -> {written / 1e6:.0f} MB "
            f"bf16 in {median:.2f} s (median of {args.repeats}), {written / median / 1e9:.2f} GB/s of output, "
            f"peak RSS {max(peaks):.0f} MiB"
        )


if __name__ == "__main__":
    main()
