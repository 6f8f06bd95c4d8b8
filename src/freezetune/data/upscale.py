"""Images far smaller than the model's input: every image is resized up to the input size, so a step costs what the
input size costs, not the images' own. Fashion-MNIST's 28 px images at EfficientNet-Lite0's 224 px are 64x the
pixels: the default command trained for hours on a CPU, and nothing said why. On a CPU a note says so, and names
``--img-size``.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch.utils.data import Dataset

from freezetune.data.idx import InMemoryImageDataset

SAMPLED_FILES = 32  # headers read of an image folder (spread over it): one file open each
UPSCALE_NOTED = 2.0  # the input side this many times the images' (4x the pixels) or more is noted


def typical_side(dataset: Dataset) -> int | None:
    """The images' shorter side: an in-memory set's, or the median of ``SAMPLED_FILES`` files' headers spread over an
    image folder; None for other datasets (texts) or when no sampled file opens (the pre-scan names broken ones).

    >>> typical_side(InMemoryImageDataset(torch.zeros(2, 28, 30, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"]))
    28
    """
    if isinstance(dataset, InMemoryImageDataset):
        return min(dataset.images.shape[1:3])
    samples = getattr(dataset, "samples", None)
    if not samples:
        return None
    sides = []
    for path, _ in samples[:: max(1, len(samples) // SAMPLED_FILES)][:SAMPLED_FILES]:
        try:
            with Image.open(path) as img:  # the header alone: no pixel is decoded
                sides.append(min(img.size))
        except OSError:
            continue
    return sorted(sides)[len(sides) // 2] if sides else None


def upscale_note(dataset: Dataset, input_size: int, device: torch.device) -> str | None:
    """A note when a CPU run resizes its training images up to an input side ``UPSCALE_NOTED`` times theirs or more;
    None otherwise (a GPU's steps are fast enough that the upscale, which usually scores higher, is not worth a word).

    >>> ds = InMemoryImageDataset(torch.zeros(2, 28, 28, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
    >>> upscale_note(ds, 224, torch.device("cpu"))[:70]
    'note: the training images are 28 px on their shorter side, resized up '
    """
    side = typical_side(dataset) if device.type == "cpu" else None
    if not side or input_size < UPSCALE_NOTED * side:
        return None
    return (
        f"note: the training images are {side} px on their shorter side, resized up to the model's input of "
        f"{input_size} px: {(input_size / side) ** 2:.0f}x their pixels, and about that much more compute a step "
        "on this CPU; --img-size sets the input size (smaller trains faster, and may score lower)"
    )
