"""Class labels as a dataset spells them: the folder a class is read from, names compared in one Unicode form, a
CSV's labels in the order users expect, and labels that differ only in case, spacing or number format."""

from __future__ import annotations

import logging
import math
import unicodedata
from pathlib import Path

from freezetune.run.log import warn_once

log = logging.getLogger(__name__)


def folder_name(label: str) -> str:
    """The folder a class is read from: its name, a slash (which no folder name holds) written ``_``.

    >>> folder_name("T-shirt/top")
    'T-shirt_top'
    """
    return label.replace("/", "_").replace("\\", "_")


def nfc(name: str) -> str:
    """A class name in NFC: macOS writes "café" decomposed (NFD), Linux and Windows composed."""
    return unicodedata.normalize("NFC", name)


def sorted_labels(labels: set[str]) -> list[str]:
    """A CSV's class names in label order: all-integer labels sort numerically ('10' after '9', as users expect of
    class ids), others as text.

    >>> sorted_labels({"10", "2", "1"}), sorted_labels({"10.0", "2.0"}), sorted_labels({"dog", "cat"})
    (['1', '2', '10'], ['2.0', '10.0'], ['cat', 'dog'])
    >>> sorted_labels({"1", "01", "2"})
    ['01', '1', '2']
    >>> sorted_labels({"②", "①"}), sorted_labels({"10", "nan", "9"})  # digits int() refuses; NaN last
    (['①', '②'], ['9', '10', 'nan'])
    """
    # isdecimal, not isdigit: "①" and "²" are digits that int() refuses
    if all(label.lstrip("-").isdecimal() for label in labels):  # "01" beside "1": by text, not by the set's hash order
        return sorted(labels, key=lambda label: (int(label), label))
    if all(_number(label) is not None for label in labels):  # a pandas export writes class 2 as "2.0"
        return sorted(labels, key=_numeric_order)
    return sorted(labels)


def _numeric_order(label: str) -> tuple[bool, float, str]:
    # NaN (a pandas export's missing label, "nan") compares false with every number: sorted by it, the classes took
    # the set's order, which changes from one process to the next. It goes last.
    value = _number(label)
    return (math.isnan(value), 0.0 if math.isnan(value) else value, label)


def _number(label: str) -> float | None:
    try:
        return float(label)
    except ValueError:
        return None


def warn_similar_labels(source: str | Path, classes: list[str]) -> None:
    """Name labels that differ only in case, spacing or number format ("Cat"/"cat", "1"/"01"/"1.0"): each is a class
    of its own, which is rarely what was meant."""
    groups: dict[str, list[str]] = {}
    for c in classes:
        key = c.strip().casefold()
        groups.setdefault(str(_number(key)) if _number(key) is not None else " ".join(key.split()), []).append(c)
    similar = [" / ".join(map(repr, g)) for g in groups.values() if len(g) > 1]
    if similar:
        warn_once(log, "'%s': label(s) %s differ only in case, spacing or number format, and each is a class of its "
                  "own; write each class one way if they are one", source, "; ".join(similar[:5]))  # fmt: skip
