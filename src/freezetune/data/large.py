"""Images over PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``, 89 megapixels; twice that is refused, its guard
against decompression bombs): the refusal in the user's terms. PIL's raw warning below it is dropped where the
pre-scan says it once in freezetune's words (``data.scan.quiet_pil_warnings``).
"""

from __future__ import annotations

import re

from PIL import Image


def too_large(exc: Image.DecompressionBombError) -> str:
    """PIL's refusal of an image over twice ``Image.MAX_IMAGE_PIXELS`` (its guard against decompression bombs), in
    the user's terms: how large, the limit, what to do.

    >>> too_large(Image.DecompressionBombError("Image size (182000000 pixels) exceeds limit of 178956970 pixels, "
    ...                                        "could be decompression bomb DOS attack."))
    '182 megapixels, over the 179 that PIL decodes, its guard against decompression bombs: save a downscaled copy'
    """
    sizes = [int(n) for n in re.findall(r"\d+", str(exc))[:2]]
    if len(sizes) < 2:
        return str(exc)
    return (f"{megapixels(sizes[0])} megapixels, over the {megapixels(sizes[1])} that PIL decodes, its guard against "
            "decompression bombs: save a downscaled copy")  # fmt: skip


def megapixels(pixels: int) -> str:
    """A pixel count in megapixels, as messages say it.

    >>> megapixels(1_230_000_000), megapixels(95_000_000), megapixels(2_500)
    ('1230', '95', '0.0025')
    """
    return f"{pixels / 1e6:.0f}" if pixels >= 1e6 else f"{pixels / 1e6:.2g}"
