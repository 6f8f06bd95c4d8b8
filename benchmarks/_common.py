"""Shared pieces of the benchmarks: data preparation, the one evaluation function, timers, memory, tables.

Benchmarks are not tests: they print what they measured and the ratios between contenders of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

# FREEZETUNE_FASHION_MNIST: where the IDX files are on a machine without the Debian package (a GPU machine).
FASHION = os.environ.get("FREEZETUNE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
MODEL = "timm:tf_efficientnet_lite0"
RESULT_TAG = "RESULT "

# The packaged ImageNet weights load from disk; a hub lookup would only stall on a machine without network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pick_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when present; an explicit ``cuda`` without CUDA is a clear error, not a crash later."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {spec}: CUDA is not available on this machine")
    return device


def sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: a timer read without a sync measures only the launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device, out: dict, key: str) -> Iterator[None]:
    """Add the wall time of the block (device work included) to ``out[key]``."""
    sync(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        out[key] = out.get(key, 0.0) + time.perf_counter() - start


def autocast(device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """Mixed precision on CUDA, plain fp32 on CPU (CPU autocast is slower than fp32 for these models)."""
    return torch.autocast("cuda", dtype=dtype) if device.type == "cuda" else nullcontext()


class PeakMemory:
    """Peak memory of what runs after ``start()``: CUDA max allocated, or on CPU the process's peak RSS above
    its RSS at ``start()``.

    On Linux the kernel's peak-RSS mark (VmHWM) is reset at ``start()`` through ``/proc/self/clear_refs``, so a
    transient peak of the imports does not hide the growth. Where that is refused the fallback is the growth of
    ``ru_maxrss``, honest only in a fresh process; the transfer benchmark gives each contender one anyway.

    freezetune's trainer resets CUDA's counter at every epoch (``hardware.reset_peak_memory``, for its per-epoch
    row; a CPU's mark it leaves alone), which would leave only the last epoch's peak: ``start()`` wraps that function
    so each reading is kept before the reset. The library itself is unchanged; only this process's reference to the
    function is.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0.0
        self.reset = False
        self.kept = 0.0  # the highest reading taken before one of the trainer's resets

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset, self.base = True, _proc_status_mib("VmRSS")
        except OSError:
            self.reset, self.base = False, _maxrss_mib()
        self._keep_across_resets()

    def mib(self) -> float:
        return max(self.kept, self._reading()) - (0.0 if self.device.type == "cuda" else self.base)

    def _reading(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _proc_status_mib("VmHWM") if self.reset else _maxrss_mib()

    def _keep_across_resets(self) -> None:
        from freezetune.device import hardware

        reset = hardware.reset_peak_memory

        def keep_then_reset(device: torch.device) -> None:
            self.kept = max(self.kept, self._reading())
            reset(device)

        hardware.reset_peak_memory = keep_then_reset


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _proc_status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise OSError(f"no {key} in /proc/self/status")


# --- data -----------------------------------------------------------------------------------------------------


def preprocess_for(res: int, model: str = MODEL):
    """The model's own preprocessing (mean/std, interpolation, crop) at ``res`` pixels."""
    from freezetune.model.create import create_model

    _, pre = create_model(model, "imagenet", img_size=res)
    return pre


DATASETS = {
    "fashion": "Fashion-MNIST",
    "digits": "scikit-learn digits (8x8)",
    "patches": "scikit-image photo patches (20x20, which of 10 photos)",
}
# Besides those names, ``--dataset`` takes a directory: data we have not tuned for. An IDX directory (train-* and
# optionally t10k-* files, as MNIST-style datasets ship) or an image folder (``train/<class>/`` and optionally
# ``test/<class>/``, or ``<class>/`` alone). Without a test split the images outside the subset are the test set.
FOLDER_SIDE_OVER_RES = 1.25  # folder images are stored square at this x res (>= the eval transform's resize side)


def dataset_title(dataset: str) -> str:
    """How reports name ``dataset``: its description, or the directory it was read from."""
    return DATASETS.get(dataset) or f"the images in {dataset}"


def check_dataset(dataset: str) -> str:
    """``dataset`` if it names a dataset or a directory of one, else the one-line error an argparse type raises."""
    if dataset in DATASETS or Path(dataset).is_dir():
        return dataset
    raise argparse.ArgumentTypeError(f"{dataset!r} is neither one of {', '.join(DATASETS)} nor a directory")


# patches: which of these scikit-image sample photos (greyscale) a 20 px patch comes from; label = position here.
# Train patches come from the left 60 % of each photo's width, test patches from the right 40 %.
PATCH_PHOTOS = ["brick", "camera", "coins", "grass", "gravel", "moon", "retina", "hubble_deep_field",
                "immunohistochemistry", "coffee"]  # fmt: skip
PATCH_SIZE, PATCH_CUT = 20, 0.6
# 1000 + the 50 validation images: even --per-class 1000 leaves validation images of every class outside the subset.
PATCH_TRAIN, PATCH_TEST = 1050, 200  # per class; changing either changes every later draw


def prepare_data(path: Path, *, dataset: str, per_class: int, seed: int, res: int, test_n: int | None,
                 val_n: int = 50, model: str = MODEL) -> dict:  # fmt: skip
    """Build the shared data once and save it: every contender then reads the same tensors.

    The train subset is freezetune's own ``per_class`` draw (``per_class_indices``, as ``build_datasets(per_class=k,
    seed=0)`` makes it from an IDX directory with ``val_data``). It is written, with the test images, as an IDX
    directory (``data_dir``) that the freezetune contenders read as their ``data``: they train on exactly these
    images whatever their own seed. ``val_n`` further images outside the subset form ``val_dir``, the per-epoch
    validation of the recipes that take ``val_data``. Images pass through freezetune's eval transform (``aug none``)
    as one batch, which equals the per-sample transform bit for bit. Test images are kept as uint8 after
    resize/crop (``normalize`` restores them to within one float ulp) to stay small at 224 px.
    """
    from freezetune.data import eval_transform

    split = _split(dataset, per_class, seed, val_n, test_n, res)
    pre = preprocess_for(res, model)  # its mean, std and resize: the images every contender gets
    transform = eval_transform(pre)
    x_test = split["test"][0]
    x_test = torch.cat([_as_uint8(transform(_chw(x_test[i : i + 1000])), pre) for i in range(0, len(x_test), 1000)])
    data = {
        "x_train": transform(_chw(split["train"][0])).contiguous(),  # an RGB folder's come channels-last
        "y_train": split["train"][1].clone(),
        "x_test": x_test,
        "y_test": split["test"][1].clone(),
        "x_val": transform(_chw(split["val"][0])).contiguous(),
        "y_val": split["val"][1].clone(),
        "mean": pre.mean,
        "std": pre.std,
        "res": res,
        "classes": split["classes"],
        "dataset": dataset,
        "data_dir": str(path.parent / f"{Path(dataset).name}-idx"),
        "val_dir": str(path.parent / "val-idx"),
    }
    write_idx_dir(Path(data["data_dir"]), split["train"], split["test"], split["classes"])
    write_idx_dir(Path(data["val_dir"]), split["val"], split["val"], split["classes"])
    torch.save(data, path)
    return data


def work_and_data(args: argparse.Namespace, prefix: str) -> tuple[bool, Path, dict]:
    """A parent's set-up: its work dir (``args.work_dir``, else a new temp dir, set on ``args``), whether it made it
    (and so may remove it), and the shared data prepared once there (``args.dataset``, ``per_class``, ``res``, the
    full test set): ``(own_dir, data_file, data)``."""
    own_dir = args.work_dir is None
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix=prefix)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    data_file = Path(args.work_dir) / "data.pt"
    data = prepare_data(data_file, dataset=args.dataset, per_class=args.per_class, seed=0, res=args.res, test_n=None)
    return own_dir, data_file, data


def _chw(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W]`` (grey) or ``[N, H, W, C]`` -> ``[N, C, H, W]``, what the transform takes."""
    return images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)


def _split(dataset: str, per_class: int, seed: int, val_n: int, test_n: int | None, res: int) -> dict:
    """uint8 images and labels of the train subset, the validation images (the first ``val_n`` outside the subset)
    and the test images (Fashion-MNIST: its test split; digits: everything else; patches: those from the right 40 %
    of the photos), the first ``test_n`` of them."""
    from freezetune.data.sampling import per_class_indices

    images, targets, test, classes = _source(dataset, res)
    counts = torch.bincount(targets)
    if test is None and per_class >= int(counts.min()):
        raise SystemExit(f"--per-class {per_class}: {dataset} has {int(counts.min())} images in its smallest class; "
                         f"keep --per-class below that so every class has test images")  # fmt: skip
    subset = per_class_indices(targets, per_class, seed)[0]
    outside = torch.ones(len(targets), dtype=torch.bool)
    outside[subset] = False
    rest = torch.nonzero(outside).flatten()
    if len(rest) < val_n:
        raise SystemExit(f"--per-class {per_class}: leaves {len(rest)} {dataset} images outside the subset, fewer than "
                         f"the {val_n} validation images; lower --per-class")  # fmt: skip
    val = rest[:val_n]
    if test is None:  # one pool: what is neither train nor validation is the test set
        test = (images[rest[val_n:]], targets[rest[val_n:]])
    n = len(test[1]) if test_n is None else min(test_n, len(test[1]))
    return {"train": (images[subset], targets[subset]), "val": (images[val], targets[val]),
            "test": (test[0][:n], test[1][:n]), "classes": classes}  # fmt: skip


def _source(dataset: str, res: int) -> tuple[torch.Tensor, torch.Tensor, tuple | None, list[str]]:
    """(train images uint8 [N, H, W] or [N, H, W, C], labels, the official test split or None, class names)."""
    from freezetune.data.idx import DIGIT_CLASSES, FASHION_CLASSES, idx_files, is_idx_dir, load_idx

    if dataset == "fashion":
        train, test = load_idx(FASHION, "train"), load_idx(FASHION, "test")
        return train.images, train.targets, (test.images, test.targets), list(FASHION_CLASSES)
    if dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()  # 1797 grey 8x8 images, values 0..16, about 180 per class, no official test split
        images = torch.from_numpy(digits.images * (255 / 16)).round().to(torch.uint8)
        return images, torch.from_numpy(digits.target).long(), None, list(DIGIT_CLASSES)
    if dataset == "patches":
        train, test = _patches()
        return *train, test, list(PATCH_PHOTOS)
    if is_idx_dir(dataset):
        train = load_idx(dataset, "train")
        test = load_idx(dataset, "test") if idx_files(dataset, "test") else None
        return train.images, train.targets, (test.images, test.targets) if test else None, train.classes
    if Path(dataset).is_dir():
        return _folder(Path(dataset), round(res * FOLDER_SIDE_OVER_RES))
    raise SystemExit(f"unknown dataset {dataset!r}; choose from: {', '.join(DATASETS)}, or a directory")


def _folder(root: Path, side: int) -> tuple[torch.Tensor, torch.Tensor, tuple | None, list[str]]:
    """An image folder read with freezetune's own reader (``train/`` + ``test/``, or the class folders alone), each
    image RGB, its short side resized to ``side`` and centre-cropped square: one uint8 ``[N, side, side, 3]``."""
    from freezetune.data.folder import scan_folder

    train_root = root / "train" if (root / "train").is_dir() else root
    train = scan_folder(train_root)
    test = scan_folder(root / "test", classes=train.classes) if (root / "test").is_dir() else None
    return *_decoded(train, side), (_decoded(test, side) if test else None), list(train.classes)


def _decoded(dataset, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.transforms import v2

    square = v2.Compose([v2.Resize(side, antialias=True), v2.CenterCrop(side), v2.PILToTensor()])
    images = [square(dataset[i][0].convert("RGB")).permute(1, 2, 0) for i in range(len(dataset))]
    return torch.stack(images), torch.as_tensor(dataset.targets, dtype=torch.long)


def _patches() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test) of the patches dataset: uint8 ``[N, 20, 20]`` and labels, spatially disjoint.

    Drawn with ``default_rng(0)``: per photo in class order, the rows then the columns of its ``PATCH_TRAIN`` train
    patches (columns in ``[0, cut - 20)``, cut = 60 % of the width), then those of its ``PATCH_TEST`` test patches
    (columns in ``[cut, W - 20)``); rows in ``[0, H - 20)``. Each split is stored interleaved (patch 0 of every
    class, then patch 1, ...): the first N test images and the first validation images outside the subset are then
    spread over the classes; ``per_class_indices`` looks at each class on its own, so the subset does not change.
    """
    rng = np.random.default_rng(0)
    train, test = [], []
    for photo in _patch_photos():
        h, w = photo.shape
        cut = int(PATCH_CUT * w)
        for out, n, lo, hi in ((train, PATCH_TRAIN, 0, cut - PATCH_SIZE), (test, PATCH_TEST, cut, w - PATCH_SIZE)):
            rows, cols = rng.integers(0, h - PATCH_SIZE, n), rng.integers(lo, hi, n)
            out.append(
                np.stack([photo[r : r + PATCH_SIZE, c : c + PATCH_SIZE] for r, c in zip(rows, cols, strict=True)])
            )

    def interleaved(per_class: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(np.stack(per_class, axis=1)).flatten(0, 1)  # [n, classes, 20, 20] -> [n * classes]
        return images, torch.arange(len(per_class)).repeat(len(per_class[0]))

    return interleaved(train), interleaved(test)


def _patch_photos() -> list[np.ndarray]:
    """The photos of ``PATCH_PHOTOS`` as uint8 greyscale (they ship with scikit-image: no download)."""
    from skimage import color, data, util

    photos = [getattr(data, name)() for name in PATCH_PHOTOS]
    return [p if p.ndim == 2 else util.img_as_ubyte(color.rgb2gray(p)) for p in photos]


def _as_uint8(x: torch.Tensor, pre) -> torch.Tensor:
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    return torch.round((x * std + mean) * 255).clamp(0, 255).to(torch.uint8)


def normalize(x_u8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> the float tensor the model's eval transform produces (same ops, same order)."""
    m = torch.tensor(mean, device=x_u8.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x_u8.device).view(1, 3, 1, 1)
    return x_u8.to(torch.float32).div(255).sub(m).div(s)


def write_idx_dir(
    root: Path, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], classes: list[str]
) -> None:
    """An IDX directory as freezetune reads it (``freezetune.data.idx``): train-* and t10k-* images and labels, and
    the class names in ``classes.txt`` (without it the reader would call the patches' classes '0'..'9')."""
    from freezetune.data.idx import CLASS_NAMES_FILE

    root.mkdir(parents=True, exist_ok=True)
    (root / CLASS_NAMES_FILE).write_text("".join(f"{name}\n" for name in classes), encoding="utf-8")
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8))


def write_idx(path: Path, array: torch.Tensor) -> None:
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.contiguous().numpy().tobytes())


def load_data(path: str | Path) -> dict:
    return torch.load(path, mmap=True, weights_only=True)


# --- evaluation: one function for every contender ---------------------------------------------------------------


@torch.inference_mode()
def test_accuracy(model: nn.Module, data: dict, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy on the shared test tensor, in eval mode (bf16 autocast on CUDA, fp32 on CPU)."""
    model = model.to(device).eval()
    correct = 0
    for i in range(0, len(data["y_test"]), batch_size):
        x = normalize(data["x_test"][i : i + batch_size].to(device), data["mean"], data["std"])
        with autocast(device):
            logits = model(x)
        logits = logits if isinstance(logits, torch.Tensor) else logits[0]
        correct += int((logits.float().argmax(-1).cpu() == data["y_test"][i : i + batch_size]).sum())
    return correct / len(data["y_test"])


# --- subprocesses and tables -------------------------------------------------------------------------------------


def run_worker(argv: list[str], log: Path) -> dict:
    """Run ``python argv`` in a fresh process; its last ``RESULT {json}`` line on stdout is the result."""
    with log.open("w") as err:
        proc = subprocess.run([sys.executable, *argv], stdout=subprocess.PIPE, stderr=err, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = log.read_text().strip().splitlines()
        # the log stays where the worker wrote it, which a lent GPU machine does not send back: its end is printed
        # here, into the step's output, with the table's one line (the last line of the log) after it
        print(f"--- {log.name} (exit {proc.returncode}), its last {min(len(tail), 40)} lines:", *tail[-40:], "---",
              sep="\n", flush=True)  # fmt: skip
        return {"error": f"exit {proc.returncode}: {' | '.join(tail[-1:]) or 'no output'}"}
    return json.loads(lines[-1][len(RESULT_TAG) :])


def emit(result: dict) -> None:
    print(RESULT_TAG + json.dumps(result), flush=True)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    return "\n".join(lines + [fmt.format(*map(str, r)) for r in rows])
