"""Hugging Face models for ``model.create.create_model`` (``hf:DIR_OR_ID``): the task class a config names (image or
sequence classification), its pretrained weights from a folder, the cache or the hub, a text model's padding token
and pooling, an image model's preprocessing from its image-processor config, and what of a load's report a user must
hear (weights outside the head left random), the rest of transformers' report and progress bar silenced."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from freezetune.errors import ConfigError, MissingExtra, WeightsError
from freezetune.model import download, text_pooling
from freezetune.model.download import HF_HOST, download_guard, first_line
from freezetune.model.preprocess import Preprocess
from freezetune.model.stages import stages
from freezetune.model.weights_file import weights_only_loads
from freezetune.run.log import warn_once

if TYPE_CHECKING:
    from freezetune.model.create import Source

log = logging.getLogger(__name__)
_HF_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values in HF configs


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise MissingExtra("hf: models need the transformers package: pip install 'freezetune[hf]'") from e
    return transformers


def hf_model(name: str, arch: str, source: Source) -> tuple[nn.Module, Preprocess | None]:
    transformers = _import_transformers()
    # A hub id offline is served from the local cache only, so nothing waits on network timeouts.
    cache_only = not Path(arch).is_dir() and (download.hub_offline() or not download.can_reach(HF_HOST))
    config = _hf_config(transformers, name, arch, cache_only)
    auto, is_image = _hf_auto_class(transformers, config, arch)
    model = (
        _hf_pretrained(auto, name, arch, cache_only)
        if source == "pretrained"
        else auto.from_config(config, trust_remote_code=False)
    )
    if not is_image:
        _set_pad_token(model.config, transformers, arch, cache_only)
        if mode := text_pooling.declared(arch, cache_only=cache_only):  # a sentence-transformers model's own pooling
            text_pooling.install(model, mode, name)
    return model, (_hf_preprocess(arch, cache_only, getattr(config, "image_size", None)) if is_image else None)


def _set_pad_token(config, transformers, arch: str, cache_only: bool) -> None:
    """A decoder (GPT-2, Llama) usually ships without a padding token: a classifier then refused every batch of more
    than one text (a traceback). It pads with its tokenizer's padding token, else its end-of-sequence token, as its
    tokenizer does here (``data.text.TokenizeBatch``), so each text is read to its own last token. A config that
    names a padding token its tokenizer lacks is told the one the tokenizer pads with: the model looked for its own
    id, found none, and read each shorter text of a batch at a padding position (its scores changed with the batch).
    """
    if not hasattr(config, "pad_token_id"):
        return
    pad, padless = None, False
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            arch, local_files_only=cache_only or Path(arch).is_dir(), trust_remote_code=False
        )
        padless = tokenizer.pad_token_id is None
        pad = tokenizer.eos_token_id if padless else tokenizer.pad_token_id
    except (OSError, ValueError):  # no tokenizer files here: the config's own end-of-sequence token
        pass
    if config.pad_token_id is not None and not (padless and isinstance(pad, int) and pad != config.pad_token_id):
        return
    if config.pad_token_id is not None:
        log.info("%s: its config's pad_token_id %d is no token its tokenizer pads with: told %d, the end-of-sequence "
                 "token the batches are padded with", arch, config.pad_token_id, pad)  # fmt: skip
    eos = getattr(config, "eos_token_id", None)
    pad = pad if pad is not None else (eos[0] if isinstance(eos, (list, tuple)) and eos else eos)
    if isinstance(pad, int):
        config.pad_token_id = pad


def _unreadable(exc: BaseException) -> bool:
    """Whether loading failed on a weights file that is no whole one: safetensors' header errors, torch.load's of a
    truncated .bin (its zip reader's RuntimeError, EOFError)."""
    from safetensors import SafetensorError

    return isinstance(exc, (SafetensorError, EOFError)) or (
        isinstance(exc, RuntimeError) and "PytorchStreamReader" in str(exc)
    )


def _hf_pretrained(auto, name: str, arch: str, cache_only: bool) -> nn.Module:
    if Path(arch).is_dir():
        try:
            with weights_only_loads(name, arch), quiet_hf_loading():
                model, info = auto.from_pretrained(arch, output_loading_info=True, trust_remote_code=False)
        except OSError as e:
            raise WeightsError(f"cannot load weights from {arch!r}: {first_line(e)}") from e
        except Exception as e:  # a traceback: a truncated file, or the Git LFS pointer a clone without git-lfs leaves
            if not _unreadable(e):
                raise
            raise WeightsError(f"cannot load weights from {arch!r}: {first_line(e)}; a weights file there is "
                               "truncated or not one (a Git LFS pointer? run `git lfs pull` in it)") from e  # fmt: skip
    else:
        try:
            with download_guard(name, "not in the local Hugging Face cache" if cache_only else ""), \
                    weights_only_loads(name, arch), quiet_hf_loading():  # fmt: skip
                model, info = auto.from_pretrained(
                    arch, local_files_only=cache_only, output_loading_info=True, trust_remote_code=False
                )
        except Exception as e:  # a download cut short in the hub's cache
            if not _unreadable(e):
                raise
            raise WeightsError(f"cannot load weights of {arch!r} from the Hugging Face cache: {first_line(e)}; "
                               "delete the model's folder there to download it again") from e  # fmt: skip
    problem = hf_loading_problem(info, stages(model)[-1].modules)
    if problem:
        warn_once(log, "%s: %s", name, problem)
    return model


def _hf_config(transformers, name: str, arch: str, cache_only: bool):
    try:
        return transformers.AutoConfig.from_pretrained(arch, local_files_only=cache_only, trust_remote_code=False)
    except (OSError, ValueError) as e:
        if "custom code" in str(e):  # asked of the user once, a "y" ran the folder's (or the hub repo's) .py files
            raise ConfigError(f"cannot load {name!r}: its config.json maps its classes to Python files of its own "
                              "(auto_map), which freezetune does not run; load it with transformers "
                              "(trust_remote_code=True) and freeze it with freezetune's Python API") from e  # fmt: skip
        where = "not a local directory and not in the Hugging Face cache (offline?)" if cache_only else first_line(e)
        raise ConfigError(
            f"cannot load {name!r}: {where}; give a model directory or a hub id like 'google/vit-base-patch16-224'"
        ) from e


def _hf_auto_class(transformers, config, arch: str):
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    if config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return transformers.AutoModelForImageClassification, True
    if config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return transformers.AutoModelForSequenceClassification, False
    raise ConfigError(
        f"Hugging Face model {arch!r} has type {config.model_type!r}, which has no image or sequence classification class"
    )


def _hf_preprocess(arch: str, cache_only: bool, image_size: object = None) -> Preprocess:
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        settings, _ = ImageProcessingMixin.get_image_processor_dict(arch, local_files_only=cache_only)
    except (OSError, ValueError):
        # the config's image_size is what a ViT's position embeddings were made for (224 would not fit a 32 px one)
        size = image_size if isinstance(image_size, int) and image_size > 0 else Preprocess().input_size
        warn_once(log, "%s has no image processor config; using ImageNet preprocessing defaults at %d px", arch, size)
        return Preprocess(input_size=size)
    return _preprocess_from_hf(_processor_settings(arch, cache_only, settings))


_PROCESSOR_KEYS = ("size", "crop_size", "do_center_crop", "crop_pct", "resample", "do_rescale", "rescale_factor",
                   "rescale_offset", "do_normalize", "image_mean", "image_std", "include_top",
                   "do_flip_channel_order")  # fmt: skip


def _processor_settings(arch: str, cache_only: bool, saved: dict) -> dict:
    """What the model's image processor does, its class's defaults included: a config file names only what differs
    from them (MobileViT's names no normalisation, and it has none; it reverses the channels), and the defaults were
    read as ImageNet's. The file alone where the processor cannot be built (its class missing from this
    transformers), where a file without ``do_normalize`` normalises by the mean it names."""
    import transformers

    try:
        with quiet_hf_loading():
            processor = transformers.AutoImageProcessor.from_pretrained(
                arch, local_files_only=cache_only, trust_remote_code=False
            )
        return {**{key: getattr(processor, key, None) for key in _PROCESSOR_KEYS}, "kind": type(processor).__name__}
    except Exception:  # noqa: BLE001 (any class's own failure to build: its file still says most of it)
        kind = saved.get("image_processor_type") or saved.get("feature_extractor_type") or ""
        return {**saved, "do_normalize": saved.get("do_normalize", True), "kind": kind}


def _hf_side(value: object, default: int | None) -> int | None:
    if isinstance(value, int):
        return value
    if hasattr(value, "get"):  # a dict, or a built processor's SizeDict
        return value.get("shortest_edge") or value.get("height") or default
    return default


def _preprocess_from_hf(settings: dict) -> Preprocess:
    """Translate an image processor's settings (``size``, ``crop_size``, ``crop_pct``, ``resample``, rescaling,
    normalisation, channel order) into ``Preprocess``."""
    size = _hf_side(settings.get("size"), 224)
    crop = _hf_side(settings.get("crop_size"), None) if settings.get("do_center_crop") else None
    kind = str(settings.get("kind") or "")
    if kind.startswith("Levit"):  # LeViT resizes the short side to 256/224 of its size, then crops crop_size
        size = int(size * 256 / 224)
    if settings.get("crop_pct") and kind.startswith("ConvNext") and size >= 384:  # warped to a square, no crop
        input_size, crop_pct = size, 1.0
    elif settings.get("crop_pct"):  # ConvNeXt style: resize to size / crop_pct, crop size
        input_size, crop_pct = size, float(settings["crop_pct"])
    elif crop:  # (a crop past the resize, MobileViT's class default, pads: the nearest here crops nothing)
        input_size, crop_pct = crop, min(crop / size, 1.0)
    else:
        # ViT style resizes straight to size x size; short-side resize + full crop is the closest Preprocess rule.
        input_size, crop_pct = size, 1.0
    default = Preprocess()
    # a pixel x in [0, 1] reaches the model as (x * scale - offset - mean) / std, the same as
    # (x - (mean + offset) / scale) / (std / scale); EfficientNet's offset rescales to [-1, 1], and its include_top
    # divides by the std once more
    rescale = settings.get("do_rescale", True)
    scale = 255.0 * (float(settings.get("rescale_factor") or 1 / 255) if rescale else 1.0)
    offset = 1.0 if rescale and settings.get("rescale_offset") else 0.0
    means, stds = settings.get("image_mean") or default.mean, settings.get("image_std") or default.std
    normalize = settings.get("do_normalize", True)
    mean = [(offset + (float(m) if normalize else 0.0)) / scale for m in means]
    std = [(float(s) if normalize else 1.0) * (float(s) if settings.get("include_top") else 1.0) / scale for s in stds]
    return Preprocess(
        input_size=int(input_size),
        mean=tuple(mean),
        std=tuple(std),
        interpolation=_HF_PIL_RESAMPLE.get(settings.get("resample"), "bilinear"),
        crop_pct=crop_pct,
        channel_order="BGR" if settings.get("do_flip_channel_order") else "RGB",
    )


@contextmanager
def quiet_hf_loading() -> Iterator[None]:
    """Silence transformers' own report and progress bar for the ``from_pretrained`` calls inside.

    Its report names, in a table per load, the classifier the checkpoint lacks: the head freezetune replaces
    anyway. ``hf_loading_problem`` keeps what matters from it (weights other than the head left random).

    >>> with quiet_hf_loading():  # doctest: +SKIP
    ...     model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    """
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def hf_loading_problem(info: Mapping, head: Iterable[str]) -> str | None:
    """What a user must hear from a Hugging Face load's ``output_loading_info``: weights outside the classifier
    ``head`` (the modules of the head stage) that the checkpoint did not have (they start random) or whose shapes
    did not fit; None if none.

    >>> hf_loading_problem({"missing_keys": ["pre_classifier.bias"]}, ["pre_classifier", "classifier"])
    >>> hf_loading_problem({"missing_keys": ["bert.pooler.dense.weight", "classifier.bias"]}, ["classifier"])
    "1 weight(s) not in the checkpoint start random: 'bert.pooler.dense.weight'"
    """
    heads = (head,) if isinstance(head, str) else tuple(head)
    outside = sorted(
        k for k in info.get("missing_keys") or () if not any(k == h or k.startswith(h + ".") for h in heads)
    )
    mismatched = sorted(str(m[0] if isinstance(m, (tuple, list)) else m) for m in info.get("mismatched_keys") or ())
    parts = [f"{len(keys)} weight(s) {what}: {', '.join(map(repr, keys[:3]))}{' ...' if len(keys) > 3 else ''}"
             for keys, what in ((outside, "not in the checkpoint start random"), (mismatched, "of another shape"))
             if keys]  # fmt: skip
    return "; ".join(parts) or None


def renamed_as_loaded(model: nn.Module, source: Mapping[str, object]) -> dict[str, object] | None:
    """A Hugging Face model's weights named as transformers names them when it loads them: transformers 5 saves the
    older key names (a ViT's ``vit.encoder.layer.0.attention.attention.query``) of modules it has renamed
    (``vit.layers.0.attention.q_proj``), and renames them as it reads a folder. None for another model, a
    transformers without such renames, or weights no rename changes; a rename that also converts tensors (fusing
    two into one) is not made here."""
    if not isinstance(getattr(getattr(model, "config", None), "model_type", None), str):
        return None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
        renamed = {rename_source_key(key, renamings, [])[0]: value for key, value in source.items()}
    except (ImportError, AttributeError, TypeError, ValueError, KeyError):  # another transformers' internals
        return None
    return renamed if renamed.keys() != source.keys() and len(renamed) == len(source) else None
