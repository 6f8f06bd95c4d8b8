"""Whether every class of a training set has something to train on: a class with no training example is trained
against, never seen (an IDX label skipped, a class whose files ``--skip-bad`` left out, default names past the
labels)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

from freezetune.data.idx import CLASS_NAMES_FILE, is_idx_dir
from freezetune.data.text import noun
from freezetune.errors import DataError, choices
from freezetune.run.log import warn_once

log = logging.getLogger(__name__)


def check_every_class_trains(data: str, train: Dataset, skipped: list[str]) -> None:
    """A class without a training image is trained against, never seen: refused when ``--skip-bad`` left it so (all
    its files unreadable); named in a warning when it lies between trained labels (IDX labels 0-9 but 5: the labels
    are positions in the class list). The default names past an IDX set's highest label stay classes (a subset of
    digits 0 and 1 is scored on all ten later), said by ``warn_default_names``; those below labels a subset keeps (3
    and 7 alone) are the gap's warning."""
    counts = torch.bincount(train.targets, minlength=len(train.classes)).tolist()
    if skipped and (empty := [c for c, n in zip(train.classes, counts, strict=True) if n == 0]):
        raise DataError(f"--skip-bad left class(es) {choices(empty)} without a training image (all of its files "
                        "were unreadable); fix the files or remove the class folder(s)")  # fmt: skip
    last = max((i for i, n in enumerate(counts) if n), default=-1)
    if gaps := [c for c, n in zip(train.classes[:last], counts[:last], strict=True) if n == 0]:
        warn_once(log, "'%s' has no training %s of class(es) %s, among labels up to %r: the model trains against "
                  "them, never seeing one (IDX labels are positions in the class list, %s where it is given: relabel "
                  "the kept classes 0, 1, ... to train on those alone)", data, noun(train), choices(gaps),
                  train.classes[last], CLASS_NAMES_FILE)  # fmt: skip
    if Path(data).is_dir() and is_idx_dir(Path(data)):
        warn_default_names(data, last, train.classes)


def warn_default_names(root: str | Path, last: int, classes: list[str]) -> None:
    """Say when an IDX set without ``classes.txt``, whose training labels stop at ``last``, takes more default
    names (``idx_class_names``: ten) than it has labels: the model gets a class for each (digits 0 and 1 of MNIST
    keep ten, to be scored on all ten later), and a user with three labels expected three."""
    named = Path(root) / CLASS_NAMES_FILE
    if 0 <= last < len(classes) - 1 and not named.is_file():
        warn_once(log, "'%s' has training labels up to %d and no %s: the model takes its %d default class names "
                  "(%s...), %d of them never trained; name the classes of labels 0 to %d, one a line, in %s to train "
                  "those alone", root, last, CLASS_NAMES_FILE, len(classes), choices(classes[:3]),
                  len(classes) - 1 - last, last, named)  # fmt: skip
