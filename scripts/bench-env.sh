#!/usr/bin/env bash
# Create .venv-bench: freezetune plus the peers the transfer benchmark compares against (Lightning, fastai).
# A separate venv so the peers never enter the test environment. Idempotent: reuses an existing .venv-bench.
# torch/torchvision are pinned through a constraints file, so no peer can swap them for another build; a peer
# whose requirements cannot live with that torch is skipped (the benchmark then reports it "skipped").
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-bench
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip >/dev/null
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
printf 'torch==2.14.1\ntorchvision==0.29.1\n' >"$pins"
# torch/torchvision first: on this machine kind both come from local disk.
"$py" -m pip install -q -c "$pins" "torch==2.14.1" "torchvision==0.29.1"
# scikit-image: the photos loader.py turns into JPEGs; pytest: gpu.sh runs the CUDA tests with this interpreter
"$py" -m pip install -q -c "$pins" -e ".[weights]" scikit-image pytest
for peer in lightning fastai; do
  if ! "$py" -m pip install -q -c "$pins" "$peer"; then
    echo "bench-env: $peer cannot be installed beside torch 2.14.1; the benchmark will report it skipped" >&2
  fi
done
"$py" - <<'EOF'
import importlib.metadata as md

for name in ("torch", "torchvision", "timm", "lightning", "fastai"):
    try:
        print(f"{name:12s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:12s} not installed")
EOF
