#!/usr/bin/env bash
# Make sure the Fashion-MNIST IDX files exist; print their directory.
# Debian ships them (package dataset-fashion-mnist); elsewhere torchvision downloads them.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ ! -f "$dir/t10k-labels-idx1-ubyte.gz" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }) >&2
fi
if [ ! -f "$dir/t10k-labels-idx1-ubyte.gz" ]; then
  dir="${XDG_CACHE_HOME:-$HOME/.cache}/freezetune/FashionMNIST/raw"
  "$(dirname "$0")/../.venv/bin/python" -c "import torchvision, os; torchvision.datasets.FashionMNIST(os.path.dirname(os.path.dirname('$dir')), download=True)" >&2
fi
echo "$dir"
