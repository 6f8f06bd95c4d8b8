"""Decode benchmark (CPU): large JPEG photos through the eval pipeline, decoded whole or at a reduced scale.

A phone's photo is 12 megapixels; a model sees 64 to 224 pixels of it. ``load_image(path, min_side=...)`` lets
libjpeg decode at 1/2, 1/4 or 1/8 of the size (in the DCT, PIL's ``draft``) while both sides stay at least
``Preprocess.decode_side`` (twice the eval resize); ``build_datasets`` and ``predict`` read files so. Both contenders
read the same files through ``FileImageDataset`` and the eval transform in a ``DataLoader`` (no workers, batch 32),
in turns, the fastest of ``--repeat`` passes counting. Beside the speed: how far apart the two give the model's input
(in 8-bit levels of each pixel, the normalisation undone) and, with the packaged ImageNet EfficientNet-Lite0, how
often its top-1 class and by how much its top probability move.

The photos: scikit-image's bundled photos (no download), each file a random crop of one, resized to 4032x3024 (a
quarter of them portrait, 3024x4032), with Gaussian noise (sigma 4 levels, a sensor's grain: an upscaled photo alone
is smoother than a real one), saved as JPEG quality 90 under ``--work-dir`` once; the source photo is the class.

    python benchmarks/decode.py                    # 48 photos at 64 and 224 px, 1 thread
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from _common import table
from freezetune.data.folder import scan_folder
from freezetune.data.transforms import eval_transform
from freezetune.model.preprocess import Preprocess

SOURCES = ("astronaut", "chelsea", "coffee", "rocket")  # RGB photos shipped with scikit-image
SIZE = (4032, 3024)  # a 12-megapixel phone photo, landscape


def photo_folder(work_dir: Path, n: int) -> Path:
    """``n`` noisy 12-megapixel JPEGs in ``work_dir/photos-n/<source>/``, written once and reused."""
    from skimage import data

    root = work_dir / f"photos-{n}"
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        name = SOURCES[i % len(SOURCES)]
        src = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = SIZE if rng.random() >= 0.25 else SIZE[::-1]
        scale = rng.uniform(0.6, 1.0)
        cw, ch = min(src.width, round(src.height * w / h)) * scale, min(src.height, round(src.width * h / w)) * scale
        left, top = rng.uniform(0, src.width - cw), rng.uniform(0, src.height - ch)
        img = np.asarray(src.resize((w, h), Image.BICUBIC, box=(left, top, left + cw, top + ch)), dtype=np.float32)
        img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / name / f"{i}.jpg", quality=90)
    (root / "done").touch()
    return root


def timed_pass(dataset, batch_size: int) -> tuple[float, torch.Tensor]:
    """Seconds the loader took to deliver every batch of ``dataset``, and all the inputs it delivered."""
    batches, seconds, inputs = iter(DataLoader(dataset, batch_size=batch_size)), 0.0, []
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        seconds += time.perf_counter() - start
        if batch is None:
            return seconds, torch.cat(inputs)
        inputs.append(batch[0])


def levels(a: torch.Tensor, b: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """``|a - b|`` of two normalised inputs in 8-bit levels (the normalisation undone)."""
    return (a - b).abs() * torch.tensor(pre.std).view(1, 3, 1, 1) * 255


def model_agreement(full: torch.Tensor, reduced: torch.Tensor) -> str:
    """How the packaged ImageNet EfficientNet-Lite0's predictions move between the two inputs (a 1000-class head)."""
    from freezetune.model.create import create_model

    try:
        model, _ = create_model("timm:tf_efficientnet_lite0", "imagenet")
    except Exception as exc:  # the packaged weights are an extra: say why the line is missing
        return f"model check skipped: {exc}"
    with torch.inference_mode():
        p, q = model.eval()(full).softmax(-1), model(reduced).softmax(-1)
    same = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    top = (p.max(-1).values - q.gather(-1, p.argmax(-1, keepdim=True)).squeeze(-1)).abs()
    return f"EfficientNet-Lite0 (ImageNet): same top-1 class on {100 * same:.0f} %, top probability moved by at most " \
           f"{top.max().item():.3f} (mean {top.mean().item():.4f})"  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-images", type=int, default=48, help="[default: %(default)s]")
    p.add_argument("--res", default="64,224", help="model input sizes, comma-separated [default: %(default)s]")
    p.add_argument("--batch-size", type=int, default=32, help="[default: %(default)s]")
    p.add_argument("--threads", type=int, default=1, help="torch threads [default: %(default)s]")
    p.add_argument("--repeat", type=int, default=2, help="timed passes of each, in turns [default: %(default)s]")
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "freezetune-bench-decode"),
                   help="where the photos are written [default: %(default)s]")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dataset = scan_folder(photo_folder(Path(args.work_dir), args.n_images))
    print(f"decode: {len(dataset)} JPEG photos of {SIZE[0]}x{SIZE[1]} through the eval pipeline, batch "
          f"{args.batch_size}, {args.threads} thread(s), fastest of {args.repeat}")  # fmt: skip
    for res in (int(r) for r in args.res.split(",")):
        pre = Preprocess(input_size=res)
        dataset.transform = eval_transform(pre)
        sides = {"full decode": None, f"reduced (sides >= {pre.decode_side})": pre.decode_side}
        times: dict[str, list[float]] = {name: [] for name in sides}
        inputs: dict[str, torch.Tensor] = {}
        for _ in range(args.repeat):
            for name, side in sides.items():
                dataset.min_side = side
                seconds, inputs[name] = timed_pass(dataset, args.batch_size)
                times[name].append(seconds)
        base = min(times["full decode"])
        rows = [[name, f"{min(t):.2f}", f"{len(dataset) / min(t):,.1f}", f"{base / min(t):.2f}"]
                for name, t in times.items()]  # fmt: skip
        full, reduced = inputs.values()
        diff = levels(full, reduced, pre)
        print(f"\n{res} px (eval resize {pre.eval_resize}):")
        print(table(rows, ["contender", "s", "img/s", "x full decode"]))
        print(f"input difference: mean {diff.mean():.2f}, 99th percentile {diff.flatten().quantile(0.99):.1f}, "
              f"max {diff.max():.0f} levels of 255")  # fmt: skip
        if res == 224:
            print(model_agreement(full, reduced))


if __name__ == "__main__":
    main()
