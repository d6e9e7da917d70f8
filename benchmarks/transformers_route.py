"""The transformers route that `fusemoe-ckpt convert` replaces: load, let transformers fuse, save.

    python benchmarks/transformers_route.py SRC DST [--max-shard-size 5GB]

Loads the per-expert checkpoint SRC with `AutoModelForCausalLM.from_pretrained` in bfloat16 (the
experts are fused while loading), refuses any missing, unexpected or mismatched key so that a
half-built model cannot pass for a fast one, and saves the fused layout to DST with
`save_pretrained(..., save_original_format=False)`. bench_convert.py times this as a whole process.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="per-expert checkpoint directory")
    parser.add_argument("dst", help="directory to save the fused checkpoint to")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard (default: 5GB, as convert's)")
    args = parser.parse_args(argv)

    model, info = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.bfloat16, output_loading_info=True)
    problems = {kind: keys for kind, keys in info.items() if keys}
    if problems:
        raise SystemExit(f"{args.src}: from_pretrained did not load cleanly: {problems}")
    model.save_pretrained(args.dst, save_original_format=False, max_shard_size=args.max_shard_size)


if __name__ == "__main__":
    main()
