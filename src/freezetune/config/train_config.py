"""Run configuration: the one place defaults live (``TrainConfig``), the choices of each field, and what a resume may
change. Its checks (every problem in one message, before a run starts): ``config.check``; reading one from YAML,
``key=value`` overrides and CLI flags: ``config.file``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from freezetune.config.options import (
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
    DEFAULT_MONITOR,
    DROPOUT_DEFAULT,
    DROPOUT_POLICIES,
    HF_PREFIX,
    MONITORS,
    OPTIMIZERS,
    PRETRAINED_WEIGHTS,
    RANDOM_WEIGHTS,
    SCHEDULERS,
)
from freezetune.config.values import (  # noqa: F401 - re-exported: the config's public names
    PATH_FIELDS,
    allows_none,
    coerce,
    dump_yaml,
    field_types,
    parse_freeze_spec,
    parse_stage_lrs,
    scalar_type,
    type_name,
)
from freezetune.errors import ConfigError, choices

WEIGHT_KEYWORDS = (*PRETRAINED_WEIGHTS, *RANDOM_WEIGHTS)

# The choices of each choice field: ``validate`` checks them, the CLI lists them in ``--help``.
FIELD_CHOICES = {
    "optimizer": OPTIMIZERS,
    "scheduler": SCHEDULERS,
    "amp": AMP_MODES,
    "bn": BN_POLICIES,
    "bn_stats": BN_STATS,
    "frozen_dropout": DROPOUT_POLICIES,
    "aug": AUG_PRESETS,
    "monitor": MONITORS,
    "class_weights": CLASS_WEIGHTS,
    "cache": CACHE_MODES,
    "decode": DECODE_MODES,
}

# a run's epochs where the config sets none (``epochs_of``); under a budget the auto recipe plans them instead, up to
# --epochs where it is set (auto.plan.run_epochs): unset, not 10, so that an --epochs 10 typed is a limit too
DEFAULT_EPOCHS = 10

# What a --resume may change: where and how fast the run computes, what it shows and saves, not what it trains.
# Every other setting must be the run's own (checkpoint.restore refuses the rest; epochs only stretch without an LR
# schedule).
RESUME_MAY_CHANGE = ("out", "resume", "device", "workers", "compile", "cuda_graph", "channels_last", "decode",
                     "cache_dir", "save_every_steps", "tensorboard", "progress", "final_test")  # fmt: skip
# ... and these too without an LR schedule (scheduler none), which a longer run cannot stretch
RESUME_MAY_CHANGE_UNSCHEDULED = ("epochs", "warmup_epochs")
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
    """Everything a training run needs. Field names are the YAML keys and, with ``-`` for ``_``, the CLI flags.

    >>> cfg = TrainConfig(data="photos/", epochs=5, stage_lrs="layer4=1e-4")
    >>> cfg.freeze, cfg.epochs, cfg.stage_lrs
    ('auto', 5, {'layer4': 0.0001})
    """

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
    frozen_dropout: str = DROPOUT_DEFAULT  # dropout and drop path in the stages before the first that trains
    unfreeze: str | dict[int, str] | None = None
    # optimisation
    epochs: int | None = None  # None: DEFAULT_EPOCHS; under a budget, as many as it affords (auto.plan.run_epochs)
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
    # average the trainable weights over this last share of the run's steps (an exponential moving average), and make
    # the average the model after the last epoch (training/averaging.py). None: 0.5 in the auto recipe's run of an
    # image model, else none
    average_weights: float | None = None
    class_weights: str = "none"  # "balanced": the training loss weighs each class by the inverse of its frequency
    grad_clip: float | None = None
    skip_nonfinite: int = 0  # batches per epoch whose non-finite loss is skipped (no step) before the run stops
    # speed
    amp: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    cuda_graph: bool = True  # replay the cached training step as a CUDA graph (training/graph_step.py)
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
    monitor: str = DEFAULT_MONITOR
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
        atomic_write_text(path, dump_yaml(values))

    def dump(self) -> str:
        """The config as YAML, as ``--print-config`` shows it: its paths absolute, as a run records them, so that the
        file works as ``--config`` from any directory (a relative ``data`` was read against the directory of the run
        that used the file); ``resume`` false, as ``save`` writes it: the file is a run's settings, and a run given it
        for another ``--out`` tried to resume that one."""
        return dump_yaml({**self.recorded(), "resume": False})


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


def epochs_of(cfg: TrainConfig) -> int:
    """The epochs a run of ``cfg`` trains, unless a budget plans them: its ``epochs``, else ``DEFAULT_EPOCHS``.

    >>> epochs_of(TrainConfig()), epochs_of(TrainConfig(epochs=3))
    (10, 3)
    """
    return DEFAULT_EPOCHS if cfg.epochs is None else cfg.epochs


def changed_on_resume(asked: dict[str, Any], now: dict[str, Any], *, moved: bool) -> list[str]:
    """What a resume of a recipe's run changes of the request it recorded (``recipe.json``'s ``asked``), each as
    ``"key old -> new"``: every setting but ``RESUME_MAY_CHANGE``, the data's paths where ``moved`` (a checkpoint
    checks that the files are the same), and epochs and warm-up without an LR schedule. ``now``: JSON's reading of
    ``recorded()`` values, as the request is held (tuples as lists, a plan's epoch keys as strings).

    >>> changed_on_resume({"lr": 0.001, "device": "cpu"}, {"lr": 0.01, "device": "cuda"}, moved=False)
    ['lr 0.001 -> 0.01']
    """
    keep = (*RESUME_MAY_CHANGE, *(DATA_PATHS if moved else ()), *stretchable(asked, now))
    return [f"{k} {asked[k]!r} -> {now.get(k)!r}" for k in asked if k not in keep and asked[k] != now.get(k)]


def stretchable(asked: dict[str, Any], now: dict[str, Any]) -> tuple[str, ...]:
    """The settings a resume may change besides ``RESUME_MAY_CHANGE`` where a run of the ``asked`` settings goes on
    with ``now``'s: epochs and warm-up, without an LR schedule (scheduler none, then and now) to stretch.

    >>> stretchable({"scheduler": "none"}, {"scheduler": "none"}), stretchable({"scheduler": "cosine"}, {})
    (('epochs', 'warmup_epochs'), ())
    """
    return RESUME_MAY_CHANGE_UNSCHEDULED if asked.get("scheduler") == now.get("scheduler") == "none" else ()


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


INVALID = "invalid config: "  # every config problem's message starts so


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
