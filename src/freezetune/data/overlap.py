"""The same image or text in two splits, or twice in one: a file listed in training and validation or test data (or
in training under two labels) is refused (``check_overlap``); byte-identical copies under other names, texts
repeated across splits, and one text under two labels are warned of (``warn_copies``). A score on a copy of a
training item measures memory, not what the model does on new data.

Copies are found by size first and hashed only where sizes meet; a process remembers each digest it took by the
file's ``scan.file_stamp``, as the scan remembers sound files: the auto recipe reads its data once a trial and once
for its run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from freezetune.data.folder import FileImageDataset
from freezetune.data.sampling import spanning_keys
from freezetune.data.scan import file_stamp
from freezetune.data.text import TextDataset, noun
from freezetune.errors import DataError, choices
from freezetune.run.log import warn_once

log = logging.getLogger(__name__)
_DIGESTS: dict[tuple, bytes] = {}  # the digests this process took, by file_stamp


def copies(paths: list[str], others: list[str] | None = None) -> list[tuple[str, str]]:
    """``(path, original)`` for each file of ``paths`` whose bytes equal a file of ``others`` (without ``others``:
    an earlier file of ``paths``), in the order of ``paths``.

    Sizes are compared first (one ``stat`` per file); only files whose size occurs twice are read and hashed, so a
    folder of JPEGs (sizes all differ) costs no reading.

    >>> copies([], ["a.png"])
    []
    """
    within = others is None
    size = {path: _size(path) for path in [*paths, *(others or ())]}  # one stat per file
    sizes: dict[int, list[str]] = {}
    for other in paths if within else others:
        sizes.setdefault(size[other], []).append(other)
    candidates = [p for p in paths if len(sizes.get(size[p], ())) > (1 if within else 0)]
    digest: dict[bytes, str] = {}
    if not within:
        for other in dict.fromkeys(o for p in candidates for o in sizes[size[p]]):
            digest.setdefault(_hash(other), other)
    found = []
    for path in candidates:
        h = _hash(path)
        if h in digest and digest[h] != path:
            found.append((path, digest[h]))
        elif within:
            digest.setdefault(h, path)
    return found


def _size(path: str) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return -1


def _hash(path: str) -> bytes:
    stamp = file_stamp(path)
    if stamp in _DIGESTS:
        return _DIGESTS[stamp]
    try:
        digest = hashlib.blake2b(Path(path).read_bytes(), digest_size=16).digest()
    except OSError:  # gone since the scan: a copy of nothing
        return f"unreadable:{path}".encode()
    if stamp is not None:
        _DIGESTS[stamp] = digest
    return digest


def check_overlap(train, held: dict[str, object]) -> None:
    """Refuse the same file in two splits (validation or test data that is the training folder, a CSV listing a
    training image) or in one split under two labels (``check_listed_once``): a score on a training image measures
    memory, and a test image in the validation split would decide the run. Files are compared by their real path (symlinks
    resolved); byte-identical copies under other names are ``warn_copies``' business."""
    real = {what: [(os.path.realpath(p), y) for p, y in ds.samples] for what, ds in (("training", train), *held.items())
            if isinstance(ds, FileImageDataset)}  # fmt: skip
    for what, ds in (("training", train), *held.items()):
        if what in real:
            _check_listed_once(ds, real[what], what)
    sources = {what: set(getattr(ds, "source_files", ())) for what, ds in (("training", train), *held.items())}
    items = noun(train)
    for what, other in (("validation", "training"), ("test", "training"), ("test", "validation")):
        if shared_file := sources.get(what, set()) & sources.get(other, set()):  # a split's file read as two
            raise DataError(f"the {what} {items} are the {other} {items} (both read from '{min(shared_file)}'): a "
                            f"{what} score on them is no measure of new {items}; give {what} data apart from the "
                            f"{other} data")  # fmt: skip
        if what not in real or other not in real:
            continue
        others = {p for p, _ in real[other]}
        shared = [p for p, _ in real[what] if p in others]
        if shared:
            raise DataError(f"{len(shared)} of {len(real[what])} {what} image file(s) are also {other} files (first: "
                            f"'{shared[0]}'): a {what} score on them is no measure of new images; give {what} data "
                            f"apart from the {other} data")  # fmt: skip


def check_listed_once(ds, what: str) -> None:
    """Refuse an image file of ``ds`` (the ``what`` split: "training", "test", ...) listed under two or more labels,
    and warn of one listed twice under one (symlinks resolved): a training image taught as two classes; a test image
    scored once as each class, one score always wrong (a folder link from one class into a sibling class). Evaluation
    checks its one split here; a run checks its splits in ``check_overlap``."""
    if isinstance(ds, FileImageDataset):
        _check_listed_once(ds, [(os.path.realpath(p), y) for p, y in ds.samples], what)


def _check_listed_once(ds: FileImageDataset, real: list[tuple[str, int]], what: str) -> None:
    labels: dict[str, set[int]] = {}
    twice: list[str] = []
    for (listed, _), (path, y) in zip(ds.samples, real, strict=True):
        if path in labels:
            twice.append(listed)
        labels.setdefault(path, set()).add(int(y))
    clash = [(p, ys) for p, ys in labels.items() if len(ys) > 1]
    if clash:
        path, ys = clash[0]
        why = "" if what == "training" else ": each is scored once as each, all but one score wrong"
        raise DataError(f"{len(clash)} {what} image file(s) are listed with two or more labels (first: '{path}' as "
                        f"{choices(ds.classes[y] for y in sorted(ys))}){why}; give each image one label")  # fmt: skip
    if twice:  # named: a symlink to another image of its class, a CSV's repeated row
        weighs = "weighs as one more image" if what == "training" else "is scored once more"
        warn_once(log, "%d %s image file(s) are listed more than once (first: '%s', a file listed before, symlinks "
                  "resolved): each listing %s", len(twice), what, twice[0], weighs)  # fmt: skip


def warn_copies(train, held: dict[str, object]) -> None:
    """Warn when files of the ``held`` splits (validation, test) are byte-identical copies of training files, or
    training files of each other: a score on a copy overstates what the model does on new images. Datasets without
    files are skipped; texts are compared as texts (``_warn_text_copies``)."""
    if isinstance(train, TextDataset):
        _warn_text_copies(train, held)
        return
    if not isinstance(train, FileImageDataset):
        return
    train_paths = [path for path, _ in train.samples]
    found = copies(train_paths)
    label = {path: train.classes[i] for path, i in train.samples}
    conflicts = [(p, o) for p, o in found if label[p] != label[o]]  # the same picture taught as two classes
    if conflicts:
        path, original = conflicts[0]
        warn_once(log, "%d training image file(s) are byte-identical copies of training files of another class: the "
                  "same image is taught as two classes; remove it from the wrong one\n  first: '%s' (%s) = '%s' (%s)",
                  len(conflicts), path, label[path], original, label[original])  # fmt: skip
    found = [pair for pair in found if pair not in conflicts]
    if found:
        warn_once(log, "%d training image file(s) are byte-identical copies of other training files; each weighs as "
                  "one more image (a validation split held out of them keeps copies together)\n  first: '%s' = '%s'",
                  len(found), *found[0])  # fmt: skip
    for what, ds in held.items():
        if not isinstance(ds, FileImageDataset):
            continue
        found = copies([path for path, _ in ds.samples], train_paths)
        if found:
            path, original = found[0]
            warn_once(log, "%d of %d %s image file(s) are byte-identical copies of training files: their %s score "
                      "overstates accuracy on new images; remove them from one of the splits\n  first: '%s' = '%s'",
                      len(found), len(ds), what, what, path, original)  # fmt: skip


def _warn_text_copies(train: TextDataset, held: dict[str, object]) -> None:
    """Warn when texts of the ``held`` splits are training texts too, as the model reads them (``TextKey``: an uncased
    model's "A JOY" is "a joy"): their score, as an image copy's, overstates accuracy on new texts."""
    key = train.same_as
    keys = [key(t) for t in train.texts]
    _warn_text_conflicts(train, keys)
    seen = set(keys)
    for what, ds in held.items():
        if not isinstance(ds, TextDataset):
            continue
        found = [t for t in ds.texts if key(t) in seen]
        if found:
            warn_once(log, "%d of %d %s texts are training texts too (first: %r); their %s score overstates accuracy "
                      "on new texts: remove them from one of the splits", len(found), len(ds), what, found[0][:60],
                      what)  # fmt: skip


def _warn_text_conflicts(train: TextDataset, keys: list) -> None:
    """Warn when training texts the model reads as one input (``TextKey``) have different labels: the same input is
    taught as two classes, as an image copied into another class's folder is (a hold-out keeps them in training)."""
    spanning = spanning_keys(train.targets, keys)
    if not spanning:
        return
    first: dict[object, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    labels = train.targets.tolist()
    b = next(i for i, k in enumerate(keys) if labels[i] != labels[first[k]])
    a = first[keys[b]]
    warn_once(log, "%d training texts are read as one input under different labels (first: %r (%s) = %r (%s)): the "
              "same input is taught as two classes, and a hold-out keeps them in training; give each text one label",
              sum(k in spanning for k in keys), train.texts[a][:60], train.classes[labels[a]], train.texts[b][:60],
              train.classes[labels[b]])  # fmt: skip
