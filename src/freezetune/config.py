"""Run configuration: the one place defaults live (``TrainConfig``), and its checks: the whole configuration is
validated before a run starts and every problem is reported in one message. Reading one from YAML, ``key=value``
overrides and CLI flags: ``config_file``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from freezetune.config_values import (  # noqa: F401 - re-exported: the config's public names
    PATH_FIELDS,
    allows_none,
    coerce,
    field_types,
    parse_freeze_spec,
    parse_stage_lrs,
    scalar_type,
    type_name,
)
from freezetune.errors import ConfigError, choices
from freezetune.options import (
    AMP_MODES,
    AUG_DEFAULT,
    AUG_PRESETS,
    BN_DEFAULT,
    BN_POLICIES,
    BN_STATS,
    BN_STATS_DEFAULT,
    CACHE_MODES,
    CLASS_WEIGHTS,
    DECODE_MODES,
    FREEZE_KEYWORDS,
    HF_PREFIX,
    MONITOR_MODES,
    MONITORS,
    OPTIMIZERS,
    PRETRAINED_WEIGHTS,
    RANDOM_WEIGHTS,
    SCHEDULERS,
    batch_size_problem,
    choice_problem,
    column_name_problem,
    fraction_problem,
    non_negative_int_problem,
    parse_duration,
    positive_int_problem,
    recipe_problem,
    validation_source_problem,
)

WEIGHT_KEYWORDS = (*PRETRAINED_WEIGHTS, *RANDOM_WEIGHTS)

# The choices of each choice field: ``validate`` checks them, the CLI lists them in ``--help``.
FIELD_CHOICES = {
    "optimizer": OPTIMIZERS,
    "scheduler": SCHEDULERS,
    "amp": AMP_MODES,
    "bn": BN_POLICIES,
    "bn_stats": BN_STATS,
    "aug": AUG_PRESETS,
    "monitor": MONITORS,
    "class_weights": CLASS_WEIGHTS,
    "cache": CACHE_MODES,
    "decode": DECODE_MODES,
}

# What a --resume may change: where and how fast the run computes, what it shows and saves, not what it trains.
# Every other setting must be the run's own (checkpoint.restore refuses the rest; epochs only stretch without an LR
# schedule).
RESUME_MAY_CHANGE = ("out", "resume", "device", "workers", "compile", "cuda_graph", "channels_last", "decode",
                     "cache_dir", "save_every_steps", "tensorboard", "progress", "final_test")  # fmt: skip
# may name another path on a resume (the data moved: a copy on a node's local disk, a renamed folder); what they hold is
# checked against last.pt's digest of the data, which does not depend on where the files are
DATA_PATHS = ("data", "val_data")


def _naming_unknown_keys(cls: type) -> type:
    """A dataclass whose ``__init__`` names the key it meant for an unknown one: ``TrainConfig(epoch=3)``, as the same
    typo in a YAML file does (Python's TypeError named none and listed nothing)."""
    init = cls.__init__

    @functools.wraps(init)
    def checked(self, *args: Any, **kwargs: Any) -> None:
        unknown = unknown_keys(kwargs)
        if unknown:
            raise ConfigError(unknown)
        init(self, *args, **kwargs)

    cls.__init__ = checked
    return cls


@_naming_unknown_keys
@dataclass
class TrainConfig:
    """Everything a training run needs. Field names are the YAML keys and, with ``-`` for ``_``, the CLI flags."""

    # model
    model: str = "timm:tf_efficientnet_lite0"
    weights: str = "imagenet"
    img_size: int | None = None
    init: str | None = None  # a freezetune checkpoint whose weights (head included) start the run
    max_length: int = 128  # a text model: the tokens a text keeps (longer ones are cut; the log counts them)
    text_column: str | None = None  # a text model: the CSV column of its texts (default: text, sentence, review...)
    label_column: str | None = None  # a text model: the CSV column of its labels (default: label, class, target...)
    # data
    data: str | None = None
    val_data: str | None = None
    val_split: float | None = None
    per_class: int | None = None
    aug: str = AUG_DEFAULT
    batch_size: int | str = 32  # or "auto": the largest that fits the CUDA device; config.yaml keeps the number
    workers: int | None = None
    skip_bad: bool = False  # leave out image files the pre-scan cannot read (listed in skipped.txt), not refuse
    # the automatically held-out validation images train too (no validation: best.pt is the last epoch). None: the
    # auto recipe's final run refits when nothing needs validation; other runs keep it
    refit: bool | None = None
    # freezing
    freeze: str | int | list[str | int] = "auto"  # held parsed: "-3" -> -3, "stem,layer1" -> ["stem", "layer1"]
    recipe: str | None = None  # a named procedure (options.RECIPE_HELP); "auto" is what freeze: auto runs
    budget: str | None = None  # wall-clock budget the auto recipe plans for, e.g. "5m"
    bn: str = BN_DEFAULT
    bn_stats: str = BN_STATS_DEFAULT  # BatchNorm statistics in the parts that train: updated, or held (eval mode)
    unfreeze: str | dict[int, str] | None = None
    # optimisation
    epochs: int = 10
    epoch_fraction: float = 1.0  # each epoch trains on this random share of the training set (a new draw each epoch)
    epoch_images: int | None = None  # ... and on at most this many of its images or texts (a large set's epochs)
    optimizer: str = "adamw"
    lr: float = 1e-3
    stage_lrs: dict[str, float] = field(default_factory=dict)
    decay: float | None = None
    weight_decay: float = 0.05
    momentum: float = 0.9
    scheduler: str = "onecycle"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    class_weights: str = "none"  # "balanced": the training loss weighs each class by the inverse of its frequency
    grad_clip: float | None = None
    skip_nonfinite: int = 0  # batches per epoch whose non-finite loss is skipped (no step) before the run stops
    # speed
    amp: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    cuda_graph: bool = True  # replay the cached training step as a CUDA graph (graph_step.py)
    cache: str = "auto"
    cache_views: int = 1
    cache_dir: str | None = None  # keep feature stores here and reuse them across runs (sweeps do)
    cache_at: str | None = None  # cut the cache at this frozen stage, not the first trainable one
    decode: str = "auto"
    device: str = "auto"
    # run
    seed: int = 0
    out: str | None = None
    resume: bool = False
    early_stop: int | None = None
    save_every_steps: int | None = None  # also save last.pt every N training steps (resumable mid-epoch)
    monitor: str = "val_acc"
    tensorboard: bool = True
    progress: bool = True
    final_test: bool = True  # score best.pt on the test split at the end (a sweep turns it off)

    def __post_init__(self) -> None:
        # Parsed once, here, whichever way the config was made (YAML, CLI, Python): the run and config.yaml see
        # the final form, and a YAML list stays a list.
        self.freeze = coerce("freeze", self.freeze)
        self.unfreeze = coerce("unfreeze", self.unfreeze)  # "{1: blocks.6}" as --unfreeze gives it
        self.stage_lrs = coerce("stage_lrs", self.stage_lrs)
        for f in fields(self):  # a pathlib.Path from Python is the path it names (config.yaml holds strings)
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike) and scalar_type(f.name) is str:
                setattr(self, f.name, os.fspath(value))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def recorded(self) -> dict[str, Any]:
        """The config as a run records it (``config.yaml``, checkpoints): ``to_dict`` with its paths absolute."""
        return absolute_paths(self.to_dict())

    def save(self, path: str | Path, **changes: Any) -> None:
        """Write the config (with ``changes``) as YAML, its paths absolute; ``resume`` is saved as false: it is an
        action on a run, not one of its settings, and the file reused as ``--config`` for another run must start that
        run afresh."""
        from freezetune._io import atomic_write_text

        values = {**self.recorded(), **changes, "resume": False}
        atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))

    def dump(self) -> str:
        """The config as YAML, as ``--print-config`` shows it: its paths absolute, as a run records them, so that the
        file works as ``--config`` from any directory (a relative ``data`` was read against the directory of the run
        that used the file)."""
        return yaml.safe_dump(self.recorded(), sort_keys=False)


def absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with its paths absolute: those of ``PATH_FIELDS``, and a weights file or the folder of an
    ``hf:DIR`` model that exists here (a keyword such as ``weights: imagenet`` and a hub id stay as they are).

    >>> absolute_paths({"data": "/data/images", "weights": "imagenet"})
    {'data': '/data/images', 'weights': 'imagenet'}
    """
    out = dict(values)
    for key in PATH_FIELDS:
        if isinstance(out.get(key), str) and out[key]:
            out[key] = os.path.abspath(out[key])
    weights = out.get("weights")
    if isinstance(weights, str) and weights.lower() not in WEIGHT_KEYWORDS and os.path.exists(weights):
        out["weights"] = os.path.abspath(weights)
    model = out.get("model")
    if isinstance(model, str) and model.startswith(HF_PREFIX) and os.path.exists(model.removeprefix(HF_PREFIX)):
        out["model"] = HF_PREFIX + os.path.abspath(model.removeprefix(HF_PREFIX))
    return out


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


INVALID = "invalid config: "  # every config problem's message starts so


def validate(cfg: TrainConfig, *, need_data: bool = True, typed: Collection[str] = ()) -> None:
    """Raise one ConfigError listing every problem of ``cfg`` (a missing ``data`` too, unless not ``need_data``);
    ``typed``: the keys given on the command line, an option a recipe sets itself given at its default value too.

    >>> validate(TrainConfig(data="imgs", bn="melt"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    freezetune.errors.ConfigError: invalid config: unknown bn 'melt'; choose one of: 'frozen', 'affine', ...
    """
    mistyped = _type_problems(cfg)
    if mistyped:  # the checks below compare numbers: a "3" where 3 belongs is reported alone, not as a TypeError
        raise ConfigError(INVALID + "; ".join(mistyped))
    problems = [choice_problem(name, getattr(cfg, name), allowed) for name, allowed in FIELD_CHOICES.items()]
    problems += [positive_int_problem(name, getattr(cfg, name)) for name in ("epochs", "cache_views", "max_length")]
    if cfg.cache == "off" and isinstance(cfg.cache_views, int) and cfg.cache_views > 1:  # it would do nothing
        problems.append(f"cache_views {cfg.cache_views} sets how many augmented views the feature cache stores; with "
                        "cache off every epoch augments afresh: drop one of them")  # fmt: skip
    if cfg.cache == "off" and cfg.cache_at is not None:  # so would a cut
        problems.append(f"cache_at {cfg.cache_at!r} sets where the feature cache cuts the model; with cache off "
                        "nothing is cached: drop one of them")  # fmt: skip
    problems.append(batch_size_problem(cfg.batch_size))
    problems.append(non_negative_int_problem("skip_nonfinite", cfg.skip_nonfinite))
    if cfg.workers is not None:
        problems.append(non_negative_int_problem("workers", cfg.workers))
    optional = ("img_size", "per_class", "early_stop", "save_every_steps", "epoch_images")
    problems += [positive_int_problem(name, getattr(cfg, name)) for name in optional if getattr(cfg, name) is not None]
    if cfg.val_split is not None:
        problems.append(fraction_problem("val_split", cfg.val_split))
    # (refused only when the data was read, it passed --print-config and a recipe's start)
    problems.append(validation_source_problem(cfg.val_data, cfg.val_split))
    problems.append(fraction_problem("epoch_fraction", cfg.epoch_fraction, whole=True))
    problems += _range_problems(cfg)
    problems += _column_problems(cfg)
    problems += _schedule_problems(cfg.unfreeze, cfg.monitor)
    problems.append(_refit_problem(cfg))
    problems.append(recipe_problem(cfg.recipe))
    from freezetune.recipes import conflict_problems  # recipes reads the config: imported when validating

    problems += conflict_problems(cfg, typed)
    try:
        parse_duration(cfg.budget)
    except ConfigError as exc:
        problems.append(str(exc))
    if cfg.data is None and need_data:
        problems.append("data is required (an image folder, a CSV file or an IDX directory)")
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(INVALID + "; ".join(problems))


def _column_problems(cfg: TrainConfig) -> list[str]:
    """A column name must name something, and the text and the label cannot be one column."""
    problems = [p for k in ("text_column", "label_column") if (p := column_name_problem(k, getattr(cfg, k)))]
    both = cfg.text_column is not None and cfg.label_column is not None
    if both and not problems and cfg.text_column.strip().lower() == cfg.label_column.strip().lower():
        problems.append(f"text_column and label_column are both {cfg.text_column!r}; a text and its label are two "
                        "columns")  # fmt: skip
    return problems


def _type_problems(cfg: TrainConfig) -> list[str]:
    """Plain fields holding a value of another type: what a Python caller can pass (YAML and the CLI convert)."""
    problems = []
    for name, hint in field_types().items():
        kind, value = scalar_type(name), getattr(cfg, name)
        if value is None and not allows_none(hint):  # a YAML null or key=null of a field that cannot be unset
            problems.append(f"{name} cannot be null (unset); give {type_name(hint)} (default: "
                            f"{getattr(TrainConfig(), name)!r})")  # fmt: skip
            continue
        if kind is None or value is None or _fits(value, kind):
            continue
        if name in ("data", "val_data"):
            problems.append(f"{name} must be a path (an image folder, a CSV file or an IDX directory), got a "
                            f"{type(value).__name__}; a Dataset of your own trains in your own loop with the "
                            "Python API (freeze, param_groups, Unfreezer)")  # fmt: skip
        else:
            problems.append(f"{name} expects {type_name(hint)}, got {value!r} ({type(value).__name__})")
    return problems


def _fits(value: Any, kind: type) -> bool:
    if kind is float:  # an int is a fine float; a bool is neither a number nor a word here
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _range_problems(cfg: TrainConfig) -> list[str]:
    """The numbers that must lie in a range. A negative grad_clip would flip every gradient's sign (the clip factor
    max_norm / norm goes negative) and a negative weight decay grows the weights: neither fails, both train wrong."""
    ranges = [
        ("lr", 0 < cfg.lr < math.inf, "> 0 and finite"),
        ("label_smoothing", 0 <= cfg.label_smoothing < 1, "in [0, 1)"),
        # below a valid epochs only: epochs 0 is said once, not again as a warm-up it leaves no room for
        (
            "warmup_epochs",
            0 <= cfg.warmup_epochs and (cfg.warmup_epochs < cfg.epochs or cfg.epochs < 1),
            "in [0, epochs)",
        ),
        ("weight_decay", 0 <= cfg.weight_decay < math.inf, ">= 0 and finite"),
        ("momentum", 0 <= cfg.momentum < 1, "in [0, 1)"),
        ("grad_clip", cfg.grad_clip is None or cfg.grad_clip >= 0, ">= 0 (0 or unset: no clipping)"),
    ]
    problems = [f"{name} must be {what}, got {getattr(cfg, name)}" for name, ok, what in ranges if not ok]
    # refused here, with the rest, not by the param groups once the model is built and the data scanned
    if cfg.decay is not None and not (isinstance(cfg.decay, (int, float)) and 0 < cfg.decay < math.inf):
        problems.append(f"decay must be > 0 and finite (each stage's lr is the next one's / decay), got {cfg.decay}")
    bad = [f"{k}={v!r}" for k, v in (cfg.stage_lrs or {}).items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf]  # fmt: skip
    if bad:
        problems.append(f"stage_lrs must be numbers >= 0 and finite, got {', '.join(bad)}")
    if any(not str(k).strip() for k in cfg.stage_lrs or {}):  # "=1e-4": refused only once the model was built
        problems.append("stage_lrs names a stage '' (STAGE=LR with no STAGE); give a stage name or glob before '='")
    if isinstance(cfg.seed, int) and not 0 <= cfg.seed < 2**32:  # numpy's seeding failed, after the data was read
        problems.append(f"seed must be in [0, 2**32 - 1], got {cfg.seed}")
    if cfg.freeze == []:  # --freeze "" (an unset shell variable): it froze nothing, a full fine-tune unasked
        problems.append(f"freeze is empty; give auto (the default), {', '.join(FREEZE_KEYWORDS)}, a number of "
                        "stages (-3), or stage names (stem,layer1)")  # fmt: skip
    return problems


def needs_validation(cfg: TrainConfig) -> bool:
    """Whether a run takes decisions on the validation set during training (early stopping, a plateau unfreeze).

    >>> needs_validation(TrainConfig(early_stop=3)), needs_validation(TrainConfig(unfreeze="epoch:2"))
    (True, False)
    """
    return bool(cfg.early_stop) or _plateau(cfg)


def validation_users(cfg: TrainConfig) -> list[str]:
    """What in the run decides on the validation set (``needs_validation``), as the user would name it.

    >>> validation_users(TrainConfig(early_stop=3, unfreeze="plateau:patience=2"))
    ['early stopping (--early-stop 3)', "plateau unfreezing ('plateau:patience=2': --unfreeze, or the plateau recipe)"]
    """
    users = [f"early stopping (--early-stop {cfg.early_stop})"] if cfg.early_stop else []
    if _plateau(cfg):
        users.append(f"plateau unfreezing ({cfg.unfreeze!r}: --unfreeze, or the plateau recipe)")
    return users


def _plateau(cfg: TrainConfig) -> bool:
    # parse_schedule's reading of the kind: the word before ":", spaces around it ignored
    return isinstance(cfg.unfreeze, str) and cfg.unfreeze.strip().startswith("plateau")


def _refit_problem(cfg: TrainConfig) -> str | None:
    if not cfg.refit:
        return None
    if cfg.val_data is not None or cfg.val_split is not None:
        return "refit trains on the validation images held out automatically; val_data and val_split keep theirs"
    if needs_validation(cfg):
        return "refit leaves no validation set, which early_stop and a plateau unfreeze need"
    return None


def _schedule_problems(unfreeze: str | dict | None, monitor: str) -> list[str]:
    # Checked here so a typo fails before the model and data load; stage names need the model and wait for it.
    if unfreeze is None or unfreeze == "none":
        return []
    from freezetune.errors import SpecError
    from freezetune.unfreeze_schedule import parse_schedule

    try:
        schedule = parse_schedule(unfreeze)
    except (SpecError, TypeError, ValueError) as exc:
        return [str(exc)]
    mode = MONITOR_MODES.get(monitor)
    if schedule.mode is not None and mode is not None and schedule.mode != mode:  # the plateau would wait for worse
        return [
            f"unfreeze {unfreeze!r} has mode={schedule.mode}, but {monitor} improves as it goes "
            f"{'up' if mode == 'max' else 'down'}: leave mode out (it follows monitor) or give mode={mode}"
        ]
    return []


def unknown_keys(values: dict[str, Any]) -> str | None:
    """The problem of the keys of ``values`` that are not config fields, with a close match for each where there is
    one, or None."""
    known = field_names()
    bad = [k for k in values if k not in known]
    if not bad:
        return None
    hints = [
        f"{k!r} (did you mean {difflib.get_close_matches(k, known, 1)[0]!r}?)"
        if difflib.get_close_matches(k, known, 1)
        else repr(k)
        for k in bad
    ]
    return f"unknown config key(s) {', '.join(hints)}; keys are: {choices(known, limit=60)}"
