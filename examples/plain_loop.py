"""freezetune's core API in your own training loop: no trainer, no CLI, no downloads.

Fine-tunes ImageNet EfficientNet-Lite0 (the weights the ``[weights]`` extra ships) on scikit-learn's handwritten
digits, upscaled to RGB images: the head trains first, then ``ft.Unfreezer`` opens the last stage after the first
epoch and the one before it after the second, each with its own learning rate (head 1e-3, last stage 1e-4, the one
before 5e-5).

    python examples/plain_loop.py                         # Lite0, 64 px, 100 images per class, 4 epochs
    python examples/plain_loop.py --model timm:test_efficientnet --weights none --per-class 10 --epochs 2
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import freezetune as ft

try:
    from sklearn.datasets import load_digits
except ImportError:  # the data, not freezetune's: a raw traceback named neither what nor how
    raise SystemExit("plain_loop.py trains on scikit-learn's digits: pip install scikit-learn") from None


def digits(img_size: int, per_class: int, val_per_class: int, mean, std) -> tuple[TensorDataset, TensorDataset]:
    """``per_class`` training and ``val_per_class`` validation images per digit, as normalised RGB tensors."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # 8x8 grey levels 0..16
    x = F.interpolate(x, size=img_size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    by_class = [order[y[order] == c] for c in range(10)]  # about 180 images of each digit
    train_idx = torch.cat([idx[:per_class] for idx in by_class])
    val_idx = torch.cat([idx[per_class : per_class + val_per_class] for idx in by_class])
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx])


def train_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer) -> float:
    model.train()  # frozen BatchNorm layers stay in eval mode: freezetune's policy survives this call
    total, n = 0.0, 0
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, n = total + loss.item() * len(y), n + len(y)
    return total / n


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return correct / len(loader.dataset)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="timm:tf_efficientnet_lite0")
    p.add_argument("--weights", default="imagenet", help="'imagenet' (packaged, offline) or 'none'")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--per-class", type=int, default=100, help="training images per digit")
    p.add_argument("--val-per-class", type=int, default=50, help="validation images per digit")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    torch.manual_seed(0)

    model, pre = ft.create_model(args.model, args.weights, img_size=args.img_size)
    ft.replace_head(model, num_classes=10)
    ft.freeze(model, "backbone", bn="frozen")  # only the new head trains at first
    names = [s.name for s in ft.stages(model)]
    stage_lrs = {names[-2]: 1e-4, names[-3]: 5e-5}  # the head (last stage) gets lr=1e-3
    optimizer = torch.optim.AdamW(ft.param_groups(model, 1e-3, stage_lrs=stage_lrs))
    # {epoch: stage}: the last stage trains from epoch 1, the one before from epoch 2. Their optimizer groups are
    # built by the same LR rule as param_groups', so they get exactly the stage_lrs above.
    unfreezer = ft.Unfreezer(model, optimizer, {1: names[-2], 2: names[-3]}, lr=1e-3, stage_lrs=stage_lrs)
    print(ft.summary(model))

    train_set, val_set = digits(args.img_size, args.per_class, args.val_per_class, pre.mean, pre.std)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=256)
    acc = 0.0
    for epoch in range(args.epochs):
        loss = train_epoch(model, train_loader, optimizer)
        acc = accuracy(model, val_loader)
        opened = unfreezer.step(epoch, acc)
        print(f"epoch {epoch}: train_loss {loss:.3f} val_acc {acc:.3f}")
        if opened:
            groups = ", ".join(f"{g['name']} lr={g['lr']:g}" for g in optimizer.param_groups)
            print(f"  unfroze {', '.join(opened)} (trains from epoch {epoch + 1}); optimizer groups: {groups}")
    print(ft.summary(model))
    print(f"final val_acc {acc:.3f}")
    return acc


if __name__ == "__main__":
    main()
