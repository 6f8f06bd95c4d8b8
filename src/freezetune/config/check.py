"""The config's checks: the whole configuration is validated before a run starts, and every problem (an unknown
choice, a value out of range, a wrong type, settings that contradict each other) is reported in one message, with
the valid choices; and which settings need a validation split."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from freezetune.config.options import (
    DECAY_MEANS,
    FREEZE_KEYWORDS,
    MONITOR_MODES,
    batch_size_problem,
    choice_problem,
    column_name_problem,
    device_problem,
    fraction_problem,
    model_source,
    non_negative_int_problem,
    parse_duration,
    positive_int_problem,
    recipe_problem,
    validation_source_problem,
    weights_problem,
)
from freezetune.config.train_config import FIELD_CHOICES, INVALID, TrainConfig, epochs_of
from freezetune.config.values import (
    PATH_SETTINGS,
    allows_none,
    field_types,
    scalar_type,
    type_name,
)
from freezetune.errors import ConfigError, shown


def validate(cfg: TrainConfig, *, need_data: bool = True, typed: Collection[str] = ()) -> None:
    """Raise one ConfigError listing every problem of ``cfg`` (a missing ``data`` too, unless not ``need_data``);
    ``typed``: the keys given on the command line, an option a recipe sets itself given at its default value too.

    >>> validate(TrainConfig(data="imgs", bn="melt"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    freezetune.errors.ConfigError: invalid config: unknown bn 'melt'; choose one of: 'frozen', 'affine', ...
    """
    if not isinstance(cfg, TrainConfig):  # ft.train({"data": ...}) ended in an AttributeError of dict
        raise ConfigError(f"a run takes a freezetune.TrainConfig, not {type(cfg).__name__}: TrainConfig(**settings), "
                          "or freezetune.config.file.load_config(PATH) for a YAML file")  # fmt: skip
    mistyped = _type_problems(cfg)
    if mistyped:  # the checks below compare numbers: a "3" where 3 belongs is reported alone, not as a TypeError
        raise ConfigError(INVALID + "; ".join(mistyped))
    problems = [choice_problem(name, getattr(cfg, name), allowed) for name, allowed in FIELD_CHOICES.items()]
    problems += _empty_path_problems(cfg)
    problems += [positive_int_problem(name, getattr(cfg, name)) for name in ("cache_views", "max_length")]
    if cfg.cache == "off" and isinstance(cfg.cache_views, int) and cfg.cache_views > 1:  # it would do nothing
        problems.append(f"cache_views {cfg.cache_views} sets how many augmented views the feature cache stores; with "
                        "cache off every epoch augments afresh: drop one of them")  # fmt: skip
    if cfg.cache == "off" and cfg.cache_at is not None:  # so would a cut
        problems.append(f"cache_at {cfg.cache_at!r} sets where the feature cache cuts the model; with cache off "
                        "nothing is cached: drop one of them")  # fmt: skip
    problems.append(batch_size_problem(cfg.batch_size))
    problems += [device_problem(cfg.device), weights_problem(cfg.weights), _model_problem(cfg.model)]
    problems.append(non_negative_int_problem("skip_nonfinite", cfg.skip_nonfinite))
    if cfg.workers is not None:
        problems.append(non_negative_int_problem("workers", cfg.workers))
    optional = ("epochs", "img_size", "per_class", "early_stop", "save_every_steps", "epoch_images")
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
    from freezetune.recipes.named import conflict_problems  # recipes reads the config: imported when validating

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


def _model_problem(name: str) -> str | None:
    """A model name without a library's prefix, found before the data is read (it was found once the model was
    built, after the problems reported with it had been fixed)."""
    if model_source(name) is not None:
        return None
    from freezetune.model.create import model_problem  # (torch: only for a name to refuse, with the prefix it may lack)

    return model_problem(name)


def _empty_path_problems(cfg: TrainConfig) -> list[str]:
    """A path of '' (``data: ${DATA}`` unset, ``TrainConfig(data="")``) was read as the current directory and recorded
    as '', which a resume then looked for."""
    empty = [name for name in PATH_SETTINGS if isinstance(v := getattr(cfg, name), str) and not v.strip()]
    return [
        f"{name} is an empty path ({getattr(cfg, name)!r}): give a file or folder, or leave it out" for name in empty
    ]


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
            problems.append(f"{name} expects {type_name(hint)}, got {shown(value)} ({type(value).__name__})")
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
            0 <= cfg.warmup_epochs and (cfg.warmup_epochs < epochs_of(cfg) or epochs_of(cfg) < 1),
            "in [0, epochs)",
        ),
        ("weight_decay", 0 <= cfg.weight_decay < math.inf, ">= 0 and finite"),
        ("momentum", 0 <= cfg.momentum < 1, "in [0, 1)"),
        ("grad_clip", cfg.grad_clip is None or cfg.grad_clip >= 0, ">= 0 (0 or unset: no clipping)"),
        (
            "average_weights",
            cfg.average_weights is None or 0 <= cfg.average_weights <= 1,
            "in [0, 1] (the share of the run's steps averaged; 0: no averaging)",
        ),
    ]
    problems = [f"{name} must be {what}, got {getattr(cfg, name)}" for name, ok, what in ranges if not ok]
    # refused here, with the rest, not by the param groups once the model is built and the data scanned
    if cfg.decay is not None and not (isinstance(cfg.decay, (int, float)) and 1 <= cfg.decay < math.inf):
        problems.append(f"decay must be >= 1 and finite, got {cfg.decay}: {DECAY_MEANS}")
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
    from freezetune.freezing.schedule import parse_schedule

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
