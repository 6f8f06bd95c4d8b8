"""How a model wants its input, stored in every checkpoint: for images the size, normalisation and resize rule;
for text (Hugging Face sequence classifiers) the tokenizer, the longest sequence and the CSV columns read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from freezetune.config.options import ALPHA_BEFORE, ALPHA_DEFAULT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """Input preprocessing of a model; ``input_size`` is the square side in pixels.

    >>> Preprocess(input_size=64).to_dict()["input_size"]
    64
    """

    input_size: int = 224
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)
    interpolation: str = "bilinear"  # "bilinear" | "bicubic" | "nearest"
    crop_pct: float = 0.875  # eval: resize to input_size / crop_pct, then center-crop input_size
    tokenizer: str | None = None  # text models: where AutoTokenizer loads from (the model's directory or hub id)
    max_length: int = 128  # text models: longer texts are truncated
    text_column: str | None = None  # text models: the CSV column of the texts (None: data.text.TEXT_COLUMNS)
    label_column: str | None = None  # text models: the CSV column of the labels (None: data.text.LABEL_COLUMNS)
    alpha: str = ALPHA_DEFAULT  # images: transparent pixels composited onto white, or kept as stored (data/alpha.py)
    channel_order: str = "RGB"  # images: "BGR" reverses the channels after normalising (MobileViT's processor does)

    @property
    def is_text(self) -> bool:
        return self.tokenizer is not None

    @property
    def eval_resize(self) -> int:
        """The short side an image is resized to for evaluation, before its centre crop of ``input_size``.

        >>> Preprocess(input_size=224, crop_pct=0.875).eval_resize
        256
        """
        return int(self.input_size / self.crop_pct)

    @property
    def decode_side(self) -> int:
        """The shortest side a JPEG file may shrink to as it decodes (``data.folder.load_image``): twice the eval
        resize, so the eval resize always shrinks and the smallest training crop (a quarter of the area, ``aug
        standard``) still comes from about as many pixels as it is resized to. Derived, never stored: a checkpoint's
        images decode as its size says.

        >>> Preprocess(input_size=224, crop_pct=0.875).decode_side
        512
        """
        return 2 * self.eval_resize

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(
            input_size=int(d["input_size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=str(d.get("interpolation", "bilinear")),
            crop_pct=float(d.get("crop_pct", 0.875)),
            tokenizer=d.get("tokenizer"),
            max_length=int(d.get("max_length", 128)),
            text_column=d.get("text_column"),
            label_column=d.get("label_column"),
            alpha=str(d.get("alpha", ALPHA_BEFORE)),  # saved before the rule: read as it was trained
            channel_order=str(d.get("channel_order", "RGB")),
        )
