"""Time `fusemoe-ckpt convert` on an FP8 DeepSeek-V3-shaped checkpoint: fused FP8 and `--dequantize`.

    .venv/bin/python benchmarks/bench_fp8.py --experts 64 --repeats 3            # 2.9 GB, this machine
    python3 benchmarks/bench_fp8.py --experts 256 --repeats 2 --workers 16       # one real-size layer

The source is DeepSeek-V3's per-expert FP8 layout for `--layers` MoE layers: every linear weight
F8_E4M3 with its F32 `weight_scale_inv` per 128x128 block (experts 2048 x 7168 and 7168 x 2048,
MLA attention with the 576-row kv_a_proj_with_mqa), the router and norms in BF16/F32, and
DeepSeek-V3's config.json with its quantization_config. Bytes are pseudo-random (valid FP8 codes,
positive scales). In alternating rounds after `sync`, with the page cache warm, it times `cp -r`,
convert (fused FP8) with and without fsync, and `convert --dequantize` (to bf16, twice the bytes),
and reports medians, peak RSS, each convert against `cp -r` and GB/s of output written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
from pathlib import Path

from bench_convert import GNU_TIME, Tool, log, rss_method, run_measured, run_rounds, warm_page_cache

from fusemoe_ckpt.reading.safetensors_format import TensorInfo, encode_header
from fusemoe_ckpt.sizes import format_size, parse_size

GENERATOR_VERSION = 1
BLOCK = 128
HIDDEN = 7168
MOE_INTERMEDIATE = 2048
DTYPE_SIZES = {"F8_E4M3": 1, "F32": 4, "BF16": 2}
# DeepSeek-V3's MLA projections: (name, rows, cols).
ATTENTION = [
    ("q_a_proj", 1536, HIDDEN),
    ("q_b_proj", 128 * 192, 1536),
    ("kv_a_proj_with_mqa", 576, HIDDEN),
    ("kv_b_proj", 128 * 256, 512),
    ("o_proj", HIDDEN, 128 * 128),
]
CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": HIDDEN,
    "intermediate_size": 18432,
    "moe_intermediate_size": MOE_INTERMEDIATE,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 0,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "vocab_size": 1024,
    "dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
}


def layer_tensors(layer: int, experts: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of one MoE decoder layer in state-dict order, each FP8 weight with its scale."""
    p = f"model.layers.{layer}"
    tensors: list[tuple[str, str, tuple[int, ...]]] = []

    def quantized(name: str, rows: int, cols: int) -> None:
        tensors.append((f"{name}.weight", "F8_E4M3", (rows, cols)))
        tensors.append((f"{name}.weight_scale_inv", "F32", (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))))

    tensors.append((f"{p}.input_layernorm.weight", "BF16", (HIDDEN,)))
    for name, rows, cols in ATTENTION:
        quantized(f"{p}.self_attn.{name}", rows, cols)
    tensors += [
        (f"{p}.self_attn.q_a_layernorm.weight", "BF16", (1536,)),
        (f"{p}.self_attn.kv_a_layernorm.weight", "BF16", (512,)),
    ]
    tensors += [
        (f"{p}.mlp.gate.weight", "BF16", (experts, HIDDEN)),
        (f"{p}.mlp.gate.e_score_correction_bias", "F32", (experts,)),
    ]
    for e in range(experts):
        for name, rows, cols in (
            ("gate_proj", MOE_INTERMEDIATE, HIDDEN),
            ("up_proj", MOE_INTERMEDIATE, HIDDEN),
            ("down_proj", HIDDEN, MOE_INTERMEDIATE),
        ):
            quantized(f"{p}.mlp.experts.{e}.{name}", rows, cols)
    for name, rows, cols in (
        ("gate_proj", MOE_INTERMEDIATE, HIDDEN),
        ("up_proj", MOE_INTERMEDIATE, HIDDEN),
        ("down_proj", HIDDEN, MOE_INTERMEDIATE),
    ):
        quantized(f"{p}.mlp.shared_experts.{name}", rows, cols)
    tensors.append((f"{p}.post_attention_layernorm.weight", "BF16", (HIDDEN,)))
    return tensors


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return DTYPE_SIZES[dtype] * math.prod(shape)


def _fill(dtype: str, size: int, rng: random.Random) -> bytes:
    """Pseudo-random bytes that are valid values: FP8 codes without NaN, positive finite scales."""
    if dtype == "F8_E4M3":
        codes = bytearray(rng.randbytes(size))
        return bytes(codes.translate(bytes(c if c & 0x7F != 0x7F else c ^ 0x01 for c in range(256))))
    if dtype == "F32":
        import struct

        return b"".join(struct.pack("<f", 2.0 ** rng.randint(-12, -6)) for _ in range(size // 4))
    return bytes(size)


def write_checkpoint(root: Path, layers: int, experts: int, shard_size: int) -> None:
    rng = random.Random(0)
    tensors = [("model.embed_tokens.weight", "BF16", (1024, HIDDEN))]
    for layer in range(layers):
        tensors += layer_tensors(layer, experts)
    tensors += [("model.norm.weight", "BF16", (HIDDEN,)), ("lm_head.weight", "BF16", (1024, HIDDEN))]
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + nbytes(tensor[1], tensor[2]) > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes(tensor[1], tensor[2])
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    fp8_block = _fill("F8_E4M3", 16 * 1024 * 1024, rng)
    weight_map = {}
    for i, members in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        infos, position = [], 0
        for name, dtype, shape in members:
            infos.append(TensorInfo(name, dtype, shape, position, position + nbytes(dtype, shape)))
            position += nbytes(dtype, shape)
            weight_map[name] = filename
        with open(partial / filename, "wb") as f:
            f.write(encode_header(infos, {"format": "pt"}))
            for _name, dtype, shape in members:
                remaining = nbytes(dtype, shape)
                while remaining:
                    piece = fp8_block[:remaining] if dtype == "F8_E4M3" else _fill(dtype, min(remaining, 1 << 20), rng)
                    f.write(piece)
                    remaining -= len(piece)
    config = CONFIG | {"num_hidden_layers": layers, "n_routed_experts": experts}
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    total = sum(nbytes(d, s) for _, d, s in tensors)
    (partial / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    os.sync()
    partial.rename(root)


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1, help="MoE layers (default 1)")
    parser.add_argument("--experts", type=int, default=256, help="routed experts per layer (DeepSeek-V3: 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="convert's --workers (default: its own)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-data"))
    parser.add_argument("--shard-size", default="4GB", help="source shard size (default 4GB)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results to FILE")
    args = parser.parse_args(argv)

    source = args.workdir / f"deepseek-v3-fp8-{args.layers}x{args.experts}-g{GENERATOR_VERSION}"
    if not source.exists():
        log(f"generating {source}")
        write_checkpoint(source, args.layers, args.experts, parse_size(args.shard_size))
    size = tree_bytes(source)
    out = args.workdir / "out"
    workers = ["--workers", str(args.workers)] if args.workers else []
    convert = [
        sys.executable,
        "-m",
        "fusemoe_ckpt",
        "convert",
        "-q",
        "--overwrite",
        str(source),
        str(out / "convert"),
        *workers,
    ]
    tools = [
        Tool("cp -r", ["cp", "-r", str(source), str(out / "cp")], out / "cp", role="cp"),
        Tool("convert --no-fsync", [*convert, "--no-fsync"], out / "convert", role="convert"),
        Tool("convert", convert, out / "convert", role="convert"),
        Tool("cp -r && sync", ["sh", "-c", f"cp -r '{source}' '{out / 'cp'}' && sync"], out / "cp", role="cp"),
        Tool(
            "convert --dequantize --no-fsync", [*convert, "--dequantize", "--no-fsync"], out / "convert", role="convert"
        ),
    ]
    warm_page_cache(source)
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / "logs-fp8").mkdir(exist_ok=True)
    rounds = run_rounds(tools, args.repeats, out.parent / "logs-fp8")
    # One more dequantized output to measure its size (twice the FP8 weights, less the scales).
    run_measured([*convert, "--dequantize", "--no-fsync"], out.parent / "logs-fp8" / "size.log")
    dequantized_size = tree_bytes(out / "convert")
    shutil.rmtree(out / "convert")

    def median(name: str, field: str) -> float:
        return statistics.median(getattr(r[name], field) for r in rounds)

    def paired(a: str, b: str) -> float:
        return statistics.median(r[a].wall_s / r[b].wall_s for r in rounds)

    print(f"\nmachine: {platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"peak RSS: {rss_method()}")
    print(f"source: {source.name}, {format_size(size)}; dequantized output {format_size(dequantized_size)}")
    print(f"{'tool':<36} {'wall s':>8} {'GB/s out':>9} {'peak MiB':>9}")
    for tool in tools:
        written = dequantized_size if "dequantize" in tool.name else size
        wall = median(tool.name, "wall_s")
        print(f"{tool.name:<36} {wall:8.2f} {written / wall / 1e9:9.2f} {median(tool.name, 'max_rss_kib') / 1024:9.1f}")
    ratios = {
        "convert --no-fsync / cp -r": paired("convert --no-fsync", "cp -r"),
        "convert / (cp -r && sync)": paired("convert", "cp -r && sync"),
        "dequantize GB/s / convert --no-fsync GB/s": statistics.median(
            (dequantized_size / r["convert --dequantize --no-fsync"].wall_s) / (size / r["convert --no-fsync"].wall_s)
            for r in rounds
        ),
    }
    for name, value in ratios.items():
        print(f"{name:<44} {value:6.2f} (median of per-round ratios)")
    if args.json:
        document = {
            "source_bytes": size,
            "dequantized_bytes": dequantized_size,
            "rounds": [{name: vars(s) for name, s in r.items()} for r in rounds],
            "ratios": ratios,
            "gnu_time": os.access(GNU_TIME, os.X_OK),
        }
        args.json.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
