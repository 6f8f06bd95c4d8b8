"""Transparent images (icons, clip art, logos, cut-out product photos) made RGB by compositing them onto white.

PIL's RGB conversion, torchvision's reader and most training scripts drop the alpha channel and keep whatever colour
is stored under the transparent pixels: black in every transparent PNG of Debian's ``openclipart-png``, so black line
art on a transparent background became black on black. freezetune composites onto white, as an image viewer or a web
page shows such an image (Hugging Face's image processors do the same). On 11 openclipart categories (40 images a
class, 64 px, 3 epochs, 3 seeds) the default command's test accuracy rose from 52.73 % to 55.88 %
(``benchmarks/README.md``).

The rule is part of a model's ``Preprocess`` (``alpha``), so a checkpoint saved before it (no ``alpha`` recorded:
``"drop"``) keeps reading images as it was trained. The file path (PIL) and the tensor path (the transforms, for a
user's own RGBA tensor or PIL image) round the same formula and agree bit for bit.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageOps

from freezetune.config.options import ALPHA_DEFAULT, ALPHA_MODES
from freezetune.data.bit_depth import eight_bit
from freezetune.errors import ConfigError, choices

_ORIENTATION = 0x0112  # the EXIF tag of how to turn a photo upright (data/orientation.py)
_ALPHA_PIL_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# PIL modes the transforms take as they are (a wider one is first made 8-bit grey: bit_depth.eight_bit)
_AS_IT_IS = ("RGB", "L")


def has_alpha(img: Image.Image) -> bool:
    """Whether ``img`` may have transparent pixels: an alpha channel, or a transparent colour or palette entry.

    >>> has_alpha(Image.new("RGBA", (1, 1))), has_alpha(Image.new("RGB", (1, 1)))
    (True, False)
    """
    rgba_palette = img.mode == "P" and getattr(img.palette, "mode", None) == "RGBA"  # (PIL's own RGBA -> P)
    return img.mode in _ALPHA_PIL_MODES or "transparency" in img.info or rgba_palette


def flatten(img: Image.Image, alpha: str = ALPHA_DEFAULT) -> Image.Image:
    """``img`` as an RGB image, its transparent pixels composited onto white (``alpha="white"``) or left as the
    colour stored under them (``"drop"``, PIL's own conversion).

    >>> flatten(Image.new("RGBA", (1, 1), (0, 0, 0, 0))).getpixel((0, 0))
    (255, 255, 255)
    >>> flatten(Image.new("RGBA", (1, 1), (0, 0, 0, 0)), "drop").getpixel((0, 0))
    (0, 0, 0)
    """
    _check(alpha)
    if not has_alpha(img):
        return img.convert("RGB")
    if img.mode == "P":  # a palette with transparency (icons, emoji): PIL warns on every direct RGB conversion of one
        img = img.convert("RGBA")  # with per-entry alpha and asks for RGBA first; the colours are the same either way
    if alpha == "drop":
        return img.convert("RGB")
    if img.mode == "La":  # premultiplied grey: PIL converts it to straight alpha (LA) only
        img = img.convert("LA")
    rgba = img if img.mode == "RGBA" else img.convert("RGBA")  # (a copy of 600 MB for a 150-megapixel scan)
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    # PIL's blend under a mask rounds (c * a + 255 * (255 - a)) / 255 as flatten_tensor does (every colour and alpha
    # pair is checked in the tests), in C and in place: a 100-megapixel scan needs no int32 copies
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def flatten_tensor(x: torch.Tensor, alpha: str = ALPHA_DEFAULT) -> torch.Tensor:
    """Images ``[..., C, H, W]`` with an alpha channel (C = 2: grey and alpha, C = 4: RGBA) without it, composited
    onto white (``"white"``) or with the alpha dropped (``"drop"``); C = 1 or 3 is returned as it is. uint8 images
    round ``(c * a + 255 * (255 - a)) / 255`` to the nearest integer (as ``flatten`` does), float ones in [0, 1]
    compute ``c * a + 1 - a``.

    >>> flatten_tensor(torch.tensor([[[0]], [[0]], [[0]], [[128]]], dtype=torch.uint8)).flatten().tolist()
    [127, 127, 127]
    """
    _check(alpha)
    channels = x.shape[-3]
    if channels not in (2, 4):
        return x
    colour, a = x[..., : channels - 1, :, :], x[..., channels - 1 :, :, :]
    if alpha == "drop":
        return colour.contiguous()
    if x.is_floating_point():
        return colour * a + (1 - a)
    c, a = colour.to(torch.int32), a.to(torch.int32)
    return ((c * a + 255 * (255 - a) + 127) // 255).to(x.dtype)


def _check(alpha: str) -> str:
    if alpha not in ALPHA_MODES:
        raise ConfigError(f"unknown alpha {alpha!r} (how transparent pixels are read); choose one of: "
                          f"{choices(ALPHA_MODES)}")  # fmt: skip
    return alpha


class FlattenAlpha:
    """The transforms' first step, for a user's own image: a PIL image turned upright by its EXIF orientation, one
    of 16 or 32 bits made 8-bit grey by
    ``eight_bit``, one other than RGB or grey (RGBA, LA, PA, premultiplied RGBa/La, palette, CMYK ...) made RGB by
    ``flatten``, as ``load_image`` makes a file's; a tensor ``[..., 2 or 4, H, W]`` by ``flatten_tensor``. Anything
    else passes unchanged."""

    def __init__(self, alpha: str = ALPHA_DEFAULT) -> None:
        self.alpha = _check(alpha)

    def __call__(self, x: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        if isinstance(x, Image.Image):
            if x.getexif().get(_ORIENTATION, 1) != 1:  # a phone's photo the user opened: upright, as a file is read
                x = ImageOps.exif_transpose(x)
            x = eight_bit(x)
            return x if x.mode in _AS_IT_IS else flatten(x, self.alpha)
        if not isinstance(x, torch.Tensor) or x.dim() < 3 or x.shape[-3] not in (2, 4):
            return x
        out = flatten_tensor(x.as_subclass(torch.Tensor), self.alpha)
        return type(x)(out) if type(x) is not torch.Tensor else out

    def __repr__(self) -> str:
        return f"FlattenAlpha(alpha={self.alpha!r})"
