#!/usr/bin/env bash
# Create .venv and install freezetune with the given extras (default: dev). Idempotent: reuses an existing .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch/torchvision first and pinned: on this machine kind both come from local disk (a CUDA build that runs on CPU).
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[${extras}]"
