"""Does mlx-lm load the fused layout? Load tiny per-expert and fused checkpoints with mlx_lm's
load_model, strict (what `mlx_lm.load` does) and not strict (what `sharded_load` does), and compare
every parameter with the per-expert original's.

    python scripts/check_gguf_consumers.py LLAMA_CPP_DIR OUT qwen3_moe mixtral deepseek_v3  # writes the models
    MLX_PYTHON scripts/check_mlx_consumers.py OUT qwen3_moe mixtral deepseek_v3

MLX_PYTHON is a Python with `mlx[cpu]` and `mlx-lm` installed (not fusemoe-ckpt's dependencies). The
checkpoints are copied beside them (OUT/mlx/...) with `rope_theta` (and qwen3_moe's `num_experts`)
added to config.json: transformers 5 writes them inside `rope_parameters` and as
`num_local_experts`, which mlx-lm's ModelArgs do not read.

Result recorded in src/fusemoe_ckpt/rules/consumers.py (mlx-lm 0.32.0, CPU): every original loads
strict; every fused checkpoint is refused strict ("Received N parameters not in model"), and loads
without an error when not strict, its expert weights (mixtral: and router) differing from the original's.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model


def _mlx_copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    if config.get("model_type") == "qwen3_moe":
        config.setdefault("num_experts", config.get("num_local_experts"))
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def main() -> None:
    out = Path(sys.argv[1]).resolve()
    for model_type in sys.argv[2:]:
        original = _mlx_copy(out / model_type / "original", out / "mlx" / model_type / "original")
        fused = _mlx_copy(out / model_type / "fused", out / "mlx" / model_type / "fused")
        print(f"== {model_type}")
        reference, _ = load_model(original, strict=True)
        print("   original, strict: loaded")
        try:
            load_model(fused, strict=True)
            print("   fused, strict: loaded")
        except ValueError as e:
            print(f"   fused, strict: ValueError: {str(e).splitlines()[0]}")
        loose, _ = load_model(fused, strict=False)
        want, got = dict(tree_flatten(reference.parameters())), dict(tree_flatten(loose.parameters()))
        differ = [name for name in want if not mx.array_equal(want[name], got[name]).item()]
        print(f"   fused, not strict: loaded; {len(differ)} of {len(want)} parameters differ from the original:")
        for name in differ:
            print(f"     {name}")


if __name__ == "__main__":
    main()
