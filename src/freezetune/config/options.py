"""Every choice list and value check of freezetune, defined once: the config, the CLI and the modules that act on a
choice all import them from here, so an error message always lists the choices the code accepts.

Torch-free on purpose: ``config.train_config`` and the CLI's argument parser import it without loading torch.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from freezetune.errors import ConfigError, choices

# what ``decay`` means, said where a decay below 1 (the stem then trains fastest) is refused
DECAY_MEANS = (
    "a stage at depth i below the head trains at lr / decay**i, unless stage_lrs names it (ULMFiT's 2.6); "
    "timm's layer_decay x is decay 1/x"
)

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("onecycle", "cosine", "none")
AMP_MODES = ("auto", "bf16", "fp16", "off")
# BatchNorm in frozen parts; see ``freezetune.freezing.freeze``
BN_POLICIES = ("frozen", "affine", "train", "affine-only")
BN_EVAL_POLICIES = ("frozen", "affine-only")  # ... whose statistics never move: the layer runs in eval
BN_AFFINE_POLICIES = ("affine", "affine-only")  # ... whose weight and bias train
BN_DEFAULT = "frozen"  # the one policy under which a frozen prefix is deterministic (and can be cached)
# Dropout, drop path and stochastic depth in the stages before the first that trains: keep (drawn in training, as
# built) or off (run as at inference, the prefix deterministic and cacheable); see ``freezetune.freezing.dropout``
DROPOUT_POLICIES = ("keep", "off")
DROPOUT_DEFAULT = "keep"
# BatchNorm statistics in the parts that train: updated from each batch (PyTorch's training mode), or held as in the
# frozen parts (eval mode; the scale and shift still train): lp-ft's fine-tune, small batches. "auto", the default:
# held where the recipe's start needs them held (lp-ft's fine-tune, the auto recipe's run from a probed head), else
# updated; an asked "update" is thus told from the default, and kept
BN_STATS = ("auto", "update", "frozen")
BN_STATS_DEFAULT = "auto"
# the defaults of an earlier freezetune that the files it wrote hold (--print-config, winner.yaml, a recipe's
# request write every key): bn_stats was "update" before 2026-12-05 (dc79e19), and such a file's lp-ft was refused
# for a value no user had chosen (``config.file._earlier_defaults_unset``)
EARLIER_DEFAULTS = {"bn_stats": "update"}
# transparent pixels of an image (``Preprocess.alpha``, ``data/alpha.py``): composited onto white, or the colour stored
# under them kept (PIL's RGB conversion; what a checkpoint saved before the rule was trained on)
ALPHA_MODES = ("white", "drop")
ALPHA_DEFAULT = "white"
ALPHA_BEFORE = "drop"  # the rule of a checkpoint that records none (saved before freezetune composited)
FREEZE_KEYWORDS = ("backbone", "all", "none", "bitfit")  # bitfit: all but biases, norms and the head
# the forms of an unfreeze schedule (``freezing.schedule.parse_schedule``); a plateau without mode follows the monitor
UNFREEZE_FORMS = ("epoch:N", "plateau:patience=P,min_delta=D[,mode=max|min]", "{epoch: spec}")
FREEZE_DEFAULT = "backbone"  # what ``freeze(model)`` freezes and ``inspect`` shows: all but the head
MONITORS = ("val_acc", "val_loss", "val_f1")  # val_f1: macro-F1, each class counts alike (imbalanced classes)
DEFAULT_MONITOR = MONITORS[0]  # what picks best.pt (and drives patience and plateau unfreezing) unless asked
MONITOR_MODES = {"val_acc": "max", "val_loss": "min", "val_f1": "max"}  # which way each monitored metric improves
TIE_BREAKS = {"val_acc": "val_loss", "val_loss": "val_acc", "val_f1": "val_loss"}  # what breaks a tie of each
FRACTIONS = ("val_acc", "val_f1")  # the monitored metrics that are fractions in [0, 1] (min_delta 0.005: half a point)


def compared_by(monitor: str) -> str:
    """What the auto recipe's trials and a sweep's recipes are compared by under ``monitor``: macro-F1 when it is
    monitored, else accuracy (a loss would rank a recipe by how sure it is, not by how often it is right).

    >>> compared_by("val_loss"), compared_by("val_f1")
    ('val_acc', 'val_f1')
    """
    return "val_f1" if monitor == "val_f1" else "val_acc"


METRIC_NAMES = {"val_acc": "val acc", "val_f1": "val macro-F1"}  # how the log and tables name a compared metric
# the training loss per class: "balanced" weighs each class by the inverse of its share of the training set
CLASS_WEIGHTS = ("none", "balanced")
IMBALANCE_NOTED = 3.0  # a run notes --class-weights when its largest class is this many times its smallest
AUTO_VAL_FRACTION = 0.1  # held out per class when no validation data is given (``data.datasets``)
AUTO_VAL_MAX_PER_CLASS = 50  # enough to rank recipes, cheap to cache and to evaluate every epoch
LARGE_IMAGE_WARNING = r"Image size \(\d+ pixels\) exceeds limit"  # PIL's DecompressionBombWarning (data.folder)
# PIL's, of an EXIF directory cut short (data.scan.tiff_orientation); not its "Possibly corrupt", of a tag's value
CORRUPT_EXIF_WARNING = r"Corrupt EXIF data\."
# PIL's raw warnings that the pre-scan says once a file, in freezetune's words: dropped (data.scan.quiet_pil_warnings)
PIL_WARNINGS = (LARGE_IMAGE_WARNING, CORRUPT_EXIF_WARNING)
BATCH_AUTO = "auto"  # --batch-size auto: the largest power of two that fits the CUDA device (memory.auto_batch_size)
LAST_K, LAST_K_DEFAULT = "last-k", 2  # the recipes last-1, last-2, ...: "last-k" alone is last-2
_LAST = LAST_K.removesuffix("k")  # what every last-K recipe starts with
# Named fine-tuning procedures (``--recipe``), each in one line; ``freezetune.recipes.named`` carries them out.
RECIPE_HELP = {
    "auto": "measure on the validation split which stages to freeze, then fine-tune the rest (the default)",
    "linear-probe": "only the new head trains, on cached features of the frozen backbone (BatchNorm frozen), at 10x "
    "the head's LR (--lr, or --stage-lrs naming the head) as lp-ft's probe",
    LAST_K: "the last k stages and the head train, the rest stays frozen and cached (last-2, last-3, ...; "
    f"last-k is last-{LAST_K_DEFAULT})",
    "full": "every layer trains",
    "gradual": "the head first, then one more stage after each epoch (epoch:1 unfreezing)",
    "plateau": "the head first, then one more stage whenever the validation metric (--monitor) stalls for an epoch",
    "lp-ft": "a linear probe fits the head on frozen features (BatchNorm frozen), then every layer fine-tunes from it "
    "(BatchNorm statistics held as the probe saw them)",
    "bitfit": "only biases and normalisation layers (and the head) train",
}
RECIPES = tuple(RECIPE_HELP)
# what ``freezetune sweep`` compares without --recipes
SWEEP_DEFAULT_RECIPES = ("linear-probe", LAST_K, "auto", "full")
SWEEP_RECIPES_KEY = "recipes"  # a sweep's --recipes in its --config file (sweep --print-config writes it)
SWEEP_DEFAULT_OUT = "runs/sweep"  # where a sweep goes without --out
# what a sweep sets for every recipe, whatever it is given, and why: a value given on the command line that differs
# is refused rather than dropped in silence
SWEEP_SETS = {
    "final_test": (False, "a sweep scores no recipe on the test split; `train --config winner.yaml` scores the winner"),
    "refit": (False, "a sweep judges recipes on the validation split, which a refit would train on; set refit: true "
                     "in winner.yaml instead"),
}  # fmt: skip
# why a sweep takes no cache_at: where a recipe's cache cuts follows from what it freezes
SWEEP_CACHE_AT = "each recipe caches where what it freezes allows (the auto recipe before its deepest candidate)"
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")  # what --device takes (cuda:N: one GPU by number)
CACHE_MODES = ("auto", "off", "memory", "disk")
DECODE_MODES = ("auto", "gpu", "cpu")
MODEL_SOURCES = ("timm", "torchvision", "hf")  # the prefix of a model name, as in "timm:resnet50"
HF_PREFIX = "hf:"  # a Hugging Face model: hf:ID or hf:FOLDER
RANDOM_WEIGHTS = ("none", "random")
TOPK = 5  # the classes `predict` lists per image or text unless asked (--topk)
PRETRAINED_WEIGHTS = ("imagenet", "default")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")  # a --weights that names a file
# the header names a text CSV's text and label columns are found by (``--text-column``/``--label-column`` name others)
TEXT_COLUMNS = ("text", "sentence", "review", "document", "content")
LABEL_COLUMNS = ("label", "class", "target", "category", "y")


@dataclass(frozen=True)
class AugPreset:
    """The parameters of one training augmentation preset, read by both pipelines: the per-image CPU one
    (``freezetune.data.transforms``) and the batched device one (``freezetune.data.augment``).

    Attributes:
        crop_scale: area fraction range of the random resized crop; None: eval geometry (resize + center-crop).
        crop_ratio: aspect-ratio range of the crop box (sampled log-uniformly).
        flip_p: probability of a horizontal flip.
        color: colour augmentation; on the CPU TrivialAugmentWide, on the device its batched stand-in, brightness
            and contrast factors drawn in ``[1 - jitter, 1 + jitter]``.
        jitter: see ``color``.
        erase_p: probability of random erasing (per-pixel noise, after normalisation).
        erase_scale: area fraction range of the erased box.
        erase_ratio: aspect-ratio range of the erased box.
    """

    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.0
    color: bool = False
    jitter: float = 0.4
    erase_p: float = 0.0
    erase_scale: tuple[float, float] = (0.02, 0.33)
    erase_ratio: tuple[float, float] = (0.3, 3.3)


AUGMENTATIONS = {
    "none": AugPreset(),
    # gentle: suits few-shot fine-tuning
    "light": AugPreset(crop_scale=(0.7, 1.0), flip_p=0.5),
    "standard": AugPreset(crop_scale=(0.25, 1.0), flip_p=0.5, color=True, erase_p=0.25),
}
AUG_PRESETS = tuple(AUGMENTATIONS)
AUG_DEFAULT = "light"


def aug_preset(name: str) -> AugPreset:
    """The parameters of augmentation preset ``name``; a ``ConfigError`` listing the presets otherwise.

    >>> aug_preset("light").crop_scale
    (0.7, 1.0)
    """
    check_choice("augmentation preset", name, AUG_PRESETS)
    return AUGMENTATIONS[name]


# --- checks: each returns the problem as text (None if fine), so a caller can report many at once -------------


def choice_problem(name: str, value: object, allowed: Iterable[object]) -> str | None:
    """``"unknown amp 'fp8'; choose one of: 'auto', 'bf16', 'fp16', 'off'"``, or None when ``value`` is allowed.

    >>> choice_problem("amp", "fp8", AMP_MODES)
    "unknown amp 'fp8'; choose one of: 'auto', 'bf16', 'fp16', 'off'"
    """
    allowed = tuple(allowed)
    if value in allowed:
        return None
    words = {str(a).lower(): str(a) for a in allowed}  # FP16 and Frozen are close to fp16 and frozen
    text = str(value).lower().replace("_", "-")
    close = difflib.get_close_matches(text, list(words), 1, 0.75) if isinstance(value, str) else []
    hint = f" (did you mean {words[close[0]]!r}?)" if close else ""
    return f"unknown {name} {value!r}{hint}; choose one of: {choices(allowed)}"


def column_name_problem(name: str, value: str | None) -> str | None:
    """Problem of a CSV column name (``text_column``, ``label_column``): given, it must name something.

    >>> column_name_problem("text_column", " "), column_name_problem("text_column", None)
    ("text_column is empty; give the CSV header's name of that column", None)
    """
    return None if value is None or value.strip() else f"{name} is empty; give the CSV header's name of that column"


def positive_int_problem(name: str, value: object) -> str | None:
    """Problem of a count that must be an integer >= 1 (``bool`` is not a count).

    >>> positive_int_problem("batch_size", 0), positive_int_problem("epochs", 2.5), positive_int_problem("epochs", 3)
    ('batch_size must be >= 1, got 0', 'epochs must be an integer, got 2.5', None)
    """
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} must be an integer, got {value!r}"
    return None if value >= 1 else f"{name} must be >= 1, got {value!r}"


def batch_size_problem(value: object) -> str | None:
    """Problem of a batch size: a count, or ``auto`` (``BATCH_AUTO``), as ``train`` and ``inspect`` take it.

    >>> batch_size_problem("auto"), batch_size_problem(0)
    (None, "batch_size must be >= 1, got 0 (or 'auto')")
    """
    if value == BATCH_AUTO:
        return None
    problem = positive_int_problem("batch_size", value)
    return problem and f"{problem} (or {BATCH_AUTO!r})"


def non_negative_int_problem(name: str, value: object) -> str | None:
    """Problem of a count that may be 0 (``workers``).

    >>> non_negative_int_problem("workers", -1)
    'workers must be >= 0, got -1'
    """
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} must be an integer, got {value!r}"
    return None if value >= 0 else f"{name} must be >= 0, got {value!r}"


def validation_source_problem(val_data: object, val_split: object) -> str | None:
    """Problem of naming validation images twice: ``val_data`` and ``val_split`` are two ways of saying which.

    >>> validation_source_problem("val/", 0.2)
    "give either val_data ('val/') or val_split (0.2), not both"
    """
    if val_data is not None and val_split is not None:
        return f"give either val_data ({val_data!r}) or val_split ({val_split!r}), not both"
    return None


def fraction_problem(name: str, value: object, *, whole: bool = False) -> str | None:
    """Problem of a share that must lie strictly between 0 and 1 (``val_split``), or in (0, 1] when the ``whole`` is
    a share too (``epoch_fraction``).

    >>> fraction_problem("val_split", 1.0), fraction_problem("epoch_fraction", 1.5, whole=True)
    ('val_split must be a fraction strictly between 0 and 1, got 1.0', 'epoch_fraction must be in (0, 1], got 1.5')
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} must be a number, got {value!r}"
    if whole:
        return None if 0.0 < value <= 1.0 else f"{name} must be in (0, 1], got {value!r}"
    return None if 0.0 < value < 1.0 else f"{name} must be a fraction strictly between 0 and 1, got {value!r}"


def crop_pct_problem(value: float) -> str | None:
    """Problem of an eval ``crop_pct`` (the eval resize is ``input_size / crop_pct``): it must be in (0, 1].

    >>> crop_pct_problem(0.875) is None, crop_pct_problem(0)
    (True, 'crop_pct must be in (0, 1], got 0')
    """
    return None if 0.0 < value <= 1.0 else f"crop_pct must be in (0, 1], got {value!r}"


def recipe_problem(name: str | None) -> str | None:
    """Problem of a recipe name: one of ``RECIPES``, or ``last-K`` with a whole K >= 1.

    >>> recipe_problem("last-3") is None, recipe_problem("last-0") is not None, recipe_problem("fast") is not None
    (True, True, True)
    >>> recipe_problem("LAST-2")  # doctest: +ELLIPSIS
    "unknown recipe 'LAST-2' (did you mean 'last-2'?); choose one of: 'auto', ..."
    >>> recipe_problem("last2")  # doctest: +ELLIPSIS
    "unknown recipe 'last2' (did you mean 'last-2'?); choose one of: 'auto', ..."
    """
    if name is None or name in RECIPES:
        return None
    k = name.removeprefix(_LAST) if isinstance(name, str) and name.startswith(_LAST) else None
    if k is not None and k.isdigit() and int(k) >= 1:
        return None
    if k is not None:  # last-0, last-x: the family is right, its K is not
        return f"recipe {name!r}: last-K trains the last K stages, K a whole number >= 1 (last-1, last-2, ...)"
    if isinstance(name, str) and name != name.lower() and recipe_problem(name.lower()) is None:  # LAST-2, Full
        return f"unknown recipe {name!r} (did you mean {name.lower()!r}?); choose one of: {choices(RECIPES)}"
    if isinstance(name, str) and (k := re.fullmatch(r"last[\s_]*(\d+)", name.strip().lower())) and int(k[1]) >= 1:
        return f"unknown recipe {name!r} (did you mean 'last-{int(k[1])}'?); choose one of: {choices(RECIPES)}"
    return choice_problem("recipe", name, RECIPES)


def recipe_family(name: str) -> str:
    """The entry of ``RECIPE_HELP`` a valid recipe name belongs to: ``last-k`` for every ``last-K``.

    >>> recipe_family("last-3"), recipe_family("last-k"), recipe_family("full")
    ('last-k', 'last-k', 'full')
    """
    return LAST_K if name.startswith(_LAST) else name


def last_k(name: str) -> int:
    """How many last stages a valid ``last-K`` recipe trains.

    >>> last_k("last-3"), last_k("last-k")
    (3, 2)
    """
    return LAST_K_DEFAULT if name == LAST_K else int(name.removeprefix(_LAST))


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(h|m|s)")
_DURATION_FORMS = "such as 90s, 5m, 1.5h or 1h30m (a plain number is seconds)"


def parse_duration(text: str | int | float | None) -> float | None:
    """Seconds in a budget such as ``"90s"``, ``"5m"``, ``"1.5h"``, ``"1h30m"`` or a plain number of seconds.

    >>> parse_duration("5m"), parse_duration("90"), parse_duration("1h 30m"), parse_duration(None)
    (300.0, 90.0, 5400.0, None)
    """
    if text is None:
        return None
    raw = str(text).strip().lower()
    try:
        seconds = float(raw)  # a plain number of seconds ("nan" and "inf" too: refused below)
    except ValueError:
        seconds = _seconds_of(raw, text)
    if not math.isfinite(seconds) or seconds <= 0:  # nan and inf passed, and crashed after every trial
        raise ConfigError(f"budget must be a positive, finite duration {_DURATION_FORMS}, got {text!r}")
    return seconds


def _seconds_of(raw: str, text: object) -> float:
    """The seconds of a duration with units: one number and its unit as ``float`` reads it ("+5m", "1e3s", "1_000s"),
    else each of h, m and s at most once, in that order ("1h30m", "1h 30m 10s")."""
    scale = {"h": 3600, "m": 60, "s": 1}
    with contextlib.suppress(ValueError):
        if raw[-1:] in scale:
            return float(raw[:-1]) * scale[raw[-1]]
    unsigned = raw.removeprefix("-")  # "-1h30m" is a duration, refused by the caller as not a positive one
    parts = _DURATION_PART.findall(unsigned)
    # nothing else between them ("1:30" was YAML's 90, "5min" a typo of 5m)
    units = [unit for _, unit in parts]
    if not parts or _DURATION_PART.sub("", unsigned).strip() or units != sorted(set(units), key="hms".index):
        raise ConfigError(f"budget {text!r} is not a duration {_DURATION_FORMS}") from None
    seconds = sum(float(n) * scale[unit] for n, unit in parts)
    return -seconds if raw.startswith("-") else seconds


def budget_text(text: str | int | float | None) -> str | None:
    """A budget as the log names it: as given, a plain number with its unit ("the 5 budget" said nothing of one);
    None for none.

    >>> budget_text("5m"), budget_text(90), budget_text("1.5"), budget_text(None)
    ('5m', '90s', '1.5s', None)
    """
    if text is None:
        return None
    raw = str(text).strip()
    try:
        float(raw)
    except ValueError:
        return raw
    return f"{raw}s"


def check(problem: str | None, error: type[Exception] = ConfigError) -> None:
    """Raise ``error(problem)`` when there is a problem.

    >>> check(positive_int_problem("topk", 5))
    """
    if problem is not None:
        raise error(problem)


def check_choice(name: str, value: object, allowed: Iterable[object], error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` naming ``value`` and listing the choices unless ``value`` is one of ``allowed``.

    >>> check_choice("decode", "tpu", DECODE_MODES)
    Traceback (most recent call last):
    freezetune.errors.ConfigError: unknown decode 'tpu'; choose one of: 'auto', 'gpu', 'cpu'
    """
    check(choice_problem(name, value, allowed), error)


def device_problem(device: object) -> str | None:
    """Problem of a ``device`` that is none of ``DEVICES`` (whether the device is there is known only where the run
    runs: ``precision.resolve_device``).

    >>> device_problem("cuda:1"), device_problem("cpu:0"), device_problem("tpu")
    (None, None, "unsupported device 'tpu'; devices are: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
    """
    if isinstance(device, str) and re.fullmatch(r"auto|cpu(:0)?|cuda(:\d+)?|mps(:0)?", device):  # (as torch names them)
        return None
    return f"unsupported device {device!r}; devices are: {choices(DEVICES)}"


def weights_problem(weights: object) -> str | None:
    """Problem of a ``weights`` that is neither a keyword nor a file's path (one there, or one that looks like one).

    >>> weights_problem("imagenet"), weights_problem("imagnet")  # doctest: +ELLIPSIS
    (None, "unknown weights 'imagnet'; use one of: 'imagenet', 'default', 'none', 'random', or a path ending in ...")
    """
    if weights is None:
        return None
    text = os.fspath(weights)
    if text.lower() in (*PRETRAINED_WEIGHTS, *RANDOM_WEIGHTS) or os.sep in text or os.path.exists(text):
        return None
    if os.path.splitext(text)[1].lower() in WEIGHT_SUFFIXES:
        return None
    valid = choices([*PRETRAINED_WEIGHTS, *RANDOM_WEIGHTS])
    return f"unknown weights {text!r}; use one of: {valid}, or a path ending in {'/'.join(WEIGHT_SUFFIXES)}"


def model_source(name: object) -> tuple[str, str] | None:
    """``(library, architecture)`` of a model named with one of ``MODEL_SOURCES``' prefixes; None without one (read
    without torch: the config's check of a name, before any model is built).

    >>> model_source("timm:resnet50"), model_source("resnet50"), model_source("keras:x")
    (('timm', 'resnet50'), None, None)
    """
    prefix, sep, arch = str(name).partition(":")
    return (prefix, arch) if sep and prefix in MODEL_SOURCES and arch else None
