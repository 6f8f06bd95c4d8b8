"""BatchNorm folding benchmark (CPU): a model's evaluation forward as trained against its ``freezetune.device.bn_fold``
copy.

freezetune evaluates on a CPU (the final test, each epoch's validation, ``freezetune eval``) through a copy of the
model whose BatchNorm layers are folded into the convolutions before them. Both contenders run the same batches in
inference mode, channels_last as the trainer feeds a CPU, in turns (as trained, folded, as trained, ...); img/s is the
fastest of ``--repeat`` passes, and the largest logit difference between them is printed beside it. The one-off cost
of a fold (the fx trace the first time, then a copy) is its own column.

    python benchmarks/bn_fold.py                                   # lite0 and resnet50, 64 px, batch 32
    python benchmarks/bn_fold.py --models test_efficientnet --res 32 --n-images 64     # a quick check
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import table
from freezetune.device.bn_fold import foldable_pairs, folded


def images_per_second(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            model(x)
    return sum(len(x) for x in batches) / (time.perf_counter() - start)


def measure(name: str, args) -> list[str]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, 3, args.res, args.res, generator=g).contiguous(
        memory_format=torch.channels_last) for _ in range(max(1, args.n_images // args.batch_size))]  # fmt: skip
    start = time.perf_counter()
    copy = folded(model)
    fold_ms = 1000 * (time.perf_counter() - start)
    with torch.inference_mode():
        diff = (copy(batches[0]) - model(batches[0])).abs().max().item()
    images_per_second(model, batches[:1]), images_per_second(copy, batches[:1])  # warm-up
    best = {"trained": 0.0, "folded": 0.0}
    for _ in range(args.repeat):
        best["trained"] = max(best["trained"], images_per_second(model, batches))
        best["folded"] = max(best["folded"], images_per_second(copy, batches))
    ratio = best["folded"] / best["trained"]
    return [name, str(len(foldable_pairs(model))), f"{fold_ms:.0f}", f"{best['trained']:.0f}", f"{best['folded']:.0f}",
            f"{ratio:.2f}", f"{diff:.1e}"]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tf_efficientnet_lite0,resnet50")
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-images", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="folding is used on CPUs only")
    args = parser.parse_args(argv)
    print(f"bn_fold: eval forward, {args.res} px, batch {args.batch_size}, {args.n_images} images, "
          f"{torch.get_num_threads()} thread(s), fastest of {args.repeat}")  # fmt: skip
    rows = [measure(name, args) for name in args.models.split(",")]
    print(table(rows, ["model", "pairs", "fold ms", "trained img/s", "folded img/s", "x trained", "max |dlogit|"]))


if __name__ == "__main__":
    main()
