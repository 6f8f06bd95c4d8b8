"""A text table (a ``.csv`` or ``.tsv`` whose header names its columns, or a ``.jsonl`` whose objects' keys do:
``data.json_lines``) read row by row: which columns are the text and the label (``Columns``), the rows and the line
each starts on, and the first row that is not a text and its label, named by its line. ``data.text`` builds datasets
and the texts to predict on from these rows.
"""

from __future__ import annotations

import csv
import logging
import shlex
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from freezetune.config.options import LABEL_COLUMNS, TEXT_COLUMNS
from freezetune.data import json_lines
from freezetune.data.utf8 import not_utf8
from freezetune.errors import DataError, choices
from freezetune.model.preprocess import Preprocess
from freezetune.run.log import warn_once

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".tsv", json_lines.JSON_LINES)  # a text table's header (a .jsonl's keys) names its columns


@dataclass(frozen=True)
class Columns:
    """The header names a text CSV's text column and label column may have (any case): the usual ones, or the one a
    run names (``--text-column review --label-column sentiment``, kept in its checkpoints' ``Preprocess``).

    >>> Columns.of(Preprocess(tokenizer="bert", text_column="Review")).text
    ('review',)
    """

    text: tuple[str, ...] = TEXT_COLUMNS
    label: tuple[str, ...] = LABEL_COLUMNS

    @classmethod
    def of(cls, preprocess: Preprocess | None) -> Columns:
        """The columns ``preprocess`` names, the usual names for the others (and for an image model's)."""
        if preprocess is None or not preprocess.is_text:
            return cls()
        return cls.given(preprocess.text_column, preprocess.label_column)

    @classmethod
    def given(cls, text: str | None, label: str | None) -> Columns:
        """The columns a run names (``--text-column``, ``--label-column``; None: the usual names, but the one named
        for the other role: ``--text-column label`` took the usual label column for its labels too, and trained on
        texts that were their own labels).

        >>> Columns.given("label", None).label
        ('class', 'target', 'category', 'y')
        """
        text_name, label_name = (n.strip().lower() if n else None for n in (text, label))
        return cls((text_name,) if text_name else tuple(n for n in TEXT_COLUMNS if n != label_name),
                   (label_name,) if label_name else tuple(n for n in LABEL_COLUMNS if n != text_name))  # fmt: skip

    def names(self, role: str) -> tuple[str, ...]:
        """The names the ``role`` column ("text" or "label") is looked for by; one when the run named it."""
        return self.text if role == "text" else self.label

    def named(self, role: str) -> str:
        """How a message names where the ``role`` column is looked for."""
        names, other = self.names(role), "label" if role == "text" else "text"
        if len(names) == 1:
            return f"'{names[0]}' (--{role}-column)"
        taken = self.names(other)[0] if len(self.names(other)) == 1 else None
        usual = TEXT_COLUMNS if role == "text" else LABEL_COLUMNS
        return f"one of {choices(names)}" + (f" ('{taken}' is the --{other}-column)" if taken in usual else "")


# What a table read as one column holds in its cell instead of the separator its reader splits on, and the fix: a
# tab-separated file named .csv, a spreadsheet's export where the decimal mark is a comma (semicolons)
_OTHER_SEPARATORS = (("\t", "tabs", "name the file .tsv"),
                     (";", "semicolons", "save it comma-separated (.csv) or tab-separated (.tsv)"))  # fmt: skip


def other_separator(row: list[str]) -> tuple[str, str] | None:
    """For a ``row`` read as one column whose cell holds another separator: that separator's name and the way to fix
    the file (image and text tables alike); else None.

    >>> other_separator(["path;label"]), other_separator(["path", "label"])
    (('semicolons', 'save it comma-separated (.csv) or tab-separated (.tsv)'), None)
    """
    if len(row) != 1:
        return None
    return next(((name, fix) for sep, name, fix in _OTHER_SEPARATORS if sep in row[0]), None)


def delimiter(path: Path) -> str:
    """A ``.tsv`` file's cells are separated by tabs (GLUE's ``train.tsv``), a ``.csv`` file's by commas."""
    return "\t" if path.suffix.lower() == ".tsv" else ","


def _reader(f, path: Path, quoting: int = csv.QUOTE_MINIMAL, strict: bool = False):
    """A csv reader of the table ``path``. A text may be as long as a file holds: a document of over 128 KiB made
    the whole file unreadable (the csv module's default field limit; a text is cut at --max-length)."""
    csv.field_size_limit(_FIELD_LIMIT)
    return csv.reader(f, delimiter=delimiter(path), quoting=quoting, strict=strict)


_FIELD_LIMIT = 2**31 - 1  # the largest the csv module takes everywhere (a C long, 32 bits on Windows)


def text_csv_header(path: Path, columns: Columns = Columns()) -> list[str] | None:
    """The header of ``path`` when it names a text column (the file is then a text dataset), else None."""
    header = csv_header(path) or []
    return header if any(c.strip().lower() in columns.text for c in header) else None


def csv_header(path: Path) -> list[str] | None:
    """The first row of the table file ``path`` (``TABLE_SUFFIXES``); None when it is none (a photo is no table, not
    one "not in UTF-8") or cannot be read as one."""
    if not (path.is_file() and path.suffix.lower() in TABLE_SUFFIXES):
        return None
    if path.suffix.lower() == json_lines.JSON_LINES:
        return json_lines.header(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return next(_reader(f, path), [])
    except UnicodeDecodeError:  # it may be a text CSV: "not a text CSV" sent the user after the wrong problem
        raise DataError(not_utf8(path, "CSV")) from None
    except (OSError, csv.Error):
        return None


def read_rows(path: Path,
              columns: Columns = Columns()) -> tuple[list[str], list[list[str]], list[int], list[tuple[int, int]]]:  # fmt: skip
    """The header of a CSV (stripped, lower case), its rows, the line of the file each row starts on (a quoted text
    may span lines), and the (first, last) lines of the rows a quote ran on over (``_run_on``); blank lines are
    skipped. A ``.tsv`` is read as written (``_tsv_parsed``); a ``.jsonl``: its keys and objects
    (``json_lines.read``).

    A double quote left open ran every row up to the next quote into one text, in silence (5 texts trained of 12):
    ``check_rows`` names a CSV's (a quoted text may hold line breaks and commas; ``columns`` finds its label column).
    """
    if path.suffix.lower() == json_lines.JSON_LINES:
        return (*json_lines.read(path), [])
    if delimiter(path) == "\t":
        rows, lines, _ = _tsv_parsed(path, columns)
        run_on = []
    else:
        rows, lines, run_on = _parsed(path, csv.QUOTE_MINIMAL, columns)
    if not rows:
        raise DataError(f"CSV '{path}' is empty; expected a header naming a text and a label column")
    return [c.strip().lower() for c in rows[0]], rows[1:], lines[1:], run_on


def _run_on_said(run_on: list[tuple[int, int]]) -> str:
    shown = ", ".join(f"lines {a}-{b}" for a, b in run_on[:3])
    return (f"{len(run_on)} quoted cell(s) span several lines with a comma on a later one, e.g. {shown}: a double "
            'quote left open ("a stray quote,pos) makes one text of every row up to the next quote; close it, or '
            'quote the whole text ("she said ""hi""",pos)')  # fmt: skip


def _tsv_parsed(path: Path, columns: Columns) -> tuple[list[list[str]], list[int], list[tuple[int, int]]]:
    """``_parsed`` of a ``.tsv``: as written, a double quote a character of its text (GLUE's files are unquoted: a
    text opening with a quote, '"the film" is great', lost its quotes, or ran on over the rows below it); quoted only
    where its quotes are well formed and do work no unquoted cell can (``_quoting_used``: pandas' ``to_csv``)."""
    plain = _parsed(path, csv.QUOTE_NONE, columns)
    if not any('"' in cell for row in plain[0] for cell in row):
        return plain
    try:
        quoted = _parsed(path, csv.QUOTE_MINIMAL, columns, strict=True)
    except csv.Error:  # a quote within a cell ('"the film" is great'), or one never closed: the quotes are text
        return plain
    return quoted if not quoted[2] and _quoting_used(quoted[0], plain[0]) else plain


def _quoting_used(quoted: list[list[str]], plain: list[list[str]]) -> bool:
    """Whether a table read ``quoted`` and without quoting (``plain``) is a quoted one: its header's names are quoted
    (R's ``write.table``, ``quoting=csv.QUOTE_ALL``), or a quoted cell holds a tab, a line break or a doubled quote,
    which only quoting writes (pandas quotes those alone). '"a joy"<TAB>pos' alone is a text in quotes."""
    if all(len(c) > 1 and c[0] == c[-1] == '"' for c in plain[0]):
        return True
    if len(quoted) != len(plain):  # a quoted line break: several lines one row
        return True
    for q_row, p_row in zip(quoted, plain, strict=True):
        if len(q_row) != len(p_row) or any(q != p and '"' in q for q, p in zip(q_row, p_row, strict=True)):
            return True  # a quoted tab split the row unquoted; a quote a quoted cell holds was written doubled
    return False


def _parsed(path: Path, quoting: int, columns: Columns,
            strict: bool = False) -> tuple[list[list[str]], list[int], list[tuple[int, int]]]:  # fmt: skip
    """The non-blank rows of ``path``, the line each starts on, and the (first, last) lines of those whose cells ran
    over rows (``_run_on``).

    Raises:
        csv.Error: ``strict`` and a quote that does not open or close a cell.
    """
    rows, lines, spans = [], [], []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = _reader(f, path, quoting, strict)
            start = 1
            for r in reader:
                if r and any(cell.strip() for cell in r):
                    rows.append(r)
                    lines.append(start)
                    if reader.line_num > start:
                        spans.append((len(rows) - 1, start, reader.line_num))
                start = reader.line_num + 1
    except UnicodeDecodeError:
        raise DataError(not_utf8(path, "CSV")) from None
    except csv.Error as e:
        if strict:
            raise
        raise DataError(f"cannot read CSV '{path}': {e}") from e
    except OSError as e:
        raise DataError(f"cannot read CSV '{path}': {e}") from e
    return rows, lines, _run_on(rows, spans, delimiter(path), columns)


def _run_on(rows: list[list[str]], spans: list[tuple[int, int, int]], sep: str,
            columns: Columns) -> list[tuple[int, int]]:  # fmt: skip
    """The (first, last) lines of the rows of ``spans`` (row index, first line, last line) that a stray quote ran
    together: a later line of one of their cells reads as a whole row of the file, as many cells as the header and its
    label one the file gives elsewhere. A text of several paragraphs, commas and all, has no such line (every such
    text was named as a stray quote). In a table without one label column, whose rows nothing tells apart, a later
    line holding the separator is taken for a row."""
    header = [c.strip().lower() for c in rows[0]] if rows else []
    label = [i for i, c in enumerate(header) if c in columns.label]
    if not spans:
        return []
    if len(label) != 1:  # no label tells a row from a paragraph: a later line holding the separator is suspect
        return [(first, last) for k, first, last in spans
                if any(sep in later for cell in rows[k] for later in cell.split("\n")[1:])]  # fmt: skip
    # each line of a spanning row's cells read as a row, flagged when it is a later line of its cell; a cell's first
    # line counts among the file's rows too: a stray quote's own row ("oops,pos) gives the label its run-on rows have
    read = {k: [(j > 0, cells) for cell in rows[k] for j, line in enumerate(cell.split("\n"))
                if len(cells := _cells(line, sep)) == len(header)]
            for k, _, _ in spans}  # fmt: skip
    i = label[0]
    seen = Counter(r[i].strip() for r in [*rows[1:], *(c for lines in read.values() for _, c in lines)] if len(r) > i)
    return [(first, last) for k, first, last in spans
            if any(later and c[i].strip() and seen[c[i].strip()] > 1 for later, c in read[k])]  # fmt: skip


def _cells(line: str, sep: str) -> list[str]:
    """One line of a cell split as a row of its file."""
    return next(csv.reader([line], delimiter=sep), [])


def column_index(path: Path, header: list[str], role: str, columns: Columns, rows: list[list[str]] = ()) -> int:
    """The index of the ``role`` column in ``header``; ``rows``, the rows under it, tell a first row of data."""
    names = columns.names(role)
    hits = [i for i, c in enumerate(header) if c in names]
    if len(hits) != 1:  # none of the usual names: say how to name the column
        if not hits and (fix := no_header(path, header, rows)):  # naming its columns dropped its first row
            raise DataError(f"{table_kind(path)} '{path}' needs a {role} column named {columns.named(role)}; its "
                            f"{_header_word(path)} {header}: {fix}")  # fmt: skip
        other = f" (or name yours: --{role}-column NAME)" if not hits and len(names) > 1 else ""
        raise DataError(f"{table_kind(path)} '{path}' needs exactly one {role} column named {columns.named(role)}"
                        f"{other}; its {_header_word(path)} {header}{_one_text(path, header, hits, columns)}"
                        f"{_pick_one(header, hits, role)}")  # fmt: skip
    return hits[0]


def _pick_one(header: list[str], hits: list[int], role: str) -> str:
    """The way out of two ``role`` columns (``text`` and ``sentence``): the flag that picks one, or, for one name
    given twice, renaming one."""
    found = list(dict.fromkeys(header[i] for i in hits))
    if len(hits) < 2:
        return ""
    if len(found) < 2:
        return f": it names '{found[0]}' {len(hits)} times; rename all but one"
    return f": pick one: --{role}-column {shlex.quote(found[0])} (or {', '.join(shlex.quote(f) for f in found[1:])})"


def no_header(path: Path, header: list[str], rows: list[list[str]]) -> str | None:
    """How to fix a table whose first row (``header``) is data, not column names: a cell of it is a value its
    column holds in a later row too (a headerless ``text,label`` file's 'pos'); None when it reads as names. Told
    to name its columns after that row, the user had it read as a header, and it was dropped in silence."""
    if path.suffix.lower() == json_lines.JSON_LINES:
        return None
    repeated = [j for j, cell in enumerate(header) if cell.strip() and any(
        len(r) > j and r[j].strip().lower() == cell.strip().lower() for r in rows)]  # fmt: skip
    if not repeated:
        return None
    # a label repeats where a text rarely does: the column of fewest values is the label column
    j = min(repeated, key=lambda k: len({r[k].strip() for r in rows if len(r) > k}))
    sep = "<TAB>" if delimiter(path) == "\t" else ","
    names = ("text", "label")[:: 1 if j else -1] if len(header) == 2 else ("text",) if len(header) == 1 else ()
    example = f", e.g. '{sep.join(names)}'" if names else " (its text and label columns)"
    return (f"it seems to have no header row ({header[j]!r} is in its column in a later row too): add a first line "
            f"naming its columns{example}")  # fmt: skip


def _one_text(path: Path, header: list[str], hits: list[int], columns: Columns) -> str:
    """For a table of one column that names no text column: that its first line may be a text (texts one a line,
    saved as .csv), and the ways to read it as one. A header that names its text column ('text') is one: it lacks
    its label column, and the hint to add a first line 'text' it already had made no sense."""
    if hits or len(header) != 1 or path.suffix.lower() == json_lines.JSON_LINES:
        return ""
    if header[0] in columns.names("text"):
        return (
            ": it holds texts without labels: add a label column ('text,label' rows); to classify texts without "
            "labels, use freezetune predict"
        )
    return (
        ": if that is a text, the file has no header row; add a first line 'text', or give a .txt file, one text a line"
    )


def first_row_is_data(path: Path) -> str | None:
    """``no_header``'s advice for the table file ``path``, read whole; None for a file it cannot read as a table."""
    if path.suffix.lower() == json_lines.JSON_LINES:
        return None
    try:
        tsv = delimiter(path) == "\t"
        rows = (_tsv_parsed(path, Columns()) if tsv else _parsed(path, csv.QUOTE_MINIMAL, Columns()))[0]
    except DataError:
        return None
    return no_header(path, rows[0], rows[1:]) if rows else None


def table_kind(path: Path) -> str:
    """What a text table is called in a message: "CSV" (a ``.tsv`` too), or "JSON Lines file"."""
    return "JSON Lines file" if path.suffix.lower() == json_lines.JSON_LINES else "CSV"


def _header_word(path: Path) -> str:
    return "objects' keys are" if path.suffix.lower() == json_lines.JSON_LINES else "header is"


# what a text can hold and still say nothing: spaces, control and format characters (U+200B), accents on no letter,
# and U+FFFD, where a decoder met a byte it could not read. BERT's tokenizer drops them all (it strips accents when it
# lowercases): such a text was [CLS] [SEP] alone, trained on in silence
_NOTHING = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Mn"})
_REPLACEMENT = "\ufffd"


def blank(text: str) -> bool:
    """Whether ``text`` holds nothing a tokenizer reads: whitespace, control and invisible format characters (a
    zero-width space, U+200B, which ``str.strip`` keeps), combining accents on no letter and U+FFFD replacement
    characters alone. Judged by the characters, not by a tokenizer (texts are read before one is loaded): a byte-level
    BPE (GPT-2) makes tokens of such bytes, which say nothing either.

    >>> blank(" \\u200b\\ufeff "), blank("\\ufffd\\x07\\u0301"), blank("a\\u200b"), blank("e\\u0301")
    (True, True, False, False)
    """
    return all(c.isspace() or c == _REPLACEMENT or unicodedata.category(c) in _NOTHING for c in text)


def check_rows(path: Path, rows: list[list[str]], lines: list[int], cols: dict[str, int], header: list[str], *,
               run_on: list[tuple[int, int]] = (), empty_ok: bool = False) -> None:  # fmt: skip
    """Refuse the first row that is not a text and its label under ``header``, named by its line in the file
    (``empty_ok``: an empty text is one, to predict on: refusing it lost every other row's prediction). The rows a
    quote ran on over (``read_rows``' ``run_on``) are named in the refusal of one of them, else in a warning: the
    warning, then the refusal, were two lines for one mistake."""
    if names := _row_names(path, rows, header):  # every row "a text with a comma": advice that cannot help
        shown = ", ".join(map(repr, names[:3])) + ", ..." * (len(names) > 3)
        raise DataError(f"{table_kind(path)} '{path}': every row has one cell more than the header, first a row "
                        f"number ({shown}): R's row names, which write.table writes unless told not to; write the file "
                        "with write.table(..., row.names = FALSE)")  # fmt: skip
    problems = [(n, p) for n, r in zip(lines, rows, strict=True) if (p := _row_problem(r, cols, header, empty_ok))]
    if problems:  # a quote's run-on said in the same line, where it made this row
        (first, problem), rest = problems[0], problems[1:]
        cause = next((f"; {_run_on_said(run_on)}" for a, b in run_on if a <= first <= b), "")
        raise DataError(f"{table_kind(path)} '{path}' line {first} {problem}{_also(problem, rest)}{cause}")
    if run_on:
        warn_once(log, "CSV '%s': %s", path, _run_on_said(run_on))


_ROWS_NAMED = 10  # the other bad rows a refusal names, at most


def _also(problem: str, rest: list[tuple[int, str]]) -> str:
    """The other bad rows, after the first's ``problem``: each was found only once the one before was mended, a run
    at a time.

    >>> _also("has an empty text: give it one", [(3, "has an empty text: give it one"), (7, "has no label: ...")])
    ' (also line 3: has an empty text; line 7: has no label)'
    >>> _also("has no label: give it one", [(n, "has no label: give it one") for n in range(2, 14)])
    ' (so do lines 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 2 more)'
    """
    if not rest:
        return ""
    more = f" and {len(rest) - _ROWS_NAMED} more" if len(rest) > _ROWS_NAMED else ""
    rest = rest[:_ROWS_NAMED]
    if all(p == problem for _, p in rest):
        return f" (so do line{'s' * (len(rest) > 1)} {', '.join(str(n) for n, _ in rest)}{more})"
    each = [f"line {n}: {_what(p)}" for n, p in rest]
    return f" (also {'; '.join(each)}{more})"


def _what(problem: str) -> str:
    """A row's ``problem`` without the way out, which follows its first ': ' outside brackets.

    >>> _what("has an empty text ('x': only invisible characters): give it a text"), _what("has 2 column(s)")
    ("has an empty text ('x': only invisible characters)", 'has 2 column(s)')
    """
    depth = 0
    for i, c in enumerate(problem):
        depth += (c in "([") - (c in ")]")
        if depth == 0 and problem.startswith(": ", i):
            return problem[:i]
    return problem


def _row_names(path: Path, rows: list[list[str]], header: list[str]) -> list[str]:
    """The first cells of ``rows`` when they are R's row names: a header in quotes, as ``write.table`` writes it
    (without a name for the row names: an id column's numbers before texts with commas are no row names), every row
    one cell wider than it, those cells distinct whole numbers; else []."""
    firsts = [r[0].strip() for r in rows if len(r) == len(header) + 1]
    if not rows or len(firsts) < len(rows) or not all(f.isascii() and f.isdigit() for f in firsts):
        return []
    return firsts if len(set(firsts)) == len(firsts) and _header_quoted(path) else []


def _header_quoted(path: Path) -> bool:
    """Whether the first line of the table ``path`` quotes each of its names (R's ``write.table``)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            line = next((line for line in f if line.strip()), "").rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return False
    return all(len(c) > 1 and c[0] == c[-1] == '"' for c in line.split(delimiter(path)))


def _row_problem(row: list[str], cols: dict[str, int], header: list[str], empty_ok: bool) -> str | None:
    """What is wrong with one data row, in words, or None."""
    for role, i in cols.items():
        if len(row) <= i:
            return f"has {len(row)} column(s); its {role} is column {i + 1}"
        if problem := json_lines.nested_problem(row[i], header[i], role):
            return problem
    width = len(header)
    if len(row) > width:  # "boring, long and dull,neg" read as the text "boring" of a class "long and dull"
        return (
            f"has {len(row)} columns, the header {width}: a text with a comma (a tab in a .tsv) must be in double quotes "
            '("boring, long and dull",neg)'
        )
    if blank(text := row[cols["text"]]) and not empty_ok:  # it trains the model on nothing but its special tokens
        held = f" ({text!r:.30}: only invisible, control or replacement characters, lone accents)" * bool(text.strip())
        return f"has an empty text{held}: give it a text or remove the row"
    return None if "label" not in cols or row[cols["label"]].strip() else "has no label: give it one or remove the row"
