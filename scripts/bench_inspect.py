"""Time `inspect` on a synthetic 100-shard index shaped like Qwen3-30B-A3B (48 layers x 128 experts).

    python scripts/bench_inspect.py [DIR]

Tensors are tiny (2x2 float16): only the headers' size matters to inspect. Prints the wall time of
inspect_checkpoint (first and best of 5 runs) and the tracemalloc peak of one run, divided by the
number of tensors (the figure behind inspection.PLAN_BYTES_PER_TENSOR).
"""

from __future__ import annotations

import json
import struct
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from fusemoe_ckpt.commands.inspect import inspect_checkpoint
from fusemoe_ckpt.reading.safetensors_format import TensorInfo, encode_header

SHARDS, LAYERS, EXPERTS = 100, 48, 128


def _names() -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        names += [p + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate.weight")]
        names += [f"{p}self_attn.{n}_proj.weight" for n in "qkvo"]
        names += [f"{p}mlp.experts.{e}.{n}_proj.weight" for e in range(EXPERTS) for n in ("gate", "up", "down")]
    return names


def write_index(root: Path) -> int:
    root.mkdir(parents=True, exist_ok=True)
    names = _names()
    weight_map = {}
    per_shard = -(-len(names) // SHARDS)
    for i in range(SHARDS):
        members = names[i * per_shard : (i + 1) * per_shard]
        filename = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        infos = [TensorInfo(n, "F16", (2, 2), 8 * j, 8 * j + 8) for j, n in enumerate(members)]
        (root / filename).write_bytes(encode_header(infos, {"format": "pt"}) + bytes(8 * len(members)))
        weight_map |= dict.fromkeys(members, filename)
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "qwen3_moe", "num_experts": EXPERTS, "hidden_size": 2}
    (root / "config.json").write_text(json.dumps(config))
    return len(names)


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "synthetic"
    count = write_index(root)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        report = inspect_checkpoint(root)
        times.append(time.perf_counter() - started)
    tracemalloc.start()
    inspect_checkpoint(root)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(report.modules) == LAYERS and len(report.source.shard_files) == SHARDS
    print(f"{SHARDS} shards, {count} tensors, {struct.calcsize('P') * 8}-bit Python")
    print(f"inspect: first {times[0] * 1000:.0f} ms, best {min(times) * 1000:.0f} ms")
    print(f"tracemalloc peak: {peak / 1e6:.1f} MB, {peak / count:.0f} bytes per tensor")


if __name__ == "__main__":
    main()
