"""What a sweep leaves to read: its table, ``sweep.csv``, ``sweep.png`` (validation accuracy, or macro-F1, against
training seconds, the Pareto front marked) and ``winner.yaml`` (``recipes/sweep.py`` runs the recipes and picks the
winner).
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import math
import os
from pathlib import Path

from freezetune._io import atomic_output, atomic_write_text
from freezetune.config.options import DEFAULT_MONITOR
from freezetune.config.values import dump_yaml
from freezetune.run.log import warn_once
from freezetune.training.epoch_log import human

log = logging.getLogger(__name__)
WINNER_FILE = "winner.yaml"  # the config that trains the sweep's winner again

# detail: what the auto recipe chose (its row and last-k's can train the same stages, at other LRs and starts), or why
# a recipe did not run (the budget was spent)
COLUMNS = ("recipe", "val_acc", "val_f1", "train_s", "peak_mem_mb", "trainable_params", "best_epoch", "run_dir",
           "detail")  # fmt: skip


def format_table(rows: list[dict], winner: str) -> str:
    """The sweep's rows as an aligned text table, the winner marked; a row without scores (a recipe the budget
    skipped) shows its ``detail`` alone.

    >>> print(format_table([{"recipe": "full", "val_acc": 0.8, "val_f1": 0.785, "train_s": 12.0, "peak_mem_mb": 900.0,
    ...                      "trainable_params": 3_400_000, "best_epoch": 3, "run_dir": "r", "detail": ""},
    ...                     {"recipe": "auto", "detail": "skipped: budget 1m spent"}], "full"))
    recipe          val acc   val F1  train s  peak MiB  trainable
    full *            80.0%    78.5%     12.0       900       3.4M
    auto                  -        -        -         -          -  skipped: budget 1m spent
    """
    lines = [f"{'recipe':14s}  {'val acc':>7s}  {'val F1':>7s}  {'train s':>7s}  {'peak MiB':>8s}  {'trainable':>9s}"]
    for r in rows:
        name = r["recipe"] + (" *" if r["recipe"] == winner else "")
        detail = f"  {r['detail']}" if r.get("detail") else ""
        if "val_acc" not in r:
            lines.append(f"{name:14s}  {'-':>7s}  {'-':>7s}  {'-':>7s}  {'-':>8s}  {'-':>9s}{detail}")
            continue
        peak = f"{r['peak_mem_mb']:8.0f}" if r.get("peak_mem_mb") is not None else f"{'-':>8s}"  # CPU: not measured
        lines.append(f"{name:14s}  {100 * r['val_acc']:6.1f}%  {100 * r.get('val_f1', math.nan):6.1f}%  "
                     f"{r['train_s']:7.1f}  {peak}  {human(r['trainable_params']):>9s}{detail}")  # fmt: skip
    return "\n".join(lines)


def pareto_front(rows: list[dict], metric: str = DEFAULT_MONITOR) -> list[dict]:
    """Rows no other row beats on both validation ``metric`` (higher) and training time (lower), fastest first.

    >>> [r["recipe"] for r in pareto_front([{"recipe": "a", "val_acc": .8, "train_s": 10},
    ...     {"recipe": "b", "val_acc": .7, "train_s": 20}, {"recipe": "c", "val_acc": .9, "train_s": 30}])]
    ['a', 'c']
    """
    front = [r for r in rows if not any(o[metric] >= r[metric] and o["train_s"] <= r["train_s"]
                                        and (o[metric], -o["train_s"]) != (r[metric], -r["train_s"])
                                        for o in rows)]  # fmt: skip
    return sorted(front, key=lambda r: r["train_s"])


def write(out: Path, rows: list[dict], not_run: list[dict], winner: str, metric: str, winner_config: dict) -> None:
    """``sweep.csv`` (the ``rows``, then the recipes ``not_run``), ``sweep.png`` (the rows' ``metric`` against their
    seconds) and ``winner.yaml`` (``winner_config``: the config that trains the ``winner`` again) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")  # (sweep_s)
    writer.writeheader()
    writer.writerows(rows + not_run)
    atomic_write_text(out / "sweep.csv", text.getvalue())
    _plot(rows, winner, out / "sweep.png", metric)
    _keep_earlier_winner(out / WINNER_FILE, text := dump_yaml(winner_config))
    atomic_write_text(out / WINNER_FILE, text)


def _keep_earlier_winner(path: Path, text: str) -> None:
    """Keep a ``winner.yaml`` that differs from the one a resumed sweep writes now, beside it, said in a warning: one
    the user edited (its ``refit: true``, as auto-recipe.md suggests) was replaced in silence. (It may also be an
    earlier winner, the resume having run recipes a budget left out.)"""
    if not path.exists():
        return
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):  # not this sweep's text either: kept as well
        pass
    kept = next(p for i in itertools.count(1) if not (p := path.with_name(f"winner.earlier-{i}.yaml")).exists())
    os.replace(path, kept)
    warn_once(log, "%s differed from the winner's config this sweep writes (edited, or an earlier winner's): kept as "
              "%s", path, kept.name)  # fmt: skip


def _plot(rows: list[dict], winner: str, path: Path, metric: str) -> None:
    fig = _figure(rows, winner, metric)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _figure(rows: list[dict], winner: str, metric: str = DEFAULT_MONITOR):
    """Validation ``metric`` against training seconds, a point a recipe, the winner in red, the Pareto front ringed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for r in rows:
        won = r["recipe"] == winner
        ax.scatter(r["train_s"], 100 * r[metric], color="tab:red" if won else "tab:blue", zorder=3,
                   label=f"winner ({winner})" if won else None)  # fmt: skip
        ax.annotate(r["recipe"], (r["train_s"], 100 * r[metric]), textcoords="offset points", xytext=(4, 4))
    ax.margins(x=0.15, y=0.12)  # room for the labels beside the outermost points (the slowest one's was cut off)
    front = pareto_front(rows, metric)
    xs, ys = [r["train_s"] for r in front], [100 * r[metric] for r in front]
    ax.plot(xs, ys, "--", color="gray", zorder=2)
    # each point of the front ringed: a line alone marked nothing when one recipe was both fastest and most accurate
    ax.scatter(xs, ys, s=180, facecolors="none", edgecolors="gray", zorder=2, label="Pareto front")
    ylabel = "validation macro-F1 (%)" if metric == "val_f1" else "validation accuracy (%)"
    ax.set(xlabel="training seconds", ylabel=ylabel, title="recipes on the validation split")
    ax.legend(loc="best", fontsize=8)  # lower right sat on the slow, low-accuracy recipes
    fig.tight_layout()
    return fig


__all__ = ["COLUMNS", "format_table", "pareto_front", "write"]
