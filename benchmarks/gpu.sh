#!/usr/bin/env bash
# The one-GPU benchmark run: throughput.py, then transfer.py at 224 px, 10 epochs, 100 images per class, all on
# --device cuda, then one summary of both. Sized for under 5 minutes on one H100 (untested on a GPU so far).
#
#   bash scripts/bench-env.sh && bash benchmarks/gpu.sh        # with Lightning and fastai (.venv-bench)
#   PYTHON=.venv/bin/python bash benchmarks/gpu.sh              # without: those two are reported as skipped
#
# Results land in $BENCH_OUT (default: a new temp dir), one text file per benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."

py="${PYTHON:-.venv-bench/bin/python}"
if [ ! -x "$py" ]; then
  echo "gpu.sh: $py not found; falling back to .venv (Lightning and fastai will be skipped)" >&2
  py=.venv/bin/python
fi
# Guard: every command below passes --device cuda, which must fail here and now rather than after minutes of setup.
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu.sh: no CUDA device visible; for CPU numbers see benchmarks/README.md" >&2
  exit 2
fi

export HF_HUB_OFFLINE=1 # the EfficientNet-Lite0 ImageNet weights are packaged: never wait on a hub
out="${BENCH_OUT:-$(mktemp -d -t freezetune-bench-XXXXXX)}"
mkdir -p "$out"
start=$SECONDS

echo "== throughput ($("$py" -c 'import torch; print(torch.cuda.get_device_name(0))')) =="
"$py" benchmarks/throughput.py --device cuda | tee "$out/throughput.txt"

echo "== transfer =="
"$py" benchmarks/transfer.py --device cuda --res 224 --epochs 10 --per-class 100 | tee "$out/transfer.txt"

echo
echo "================================ summary ($((SECONDS - start)) s, files in $out) ================================"
sed -n '/^throughput on/,$p' "$out/throughput.txt"
echo
sed -n '/^transfer:/,$p' "$out/transfer.txt"
