"""Image CSV files: ``path,label`` rows (a header optional, its column names read; without one, ``label,path`` rows
are told by where the first row's image is), paths relative to the CSV's folder, labels matched to classes by name
as folder names are (``folder.py``). A ``.tsv`` file's columns are separated by tabs, as a text table's are."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from freezetune.config.options import LABEL_COLUMNS
from freezetune.data.folder import IMAGE_EXTENSIONS, FileImageDataset
from freezetune.data.json_lines import JSON_LINES
from freezetune.data.labels import nfc, sorted_labels, warn_similar_labels
from freezetune.data.text_table import other_separator
from freezetune.data.utf8 import not_utf8
from freezetune.errors import DataError, choices
from freezetune.run.log import warn_once

log = logging.getLogger(__name__)

IMAGE_COLUMNS = {"path", "file", "filename", "filepath", "image", "image_path", "img"}  # an image CSV's header
_CSV_LABEL_NAMES = set(LABEL_COLUMNS)  # the label column names a text CSV takes


def read_csv(path: str | Path, classes: list[str] | None = None, *, missing_ok: bool = False) -> FileImageDataset:
    """Read a ``path,label`` CSV (optional header); relative paths are relative to the CSV's folder.

    Args:
        path: the CSV file.
        classes: class list to index against (e.g. the train classes when reading val); defaults to the CSV's sorted
            unique labels.
        missing_ok: keep the rows of missing files (``--skip-bad``: the pre-scan leaves them out, named).

    Raises:
        DataError: unreadable CSV, malformed row, image file missing, or a label not in ``classes``.

    >>> read_csv("labels.csv").classes  # doctest: +SKIP
    ['cat', 'dog']
    """
    path = Path(path)
    if path.suffix.lower() == JSON_LINES:  # read as a CSV, its objects were rows of one cell: a row error, far off
        raise DataError(f"'{path}' is a JSON Lines file, which a text model reads (objects naming a text and a "
                        "label); an image model reads a 'path,label' CSV or TSV, an image folder or an IDX "
                        "directory")  # fmt: skip
    # as class folders' names are (scan_folder); a split column is the training CSV's to warn of (it trains every row)
    rows = [(p, nfc(label)) for p, label in _read_csv_rows(path, training=classes is None)]
    if classes is None:
        classes = sorted_labels({label for _, label in rows})
        warn_similar_labels(path, classes)
    classes = list(classes)
    index = {nfc(c): i for i, c in enumerate(classes)}
    unknown = sorted({label for _, label in rows if label not in index})
    if unknown:
        raise DataError(
            f"CSV '{path}' has label(s) {choices(unknown)} that are not training classes: {choices(classes)}"
        )
    files = [(path.parent / p) if not Path(p).is_absolute() else Path(p) for p, _ in rows]
    missing = [(str(f), cell) for f, (cell, _) in zip(files, rows, strict=True) if not f.is_file()]
    if missing and not missing_ok:
        slashes = "; its paths are written with backslashes (Windows'): write them with /" if "\\" in missing[0][1] \
            and os.sep == "/" else ""  # fmt: skip
        folders = [f for f, _ in missing if os.path.isdir(f)]  # "missing" named a folder that is there
        if folders:
            raise DataError(f"CSV '{path}' lists {len(folders)} folder(s) where an image file belongs, first: "
                            f"'{folders[0]}': a row names one image; to read a folder of class folders give it as "
                            "--data")  # fmt: skip
        raise DataError(f"CSV '{path}' lists {len(missing)} missing image file(s), first: '{missing[0][0]}' (relative "
                        f"paths are read from the CSV's folder, {str(path.parent)!r}){slashes}; --skip-bad leaves them "
                        "out")  # fmt: skip
    return FileImageDataset([(str(f), index[label]) for f, (_, label) in zip(files, rows, strict=True)], classes)


_SAMPLED_ROWS = 20  # the rows of a headerless CSV whose files say which column holds the images


def _is_header(row: list[str], base: Path) -> bool:
    # A header names its columns; a data row's first cell is an image that exists.
    named = any(cell.strip().lower() in IMAGE_COLUMNS | _CSV_LABEL_NAMES for cell in row)
    return named and not _exists(row[0], base)


def _exists(cell: str, base: Path) -> bool:
    return (base / cell.strip()).is_file()


def _csv_columns(path: Path, header: list[str] | None, rows: list[list[str]]) -> tuple[int, int]:
    """The (path, label) column indices: by header name, or the two columns of a headerless ``path,label`` file, read
    as ``label,path`` when more of its first rows (``_SAMPLED_ROWS``) have their image in the second column (the
    first row alone took a missing first image for a ``label,path`` file: every path became a class)."""
    first = rows[0]
    width = len(first)
    if header is None:
        if separator := other_separator(first):  # "has 1 columns and no header" for a file with both
            raise DataError(f"CSV '{path}' has its columns separated by {separator[0]} ({first[0]!r}): {separator[1]}")
        if width != 2:
            one = " (a .csv is read comma-separated, a .tsv tab-separated)"
            sep = one if width == 1 else ""
            raise DataError(f"CSV '{path}' has {width} columns{sep} and no header; add a header naming the image column "
                            f"({choices(sorted(IMAGE_COLUMNS))}) and the label column "
                            f"({choices(sorted(_CSV_LABEL_NAMES))})")  # fmt: skip
        sampled = [r for r in rows[:_SAMPLED_ROWS] if len(r) == 2]
        found = [sum(_exists(r[i], path.parent) for r in sampled) for i in (0, 1)]
        return (1, 0) if found[1] > found[0] else (0, 1)  # "label,path" rows: their files are in the second column
    names = [c.strip().lower() for c in header]
    found = {}
    for role, allowed in (("image", IMAGE_COLUMNS), ("label", _CSV_LABEL_NAMES)):
        hits = [i for i, n in enumerate(names) if n in allowed]
        if len(hits) != 1:
            what = "no" if not hits else "more than one"
            raise DataError(f"CSV '{path}' header {header!r} has {what} {role} column; name exactly one of "
                            f"{choices(sorted(allowed))}")  # fmt: skip
        found[role] = hits[0]
    return found["image"], found["label"]


# a column that assigns rows to splits (Kaggle's "split", fastai's "is_valid"): not read, so its test rows trained
SPLIT_COLUMNS = ("split", "set", "subset", "fold", "partition", "is_valid", "is_test")


def _warn_split_column(path: Path, header: list[str] | None) -> None:
    named = [c.strip() for c in header or () if c.strip().lower() in SPLIT_COLUMNS]
    if named:
        warn_once(log, "CSV '%s' has a '%s' column, which freezetune does not read: every row trains, its test and "
                  "validation rows too; give those rows in CSVs of their own (--val-data val.csv; freezetune eval "
                  "--data test.csv scores a test CSV)", path, named[0])  # fmt: skip


def _read_csv_rows(path: Path, *, training: bool = False) -> list[tuple[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")  # a list as a text table
            # each row with its line in the file (a quoted cell may span lines), for messages
            numbered = [(reader.line_num, r) for r in reader if r and any(cell.strip() for cell in r)]
    except UnicodeDecodeError:
        raise DataError(not_utf8(path, "CSV")) from None
    except (OSError, csv.Error) as e:
        raise DataError(f"cannot read CSV '{path}': {e}") from e
    rows = [r for _, r in numbered]
    header = rows[0] if rows and _is_header(rows[0], path.parent) else None
    if (header is None and len(rows) > 1 and not _exists(rows[0][0], path.parent) and _exists(rows[1][0], path.parent)
            and not rows[0][0].strip().lower().endswith(IMAGE_EXTENSIONS)):  # fmt: skip
        # a header of other names ("image_id,species"): named as such, not a missing image; a first cell named like
        # an image file is a missing image (its row was read as a header "with no image column", --skip-bad or not)
        header = rows[0]
    if header is not None:
        rows, numbered = rows[1:], numbered[1:]
    if not rows:
        raise DataError(f"CSV '{path}' has no rows; expected lines of 'path,label'")
    image, label = _csv_columns(path, header, rows)
    if training:
        _warn_split_column(path, header)
    need = max(image, label) + 1
    bad = next(((n, r) for n, r in numbered if len(r) < need or not r[image].strip() or not r[label].strip()), None)
    if bad is not None:
        raise DataError(f"CSV '{path}' line {bad[0]} is {bad[1]!r}; expected an image path and a label")
    # a cell past the header's (an empty one aside): an unquoted comma cut a label ("Persian, cat" read as "Persian")
    width = len(header) if header is not None else 2
    wide = next(((n, r) for n, r in numbered if any(c.strip() for c in r[width:])), None)
    if wide is not None:
        expected = f"the header {width}" if header is not None else "a 'path,label' row 2"
        raise DataError(f"CSV '{path}' line {wide[0]} has {len(wide[1])} fields, {expected}: a path or label with a "
                        'comma must be in double quotes ("Persian, cat")')  # fmt: skip
    return [(r[image].strip(), r[label].strip()) for r in rows]
