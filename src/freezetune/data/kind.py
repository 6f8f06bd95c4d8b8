"""Which kind of data a path holds for a model: a text table (a CSV, TSV or JSON Lines file of texts and labels, or
a folder of such split files) for a text model, anything else for an image model; a mismatch is refused before
anything is read, naming what the file lacks (``check_kind``)."""

from __future__ import annotations

from pathlib import Path

from freezetune.data import json_lines
from freezetune.data.image_csv import IMAGE_COLUMNS
from freezetune.data.layout import TRAIN_DIRS, split_files
from freezetune.data.text_table import (
    TABLE_SUFFIXES,
    TEXT_COLUMNS,
    Columns,
    csv_header,
    first_row_is_data,
    other_separator,
    table_kind,
    text_csv_header,
)
from freezetune.errors import DataError
from freezetune.model.preprocess import Preprocess


def is_text_table(path: Path, preprocess: Preprocess) -> bool:
    """Whether CSV ``path`` is a text dataset: its header names a text column (by the names ``Columns.of``
    ``preprocess`` gives), and no image column too (a caption beside each image path), in which case the model
    decides."""
    splits = split_files(path)
    if splits is not None:  # a folder of train.csv, val.csv, test.csv: a text dataset if its training file is
        return is_text_table(splits["train"], preprocess)
    header = text_csv_header(path, Columns.of(preprocess))
    if header is None:
        return False
    return preprocess.is_text if IMAGE_COLUMNS & {c.strip().lower() for c in header} else True


def check_kind(data: str, preprocess: Preprocess, what: str = "data", *, flags: bool = True) -> None:
    """A text model reads a text CSV and an image model anything else: a mismatch is named before data is read
    (it would otherwise end in the tokenizer or the image pipeline, far from its cause). ``flags``: the command
    names columns with ``--text-column``/``--label-column`` for this run (train; eval's flags name others than the
    columns the model trained on, its default)."""
    path = Path(data)
    if not path.exists():
        return  # the reader says so, with what it expects
    if is_text_table(path, preprocess) == preprocess.is_text:
        return
    if preprocess.is_text:
        columns = Columns.of(preprocess)
        table = (split_files(path) or {}).get("train", path)  # a folder of split files: its training file's header
        header = csv_header(table)
        fix = _header_fix(table, header, flags, columns) if header else ""
        found = f" (its header: {', '.join(map(repr, header))}: {fix})" if header else ""
        lines = f"; {json_lines.RENAME}" if json_lines.misnamed(path) else _no_train_file(path)
        raise DataError(f"{what} '{data}' is not a text {table_kind(table)}{found}; the model is a text model (tokenizer "
                        f"'{preprocess.tokenizer}') and reads a CSV (or a .jsonl of objects) whose header names a "
                        f"text column ({columns.named('text')}) and a label column ({columns.named('label')})"
                        f"{lines}")  # fmt: skip
    raise DataError(f"{what} '{data}' is a text {table_kind(path)} (it names a text column); the model is an image "
                    "model and reads images (an image folder, an IDX directory or a 'path,label' CSV); text models are "
                    "hf:DIR_OR_ID sequence classifiers")  # fmt: skip


def _no_train_file(path: Path) -> str:
    """What a folder of split files lacks, for a text model: its training file (``val.csv`` and ``test.csv`` alone), or
    that file's name (``train.json``, as Hugging Face datasets' ``to_json`` names it)."""
    if not path.is_dir():
        return ""
    names = sorted(f.name for f in path.iterdir() if f.is_file())
    stems = {Path(n).stem.lower(): n for n in names}
    train = next((stems[t] for t in TRAIN_DIRS if t in stems), None)
    if train is not None and json_lines.misnamed(Path(train)):
        return f"; its {train}: {json_lines.RENAME} {Path(train).stem}.jsonl"
    tables = [n for n in names if Path(n).suffix.lower() in TABLE_SUFFIXES]
    if train is None and tables:
        return (f"; it holds {', '.join(tables)} but no training file: a folder of split files needs a train.csv (or "
                ".tsv, .jsonl) beside them")  # fmt: skip
    return ""


def _header_fix(table: Path, header: list[str], flags: bool, columns: Columns) -> str:
    """What to do about a header that names no text column: the advice must be one the user can follow."""
    if separator := other_separator(header):  # its columns read as one
        return f"its columns are separated by {separator[0]}: {separator[1]}"
    if fix := first_row_is_data(table):  # columns named after a row of data: that row was read as a header, and lost
        return fix
    if flags and len(columns.text) == 1:  # named already: "name its columns with --text-column" told them nothing
        return f"it has no column '{columns.text[0]}', which --text-column names"
    named = {c.strip().lower() for c in header}
    if flags and len(columns.label) == 1 and columns.label[0] in named and columns.label[0] in TEXT_COLUMNS:
        # --label-column text: its texts' column taken for the labels, none left for the texts ("name its columns")
        return (f"--label-column '{columns.label[0]}' names the column its texts would be read from, which leaves "
                "none for them: name the labels' column with --label-column, or the texts' with --text-column")  # fmt: skip
    if flags:
        return "name its columns with --text-column and --label-column"
    return "name its columns with --text-column and --label-column, or rename them to those the model trained on"
