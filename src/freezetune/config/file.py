"""Reading a run's configuration: a YAML file (or the values one holds), then ``key=value`` overrides and CLI flags
laid over it; every problem of what was read, of any kind, reported in one message (``config.check.validate``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from freezetune.config.check import validate
from freezetune.config.train_config import INVALID, TrainConfig, coerce, field_names, unknown_keys
from freezetune.config.values import UniqueKeys
from freezetune.errors import ConfigError, choices


def load_config(path: str | Path | dict[str, Any] | None = None, overrides: dict[str, Any] | None = None, *,
                need_data: bool = True) -> TrainConfig:  # fmt: skip
    """Build a config from an optional YAML file (or the values one holds), then ``overrides`` (CLI flags,
    ``key=value`` pairs).

    An override of None unsets the field (``grad_clip=null`` clears the file's grad_clip): a caller leaves out the
    keys it was not given. An override is a choice the user made, even at its default value: a recipe that sets it
    itself is refused beside it (``recipes.named.conflict_problems``). ``need_data=False`` accepts a config without
    ``data`` (a template, as ``--print-config`` writes one).

    >>> load_config(overrides={"data": "images/", "epochs": 3}).epochs
    3
    """
    values: dict[str, Any] = {}
    typed = set(overrides or ())  # given now, unlike a file's keys (recipes.named.conflict_problems)
    if path is not None:
        values.update(path if isinstance(path, dict) else _as_it_is_now(read_yaml(Path(path)), Path(path)))
        values = _earlier_defaults_unset(values, {**values, **(overrides or {})}.get("recipe"))
    values.update(overrides or {})
    # every problem in one message: a value of the wrong type, then one out of range, then an unknown key (reported
    # one kind at a time, the user fixed one and met the next)
    problems, known, names = [], {}, field_names()
    for key, value in values.items():
        if key in names:
            try:
                known[key] = coerce(key, value)
            except ConfigError as exc:
                problems.append(str(exc))
    unknown = unknown_keys(values)
    cfg = TrainConfig(**known)
    if problems or unknown:  # what else is wrong, among the values that could be read
        try:
            validate(cfg, need_data=need_data, typed=typed)
        except ConfigError as exc:
            problems.append(str(exc).removeprefix(INVALID))
        raise ConfigError(INVALID + "; ".join(problems + ([unknown] if unknown else [])))
    validate(cfg, need_data=need_data, typed=typed)
    return cfg


def _as_it_is_now(values: dict[str, Any], path: Path) -> dict[str, Any]:
    """A run's ``config.yaml`` or a sweep's ``winner.yaml`` as this freezetune reads it where it lies now."""
    return _as_its_sweep_is_now(_as_its_run_is_now(values, path), path)


def _as_its_sweep_is_now(values: dict[str, Any], path: Path) -> dict[str, Any]:
    """A sweep's ``winner.yaml`` (``sweep_config.yaml`` beside it) where the sweep lies now: its ``cache_dir``, the
    features its recipes shared, recorded absolute, is read under this folder once the sweep was moved (the winner's
    run tried to make the old folder's ``features/``, refused where that path's parents are not this user's); gone
    with the old folder, the run computes its features again, as a run without ``cache_dir`` does."""
    from freezetune.run.log import SWEEP_FEATURES, SWEEP_SETTINGS  # (run reads configs too)

    value = values.get("cache_dir")
    if not (path.parent / SWEEP_SETTINGS).is_file() or not isinstance(value, str) or os.path.exists(value):
        return values
    here = path.parent / Path(value).name
    if Path(value).name == SWEEP_FEATURES and here.is_dir():  # moved, or renamed (its old name made again, empty)
        return {**values, "cache_dir": str(here)}
    if Path(value).parent.name != path.parent.name:  # a --cache-dir of the user's, not gone with the sweep: as given
        return values
    return {**values, "cache_dir": None}


def _as_its_run_is_now(values: dict[str, Any], path: Path) -> dict[str, Any]:
    """A run's own ``config.yaml`` (``classes.json`` beside it) as this freezetune reads it where the run lies now; any
    other file as it is.

    - Moved: its paths into its own folder (an auto run's ``init``, the chosen trial's weights, and ``cache_dir``, its
      ``features/``), recorded absolute under the folder it had, are read under this one (``out`` is recorded as
      given, absolute or relative: the old folder's path ends with it). ``train --config`` of a moved auto run
      stopped at "checkpoint ... does not exist".
    - Its ``out`` is the folder it lies in: ``train --config COPY/config.yaml --resume`` of a copied run resumed the
      run it was copied from (its ``out`` as recorded), and one read from another working directory named a folder
      relative to the one the run was started in. ``--out`` given beside it still wins.
    - Written by an earlier freezetune, whose auto recipe recorded its cut beside cache off: no setting there, and now
      refused as doing nothing (its resume and ``--config`` of it stopped).
    """
    from freezetune.run.directory import CLASSES_FILE  # (run.directory reads configs too)

    if not (path.parent / CLASSES_FILE).is_file():
        return values
    values = dict(values)
    if values.get("cache") == "off":
        values.pop("cache_at", None)
    out = values.get("out")
    if not isinstance(out, str) or not out.strip():
        return values
    tail = os.path.normpath(out).lstrip(os.sep)
    for key in ("init", "cache_dir"):
        value = values.get(key)
        if not isinstance(value, str) or os.path.exists(value):
            continue
        _, sep, inner = os.path.normpath(value).partition(os.sep + tail + os.sep)  # the old folder, then the rest
        if sep and (path.parent / inner).exists():  # else named as it was, in the error that follows
            values[key] = str(path.parent / inner)
    if os.path.realpath(out) != os.path.realpath(path.parent):  # moved, copied, or read from another directory
        values["out"] = str(path.parent)
    return values


def _earlier_defaults_unset(values: dict[str, Any], recipe: object) -> dict[str, Any]:
    """A file or request an earlier freezetune wrote, as this one reads it: an option its ``recipe`` sets itself, at
    that earlier version's default (``options.EARLIER_DEFAULTS``), was no choice of the user's, and is read as not
    given (this version's default). An lp-ft's ``--resume``, a sweep's and ``--config winner.yaml`` of a run begun
    before bn_stats' default became "auto" were refused as giving bn_stats "update" beside the recipe.

    Such a file holds every key of its version, the recipe's own included (freeze: auto, unfreeze: null), and lacks
    one this version writes; a file a user writes names none of the recipe's, and this version's ``--print-config``
    writes every key: a "update" there is the user's, refused as before (``recipes.named.conflict_problems``).
    """
    from freezetune.config.options import EARLIER_DEFAULTS, recipe_problem
    from freezetune.recipes.named import sets  # (recipes read the config)

    if not isinstance(recipe, str) or recipe_problem(recipe) or set(field_names()) <= set(values):
        return values
    own = sets(recipe)
    if not set(own) <= set(values):
        return values
    unset = {k: getattr(TrainConfig(), k) for k, old in EARLIER_DEFAULTS.items() if k in own and values[k] == old}
    return {**values, **unset}


def run_config(out: str | Path | None) -> Path | dict[str, Any] | None:
    """The config a run in ``out`` resumes with, for ``load_config`` to lay the settings given now over: a recipe's
    request (its ``recipe.json``: the recipe rebuilds its phases), else the run's ``config.yaml`` (None: there is
    none). What ``train --out DIR --resume`` reads, so that a resume needs no other flag.

    Raises:
        ConfigError: ``out`` is None or holds no run to resume (checked first: without a run there, the config's
            own problems, "data is required", would hide the one that matters).

    >>> cfg = load_config(run_config("runs/r50"), {"out": "runs/r50", "resume": True})  # doctest: +SKIP
    """
    from freezetune.recipes.named import asked_config
    from freezetune.run.directory import CONFIG_FILE, prepare_run_dir

    # recipe_run: a recipe stopped in an earlier phase is read back here, to be resumed by its request
    run_dir = prepare_run_dir(None if out is None else str(out), "", resume=True, clean=False, recipe_run=True)
    saved = run_dir / CONFIG_FILE
    return asked_config(run_dir) or (saved if saved.is_file() else _last_config(run_dir))


def _last_config(run_dir: Path) -> dict[str, Any] | None:
    """The config ``last.pt`` recorded, where the run's ``config.yaml`` is gone (deleted, not copied with the run):
    the resume was refused as holding "no settings of a run", and the command without ``--resume`` then as holding
    a run, each pointing at the other. None without a ``last.pt``, or one that recorded none."""
    from freezetune.run.checkpoint import LAST, load

    if not (run_dir / LAST).is_file():
        return None
    config = load(run_dir / LAST, mmap=True).get("config")
    return {**config, "resume": False} if isinstance(config, dict) else None


def resume_config(out: str | Path | None, *, data_given: bool = False) -> Path | dict[str, Any] | None:
    """``run_config(out)``, for a resume given no config file: a run dir without the settings of a run (stopped in its
    set-up or first trial, it wrote none) is refused unless ``data`` is given now ("data is required" said nothing of
    the run dir).

    >>> cfg = load_config(resume_config("runs/r50"), {"out": "runs/r50", "resume": True})  # doctest: +SKIP
    """
    base = run_config(out)
    if base is None and not data_given:
        raise ConfigError(f"cannot resume {str(out)!r}: it holds no settings of a run to resume (a run stopped in its "
                          "set-up or first trial writes none): run the command that started it again, without "
                          "--resume")  # fmt: skip
    return base


def follow_moved_data(run_dir: Path, recorded: dict[str, Any]) -> None:
    """After a resume took the run's data from a new path (the same files, checked against ``last.pt``), the request
    a recipe keeps (``recipe.json``: the auto recipe's beside its run, a named recipe's above its phase's folder) names
    the new path too: ``run_config`` reads the request, and the next plain ``--resume`` looked for the old path.
    ``recorded``: the resumed run's config as it records it (paths absolute)."""
    from freezetune._io import atomic_write_text
    from freezetune.config.train_config import DATA_PATHS
    from freezetune.run.directory import RECIPE_FILE, read_json

    for saved in (run_dir / RECIPE_FILE, run_dir.parent / RECIPE_FILE):
        record = read_json(saved)
        if not isinstance(record, dict):
            continue
        own = saved.parent == run_dir or run_dir.name in (record.get("phases") or [])
        asked = record.get("asked") if own else None
        if not isinstance(asked, dict):
            continue
        moved = {k: recorded[k] for k in DATA_PATHS if asked.get(k) and recorded.get(k) and asked[k] != recorded[k]}
        if moved:
            atomic_write_text(saved, json.dumps({**record, "asked": {**asked, **moved}}, indent=1))
        return


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` overrides (``parse_override``'s), a key given twice refused as a config file's is (the last one
    won in silence).

    >>> parse_overrides(["lr=3e-4", "epochs=5"])
    {'lr': 0.0003, 'epochs': 5}
    """
    pairs = [parse_override(item) for item in items]
    keys = [k for k, _ in pairs]
    if twice := sorted({k for k in keys if keys.count(k) > 1}):
        shown = ", ".join(item for item, (k, _) in zip(items, pairs, strict=True) if k == twice[0])
        raise ConfigError(f"{twice[0]} is given twice as key=value ({shown}); keep one")
    return dict(pairs)


def parse_override(item: str) -> tuple[str, Any]:
    """Parse one ``key=value`` override; the value is read as YAML (numbers, booleans, null, lists).

    >>> parse_override("lr=3e-4")
    ('lr', 0.0003)
    """
    key, sep, raw = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r} is not key=value; keys are: {choices(field_names())}")
    key = key.strip().replace("-", "_")
    if not raw.strip():  # epochs=$EPOCHS, out=$OUT unset: the default epochs, into runs/ of the current folder, unsaid
        raise ConfigError(f"override {item!r} has no value (an unset shell variable?): give {key}=VALUE ({key}=null "
                          "for the setting's default)")  # fmt: skip
    try:
        value = yaml.load(raw, Loader=UniqueKeys)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        why = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"override {item!r}: its value is not valid YAML ({why}); give a number, a word, a [list] "
                          f"or a {{mapping}}, or put the value in quotes") from None  # fmt: skip
    try:
        return key, coerce(key, value)
    except ConfigError:  # refused by load_config, with every other problem of the config
        return key, value


def read_yaml(path: Path) -> dict[str, Any]:
    """The values a YAML config file holds; each problem of the file (missing, a folder, not YAML, not UTF-8, a key
    given twice) is one ConfigError."""
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder: give a YAML file (a run's config.yaml, a sweep's "
                          "winner.yaml)")  # fmt: skip
    if not path.exists():  # (not is_file: --config <(...) and /dev/null are no regular files, and are read)
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        # (Windows: UTF-8, not the locale's code page)
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeys) or {}  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)  # where the parser stopped: the mistake is there or just before
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        why = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {why}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); save "
                          "it as UTF-8") from None  # fmt: skip
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
