"""Helpers for the engine and CLI tests: a generated image folder and in-process runs of the CLI on tiny models.

Not a conftest: test modules import what they need, so the core-API fixtures in ``conftest.py`` stay separate.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from freezetune.cli.main import main
from freezetune.config.train_config import TrainConfig

# Colour and stripe direction per class: easy enough that two epochs of a tiny random-init model learn something.
CLASSES = {"blue": ((40, 60, 220), 0), "green": ((40, 200, 60), 1), "red": ((220, 40, 40), 2)}

# A 100k-parameter timm model with BatchNorm, random init, 32 px: a CLI run takes about a second on a CPU.
TINY = ["--model", "timm:test_efficientnet", "--weights", "none", "--img-size", "32", "--device", "cpu",
        "--workers", "0", "--no-progress", "--batch-size", "8", "--cache", "off"]  # fmt: skip


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def make_idx_dir(root: Path, n_train: int = 60, n_test: int = 20, gz: bool = True) -> Path:
    """Tiny MNIST-style dir; every image is filled with its own index so overlaps between splits are detectable."""
    root.mkdir(parents=True)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.stack([np.full((8, 8), i % 256) for i in range(n)]) if n else np.zeros((0, 8, 8))
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10, gz)
    return root


def make_image_folder(root: Path, *, train: int = 12, val: int = 4, test: int = 4, size: int = 40) -> Path:
    """Write ``root/{train,val,test}/<class>/*.png``: per class a noisy colour with stripes of its own direction."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val), ("test", test)):
        if not n:
            continue
        for name, (rgb, direction) in CLASSES.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(_sample(rng, rgb, direction, size)).save(folder / f"{name}_{i}.png")
    return root


def cut_exif_jpeg(path: Path, orientation_first: bool) -> Path:
    """A 50x40 JPEG whose EXIF directory says 5 entries and holds 1 (PIL: "Corrupt EXIF data"): the orientation tag,
    6 (turn a quarter clockwise), or another tag."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, "JPEG")
    data, tag = buf.getvalue(), b"\x01\x12" if orientation_first else b"\x01\x10"
    app1 = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x05" + tag + b"\0\x03\0\0\0\x01\0\x06\0\0" + b"\xff" * 30
    path.write_bytes(data[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + data[2:])
    return path


def _sample(rng: np.random.Generator, rgb: tuple[int, int, int], direction: int, size: int) -> np.ndarray:
    grid = np.arange(size)
    stripes = {0: grid[None, :] + 0 * grid[:, None], 1: grid[:, None] + 0 * grid[None, :], 2: grid[:, None] + grid}
    mask = (stripes[direction] // 4) % 2 == 0
    img = np.asarray(rgb, dtype=np.float64)[None, None, :] * np.where(mask, 1.0, 0.6)[..., None]
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


def run_cli(capsys, *argv: str | os.PathLike) -> tuple[int, str, str]:
    """Run ``freezetune ARGV`` in this process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()  # drop anything printed before
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train_argv(data: Path, out: Path, *extra: str | os.PathLike) -> list[str]:
    """``train`` on ``data`` into ``out`` with the tiny model (flags given later win)."""
    return ["train", "--data", str(data), "--out", str(out), *TINY, *[str(e) for e in extra]]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Content and mtime of every file under ``folder``: equal snapshots mean nothing was touched."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread: tiny models gain nothing from more, and when other processes share the cores,
    OpenMP threads that wait on each other make a one-second run take ten times as long."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fashion_mnist_dir() -> Path:
    """Where ``scripts/fashion-mnist.sh`` put the IDX files: ``$FREEZETUNE_FASHION_MNIST``, Debian's package, else
    torchvision's download in the user cache (the default path, missing, when none has them: the tests skip)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "freezetune" / "FashionMNIST" / "raw"
    for folder in (os.environ.get("FREEZETUNE_FASHION_MNIST"), "/usr/share/datasets/fashion-mnist", cache):
        if folder and (Path(folder) / "t10k-labels-idx1-ubyte.gz").is_file():
            return Path(folder)
    return Path("/usr/share/datasets/fashion-mnist")


def confident_checkpoint(folder: Path) -> Path:
    """``folder/best.pt`` of an untrained 3-class tiny model whose BatchNorm statistics moved: its predictions differ
    between images, confidently (no near-ties for batching to flip)."""
    import freezetune as ft
    from freezetune.model.create import create_model
    from freezetune.model.preprocess import Preprocess
    from freezetune.run import checkpoint

    torch.manual_seed(0)
    model, _ = create_model("timm:test_efficientnet", "none")
    ft.replace_head(model, len(CLASSES))
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))
        model.get_classifier().weight.mul_(50)
    record = checkpoint.model_record(model, {"model": "timm:test_efficientnet"}, sorted(CLASSES), Preprocess(32))
    return checkpoint.save(record, folder / "best.pt")


def recipe_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    """A recipe's config on the tiny model (``TINY``'s settings, the feature cache as configured), ``kw`` laid over."""
    base = dict(model="timm:test_efficientnet", weights="none", img_size=32, device="cpu", workers=0, progress=False,
                batch_size=8, epochs=2, tensorboard=False, data=str(data), out=str(out))  # fmt: skip
    return TrainConfig(**{**base, **kw})


def stopping_at(when: Callable, stop: Callable[[], None] | None = None) -> Callable:
    """A ``Trainer._run_epoch`` that stops the run as an epoch starts where ``when(trainer, epoch)`` holds: by
    ``stop`` (a signal: ``lambda: signal.raise_signal(signal.SIGTERM)``), else a KeyboardInterrupt raised there."""
    from freezetune.training import trainer

    real = trainer.Trainer._run_epoch

    def run_epoch(self, epoch, unfrozen):
        if when(self, epoch):
            if stop is None:
                raise KeyboardInterrupt
            stop()
        return real(self, epoch, unfrozen)

    return run_epoch
