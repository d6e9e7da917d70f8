"""Time loading onto the GPU: a fused checkpoint through accelerate dispatch, next to transformers'
`from_pretrained(original, device_map="cuda")`, each in a fresh process, alternating in pairs.

    python benchmarks/gpu_load.py ORIGINAL_DIR FUSED_DIR [--repeats 3]

Prints the card, the median and min-max wall seconds of each, and their ratio. The page cache is
dropped between runs where the machine allows it (`/proc/sys/vm/drop_caches`, as root), so both
loaders read from disk; where it cannot be dropped, both read from a warm cache.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

LOADERS = {
    "dispatch(fused)": """
import torch
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained(PATH)
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model = load_checkpoint_and_dispatch(model, PATH, device_map={"": 0}, dtype=torch.bfloat16, strict=True)
torch.cuda.synchronize()
assert not [n for n, p in model.named_parameters() if p.device.type != "cuda"]
""",
    "from_pretrained(original)": """
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.bfloat16, device_map="cuda")
torch.cuda.synchronize()
assert not [n for n, p in model.named_parameters() if p.device.type != "cuda"]
""",
}


def _drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _time(loader: str, path: str) -> float:
    dropped = _drop_caches()
    code = f"PATH = {path!r}\n" + LOADERS[loader]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    seconds = time.perf_counter() - start
    print(f"  {loader}: {seconds:.1f} s (page cache {'dropped' if dropped else 'warm'})", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("original")
    parser.add_argument("fused")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    print(f"card: {torch.cuda.get_device_name()}; command: {' '.join(sys.argv)}")
    paths = {"dispatch(fused)": args.fused, "from_pretrained(original)": args.original}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(args.repeats):
        order = list(paths) if i % 2 == 0 else list(reversed(paths))
        for name in order:
            times[name].append(_time(name, paths[name]))
    for name, values in times.items():
        print(f"{name:28s} median {statistics.median(values):7.1f} s   min-max {min(values):.1f}-{max(values):.1f} s")
    ratio = statistics.median(times["dispatch(fused)"]) / statistics.median(times["from_pretrained(original)"])
    print(f"dispatch(fused) / from_pretrained(original): {ratio:.2f}")


if __name__ == "__main__":
    main()
