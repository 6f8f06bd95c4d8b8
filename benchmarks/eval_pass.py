"""Eval-pass benchmark (CPU): images through the eval pipeline image by image, or a batch at once.

The eval pipeline (to RGB, resize, centre crop, normalise) has no randomness, so the datasets run it once on each
loader batch: ``InMemoryImageDataset.__getitems__`` on an IDX dataset (Fashion-MNIST, the main job's data, held as
one uint8 tensor), ``FileImageDataset.__getitems__`` on each group of same-size images of a folder (``--source
folder``: the same test images written once as PNG files). Both contenders go through the same ``DataLoader`` in the
trainer's batch size and must give the same tensors (a digest of the bytes of every batch is compared); the fastest of
``--repeat`` passes counts.

    python benchmarks/eval_pass.py                    # the 10 000 test images at 64 px, batch 32, 1 thread
    python benchmarks/eval_pass.py --source folder    # ... as 10 000 PNG files (decoding included)
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from _common import table
from freezetune.data.folder import scan_folder
from freezetune.data.idx import load_idx
from freezetune.data.transforms import eval_transform
from freezetune.model.preprocess import Preprocess

FASHION = "/usr/share/datasets/fashion-mnist"


def timed_pass(dataset, batch_size: int) -> tuple[float, str]:
    """Seconds the loader took to deliver every batch of ``dataset`` (the digest's hashing not counted), and a digest
    of the bytes of every batch."""
    batches, seconds, digest = iter(DataLoader(dataset, batch_size=batch_size)), 0.0, hashlib.sha256()
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        seconds += time.perf_counter() - start
        if batch is None:
            return seconds, digest.hexdigest()
        digest.update(batch[0].numpy().tobytes())
        digest.update(batch[1].numpy().tobytes())


def png_folder(idx_dir: str, work_dir: Path):
    """The IDX test split as ``work_dir/<class>/<i>.png``, written once and reused."""
    from PIL import Image

    images = load_idx(idx_dir, "test")
    root = work_dir / f"png-{len(images)}"
    if not (root / "done").exists():
        for i in range(len(images)):
            folder = root / images.classes[int(images.targets[i])].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images.images[i].numpy()).save(folder / f"{i}.png")
        (root / "done").touch()
    return scan_folder(root)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=FASHION, help="an IDX directory [default: %(default)s]")
    p.add_argument("--source", choices=("idx", "folder"), default="idx", help="[default: %(default)s]")
    p.add_argument(
        "--work-dir",
        default=str(Path(tempfile.gettempdir()) / "freezetune-bench-eval"),
        help="where --source folder writes its PNG files [default: %(default)s]",
    )
    p.add_argument("--res", type=int, default=64, help="the model's input size [default: %(default)s]")
    p.add_argument("--batch-size", type=int, default=32, help="[default: %(default)s]")
    p.add_argument("--threads", type=int, default=1, help="torch threads [default: %(default)s]")
    p.add_argument("--repeat", type=int, default=2, help="timed passes of each, in turns [default: %(default)s]")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.source == "folder":
        dataset = png_folder(args.data, Path(args.work_dir))
    else:
        dataset = load_idx(args.data, "test")
    dataset.transform = eval_transform(Preprocess(input_size=args.res))
    times: dict[str, list[float]] = {"image by image": [], "batched": []}
    digests = set()
    for _ in range(args.repeat):
        for name in times:
            dataset.transform.batchable = name == "batched"  # the instance's flag hides the class's
            seconds, digest = timed_pass(dataset, args.batch_size)
            times[name].append(seconds)
            digests.add(digest)
    base = min(times["image by image"])
    rows = [
        [name, f"{min(t):.2f}", f"{len(dataset) / min(t):,.0f}", f"{base / min(t):.2f}"] for name, t in times.items()
    ]
    print(f"eval pass: {len(dataset)} images of {args.data} ({args.source}) at {args.res} px, batch {args.batch_size}, "
          f"{args.threads} thread(s), fastest of {args.repeat}")  # fmt: skip
    print(table(rows, ["contender", "s", "img/s", "x image by image"]))
    print(f"same tensors from both: {len(digests) == 1}")


if __name__ == "__main__":
    main()
