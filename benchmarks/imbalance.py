"""Imbalanced classes: the default command with and without ``--class-weights balanced``.

Fashion-MNIST's first five classes get ``--major`` training images each, the other five ``--minor`` (drawn with seed
0); the test set is the whole balanced test split, so its accuracy weighs every class alike, as a user who cares
about the small classes does. Each seed trains both ways (``freezetune.training.trainer.train``: the auto recipe, 64 px,
3 epochs); the table gives test accuracy and macro-F1 (``test_metrics.json``), mean over seeds with the range.

    python benchmarks/imbalance.py                          # 200 vs 20 a class, seeds 0,1,2; a few minutes on 2 cores
    python benchmarks/imbalance.py --major 100 --minor 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from _common import FASHION, MODEL, table, write_idx_dir
from freezetune.config.train_config import TrainConfig
from freezetune.data.idx import FASHION_CLASSES, load_idx
from freezetune.training.trainer import train


def imbalanced_dir(root: Path, major: int, minor: int) -> Path:
    """An IDX directory: ``major`` training images for classes 0-4, ``minor`` for 5-9; the full test split."""
    train_set, test_set = load_idx(FASHION, "train"), load_idx(FASHION, "test")
    gen = torch.Generator().manual_seed(0)
    keep = []
    for c in range(10):
        idx = torch.nonzero(train_set.targets == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=gen)][: major if c < 5 else minor])
    keep = torch.cat(keep)
    write_idx_dir(root, (train_set.images[keep], train_set.targets[keep]), (test_set.images, test_set.targets),
                   list(FASHION_CLASSES))  # fmt: skip
    return root


def run(data: Path, out: Path, seed: int, class_weights: str, args) -> dict:
    cfg = TrainConfig(model=MODEL, weights="imagenet", data=str(data), img_size=args.res, epochs=args.epochs,
                      batch_size=32, seed=seed, class_weights=class_weights, out=str(out), progress=False,
                      tensorboard=False)  # fmt: skip
    train(cfg, echo=lambda line: None)
    return json.loads((out / "test_metrics.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--major", type=int, default=200, help="training images of classes 0-4")
    p.add_argument("--minor", type=int, default=20, help="training images of classes 5-9")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--res", type=int, default=64)
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="ft-imbalance-") as tmp:
        data = imbalanced_dir(Path(tmp) / "fashion-imbalanced", args.major, args.minor)
        results = {cw: [run(data, Path(tmp) / f"{cw}-{s}", s, cw, args) for s in seeds] for cw in ("none", "balanced")}
    rows = []
    for cw, metrics in results.items():
        row = [f"--class-weights {cw}"]
        for key in ("acc", "macro_f1"):
            values = [100 * m[key] for m in metrics]
            row += [f"{statistics.mean(values):.2f}", f"{min(values):.2f}-{max(values):.2f}"]
        rows.append(row)
    print(f"imbalance: {MODEL} ImageNet -> Fashion-MNIST, {args.major} a class for 5 classes, {args.minor} for 5, "
          f"{args.res} px, {args.epochs} epochs, seeds {args.seeds}; the balanced 10,000-image test split")  # fmt: skip
    print(table(rows, ["run", "test acc %", "min-max", "macro-F1 %", "min-max"]))


if __name__ == "__main__":
    main()
