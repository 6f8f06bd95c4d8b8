"""How a name from the data (a class folder's, an image file's) is shown to a person: on the terminal, in
``train.log``, in ``predict``'s text lines. A folder name may hold an ANSI escape (``\\x1b[31mRED``), a newline or a
bidi override (U+202E): printed raw, it recoloured the terminal, broke a table's rows and ``predict``'s one line an
image, or showed a name reversed. Here each such character is written as its escape, as ``repr`` writes it, and a
table's columns are measured on the text as it is shown (a wide East Asian character takes two columns). The JSON
outputs keep the real names.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import unicodedata

# control characters (ESC, newline, tab), format ones (bidi overrides, zero-width joiners), lone surrogates (a byte of
# a Linux file name that is not UTF-8) and the line and paragraph separators some viewers break lines at
_UNSHOWN = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def printable(text: object, encoding: str | None = None) -> str:
    """``text`` with each control or format character written as its escape (``\\x1b``, ``\\n``, ``\\u202e``), and,
    given an ``encoding``, each character it cannot encode too, as Python writes it on such a stream (``caf\\xe9`` on
    an ASCII terminal): what is measured is then what is printed. Every other character is kept.

    >>> print(printable("\\x1b[31mRED\\x1b[0m"), printable("line1\\nline2"), printable("café"), printable("café", "ascii"))
    \\x1b[31mRED\\x1b[0m line1\\nline2 café caf\\xe9
    """
    text = str(text)
    if not (text.isascii() and text.isprintable()):
        text = "".join(
            ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in _UNSHOWN else ch for ch in text
        )
    if encoding is not None:
        try:
            text = text.encode(encoding, "backslashreplace").decode(encoding)
        except LookupError:  # an encoding Python does not know: the stream's own writes will say so
            pass
    return text


def output_encoding() -> str:
    """The encoding of standard output, where reports and predictions are printed (``utf-8`` where it has none)."""
    return getattr(sys.stdout, "encoding", None) or "utf-8"


def width(text: str) -> int:
    """The columns ``text`` takes on a terminal: two for a wide East Asian character, none for a combining mark.

    >>> width("cat"), width("猫"), width("e\\u0301")
    (3, 2, 1)
    """
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def padded(text: str, columns: int) -> str:
    """``text`` with spaces after it to fill ``columns`` terminal columns (``str.ljust`` counts characters).

    >>> padded("猫", 4) + "|"
    '猫  |'
    """
    return text + " " * max(0, columns - width(text))


class PrintableArgs(logging.Filter):
    """Shows the names a logged line quotes (its ``%s`` arguments: a file's path, a class's name) as ``printable``
    does, and leaves the line's own text (a continuation line's newline) as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.name.startswith("freezetune"):
            record.args = printable_args(record.args, _conversions(record.msg))
        return True


# a %-format's conversions: an argument shown by %r is escaped by repr already (escaped again, "\\n" showed)
_CONVERSION = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?([a-zA-Z%])")


def _conversions(msg: object) -> str | None:
    """The conversion letters of ``msg``'s arguments, in order (``"sdr"``); None where they cannot be paired with
    them (a ``*`` width takes an argument of its own)."""
    if not isinstance(msg, str) or "*" in msg:
        return None
    return "".join(c for c in _CONVERSION.findall(msg) if c != "%")


def printable_args(args: tuple, conversions: str | None = None) -> tuple:
    """``args`` with each text or path among them ``printable``; numbers and other values are kept, and those the
    format shows by ``repr`` (``conversions``: the format's letters, ``"sr"``), which escapes them itself.

    >>> printable_args(("a\\nb", 3)), printable_args(("a\\nb", "c\\nd"), "sr")
    (('a\\\\nb', 3), ('a\\\\nb', 'c\\nd'))
    """
    if conversions is None or len(conversions) != len(args):
        conversions = "s" * len(args)
    return tuple(a if c in "ra" else _printable_arg(a) for a, c in zip(args, conversions, strict=True))


def _printable_arg(arg: object) -> object:
    text = os.fspath(arg) if isinstance(arg, (str, os.PathLike)) else None
    if isinstance(text, str) and printable(text) != text:  # a clean one keeps its type (%r of a path)
        return printable(text)
    return arg
