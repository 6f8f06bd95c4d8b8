"""Build a model by name from timm, torchvision or Hugging Face, with its weights and input preprocessing.

Names carry their library as a prefix (``timm:resnet18``, ``torchvision:resnet18``, ``hf:DIR_OR_ID``) because the
libraries share model names but not weights or layer names. The model keeps its original classifier so pretrained
heads load; replacing the head is the caller's step. Pretrained weights come, in order, from a pip-packaged copy,
the library's local cache, or a download; offline, a download fails within seconds with a ``WeightsError`` instead
of hanging.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
from torch import nn

from freezetune.config.options import MODEL_SOURCES, PRETRAINED_WEIGHTS, RANDOM_WEIGHTS, model_source, weights_problem
from freezetune.errors import ConfigError, WeightsError, choices, setting
from freezetune.model.download import HF_HOST, download_guard, first_line, require_network
from freezetune.model.heads import drop_aux_classifiers
from freezetune.model.hf import hf_model
from freezetune.model.preprocess import Preprocess
from freezetune.model.weights import load_weights, packaged_weights
from freezetune.model.weights_file import weights_only_loads
from freezetune.run.log import warn_once

log = logging.getLogger(__name__)
SMALL_INPUT = 32  # px: an image model's last stage downsamples by 32 (ResNet, EfficientNet, ConvNeXt; a ViT's patches)


# "packaged": pretrained weights come from a local file we load ourselves, so build without downloading.
Source = Literal["random", "pretrained", "packaged", "shape"]  # shape: the pretrained architecture, weights unread
Builder = Callable[[str, str, Source], tuple[nn.Module, Preprocess | None]]


def create_model(
    name: str, weights: str | os.PathLike | None = "imagenet", *, img_size: int | None = None, load: bool = True,
    keep_aux: bool = False,
) -> tuple[nn.Module, Preprocess | None]:  # fmt: skip
    """Build ``name`` with the requested weights and return it with its input preprocessing.

    Args:
        name: ``timm:NAME``, ``torchvision:NAME`` or ``hf:DIR_OR_ID`` (image or sequence classification).
        weights: ``"imagenet"``/``"default"`` for the library's pretrained weights (a pip-packaged copy is used
            offline when one is registered in ``freezetune.model.weights.PACKAGED_WEIGHTS``), ``None``/``"none"``/
            ``"random"`` for random init, or a path to a ``.pth``/``.pt``/``.bin``/``.safetensors`` file (one whose
            classifier head has another number of classes loads all but its head, with a warning).
        img_size: overrides the preprocessing input size (crop_pct is kept).
        load: False builds the architecture ``weights`` make without reading them (a resume, a checkpoint: their
            own weights replace them): offline, or with the weights file gone, it still builds.
        keep_aux: keep torchvision GoogLeNet's and Inception v3's auxiliary classifiers, which are otherwise left
            out (``heads.drop_aux_classifiers``): the resume of a run an earlier freezetune began with them.

    Returns:
        ``(model, preprocess)``; the model keeps its original classifier. ``preprocess`` is None for text models.

    Raises:
        ConfigError: unknown prefix, model name or weights value; transformers missing for ``hf:``.
        WeightsError: pretrained weights cannot be fetched (offline) or a weights file does not fit.

    >>> model, pre = create_model("torchvision:resnet18", weights="none", img_size=128)
    >>> model.fc.out_features, pre.input_size
    (1000, 128)
    """
    library, arch = _split_name(name)
    mode = _weights_mode(weights)
    if not load:  # a weights file's architecture is the random one it is loaded into
        mode = "shape" if mode == "pretrained" else "random"
    packaged = packaged_weights(name) if mode == "pretrained" else None
    source: Source = "packaged" if packaged else mode if mode in ("pretrained", "shape") else "random"
    model, pre = _BUILDERS[library](name, arch, source)
    if not keep_aux and (
        dropped := drop_aux_classifiers(model)
    ):  # before a weights file loads: one with them or without fits
        log.info("%s: its auxiliary classifier(s) %s left out: training reads the model's output alone", name,
                 ", ".join(dropped))  # fmt: skip
    default_size = pre.input_size if pre is not None else None
    if packaged is not None:
        report = load_weights(model, packaged)
        log.info("%s: using packaged pretrained weights: %s", name, report.message)
    elif mode == "path":
        # a file whose head has other classes (an earlier fine-tune's) loads all but it: a run replaces the head
        report = load_weights(model, weights, strict=False)
        if report.skipped:
            warn_once(log, "%s: %s", name, report.message)
        else:
            log.info("%s: %s", name, report.message)
    pre = _resize(pre, img_size, name)
    if pre is not None and pre.input_size != default_size:
        _check_input_size(model, name, pre.input_size, default_size)
        if pre.input_size < SMALL_INPUT <= (default_size or SMALL_INPUT):  # --img-size 2 for 224: chance, unsaid
            warn_once(log, "%s: img_size %d is below %d px, the stride of most image models' last stage, whose "
                      "later stages then see a single pixel (pretrained at %s px)", name, pre.input_size, SMALL_INPUT,
                      default_size)  # fmt: skip
    return model, pre


def _check_input_size(model: nn.Module, name: str, size: int, default: int | None) -> None:
    """One forward pass at ``size`` px: a model whose position embeddings fix its input (a ViT without interpolation)
    fails there in one line, not in a traceback at the first training step."""
    from freezetune.device.memory import ran_out_of_ram
    from freezetune.model.heads import aux_modules

    was_training, aux = model.training, bool(aux_modules(model))
    # GoogLeNet's and Inception's aux classifiers run in training only (and fail there on small inputs): a pass in
    # train mode too, after which BatchNorm's running statistics are put back
    buffers = {k: v.clone() for k, v in model.named_buffers()} if aux else {}
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, 3, size, size))
            if aux:
                model.train()(torch.zeros(2, 3, size, size))
    except (AssertionError, ValueError, RuntimeError) as exc:
        if isinstance(exc, torch.OutOfMemoryError) or ran_out_of_ram(exc):  # no fault of the model's
            raise ConfigError(f"one {size} px image does not fit in memory in {name}: give a smaller --img-size (it "
                              f"was pretrained at {default} px)") from None  # fmt: skip
        # timm's _assert of a fixed size has no message: "(AssertionError)" said nothing of why
        silent = isinstance(exc, AssertionError) and not str(exc)
        why = "its forward asserts its input size" if silent else first_line(exc)
        raise ConfigError(f"{name} does not take {size} px images ({why}); give --img-size {default} or leave it "
                          "out") from None  # fmt: skip
    finally:
        model.train(was_training)
        if buffers:  # only a train-mode pass moved them
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(buffers[k])


def _split_name(name: str) -> tuple[str, str]:
    if (split := model_source(name)) is not None:
        return split
    hint = ""
    if ":" not in str(name):
        known = [
            f"{p}:{name}"
            for p, names in (("timm", _timm_names), ("torchvision", _torchvision_names))
            if name in names()
        ]
        hint = f"; did you mean {' or '.join(map(repr, known))}?" if known else ""
    prefixes = choices(f"{p}:" for p in MODEL_SOURCES)
    raise ConfigError(f"unknown model {name!r}: the name must start with one of the prefixes {prefixes}{hint}")


def _weights_mode(weights: str | os.PathLike | None) -> Literal["random", "pretrained", "path"]:
    problem = weights_problem(weights)
    if problem:
        raise ConfigError(problem)
    if weights is None or os.fspath(weights).lower() in RANDOM_WEIGHTS:
        return "random"
    return "pretrained" if os.fspath(weights).lower() in PRETRAINED_WEIGHTS else "path"


def model_problem(name: object) -> str | None:
    """Problem of a model ``name`` without a library's prefix, with the prefix it may have meant.

    >>> model_problem("timm:resnet50"), model_problem("resnet50")
    (None, "unknown model 'resnet50': the name must start with one of the prefixes 'timm:', 'torchvision:', 'hf:'; did you mean 'timm:resnet50' or 'torchvision:resnet50'?")
    """
    try:
        _split_name(str(name))
    except ConfigError as exc:
        return str(exc)
    return None


def _resize(pre: Preprocess | None, img_size: int | None, name: str) -> Preprocess | None:
    if img_size is None:
        return pre
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
        raise ConfigError(f"img_size must be a positive integer, got {img_size!r}")
    if pre is None:
        raise ConfigError(f"img_size={img_size} applies to image models; {name!r} is not one")
    return replace(pre, input_size=img_size)


def _unknown_model(library: str, arch: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(arch, known, n=5, cutoff=0.6)
    hint = f"; close matches: {choices(f'{library}:{c}' for c in close)}" if close else f" ({len(known)} known)"
    return ConfigError(f"unknown {library} model {arch!r}{hint}")


# --- torchvision -----------------------------------------------------------------------------------------------


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return tvm.list_models(module=tvm)  # classification models only: detection/video heads are not ours


def _torchvision_model(name: str, arch: str, source: Source) -> tuple[nn.Module, Preprocess]:
    import torchvision.models as tvm

    if arch not in _torchvision_names():
        raise _unknown_model("torchvision", arch, _torchvision_names())
    default = tvm.get_model_weights(arch).DEFAULT
    # the architecture's own input, random weights too (offline: it is the weights' metadata): Inception v3 takes
    # 299 px, and 224 px is too small for its auxiliary classifier
    pre = _torchvision_preprocess(default)
    if source == "random":  # their builders' present initialisation, asked for: else each run printed a FutureWarning
        return tvm.get_model(arch, weights=None, **_RANDOM_ARCH.get(arch, {}), **_input_arch(arch, default)), pre
    if source in ("packaged", "shape"):  # the pretrained architecture: GoogLeNet's pretrained one has no aux heads
        return tvm.get_model(arch, weights=None, **_PRETRAINED_ARCH.get(arch, {}), **_input_arch(arch, default)), pre
    url = urlparse(default.url)
    cached = Path(torch.hub.get_dir(), "checkpoints", Path(url.path).name)
    if not cached.is_file():
        require_network(name, url.hostname or "download.pytorch.org")
    with download_guard(name), weights_only_loads(name, cached):
        return tvm.get_model(arch, weights="DEFAULT"), pre


# What torchvision's builders set when they load pretrained weights (googlenet(), inception_v3()): built without
# them, GoogLeNet had aux heads last.pt's weights lack (every resume failed) and Inception v3 normalised its input
# otherwise (transform_input), in silence
_PRETRAINED_ARCH = {
    "googlenet": {"transform_input": True, "aux_logits": False, "init_weights": False},
    "inception_v3": {"transform_input": True, "init_weights": False},
}


def _input_arch(arch: str, weights: object) -> dict:
    """The input size a torchvision ViT's builder takes from its weights (``min_size``: ViT-H/14's SWAG weights are
    518 px) and would not know without them: built so (a resume, an ``--init``, ``eval``) its position table held
    257 rows where ``last.pt``'s holds 1 370, and every load failed; at random, 224 px beside a 518 px input."""
    size = weights.meta.get("min_size")
    return {"image_size": size[0]} if arch.startswith("vit_") and size and size[0] != 224 else {}


# torchvision warns (FutureWarning) that the default initialisation of these two will change, unless it is named
_RANDOM_ARCH = {"googlenet": {"init_weights": True}, "inception_v3": {"init_weights": True}}


def _torchvision_preprocess(weights: object) -> Preprocess:
    t = weights.transforms()
    crop = int(t.crop_size[0])
    resize = int(t.resize_size[0]) if isinstance(t.resize_size, (list, tuple)) else int(t.resize_size)
    return Preprocess(
        input_size=crop,
        mean=tuple(float(m) for m in t.mean),
        std=tuple(float(s) for s in t.std),
        interpolation=_known_interpolation(t.interpolation.value),
        crop_pct=crop / resize,
    )


def _known_interpolation(value: object) -> str:
    return value if value in ("nearest", "bilinear", "bicubic") else "bilinear"


# --- timm ------------------------------------------------------------------------------------------------------


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _timm_model(name: str, arch: str, source: Source) -> tuple[nn.Module, Preprocess]:
    import timm

    if not timm.is_model(arch):
        raise _unknown_model("timm", arch, _timm_names())
    cfg = _timm_pretrained_cfg(arch)
    model = _timm_pretrained(name, arch, cfg) if source == "pretrained" else timm.create_model(arch)
    return model, _timm_preprocess(model)


def _timm_pretrained_cfg(arch: str) -> dict:
    import timm
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(arch)
    except RuntimeError as e:  # an architecture with a pretrained tag timm does not know: "resnet18.xyz"
        tags = timm.list_pretrained(arch.split(".")[0] + ".*")
        raise ConfigError(f"unknown timm pretrained tag in {arch!r}; known: {choices(tags)}") from e
    return cfg.to_dict() if cfg is not None else {}


def _timm_pretrained(name: str, arch: str, cfg: dict) -> nn.Module:
    import timm

    if not (cfg.get("hf_hub_id") or cfg.get("url")):
        raise WeightsError(
            f"timm has no pretrained weights for {arch!r}; pass {setting('weights', 'PATH', placeholder=True)} or "
            f"{setting('weights', 'none')}"
        )
    cached = _timm_cached_file(cfg)
    if cached is not None:
        log.info("%s: using cached pretrained weights %s", name, cached)
        # Loading the cached file directly skips huggingface_hub's freshness check, which stalls offline.
        with weights_only_loads(name, cached):
            return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(cached)})
    hub = bool(cfg.get("hf_hub_id"))
    require_network(name, HF_HOST if hub else (urlparse(cfg["url"]).hostname or ""), hub=hub)
    with download_guard(name), weights_only_loads(name, cfg.get("hf_hub_id") or cfg["url"]):
        return timm.create_model(arch, pretrained=True)


def _timm_cached_file(cfg: dict) -> Path | None:
    """A weights file timm downloaded earlier (Hugging Face cache first, as timm prefers the hub), or None."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        for filename in filter(None, (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin")):
            hit = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(hit, str):
                return Path(hit)
    url = cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir(), "checkpoints", Path(urlparse(url).path).name)
        if path.is_file():
            return path
    return None


def _timm_preprocess(model: nn.Module) -> Preprocess:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return Preprocess(
        input_size=int(cfg["input_size"][-1]),  # (C, H, W); timm image models are square
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        interpolation=_known_interpolation(cfg.get("interpolation")),
        crop_pct=float(cfg.get("crop_pct") or 0.875),
    )


_BUILDERS: dict[str, Builder] = {"timm": _timm_model, "torchvision": _torchvision_model, "hf": hf_model}
