"""Measure the peak local disk and peak memory of each route of `convert` on a synthetic checkpoint.

    .venv/bin/python scripts/measure_routes.py WORKDIR [--layers 8 --experts 16 --size 1024]

Writes a per-expert Qwen3-MoE checkpoint of LAYERS layers of EXPERTS experts (gate/up/down
SIZE x 2*SIZE... bfloat16, one layer about LAYERS-th of the model) in save_pretrained's shard order,
serves it from the stand-in Hub of tests/fake_hub.py on 127.0.0.1, and converts it four ways, each
into a folder of its own: local (SRC on disk), Hub through the HF cache, --stream, --stream
--push-to-hub. While each runs, the bytes allocated under its folder (HF cache, scratch, partial
directory and DST: st_blocks, so a sparse placeholder counts what it holds) are polled every 20 ms;
the peak RSS is the process's ru_maxrss. The checkpoint is written and the Hub served by processes
of their own, so that the measured processes are forked from a small one (ru_maxrss counts what a
process held before exec). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARD = 100 * 1000**2


def write_checkpoint(folder: Path, layers: int, experts: int, size: int) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    hidden, inter = size, size // 2
    tensors: list[tuple[str, torch.Tensor]] = [
        ("model.embed_tokens.weight", torch.zeros(4096, hidden, dtype=torch.bfloat16))
    ]
    for layer in range(layers):
        tensors.append((f"model.layers.{layer}.mlp.gate.weight", torch.zeros(experts, hidden, dtype=torch.bfloat16)))
        for e in range(experts):
            p = f"model.layers.{layer}.mlp.experts.{e}."
            v = float(10 * layer + e)
            tensors.append((f"{p}gate_proj.weight", torch.full((inter, hidden), v, dtype=torch.bfloat16)))
            tensors.append((f"{p}up_proj.weight", torch.full((inter, hidden), v + 0.5, dtype=torch.bfloat16)))
            tensors.append((f"{p}down_proj.weight", torch.full((hidden, inter), -v, dtype=torch.bfloat16)))
    tensors.append(("model.norm.weight", torch.ones(hidden, dtype=torch.bfloat16)))
    total = sum(t.numel() * 2 for _, t in tensors)
    count = max(1, -(-total // SHARD))
    groups: list[dict] = [{} for _ in range(count)]
    before = 0
    for name, t in tensors:
        groups[before * count // total][name] = t
        before += t.numel() * 2
    weight_map = {}
    for i, group in enumerate(groups):
        filename = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        save_file(group, folder / filename, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(group, filename)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": hidden}
    (folder / "config.json").write_text(json.dumps(config | {"num_experts": experts}))


def allocated(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def run(command: list[str], folder: Path, env: dict[str, str]) -> tuple[int, int, float]:
    """Peak bytes under `folder`, peak RSS in bytes, seconds."""
    peak = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, allocated(folder))
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    poller.start()
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    poller.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command} failed")
    return peak, usage.ru_maxrss * 1024, time.perf_counter() - started


def serve(repo: Path) -> None:
    """Serve `repo` as synthetic/moe until stdin closes; the first line printed is the Hub's URL."""
    from tests.fake_hub import FakeHub

    with FakeHub() as hub:
        hub.add_repo("synthetic/moe", repo)
        print(hub.url, flush=True)
        sys.stdin.read()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--step", choices=["write", "serve"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.workdir.absolute()
    repo = work / "repo"
    if args.step == "write":
        return write_checkpoint(repo, args.layers, args.experts, args.size)
    if args.step == "serve":
        return serve(repo)
    shutil.rmtree(work, ignore_errors=True)
    sizes = ["--layers", str(args.layers), "--experts", str(args.experts), "--size", str(args.size)]
    subprocess.run([sys.executable, __file__, str(work), *sizes, "--step", "write"], check=True)
    model = sum(p.stat().st_size for p in repo.glob("*.safetensors"))
    shards = len(list(repo.glob("*.safetensors")))
    largest = max(p.stat().st_size for p in repo.glob("*.safetensors"))
    convert = [sys.executable, "-m", "fusemoe_ckpt", "convert", "-q", "--max-shard-size", "100MB"]
    rows = []
    server = subprocess.Popen(
        [sys.executable, __file__, str(work), "--step", "serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    url = server.stdout.readline().strip()
    try:
        for route, extra, src in [
            ("local", [], str(repo)),
            ("Hub through the HF cache", [], "synthetic/moe"),
            ("Hub, --stream", ["--stream"], "synthetic/moe"),
            ("Hub, --stream --push-to-hub", ["--stream", "--push-to-hub", "me/fused"], "synthetic/moe"),
        ]:
            folder = work / route.split(",")[-1].strip().replace(" ", "_").replace("-", "")
            folder.mkdir()
            env = os.environ | {
                "HF_ENDPOINT": url,
                "HF_HOME": str(folder / "hf-home"),
                "HF_TOKEN": "hf_dummy",
                "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1",
            }
            peak, rss, seconds = run([*convert, src, str(folder / "dst"), *extra], folder, env)
            rows.append((route, peak, rss, seconds))
            shutil.rmtree(folder)
    finally:
        server.stdin.close()
        server.wait()
    print(f"model: {model} bytes in {shards} shards (largest {largest}), output shards of at most 100 MB\n")
    print("| route | peak disk | peak disk / model | peak RSS | time |")
    print("| --- | --- | --- | --- | --- |")
    for route, peak, rss, seconds in rows:
        print(f"| {route} | {peak / 1e6:.0f} MB | {peak / model:.2f} | {rss / 1e6:.0f} MB | {seconds:.1f} s |")


if __name__ == "__main__":
    main()
