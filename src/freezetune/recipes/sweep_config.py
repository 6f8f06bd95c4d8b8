"""What a sweep is asked and what it records: its settings (kept in ``sweep_config.yaml``, checked on a resume, read
back by ``sweep --out S --resume``), its recipes, the config each recipe's run trains with, and the config that trains
the winner again (``winner.yaml``). ``recipes/sweep.py`` runs them."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

from freezetune._io import atomic_write_text
from freezetune.config.check import validate
from freezetune.config.file import load_config, read_yaml
from freezetune.config.options import (
    BATCH_AUTO,
    LAST_K,
    RECIPES,
    SWEEP_CACHE_AT,
    SWEEP_DEFAULT_OUT,
    SWEEP_DEFAULT_RECIPES,
    SWEEP_RECIPES_KEY,
    SWEEP_SETS,
    last_k,
    recipe_family,
    recipe_problem,
)
from freezetune.config.train_config import INVALID, TrainConfig, epochs_of
from freezetune.config.values import dump_yaml
from freezetune.errors import ConfigError, choices, setting
from freezetune.run.directory import SWEEP_SETTINGS as SETTINGS_FILE
from freezetune.run.log import SWEEP_FEATURES

_DEFAULTS = TrainConfig()


def request(config: str | Path | None, recipes: str | None) -> tuple[dict | None, str]:
    """A sweep's config and recipes as asked: ``recipes`` (``--recipes``), else the config file's ``recipes`` (what
    ``sweep --print-config`` writes; taken out of the values the config reads, which has no such field, and those
    values returned in its place), else the default list.

    >>> request(None, "full,auto")
    (None, 'full,auto')
    """
    values = read_yaml(Path(config)) if config is not None else None
    in_file = values.pop(SWEEP_RECIPES_KEY, None) if values is not None else None
    if recipes is not None:  # --recipes "" is refused (no recipe), not read as the default
        return values, recipes
    return values, in_file if in_file is not None else ",".join(SWEEP_DEFAULT_RECIPES)


def recipes_override(overrides: list[str], recipes: str | None) -> tuple[list[str], str | list | None]:
    """A ``recipes=...`` among a sweep's ``key=value`` overrides taken for ``--recipes`` (its config file's key is
    ``recipes`` too; it was refused as an unknown config key, "did you mean 'recipe'", which a sweep refuses), and
    the other overrides. Given beside ``--recipes``, refused: one of them would be dropped in silence.

    >>> recipes_override(["epochs=2", "recipes=full,auto"], None)
    (['epochs=2'], 'full,auto')
    """
    from freezetune.config.file import parse_override

    ours = [item for item in overrides if parse_override(item)[0] == SWEEP_RECIPES_KEY]
    if not ours:
        return overrides, recipes
    if recipes is not None or len(ours) > 1:
        given = ([f"--recipes {recipes}"] if recipes is not None else []) + ours
        raise ConfigError(f"the recipes are given twice ({', '.join(given)}); keep one")
    value = parse_override(ours[0])[1]
    if isinstance(value, list):  # recipes=[full, auto], as the config file may hold them
        value = [str(v) for v in value]
    elif value is not None:
        value = str(value)
    return [item for item in overrides if item not in ours], "" if value is None else value


def swept(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with what a sweep sets for every recipe (``SWEEP_SETS``): what ``sweep --print-config`` shows.

    >>> swept(TrainConfig(data="images")).final_test
    False
    """
    return dataclasses.replace(cfg, **{key: value for key, (value, _) in SWEEP_SETS.items()})


def printed(cfg: TrainConfig, names: list[str]) -> str:
    """``sweep --print-config``: ``cfg`` with what the sweep sets for every recipe, and its recipes: the file reads
    back as its ``--config``.

    >>> printed(TrainConfig(data="images"), ["full", "auto"]).splitlines()[-1]
    'recipes: full,auto'
    """
    return swept(cfg).dump() + dump_yaml({SWEEP_RECIPES_KEY: ",".join(names)})


def refuse_overridden(given: dict) -> None:
    """Refuse the values given to ``sweep`` (``--final-test``, ``refit=true``) that it would replace, and a
    ``cache_at`` (checked as a plain run's, it named the auto recipe, and a freeze spec then given was refused too).

    >>> refuse_overridden({"final_test": False, "lr": 0.1})
    """
    problems = [f"{key}={str(given[key]).lower()}: {why}" for key, (value, why) in SWEEP_SETS.items()
                if key in given and given[key] != value]  # fmt: skip
    if given.get("cache_at") is not None:
        problems.append(f"cache_at {given['cache_at']!r}: {SWEEP_CACHE_AT}")
    if problems:
        raise ConfigError("sweep: " + "; ".join(problems))


def resume_settings(given: dict) -> Path | None:
    """The settings file of the sweep that ``sweep --out S --resume`` continues when no ``--config`` is given: its
    ``sweep_config.yaml`` (its settings, device and budget included, and its recipes), for the values given now to
    be laid over, as ``train --out R --resume`` needs no other flag. None when not resuming, or resuming a sweep that
    never started with its whole command given again.

    Raises:
        ConfigError: a resume of a folder that does not exist, or with nothing to resume and no data to start it (it
            said "data is required").
    """
    if not given.get("resume"):
        return None
    saved = settings_file(given.get("out"))
    if saved.is_file():
        return saved
    if not saved.parent.exists():  # a typo in --out started a new sweep there, as a train --resume does not
        raise ConfigError(f"cannot resume: {str(saved.parent)!r} does not exist; give the sweep's {setting('out')}, "
                          "or start it without --resume (resume=False)")  # fmt: skip
    if "data" not in given:
        raise ConfigError(f"cannot resume: {str(saved.parent)!r} holds no sweep ({SETTINGS_FILE}); give the sweep's "
                          f"{setting('out')} or its whole command")  # fmt: skip
    return None


def settings_file(out: str | Path | None) -> Path:
    """Where the sweep into ``out`` (by default ``SWEEP_DEFAULT_OUT``) records its settings and recipes.

    >>> str(settings_file("runs/s"))
    'runs/s/sweep_config.yaml'
    """
    return Path(out or SWEEP_DEFAULT_OUT) / SETTINGS_FILE


def is_sweep_settings(path: Path) -> bool:
    """Whether ``path`` is a sweep's settings file: YAML of ``TrainConfig`` fields and its recipes."""
    from freezetune.config.train_config import field_names

    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(settings, dict) and set(settings) <= {*field_names(), SWEEP_RECIPES_KEY}


def kept_settings(out: Path, cfg: TrainConfig, recipes: list[str]) -> dict | None:
    """The sweep's settings and ``recipes`` to record in ``out`` (``record_settings``), or on ``--resume`` check them
    against those recorded: rows trained with other settings would be compared, ``winner.yaml`` would name settings
    its winner never ran with, and another recipe list rewrote ``sweep.csv`` without the rows of recipes it dropped.
    A resume records only what it may change and changed, in the file's own keys; None where it changes nothing. A
    folder holding a training run is refused (the sweep's files would land beside its checkpoints)."""
    from freezetune.config.train_config import RESUME_MAY_CHANGE
    from freezetune.run.directory import CLASSES_FILE

    if (out / CLASSES_FILE).exists():
        raise ConfigError(f"{str(out)!r} holds a training run ({CLASSES_FILE}); a sweep writes a run per recipe below "
                          "its --out: choose another")  # fmt: skip
    # every setting is kept, for a resume without flags to read back (resume_settings); those a resume may change
    # (the device, the loader's workers, the budget...) are not compared. As the file reads them back (tuples lists)
    now = yaml.safe_load(dump_yaml({k: v for k, v in cfg.recorded().items() if k not in ("out", "resume")}))
    now[SWEEP_RECIPES_KEY] = recipes
    saved = out / SETTINGS_FILE
    if not (cfg.resume and saved.is_file()):
        return now
    before = yaml.safe_load(saved.read_text()) or {}
    changed = [f"{k} {before[k]!r} -> {v!r}" for k, v in now.items()
               if k not in (*RESUME_MAY_CHANGE, "budget") and k in before and before[k] != v]  # fmt: skip
    if changed:
        raise ConfigError(f"cannot resume the sweep in {str(out)!r} with {', '.join(changed)}: its recipes ran with "
                          "the sweep's own settings; resume with them, or sweep into another --out")  # fmt: skip
    # what a resume may change (a new --budget, --device...) is recorded: the next resume goes on with it (a budget
    # given now was used, and the file still said the old one). No key the file lacks: an earlier freezetune's, given
    # settings it does not know, refused it as a file "no sweep wrote"
    kept = {k: now.get(k, v) for k, v in before.items()}
    return None if kept == before else kept


def record_settings(out: Path, settings: dict) -> None:
    """Write the sweep's ``settings`` (``kept_settings``) to its ``sweep_config.yaml``."""
    atomic_write_text(out / SETTINGS_FILE, dump_yaml(settings))


def recipe_names(recipes: str | list[str] | tuple[str, ...]) -> list[str]:
    """The recipe names, checked before anything runs: known, at least one, none twice (they share ``out/<name>``)."""
    if isinstance(recipes, str):  # not its letters, one recipe each
        recipes = [r.strip() for r in recipes.split(",") if r.strip()]
    names = list(recipes)
    if not names:
        raise ConfigError(f"no recipe to sweep; give --recipes from: {choices(RECIPES)} (or last-K)")
    # last-k is last-2: one recipe under two names trained it twice, into two folders
    same = [(LAST_K, last_k(n)) if recipe_family(n) == LAST_K and not recipe_problem(n) else n for n in names]
    twice = sorted({n for n, s in zip(names, same, strict=True) if same.count(s) > 1})
    problems = [recipe_problem(n) for n in names] + ([f"recipe(s) given twice: {choices(twice)}"] if twice else [])
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("invalid --recipes: " + "; ".join(problems))
    return names


def refuse_own_freeze(cfg: TrainConfig) -> None:
    """A sweep's settings with a recipe or a freeze spec of their own are refused (``--print-config`` too: it
    printed them as a sweep's, which the sweep then refused)."""
    given = [f"{k} {v!r}" for k, v in (("recipe", cfg.recipe), ("freeze", cfg.freeze)) if v not in (None, "auto")]
    if given:  # only what the user gave is named (a winner.yaml holds a recipe; --freeze a spec)
        raise ConfigError(f"a sweep runs each of --recipes with its own freeze; drop {' and '.join(given)} "
                          "(recipe=null freeze=auto)")  # fmt: skip


def run_configs(cfg: TrainConfig, names: list[str], out: Path, *, need_data: bool = True) -> dict[str, TrainConfig]:
    """Each recipe's config, all validated before the first one trains (an option a recipe sets itself, say);
    ``need_data``: as ``validate`` takes it (``sweep --print-config`` writes a template a run completes)."""
    refuse_own_freeze(cfg)
    features = cfg.cache_dir or os.path.abspath(out / SWEEP_FEATURES)  # each recipe's config.yaml names it
    # every recipe is judged on the validation split: the auto recipe keeps it through its final run (no refit)
    from freezetune.recipes import named as recipes

    # the epochs a plain run trains (a sweep's budget is its own, no recipe's): they were left unset, and a resume of
    # a recipe's phases compared its epochs with None
    runs = {name: dataclasses.replace(swept(cfg), recipe=name, out=str(out / name), cache_dir=features, budget=None,
                                      epochs=epochs_of(cfg), **own_batchnorm(name))
            for name in names}  # fmt: skip
    problems = []
    for run_cfg in runs.values():
        try:
            validate(run_cfg, need_data=need_data)
        except ConfigError as exc:
            problems.append(str(exc).removeprefix(INVALID))
    if problems:
        raise ConfigError(INVALID + "; ".join(dict.fromkeys(problems)))
    for name, run_cfg in runs.items():  # k against the model's stages: the one check that needs the model
        if recipe_family(name) == LAST_K:
            recipes.check_last_k(run_cfg, name)
    return runs


# recipes that freeze no BatchNorm layer whole: a sweep's --bn changes nothing in them (full trains every layer, bitfit
# every norm)
_NO_FROZEN_BATCHNORM = ("full", "bitfit")


def idle_batchnorm_notes(cfg: TrainConfig, recipes: list[str]) -> list[str]:
    """A note for each BatchNorm setting the sweep was given that some of its ``recipes`` do not use (they set their
    own, or freeze no BatchNorm layer whole): ``--bn train`` beside linear-probe alone changed nothing, unsaid.

    >>> idle_batchnorm_notes(TrainConfig(bn_stats="frozen"), ["lp-ft", "last-2"])
    ["sweep: note: bn_stats 'frozen' changes nothing in lp-ft (it sets its own)"]
    """
    from freezetune.recipes import named

    notes = []
    for key in ("bn", "bn_stats"):
        if getattr(cfg, key) == getattr(_DEFAULTS, key):
            continue
        own = [r for r in recipes if key in named.sets(r)]
        whole = [r for r in recipes if key == "bn" and r in _NO_FROZEN_BATCHNORM]
        said = []
        if own:
            said.append(f"{', '.join(own)} ({'it sets its own' if len(own) == 1 else 'they set their own'})")
        if whole:
            said.append(f"{', '.join(whole)} (no BatchNorm layer frozen whole)")
        if said:
            notes.append(f"sweep: note: {key} {getattr(cfg, key)!r} changes nothing in {' and '.join(said)}")
    return notes


def own_batchnorm(recipe: str) -> dict:
    """The BatchNorm settings ``recipe`` sets itself, at their defaults ("not given"), over a sweep's: its ``--bn`` and
    ``--bn-stats`` apply to the other recipes (linear-probe and lp-ft's probe freeze BatchNorm whatever, lp-ft's
    fine-tune holds its statistics), and the recipe refuses them given.

    >>> own_batchnorm("lp-ft"), own_batchnorm("full")
    ({'bn': 'frozen', 'bn_stats': 'auto'}, {})
    """
    from freezetune.recipes import named as recipes

    return {key: getattr(_DEFAULTS, key) for key in ("bn", "bn_stats") if key in recipes.sets(recipe)}


def winner_config(cfg: TrainConfig, winner: dict) -> dict:
    """The config that trains the winner again: its recipe on the sweep's settings, a fresh run with a test score.

    It is the run the sweep measured: the validation images stay held out (``refit: false``; set it true to train on
    them as well, and lose the validation score), ``batch_size: auto`` becomes the number the winner trained with,
    which another device or a fuller one would measure differently, and ``cache_dir`` the features the recipes
    shared (without ``--cache-dir``, the sweep's ``features/``), which the run reads back.
    """
    from freezetune.run.directory import CONFIG_FILE

    values = {**cfg.recorded(), "recipe": winner["recipe"], "freeze": "auto", "out": None, "resume": False,
              "final_test": True, "budget": None, "refit": False, "epochs": epochs_of(cfg),
              **own_batchnorm(winner["recipe"])}  # fmt: skip
    saved = Path(winner["run_dir"]) / CONFIG_FILE
    if saved.is_file():
        ran = load_config(saved)
        # the features the recipes shared (the sweep's features/ without --cache-dir): the run reads them back
        values["cache_dir"] = ran.cache_dir
        if cfg.batch_size == BATCH_AUTO:
            values["batch_size"] = ran.batch_size
    return values
