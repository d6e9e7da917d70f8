"""Time and peak memory of inspect, convert, verify and unfuse against the number of tensors.

    python3 benchmarks/bench_scale.py --workdir bench-data --repeats 3 --json bench-data/scale.json

The sources are synthetic checkpoints with the tensor counts of real MoE models and tiny tensors
(benchmarks/scale_models.py: Qwen3-30B-A3B 18.9k, DeepSeek-V3 45k, Kimi-K2 70k, Kimi-K2 FP8 140k,
61 x 768 experts 141k, 61 x 1,640 experts 301k, and the 141k model with 2.3 GB of bytes instead of
2.3 MB). Each is generated once and cached in --workdir. In each round every command runs as a
whole process, in the order its input needs (inspect, convert, verify of the converted output,
unfuse of it), then `cp -r` of the source and, with --transformers, the transformers route (for the
Qwen3-shaped models, whose configs transformers builds). Before each run: sync, outputs removed,
sync. Peak RSS is `ru_maxrss` of the process through GNU time, as in bench_convert.py.

The report gives, per model and command, median wall time, its rate per 100k tensors, and median
peak RSS; a least-squares line of inspect's time against the tensor count (the per-100k slope is
the planning cost; the intercept the start-up); and the targets: peak RSS <= 64 MiB for every
command at 140k and 300k tensors, the same with 1000x the bytes, and inspect <= 1.5 s per 100k.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from bench_convert import (
    Sample,
    clean_slate,
    code_under_test,
    command_line,
    compile_package,
    log,
    machine_info,
    markdown_table,
    rss_method,
    run_measured,
    warm_page_cache,
)
from scale_models import MODELS, ensure_checkpoint

COMMANDS = ("inspect", "convert", "verify", "unfuse")
TARGET_RSS_MIB = 64
TARGET_INSPECT_S_PER_100K = 1.5
TARGET_COUNTS = (140_000, 300_000)  # the tensor counts; models within 10% of them are held to it


def commands(python: str, source: Path, out: Path, transformers: bool) -> list[tuple[str, list[str], Path | None]]:
    """(name, argv, output) of each run of one round, in the order their inputs need."""
    entry = Path(python).parent / "fusemoe-ckpt"
    tool = [str(entry)] if entry.exists() else [python, "-m", "fusemoe_ckpt"]
    runs = [
        ("inspect", [*tool, "inspect", str(source)], None),
        ("convert", [*tool, "convert", "-q", str(source), str(out / "fused")], out / "fused"),
        ("verify", [*tool, "verify", str(source), str(out / "fused")], None),
        ("unfuse", [*tool, "unfuse", "-q", str(out / "fused"), str(out / "unfused")], out / "unfused"),
        ("cp -r", ["cp", "-r", str(source), str(out / "cp")], out / "cp"),
    ]
    if transformers:
        helper = Path(__file__).with_name("transformers_route.py")
        runs.append(("transformers route", [python, str(helper), str(source), str(out / "hf")], out / "hf"))
    return runs


def bench_model(name: str, args: argparse.Namespace) -> dict:
    model = MODELS[name]
    source = ensure_checkpoint(args.workdir, model)
    tensors = model.count()
    shards = len(list(source.glob("*.safetensors")))
    size = sum(p.stat().st_size for p in source.iterdir())
    out = args.workdir / "scale-out"
    logs = args.workdir / "scale-logs"
    logs.mkdir(parents=True, exist_ok=True)
    transformers = args.transformers and model.model_type == "qwen3_moe" and tensors <= args.transformers_max
    runs = commands(sys.executable, source, out, transformers)
    warm_page_cache(source)
    samples: dict[str, list[Sample]] = {run[0]: [] for run in runs}
    for r in range(args.repeats):
        clean_slate([out])
        out.mkdir(parents=True)
        for command, argv, output in runs:
            if output is not None:
                clean_slate([output])
            sample = run_measured(argv, logs / f"{name}-{r}-{command.replace(' ', '-')}.log")
            samples[command].append(sample)
            mib = sample.max_rss_kib / 1024
            log(f"{name} round {r + 1}/{args.repeats} {command:<20} {sample.wall_s:7.2f} s {mib:7.1f} MiB")
    clean_slate([out])
    return {
        "model": name,
        "tensors": tensors,
        "shards": shards,
        "bytes": size,
        "samples": {command: [asdict(s) for s in runs_] for command, runs_ in samples.items()},
    }


def median(result: dict, command: str, field: str) -> float:
    return statistics.median(s[field] for s in result["samples"][command])


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of y against x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0
    return slope, mean_y - slope * mean_x


def render(info: dict, results: list[dict]) -> str:
    machine = info["machine"]
    lines = [
        f"Command: `{info['command']}`",
        f"Date: {info['date']}",
        f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['ram']} RAM, "
        f"kernel {machine['kernel']}, Python {machine['python']}",
        f"Filesystem: {machine['filesystem']}",
        f"Code under test: fusemoe_ckpt {info['fusemoe_ckpt']}",
        f"Peak RSS: {info['rss_method']}",
        "",
    ]
    others = sorted({c for r in results for c in r["samples"]} - set(COMMANDS), key=lambda c: c != "cp -r")
    header = ["model", "tensors", "shards", "MB", *(f"{c} s" for c in COMMANDS), "inspect s/100k"]
    header += [f"{c} MiB" for c in (*COMMANDS, *others)]
    rows = []
    for r in results:
        count = r["tensors"]
        row = [r["model"], f"{count:,}", str(r["shards"]), f"{r['bytes'] / 1e6:,.1f}"]
        row += [f"{median(r, c, 'wall_s'):.2f}" for c in COMMANDS]
        row.append(f"{median(r, 'inspect', 'wall_s') / count * 1e5:.2f}")
        row += [f"{median(r, c, 'max_rss_kib') / 1024:.1f}" if c in r["samples"] else "-" for c in (*COMMANDS, *others)]
        rows.append(row)
    lines.append(markdown_table(header, rows))
    if any("transformers route" in r["samples"] for r in results):
        lines += [
            "",
            "transformers route (wall s): "
            + ", ".join(
                f"{r['model']} {median(r, 'transformers route', 'wall_s'):.1f}"
                for r in results
                if "transformers route" in r["samples"]
            ),
        ]
    narrow = [r for r in results if not r["model"].endswith("-wide")]
    lines += ["", "Time against tensors (least squares over the models above, tiny tensors):"]
    for command in COMMANDS:
        slope, intercept = fit([(r["tensors"], median(r, command, "wall_s")) for r in narrow])
        lines.append(f"- {command}: {slope * 1e5:.2f} s per 100k tensors + {intercept:.2f} s")
    lines += ["", "Targets:"]
    for r in results:
        near = [t for t in TARGET_COUNTS if abs(r["tensors"] - t) <= 0.1 * t]
        if near:
            peak = max(max(s["max_rss_kib"] for s in r["samples"][c]) for c in COMMANDS) / 1024
            what = "with 1000x the bytes" if r["model"].endswith("-wide") else "tiny tensors"
            verdict = "met" if peak <= TARGET_RSS_MIB else "MISSED"
            lines.append(
                f"- {r['model']} ({r['tensors']:,} tensors, {what}): largest peak RSS of the four commands "
                f"{peak:.1f} MiB (target ≤ {TARGET_RSS_MIB} MiB): {verdict}"
            )
    slope, _ = fit([(r["tensors"], median(r, "inspect", "wall_s")) for r in narrow])
    verdict = "met" if slope * 1e5 <= TARGET_INSPECT_S_PER_100K else "MISSED"
    lines.append(
        f"- inspect, slope of time against tensors: {slope * 1e5:.2f} s per 100k "
        f"(target ≤ {TARGET_INSPECT_S_PER_100K} s): {verdict}"
    )
    for r in narrow:
        if r["tensors"] < 100_000:
            continue  # below 100k the start-up (about 0.1 s) weighs on the rate
        rate = median(r, "inspect", "wall_s") / r["tensors"] * 1e5
        verdict = "met" if rate <= TARGET_INSPECT_S_PER_100K else "MISSED"
        lines.append(
            f"- {r['model']}: inspect {rate:.2f} s per 100k tensors, whole process with its start-up "
            f"(target ≤ {TARGET_INSPECT_S_PER_100K} s): {verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("bench-data"), help="cached sources and outputs")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)} (default: all)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--transformers", action="store_true", help="also time the transformers route (Qwen3-shaped models)"
    )
    parser.add_argument(
        "--transformers-max", type=int, default=150_000, help="tensor count above which it is skipped (default 150k)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every sample to FILE")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models: {', '.join(unknown)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.workdir = args.workdir.absolute()
    compile_package()
    info = {
        "command": command_line(),
        "fusemoe_ckpt": code_under_test(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.workdir),
        "rss_method": rss_method(),
    }
    results = []
    try:
        for name in names:
            results.append(bench_model(name, args))
    finally:
        shutil.rmtree(args.workdir / "scale-out", ignore_errors=True)
    print(render(info, results))
    if args.json:
        args.json.write_text(json.dumps({**info, "results": results}, indent=2) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
