"""Input pipelines that run on the training device: decode, resize, augment and normalise whole batches there.

A CPU ``DataLoader`` transforms one image at a time in worker processes and becomes the bottleneck of a frozen-backbone
run long before the GPU does. These loaders keep the per-image CPU work to reading bytes:

- ``DeviceImageLoader``: in-memory datasets (IDX, arrays) are copied to the device once as uint8; every batch is
  indexed, resized, augmented and normalised there.
- ``DeviceJpegLoader``: image files are read by a few threads, JPEGs are decoded as one batch with nvJPEG
  (``torchvision.io.decode_jpeg(device="cuda")``), other formats are decoded on the CPU per file, then the batch goes
  through the same augmentation.

Both yield ``(inputs, targets)`` on the device, with inputs float32 ``[B, 3, S, S]``, and expose ``len()`` (batches)
and a ``generator`` that seeds shuffling and augmentation, like the CPU loader. They ignore ``dataset.transform``.
On a CPU device they work too (slowly): that is how they are tested.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

from freezetune.data.folder import FileImageDataset, load_image
from freezetune.data.idx import InMemoryImageDataset
from freezetune.data.transforms import AUG_PRESETS, interpolation_mode
from freezetune.errors import ConfigError, DataError, choices
from freezetune.preprocess import Preprocess

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "gpu", "cpu")
_TRAIN_SCALE = {"light": (0.7, 1.0), "standard": (0.25, 1.0)}  # random resized crop area, as the CPU presets
_CROP_RATIO = (3 / 4, 4 / 3)
_ERASE_SCALE, _ERASE_RATIO, _ERASE_P = (0.02, 0.33), (0.3, 3.3), 0.25
_JITTER = 0.4  # brightness and contrast factors in [1 - 0.4, 1 + 0.4]
_TRIES = 10  # box draws per sample before falling back, as torchvision does
_GRAY = (0.2989, 0.587, 0.114)
_JPEG_MAGIC = b"\xff\xd8\xff"


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Float resize with the CPU pipeline's conventions (v2.Resize: antialias, align_corners=False)."""
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def _eval_size(h: int, w: int, short: int) -> tuple[int, int]:
    # v2.Resize(int): the short side becomes ``short``, the long side is scaled and truncated.
    return (short, int(short * w / h)) if h <= w else (int(short * h / w), short)


def _sample_boxes(area: torch.Tensor, scale: tuple, ratio: tuple, gen: torch.Generator):
    """Per sample, the first of ``_TRIES`` random boxes (area fraction in ``scale``, log-uniform aspect ``ratio``).

    Returns ``[n, _TRIES]`` heights and widths in pixels; ``_first_fit`` picks the first that fits the image. All
    tries are drawn at once, so a batch costs a few tensor ops instead of a Python loop per sample.
    """
    n = len(area)
    target = area[:, None] * torch.empty(n, _TRIES).uniform_(*scale, generator=gen)
    aspect = torch.exp(torch.empty(n, _TRIES).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen))
    return torch.sqrt(target / aspect), torch.sqrt(target * aspect)


def _first_fit(h: torch.Tensor, w: torch.Tensor, max_h: torch.Tensor, max_w: torch.Tensor):
    ok = (h <= max_h[:, None]) & (w <= max_w[:, None])
    first = ok.to(torch.uint8).argmax(1, keepdim=True)
    return h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1), ok.any(1)


class BatchAugment:
    """Batched geometry, colour and normalisation of a preset, with per-sample random parameters.

    Random parameters are drawn from a CPU ``torch.Generator`` (so reseeding it replays an epoch) and moved to the
    device; the per-pixel noise of random erasing uses a device generator seeded from it. ``aug="none"`` (and every
    eval loader) is the eval geometry: resize the short side to ``int(S / crop_pct)``, center-crop ``S``.

    Differences from the CPU presets: random resized crop samples with ``grid_sample`` (no antialias; the JPEG loader
    first resizes to a canvas of about one pixel per output pixel so it never downsamples much), and ``standard``
    replaces TrivialAugmentWide with brightness + contrast jitter (+-40 %), which batches without per-op branching.

    >>> aug = BatchAugment(Preprocess(input_size=32), "light", torch.device("cpu"))
    >>> aug(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.Generator().manual_seed(0)).shape
    torch.Size([4, 3, 32, 32])
    """

    def __init__(self, pre: Preprocess, aug: str, device: torch.device) -> None:
        if aug not in AUG_PRESETS:
            raise ConfigError(f"unknown augmentation preset {aug!r}; choose one of: {choices(AUG_PRESETS)}")
        if not 0.0 < pre.crop_pct <= 1.0:
            raise ConfigError(f"crop_pct must be in (0, 1], got {pre.crop_pct!r}")
        self.size, self.aug, self.device = pre.input_size, aug, torch.device(device)
        self.mode = interpolation_mode(pre.interpolation).value
        self.resize_to = int(pre.input_size / pre.crop_pct)
        self.random_crop = aug in _TRAIN_SCALE
        # The smallest crop spans about sqrt(min_scale) of a side; a canvas this large keeps it at ~1 px per output px.
        self.canvas = math.ceil(self.size / math.sqrt(_TRAIN_SCALE[aug][0])) if self.random_crop else self.resize_to
        std = torch.tensor(pre.std, device=self.device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std)  # x / 255 then (x - mean) / std, folded into one multiply-add
        self._shift = torch.tensor(pre.mean, device=self.device).view(1, 3, 1, 1) / std
        self._noise_gen = torch.Generator(device=self.device)

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Augment a batch of same-sized images ``[B, C, H, W]`` (uint8, C = 1 or 3) into float32 ``[B, 3, S, S]``."""
        x = images.float()
        if not self.random_crop:
            return self.finish(self.center_crop(x), gen)
        h, w = x.shape[-2:]
        if max(h, w) > self.canvas:  # grid_sample does not antialias: shrink large sources first
            x = _resize(x, (self.canvas, self.canvas), self.mode)
        sizes = torch.tensor([[h, w]], dtype=torch.float32).expand(len(x), 2)
        return self.finish(self.crop(x, sizes, gen), gen)

    def center_crop(self, x: torch.Tensor) -> torch.Tensor:
        """Eval geometry of a float batch ``[B, C, H, W]`` (0..255) -> ``[B, C, S, S]``, rounded like uint8 output."""
        h, w = x.shape[-2:]
        nh, nw = _eval_size(h, w, self.resize_to)
        x = _resize(x, (nh, nw), self.mode)
        top, left = int(round((nh - self.size) / 2.0)), int(round((nw - self.size) / 2.0))
        # The CPU pipeline resamples uint8, so its pixels are whole numbers in 0..255: match that exactly.
        return x[..., top : top + self.size, left : left + self.size].clamp(0, 255).round_()

    def crop(self, x: torch.Tensor, sizes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random resized crop + horizontal flip with per-sample boxes, one affine warp for the whole batch.

        Args:
            x: float ``[B, C, H', W']``; may be a rescaled copy (a canvas) of images of other sizes.
            sizes: ``[B, 2]`` the original (height, width) of each image, in which crop boxes keep their aspect.
            gen: CPU generator for the crop boxes and flips.
        """
        height, width = sizes[:, 0], sizes[:, 1]
        h, w = _sample_boxes(height * width, _TRAIN_SCALE[self.aug], _CROP_RATIO, gen)
        h, w, ok = _first_fit(h, w, height, width)
        # No box fitted: the whole image, trimmed to the nearest allowed aspect ratio (torchvision's fallback).
        h = torch.where(ok, h, torch.minimum(height, width / _CROP_RATIO[0]))
        w = torch.where(ok, w, torch.minimum(width, height * _CROP_RATIO[1]))
        top = torch.rand(len(x), generator=gen) * (height - h)
        left = torch.rand(len(x), generator=gen) * (width - w)
        flip = torch.rand(len(x), generator=gen) < 0.5
        return self.warp(x, sizes, torch.stack([top, left, h, w], 1), flip)

    def warp(self, x: torch.Tensor, sizes: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Resample box ``(top, left, height, width)`` of each image (in pixels of ``sizes``) to ``[S, S]``, mirrored
        where ``flip``; ``x`` and ``sizes`` as in ``crop``. Equals v2's ``resized_crop`` except near box edges (it
        reads the pixels just outside the box instead of repeating the edge) and without antialias."""
        height, width = sizes[:, 0], sizes[:, 1]
        top, left, h, w = boxes.unbind(1)
        # Output pixel u in [-1, 1] samples input (normalised, align_corners=False) at centre + half-extent * u.
        theta = torch.zeros(len(x), 2, 3)
        theta[:, 0, 0] = torch.where(flip, -w / width, w / width)
        theta[:, 0, 2] = (2 * left + w) / width - 1
        theta[:, 1, 1] = h / height
        theta[:, 1, 2] = (2 * top + h) / height - 1
        theta = theta.to(self.device, non_blocking=True)
        grid = F.affine_grid(theta, [len(x), x.shape[1], self.size, self.size], align_corners=False)
        out = F.grid_sample(x, grid, mode=self.mode, padding_mode="border", align_corners=False)
        return out.clamp_(0, 255)

    def finish(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Colour jitter (``standard``), gray -> RGB, normalisation and random erasing of a float batch (0..255)."""
        if self.aug == "standard":
            x = self._jitter(x, gen)
        x = x.expand(-1, 3, -1, -1) * self._scale - self._shift  # out of place: also materialises the expand
        if self.aug == "standard":
            x = self._erase(x, gen)
        return x

    def _jitter(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, c = (torch.empty(2, len(x), 1, 1, 1).uniform_(1 - _JITTER, 1 + _JITTER, generator=gen)).to(self.device)
        x = x.mul_(b).clamp_(0, 255)
        gray = x if x.shape[1] == 1 else sum(wt * x[:, i : i + 1] for i, wt in enumerate(_GRAY))
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        return x.mul_(c).add_((1 - c) * mean).clamp_(0, 255)

    def _erase(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, s = len(x), self.size
        full = torch.full((n,), float(s))
        h, w = _sample_boxes(full * full, _ERASE_SCALE, _ERASE_RATIO, gen)
        h, w, ok = _first_fit(h.round(), w.round(), full - 1, full - 1)  # torchvision needs the box strictly inside
        top = (torch.rand(n, generator=gen) * (s - h + 1)).floor()
        left = (torch.rand(n, generator=gen) * (s - w + 1)).floor()
        chosen = torch.nonzero((torch.rand(n, generator=gen) < _ERASE_P) & ok).flatten()
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        if len(chosen) == 0:
            return x
        box = torch.stack([top, top + h, left, left + w], 1)[chosen].to(self.device)
        rows = torch.arange(s, device=self.device).view(1, s, 1)
        cols = torch.arange(s, device=self.device).view(1, 1, s)
        inside = (rows >= box[:, 0, None, None]) & (rows < box[:, 1, None, None])
        inside = inside & (cols >= box[:, 2, None, None]) & (cols < box[:, 3, None, None])
        # Per-pixel Gaussian noise like RandomErasing(value="random"); drawn on the device, seeded from ``gen``.
        noise = torch.randn(len(chosen), 3, s, s, device=self.device, generator=self._noise_gen.manual_seed(seed))
        chosen = chosen.to(self.device)
        x[chosen] = torch.where(inside[:, None], noise, x[chosen])
        return x


class _DeviceLoader:
    """Shared batching: ``len`` in batches (last one partial), shuffled order from ``generator`` when training."""

    def __init__(self, n: int, *, batch_size: int, train: bool, device, seed: int, preprocess: Preprocess, aug: str):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.n, self.batch_size, self.train = n, batch_size, train
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.augment = BatchAugment(preprocess, aug if train else "none", self.device)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def _batches(self) -> list[torch.Tensor]:
        order = torch.randperm(self.n, generator=self.generator) if self.train else torch.arange(self.n)
        return list(order.split(self.batch_size))


class DeviceImageLoader(_DeviceLoader):
    """Batches of an in-memory dataset, held on ``device`` as uint8 and augmented there.

    Args:
        dataset: an ``InMemoryImageDataset`` (``images`` uint8 ``[N, H, W]`` or ``[N, H, W, C]``, C = 1 or 3).
        batch_size: images per batch; the last batch may be smaller.
        train: shuffle and apply ``aug``; else eval order and eval geometry.
        device: where the images live and the batches are produced.
        seed: initial seed of ``generator`` (the trainer reseeds it every epoch).
        preprocess: the model's input size, mean/std, interpolation and crop_pct.
        aug: augmentation preset for training, one of ``AUG_PRESETS``.

    >>> ds = InMemoryImageDataset(torch.zeros(10, 28, 28, dtype=torch.uint8), torch.arange(10), list("0123456789"))
    >>> loader = DeviceImageLoader(ds, batch_size=4, train=True, device="cpu", preprocess=Preprocess(input_size=32))
    >>> len(loader), [tuple(x.shape) for x, _ in loader][-1]
    (3, (2, 3, 32, 32))
    """

    def __init__(self, dataset: InMemoryImageDataset, *, batch_size: int, train: bool, device: torch.device | str,
                 seed: int = 0, preprocess: Preprocess, aug: str = "light") -> None:  # fmt: skip
        super().__init__(len(dataset), batch_size=batch_size, train=train, device=device, seed=seed,
                         preprocess=preprocess, aug=aug)  # fmt: skip
        images = dataset.images
        images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
        if images.shape[1] not in (1, 3):
            raise DataError(f"in-memory images need 1 or 3 channels for the device loader, got {images.shape[1]}")
        # One copy to the device for the whole run: per batch only indices and augmentation parameters move.
        self.images = images.contiguous().to(self.device)
        self.targets = dataset.targets.to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in self._batches():
            idx = idx.to(self.device, non_blocking=True)
            yield self.augment(self.images[idx], self.generator), self.targets[idx]


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 3 and bytes(data[:3].tolist()) == _JPEG_MAGIC


def _decode_cpu(data: torch.Tensor, path: str) -> torch.Tensor:
    """Any image file's bytes -> uint8 ``[3, H, W]`` on the CPU: torchvision's decoders, else PIL (BMP, TIFF, ...)."""
    try:
        img = decode_image(data, mode=ImageReadMode.RGB)
        return img[0] if img.dim() == 4 else img  # an animated GIF decodes to frames; PIL would give the first
    except RuntimeError:
        return torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1).contiguous()


def _read_encoded(path: str) -> torch.Tensor:
    """Runs in the reader threads: JPEG bytes stay encoded (1-D) for the batch decode; anything else is decoded."""
    try:
        data = read_file(path)
    except RuntimeError as e:
        raise DataError(f"cannot read image '{path}': {str(e).splitlines()[-1]}") from None
    return data if _is_jpeg(data) else _decode_cpu(data, path)


def _by_size(images: list[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``fn`` to each group of same-sized images as one batch; results back in input order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[-2:]), []).append(i)
    parts, order = [], []
    for idx in groups.values():
        parts.append(fn(torch.stack([images[i] for i in idx]).float()))
        order += idx
    out = torch.cat(parts)
    return out[torch.argsort(torch.tensor(order, device=out.device))] if len(groups) > 1 else out


class DeviceJpegLoader(_DeviceLoader):
    """Batches of an image-file dataset: threads read bytes, JPEGs decode as one batch on ``device`` (nvJPEG on CUDA).

    Non-JPEG files (PNG, BMP, ...) are decoded per file on the CPU in the reader threads and copied over. A batch
    nvJPEG rejects (CMYK, unusual encodings) is decoded per file, each failure on the CPU; if no file of a batch
    decodes on the GPU, the loader decodes on the CPU from then on and logs a warning. Each image is resized to a
    common square canvas (train) or to the eval geometry, then augmented like ``DeviceImageLoader``.

    Args:
        dataset: a ``FileImageDataset`` (``samples`` of ``(path, label)``).
        threads: reader threads (default ``min(8, cpus)``); ``prefetch`` batches are read ahead.
        Others: as ``DeviceImageLoader``.

    >>> loader = DeviceJpegLoader(FileImageDataset([("a.jpg", 0)], ["a"]), batch_size=2, train=False,
    ...                           device="cpu", preprocess=Preprocess(input_size=32))
    >>> len(loader)
    1
    """

    def __init__(self, dataset: FileImageDataset, *, batch_size: int, train: bool, device: torch.device | str,
                 seed: int = 0, preprocess: Preprocess, aug: str = "light", threads: int | None = None,
                 prefetch: int = 2) -> None:  # fmt: skip
        super().__init__(len(dataset), batch_size=batch_size, train=train, device=device, seed=seed,
                         preprocess=preprocess, aug=aug)  # fmt: skip
        self.paths = [str(p) for p, _ in dataset.samples]
        self.targets = dataset.targets.to(self.device)
        self.threads = threads or min(8, os.cpu_count() or 1)
        self.prefetch = max(1, prefetch)
        self._decode_device = self.device if self.device.type == "cuda" else torch.device("cpu")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._batches()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="freezetune-read")
        pending = deque()

        def submit(k: int) -> None:
            if k < len(batches):
                pending.append([pool.submit(_read_encoded, self.paths[i]) for i in batches[k].tolist()])

        try:
            for k in range(self.prefetch):
                submit(k)
            for k, idx in enumerate(batches):
                items = [f.result() for f in pending.popleft()]
                submit(k + self.prefetch)  # read ahead while this batch decodes and the model trains
                images = self._decode([self.paths[i] for i in idx.tolist()], items)
                yield self._transform(images), self.targets[idx.to(self.device)]
        finally:  # also when the consumer stops early: do not leave reads running
            pool.shutdown(wait=False, cancel_futures=True)

    def _transform(self, images: list[torch.Tensor]) -> torch.Tensor:
        aug = self.augment
        if not aug.random_crop:
            return aug.finish(_by_size(images, aug.center_crop), self.generator)
        # Squashing to a square canvas keeps normalised coordinates, so crop boxes drawn in the original size keep
        # their true aspect ratio; it only changes the sampling density along the longer side.
        side = aug.canvas
        canvas = _by_size(images, lambda x: _resize(x, (side, side), aug.mode))
        sizes = torch.tensor([list(img.shape[-2:]) for img in images], dtype=torch.float32)
        return aug.finish(aug.crop(canvas, sizes, self.generator), self.generator)

    def _decode(self, paths: list[str], items: list[torch.Tensor]) -> list[torch.Tensor]:
        jpegs = [i for i, t in enumerate(items) if t.dim() == 1]
        out = list(items)
        if jpegs:
            decoded = self._decode_jpegs([items[i] for i in jpegs], [paths[i] for i in jpegs])
            for i, img in zip(jpegs, decoded, strict=True):
                out[i] = img
        return [img.to(self.device, non_blocking=True) for img in out]

    def _decode_jpegs(self, data: list[torch.Tensor], paths: list[str]) -> list[torch.Tensor]:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self._decode_device)
        except RuntimeError:  # one bad file fails the whole call: find it and decode the rest
            pass
        out, on_device = [], 0
        for d, p in zip(data, paths, strict=True):
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self._decode_device))
                on_device += 1
            except RuntimeError:
                out.append(_decode_cpu(d, p))
        if self._decode_device.type == "cuda" and on_device == 0 and len(data) > 1:
            log.warning(
                "nvJPEG could not decode any image of a batch of %d; decoding on the CPU from now on", len(data)
            )
            self._decode_device = torch.device("cpu")
        return out


def _supported(dataset) -> bool:
    if isinstance(dataset, FileImageDataset):
        return True
    return isinstance(dataset, InMemoryImageDataset) and (
        dataset.images.dim() == 3 or dataset.images.shape[-1] in (1, 3)
    )


def should_use_device_loader(dataset, device: torch.device | str, decode: str = "auto") -> bool:
    """Whether the ``decode`` setting asks for a device loader for ``dataset`` on ``device``.

    ``"cpu"``: never. ``"auto"``: on a CUDA device, for in-memory and image-file datasets. ``"gpu"``: always for
    those datasets, on any device; on a CPU device that is slower than the ``DataLoader`` and useful for tests.

    Raises:
        ConfigError: unknown ``decode``, or ``"gpu"`` with a dataset the device loaders cannot read.

    >>> ds = InMemoryImageDataset(torch.zeros(2, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
    >>> should_use_device_loader(ds, "cpu", "auto"), should_use_device_loader(ds, "cpu", "gpu")
    (False, True)
    """
    if decode not in DECODE_MODES:
        raise ConfigError(f"unknown decode {decode!r}; choose one of: {choices(DECODE_MODES)}")
    if decode == "cpu":
        return False
    if decode == "gpu" and not _supported(dataset):
        raise ConfigError(
            f"decode='gpu' needs image files or in-memory uint8 images with 1 or 3 channels, got "
            f"{type(dataset).__name__}; use decode='cpu'"
        )
    return _supported(dataset) and (decode == "gpu" or torch.device(device).type == "cuda")


def build_device_loader(dataset, *, batch_size: int, train: bool, device: torch.device | str, seed: int,
                        preprocess: Preprocess, aug: str) -> DeviceImageLoader | DeviceJpegLoader | None:  # fmt: skip
    """A device loader for ``dataset``, or None when it has no device pipeline (use the CPU ``DataLoader``).

    In-memory datasets larger than a quarter of the free GPU memory also give None: the model needs the rest.

    >>> ds = InMemoryImageDataset(torch.zeros(6, 8, 8, dtype=torch.uint8), torch.arange(6), list("abcdef"))
    >>> loader = build_device_loader(ds, batch_size=4, train=False, device="cpu", seed=0,
    ...                              preprocess=Preprocess(input_size=8), aug="none")
    >>> type(loader).__name__, len(loader)
    ('DeviceImageLoader', 2)
    """
    device = torch.device(device)
    kwargs = dict(batch_size=batch_size, train=train, device=device, seed=seed, preprocess=preprocess, aug=aug)
    if not _supported(dataset):
        return None
    if isinstance(dataset, FileImageDataset):
        return DeviceJpegLoader(dataset, **kwargs)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if dataset.images.nbytes > free // 4:
            log.info("in-memory images (%.1f GiB) too large for the device; using the CPU loader",
                     dataset.images.nbytes / 2**30)  # fmt: skip
            return None
    return DeviceImageLoader(dataset, **kwargs)
