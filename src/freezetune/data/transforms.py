"""Image transforms built from a model's ``Preprocess``: one eval pipeline and three training augmentation presets.

Every pipeline accepts a PIL image or a uint8 tensor ``[C, H, W]`` (C = 1 or 3), turns grayscale into 3 channels and
returns a plain float32 tensor ``[3, input_size, input_size]`` normalised with the model's mean/std. Geometry and
colour ops run on uint8 because they are cheaper there; conversion to float happens last.
"""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, v2

from freezetune.config.options import AUG_DEFAULT, aug_preset, check, crop_pct_problem
from freezetune.data.alpha import FlattenAlpha
from freezetune.errors import ConfigError, choices
from freezetune.model.preprocess import Preprocess

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


def interpolation_mode(name: str) -> InterpolationMode:
    """Map a ``Preprocess.interpolation`` name to torchvision's enum.

    >>> interpolation_mode("bicubic").value
    'bicubic'
    """
    if name not in _INTERPOLATIONS:
        raise ConfigError(f"unknown interpolation {name!r}; choose one of: {choices(_INTERPOLATIONS)}")
    return _INTERPOLATIONS[name]


def _to_uint8_rgb(pre: Preprocess) -> list[v2.Transform]:
    # A user's own 16-bit, float, RGBA, grey+alpha or palette image (given to the transform, not read by load_image)
    # is made 8-bit RGB as the file readers make it (a 16-bit one kept wide wrapped its resize's overshoot to black);
    # ToImage wraps tensors and converts PIL; RGB expands 1-channel input so 3-channel mean/std apply.
    return [FlattenAlpha(pre.alpha), v2.ToImage(), v2.RGB()]


def _to_normalized_float(pre: Preprocess) -> list[v2.Transform]:
    normalized = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(pre.mean), std=list(pre.std))]
    return [*normalized, ReverseChannels()] if pre.channel_order == "BGR" else normalized


class ReverseChannels(v2.Transform):
    """RGB to BGR, for a model that reads its channels so (MobileViT, ``Preprocess.channel_order``)."""

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        return inpt.flip(-3)


def _eval_geometry(pre: Preprocess) -> list[v2.Transform]:
    check(crop_pct_problem(pre.crop_pct))
    interp = interpolation_mode(pre.interpolation)
    return [v2.Resize(pre.eval_resize, interpolation=interp, antialias=True), v2.CenterCrop(pre.input_size)]


def eval_transform(pre: Preprocess) -> v2.Compose:
    """Deterministic eval pipeline: resize the short side to ``input_size / crop_pct``, center-crop, normalise.

    Args:
        pre: the model's preprocessing (size, mean/std, interpolation, crop_pct).

    Returns:
        A callable taking a PIL image or uint8 ``[C, H, W]`` tensor and returning float ``[3, S, S]``.

    >>> t = eval_transform(Preprocess(input_size=32))
    >>> t(torch.zeros(1, 28, 28, dtype=torch.uint8)).shape
    torch.Size([3, 32, 32])
    """
    return EvalCompose([*_to_uint8_rgb(pre), *_eval_geometry(pre), *_to_normalized_float(pre), v2.ToPureTensor()])


class EvalCompose(v2.Compose):
    """The eval pipeline: no randomness, so a batch of same-size uint8 images ``[B, C, H, W]`` may go through it at
    once, bit for bit as each would alone (the ``__getitems__`` of ``InMemoryImageDataset`` and ``FileImageDataset``,
    28 to 64 pixels: 5.7x faster than image by image in memory, 2.8x from PNG files; ``benchmarks/eval_pass.py``)."""

    batchable = True


def train_transform(pre: Preprocess, aug: str = AUG_DEFAULT) -> v2.Compose:
    """Training pipeline for one of the augmentation presets (``freezetune.config.options.AUGMENTATIONS``).

    Presets:
        ``none``: same geometry as eval (resize + center-crop), no randomness.
        ``light``: random resized crop (scale 0.7-1) + horizontal flip; gentle, suits few-shot fine-tuning.
        ``standard``: random resized crop (scale 0.25-1) + flip + TrivialAugmentWide + random erasing (p=0.25).

    Args:
        pre: the model's preprocessing (size, mean/std, interpolation).
        aug: preset name, one of ``AUG_PRESETS``.

    Returns:
        A callable taking a PIL image or uint8 ``[C, H, W]`` tensor and returning float ``[3, S, S]``.

    >>> t = train_transform(Preprocess(input_size=32), aug="standard")
    >>> t(torch.zeros(3, 40, 50, dtype=torch.uint8)).dtype
    torch.float32
    """
    preset = aug_preset(aug)
    if preset.crop_scale is None:
        return eval_transform(pre)
    interp = interpolation_mode(pre.interpolation)
    ops: list[v2.Transform] = [
        *_to_uint8_rgb(pre),
        v2.RandomResizedCrop(
            pre.input_size, scale=preset.crop_scale, ratio=preset.crop_ratio, interpolation=interp, antialias=True
        ),
        v2.RandomHorizontalFlip(p=preset.flip_p),
    ]
    if preset.color:
        # its geometric ops accept only nearest/bilinear on tensors: a bicubic model (most timm ones) gets bilinear
        nearest = interp == v2.InterpolationMode.NEAREST
        ops.append(
            v2.TrivialAugmentWide(
                interpolation=v2.InterpolationMode.NEAREST if nearest else v2.InterpolationMode.BILINEAR
            )
        )
    ops += _to_normalized_float(pre)
    if preset.erase_p:
        # Erasing runs after normalisation so the erased patch is zero-mean noise, not a black square.
        ops.append(
            v2.RandomErasing(p=preset.erase_p, scale=preset.erase_scale, ratio=preset.erase_ratio, value="random")
        )
    return v2.Compose([*ops, v2.ToPureTensor()])
