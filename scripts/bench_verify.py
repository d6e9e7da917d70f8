"""Time convert and verify on a synthetic per-expert checkpoint of about 1.6 GB of bfloat16 experts.

    python scripts/bench_verify.py [DIR]

8 layers x 64 experts x (gate, up, down) of 512 x 1024 bfloat16 (1 MiB each), random bytes, over 8
shards. Prints seconds, GB/s and the peak RSS of each step (each run in a fresh process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fusemoe_ckpt.reading.safetensors_format import TensorInfo, encode_header

LAYERS, EXPERTS, SHARDS, ROWS, COLS = 8, 64, 8, 512, 1024


def write_source(root: Path) -> int:
    root.mkdir(parents=True, exist_ok=True)
    size = ROWS * COLS * 2
    names = [
        f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight"
        for layer in range(LAYERS)
        for e in range(EXPERTS)
        for p in ("gate", "up", "down")
    ]
    weight_map = {}
    per_shard = len(names) // SHARDS
    for i in range(SHARDS):
        members = names[i * per_shard : (i + 1) * per_shard]
        infos = [
            TensorInfo(
                n, "BF16", (COLS, ROWS) if n.endswith("down_proj.weight") else (ROWS, COLS), j * size, (j + 1) * size
            )
            for j, n in enumerate(members)
        ]
        filename = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        with open(root / filename, "wb") as f:
            f.write(encode_header(infos, {"format": "pt"}))
            for _ in members:
                f.write(os.urandom(size))
        weight_map |= dict.fromkeys(members, filename)
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_experts": EXPERTS}))
    return len(names) * size


STEP = """
import resource, sys, time
from fusemoe_ckpt import convert, verify
src, dst, step = sys.argv[1:4]
started = time.perf_counter()
if step == "convert":
    convert(src, dst, durable=False)
else:
    verify(src, dst).raise_if_failed()
print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    total = write_source(work / "src")
    for step in ("convert", "verify"):
        out = subprocess.run(
            [sys.executable, "-c", STEP, str(work / "src"), str(work / "dst"), step],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        seconds, rss_kb = float(out[0]), int(out[1])
        rate = total / seconds / 1e9
        print(f"{step}: {total / 1e9:.2f} GB in {seconds:.2f} s, {rate:.2f} GB/s, peak RSS {rss_kb / 1024:.0f} MB")


if __name__ == "__main__":
    main()
