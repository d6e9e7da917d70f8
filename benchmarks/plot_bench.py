"""Draw the BENCHMARKS.md plots from the JSON the benchmarks write.

    python3 benchmarks/plot_bench.py --convert bench-data/r-1gb.json bench-data/r-4gb.json ... \\
        --scale bench-data/scale.json [--scale-before bench-data/scale-before.json] --out docs/bench

Needs matplotlib (`pip install -e ".[bench]"`), which nothing else needs. Writes:
- `gbps_vs_size.png`: GB/s (source bytes over median wall time) against checkpoint size, for each
  tool of the bench_convert.py runs given (convert with and without fsync, `cp -r`, `cp -r && sync`,
  the disk limit, the transformers route);
- `rss_vs_tensors.png`: median peak RSS of inspect, convert, verify and unfuse against the tensor
  count (bench_scale.py), beside `cp -r` and the transformers route, and the same commands before
  (dashed) when --scale-before is given;
- `seconds_vs_tensors.png`: median wall time of the four commands against the tensor count, likewise.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

COMMANDS = ("inspect", "convert", "verify", "unfuse")
COLORS = {
    "inspect": "tab:blue",
    "convert": "tab:orange",
    "verify": "tab:green",
    "unfuse": "tab:red",
    "cp -r": "tab:gray",
    "transformers route": "tab:purple",
}


def _median(samples: list[dict], field: str) -> float:
    return statistics.median(s[field] for s in samples)


def _label(tool: str) -> str:
    return "disk limit (O_DIRECT)" if tool.startswith("disk limit") else tool


def plot_gbps(convert_files: list[Path], out: Path, plt) -> Path:
    series: dict[str, list[tuple[float, float]]] = {}
    for path in convert_files:
        document = json.loads(path.read_text())
        size = document["source"]["files_bytes"]
        for tool, data in document["tools"].items():
            if tool.startswith("python -c"):
                continue
            wall = _median(data["samples"], "wall_s")
            series.setdefault(_label(tool), []).append((size / 1e9, size / wall / 1e9))
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=100)
    for tool, points in sorted(series.items()):
        points.sort()
        style = "--" if tool.startswith(("cp", "disk", "transformers")) else "-"
        axes.plot(*zip(*points, strict=True), style, marker="o", label=tool)
    axes.set_xscale("log")
    axes.set_xlabel("checkpoint size (GB)")
    axes.set_ylabel("GB/s (source bytes / median wall time)")
    axes.set_title("Throughput against checkpoint size (each tool a whole process)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    target = out / "gbps_vs_size.png"
    figure.savefig(target)
    plt.close(figure)
    return target


def _by_command(document: dict, field: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for result in document["results"]:
        if result["model"].endswith("-wide"):
            continue
        for command, samples in result["samples"].items():
            value = _median(samples, field)
            series.setdefault(command, []).append(
                (result["tensors"], value / 1024 if field == "max_rss_kib" else value)
            )
    return {command: sorted(points) for command, points in series.items()}


def plot_scale(scale: Path, before: Path | None, out: Path, plt, *, field: str, name: str, ylabel: str) -> Path:
    now = _by_command(json.loads(scale.read_text()), field)
    earlier = _by_command(json.loads(before.read_text()), field) if before else {}
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=100)
    for command, points in now.items():
        if field == "wall_s" and command not in COMMANDS:
            continue
        axes.plot(*zip(*points, strict=True), "-", marker="o", color=COLORS.get(command), label=command)
    for command, points in earlier.items():
        if command in COMMANDS:
            axes.plot(
                *zip(*points, strict=True), ":", marker="x", color=COLORS.get(command), label=f"{command}, before"
            )
    if field == "max_rss_kib":
        axes.axhline(64, color="black", linewidth=0.8, linestyle="--", label="64 MiB target")
        axes.set_yscale("log")
    axes.set_xlabel("source tensors")
    axes.set_ylabel(ylabel)
    axes.set_title(f"{ylabel.split(' (')[0]} against tensor count (tiny tensors)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    target = out / name
    figure.savefig(target)
    plt.close(figure)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--convert", type=Path, nargs="*", default=[], help="bench_convert.py --json files")
    parser.add_argument("--scale", type=Path, help="bench_scale.py --json file")
    parser.add_argument("--scale-before", type=Path, help="bench_scale.py --json file of an earlier build")
    parser.add_argument("--out", type=Path, required=True, help="directory for the PNG files")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    if args.convert:
        written.append(plot_gbps(args.convert, args.out, plt))
    if args.scale:
        written.append(
            plot_scale(
                args.scale,
                args.scale_before,
                args.out,
                plt,
                field="max_rss_kib",
                name="rss_vs_tensors.png",
                ylabel="peak RSS (MiB, log scale)",
            )
        )
        written.append(
            plot_scale(
                args.scale,
                args.scale_before,
                args.out,
                plt,
                field="wall_s",
                name="seconds_vs_tensors.png",
                ylabel="wall time (s)",
            )
        )
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
