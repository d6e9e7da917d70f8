#!/usr/bin/env bash
# Set up, write the built-in tiny per-expert checkpoint, convert it, and load the result
# through accelerate dispatch, comparing logits with transformers' own loading of the original.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
work="${DEMO_DIR:-$(mktemp -d)}"
.venv/bin/fusemoe-ckpt example "$work/tiny-moe"
.venv/bin/fusemoe-ckpt convert "$work/tiny-moe" "$work/tiny-moe-fused" --overwrite
.venv/bin/python examples/load_with_accelerate.py "$work/tiny-moe-fused" "$work/tiny-moe"
