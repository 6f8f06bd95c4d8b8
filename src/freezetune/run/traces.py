"""Whether the files a run stopped before its first ``last.pt`` leaves in its dir are a run's own: a restart clears
them, and a user's of the same names must not go with them."""

from __future__ import annotations

import csv
from pathlib import Path

from freezetune.errors import CheckpointError
from freezetune.run import checkpoint
from freezetune.run.reporting import METRICS_CSV

# The first columns of every metrics.csv a run writes (epoch_log.epoch_row)
METRICS_START = ["epoch", "epochs", "train_loss", "train_acc"]


def not_a_runs(run_dir: Path, classes: list[str] | None) -> list[str]:
    """Those of ``best.pt`` and ``metrics.csv`` in ``run_dir`` that no run whose ``classes.json`` lists ``classes``
    wrote: a ``best.pt`` that is not a freezetune checkpoint of those classes, a ``metrics.csv`` without a run's
    columns. A folder holding a model of the user's beside a list of its class names looked like a run stopped after
    its first epoch, and starting one there deleted them.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "metrics.csv").write_text("epoch,val_acc\\n1,0.9\\n")
    >>> _ = (d / "best.pt").write_text("my model"); not_a_runs(d, ["cat", "dog"])
    ['best.pt', 'metrics.csv']
    """
    foreign = []
    if (run_dir / checkpoint.BEST).is_file():
        try:
            record = checkpoint.load(run_dir / checkpoint.BEST, mmap=True)
        except CheckpointError:
            record = None
        if record is None or list(record["classes"]) != classes:
            foreign.append(checkpoint.BEST)
    if (run_dir / METRICS_CSV).is_file() and _header(run_dir / METRICS_CSV)[: len(METRICS_START)] != METRICS_START:
        foreign.append(METRICS_CSV)
    return foreign


def _header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
