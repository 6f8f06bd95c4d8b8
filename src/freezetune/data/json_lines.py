"""A JSON Lines file (``.jsonl``: one JSON object a line, as Hugging Face ``datasets``' ``to_json`` and pandas'
``to_json(orient="records", lines=True)`` write them) read as a text table: the objects' keys are its header, each
object a row, so a text dataset reads it as it reads a CSV (``data.text_table.read_rows``).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from freezetune.data.utf8 import not_utf8
from freezetune.errors import DataError

JSON_LINES = ".jsonl"
RENAME = "one JSON object a line is read from a .jsonl file: rename it"


def misnamed(path: Path) -> bool:
    """Whether ``path`` is a ``.json`` file, which Hugging Face ``datasets``' ``to_json("x.json")`` writes as JSON
    Lines: it is read by the name ``.jsonl`` alone (``RENAME`` says so)."""
    return path.suffix.lower() == ".json"


_EXAMPLE = '{"text": "a joy to watch", "label": "pos"}'


def header(path: Path) -> list[str] | None:
    """The keys of the objects of ``path`` (as ``read`` gives them); None when it is no file.

    Raises:
        DataError: as ``read`` (a .jsonl is one by its name: its problems are named, not read as "not a table").

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "t.jsonl"; _ = p.write_text('{"text": "hi", "label": 1}\\n')
    >>> header(p)
    ['text', 'label']
    """
    try:
        return read(path)[0]  # every object's keys: a first object of other keys ({"id": 0}) is no header
    except DataError:
        if not path.is_file():
            return None
        raise


def read(path: Path) -> tuple[list[str], list[list[str]], list[int]]:
    """``path``'s keys (stripped, lower case, in the order they first appear), its rows (each object's values under
    them: a number or ``true`` as written, a missing key or ``null`` empty), and the line each row is on; blank lines
    are skipped. The lists are shared with later calls on the unchanged file: read them, do not change them.

    Raises:
        DataError: the file cannot be read, is not UTF-8, holds no object, or a line that is not one JSON object
            (named by its line).

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "t.jsonl"
    >>> _ = p.write_text('{"Text": "fine", "label": 1}\\n\\n{"label": 0, "text": "bad", "id": 7}\\n')
    >>> read(p)
    (['text', 'label', 'id'], [['fine', '1', ''], ['bad', '0', '7']], [1, 3])
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read JSON Lines file '{path}' ({e})") from e
    # a dataset's load asks for its header twice (its kind, its columns) before its rows: each was a parse of the
    # whole file (a header is every object's keys), 3 in all. The last file parsed is kept, by its bytes' digest (a
    # file rewritten within a clock tick keeps its mtime): hashing takes a small share of a parse
    key = (str(path.resolve()), hashlib.blake2b(data, digest_size=16).digest())
    if _last[0] != key:
        _last[:] = [key, _parse(path, data)]
    return _last[1]


_last: list = [None, None]  # the last file ``read`` parsed: its path and digest, and what it holds


def _parse(path: Path, data: bytes) -> tuple[list[str], list[list[str]], list[int]]:
    """``read`` of a file, from its bytes ``data``."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(not_utf8(path, "JSON Lines file")) from None
    objects, lines = [], []
    for number, line in enumerate(io.StringIO(text, newline=None), 1):  # lines as a file opened as text gives them
        if line.strip():
            objects.append(_object(path, number, line))
            lines.append(number)
    if not objects:
        raise DataError(f"JSON Lines file '{path}' is empty; expected one JSON object a line, e.g. {_EXAMPLE}")
    columns: dict[str, int] = {}
    at: dict[tuple, list[int]] = {}  # each object's keys in order, as column indices (most objects share one order)
    for number, obj in zip(lines, objects, strict=True):
        if (order := tuple(obj)) not in at:
            at[order] = _columns(path, number, obj, columns)
    rows = []
    for obj in objects:
        row = [""] * len(columns)
        for i, value in zip(at[tuple(obj)], obj.values(), strict=True):
            row[i] = _cell(value)
        rows.append(row)
    return list(columns), rows, lines


def _columns(path: Path, number: int, obj: dict, columns: dict[str, int]) -> list[int]:
    """The column of each of ``obj``'s keys (on line ``number``), added to ``columns`` as they first appear.

    Raises:
        DataError: two keys that differ only in case or spaces.
    """
    names = [k.strip().lower() for k in obj]
    if len(set(names)) < len(names):  # {"Text": "A", "text": "a"}: one column, one of them lost in silence
        twins = sorted(k for k in obj if names.count(k.strip().lower()) > 1)
        raise DataError(f"JSON Lines file '{path}' line {number} has keys {twins}, which name one column "
                        "(keys are read case-insensitively, as a CSV header): keep one")  # fmt: skip
    return [columns.setdefault(name, len(columns)) for name in names]


def _object(path: Path, number: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except ValueError as e:
        problem = f"is not JSON ({e})"
        if number == 1 and line.strip().startswith("["):  # one JSON array over the whole file (json.dump's)
            problem = "opens one JSON array over the file: write one object a line (jq -c '.[]' in.json > out.jsonl)"
        raise DataError(f"JSON Lines file '{path}' line {number} {problem}; expected one object a line, e.g. "
                        f"{_EXAMPLE}") from None  # fmt: skip
    if isinstance(obj, list) and number == 1:  # a JSON array of objects on one line (json.dumps's)
        raise DataError(f"JSON Lines file '{path}' line 1 is one JSON array: write one object a line (jq -c '.[]' "
                        f"in.json > out.jsonl); expected one object a line, e.g. {_EXAMPLE}")  # fmt: skip
    if not isinstance(obj, dict):
        raise DataError(f"JSON Lines file '{path}' line {number} is {_KINDS.get(type(obj), 'a number')}, not an "
                        f"object; expected one object a line, e.g. {_EXAMPLE}")  # fmt: skip
    return obj


_KINDS = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}


def _cell(value: object) -> str:
    """A value as a CSV cell would hold it: a string as it is, ``null`` empty, anything else as JSON writes it (``1``,
    ``true``, ``[1, 2]``); an array or an object is a ``Nested`` cell.

    >>> [_cell(v) for v in ("a", None, 3, 1.5, True, ["x"])]
    ['a', '', '3', '1.5', 'true', '["x"]']
    """
    if isinstance(value, str):
        return value
    if type(value) is int:  # the common label: str() is JSON's text of an int, and faster than dumping it
        return str(value)
    if isinstance(value, (list, dict)):
        return Nested(json.dumps(value, ensure_ascii=False))
    return "" if value is None else json.dumps(value, ensure_ascii=False)


class Nested(str):
    """A cell that was a JSON array or object, as JSON writes it. Other keys may hold them (a dataset's token ids),
    but a text or a label of one is refused (``nested_problem``): a multi-label ``[0, 1]`` trained as a class "[0, 1]"
    of its own, in silence."""

    __slots__ = ()


def nested_problem(cell: str, key: str, role: str) -> str | None:
    """What is wrong with ``cell`` under ``key`` as a row's ``role`` ("text" or "label"): None unless it is ``Nested``.

    >>> nested_problem(_cell([0, 1]), "labels", "label").split(":")[0]
    "has a list under its label key 'labels' ([0, 1])"
    """
    if not isinstance(cell, Nested):
        return None
    kind = "a list" if cell.startswith("[") else "an object"
    shown = cell if len(cell) <= 40 else cell[:39] + "…"
    must = "a string, a number or a boolean (multi-label data is not supported)" if role == "label" else "one string"
    return f"has {kind} under its {role} key '{key}' ({shown}): a {role} must be {must}"
