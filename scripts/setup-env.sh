#!/usr/bin/env bash
# Create .venv and install freezetune with the given extras (default: dev). Idempotent: reuses an existing .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
# Debian's python3 creates venvs only with python3-venv (its ensurepip); installed here when run as root.
if ! python3 -c "import ensurepip" 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q python3-venv >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q python3-venv >/dev/null; }
  else
    echo "setup-env: python3 cannot create a venv (no ensurepip): install python3-venv (sudo apt-get install python3-venv)" >&2
    exit 2
  fi
fi
# a venv whose creation failed half-way (bin/python without pip: ensurepip missing) is made again, not reused
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  rm -rf .venv
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch/torchvision first and pinned: on this machine kind both come from local disk (a CUDA build that runs on CPU).
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[${extras}]"
