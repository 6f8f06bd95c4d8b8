"""The epoch's progress bar: live where someone watches it, once a minute where a file records it."""

from __future__ import annotations

import io
import sys

from freezetune.epoch_log import progress_bar


class _NotebookStream(io.StringIO):
    """What ipykernel puts in sys.stderr: not a terminal, yet the notebook redraws a bar's carriage returns in place."""


_NotebookStream.__module__ = "ipykernel.iostream"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_is_live_in_a_terminal_or_a_notebook_and_once_a_minute_in_a_file(monkeypatch):
    intervals = []
    # nohup ... > log; a terminal; a notebook without ipywidgets (it sat at 0% for a minute)
    for stream in (io.StringIO(), _Terminal(), _NotebookStream()):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = progress_bar(3, "x", enabled=True)
        intervals.append(bar.mininterval)
        bar.close()
    assert intervals == [60.0, 0.1, 0.1]
