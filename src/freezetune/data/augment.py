"""Batched augmentation on the training device: per-sample random crops, flips, colour and erasing for whole batches.

The device loaders (``freezetune.data.gpu``) hand whole uint8 batches to ``BatchAugment``, which reads the same preset
parameters (``freezetune.config.options.AUGMENTATIONS``) as the CPU pipeline of ``freezetune.data.transforms`` and
applies them with a few tensor ops per batch instead of a Python call per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from freezetune.config.options import aug_preset, check, crop_pct_problem
from freezetune.data.transforms import interpolation_mode
from freezetune.model.preprocess import Preprocess

_TRIES = 10  # box draws per sample before falling back, as torchvision does
_GRAY = (0.2989, 0.587, 0.114)


def resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Float resize with the CPU pipeline's conventions (v2.Resize: antialias, align_corners=False).

    >>> resize(torch.zeros(1, 3, 4000, 3000), (64, 48), "bicubic").shape
    torch.Size([1, 3, 64, 48])
    """
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    # CUDA's antialiased kernels hold a whole filter window in shared memory and fail beyond ~40x shrinking
    # (a 6000 px photo at --img-size 64): average whole blocks first, which is what the antialias filter does anyway
    rh, rw = x.shape[-2] / size[0], x.shape[-1] / size[1]
    k = max(int(min(rh, rw) // 8), 1)
    # an axis shrunk far more than the other (a panorama squashed onto the training canvas) is averaged on its own
    kh, kw = (int(r // 8) if r / k > 32 else k for r in (rh, rw))
    if max(kh, kw) >= 2:
        x = F.avg_pool2d(x, (kh, kw))
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
        self.preset = aug_preset(aug)
        check(crop_pct_problem(pre.crop_pct))
        self.size, self.aug, self.device = pre.input_size, aug, torch.device(device)
        self.mode = interpolation_mode(pre.interpolation).value
        self.resize_to = pre.eval_resize
        self.random_crop = self.preset.crop_scale is not None
        # The smallest crop spans about sqrt(min_scale) of a side; a canvas this large keeps it at ~1 px per output px.
        min_scale = self.preset.crop_scale[0] if self.random_crop else None
        self.canvas = math.ceil(self.size / math.sqrt(min_scale)) if self.random_crop else self.resize_to
        std = torch.tensor(pre.std, device=self.device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std)  # x / 255 then (x - mean) / std, folded into one multiply-add
        self._shift = torch.tensor(pre.mean, device=self.device).view(1, 3, 1, 1) / std
        self._noise_gen = torch.Generator(device=self.device)
        self.bgr = pre.channel_order == "BGR"

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Augment a batch of same-sized images ``[B, C, H, W]`` (uint8, C = 1 or 3) into float32 ``[B, 3, S, S]``."""
        x = images.float()
        if not self.random_crop:
            return self.finish(self.center_crop(x), gen)
        h, w = x.shape[-2:]
        if max(h, w) > self.canvas:  # grid_sample does not antialias: shrink large sources first
            x = resize(x, (self.canvas, self.canvas), self.mode)
        sizes = torch.tensor([[h, w]], dtype=torch.float32).expand(len(x), 2)
        return self.finish(self.crop(x, sizes, gen), gen)

    def center_crop(self, x: torch.Tensor) -> torch.Tensor:
        """Eval geometry of a float batch ``[B, C, H, W]`` (0..255) -> ``[B, C, S, S]``, rounded like uint8 output."""
        h, w = x.shape[-2:]
        nh, nw = _eval_size(h, w, self.resize_to)
        x = resize(x, (nh, nw), self.mode)
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
        ratio = self.preset.crop_ratio
        h, w = _sample_boxes(height * width, self.preset.crop_scale, ratio, gen)
        h, w, ok = _first_fit(h, w, height, width)
        # No box fitted: the whole image, trimmed to the nearest allowed aspect ratio (torchvision's fallback).
        h = torch.where(ok, h, torch.minimum(height, width / ratio[0]))
        w = torch.where(ok, w, torch.minimum(width, height * ratio[1]))
        top = torch.rand(len(x), generator=gen) * (height - h)
        left = torch.rand(len(x), generator=gen) * (width - w)
        flip = torch.rand(len(x), generator=gen) < self.preset.flip_p
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
        theta = self._upload(theta)
        grid = F.affine_grid(theta, [len(x), x.shape[1], self.size, self.size], align_corners=False)
        out = F.grid_sample(x, grid, mode=self.mode, padding_mode="border", align_corners=False)
        return out.clamp_(0, 255)

    def _upload(self, t: torch.Tensor) -> torch.Tensor:
        """Random parameters drawn on the host to the device without a sync: a copy from pageable memory would make
        CUDA finish every queued kernel (the training step) before the augmentation could even be queued."""
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def finish(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Colour jitter, gray -> RGB, normalisation and random erasing (as the preset asks) of a float batch (0..255)."""
        if self.preset.color:
            x = self._jitter(x, gen)
        x = x.expand(-1, 3, -1, -1) * self._scale - self._shift  # out of place: also materialises the expand
        if self.bgr:
            x = x.flip(1)
        if self.preset.erase_p:
            x = self._erase(x, gen)
        return x

    def _jitter(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        jitter = self.preset.jitter
        b, c = self._upload(torch.empty(2, len(x), 1, 1, 1).uniform_(1 - jitter, 1 + jitter, generator=gen))
        x = x.mul_(b).clamp_(0, 255)
        gray = x if x.shape[1] == 1 else sum(wt * x[:, i : i + 1] for i, wt in enumerate(_GRAY))
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        return x.mul_(c).add_((1 - c) * mean).clamp_(0, 255)

    def _erase(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, s = len(x), self.size
        full = torch.full((n,), float(s))
        h, w = _sample_boxes(full * full, self.preset.erase_scale, self.preset.erase_ratio, gen)
        h, w, ok = _first_fit(h.round(), w.round(), full - 1, full - 1)  # torchvision needs the box strictly inside
        top = (torch.rand(n, generator=gen) * (s - h + 1)).floor()
        left = (torch.rand(n, generator=gen) * (s - w + 1)).floor()
        chosen = torch.nonzero((torch.rand(n, generator=gen) < self.preset.erase_p) & ok).flatten()
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        if len(chosen) == 0:
            return x
        box = self._upload(torch.stack([top, top + h, left, left + w], 1)[chosen])
        rows = torch.arange(s, device=self.device).view(1, s, 1)
        cols = torch.arange(s, device=self.device).view(1, 1, s)
        inside = (rows >= box[:, 0, None, None]) & (rows < box[:, 1, None, None])
        inside = inside & (cols >= box[:, 2, None, None]) & (cols < box[:, 3, None, None])
        # Per-pixel Gaussian noise like RandomErasing(value="random"); drawn on the device, seeded from ``gen``.
        noise = torch.randn(len(chosen), 3, s, s, device=self.device, generator=self._noise_gen.manual_seed(seed))
        chosen = self._upload(chosen)
        x[chosen] = torch.where(inside[:, None], noise, x[chosen])
        return x
