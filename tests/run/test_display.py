"""How a name from the data is shown to a person: control characters as escapes, columns as a terminal counts them."""

from __future__ import annotations

import logging
from pathlib import Path

from freezetune.run.display import PrintableArgs, padded, printable, printable_args, width


def test_control_format_and_separator_characters_show_as_escapes_and_the_rest_is_kept():
    assert printable("\x1b[31mRED\x1b[0m\ttab\r") == "\\x1b[31mRED\\x1b[0m\\ttab\\r"
    assert printable("\u202eevil\u2028x") == "\\u202eevil\\u2028x"  # a bidi override, a line separator
    assert printable("d\udcf6g") == "d\\udcf6g"  # a Linux name's byte that is not UTF-8
    assert printable("猫 café Ünïcode") == "猫 café Ünïcode"
    assert printable("猫", "ascii") == "\\u732b" and printable("café", "latin-1") == "café"


def test_padding_counts_the_columns_a_terminal_shows():
    assert [padded(s, 5) + "|" for s in ("ab", "猫", "e\u0301")] == ["ab   |", "猫   |", "e\u0301    |"]
    assert width("猫猫") == 4


def test_a_logged_lines_names_are_escaped_and_its_other_arguments_kept():
    path = Path("a\nb.png")
    assert printable_args((path, Path("ok.png"), 3, "x\x1b")) == ("a\\nb.png", Path("ok.png"), 3, "x\\x1b")
    record = logging.LogRecord("freezetune.data", logging.WARNING, "", 0, "'%s':\n  %d left out", ("a\nb", 2), None)
    PrintableArgs().filter(record)
    assert record.getMessage() == "'a\\nb':\n  2 left out"  # the line's own continuation stays


def test_a_name_the_line_shows_by_repr_is_escaped_once():
    # data/overlap's "(first: %r)" of a text holding a newline showed 'great film.\\nloved it': escaped twice
    record = logging.LogRecord("freezetune.data", logging.WARNING, "", 0, "first: %r, %s; %d%%",
                               ("great film.\nloved it", "a\nb", 3), None)  # fmt: skip
    PrintableArgs().filter(record)
    assert record.getMessage() == "first: 'great film.\\nloved it', a\\nb; 3%"
