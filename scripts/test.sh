#!/usr/bin/env bash
# Set up and run the whole test suite (lint first, then pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests examples benchmarks scripts
.venv/bin/ruff format --check src tests examples benchmarks scripts
# tests/test_slurm.py starts a real Slurm: install the distribution's packages when missing (root
# with apt-get only; otherwise the test is skipped, saying why).
bash scripts/install_slurm.sh
.venv/bin/python -m pytest "$@"
