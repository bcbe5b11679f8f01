#!/usr/bin/env bash
# Create .venv (once) with the CPU build of torch and this package in editable mode.
# Idempotent: a second call only checks that the environment imports.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import trainer_core, torch, diffusers" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # The local CPU wheel; a bare `torch` requirement would pull a multi-GB CUDA build.
  # On a GPU machine, install a CUDA build of torch instead before running this script.
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -c .ci/constraints.txt -e ".[dev]"
fi
