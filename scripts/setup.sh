#!/usr/bin/env bash
# Create .venv and install fusemoe-ckpt with its test extras. torch is pinned to the CPU build
# that this project's machines carry on local disk; a looser pin can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[test]"
