"""EXIF orientation: a phone stores a photo as its sensor read it and records in a tag how to turn it upright.

Viewers and phones show the photo turned; PIL and torchvision do not turn it unless asked, so a model would train on
sideways photos that the user never saw sideways, and then meet upright ones from other tools. Every decode path of
freezetune turns images upright the same way: ``load_image`` with PIL's ``exif_transpose``, the device loader by
reading the tag from the JPEG bytes (``exif_orientation``) and turning the decoded tensor (``upright``), because
nvJPEG ignores the tag.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from freezetune.data.scan import jpeg_segments, tiff_orientation

_HEAD = 1 << 17  # the segments before the image data that are walked past to find EXIF (each <= 64 KiB)

# How to turn an image ``[..., H, W]`` upright, per EXIF orientation value (1 is upright already): the same
# transforms as PIL's ``ImageOps.exif_transpose``.
_UPRIGHT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: x.rot90(-1, (-2, -1)),
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),
    8: lambda x: x.rot90(1, (-2, -1)),
}


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``image`` (``[..., H, W]``) turned as its EXIF ``orientation`` says; unchanged for 1 or an unknown value.

    >>> upright(torch.arange(6).view(2, 3), 6).tolist()  # turned a quarter clockwise
    [[3, 0], [4, 1], [5, 2]]
    """
    turn = _UPRIGHT.get(orientation)
    return turn(image).contiguous() if turn else image


def exif_orientation(data: bytes | memoryview | torch.Tensor) -> int:
    """The EXIF orientation (1-8) recorded in a JPEG file's bytes; 1 when it has none or it cannot be read.

    >>> exif_orientation(bytes.fromhex("ffd8 ffe1001e 457869660000 4d4d002a00000008 0001 0112000300000001 00060000"))
    6
    """
    if isinstance(data, torch.Tensor):
        data = memoryview(data[:_HEAD].numpy())  # a view of the file's bytes: nothing copied per image
    for marker, start, end in jpeg_segments(data):  # up to the image data: EXIF comes before it or not at all
        if marker == 0xE1 and data[start : start + 6] == b"Exif\0\0":
            return tiff_orientation(data[start + 6 : end])[0]
    return 1
