#!/usr/bin/env bash
# The main job: fine-tune ImageNet EfficientNet-Lite0 on Fashion-MNIST (100 images per class) and print the test
# accuracy. The first six of its nine stages stay frozen (their features are computed once and cached); the last
# three train with AdamW, one-cycle LR and label smoothing. Extra arguments are passed to `freezetune train`
# (e.g. --device cuda --img-size 224 --epochs 10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh weights
data=$(bash scripts/fashion-mnist.sh)
exec .venv/bin/freezetune train --model timm:tf_efficientnet_lite0 --weights imagenet \
  --data "$data" --per-class 100 --val-split 0.02 --img-size 64 --epochs 3 --batch-size 32 \
  --freeze -3 "$@"
