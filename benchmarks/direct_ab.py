"""Durable convert written directly against through the page cache, paired in one run.

    python3 benchmarks/direct_ab.py SRC --workdir DIR [--rounds 5] [--variant direct --variant page-cache ...]

Each variant is a whole `convert` process with the write route forced (`write.writer.DIRECT_IO`, and
`page_cache_absorbs` answering "no" so that direct writes are taken at any size) and, for direct
writes, the block size, writes in flight and whether each shard's space is reserved first given:
`direct`, `direct:chunk=2,in_flight=8` (MiB), `direct:reserve=0` (no fallocate), `page-cache`.
Rounds alternate the variants' order; before each run the output is removed and `sync` run. The
report gives each variant's median wall time with every run's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

_RUN = """
import sys
from fusemoe_ckpt.write import direct, writer
route, chunk, in_flight, reserve, src, dst = sys.argv[1:7]
writer.DIRECT_IO = route == "direct"
writer.page_cache_absorbs = lambda nbytes: False
direct.CHUNK = int(chunk) << 20
writer.IN_FLIGHT = int(in_flight)
if reserve == "0":
    writer.preallocate = lambda fd, size, path: None
from fusemoe_ckpt.cli import main
sys.argv = ["fusemoe-ckpt", "convert", "-q", src, dst]
main()
"""


def parse_variant(text: str) -> tuple[str, int, int, int]:
    """(route, block MiB, writes in flight, reserve) of `direct[:chunk=C,in_flight=N,reserve=R]` or
    `page-cache`."""
    route, _, options = text.partition(":")
    if route not in ("direct", "page-cache"):
        raise argparse.ArgumentTypeError(f"{text}: a variant is direct[:chunk=C,in_flight=N,reserve=R] or page-cache")
    settings = {"chunk": 1, "in_flight": 8, "reserve": 1}
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        if key not in settings or not value.isdigit():
            raise argparse.ArgumentTypeError(f"{text}: unknown option {option!r}")
        settings[key] = int(value)
    return route, settings["chunk"], settings["in_flight"], settings["reserve"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="the source checkpoint (bench_convert.py --generate-only makes one)")
    parser.add_argument("--workdir", type=Path, required=True, help="where each run writes its output")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variant", action="append", help="direct[:chunk=C,in_flight=N,reserve=R] or page-cache")
    args = parser.parse_args()
    names = args.variant or ["direct", "page-cache"]
    variants = {name: parse_variant(name) for name in names}
    out = args.workdir / "direct-ab-out"
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            route, chunk, in_flight, reserve = variants[name]
            settings = (route, str(chunk), str(in_flight), str(reserve))
            command = [sys.executable, "-c", _RUN, *settings, str(args.src), str(out)]
            started = time.perf_counter()
            subprocess.run(command, check=True)
            times[name].append(time.perf_counter() - started)
    shutil.rmtree(out, ignore_errors=True)
    print(f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`")
    for name, runs in times.items():
        print(f"{name}: median {statistics.median(runs):.2f} s ({', '.join(f'{t:.2f}' for t in runs)})")


if __name__ == "__main__":
    main()
