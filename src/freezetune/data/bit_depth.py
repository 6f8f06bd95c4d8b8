"""Images of more than 8 bits a channel (16-bit PNGs and TIFFs from microscopes, scanners, satellites; float TIFFs)
made 8-bit grey, one rule for a file ``load_image`` reads and a PIL image a user gives the transforms."""

from __future__ import annotations

import numpy as np
from PIL import Image


def eight_bit(img: Image.Image) -> Image.Image:
    """A one-channel 16-bit, 32-bit integer or float image as 8-bit grey, scaled rather than clipped.

    PIL's RGB conversion clips their values at 255: a 16-bit PNG (microscopy, medical, satellite) turns almost all
    white, a float TIFF in [0, 1] almost all black; torchvision keeps them wide and its resize wraps a bright edge's
    overshoot round to black. Integers are read as 16-bit (0..65535 -> 0..255), but for two cases of a 32-bit one
    (mode ``I``, a 32-bit TIFF's): values that all fit 8 bits are taken as they are (read as 16-bit the image was
    black, with no word of it), and values past 65535 are scaled by the image's largest (clipped, it was white).
    Floats in [0, 1] are scaled by 255, other floats clipped to 0..255. Every other mode is returned as it is.

    >>> [eight_bit(Image.new(mode, (1, 1), v)).getpixel((0, 0)) for mode, v in [("I;16", 65535), ("I;16", 255),
    ...                                                                          ("I", 255), ("I", 2**20)]]
    [255, 0, 255, 255]
    """
    if img.mode.startswith("I"):  # I;16, I;16B, I;16L, I
        values = np.clip(np.asarray(img).astype(np.int64), 0, None)
        top = int(values.max()) if values.size else 0
        if img.mode == "I" and top <= 255:
            return Image.fromarray(values.astype(np.uint8), "L")
        if img.mode == "I" and top > 65535:
            return Image.fromarray((values * 255 // top).astype(np.uint8), "L")
        return Image.fromarray((np.clip(values, 0, 65535) // 257).astype(np.uint8), "L")
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float32))
        scale = 255.0 if values.size and values.min() >= 0 and values.max() <= 1 else 1.0
        return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), "L")
    return img
