"""Honest validation: which set a run validates on (given, a validation folder or file, a fraction, or held out of
the training data automatically), the classes it cannot judge, and the held-out part joining the training set (refit).
The test split is never validation data (``build_datasets``'s rules)."""

from __future__ import annotations

import hashlib
import logging
import os

import torch
from torch.utils.data import Dataset

from freezetune.config.options import AUTO_VAL_FRACTION, AUTO_VAL_MAX_PER_CLASS
from freezetune.data.folder import FileImageDataset
from freezetune.data.overlap import copies
from freezetune.data.sampling import per_class_indices, stratified_split
from freezetune.data.scan import file_stamp
from freezetune.data.text import TextDataset, noun
from freezetune.errors import choices
from freezetune.run.log import warn_once
from freezetune.training.progress import NOT_HELD_OUT

log = logging.getLogger(__name__)


def hold_out(train: Dataset, fraction: float, seed: int, max_per_class: int | None = None) -> tuple[Dataset, Dataset]:
    train_idx, val_idx = stratified_split(train.targets, fraction, seed, max_per_class, same_items(train))
    return train.select(train_idx), train.select(val_idx)


def same_items(train: Dataset) -> list | None:
    """A key per training sample that one file listed twice, byte-identical copies of a file, or one text (as the
    model reads it: ``TextKey``) share, so the hold-out keeps them on one side: a copy held out is scored on an image
    the model trained on. None for data without files or texts (an IDX set's arrays)."""
    if isinstance(train, TextDataset):
        return [train.same_as(t) for t in train.texts]
    if not isinstance(train, FileImageDataset):
        return None
    paths = [os.path.normpath(p) for p, _ in train.samples]  # no syscall: a link is found by its bytes, below
    unique = list(dict.fromkeys(paths))
    # once for a list of files, which the auto recipe builds again for each trial and its run (the whole set, then its
    # --per-class draw); held by a digest of the names and each file's stamp, not the names alone: in a notebook,
    # files copied over others between two runs kept the first run's answer, and a copy was held out alone
    stamps = "\0".join(f"{p}\1{file_stamp(p)}" for p in unique)
    key = hashlib.blake2b(stamps.encode("utf-8", "surrogateescape"), digest_size=16).digest()
    if key not in _ORIGINALS:
        while len(_ORIGINALS) >= 4:
            _ORIGINALS.pop(next(iter(_ORIGINALS)))
        _ORIGINALS[key] = dict(copies(unique))
    original = _ORIGINALS[key]
    return [original.get(p, p) for p in paths]


_ORIGINALS: dict[bytes, dict[str, str]] = {}  # same_items' recent file lists: each copy -> the file it copies


HELD_OUT = "no validation data given"


def resolve_validation(
    train: Dataset, val: Dataset | None, *, val_data: str | None, val_split: float | None, per_class: int | None,
    seed: int, refit: bool, test: str, refit_follows: bool = False,
) -> tuple[Dataset, Dataset | None, str, str]:  # fmt: skip
    """``build_datasets``' validation: the set by the first rule that applies (``val`` is the data's own or
    ``val_data``'s, None when neither has one), then ``per_class`` and ``refit`` on what is left. Returns the training
    set, the validation set (None: there is none, or it was refit), what ``val_source`` says of it (with ``test``,
    what becomes of the data's test split, when the validation is not given: why the test split is not it), and why
    the validation set could not be refit ("" when it could). ``refit_follows``: a later run trains on what is held
    out here (the auto recipe's trials, before its final run refits): a class short of ``per_class`` by its
    held-out share alone is then noted, not warned of."""
    given = val
    train, val, val_source = choose_validation(train, val, val_data=val_data, val_split=val_split, seed=seed)
    if val is not None and len(val) == 0:  # copies are held out together: five copies of one image are one
        val, val_source = None, f"none (every class has a single training {noun(train)[:-1]}, or copies of one)"
    warn_unvalidated(train, val, held_out=given is None)
    if per_class is not None:
        train = train.select(per_class_indices(train.targets, per_class, seed, same_items(train))[0])
        if val_split is not None and val is not None:  # 12000 validation images for 200 training ones, unsaid
            val_source += f" of the whole training set, before per_class={per_class} drew its {len(train)}"
    held_out = val is not None and given is None and val_split is None  # the automatic hold-out (choose_validation)
    may_refit = held_out and refit_fits(train, val, per_class)
    no_refit = ("" if may_refit else f"training on them too would train on more than per_class={per_class} a class"
                if held_out else NOT_HELD_OUT)  # fmt: skip
    if refit and held_out:
        train, val, val_source = refit_held_out(train, val, val_source, per_class)
    elif refit and given is not None:  # said, as the per_class case is: the run went on validating, unsaid
        val_source += " (not refit: refit joins only what is held out automatically, and these were given)"
    if per_class is not None:
        rejoins = may_refit and refit_follows
        warn_short(train, per_class, val if val is not None and val is not given else None, rejoins=rejoins)
    if test and val is not given:
        val_source += f"; the test split is {test}"
    return train, val, val_source, no_refit


def choose_validation(train: Dataset, val: Dataset | None, *, val_data: str | None, val_split: float | None,
                seed: int) -> tuple[Dataset, Dataset | None, str]:  # fmt: skip
    """The validation set by the first rule that applies (``build_datasets``), the training set left, and the rule."""
    if val_data is not None:
        return train, val, f"val_data {val_data!r}"
    if val is not None:
        return train, val, f"the validation {'file' if isinstance(train, TextDataset) else 'folder'}"
    if val_split is not None:
        train, val = hold_out(train, val_split, seed)
        return train, val, f"val_split {val_split}: {len(val)} training {noun(train)} held out"
    train, val = hold_out(train, AUTO_VAL_FRACTION, seed, AUTO_VAL_MAX_PER_CLASS)
    return train, val, (f"{HELD_OUT}: {len(val)} training {noun(train)} held out ({AUTO_VAL_FRACTION:.0%} per "
                        f"class, 1 to {AUTO_VAL_MAX_PER_CLASS} each)")  # fmt: skip


def warn_unvalidated(train: Dataset, val: Dataset | None, *, held_out: bool) -> None:
    """Name the training classes the validation set has nothing of (a ``val/`` folder without one, or a class of one
    image, which the automatic hold-out leaves whole): every decision the run takes on validation is blind to them."""
    if val is None:
        return
    counts = torch.bincount(val.targets, minlength=len(train.classes)).tolist()
    trained = torch.bincount(train.targets, minlength=len(train.classes)).tolist()
    # a class without a training image has none to hold out either (build_datasets names it)
    missing = [train.classes[c] for c, n in enumerate(counts) if n == 0 and trained[c]]
    if missing:
        why = f" (a class of one training {noun(val)[:-1]} gives none)" if held_out else ""
        warn_once(log, "the validation set has no %s of %d of the %d classes%s: %s; best.pt, early stopping and the "
                  "auto recipe's choice are judged without them", noun(val), len(missing), len(counts), why,
                  choices(missing, limit=10))  # fmt: skip


def refit_fits(train: Dataset, val: Dataset, per_class: int | None) -> bool:
    """Whether the automatic hold-out may join the training set: not when that would train on more than
    ``per_class`` images of a class (the held-out images then came from outside the few-shot budget the user set)."""
    joined = torch.bincount(torch.cat([train.targets, val.targets]), minlength=len(train.classes))
    return per_class is None or int(joined.max()) <= per_class


def refit_held_out(
    train: Dataset, val: Dataset, val_source: str, per_class: int | None
) -> tuple[Dataset, Dataset | None, str]:
    """The automatic hold-out joins the training set, after ``per_class`` (the trials' train, then their val), where
    ``refit_fits``; else it stays validation."""
    if not refit_fits(train, val, per_class):
        return train, val, f"{val_source} (not refit: that would train on more than per_class={per_class} a class)"
    source = f"none: the {len(val)} {noun(val)} held out for validation train too (refit); best.pt is the last epoch"
    return train.joined(val), None, source


def warn_short(train: Dataset, per_class: int, held_out: Dataset | None, *, rejoins: bool) -> None:
    """Name the classes that train on fewer than ``per_class`` items. ``held_out``: validation items taken from the
    training data first (a class of exactly ``per_class`` is then short by its share): said where they went, in a
    warning; where a later run gives them back (``rejoins``: the auto recipe's trials, whose final run refits), in a
    note, and the warning names only the classes short without them too (10 a class beside ``--per-class 200``)."""
    counts = torch.bincount(train.targets, minlength=len(train.classes))
    pool = counts + torch.bincount(held_out.targets, minlength=len(counts)) if held_out is not None else counts
    short = {c: int(n) for c, n in enumerate(counts) if n < per_class}
    # short without the hold-out too: each with what it has (a refit gives its held-out share back)
    anyway = {c: int(pool[c]) if rejoins else n for c, n in short.items() if not rejoins or pool[c] < per_class}
    after = f" after the {len(held_out)} held out for validation" if held_out is not None else ""
    if anyway:
        warn_once(log, "per_class=%d: %d of %d classes have fewer training %s%s and use all they have (%s)",
                  per_class, len(anyway), len(counts), noun(train), "" if rejoins else after,
                  _counts(train, anyway))  # fmt: skip
    if len(short) > len(anyway):
        log.info("per_class=%d: %d of %d classes train on fewer %s%s; a refit (the auto recipe's final run) trains on "
                 "them too (%s)", per_class, len(short) - len(anyway), len(counts), noun(train), after,
                 _counts(train, {c: n for c, n in short.items() if c not in anyway}))  # fmt: skip


def _counts(data: Dataset, counts: dict[int, int]) -> str:
    return ", ".join(f"{data.classes[c]}: {n}" for c, n in list(counts.items())[:10])
