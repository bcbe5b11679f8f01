#!/usr/bin/env bash
# Set up (if needed) and train the built-in tiny Lumina 2 demo LoRA offline.
# Writes both LoRA formats, validation previews and a loss plot under ${1:-tuner-demo}/run/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m trainer_core demo --output "${1:-tuner-demo}"
