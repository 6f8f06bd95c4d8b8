"""The text files a user gives (CSV and TSV tables, lists of texts) are read as UTF-8, on every platform (not the
locale's code page). One that is not (a spreadsheet's "CSV" export in Windows-1252, a Latin-1 file) is named with the
byte and the line where it stops being UTF-8: Python's error counts bytes within the chunk it was decoding, and a
reader that took it for "not a text CSV" sent the user after the wrong problem.
"""

from __future__ import annotations

from pathlib import Path

from freezetune.errors import DataError


def not_utf8(path: str | Path, what: str = "file") -> str:
    """The one-line reason ``path`` cannot be read as UTF-8 text, with the way out.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "t.csv"; _ = p.write_bytes(b"text,label\\ncaf\\xe9,a\\n")
    >>> not_utf8(p, "CSV").split(": ", 1)[1][:44]
    'byte 0xe9 on line 2 is not UTF-8 text (inval'
    """
    data = Path(path).read_bytes()  # once, for the reason and the conversion's source encoding
    source = "utf-16" if _utf16(data) else "cp1252"
    # a spreadsheet's export is where a CSV's other encoding comes from; a .jsonl's comes from a script
    sheet = ' (a spreadsheet\'s "CSV UTF-8")' if Path(path).suffix.lower() in (".csv", ".tsv") else ""
    return f"{what} '{path}': {_where(data)}; save it as UTF-8{sheet}, or convert it, e.g. iconv -f {source} -t utf-8"


def decoded(data: bytes, what: str) -> str:
    """``data`` as UTF-8 text (a byte-order mark dropped), as a file of those bytes is read; ``what`` names where they
    came from in the error.

    Raises:
        DataError: ``data`` is not UTF-8, named with the byte and line where it stops being so.

    >>> decoded(b"caf\\xe9\\n", "standard input")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    freezetune.errors.DataError: standard input: byte 0xe9 on line 1 is not UTF-8 text (invalid ...); send UTF-8 ...
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        source = "utf-16" if _utf16(data) else "cp1252"
        raise DataError(f"{what}: {_where(data)}; send UTF-8 text, or convert it: iconv -f {source} -t utf-8") from None


def _utf16(data: bytes) -> bool:
    """Whether a file holding ``data`` looks UTF-16 (Excel's "Unicode Text", PowerShell's default): a UTF-16
    byte-order mark, or a zero byte beside most ASCII characters of its first 4 KiB."""
    head = data[:4096]
    return head[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(head) >= 8 and head.count(0) * 3 >= len(head))


def where_not_utf8(path: str | Path) -> str:
    """Where ``path`` stops being UTF-8: its first such byte, by line.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "t.txt"; _ = p.write_bytes(b"ok\\n\\xff")
    >>> where_not_utf8(p)
    'byte 0xff on line 2 is not UTF-8 text (invalid start byte)'
    >>> _ = p.write_text("path,label\\n", encoding="utf-16"); where_not_utf8(p)
    'it is UTF-16 text (its first bytes: ff fe 70 00), not UTF-8'
    """
    return _where(Path(path).read_bytes())


def _where(data: bytes) -> str:
    """``where_not_utf8`` of a file's bytes."""
    if _utf16(data):
        return "it is UTF-16 text (its first bytes: " + data[:4].hex(" ") + "), not UTF-8"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return f"byte 0x{data[exc.start]:02x} on line {line} is not UTF-8 text ({exc.reason})"
    return "it is not UTF-8 text"  # decoded whole: the reader met something else
