#!/usr/bin/env bash
# The main job: fine-tune ImageNet EfficientNet-Lite0 on Fashion-MNIST (100 images per class, 64 px, 3 epochs) with
# freezetune's defaults and print the test accuracy. The default recipe (freeze auto) holds a validation split out of
# the training data, tries training the last 3 stages (and, on a validation split of 400 images or more, the last 2
# and 4) on cached features of the frozen rest, keeps the last 3 unless another clearly beats them on validation, then
# trains the choice; every decision is printed and written to recipe.json. Extra arguments
# are passed to `freezetune train` (e.g. --device cuda --img-size 224 --epochs 10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh weights
data=$(bash scripts/fashion-mnist.sh)
exec .venv/bin/freezetune train --model timm:tf_efficientnet_lite0 --weights imagenet \
  --data "$data" --per-class 100 --img-size 64 --epochs 3 "$@"
