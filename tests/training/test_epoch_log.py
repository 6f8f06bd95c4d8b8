"""The epoch's progress bar: live where someone watches it, once a minute where a file records it."""

from __future__ import annotations

import io
import subprocess
import sys

from conftest import Terminal
from freezetune.training.epoch_log import progress_bar


class _NotebookStream(io.StringIO):
    """What ipykernel puts in sys.stderr: not a terminal, yet the notebook redraws a bar's carriage returns in place."""


_NotebookStream.__module__ = "ipykernel.iostream"


def test_a_bar_is_live_in_a_terminal_or_a_notebook_and_once_a_minute_in_a_file(monkeypatch):
    intervals = []
    # nohup ... > log; a terminal; a notebook without ipywidgets (it sat at 0% for a minute)
    for stream in (io.StringIO(), Terminal(), _NotebookStream()):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = progress_bar(3, "x", enabled=True)
        intervals.append((bar.mininterval, bar.maxinterval))
        bar.close()
    # tqdm's monitor redraws a bar silent for maxinterval (10 s): a file got two lines a minute, 10 s apart
    assert intervals == [(60.0, 60.0), (0.1, 10.0), (0.1, 10.0)]


def test_in_a_file_each_redraw_is_a_line_of_its_own(monkeypatch):
    # tqdm starts each redraw with a carriage return and ends none with a newline: an epoch's redraws were one line of
    # the log, which grep, less and log collectors saw only when the epoch ended
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress_bar(3, "epoch 1", enabled=True)
    assert log.getvalue() == ""  # not drawn at once: an epoch shorter than a minute left a line of 0% each
    bar.update(1)
    bar.refresh()  # what the once-a-minute redraw does
    bar.update(1)
    bar.refresh()
    bar.close()
    lines = log.getvalue().split("\n")
    assert "\r" not in log.getvalue() and lines[-1] == ""  # whole lines only; the bar's clearing blank is dropped
    assert [line.split(":")[0] for line in lines[:-1]] == ["epoch 1", "epoch 1"]
    assert "1/3" in lines[0] and "2/3" in lines[1]


def test_a_notebook_without_ipywidgets_gets_a_text_bar_without_tqdms_warning():
    # Jupyter without ipywidgets printed "TqdmWarning: IProgress not found. Please update jupyter and ipywidgets."
    # on the first cell that trained, for a bar that works as text
    script = (
        "import sys, types\n"
        "sys.modules['ipykernel.zmqshell'] = types.ModuleType('ipykernel.zmqshell')\n"
        "ipython = types.ModuleType('IPython'); ipython.get_ipython = lambda: object(); sys.modules['IPython'] = ipython\n"
        "sys.modules['ipywidgets'] = None\n"
        "from freezetune.training.epoch_log import progress_bar\n"
        "bar = progress_bar(3, 'x', enabled=True)\n"
        "print(type(bar).__module__)\n"
    )
    proc = subprocess.run([sys.executable, "-W", "always", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stdout.startswith("tqdm.notebook"), proc.stderr[-2000:]  # text
    assert "IProgress" not in proc.stderr, proc.stderr


def test_a_notebooks_stream_behind_the_runs_pipe_guard_still_gets_the_live_bar(monkeypatch):
    # cli.main in a notebook: the guard hid the ipykernel stream, and the bar waited a minute, then a line a minute
    import os

    from freezetune.cli import exit as cli_exit

    class OutStream(io.StringIO):  # as ipykernel's: a stream class of its own, over a pipe
        pass

    OutStream.__module__ = "ipykernel.iostream"
    read, write = os.pipe()
    stream = OutStream()
    stream.fileno = lambda: write
    monkeypatch.setattr(sys, "stderr", stream)
    found = cli_exit.guard_output("train")
    try:
        assert sys.stderr is not stream  # guarded: a pipe
        assert progress_bar(3, "x", enabled=True).mininterval == 0.1
    finally:
        sys.stdout, sys.stderr = found
        os.close(read), os.close(write)


def test_a_terminal_without_a_size_gets_the_files_lines_not_a_hidden_bar(monkeypatch):
    # ssh -tt from a script, docker run -t from a non-terminal: a pseudo-terminal of 0 rows and 0 columns, where tqdm
    # hides a bar at or below the screen's height (0); the run showed no progress at all
    import fcntl
    import os
    import pty
    import select
    import struct
    import termios

    leader, follower = pty.openpty()
    said = {}
    try:
        for rows, cols in ((0, 0), (0, 80), (24, 0), (24, 80)):
            fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            stream = os.fdopen(os.dup(follower), "w")
            monkeypatch.setattr(sys, "stderr", stream)
            bar = progress_bar(3, "epoch 1", enabled=True)
            bar.update(1)
            bar.refresh()  # what the once-a-minute redraw does
            bar.close()
            stream.close()
            out = b""
            while select.select([leader], [], [], 0.2)[0]:
                out += os.read(leader, 65536)
            said[rows, cols] = (bar.mininterval, out.decode())
    finally:
        os.close(leader), os.close(follower)
    assert {size: interval for size, (interval, _) in said.items()} == {
        (0, 0): 60.0, (0, 80): 60.0, (24, 0): 60.0, (24, 80): 0.1}  # fmt: skip
    assert said[0, 0][1].startswith("epoch 1:") and "1/3" in said[0, 0][1]  # a line, not a bar tqdm hid
    assert said[0, 0][1].endswith("\r\n") and "\r" not in said[0, 0][1][:-2]  # the terminal's newline, no redraws
