"""Per-epoch run reporting: ``metrics.csv`` (+ TensorBoard scalars), the one-line epoch log and ``report.png``.

Row conventions shared with the trainer: ``epoch`` (1-based, required), ``epochs`` (total), ``train_loss``,
``train_acc``, ``val_loss``, ``val_acc`` (accuracies as fractions in [0, 1]), ``lr`` and/or ``lr/<group>``,
``trainable_params``, ``total_params``, ``epoch_time_s``, ``img_per_s`` and ``unfrozen`` (the stages unfrozen at the
*start* of this epoch, ``;``-separated, empty when none).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import numbers
import threading
from pathlib import Path
from typing import Any

import torch

from freezetune._io import atomic_output, atomic_write_text
from freezetune.config.options import DEFAULT_MONITOR, FRACTIONS, METRIC_NAMES
from freezetune.errors import DataError

log = logging.getLogger(__name__)

METRICS_CSV, REPORT_PNG = "metrics.csv", "report.png"  # a run's epoch rows and their plot


# A list in a metrics.csv cell (the stages unfrozen after an epoch) is written joined by this, and only here.
LIST_SEP = ";"


class MetricsLogger:
    """Append one row per epoch to ``run_dir/metrics.csv`` and mirror the numeric values to TensorBoard.

    Constructing a logger on a run directory that already has ``metrics.csv`` loads its rows, so a resumed run keeps
    one continuous file; call ``truncate(last_completed_epoch)`` first to drop rows the checkpoint does not cover.

    Args:
        run_dir: Directory of the run (created if missing).
        tensorboard: Also write TensorBoard event files into ``run_dir``.

    >>> import tempfile
    >>> log = MetricsLogger(tempfile.mkdtemp(), tensorboard=False)
    >>> log.log_epoch({"epoch": 1, "train_loss": 0.5})
    >>> log.log_epoch({"epoch": 2, "train_loss": 0.25, "lr/head": 1e-3})
    >>> log.path.read_text().splitlines()
    ['epoch,train_loss,lr/head', '1,0.5,', '2,0.25,0.001']
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_CSV
        self.columns: list[str] = []
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            self.columns, self.rows = _read_csv(self.path)
        self._tensorboard = tensorboard
        self._writer = None
        self._purge_step: int | None = None
        # A line cut short by a crash is repaired by rewriting the file from memory before appending. Otherwise the
        # file is appended to in place: a rewrite is a new file, which a `tail -f` watching it no longer follows.
        self._rewrite_next = self.path.exists() and not _ends_a_line(self.path)

    def log_epoch(self, row: dict[str, Any]) -> None:
        """Record one epoch: append to ``metrics.csv`` (rewriting it if ``row`` brings new columns) and TensorBoard.

        Args:
            row: Column name -> value; must contain ``epoch``. Values may be numbers (0-d tensors included), strings,
                ``None`` (empty cell) or a list of strings (joined with ``;``).
        """
        if "epoch" not in row:
            raise ValueError(f"row has no 'epoch' key; keys are: {', '.join(row)}")
        row = {str(k): _cell_value(v) for k, v in row.items()}
        new = [k for k in row if k not in self.columns]
        self.columns += new
        self.rows.append(row)
        if new or self._rewrite_next:
            self._rewrite()
        else:
            with open(self.path, "a", encoding="utf-8", newline="") as f:
                _writer(f, self.columns).writerow(_format_row(row))
        self._log_scalars(row)

    def truncate(self, after_epoch: int) -> int:
        """Drop rows with ``epoch > after_epoch`` (a resumed run passes the last epoch its checkpoint completed).

        TensorBoard points from those epochs are purged too, provided nothing was logged yet by this logger.

        Returns:
            The number of rows dropped.
        """
        kept = [r for r in self.rows if _epoch_of(r) <= after_epoch]
        dropped = len(self.rows) - len(kept)
        self.rows = kept
        if dropped:
            self._rewrite()
        self._purge_step = after_epoch + 1
        return dropped

    def close(self) -> None:
        """Flush and close the TensorBoard writer (the CSV is always up to date). Safe to call twice."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except OSError as exc:  # its last events could not be written: the run's own files are what counts
                self._stop_tensorboard(exc)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rewrite(self) -> None:
        buf = io.StringIO()
        w = _writer(buf, self.columns)
        w.writeheader()
        w.writerows(_format_row(r) for r in self.rows)
        atomic_write_text(self.path, buf.getvalue())
        self._rewrite_next = False

    def _log_scalars(self, row: dict[str, Any]) -> None:
        if not self._tensorboard:
            return
        try:
            self._write_scalars(row)
        except OSError as exc:  # a full disk, a quota, a share gone: the events file is a second copy of metrics.csv
            self._stop_tensorboard(exc)

    def _write_scalars(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when TensorBoard is wanted

            _quiet_event_writer_threads()
            # purge_step hides events a crashed run wrote past the checkpoint, so resumed curves don't zig-zag.
            self._writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=self._purge_step)
        step = int(row["epoch"])
        for key, value in row.items():
            if key not in ("epoch", "epochs") and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()  # raises what the writer's thread met

    def _stop_tensorboard(self, exc: OSError) -> None:
        """The run goes on without TensorBoard: a failed events write ended it before its epoch's checkpoint."""
        self._tensorboard = False
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass  # the same failure again
        log.warning("TensorBoard events are no longer written (%s); metrics.csv holds every epoch, and the run goes "
                    "on", exc)  # fmt: skip


def _quiet_event_writer_threads() -> None:
    """TensorBoard writes its events in a thread, which prints its error's traceback as it ends. The error comes back
    in the writer's next call, where ``MetricsLogger`` says it in one line: the thread's own printing is left out."""
    previous = threading.excepthook
    if getattr(previous, "_freezetune_quiet", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread" or not isinstance(args.exc_value, OSError):
            previous(args)

    hook._freezetune_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class NullMetricsLogger:
    """The metrics logger of DDP ranks other than 0: rank 0 alone writes metrics.csv and TensorBoard."""

    @property
    def rows(self) -> list[dict[str, Any]]:  # a fresh list each time: a class-level one would be shared by all
        return []

    def log_epoch(self, row: dict) -> None:
        pass

    def truncate(self, after_epoch: int) -> int:
        return 0

    def close(self) -> None:
        pass


def _cell_value(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, (list, tuple)):
        return LIST_SEP.join(str(x) for x in v)
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)  # numpy scalars -> float, so repr() below is the plain round-trip form
    raise TypeError(f"metrics value {v!r} of type {type(v).__name__} is not a number or string")


def _format_row(row: dict[str, Any]) -> dict[str, str]:
    # repr(float) is the shortest string that parses back to the same float.
    return {k: "" if v is None else repr(v) if isinstance(v, float) else str(v) for k, v in row.items()}


def _writer(f: Any, columns: list[str]) -> csv.DictWriter:
    return csv.DictWriter(f, fieldnames=columns, lineterminator="\n", restval="")


def _parse_cell(s: str) -> Any:
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


def missing_epochs(rows: list[dict[str, Any]], done: int) -> str:
    """The epochs 1..``done`` that ``rows`` (``metrics.csv``'s) hold no row of, said compactly ("" for none): a
    resume's note where the file lost rows since they were logged.

    >>> missing_epochs([{"epoch": 2}], 4), missing_epochs([], 2), missing_epochs([{"epoch": "1"}], 1)
    ('1, 3-4', '1-2', '')
    """
    have = {_epoch_of(r) for r in rows}
    spans: list[list[int]] = []
    for e in (e for e in range(1, done + 1) if e not in have):
        if spans and spans[-1][1] == e - 1:
            spans[-1][1] = e
        else:
            spans.append([e, e])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def _epoch_of(row: dict[str, Any]) -> float:
    try:
        return float(row["epoch"])
    except (KeyError, TypeError, ValueError):
        return -math.inf  # a malformed row is never "after" anything; keep it rather than lose data


def _ends_a_line(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, io.SEEK_END)
        if not f.tell():
            return True
        f.seek(-1, io.SEEK_END)
        return f.read(1) == b"\n"


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        # Empty cells mean "not logged this epoch": leave the key out so row.get(col) is None, not "".
        rows = [{k: _parse_cell(v) for k, v in r.items() if k is not None and v not in ("", None)} for r in reader]
    return columns, rows


def read_metrics(metrics_csv: str | Path) -> list[dict[str, Any]]:
    """Load ``metrics.csv`` as a list of rows (numbers parsed, empty cells omitted).

    Raises:
        DataError: if the file does not exist.

    >>> import tempfile
    >>> log = MetricsLogger(tempfile.mkdtemp(), tensorboard=False)
    >>> log.log_epoch({"epoch": 1, "val_acc": 0.1 + 0.2})
    >>> read_metrics(log.path)[0]["val_acc"] == 0.1 + 0.2
    True
    """
    path = Path(metrics_csv)
    if not path.is_file():
        raise DataError(f"metrics file '{path}' does not exist")
    return _read_csv(path)[1]


def unfreeze_events(rows: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """Return ``(epoch, stages)`` for every row whose ``unfrozen`` column is non-empty, in row order.

    >>> unfreeze_events([{"epoch": 1}, {"epoch": 2, "unfrozen": ""}, {"epoch": 3, "unfrozen": "layer4;layer3"}])
    [(3, 'layer4;layer3')]
    """
    events = []
    for row in rows:
        stages = str(row.get("unfrozen") or "").strip()
        if stages and "epoch" in row:
            events.append((int(float(row["epoch"])), stages))
    return events


def plot_report(metrics_csv: str | Path, out_png: str | Path, *, monitor: str = DEFAULT_MONITOR,
                best_epoch: int | None = None) -> Path:  # fmt: skip
    """Plot loss, accuracy and (if logged) learning rates per epoch, marking unfreeze events and the best epoch.

    Each unfreeze event is a dashed vertical line half an epoch before the first epoch trained with the new stages.
    Columns that are missing are skipped; a file without rows gives a figure that says so.

    Args:
        metrics_csv: A ``metrics.csv`` written by ``MetricsLogger``.
        out_png: Destination PNG; written atomically.
        monitor: the metric the run kept ``best.pt`` by (``val_acc``, ``val_loss``, ``val_f1``): its panel rings the
            best epoch (``val_f1``: drawn beside the accuracies).
        best_epoch: ``best.pt``'s epoch; by default the best of ``monitor``'s column.

    Returns:
        ``out_png`` as a ``Path``.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> log = MetricsLogger(d, tensorboard=False)
    >>> for e in (1, 2): log.log_epoch({"epoch": e, "train_loss": 1 / e, "unfrozen": "layer4" if e == 2 else ""})
    >>> plot_report(d / "metrics.csv", d / "report.png").read_bytes()[:4]
    b'\\x89PNG'
    """
    rows = [r for r in read_metrics(metrics_csv) if "epoch" in r]
    fig = report_figure(rows, Path(metrics_csv).parent.name or "run", monitor=monitor, best_epoch=best_epoch)
    with atomic_output(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_png)


def report_figure(
    rows: list[dict[str, Any]], name: str, *, monitor: str = DEFAULT_MONITOR, best_epoch: int | None = None
):
    """``plot_report``'s figure of the epoch ``rows`` of run ``name`` (a matplotlib ``Figure``, not saved)."""
    from matplotlib.figure import Figure  # half a second: not for the commands that only read a run's files
    from matplotlib.ticker import MaxNLocator

    panels = _panels(rows, monitor)
    heights = [3, 3, 2][: len(panels)]
    no_val = rows and not any(isinstance(r.get("val_acc"), numbers.Real) for r in rows)
    fig = Figure(figsize=(_WIDTH, sum(heights) + 0.8), dpi=110)
    axes = fig.subplots(len(panels), 1, sharex=True, gridspec_kw={"height_ratios": heights})
    _fixed_margins(fig, title_lines=2 if no_val else 1)
    for ax, (title, cols, scale, log) in zip(axes, panels, strict=True):
        _plot_panel(ax, rows, title, cols, scale, log)
    _mark_unfreezes(axes, unfreeze_events(rows))
    _mark_best(axes[1] if monitor in FRACTIONS else axes[0], rows, monitor, best_epoch)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 1.5 tick on a 3-epoch run
    if len({r["epoch"] for r in rows}) == 1:  # one epoch: the locator fell back to ticks 0.945, 0.960, ...
        axes[-1].set_xlim(rows[0]["epoch"] - 1, rows[0]["epoch"] + 1)
    axes[-1].set_xlabel("epoch")
    if not rows:
        axes[0].text(0.5, 0.5, "no epochs logged yet", ha="center", va="center", transform=axes[0].transAxes)
    fig.align_ylabels(axes)
    fig.suptitle(f"{name}: training report" + ("\n(no validation split: best.pt is the last epoch)" if no_val else ""))
    return fig


_WIDTH = 8.0  # inches
# Margins in inches: the two-line labels and "1e-08" ticks on the left, the epoch label below, the title above. Fixed,
# not matplotlib's constrained layout, which measures every label by drawing the figure once more: a process's first
# report took 0.48 s with it, 0.14 s without (2 CPU cores; benchmarks/run_overhead.py), where the default command's
# whole run on a few hundred images takes 4.5 s.
_LEFT, _RIGHT, _BOTTOM, _TITLE_LINE, _GAP = 1.0, 0.15, 0.5, 0.25, 0.1


def _fixed_margins(fig: Any, *, title_lines: int) -> None:
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=_LEFT / width, right=1 - _RIGHT / width, bottom=_BOTTOM / height,
                        top=1 - (0.15 + _TITLE_LINE * title_lines) / height, hspace=_GAP / (height / 3))  # fmt: skip


def _panels(rows: list[dict[str, Any]], monitor: str) -> list[tuple[str, list[str], float, bool]]:
    """(title, columns, scale, log axis) of each panel: losses; accuracies (and macro-F1 when best.pt was kept by
    it); the learning rates, when logged."""
    scores = (("accuracy,\nmacro-F1 (%)", ["train_acc", "val_acc", "val_f1"]) if monitor == "val_f1"
              else ("accuracy (%)", ["train_acc", "val_acc"]))  # fmt: skip
    panels = [("loss", ["train_loss", "val_loss"], 1.0, False), (*scores, 100.0, False)]
    if lr_cols := _lr_columns(rows):
        panels.append(("learning rate\n(at epoch end)", lr_cols, 1.0, True))
    return panels


def _lr_columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}  # ordered set: columns in first-seen order
    for row in rows:
        seen.update((k, None) for k in row if k == "lr" or k.startswith("lr/"))
    # a stage's /no_decay twin runs at the stage's LR (param_groups): one line each, not two on top of each other
    return [k for k in seen if not (k.endswith("/no_decay") and k.removesuffix("/no_decay") in seen)]


# the two losses differ: the steps minimise the run's loss (label smoothing, class weights), validation scores plain
# cross-entropy, so train_loss sits above val_loss at the same fit (and read as underfitting, unlabelled)
_LEGEND = {
    "train_loss": "train_loss (as trained: label smoothing, class weights)",
    "val_loss": "val_loss (cross-entropy)",
}


def _plot_panel(ax: Any, rows: list[dict[str, Any]], title: str, cols: list[str], scale: float, log: bool) -> None:
    plotted = False
    for col in cols:
        pts = [(r["epoch"], r[col]) for r in rows if isinstance(r.get(col), numbers.Real)]
        if log:  # zero LRs (frozen groups, warmup start) cannot be drawn on a log axis
            pts = [(e, v) for e, v in pts if v > 0]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(
                xs, [y * scale for y in ys], marker="o", markersize=3, label=_LEGEND.get(col, col.removeprefix("lr/"))
            )
            plotted = True
    ax.set_ylabel(title)
    ax.grid(True, alpha=0.3)
    if plotted:
        if log:
            ax.set_yscale("log")
            _plain_log_labels(ax)
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, f"no {' / '.join(cols)} logged", ha="center", va="center", transform=ax.transAxes, alpha=0.6)


def _plain_log_labels(ax: Any) -> None:
    """Label a log axis in plain text, two significant digits ("0.001", "0.0033", "1e-08"): matplotlib's default
    writes 10 to a power in mathtext, whose parser, built at its first use, took 0.1 s of a report's draw. Which
    ticks get a label stays matplotlib's choice (``LogFormatter``: decades, and the ticks between them over a narrow
    range, where its own text, "1e-03" for 0.0012, said one digit)."""
    from matplotlib.ticker import LogFormatter

    class PlainLog(LogFormatter):
        def __call__(self, x, pos=None):
            return self.fix_minus(f"{x:.2g}") if super().__call__(x, pos) else ""  # (a typographic minus)

    ax.yaxis.set_major_formatter(PlainLog())
    ax.yaxis.set_minor_formatter(PlainLog(labelOnlyBase=False))


def _mark_best(ax: Any, rows: list[dict[str, Any]], monitor: str = DEFAULT_MONITOR, epoch: int | None = None) -> None:
    """Ring ``best.pt``'s epoch on the panel of the metric it was kept by (``epoch``, else ``_best_epoch``'s),
    named in the legend: a label beside the ring lay across the curves below it. Under ``--monitor val_loss`` the ring
    sat on the highest accuracy, an epoch best.pt did not hold."""
    scored = {r["epoch"]: r for r in rows if isinstance(r.get(monitor), numbers.Real)}
    if epoch is None:
        epoch = _best_epoch(list(scored.values()), monitor)
    if epoch not in scored:
        return
    value = scored[epoch][monitor]
    shown = f"{100 * value:.1f}%" if monitor in FRACTIONS else f"{value:.4g}"
    label = f"best {METRIC_NAMES.get(monitor, monitor.replace('_', ' '))} {shown} (epoch {epoch})"
    ax.plot([epoch], [value * (100 if monitor in FRACTIONS else 1)], marker="o", markersize=10, fillstyle="none",
            color="tab:green", linestyle="", label=label)  # fmt: skip
    ax.legend(fontsize=8, loc="best")


def _best_epoch(rows: list[dict[str, Any]], monitor: str) -> int | None:
    """The epoch ``best.pt`` keeps among ``rows`` (each scored on ``monitor``): they are replayed through
    ``Progress.update``, the trainer's one rule, ties included; the first when none is finite."""
    from freezetune.training.progress import Progress, other_monitor

    progress = Progress(monitor)
    for row in rows:
        progress.update(row["epoch"] - 1, row[monitor], row.get(other_monitor(monitor)))
    return progress.best_epoch or (rows[0]["epoch"] if rows else None)


def _mark_unfreezes(axes: Any, events: list[tuple[int, str]]) -> None:
    for epoch, stages in events:
        x = epoch - 0.5
        for ax in axes:
            ax.axvline(x, color="tab:red", linestyle="--", linewidth=1, alpha=0.7)
        label = "unfreeze " + ", ".join(s for s in stages.split(";") if s)
        axes[0].annotate(
            label, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3), textcoords="offset points",
            rotation=90, ha="left", va="top", fontsize=8, color="tab:red",
        )  # fmt: skip
