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

from freezetune._io import atomic_write_text
from freezetune.config.options import (
    DEFAULT_MONITOR,
    METRIC_NAMES,
    RECIPES,
    SWEEP_DEFAULT_OUT,
    SWEEP_DEFAULT_RECIPES,
    budget_text,
    compared_by,
    parse_duration,
)
from freezetune.config.train_config import TrainConfig
from freezetune.device.distributed import DistInfo, broadcast, init_from_env, main_echo
from freezetune.errors import ConfigError, DataError, setting
from freezetune.recipes import sweep_config, sweep_report
from freezetune.run import lock as run_lock
from freezetune.run.directory import SWEEP_SETTINGS as SETTINGS_FILE
from freezetune.run.directory import check_folders, folder_problem
from freezetune.run.log import SWEEP_FEATURES, SWEEP_LOG, log, log_to, opened, when_opened

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


def sweep(cfg: TrainConfig, recipes: str | list[str] | tuple[str, ...] = SWEEP_DEFAULT_RECIPES, *,
          out: str | Path | None = None, echo: Callable[[str], None] = print) -> SweepResult:  # fmt: skip
    """Run each recipe with ``cfg``'s settings into ``out/<recipe>`` and compare them on the validation split.

    ``out``: the sweep's directory; by default ``cfg.out``, else ``SWEEP_DEFAULT_OUT``.

    ``recipes``: names, or one comma-separated string as ``--recipes`` takes.

    ``cfg.budget`` (e.g. ``"5m"``) bounds the whole sweep: once it is spent, the remaining recipes are skipped.

    >>> sweep(TrainConfig(data="images/", epochs=3), ["linear-probe", "auto"], out="runs/sweep")  # doctest: +SKIP
    """
    out = Path(out or cfg.out or SWEEP_DEFAULT_OUT)
    runs = sweep_config.run_configs(cfg, sweep_config.recipe_names(recipes), out)
    from freezetune.data.datasets import check_paths_exist  # (torch: not at import, as _check_out's)
    from freezetune.data.layout import check_val_apart_from_test

    check_paths_exist(cfg.data, cfg.val_data)  # a typo: one line, not a recipe's start and a sweep folder left
    # an --out that is a file, or inside the data (each recipe's run refused it, after sweep.log and the settings were
    # written there: the next run read the sweep's folder as a class): refused before anything is written
    check_folders(str(out), cfg.cache_dir, (cfg.data, cfg.val_data))
    check_val_apart_from_test(cfg.data, cfg.val_data)  # it would pick the winner
    # each recipe's folder too: a file of a recipe's name there (out/full) was refused once the recipes before had run
    taken = [f"{name} ({problem})" for name, run in runs.items() if (problem := folder_problem(run.out))]
    if taken:
        raise ConfigError(f"--out {str(out)!r} cannot hold the folder of recipe(s) {', '.join(taken)}: move it, or "
                          "choose another --out")  # fmt: skip
    features = out / SWEEP_FEATURES  # where the recipes share their features without --cache-dir (run_configs)
    if cfg.cache_dir is None and (problem := folder_problem(features)):  # refused after sweep.log was written
        raise ConfigError(f"--out {str(out)!r} cannot hold the features the recipes share, '{features}' "
                          f"({problem}): move it, or give --cache-dir")  # fmt: skip

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
    from freezetune.run.checkpoint import LAST  # (torch: not at import, the CLI's parsers import this module)

    # a sweep records its settings before it writes any of these
    if not sweep_config.is_sweep_settings(out / SETTINGS_FILE):
        foreign = [name for name in ("sweep.csv", sweep_report.WINNER_FILE, SETTINGS_FILE, "sweep.png", SWEEP_LOG)
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


def _sweep(cfg: TrainConfig, runs: dict[str, TrainConfig], out: Path, echo: Callable[[str], None],
           info: DistInfo) -> SweepResult:  # fmt: skip
    with log(echo, name=SWEEP_LOG) as echo:  # every recipe's lines, and the table, in the sweep's own log
        settings = sweep_config.kept_settings(out, cfg, list(runs))
        log_to(out)
        if settings is not None and info.is_main:
            when_opened(out, functools.partial(sweep_config.record_settings, out, settings))
        # a resume's settings and lines wait for a recipe's run to accept it (its own resume checks passed): a refused
        # one rewrote an earlier freezetune's settings, which then refused them as no sweep's
        if not cfg.resume:
            opened(out)  # its settings checked and kept: the dir is this sweep's
        for note in sweep_config.idle_batchnorm_notes(cfg, list(runs)):
            echo(note)
        rows, skipped = _run_all(runs, parse_duration(cfg.budget), budget_text(cfg.budget), echo, info)
        metric = compared_by(cfg.monitor)  # macro-F1 under --monitor val_f1, else accuracy
        winner = pick_winner(rows, metric)
        not_run = [{"recipe": name, "detail": f"skipped: budget {budget_text(cfg.budget)} spent"} for name in skipped]
        opened(out)  # (a resume whose recipes had all finished, their rows read back: the sweep writes its table now)
        if info.is_main:
            sweep_report.write(out, rows, not_run, winner["recipe"], metric, sweep_config.winner_config(cfg, winner))
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


def _run_recipe(name: str, cfg: TrainConfig, echo: Callable[[str], None], info: DistInfo,
                clock: _SweepClock) -> tuple[dict, bool]:  # fmt: skip
    """Train one recipe and keep its row beside its run: a resumed sweep reads a finished recipe's row back, its
    measured seconds included (re-reading its finished run takes a fraction of a second). The row, and whether it
    was read back. Under torchrun every rank takes rank 0's result: rank 0 alone scores and keeps the history (a
    rank 1 read its empty history as "no validation data" and left the job)."""
    from freezetune.device.precision import resolve_device
    from freezetune.recipes import named as recipes
    from freezetune.run.interrupt import RunInterrupted
    from freezetune.training import trainer

    saved = Path(cfg.out) / ROW_FILE
    if cfg.resume and saved.is_file():
        # (finished before a stop, or before a budget left the others out: no interruption to speak of)
        echo(f"sweep: recipe {name} finished in an earlier call of this sweep: its row from {saved}")
        return _read_back(saved), True
    echo(f"sweep: recipe {name}")
    if cfg.resume and not Path(cfg.out).exists():  # the sweep stopped before this recipe began: it starts afresh
        cfg = dataclasses.replace(cfg, resume=False)  # (the auto recipe refused to resume a run dir never made)
    with log(echo):  # the recipe's own level of the log: the auto recipe's trials and choice in its train.log too
        try:
            train = functools.partial(trainer.train, validation_needed_by=(NEEDS_VALIDATION,))
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
    from freezetune.run.reporting import METRICS_CSV, read_metrics
    from freezetune.training.progress import RunResult

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
    (``auto.rule.LR_BOOST``), from the weights its trial fitted.
    """
    from freezetune.auto.recipe import PROBE_DIR
    from freezetune.run.directory import RECIPE_FILE, TRIALS_DIR

    try:
        choice = json.loads((run_dir / RECIPE_FILE).read_text())["choice"]
        # (a trial that saved no weights leaves the run to start from --init, or a new head); the probe's weights are
        # in auto-trials/ too: "from its trial's weights" was said of a run from the probed head
        parts, start = Path(choice.get("init") or "").parts, ""
        if TRIALS_DIR in parts:
            start = ", from the probed head" if PROBE_DIR in parts else ", from its trial's weights"
        lr = choice.get("run_lr", choice["lr"])  # an older recipe.json has no run_lr (auto.resume)
        return f"chose last-{choice['trained_stages']} at lr {lr:.1e}{start}"
    except (OSError, ValueError, KeyError, TypeError):  # a named recipe: no choice recorded
        return ""


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


__all__ = ["RECIPES", "SWEEP_DEFAULT_RECIPES", "SweepResult", "pick_winner", "sweep"]
