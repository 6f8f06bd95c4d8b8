"""Which folders of an image-folder dataset are which split: ``train/`` (or ``training/``), ``val/`` (``valid/``,
``validation/``, ``dev/``) and ``test/`` (``testing/``), matched without regard to case, each holding
``<class>/*`` folders; or a flat ``DIR/<class>/*`` layout. A split folder of images without class folders (Kaggle's
unlabelled ``test/``) is refused with the way out, and one the run does not score is not read; a folder of images
beside the split folders (a class folder one level too high) is named in a warning. A text dataset's
splits are files by the same names: ``DIR/train.csv``, ``DIR/val.csv``, ``DIR/test.csv`` (or ``.tsv``, ``.jsonl``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch.utils.data import Dataset

from freezetune.data.folder import (
    count_images,
    folder_classes,
    has_image_suffix,
    is_hidden,
    is_skipped_folder,
    scan_folder,
)
from freezetune.data.idx import check_test_labels, idx_files, is_idx_dir, labels_of, split_classes
from freezetune.data.scan import check_splits, unreadable
from freezetune.data.text import TextDataset, read_text_csv
from freezetune.data.text_table import TABLE_SUFFIXES, Columns, text_csv_header
from freezetune.errors import DataError, choices, setting
from freezetune.run.log import warn_once

log = logging.getLogger(__name__)

# split folders, matched without regard to case (Train/, Val/); the first name found of each tuple wins
TRAIN_DIRS = ("train", "training")
VAL_DIRS = ("val", "valid", "validation", "dev")
TEST_DIRS = ("test", "testing")


def warn_own_validation_unused(data: str, val_data: str) -> None:
    """Name the validation split of ``data``'s own layout (a text folder's ``val.csv``, an image folder's ``val/``
    beside ``train/``) that ``val_data``, another, replaces: its items are then neither trained nor validated on,
    which nothing said (the log named ``val_data`` alone)."""
    path = Path(data)
    if not path.is_dir():
        return
    splits = split_files(path)
    if splits is not None:  # a text folder's split files
        own = splits.get("val")
    else:  # an image folder's val/ beside its train/ (a flat layout has none)
        own = first_dir(path, VAL_DIRS) if first_dir(path, TRAIN_DIRS) is not None else None
    if own is not None and os.path.realpath(own) != os.path.realpath(val_data):
        warn_once(log, "'%s' has a validation %s of its own, '%s': --val-data '%s' validates instead, and what '%s' "
                  "holds is neither trained nor validated on", data, "file" if own.is_file() else "folder", own.name,
                  val_data, own.name)  # fmt: skip


def check_val_apart_from_test(data: str | None, val_data: str | None) -> None:
    """Refuse ``val_data`` that is ``data``'s test split (its ``test/`` folder, ``test.csv``, or the IDX directory
    itself, whose validation read takes its ``t10k`` files), before anything is built: it would pick the model, and
    the test split must not. Its files were refused only once the run's data was read, after the auto recipe had made
    its choice on them, and never with ``--no-final-test`` or in a sweep, which score no test split."""
    if not data or not val_data:
        return
    path, val = Path(data), Path(val_data)
    if not (path.is_dir() and val.exists()):  # the paths' own checks name a missing one
        return
    # every place a test split can be: an image model reads test/ where a text model reads test.csv beside it
    tests = [path if is_idx_dir(path) and idx_files(path, "test") is not None else None,
             (split_files(path) or {}).get("test"), first_dir(path, TEST_DIRS)]  # fmt: skip
    test = next((t for t in tests if t is not None and os.path.realpath(t) == os.path.realpath(val)), None)
    if test is None:
        return
    what = "reads the test split (t10k files) of" if test == path else "is the test split of"
    raise DataError(f"{setting('val_data', val_data)} {what} '{data}': validation picks the model (best.pt, the auto "
                    "recipe's choice, a sweep's winner), and the test split only scores it at the end; give validation "
                    "data apart from the test data, or leave val_data out (10 % of each training class is then held "
                    "out)")  # fmt: skip


def load_folder(path: Path, *, read_val: bool = True,
                read_test: bool = True) -> tuple[Dataset, Dataset | None, Dataset | None, bool]:  # fmt: skip
    """The splits of the image folder ``path`` without transforms: (train, the layout's val or None, test or None,
    whether it has a test folder); ``read_val``/``read_test``: read those folders (not when ``--val-data`` replaces
    the one, or the run does not score the other: a broken or unlabelled test file must not stop it)."""
    train_dir = first_dir(path, TRAIN_DIRS)
    if train_dir is None:
        classes = sorted(d for d in path.iterdir() if d.is_dir() and not is_skipped_folder(d.name))
        _no_train_dir(path, [d.name for d in classes])
        _no_splits_in_classes(path, classes)
        return scan_folder(path), None, None, False
    val_dir, test_dir = first_dir(path, VAL_DIRS) if read_val else None, first_dir(path, TEST_DIRS)
    _warn_beside_splits(path, train_dir)
    _labelled(train_dir, f"a folder named {train_dir.name}/ is read as the training split ({train_dir}/<class>/*): "
              f"if '{train_dir.name}' is a class of a flat layout, rename that folder")  # fmt: skip
    train = scan_folder(train_dir)
    if val_dir:
        _labelled(val_dir, f"move it out of '{path}' (validation is then held out of {train_dir.name}/)")
    val = scan_folder(val_dir, train.classes) if val_dir else None
    test = _test_folder(test_dir, train.classes) if test_dir and read_test else None
    return train, val, test, test_dir is not None


def class_roots(data: str | None) -> list[Path]:
    """The folders of the image-folder dataset ``data`` whose subfolders are read as classes: its split folders, or
    the folder itself (a flat layout); none for an IDX directory, a text model's split files or a file. A run's own
    folders made below one of them (``--out``, the feature cache) would be read back as a class, and its
    ``report.png`` as an image of one.

    >>> class_roots("/nonexistent")
    []
    """
    path = Path(data) if data else None
    if path is None or not path.is_dir() or is_idx_dir(path) or split_files(path) is not None:
        return []
    splits = [d for d in path.iterdir() if d.is_dir() and d.name.lower() in (*TRAIN_DIRS, *VAL_DIRS, *TEST_DIRS)]
    # every split-named folder, read or not (first_dir's choice, and its warning, belong to the data's build)
    return splits if any(d.name.lower() in TRAIN_DIRS for d in splits) else [path]


def first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` that ``root`` has as a folder, in any case (``Train/`` is ``train/``); the others
    found (``val/`` beside ``valid/``) are named in a warning: their images are not read. One name in two cases
    (``Train/`` beside ``train/``) is refused: neither is the other's preferred spelling."""
    entries = sorted(root.iterdir())
    broken = [d for d in entries if d.name.lower() in names and d.is_symlink() and not d.exists()]
    if broken:  # an unmounted share: its split was left out in silence (eval scored val/ as the test split)
        raise DataError(f"'{broken[0]}' is a link to '{os.readlink(broken[0])}', which does not exist (not mounted?): "
                        "mount it, or remove the link to run without that split")  # fmt: skip
    # every folder of these names, in any case: train/ beside Train/ kept one of the two, in silence
    present = [d for n in names for d in entries if d.name.lower() == n and d.is_dir()]
    spelled = [d for d in present if d.name.lower() == present[0].name.lower()] if present else []
    if len(spelled) > 1:  # Train/ beside train/: the first in sort order was read (a 1-image Train/ over train/), and
        # the run failed on a follow-on error ("class folder(s) ... are not training classes") that never named it
        raise DataError(f"'{root}' has {' and '.join(f'{d.name}/' for d in spelled)}: one split under two spellings; "
                        f"keep one (move the images of the other into it)")  # fmt: skip
    if len(present) > 1:
        warn_once(log, "'%s' has %s: %s/ is read, %s not", root, " and ".join(f"{d.name}/" for d in present),
                  present[0].name, ", ".join(f"{d.name}/" for d in present[1:]))  # fmt: skip
    return present[0] if present else None


def _warn_beside_splits(path: Path, train_dir: Path) -> None:
    """Name the folders of images beside the split folders (a class folder put one level too high, next to
    ``train/`` rather than in it): nothing reads them, and the run trained without that class in silence. Folders
    without images (the feature cache, a run's directory: ``count_images``) are not named."""
    splits = {*TRAIN_DIRS, *VAL_DIRS, *TEST_DIRS}
    beside = sorted(d for d in path.iterdir() if d.is_dir() and not is_hidden(d.name) and d.name.lower() not in splits)
    counts = [(d.name, n) for d in beside if (n := count_images(d))]
    if counts:
        more = f" and {len(counts) - 3} more" if len(counts) > 3 else ""
        named = ", ".join(f"'{name}/' ({n})" for name, n in counts[:3]) + more
        warn_once(log, "'%s': folder(s) %s beside the split folders hold %d image file(s), which are left out: a class "
                  "folder belongs in %s/ (and in the validation and test folders)", path, named,
                  sum(n for _, n in counts), train_dir)  # fmt: skip


def _no_train_dir(path: Path, classes: list[str]) -> None:
    """Class folders named as splits (``val/``, ``test/``) are a layout without its ``train/`` folder, not classes
    called "test" and "val": all of them, or some beside class folders (their images trained as those classes)."""
    splits = {*TRAIN_DIRS, *VAL_DIRS, *TEST_DIRS}
    named = [c for c in classes if c.lower() in splits]
    if named and len(named) == len(classes):
        raise DataError(f"'{path}' holds split folders ({choices(classes)}) but no training folder: put the training "
                        f"images in {path / 'train'}/<class>/ (or give the class folders themselves)")  # fmt: skip
    if named:
        others = [c for c in classes if c not in named]
        beside = ", ".join(f"{n}/" for n in named)
        raise DataError(f"'{path}' holds split folder(s) {choices(named)} beside its class folders "
                        f"({choices(others[:5])}{', ...' if len(others) > 5 else ''}), and a flat layout's folders are "
                        f"all classes: put the class folders in {path / 'train'}/ (beside {beside}), or rename those "
                        "folders if they are classes")  # fmt: skip


def _no_splits_in_classes(path: Path, classes: list[Path]) -> None:
    """A flat layout whose class folders hold split folders: a dataset one folder too deep (``DIR/ds/train/``, read as
    the single class "ds"), or one split within each class (``cat/train/``, ``cat/test/``), whose test and validation
    images were trained on as the class's, in silence: refused when every class folder holds some, else named in a
    warning (a class may have a subfolder called "dev")."""
    splits = {*TRAIN_DIRS, *VAL_DIRS, *TEST_DIRS}
    nested = {c: found for c in classes  # the name first: a stat for each image file of a large class was a listing
              if (found := sorted(d.name for d in c.iterdir() if d.name.lower() in splits and d.is_dir()))}  # fmt: skip
    if not nested:
        return
    first, found = next(iter(nested.items()))
    listed = ", ".join(f"{name}/" for name in found)
    if len(classes) == 1:
        raise DataError(f"'{path}' holds one folder, '{first.name}', and it holds split folders ({listed}): give "
                        f"--data {first}")  # fmt: skip
    said = (f"{len(nested)} of the {len(classes)} class folders of '{path}' hold split folders (first: '{first}' holds "
            f"{listed}): their images train as the class's, test images included")  # fmt: skip
    if len(nested) < len(classes):
        warn_once(log, "%s; if they are splits, lay the data out as %s/train/<class>/ (and val/, test/)", said, path)
        return
    raise DataError(f"{said}; lay the data out as {path}/train/<class>/ (and val/, test/), or rename those folders if "
                    "they are images of the class")  # fmt: skip


_NO_FINAL_TEST = "pass --no-final-test to train without scoring it (it is then not read), or move it out of '{}'"


def _test_folder(test_dir: Path, classes: list[str]) -> Dataset:
    _labelled(test_dir, _NO_FINAL_TEST.format(test_dir.parent))
    return scan_folder(test_dir, classes)


def read_test_file(path: Path, classes: list[str], columns: Columns) -> TextDataset:
    """A text dataset's test file, read against the training ``classes``. One of texts without a label column
    (GLUE's and Kaggle's ``test.tsv``) is refused with the way out, as an unlabelled ``test/`` folder is: "name your
    label column" sent the user after a column the file does not have."""
    header = text_csv_header(path, columns)
    if header is not None and not any(c.strip().lower() in columns.names("label") for c in header):
        raise DataError(f"'{path}' holds texts but no label column ({columns.named('label')}), so nothing labels them: "
                        f"{_NO_FINAL_TEST.format(path.parent)}")  # fmt: skip
    return read_text_csv(path, classes, columns)


def _idx_test_count(path: Path) -> int | None:
    """The labels of an IDX directory's test split (10 000 bytes for Fashion-MNIST's), checked against the training
    split's classes: a label past them stopped the run only after it trained, as "label 11 is outside num_classes"."""
    test, train = idx_files(path, "test"), idx_files(path, "train")
    if test is None:
        return None
    labels = labels_of(test[1])
    if train is not None and len(labels):  # the training split's classes, as load_idx names them
        check_test_labels(int(labels.max()), len(split_classes(path, labels_of(train[1]))), test[1])
    return len(labels)


def check_test_split(data: str, *, skip_bad: bool = False, text: Columns | None = None) -> int | None:
    """Check the test folder a run will score at its end, before a recipe's trials or first phase, which do not read
    it: an unlabelled ``test/``, one with a class the training folder lacks, or an unreadable test image stopped the
    run only after them. Its classes and files are listed and each image's header read (the run's data build reads
    them again from the scan's record of sound files); with ``skip_bad`` that build leaves unreadable ones out.
    ``text``: the columns of a text model's split files (the caller found them); its ``test.csv`` is read against
    ``train.csv``'s labels.

    Returns:
        How many images (or texts) the test split holds (a budget leaves time for their scoring), None without one.
    """
    path = Path(data)
    if text is not None:
        splits = split_files(path) or {}
        if "test" in splits:
            return len(read_test_file(splits["test"], read_text_csv(splits["train"], columns=text).classes, text))
        return None
    if not path.is_dir():
        return None
    if is_idx_dir(path):
        return _idx_test_count(path)
    train_dir, test_dir = first_dir(path, TRAIN_DIRS), first_dir(path, TEST_DIRS)
    if train_dir is None or test_dir is None:
        return None
    test = _test_folder(test_dir, folder_classes(train_dir))
    if not skip_bad and unreadable([p for p, _ in test.samples]):  # named with the other folders', if any (the
        # validation folder's were named only by the run's next attempt)
        val_dir = first_dir(path, VAL_DIRS)
        val = [(scan_folder(val_dir), "validation")] if val_dir is not None else []
        check_splits([(scan_folder(train_dir), "training"), *val, (test, "test")], skip_bad=False)
    return len(test)


def _labelled(split: Path, way_out: str) -> None:
    """Refuse a split folder of images without class folders (Kaggle's unlabelled ``test/``): nothing labels them.

    ``way_out``: what the user can do instead."""
    entries = [e for e in split.iterdir() if not is_hidden(e.name)]  # a NAS's @eaDir/ is no class folder either
    if not any(e.is_dir() for e in entries) and any(has_image_suffix(e) for e in entries):
        raise DataError(f"'{split}' holds images but no class folders ({split}/<class>/*), so nothing labels them: "
                        f"{way_out}")  # fmt: skip


def split_files(path: Path) -> dict[str, Path] | None:
    """A text dataset's split files in the folder ``path`` (``train.csv``, and ``val.csv`` and ``test.csv`` when
    there; any name of ``TRAIN_DIRS`` etc., ``.csv``, ``.tsv`` or ``.jsonl``), or None without a training file.

    Raises:
        DataError: two files of one split (``train.csv`` and ``train.jsonl``): the one read was chosen in silence.

    >>> split_files(Path("/nonexistent")) is None
    True
    """
    if not path.is_dir():
        return None
    files = {f.name.lower(): f for f in path.iterdir() if f.is_file() and f.suffix.lower() in TABLE_SUFFIXES}
    found = {}
    for split, names in (("train", TRAIN_DIRS), ("val", VAL_DIRS), ("test", TEST_DIRS)):
        matches = [files[n + ext] for n in names for ext in TABLE_SUFFIXES if n + ext in files]
        if len(matches) > 1:
            raise DataError(f"'{path}' holds {len(matches)} {split} files ({', '.join(f.name for f in matches)}): "
                            "keep one")  # fmt: skip
        if matches:
            found[split] = matches[0]
    return found if "train" in found else None
