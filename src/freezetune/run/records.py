"""A run dir's records kept true to what it saved, when it ends without its final test: ``report.png`` redrawn
through its last epoch, and the test files of a ``best.pt`` a resume has since replaced removed (both waited for the
run's end, which a stopped resume, or a run with nothing to test, never reached)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from freezetune.run import reporting
from freezetune.run.directory import CONFUSION_PNG, TEST_METRICS


def after_stop(run_dir: Path, *, monitor: str, best_epoch: int | None, echo: Callable[[str], None]) -> None:
    """A stopped run's report and test files; what fails here is said, not raised over the stop's own line."""
    csv_path, png = run_dir / reporting.METRICS_CSV, run_dir / reporting.REPORT_PNG
    try:
        if csv_path.is_file() and (not png.is_file() or png.stat().st_mtime_ns < csv_path.stat().st_mtime_ns):
            reporting.plot_report(csv_path, png, monitor=monitor, best_epoch=best_epoch)
        drop_stale_test(run_dir, best_epoch, echo, why="not scored yet: the run stopped before its test")
    except Exception as exc:  # noqa: BLE001 - a plot or a file the stop leaves as it was
        echo(f"note: after the stop, the report and test files were left as they were ({exc})")


def drop_stale_test(run_dir: Path, best_epoch: int | None, echo: Callable[[str], None],
                    why: str = "not scored: --no-final-test or no test split") -> None:  # fmt: skip
    """The test files of an earlier attempt that scored another ``best.pt`` than the run's of ``best_epoch`` (a
    resume moved it); a file written before they named the epoch they scored is left as it is."""
    try:
        if json.loads((run_dir / TEST_METRICS).read_text()).get("epoch", best_epoch) == best_epoch:
            return
    except (OSError, ValueError, AttributeError):  # none, or not ours to judge
        return
    stale = [name for name in (TEST_METRICS, CONFUSION_PNG) if (run_dir / name).exists()]
    for name in stale:
        (run_dir / name).unlink()
    if stale:
        echo(f"removed {', '.join(stale)}: they scored an earlier best.pt (this run's is epoch {best_epoch}, {why})")
