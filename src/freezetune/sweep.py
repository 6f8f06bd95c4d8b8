"""Run several recipes on the same data and keep the evidence: ``freezetune sweep``.

Every recipe trains on the training split and is judged on the validation split alone (the test split is never
scored). All runs share one feature directory, so a frozen prefix already computed for one recipe (same weights,
cut, images, transform and dtype: ``cache/disk.py``) is read back by the next one, and by a later sweep or ``train``
given the same ``cache_dir``. The sweep writes ``sweep.csv`` (one row per recipe), ``sweep.png`` (validation
accuracy, or macro-F1 under ``monitor: val_f1``, against training seconds, the Pareto front marked) and
``winner.yaml``, which ``train --config`` runs again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from freezetune import run_lock, sweep_report
from freezetune._io import atomic_write_text
from freezetune.config import INVALID, TrainConfig
from freezetune.config_check import validate
from freezetune.config_file import load_config
from freezetune.distributed import DistInfo, broadcast, init_from_env, main_echo
from freezetune.errors import ConfigError, DataError, choices, setting
from freezetune.options import (
    BATCH_AUTO,
    DEFAULT_MONITOR,
    LAST_K,
    METRIC_NAMES,
    RECIPES,
    SWEEP_CACHE_AT,
    SWEEP_DEFAULT_OUT,
    SWEEP_DEFAULT_RECIPES,
    SWEEP_SETS,
    compared_by,
    last_k,
    parse_duration,
    recipe_family,
    recipe_problem,
)
from freezetune.run_log import SWEEP_LOG, log, log_to, opened
from freezetune.runtime import SWEEP_SETTINGS as SETTINGS_FILE
from freezetune.runtime import check_folders

_DEFAULTS = TrainConfig()
ROW_FILE = "sweep_row.json"  # a finished recipe's row, in its run directory
# what a sweep's runs name when data without validation images is refused at set-up (``trainer.train``)
NEEDS_VALIDATION = "a sweep (it compares its recipes on the validation split)"


@dataclass
class SweepResult:
    """The rows of a sweep (``sweep_report.COLUMNS``), the winning recipe, and where its files are."""

    rows: list[dict]
    winner: str
    out: Path
    skipped: list[str] = field(default_factory=list)  # recipes the budget left no time for


def swept(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with what a sweep sets for every recipe (``SWEEP_SETS``): what ``sweep --print-config`` shows.

    >>> swept(TrainConfig(data="images")).final_test
    False
    """
    return dataclasses.replace(cfg, **{key: value for key, (value, _) in SWEEP_SETS.items()})


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
                          f"or start it without {setting('resume', True)}")  # fmt: skip
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


def sweep(cfg: TrainConfig, recipes: str | list[str] | tuple[str, ...] = SWEEP_DEFAULT_RECIPES, *,
          out: str | Path | None = None, echo: Callable[[str], None] = print) -> SweepResult:  # fmt: skip
    """Run each recipe with ``cfg``'s settings into ``out/<recipe>`` and compare them on the validation split.

    ``out``: the sweep's directory; by default ``cfg.out``, else ``SWEEP_DEFAULT_OUT``.

    ``recipes``: names, or one comma-separated string as ``--recipes`` takes.

    ``cfg.budget`` (e.g. ``"5m"``) bounds the whole sweep: once it is spent, the remaining recipes are skipped.

    >>> sweep(TrainConfig(data="images/", epochs=3), ["linear-probe", "auto"], out="runs/sweep")  # doctest: +SKIP
    """
    out = Path(out or cfg.out or SWEEP_DEFAULT_OUT)
    runs = _run_configs(cfg, recipe_names(recipes), out)
    from freezetune.data.datasets import check_paths_exist  # (torch: not at import, as _check_out's)

    check_paths_exist(cfg.data, cfg.val_data)  # a typo: one line, not a recipe's start and a sweep folder left
    # an --out that is a file, or inside the data (each recipe's run refused it, after sweep.log and the settings were
    # written there: the next run read the sweep's folder as a class): refused before anything is written
    check_folders(str(out), cfg.cache_dir, (cfg.data, cfg.val_data))

    with run_lock.scope():  # two sweeps into one dir both "won", with different winners: the second is refused
        info = init_from_env(cfg.device)  # under torchrun rank 0 says, writes and scores for all (as train does)
        if info.is_main:
            run_lock.claim(out)
        _check_out(out, resume=cfg.resume)
        return _sweep(cfg, runs, out, main_echo(echo, info), info)


def _check_out(out: Path, *, resume: bool) -> None:
    """Refuse a folder whose sweep files a new sweep would replace: a sweep's, finished or stopped after a recipe
    trained, without ``--resume``; a ``sweep.csv``, ``winner.yaml``, ``sweep_config.yaml``, ``sweep.png`` or
    ``sweep.log`` (appended to) no sweep wrote (a sweep records its settings first, and writes its table beside its
    winner and plot), with or without. A sweep refused before any recipe trained (no validation data) runs again as
    asked."""
    from freezetune.checkpoint import LAST  # (torch: not at import, the CLI's parsers import this module)

    if not _settings_of_a_sweep(out / SETTINGS_FILE):  # a sweep records its settings before it writes any of these
        foreign = [name for name in ("sweep.csv", "winner.yaml", SETTINGS_FILE, "sweep.png", SWEEP_LOG)
                   if (out / name).exists()]  # fmt: skip
        if foreign:  # a user's files of these names were replaced in silence (with --resume, as "already holds a
            # sweep (sweep.csv)" advised, the sweep started afresh over them)
            raise ConfigError(f"{str(out)!r} holds a {' and a '.join(foreign)} no sweep wrote there (it has no "
                              f"{SETTINGS_FILE} of a sweep): choose another {setting('out')}")  # fmt: skip
    if resume:
        return
    if (out / "sweep.csv").exists():
        raise ConfigError(f"{str(out)!r} already holds a sweep (sweep.csv); pass {setting('resume', True)} to "
                          f"continue an interrupted one, or choose another {setting('out')}")  # fmt: skip
    if (out / SETTINGS_FILE).exists() and next(out.rglob(LAST), None) is not None:
        raise ConfigError(f"{str(out)!r} holds a sweep that did not finish ({SETTINGS_FILE}); pass "
                          f"{setting('resume', True)} to continue it, or choose another {setting('out')}")  # fmt: skip


def _settings_of_a_sweep(path: Path) -> bool:
    """Whether ``path`` is a sweep's settings file: YAML of ``TrainConfig`` fields and its recipes."""
    from freezetune.config import field_names

    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(settings, dict) and set(settings) <= {*field_names(), "recipes"}


def _sweep(cfg: TrainConfig, runs: dict[str, TrainConfig], out: Path, echo: Callable[[str], None],
           info: DistInfo) -> SweepResult:  # fmt: skip
    with log(echo, name=SWEEP_LOG) as echo:  # every recipe's lines, and the table, in the sweep's own log
        _keep_settings(out, cfg, list(runs), write=info.is_main)
        log_to(out)
        opened(out)  # its settings checked and kept: the dir is this sweep's
        for note in _idle_batchnorm(cfg, list(runs)):
            echo(note)
        rows, skipped = _run_all(runs, parse_duration(cfg.budget), cfg.budget, echo, info)
        metric = compared_by(cfg.monitor)  # macro-F1 under --monitor val_f1, else accuracy
        winner = pick_winner(rows, metric)
        not_run = [{"recipe": name, "detail": f"skipped: budget {cfg.budget} spent"} for name in skipped]
        if info.is_main:
            sweep_report.write(out, rows, not_run, winner["recipe"], metric, _winner_config(cfg, winner))
        echo(sweep_report.format_table(rows + not_run, winner["recipe"]))
        among = (f" ({len(rows)} of {len(runs)} recipes ran: the budget was spent before {', '.join(skipped)})"
                 if skipped else "")  # fmt: skip
        echo(f"winner: {winner['recipe']}, by {METRIC_NAMES[metric]}{among} -> {out / 'winner.yaml'} (freezetune "
             f"train --config {out / 'winner.yaml'})")  # fmt: skip
    return SweepResult(rows, winner["recipe"], out, skipped)


def _run_all(runs: dict[str, TrainConfig], budget: float | None, given: str | None,
             echo: Callable[[str], None], info: DistInfo) -> tuple[list[dict], list[str]]:  # fmt: skip
    """Each recipe's row, in turn, until the ``budget`` (seconds; ``given`` as the user wrote it) is spent; and the
    recipes skipped then."""
    clock, rows, skipped = _SweepClock(), [], []
    for name, run_cfg in runs.items():
        # rank 0's clock decides for all: the ranks must run the same recipes
        if budget is not None and broadcast(clock.spent() > budget, info):
            echo(f"sweep: budget {given} spent; skipping {name}")
            skipped.append(name)
            continue
        row, read_back = _run_recipe(name, run_cfg, echo, info, clock)
        rows.append(row)
        if read_back:
            clock.read_back(row)
    if not rows:
        raise ConfigError("the sweep ran no recipe (budget too small?)")
    return rows, skipped


class _SweepClock:
    """The seconds a sweep has spent, for its budget: this process's wall clock since it started, plus what the
    recipes it reads back (finished before an interruption) had spent of the sweep by their end, as their rows
    record it (``sweep_s``; a row an earlier freezetune wrote: its training seconds). A resume counted only those
    training seconds, so each resume of a sweep its budget had cut short trained one more recipe."""

    def __init__(self) -> None:
        self._base, self._mark = 0.0, time.perf_counter()

    def spent(self) -> float:
        return self._base + time.perf_counter() - self._mark

    def read_back(self, row: dict) -> None:
        if "sweep_s" in row:  # the sweep's clock when that recipe ended: what came before it is in it
            self._base, self._mark = max(self._base, row["sweep_s"]), time.perf_counter()
        else:
            self._base += row["train_s"]


def pick_winner(rows: list[dict], metric: str = DEFAULT_MONITOR) -> dict:
    """The row with the best validation ``metric`` (``val_acc``, or ``val_f1``: macro-F1), the faster one of a tie;
    a row without a score (NaN) never wins (``max`` kept a first-listed NaN row: it compares False both ways).

    >>> pick_winner([{"recipe": "a", "val_acc": float("nan"), "train_s": 1.0},
    ...              {"recipe": "b", "val_acc": 0.5, "train_s": 9.0}])["recipe"]
    'b'
    """
    return max(rows, key=lambda r: (r[metric] if math.isfinite(r[metric]) else -math.inf, -r["train_s"]))


def _keep_settings(out: Path, cfg: TrainConfig, recipes: list[str], *, write: bool = True) -> None:
    """Record the sweep's settings and ``recipes`` in ``out``, or on ``--resume`` check them against those recorded:
    rows trained with other settings would be compared, ``winner.yaml`` would name settings its winner never ran
    with, and another recipe list rewrote ``sweep.csv`` without the rows of recipes it dropped. A folder holding a
    training run is refused (the sweep's files would land beside its checkpoints)."""
    from freezetune.config import RESUME_MAY_CHANGE
    from freezetune.runtime import CLASSES_FILE

    if (out / CLASSES_FILE).exists():
        raise ConfigError(f"{str(out)!r} holds a training run ({CLASSES_FILE}); a sweep writes a run per recipe below "
                          "its --out: choose another")  # fmt: skip
    # every setting is kept, for a resume without flags to read back (resume_settings); those a resume may change
    # (the device, the loader's workers, the budget...) are not compared
    now = {k: v for k, v in cfg.recorded().items() if k not in ("out", "resume")} | {"recipes": recipes}
    saved = out / SETTINGS_FILE
    if cfg.resume and saved.is_file():
        before = yaml.safe_load(saved.read_text()) or {}
        changed = [f"{k} {before[k]!r} -> {v!r}" for k, v in now.items()
                   if k not in (*RESUME_MAY_CHANGE, "budget") and k in before and before[k] != v]  # fmt: skip
        if changed:
            raise ConfigError(f"cannot resume the sweep in {str(out)!r} with {', '.join(changed)}: its recipes ran "
                              "with the sweep's own settings; resume with them, or sweep into another --out")  # fmt: skip
        if now == before:
            return
        # what a resume may change (a new --budget, --device...) is recorded: the next resume goes on with it (a
        # budget given now was used, and the file still said the old one)
    if write:
        atomic_write_text(saved, yaml.safe_dump(now, sort_keys=False))


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


def _run_configs(cfg: TrainConfig, names: list[str], out: Path) -> dict[str, TrainConfig]:
    """Each recipe's config, all validated before the first one trains (an option a recipe sets itself, say)."""
    given = [f"{k} {v!r}" for k, v in (("recipe", cfg.recipe), ("freeze", cfg.freeze)) if v not in (None, "auto")]
    if given:  # only what the user gave is named (a winner.yaml holds a recipe; --freeze a spec)
        raise ConfigError(f"a sweep runs each of --recipes with its own freeze; drop {' and '.join(given)} "
                          "(recipe=null freeze=auto)")  # fmt: skip
    features = cfg.cache_dir or os.path.abspath(out / "features")  # each recipe's config.yaml names it
    # every recipe is judged on the validation split: the auto recipe keeps it through its final run (no refit)
    from freezetune import recipes

    runs = {name: dataclasses.replace(swept(cfg), recipe=name, out=str(out / name), cache_dir=features, budget=None,
                                      **_own_batchnorm(name))
            for name in names}  # fmt: skip
    problems = []
    for run_cfg in runs.values():
        try:
            validate(run_cfg)
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


def _idle_batchnorm(cfg: TrainConfig, recipes: list[str]) -> list[str]:
    """A note for each BatchNorm setting the sweep was given that some of its ``recipes`` do not use (they set their
    own, or freeze no BatchNorm layer whole): ``--bn train`` beside linear-probe alone changed nothing, unsaid.

    >>> _idle_batchnorm(TrainConfig(bn_stats="frozen"), ["lp-ft", "last-2"])
    ["sweep: note: bn_stats 'frozen' changes nothing in lp-ft (it sets its own)"]
    """
    from freezetune import recipes as named

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


def _own_batchnorm(recipe: str) -> dict:
    """The BatchNorm settings ``recipe`` sets itself, at their defaults ("not given"), over a sweep's: its ``--bn`` and
    ``--bn-stats`` apply to the other recipes (linear-probe and lp-ft's probe freeze BatchNorm whatever, lp-ft's
    fine-tune holds its statistics), and the recipe refuses them given.

    >>> _own_batchnorm("lp-ft"), _own_batchnorm("full")
    ({'bn': 'frozen', 'bn_stats': 'auto'}, {})
    """
    from freezetune import recipes

    return {key: getattr(_DEFAULTS, key) for key in ("bn", "bn_stats") if key in recipes.sets(recipe)}


def _run_recipe(name: str, cfg: TrainConfig, echo: Callable[[str], None], info: DistInfo,
                clock: _SweepClock) -> tuple[dict, bool]:  # fmt: skip
    """Train one recipe and keep its row beside its run: a resumed sweep reads a finished recipe's row back, its
    measured seconds included (re-reading its finished run takes a fraction of a second). The row, and whether it
    was read back. Under torchrun every rank takes rank 0's result: rank 0 alone scores and keeps the history (a
    rank 1 read its empty history as "no validation data" and left the job)."""
    from freezetune import recipes, trainer
    from freezetune.interrupt import RunInterrupted
    from freezetune.precision import resolve_device

    saved = Path(cfg.out) / ROW_FILE
    if cfg.resume and saved.is_file():
        echo(f"sweep: recipe {name} finished before the interruption: its row from {saved}")
        return _read_back(saved), True
    echo(f"sweep: recipe {name}")
    if cfg.resume and not Path(cfg.out).exists():  # the sweep stopped before this recipe began: it starts afresh
        cfg = dataclasses.replace(cfg, resume=False)  # (the auto recipe refused to resume a run dir never made)
    with log(echo):  # the recipe's own level of the log: the auto recipe's trials and choice in its train.log too
        try:
            train = functools.partial(trainer.train, needs_validation=(NEEDS_VALIDATION,))
            result = broadcast(recipes.run(cfg, echo=echo, train=train), info)
        except RunInterrupted as exc:  # a recipe's advice ("the same command") is refused once a recipe has trained
            how = (f"{exc.where or 'at once'} in recipe {name}; continue the sweep with its command and --resume (the "
                   "recipes it finished keep their rows)")  # fmt: skip
            raise RunInterrupted.by(exc.signum, how) from None
    if not (result.history and result.history[-1].get("val_n")):  # its rows scored NaN, and a "winner" was named
        raise DataError(f"sweep: recipe {name} had no validation data to be scored on (one example of a class "
                        "leaves none to hold out), and a sweep compares recipes on it: give --val-data, or more "
                        "examples a class")  # fmt: skip
    row = _row(name, result, cuda=resolve_device(cfg.device).type == "cuda") | {"detail": _chosen(Path(cfg.out))}
    row["sweep_s"] = clock.spent()  # what the sweep had spent by this recipe's end: a resume's budget goes on from it
    if info.is_main:
        atomic_write_text(saved, json.dumps(row))
    return row, False


def _read_back(saved: Path) -> dict:
    """A finished recipe's row; one an earlier freezetune wrote has no ``val_f1``: its ``metrics.csv`` has."""
    from freezetune.progress import RunResult
    from freezetune.reporting import METRICS_CSV, read_metrics

    row = json.loads(saved.read_text())
    # the folder the row is in: the one recorded was as the first process named it, relative to where it ran (a
    # resume from another directory read the winner's config.yaml from nowhere, and winner.yaml kept batch_size auto)
    row["run_dir"] = os.path.abspath(saved.parent)
    row.setdefault("detail", _chosen(Path(row["run_dir"])))  # an earlier freezetune's row has none
    if "val_f1" not in row:
        metrics = Path(row["run_dir"]) / METRICS_CSV
        history = read_metrics(metrics) if metrics.is_file() else []
        row["val_f1"] = _or_nan(RunResult(metrics.parent, row["best_epoch"], None, history=history).best_val("val_f1"))
    return row


def _row(name: str, result, *, cuda: bool) -> dict:
    history = result.history or [{}]
    # A CPU reading is the process's resident peak, which holds what earlier recipes left allocated: it grew in run
    # order whatever the recipe. CUDA's allocator counts this recipe alone.
    peak = max(r.get("peak_mem_mb", 0.0) for r in history) if cuda else None
    # the best epoch's, as the scores are (gradual's last epoch trains more than its best one did)
    best = next((r for r in history if r.get("epoch") == result.best_epoch), history[-1])
    return {
        "recipe": name,
        # the best epoch's, whatever it was kept by (a val_loss run's best_metric is a loss)
        **{m: _or_nan(result.best_val(m)) for m in ("val_acc", "val_f1")},
        "train_s": result.train_seconds,
        "peak_mem_mb": peak,
        "trainable_params": best.get("trainable_params", 0),
        "best_epoch": result.best_epoch,
        "run_dir": os.path.abspath(result.run_dir),
    }


def _chosen(run_dir: Path) -> str:
    """What an auto recipe's run chose (its ``recipe.json``), as the table shows it; empty for another recipe.

    Its row and a last-k one can train the same stages and still differ: auto trains at a higher LR
    (``auto_rule.LR_BOOST``), from the weights its trial fitted.
    """
    from freezetune.auto import PROBE_DIR
    from freezetune.runtime import RECIPE_FILE, TRIALS_DIR

    try:
        choice = json.loads((run_dir / RECIPE_FILE).read_text())["choice"]
        # (a trial that saved no weights leaves the run to start from --init, or a new head); the probe's weights are
        # in auto-trials/ too: "from its trial's weights" was said of a run from the probed head
        parts, start = Path(choice.get("init") or "").parts, ""
        if TRIALS_DIR in parts:
            start = ", from the probed head" if PROBE_DIR in parts else ", from its trial's weights"
        lr = choice.get("run_lr", choice["lr"])  # an earlier freezetune's recipe.json has no run_lr (auto._resumed)
        return f"chose last-{choice['trained_stages']} at lr {lr:.1e}{start}"
    except (OSError, ValueError, KeyError, TypeError):  # a named recipe: no choice recorded
        return ""


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _winner_config(cfg: TrainConfig, winner: dict) -> dict:
    """The config that trains the winner again: its recipe on the sweep's settings, a fresh run with a test score.

    It is the run the sweep measured: the validation images stay held out (``refit: false``; set it true to train on
    them as well, and lose the validation score), and ``batch_size: auto`` becomes the number the winner trained with,
    which another device or a fuller one would measure differently.
    """
    from freezetune.runtime import CONFIG_FILE

    values = {**cfg.recorded(), "recipe": winner["recipe"], "freeze": "auto", "out": None, "resume": False,
              "final_test": True, "budget": None, "refit": False, **_own_batchnorm(winner["recipe"])}  # fmt: skip
    saved = Path(winner["run_dir"]) / CONFIG_FILE
    if cfg.batch_size == BATCH_AUTO and saved.is_file():
        values["batch_size"] = load_config(saved).batch_size
    return values


__all__ = ["RECIPES", "SWEEP_DEFAULT_RECIPES", "SweepResult", "pick_winner", "sweep", "swept"]
