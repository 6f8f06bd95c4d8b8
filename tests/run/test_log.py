"""train.log: every line a run says, time-stamped, kept in its run directory (and the line of what ended it)."""

from __future__ import annotations

import logging
import re

import pytest

from _engine_fixtures import make_image_folder, run_cli, train_argv
from freezetune.run import log as run_log
from freezetune.run.log import LOG_FILE, log, log_to, opened, when_opened
from freezetune.training import step

pytestmark = pytest.mark.usefixtures("single_thread_module")
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  ")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def _said(path) -> list[str]:
    """The log's lines without their stamps; each must have one."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert all(STAMP.match(line) for line in lines), lines
    return [STAMP.sub("", line) for line in lines]


def _printed(said: list[str]) -> list[str]:
    """The log's lines stdout printed: its logged warnings (the tiny model's random weights frozen) are stderr's."""
    return [line for line in said if not line.startswith("WARNING freezetune.")]


def test_a_runs_log_holds_every_line_it_printed_once_under_a_header_naming_the_command(data, tmp_path, capsys):
    # the default (auto) run: its trials are runs nested in it, whose lines it prints, and its final run writes to the
    # same directory: each line still lands in train.log once
    argv = train_argv(data, tmp_path / "run", "--epochs", "2")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    said = _said(tmp_path / "run" / LOG_FILE)
    assert said[0].startswith("freezetune ") and said[0].endswith(f"freezetune {' '.join(argv)}")
    # what produced the numbers: Python's and the libraries' versions (a later torch or timm may train differently)
    assert re.match(r"freezetune \S+ \(python [\d.]+, torch \S+, torchvision \S+, timm \S+.*\), pid", said[0])
    assert _printed(said[1:]) == out.splitlines()
    assert any(line.startswith("auto: chose") for line in said) and said[-1].startswith("test accuracy")
    trial = _said(tmp_path / "run" / "auto-trials" / "last-3" / LOG_FILE)  # a trial's dir keeps its own lines
    assert any(line.strip().startswith("epoch 1/1") for line in trial)
    assert not any("auto: chose" in line for line in trial)
    # a resume (here of the finished run) appends under a header of its own: nothing written before changes
    before = (tmp_path / "run" / LOG_FILE).read_text()
    code, out, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    after = (tmp_path / "run" / LOG_FILE).read_text()
    assert after.startswith(before)
    again = _said(tmp_path / "run" / LOG_FILE)[len(before.splitlines()) :]
    assert again[0].endswith("--resume") and _printed(again[1:]) == out.splitlines()


def test_the_error_that_ends_a_run_is_the_last_line_of_its_log(data, tmp_path, capsys, monkeypatch):
    # the loss turns NaN in epoch 2: the run stops with one line on stderr, and the log ends on that line
    real, calls = step.logits_of, []

    def poisoned(output):
        calls.append(1)
        return real(output) * float("nan") if len(calls) == 5 + 2 else real(output)

    monkeypatch.setattr(step, "logits_of", poisoned)
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--epochs", "3", "--freeze", "-3"))
    assert code == 2 and "not finite" in err
    said = _said(tmp_path / "run" / LOG_FILE)
    assert said[-1] == err.strip() and _printed(said[1:-1]) == out.splitlines()


def test_a_run_that_fails_before_it_has_a_directory_makes_none_for_its_log(tmp_path, capsys):
    code, _, err = run_cli(capsys, *train_argv(tmp_path / "missing", tmp_path / "run", "--epochs", "1"))
    assert code == 2 and "missing" in err
    assert not (tmp_path / "run").exists()


def test_levels_sharing_a_directory_log_each_line_once_and_lines_wait_for_the_run_to_open_it(tmp_path):
    printed = []
    with log(printed.append) as say:
        say("before the directory is known")
        log_to(tmp_path / "run")
        say("before the directory exists")
        assert not (tmp_path / "run").exists()  # the log creates no directory
        (tmp_path / "run").mkdir()
        say("before a run opened it")
        assert not (tmp_path / "run" / LOG_FILE).exists()  # a refused resume would stop here: nothing written
        with log(say) as trial_say:  # a nested run in a directory of its own below (a trial): opening it opens both
            log_to(tmp_path / "run" / "trial")
            (tmp_path / "run" / "trial").mkdir()
            opened(tmp_path / "run" / "trial")
            trial_say("trial")
        with log(say) as inner_say:  # a nested run in the same directory (the auto recipe's final run)
            inner_say("inner, before its directory is known")
            log_to(tmp_path / "run")
            opened(tmp_path / "run")
            inner_say("inner")
        say("after")
    assert printed == ["before the directory is known", "before the directory exists", "before a run opened it",
                       "trial", "inner, before its directory is known", "inner", "after"]  # fmt: skip
    assert _said(tmp_path / "run" / LOG_FILE)[1:] == printed
    assert _said(tmp_path / "run" / "trial" / LOG_FILE)[1:] == ["trial"]


def test_a_write_into_a_levels_directory_waits_as_its_lines_do_for_a_run_below_to_open_it(tmp_path):
    # a sweep's resume records the settings it changed once a recipe's run has accepted it, not before
    written = []
    (tmp_path / "sweep").mkdir()
    with log(lambda line: None, tmp_path / "sweep"):
        when_opened(tmp_path / "sweep", lambda: written.append("settings"))
        assert written == []  # a recipe refusing its resume would stop here: nothing written
        opened(tmp_path / "sweep" / "recipe")
        assert written == ["settings"]
        when_opened(tmp_path / "sweep", lambda: written.append("again"))  # opened already: at once
        assert written == ["settings", "again"]
    when_opened(tmp_path / "elsewhere", lambda: written.append("no level"))  # no level has it: at once
    assert written[-1] == "no level"


def test_an_error_leaving_nested_levels_is_logged_once_per_file_and_a_stop_worded_anew_in_its_own(tmp_path):
    import signal

    from freezetune.errors import DataError
    from freezetune.run.interrupt import RunInterrupted

    (tmp_path / "run" / "trial").mkdir(parents=True)
    with pytest.raises(DataError):
        with log(lambda line: None, tmp_path / "run"):
            with log(lambda line: None, tmp_path / "run" / "trial"):
                opened(tmp_path / "run" / "trial")
                raise DataError("cannot read image 'a.png': truncated")
    line = "freezetune: error: cannot read image 'a.png': truncated"
    assert _said(tmp_path / "run" / LOG_FILE)[1:] == [line]
    assert _said(tmp_path / "run" / "trial" / LOG_FILE)[1:] == [line]
    # a trial's stop, said again as the recipe's (auto.trials.trial): the recipe's log has its own line, not the
    # trial's
    (tmp_path / "b" / "trial").mkdir(parents=True)
    with pytest.raises(RunInterrupted):
        with log(lambda line: None, tmp_path / "b"):
            try:
                with log(lambda line: None, tmp_path / "b" / "trial"):
                    opened(tmp_path / "b" / "trial")
                    raise RunInterrupted.by(signal.SIGTERM, "at step 2/5 of epoch 1; continue with --resume")
            except RunInterrupted:
                raise RunInterrupted.by(signal.SIGTERM, "during the trial (trials are not resumed)") from None
    assert _said(tmp_path / "b" / LOG_FILE)[1:] == ["freezetune: stopped by SIGTERM during the trial (trials are not "
                                                    "resumed)"]  # fmt: skip
    assert "--resume" in _said(tmp_path / "b" / "trial" / LOG_FILE)[-1]


def test_a_stop_leaving_a_level_that_shares_its_outer_levels_file_is_logged_under_the_one_header(tmp_path):
    # the auto recipe's final run, stopped: a second header (stamped at that run's start, out of order) came before
    # the stop line, as if a second command had written there
    import signal

    from freezetune.run.interrupt import RunInterrupted

    (tmp_path / "run").mkdir()
    with pytest.raises(RunInterrupted):
        with log(lambda line: None, tmp_path / "run") as say:
            opened(tmp_path / "run")
            say("auto: chose to train the last 3 stage(s)")
            with log(say, tmp_path / "run") as run_say:
                opened(tmp_path / "run")  # the final run passed its checks
                run_say("epoch 1/3")
                raise RunInterrupted.by(signal.SIGTERM, "at step 1/4 of epoch 2 (saved in last.pt)")
    text = (tmp_path / "run" / LOG_FILE).read_text()
    assert text.count("freezetune 0.") == 1, text  # the header names freezetune's version
    assert _said(tmp_path / "run" / LOG_FILE)[1:] == ["auto: chose to train the last 3 stage(s)", "epoch 1/3",
                                                      "freezetune: stopped by SIGTERM at step 1/4 of epoch 2 (saved "
                                                      "in last.pt)"]  # fmt: skip


def test_a_bug_is_logged_with_its_traceback_and_a_stop_as_the_line_it_prints(tmp_path):
    import signal

    from freezetune.run.interrupt import RunInterrupted

    (tmp_path / "a").mkdir()
    with pytest.raises(ZeroDivisionError), log(lambda line: None, tmp_path / "a"):
        opened(tmp_path / "a")
        1 / 0  # noqa: B018
    text = (tmp_path / "a" / LOG_FILE).read_text()
    assert "freezetune: failed:" in text and "Traceback" in text and "ZeroDivisionError" in text
    (tmp_path / "b").mkdir()
    with pytest.raises(RunInterrupted), log(lambda line: None, tmp_path / "b"):
        opened(tmp_path / "b")
        raise RunInterrupted.by(signal.SIGTERM, "after epoch 2 (saved in last.pt)")
    assert _said(tmp_path / "b" / LOG_FILE)[-1] == "freezetune: stopped by SIGTERM after epoch 2 (saved in last.pt)"


def test_a_user_error_is_logged_as_itself_after_an_earlier_stop_in_the_process(tmp_path, monkeypatch):
    # a notebook: a run stopped by Ctrl-C, then another failed on its data; the log said it had been stopped
    import signal

    from freezetune.errors import DataError
    from freezetune.run import interrupt

    monkeypatch.setattr(interrupt, "raised_stop", lambda: interrupt.RunInterrupted(signal.SIGINT, "stopped by SIGINT"))
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError), log(lambda line: None, tmp_path / "a"):
        opened(tmp_path / "a")
        raise DataError("no class folders")
    assert _said(tmp_path / "a" / LOG_FILE)[-1] == "freezetune: error: no class folders"


def test_a_warning_is_said_once_but_kept_in_each_nested_runs_log_and_from_other_threads(tmp_path, caplog):
    # a sweep: its second recipe's train.log lacked the data warnings its first had said
    import threading

    from freezetune.run.log import warn_once

    logger = logging.getLogger("freezetune.test")
    (tmp_path / "s" / "r1").mkdir(parents=True)
    (tmp_path / "s" / "r2").mkdir()
    with caplog.at_level(logging.WARNING, logger="freezetune"), log(lambda line: None, tmp_path / "s", name="s.log"):
        opened(tmp_path / "s")
        for recipe in ("r1", "r2"):
            with log(lambda line: None, tmp_path / "s" / recipe):
                opened(tmp_path / "s" / recipe)
                warn_once(logger, "%d file(s) left out", 3)
        worker = threading.Thread(target=lambda: logger.warning("from a reader thread"))
        worker.start()
        worker.join()
    assert [r.getMessage() for r in caplog.records] == ["3 file(s) left out", "from a reader thread"]
    for recipe in ("r1", "r2"):
        assert _said(tmp_path / "s" / recipe / LOG_FILE)[1:] == ["WARNING freezetune.test: 3 file(s) left out"]
    assert _said(tmp_path / "s" / "s.log")[1:] == ["WARNING freezetune.test: 3 file(s) left out",
                                                   "WARNING freezetune.test: from a reader thread"]  # fmt: skip


def test_a_warning_reaches_stderr_from_the_python_api_once_where_no_logging_is_set_up(tmp_path, monkeypatch, capsys):
    # a notebook calling ft.train: the handler that keeps warnings in train.log turned off logging's last resort, and
    # the data's warnings (test images that are copies of training images) showed nowhere but in the file
    from freezetune.run.log import warn_once

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # no logging.basicConfig (pytest's capture removed)
    logger = logging.getLogger("freezetune.test")
    with log(lambda line: None):
        warn_once(logger, "%d test file(s) are copies of training files", 2)
        with log(lambda line: None):  # a nested run (the auto recipe's final run) says it once, not again
            warn_once(logger, "%d test file(s) are copies of training files", 2)
    assert capsys.readouterr().err == "WARNING freezetune.test: 2 test file(s) are copies of training files\n"
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.StreamHandler()])  # the CLI's basicConfig: it says it
    with log(lambda line: None):
        logger.warning("said by the user's own handler")
    assert capsys.readouterr().err == "said by the user's own handler\n"


def test_a_stop_raised_in_an_earlier_run_of_the_process_does_not_word_a_later_runs_failure(tmp_path, monkeypatch):
    # a notebook: Ctrl-C stopped one ft.train; the next failed on a bug, and its train.log said "stopped by SIGINT"
    import signal

    from freezetune.run import interrupt

    monkeypatch.setattr(interrupt, "_raised", interrupt.RunInterrupted.by(signal.SIGINT, "outside a training step"))
    (tmp_path / "a").mkdir()
    with pytest.raises(RuntimeError), log(lambda line: None, tmp_path / "a"):
        opened(tmp_path / "a")
        raise RuntimeError("a bug in the second run")
    assert interrupt.raised_stop() is None
    assert "RuntimeError: a bug in the second run" in (tmp_path / "a" / LOG_FILE).read_text()


def test_only_the_first_process_of_a_torchrun_job_logs_and_a_failing_write_never_stops_the_run(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    monkeypatch.setenv("RANK", "1")
    with log(lambda line: None, tmp_path / "run") as say:
        opened(tmp_path / "run")
        say("rank 1")
    assert not (tmp_path / "run" / LOG_FILE).exists()
    monkeypatch.setenv("RANK", "0")
    (tmp_path / "run" / LOG_FILE).mkdir()  # a directory where the file goes: every write fails
    printed = []
    with log(printed.append, tmp_path / "run") as say:
        opened(tmp_path / "run")
        say("still said")
    assert printed == ["still said"]


def test_the_header_names_the_python_api_when_no_command_started_the_process(tmp_path, monkeypatch):
    monkeypatch.setattr(run_log, "command", None)
    with log(lambda line: None, tmp_path) as say:
        opened(tmp_path)
        say("x")
    assert _said(tmp_path / LOG_FILE)[0].endswith("(Python API)")


def test_the_header_is_stamped_when_the_run_began_not_when_its_directory_opened(tmp_path):
    # the header was written with the lines that waited for the run dir, stamped after them: time ran backwards
    import time

    with log(lambda line: None, tmp_path) as say:
        say("before the run dir is opened")
        time.sleep(1.1)  # the data scan, the model: the dir opens seconds later
        opened(tmp_path)
        say("after")
    stamps = [line[:19] for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert len(stamps) == 3 and stamps == sorted(stamps), stamps


@pytest.mark.parametrize("how", [("--freeze", "-3"), ()])
def test_a_refused_resume_leaves_the_runs_log_as_it_was(data, tmp_path, capsys, how):
    # the auto recipe's level knew its directory from the start: a refusal could be written into it
    from _engine_fixtures import snapshot

    code, _, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--epochs", "1", *how))
    assert code == 0, err
    before = snapshot(tmp_path / "run")
    code, _, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--epochs", "1", *how, "--lr", "0.5",
                                               "--resume"))  # fmt: skip
    assert code == 2 and "cannot resume" in err
    assert snapshot(tmp_path / "run") == before


def test_a_data_warning_is_said_once_a_run_and_kept_in_its_log(tmp_path, capsys, caplog):
    # the auto recipe's trial and its run each read the data: the warning about a left-out file came once per read
    import shutil

    root = make_image_folder(tmp_path / "images")
    (root / "train" / "red" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        code, _, err = run_cli(capsys, *train_argv(root, tmp_path / "run", "--epochs", "1"))
    assert code == 0, err
    said = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(said) == 1, said
    logged = [line for line in _said(tmp_path / "run" / LOG_FILE) if "left out" in line]
    assert len(logged) == 1 and logged[0].startswith("WARNING freezetune.data.folder: ")
    # a second run in the same process says it again: "once" is per run
    caplog.clear()
    shutil.rmtree(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        code, _, err = run_cli(capsys, *train_argv(root, tmp_path / "run", "--epochs", "1"))
    assert code == 0, err
    assert len([r for r in caplog.records if "left out" in r.getMessage()]) == 1


def test_a_line_naming_a_file_whose_name_is_not_utf8_is_logged_with_its_escape(tmp_path):
    # Linux hands such a name to Python as a lone surrogate ('b\udce9d.png'): the strict UTF-8 log writer raised
    # UnicodeEncodeError, and a --skip-bad run over it ended in three chained tracebacks
    with log(lambda _: None, tmp_path) as say:
        opened(tmp_path)
        say("skipping 1 unreadable image file, first: cat/b\udce9d.png")
    assert _said(tmp_path / LOG_FILE)[1:] == ["skipping 1 unreadable image file, first: cat/b\\udce9d.png"]


def test_a_warning_naming_a_file_shows_its_control_characters_as_escapes_once(tmp_path, caplog):
    # a folder named with a newline or an ANSI escape broke the warning's line and recoloured the terminal
    logger = logging.getLogger("freezetune.data.doc")
    with caplog.at_level(logging.WARNING, logger="freezetune"), log(lambda _: None, tmp_path):
        opened(tmp_path)
        for _ in range(2):  # said once a run, as any warning
            run_log.warn_once(logger, "'%s': %d file(s) left out", "red\n\x1b[2Jx.png", 1)
    line = "'red\\n\\x1b[2Jx.png': 1 file(s) left out"
    assert [r.getMessage() for r in caplog.records] == [line]  # what stderr's handler prints
    assert _said(tmp_path / LOG_FILE)[1:] == [f"WARNING freezetune.data.doc: {line}"]


def test_a_note_said_once_a_run_is_said_again_in_a_sweeps_next_recipe_where_asked():
    # the feature cache's line, "once a run", was said once a sweep: lp-ft's train.log lacked the cache its probe
    # trained on, which linear-probe's had said
    from freezetune.run.log import SWEEP_LOG, first_time, log

    said = []
    with log(said.append, name=SWEEP_LOG):
        for _recipe in ("linear-probe", "lp-ft"):
            with log(said.append), log(said.append):  # the recipe's run, and a trial in it
                said.append((first_time("cache", each_recipe=True), first_time("cache", each_recipe=True)))
                said.append(first_time("data note"))
    assert [s for s in said if not isinstance(s, str)] == [(True, False), True, (True, False), False]
