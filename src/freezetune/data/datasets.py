"""Datasets of a run: IDX (MNIST-style), image folders and CSV files, with seeded splits and few-shot subsets.

``build_datasets`` turns one ``--data`` path into train/val/test datasets with the right transforms;
``build_eval_dataset`` reads the data a trained model is evaluated on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from freezetune.config.options import (
    AUG_DEFAULT,
    fraction_problem,
    positive_int_problem,
    validation_source_problem,
)
from freezetune.data import json_lines
from freezetune.data.coverage import check_every_class_trains
from freezetune.data.folder import FileImageDataset, is_skipped_folder, scan_folder
from freezetune.data.idx import check_test_labels, idx_files, idx_pair_problem, is_idx_dir, load_idx, name_labels_as
from freezetune.data.image_csv import read_csv
from freezetune.data.kind import check_kind, is_text_table
from freezetune.data.labels import nfc
from freezetune.data.layout import (
    TEST_DIRS,
    TRAIN_DIRS,
    VAL_DIRS,
    first_dir,
    load_folder,
    read_test_file,
    split_files,
    warn_own_validation_unused,
)
from freezetune.data.overlap import check_listed_once, check_overlap, warn_copies
from freezetune.data.scan import check_images, check_splits
from freezetune.data.text import TextDataset, noun, read_text_csv
from freezetune.data.text_key import TextKey
from freezetune.data.text_table import (
    TABLE_SUFFIXES,
    Columns,
)
from freezetune.data.transforms import eval_transform, train_transform
from freezetune.data.validation import resolve_validation
from freezetune.errors import ConfigError, DataError, choices, setting
from freezetune.model.preprocess import Preprocess
from freezetune.training.progress import NOT_HELD_OUT

log = logging.getLogger(__name__)

_EXPECTED = (
    "an IDX directory (train-images-idx3-ubyte[.gz], ...), an image folder (DIR/<class>/*) or a CSV or TSV file "
    "('path,label' rows; a text model's: 'text,label', a JSON Lines file of such objects (.jsonl), or a folder of "
    "train.csv, val.csv, test.csv)"
)


@dataclass
class DataBundle:
    """The datasets of one run; ``classes[i]`` is the name of label ``i`` in all three."""

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    classes: list[str]
    source: str  # "idx" | "folder" | "csv" | "text"
    val_source: str = ""  # where the validation set came from, in words (the trainer prints it)
    skipped: list[str] = field(default_factory=list)  # unreadable image files left out (``skip_bad``)
    # why ``refit`` may not train on the validation set too, in words; "" when it may (the automatic hold-out)
    no_refit: str = NOT_HELD_OUT

    @property
    def refit_fits(self) -> bool:
        return not self.no_refit


def check_paths_exist(data: str | None, val_data: str | None = None) -> None:
    """Refuse a data (or validation data) path that does not exist, in one line (a sweep's before its folder is made;
    a run's and an evaluation's before anything is read)."""
    for what, given in (("data", data), ("val data", val_data)):
        if given is not None and not Path(given).exists():
            raise DataError(f"{what} path '{given}' does not exist; expected {_EXPECTED}")
        if given is not None and not Path(given).is_file() and not Path(given).is_dir():  # "Not a directory (...)"
            raise DataError(f"{what} path '{given}' is neither a file nor a folder (a device, or a pipe such as "
                            "/dev/stdin): data is read more than once; save it to a file and give that")  # fmt: skip


def _load_source(data: str, preprocess: Preprocess, *, read_test: bool = True, read_val: bool = True,
                 skip_bad: bool = False) -> tuple[str, Dataset, Dataset | None, Dataset | None, bool]:  # fmt: skip
    """Read ``data`` without transforms: (source, train, val given by the layout or None, test or None, whether the
    data has a test split). ``read_test``: read the test split (not for a run that does not score it: a broken or
    unlabelled test file must not stop it); ``read_val``: the layout's validation folder (not when ``--val-data``
    replaces it). ``skip_bad``: a CSV's missing files are left to the pre-scan, which leaves them out as it does
    unreadable ones."""
    path, columns = Path(data), Columns.of(preprocess)
    check_paths_exist(data)
    _check_shape(data)
    if path.is_file():
        if is_text_table(path, preprocess):
            return "text", read_text_csv(path, columns=columns), None, None, False
        return "csv", read_csv(path, missing_ok=skip_bad), None, None, False
    splits = split_files(path)
    if splits is not None and is_text_table(splits["train"], preprocess):  # train.csv, and val.csv and test.csv
        train = read_text_csv(splits["train"], columns=columns)
        val = read_text_csv(splits["val"], train.classes, columns) if "val" in splits and read_val else None
        test = read_test_file(splits["test"], train.classes, columns) if "test" in splits and read_test else None
        return "text", train, val, test, "test" in splits
    if splits is not None and first_dir(path, TRAIN_DIRS) is None:  # read as class folders: 'imgs' the one class
        _image_split_files(path, splits, evaluating=False)
    if is_idx_dir(path):
        has_test = bool(idx_files(path, "test"))
        train = load_idx(path, "train")
        test = load_idx(path, "test") if has_test and read_test else None
        if test is not None and len(test.targets):
            check_test_labels(int(test.targets.max()), len(train.classes), idx_files(path, "test")[1])
        return "idx", train, None, test, has_test
    return ("folder", *load_folder(path, read_val=read_val, read_test=read_test))


def _image_split_files(path: Path, splits: dict[str, Path], *, evaluating: bool) -> None:
    """Refuse a folder of image CSVs, one a split (``train.csv``, ``val.csv``, ``test.csv`` beside the images' folder,
    as Kaggle lays them out), without a ``train/`` folder: it was read as class folders, and the images' folder as
    the only class. An image model reads one CSV a ``--data``: which to give is said."""
    if evaluating:
        way = f"--data {splits.get('test') or splits.get('val') or splits['train']}"
    else:
        val = f" --val-data {splits['val']}" if "val" in splits else ""
        test = f" (and to score its test split: freezetune eval --data {splits['test']})" if "test" in splits else ""
        way = f"--data {splits['train']}{val}{test}"
    raise DataError(f"'{path}' holds the split files {', '.join(f.name for f in splits.values())} and no train/ "
                    f"folder: an image model reads one 'path,label' CSV a --data, not a folder of them; give {way}")  # fmt: skip


def _check_shape(data: str, hint: str = "") -> None:
    """A file given as data is a table (an image read as a CSV was "not UTF-8"); a directory holding one file of the
    train IDX pair lacks the other (it was read as an image folder without class folders)."""
    path = Path(data)
    if path.is_file() and path.suffix.lower() not in TABLE_SUFFIXES:
        lines = f" ({json_lines.RENAME})" if json_lines.misnamed(path) else ""
        raise DataError(f"data file '{data}' is not a CSV, TSV or JSON Lines file{lines}; expected {_EXPECTED}{hint}")
    if problem := idx_pair_problem(path):
        raise DataError(f"'{data}' {problem}")


def _load_val(val_data: str, classes: list[str], preprocess: Preprocess, *, skip_bad: bool = False) -> Dataset:
    """Read explicit validation data (CSV, class folder or IDX directory's test split) against the train classes."""
    path = Path(val_data)
    check_paths_exist(None, val_data)
    if path.is_file():
        if is_text_table(path, preprocess):
            return read_text_csv(path, classes, Columns.of(preprocess))
        return read_csv(path, classes, missing_ok=skip_bad)
    if is_idx_dir(path):  # its labels are positions: matched to the training classes by name, as eval's are (they
        # were taken by position: a folder's alphabetical "Ankle boot" was validated as the IDX's label 0, "T-shirt")
        val = load_idx(path, "test" if idx_files(path, "test") else "train")
        name_labels_as(val, classes, path, known_by="the training data")
        return val
    _not_a_root(path, classes)
    return scan_folder(path, classes)


def _not_a_root(path: Path, classes: list[str]) -> None:
    """Refuse ``--val-data`` naming a dataset's root (its ``train/``, ``val/``, ``test/`` read as unknown classes),
    with its validation folder to give instead: never its test folder, which must not pick the model."""
    known = {nfc(c) for c in classes}
    found = {names: first_dir(path, names) for names in (TRAIN_DIRS, VAL_DIRS, TEST_DIRS)}
    splits = [d.name for d in found.values() if d is not None and nfc(d.name) not in known]
    if not splits:
        return
    val = found[VAL_DIRS]
    way = f"give its validation folder: --val-data {val}" if val is not None else "give a folder of class folders"
    raise DataError(f"val data '{path}' holds split folders ({', '.join(f'{s}/' for s in splits)}), not class "
                    f"folders: {way}")  # fmt: skip


def _scan(train: Dataset, val: Dataset | None, test: Dataset | None, skip_bad: bool,
          say: Callable[[str], None] | None = None) -> tuple[Dataset, ...]:  # fmt: skip
    """Every split's image files checked before any is split or trained on: (train, val, test, skipped paths)."""
    checked, skipped = check_splits([(train, "training"), (val, "validation"), (test, "test")], skip_bad=skip_bad,
                                    say=say)  # fmt: skip
    check_overlap(checked[0], {"validation": checked[1], "test": checked[2]})
    warn_copies(checked[0], {"validation": checked[1], "test": checked[2]})
    return (*checked, skipped)


def _check_options(val_data: str | None, val_split: float | None, per_class: int | None) -> None:
    problems = [validation_source_problem(val_data, val_split)]
    if val_split is not None:
        problems.append(fraction_problem("val_split", val_split))
    if per_class is not None:
        problems.append(positive_int_problem("per_class", per_class))
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("; ".join(problems))


def build_datasets(
    data: str,
    *,
    val_data: str | None = None,
    val_split: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
    preprocess: Preprocess,
    aug: str = AUG_DEFAULT,
    skip_bad: bool = False,
    refit: bool = False,
    refit_follows: bool = False,
    final_test: bool = True,
    say: Callable[[str], None] | None = None,
) -> DataBundle:
    """Build train/val/test datasets from one data path, with train augmentation and eval transforms.

    ``data`` may be an IDX directory (MNIST/Fashion-MNIST files), an image folder (``DIR/train/<class>/*`` plus
    optional ``DIR/val|valid|validation/<class>/*`` and ``DIR/test/<class>/*``, or just ``DIR/<class>/*``), or a
    ``path,label`` CSV file (the train set); for a text model (``preprocess.tokenizer`` set), a ``text,label`` CSV.

    Validation data, first rule that applies:
        1. ``val_data`` (a CSV, a ``DIR/<class>/*`` folder, or an IDX directory's test split);
        2. a ``val/`` folder in the layout (``val_split`` beside it is refused);
        3. a seeded stratified ``val_split`` fraction of the train set, taken *before* ``per_class``;
        4. otherwise a held-out part of the train set: ``AUTO_VAL_FRACTION`` (10 %) of each class, at least one and at
           most ``AUTO_VAL_MAX_PER_CLASS`` (50) per class (a class of one image gives none), taken before
           ``per_class``. The test split is never validation data: model selection, unfreezing, early stopping and
           the auto recipe see only the validation set, and the test split is scored once, at the end.
    ``DataBundle.val_source`` says which rule gave the validation set.

    ``per_class`` keeps K random training images per class (all of a class with fewer, logged as a warning). It is
    drawn from what remains after the val split, so val and train never share an image.

    Args:
        data: dataset path (see above).
        val_data: explicit validation data; cannot be combined with ``val_split``.
        val_split: fraction of each train class held out for validation, in (0, 1).
        per_class: few-shot subsample size per class for the train set.
        seed: seeds the val split and the few-shot subsample.
        preprocess: the model's input preprocessing (size, mean/std, ...).
        aug: training augmentation preset, one of ``AUG_PRESETS``.
        refit: validation held out automatically (rule 4) trains too, after ``per_class``: the training set is then
            what the auto recipe's trials trained on plus what they were scored on, and there is no validation set.
        refit_follows: a later run refits what rule 4 holds out here (the auto recipe's trials): a class short of
            ``per_class`` by its held-out share alone is noted, not warned of.
        skip_bad: leave out image files whose header cannot be read (listed in ``DataBundle.skipped``) instead of
            refusing the data.
        final_test: whether the run scores the test split at the end (what ``val_source`` says of it).
        say: told of a long check of image files before it starts (``scan.unreadable``), where there is one.

    Raises:
        DataError: a path is missing or holds no usable data, an image file is unreadable (without ``skip_bad``), or
            the data does not fit the model (a text CSV for an image model, anything else for a text model).
        ConfigError: bad ``aug``, ``val_split`` or ``per_class``, or both ``val_data`` and ``val_split``.

    >>> bundle = build_datasets("/usr/share/datasets/fashion-mnist", per_class=10,
    ...                         preprocess=Preprocess(input_size=32))  # doctest: +SKIP
    >>> len(bundle.train), len(bundle.val), bundle.classes[0]  # doctest: +SKIP
    (100, 1000, 'T-shirt/top')
    """
    # Check every option before reading data: loading a large IDX set only to fail on a typo wastes the user's time.
    _check_options(val_data, val_split, per_class)
    check_kind(data, preprocess)
    if val_data is not None:
        check_kind(val_data, preprocess, "val data")
    train_tf, eval_tf = train_transform(preprocess, aug), eval_transform(preprocess)
    source, train, val, test, has_test = _load_source(data, preprocess, read_test=final_test,
                                                      read_val=val_data is None, skip_bad=skip_bad)  # fmt: skip
    if val_data is not None:
        val = _load_val(val_data, train.classes, preprocess, skip_bad=skip_bad)
        warn_own_validation_unused(data, val_data)
    elif val is not None and val_split is not None:  # ignored with a warning, the run validated on what was not asked
        kind = "file" if source == "text" else "folder"
        raise ConfigError(f"'{data}' has a validation {kind} of its own, which is its validation set: give "
                          f"{setting('val_split', val_split)} only for data without one, not both")  # fmt: skip
    if preprocess.tokenizer:  # copies are what the model reads as one input (an uncased one's "A JOY" is "a joy")
        for ds in (train, val, test):
            if isinstance(ds, TextDataset):
                ds.same_as = TextKey(preprocess.tokenizer)
    train, val, test, skipped = _scan(train, val, test, skip_bad, say)
    check_every_class_trains(data, train, skipped)
    train, val, val_source, no_refit = resolve_validation(
        train,
        val,
        val_data=val_data,
        val_split=val_split,
        per_class=per_class,
        seed=seed,
        refit=refit,
        refit_follows=refit_follows,
        test="" if not has_test else "only scored at the end" if final_test else "not used",
    )
    present = sorted({int(t) for t in train.targets.tolist()})
    if len(present) < 2:
        raise DataError(f"'{data}' has training {noun(train)} of {len(present)} class(es) "
                        f"({choices([train.classes[c] for c in present])}); a classifier needs at least two")  # fmt: skip
    _prepare(train, train_tf, preprocess)
    for ds in (val, test):
        if ds is not None:
            _prepare(ds, eval_tf, preprocess)
    log.info(
        "%s data: %d train, %s val, %s test %s, %d classes",
        source,
        len(train),
        len(val) if val is not None else "no",
        len(test) if test is not None else "no",
        noun(train),
        len(train.classes),
    )
    return DataBundle(train=train, val=val, test=test, classes=list(train.classes), source=source,
                      val_source=val_source, skipped=skipped, no_refit=no_refit)  # fmt: skip


def build_eval_dataset(data: str, *, preprocess: Preprocess, classes: list[str], skip_bad: bool = False,
                       text_column_given: bool = False) -> Dataset:  # fmt: skip
    """The evaluation set of ``data`` for a trained model: an IDX test split, a ``test/`` (else ``val/``) folder,
    or the whole folder/CSV; for a text model (``preprocess.tokenizer`` set) a ``text,label`` CSV. Labels are checked
    against the model's ``classes``.

    The dataset's ``source`` attribute says, in words, which split or files it holds (``eval`` prints it), and how
    many unreadable image files ``skip_bad`` left out (as a run's ``--skip-bad`` did: its test score is then
    reproduced); without it they are refused. ``text_column_given``: the text column is the one the command names
    (``--text-column``), not the checkpoint's: a header without it is told so.

    Folder and CSV labels are class names, matched by name: data may hold fewer classes than the model, never one
    it does not know. IDX labels are positions, named by the directory's ``classes.txt`` (else the Fashion-MNIST or
    digit names ``idx_class_names`` gives), and matched by those names (``name_labels_as``).

    Raises:
        DataError: the path is missing or unreadable, does not fit the model (text for an image model or the other
            way round), or its class names differ from ``classes`` as above.

    >>> build_eval_dataset("/usr/share/datasets/fashion-mnist", preprocess=Preprocess(32),
    ...                    classes=[str(i) for i in range(10)])  # doctest: +SKIP
    """
    path = Path(data)
    check_paths_exist(data)
    _check_shape(data, "; to classify files without labels, use freezetune predict")
    check_kind(data, preprocess, flags=text_column_given)
    if preprocess.is_text:  # a text CSV: its texts are tokenized per batch, they take no transform
        splits = split_files(path) or {}
        split = splits.get("test") or splits.get("val")
        if path.is_dir() and split is None:
            raise DataError(f"'{data}' has {splits['train'].name} but no test or val file to evaluate on")
        ds = read_text_csv(split or path, classes, Columns.of(preprocess))
        ds.source = f"the {split.name} file of {path}" if split is not None else f"every row of {path}"
        return ds
    if path.is_dir() and is_idx_dir(path):
        split = "test" if idx_files(path, "test") else "train"
        ds = load_idx(path, split)
        source = f"the {split} split of the IDX directory {path}"
        name_labels_as(ds, classes, path)
    elif path.is_dir() and (first_dir(path, TRAIN_DIRS) is not None or _splits_only(path, classes)):
        # test/ beside val/ is the usual layout, not two names of one split to warn of (eval says what it read)
        split = first_dir(path, TEST_DIRS) or first_dir(path, VAL_DIRS)
        if split is None:
            raise DataError(f"'{data}' has train/ but no test/ or val/ folder to evaluate on")
        ds, source = scan_folder(split, classes), f"the {split.name}/ folder of {path}"
    elif path.is_dir():
        if (splits := split_files(path)) is not None:
            _image_split_files(path, splits, evaluating=True)
        ds, source = scan_folder(path, classes), f"every image under {path}"
    else:
        ds, source = read_csv(path, classes, missing_ok=skip_bad), f"every row of {path}"
    ds, skipped = check_images(ds, "evaluation", skip_bad=skip_bad, hint="fix or remove them, or give --skip-bad")
    check_listed_once(ds, "evaluation")
    _prepare(ds, eval_transform(preprocess), preprocess)
    ds.source = source + (f" ({len(skipped)} unreadable image file(s) left out: --skip-bad)" if skipped else "")
    return ds


def _splits_only(path: Path, classes: list[str]) -> bool:
    """Whether the folder ``path`` holds split folders alone (``test/``, ``val/``: a dataset's without its ``train/``,
    as evaluation wants it), none of them a class of the model: they were read as classes named "test", and the error
    said to rename them to a training class."""
    folders = [d.name for d in path.iterdir() if d.is_dir() and not is_skipped_folder(d.name)]
    known = {nfc(c) for c in classes}
    return bool(folders) and all(f.lower() in (*TEST_DIRS, *VAL_DIRS) and nfc(f) not in known for f in folders)


def _prepare(ds: Dataset, transform, preprocess: Preprocess) -> None:
    """Give ``ds`` its transform and, an image file dataset, the model's rules for transparent pixels and for how
    small a large JPEG may decode."""
    ds.transform = transform
    if isinstance(ds, FileImageDataset):
        ds.alpha, ds.min_side = preprocess.alpha, preprocess.decode_side
