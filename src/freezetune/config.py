"""Run configuration: the one place defaults live, loaded from YAML, ``key=value`` overrides and CLI flags.

The whole configuration is validated before a run starts and every problem is reported in one message.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from freezetune.errors import ConfigError, choices

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("onecycle", "cosine", "none")
AMP_MODES = ("auto", "bf16", "fp16", "off")
BN_POLICIES = ("frozen", "affine", "train")
AUG_PRESETS = ("none", "light", "standard")
MONITORS = ("val_acc", "val_loss")
CACHE_MODES = ("auto", "off", "memory", "disk")
DECODERS = ("auto", "cpu", "gpu")


@dataclass
class TrainConfig:
    """Everything a training run needs. Field names are the YAML keys and, with ``-`` for ``_``, the CLI flags."""

    # model
    model: str = "timm:tf_efficientnet_lite0"
    weights: str = "imagenet"
    img_size: int | None = None
    # data
    data: str | None = None
    val_data: str | None = None
    val_split: float | None = None
    per_class: int | None = None
    aug: str = "light"
    batch_size: int = 32
    workers: int | None = None
    # freezing
    freeze: str = "none"
    bn: str = "frozen"
    unfreeze: str | None = None
    # optimisation
    epochs: int = 10
    optimizer: str = "adamw"
    lr: float = 1e-3
    stage_lrs: dict[str, float] = field(default_factory=dict)
    decay: float | None = None
    weight_decay: float = 0.05
    momentum: float = 0.9
    scheduler: str = "onecycle"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    grad_clip: float | None = None
    # speed
    amp: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    cache: str = "auto"
    cache_views: int = 1
    decode: str = "auto"
    device: str = "auto"
    # run
    seed: int = 0
    out: str | None = None
    resume: bool = False
    early_stop: int | None = None
    monitor: str = "val_acc"
    tensorboard: bool = True
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML; ``resume`` is saved as false: it is an action on a run, not one of its
        settings, and the file reused as ``--config`` for another run must start that run afresh."""
        from freezetune._io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump({**self.to_dict(), "resume": False}, sort_keys=False))

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Build a config from an optional YAML file, then ``overrides`` (CLI flags, ``key=value`` pairs).

    >>> load_config(overrides={"data": "images/", "epochs": 3}).epochs
    3
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_yaml(Path(path)))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    _check_keys(values)
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """Parse one ``key=value`` override; the value is read as YAML (numbers, booleans, null, lists).

    >>> parse_override("lr=3e-4")
    ('lr', 0.0003)
    """
    key, sep, raw = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r} is not key=value; keys are: {choices(field_names())}")
    key = key.strip().replace("-", "_")
    return key, _coerce(key, yaml.safe_load(raw) if raw.strip() else None)


def parse_stage_lrs(text: str | dict | None) -> dict[str, float]:
    """``"layer4=1e-4,layer3=5e-5"`` -> ``{"layer4": 1e-4, "layer3": 5e-5}``.

    >>> parse_stage_lrs("layer4=1e-4,layer3=5e-5")
    {'layer4': 0.0001, 'layer3': 5e-05}
    """
    if text is None:
        return {}
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = [part.partition("=")[::2] for part in str(text).split(",") if part.strip()]
    out = {}
    for name, value in items:
        try:
            out[str(name).strip()] = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"stage_lrs entry {name}={value!r} is not STAGE=LR (e.g. 'layer4=1e-4')") from None
    return out


def validate(cfg: TrainConfig) -> None:
    """Raise one ConfigError listing every problem of ``cfg``."""
    problems = []
    for name, allowed in (
        ("optimizer", OPTIMIZERS),
        ("scheduler", SCHEDULERS),
        ("amp", AMP_MODES),
        ("bn", BN_POLICIES),
        ("aug", AUG_PRESETS),
        ("monitor", MONITORS),
        ("cache", CACHE_MODES),
        ("decode", DECODERS),
    ):
        if getattr(cfg, name) not in allowed:
            problems.append(f"{name} {getattr(cfg, name)!r} is not one of {choices(allowed)}")
    for name in ("epochs", "batch_size", "cache_views"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        problems.append(f"lr must be > 0, got {cfg.lr}")
    if cfg.val_split is not None and not 0 < cfg.val_split < 1:
        problems.append(f"val_split must be between 0 and 1, got {cfg.val_split}")
    if cfg.per_class is not None and cfg.per_class < 1:
        problems.append(f"per_class must be >= 1, got {cfg.per_class}")
    if not 0 <= cfg.label_smoothing < 1:
        problems.append(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.warmup_epochs < 0 or cfg.warmup_epochs >= cfg.epochs:
        problems.append(f"warmup_epochs must be in [0, epochs), got {cfg.warmup_epochs}")
    if cfg.early_stop is not None and cfg.early_stop < 1:
        problems.append(f"early_stop must be >= 1 epochs, got {cfg.early_stop}")
    problems += _schedule_problems(cfg.unfreeze)
    if cfg.data is None:
        problems.append("data is required (an image folder, a CSV file or an IDX directory)")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def _schedule_problems(unfreeze: str | dict | None) -> list[str]:
    # Checked here so a typo fails before the model and data load; stage names need the model and wait for it.
    if unfreeze is None or unfreeze == "none":
        return []
    from freezetune.errors import SpecError
    from freezetune.unfreezing import parse_schedule  # imports torch: only when a schedule is given

    try:
        parse_schedule(unfreeze)
    except (SpecError, TypeError, ValueError) as exc:
        return [str(exc)]
    return []


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _check_keys(values: dict[str, Any]) -> None:
    known = field_names()
    bad = [k for k in values if k not in known]
    if bad:
        hints = [
            f"{k!r} (did you mean {difflib.get_close_matches(k, known, 1)[0]!r}?)"
            if difflib.get_close_matches(k, known, 1)
            else repr(k)
            for k in bad
        ]
        raise ConfigError(f"unknown config key(s) {', '.join(hints)}; keys are: {choices(known, limit=60)}")


def _coerce(key: str, value: Any) -> Any:
    if key == "stage_lrs":
        return parse_stage_lrs(value)
    if key == "unfreeze" and isinstance(value, dict):
        return value
    if key == "freeze" and isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)  # YAML list -> the "stem,layer1" form the CLI takes
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    kind = str(kinds.get(key, ""))
    try:
        if value is None or isinstance(value, bool):
            return value
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("bool"):
            return str(value).lower() in ("1", "true", "yes", "on")
        if kind.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} expects {kind}, got {value!r}") from None
    return value


def parse_freeze_spec(text: str | int | list) -> str | int | list:
    """CLI/YAML freeze spec: ``"3"`` -> 3, ``"stem,layer1"`` -> ``["stem", "layer1"]``, else the string.

    >>> parse_freeze_spec("-2"), parse_freeze_spec("stem,layer1"), parse_freeze_spec("backbone")
    (-2, ['stem', 'layer1'], 'backbone')
    """
    if isinstance(text, (int, list)):
        return text
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    items = [int(p) if p.lstrip("-").isdigit() else p for p in parts]
    return items[0] if len(items) == 1 else items
