"""Crash safety: a training process killed (SIGKILL) or stopped (SIGTERM, SIGINT) at a chosen moment leaves a run
dir that ``--resume`` continues, or a plain re-run restarts, to the same metrics as an uninterrupted run; the auto
recipe (trials, then the final run) too.

The moments are hit exactly, not by sleeps: ``FREEZETUNE_TEST_PAUSE_AT`` holds the process at a named point
(``freezetune.run.interrupt.pause_point``) until the test has signalled it. The process is a fork of this one running
the CLI's ``main``: a process of its own, signalled for real, with its own loader workers, without paying a fresh
interpreter's import of torch for every moment. CPU, fixed seed, the default loader workers (two processes for image
files).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import multiprocessing.resource_tracker
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from _engine_fixtures import make_image_folder, run_cli, snapshot, stopping_at
from freezetune.auto import plan as auto_plan
from freezetune.cli.main import main
from freezetune.errors import CheckpointError, ConfigError
from freezetune.run import checkpoint
from freezetune.run import directory as runtime
from freezetune.run.interrupt import (
    PAUSE_ENV,
    PAUSE_MARKER_ENV,
    WORKERS_KILLED,
    RunInterrupted,
    StopRequest,
    forget_stop,
    raised_stop,
)

pytestmark = pytest.mark.usefixtures("single_thread_module")

# 18 training images in batches of 4: 5 steps an epoch. No --workers: the default (loader processes) is under test.
TINY = ["--model", "timm:test_efficientnet", "--weights", "none", "--img-size", "32", "--device", "cpu",
        "--no-progress", "--batch-size", "4", "--no-tensorboard"]  # fmt: skip
RUN = [*TINY, "--epochs", "3", "--freeze", "-3"]
# The auto recipe (no --freeze): on 2 validation images only the default candidate's trial runs (2 steps, half an
# epoch); a trial that short has the head probed (2 epochs of 5 steps: however short the run, _probed_however_short),
# then that candidate trains for 2 epochs.
AUTO = [*TINY, "--epochs", "2", "--cache", "auto"]
TRIAL_STEPS, PROBE_STEPS = 2, 10


@pytest.fixture(scope="module", autouse=True)
def _probed_however_short():
    """The auto runs here train 8 steps, under the 30 a probed start needs (``auto.plan.PROBE_MIN_RUN_STEPS``): these
    tests stop and resume the probed path all the same (the forked children inherit the setting)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(auto_plan, "PROBE_MIN_RUN_STEPS", 0)
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), train=6, val=2, test=2)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """cache -> the run dir of an uninterrupted run (in this process: same code, same seed, one thread)."""
    runs = {}
    for cache in ("auto", "off"):
        out = tmp_path_factory.mktemp("whole") / cache
        assert main(["train", "--data", str(data), "--out", str(out), *RUN, "--cache", cache]) == 0
        runs[cache] = out
    return runs


@pytest.fixture(scope="module")
def uninterrupted_auto(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "auto-recipe"
    assert main(_auto_argv(data, out)) == 0
    return out


def _argv(data: Path, out: Path, cache: str, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), *RUN, "--cache", cache, *extra]


def _auto_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), *AUTO, *extra]


class Stopped(NamedTuple):
    returncode: int  # negative: killed by that signal
    stdout: str
    stderr: str


def _stopped_run(argv: list[str], pause_at: str, sig: int, tmp_path: Path, *, group: bool = False,
                 spawn: bool = False) -> Stopped:  # fmt: skip
    """Run ``freezetune ARGV`` in a child process until it holds at ``pause_at``, send it ``sig`` there, let it go on.
    ``group``: the child leads a process group, and the signal goes to the whole group, its loader workers too (as
    ``timeout``, a terminal's Ctrl-C and cluster schedulers send it). ``spawn``: the child's loader workers are
    spawned, as on macOS and Windows (a fresh interpreter each), not forked."""
    marker, logs = tmp_path / "paused", (tmp_path / "stdout", tmp_path / "stderr")
    sys.stdout.flush(), sys.stderr.flush()
    # a forked process of multiprocessing's own, not a bare os.fork: as it ends it runs what a real interpreter's exit
    # runs for multiprocessing (its exit finalizers: the named semaphores a spawning process made, tqdm's lock among
    # them, are unlinked). After a bare os._exit the resource tracker warned of them as leaked, into the run's stderr,
    # whenever it wrote before the test read the file: a warning the real command never prints. The tracker a child
    # started writes as it ends, once the child's loader workers are gone too: its end is waited for before the read.
    tracker = tmp_path / "tracker"
    start_method = "spawn" if spawn else multiprocessing.get_start_method()
    child = multiprocessing.get_context("fork").Process(target=_child, args=(argv, pause_at, marker, logs, group,
                                                                            start_method))  # fmt: skip
    child.start()
    deadline = time.monotonic() + 120
    while not marker.exists() and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not marker.exists():  # ended (or hung) before the moment
        child.kill()
        child.join()
        pytest.fail(f"never reached {pause_at}: {logs[0].read_text()}{logs[1].read_text()}")
    (os.killpg if group else os.kill)(child.pid, sig)
    if sig != signal.SIGKILL:
        time.sleep(0.3)  # the handler records the signal; then the run may leave the pause and act on it
        marker.unlink()
    # output goes to files, not pipes: a killed run's loader workers would hold a pipe open until they notice
    child.join()
    marker.unlink(missing_ok=True)
    if tracker.exists():
        _wait_for_end(int(tracker.read_text()))
    return Stopped(child.exitcode, logs[0].read_text(), logs[1].read_text())


def _child(argv: list[str], pause_at: str, marker: Path, logs: tuple[Path, Path], group: bool,
           start_method: str) -> None:  # fmt: skip
    """The stopped run's process: its output to the log files, then the CLI's ``main``; its code is the exit code."""
    if group:
        os.setpgid(0, 0)
    multiprocessing.set_start_method(start_method, force=True)  # (the fork context above set "fork")
    tracker_before = multiprocessing.resource_tracker._resource_tracker._pid  # (this one's, or one it inherited)
    os.environ.update({PAUSE_ENV: pause_at, PAUSE_MARKER_ENV: str(marker)})
    for fd, path in zip((1, 2), logs, strict=True):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # noqa: SIM115
    try:
        code = main(argv)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    if (started := multiprocessing.resource_tracker._resource_tracker._pid) not in (None, tracker_before):
        (marker.parent / "tracker").write_text(str(started))
    sys.exit(code)


def _wait_for_end(pid: int, timeout: float = 20.0) -> None:
    """Until the process ``pid``, not a child of this one, has ended (gone, or a zombie no one has reaped yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.02)
    pytest.fail(f"multiprocessing's resource tracker (pid {pid}) still runs {timeout:.0f} s after the run ended")


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_run(a: Path, b: Path, epochs: int = 3) -> None:
    """Every epoch's train/val metrics and LRs, the final weights and the test accuracy match."""
    ra, rb = _rows(a), _rows(b)
    assert [r["epoch"] for r in rb] == [r["epoch"] for r in ra] == [str(e + 1) for e in range(epochs)]
    for x, y in zip(ra, rb, strict=True):
        for key in [k for k in x if k.startswith(("train_", "val_", "lr/"))]:
            assert float(y[key]) == pytest.approx(float(x[key]), rel=1e-6, abs=1e-9), (x["epoch"], key)
    _assert_same_weights_and_test(a, b)


def _assert_same_weights_and_test(a: Path, b: Path) -> None:
    wa, wb = checkpoint.load(a / "last.pt")["state_dict"], checkpoint.load(b / "last.pt")["state_dict"]
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-6, msg=key)
    test_a, test_b = (json.loads((d / "test_metrics.json").read_text()) for d in (a, b))
    assert test_b["acc"] == test_a["acc"] and test_b["loss"] == pytest.approx(test_a["loss"], rel=1e-6)


def _no_temp_files(run_dir: Path) -> bool:
    return not list(run_dir.rglob("*.tmp"))


# --- SIGKILL: nothing runs on the way out; the next command finds the pieces ----------------------------------------

KILLS = [
    # during the feature-cache build: no epoch finished, a plain re-run restarts it
    pytest.param("cache", "auto", (), "restart", id="cache-build"),
    # between epoch 1's best.pt and its last.pt: best.pt and a metrics.csv row but no last.pt; a plain re-run restarts
    pytest.param("checkpoint#1", "off", (), "restart", id="between-best-and-last"),
    # epoch 2's last.pt written to its temp file, not yet renamed: resumes after epoch 1, the temp file is removed
    pytest.param("rename:last.pt#2", "auto", (), "resume", id="last-pt-before-rename"),
    # mid-epoch: step 4 of epoch 2, last.pt saved at its step 3 (--save-every-steps 3): resumes inside epoch 2
    pytest.param("step#9", "off", ("--save-every-steps", "3"), "resume", id="mid-epoch"),
]


@pytest.mark.parametrize(("pause_at", "cache", "extra", "then"), KILLS)
def test_a_killed_run_resumes_or_restarts_to_the_uninterrupted_metrics(data, uninterrupted, tmp_path, capsys,
                                                                       pause_at, cache, extra, then):  # fmt: skip
    out = tmp_path / "run"
    killed = _stopped_run(_argv(data, out, cache, *extra), pause_at, signal.SIGKILL, tmp_path)
    assert killed.returncode == -signal.SIGKILL
    if then == "restart":  # no epoch finished: the same command again, no --resume, no --overwrite
        assert not (out / "last.pt").exists()
        code, stdout, err = run_cli(capsys, *_argv(data, out, cache, *extra))
    else:
        code, stdout, err = run_cli(capsys, *_argv(data, out, cache, *extra, "--resume"))
        assert "resumed" in stdout
    assert code == 0, err
    _assert_same_run(uninterrupted[cache], out)
    assert _no_temp_files(out)


# --- SIGTERM (cluster preemption) and SIGINT: saved where the run stood, one line, 143 / 130 ------------------------

AT_ONCE = ("outside a training step (nothing new saved); --resume continues a run that finished an epoch, the same "
           "command restarts one that did not")  # fmt: skip
OUTSIDE = "outside a training step (nothing new saved)"
# it said "outside a training step" while the user saw the cache bar
BUILDING = "while building the feature cache (the part built is not kept)"
STOPS = [
    pytest.param(
        signal.SIGTERM,
        "step#4",
        "off",
        4,
        "SIGTERM at step 4/5 of epoch 1 (saved in last.pt); continue with --resume (resume=True)",
        id="sigterm-mid-epoch",
    ),  # fmt: skip
    pytest.param(
        signal.SIGTERM,
        "step#5",
        "off",
        5,
        "SIGTERM at step 5/5 of epoch 1 (saved in last.pt); continue with --resume (resume=True)",
        id="sigterm-after-the-epochs-last-step",  # the resumed epoch trains no step, yet logs the LRs its steps used
    ),  # fmt: skip
    pytest.param(
        signal.SIGTERM,
        "cache",
        "auto",
        None,
        f"SIGTERM {AT_ONCE.replace(OUTSIDE, BUILDING)}",
        id="sigterm-cache-build",
    ),  # fmt: skip
    pytest.param(
        signal.SIGTERM,
        "step#4",
        "off",
        4,
        "SIGTERM at step 4/5 of epoch 1 (saved in last.pt); continue with --resume (resume=True)",
        id="sigterm-to-the-process-group-mid-epoch",  # the loader workers got it too, died, and the run crashed
    ),  # fmt: skip
    pytest.param(
        signal.SIGHUP,
        "step#4",
        "off",
        4,
        "SIGHUP at step 4/5 of epoch 1 (saved in last.pt); continue with --resume (resume=True)",
        id="sighup-to-the-process-group-mid-epoch",  # an SSH session closed: the run died, its epoch's steps lost
    ),  # fmt: skip
    pytest.param(
        signal.SIGINT,
        "step#7",
        "auto",
        2,
        "SIGINT at step 2/5 of epoch 2 (saved in last.pt); continue with --resume (resume=True)",
        id="sigint-mid-epoch-cached",
    ),  # fmt: skip
    pytest.param(
        signal.SIGINT,
        "workers#1",
        "off",
        1,
        "SIGINT at step 1/5 of epoch 1 (saved in last.pt); continue with --resume (resume=True)",
        # a terminal's Ctrl-C on macOS or Windows, whose loader workers are spawned, as they start (once a run): they
        # died of KeyboardInterrupt and the run crashed on "DataLoader worker exited unexpectedly", its step not saved
        id="sigint-to-the-process-group-as-spawned-workers-start",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("sig", "pause_at", "cache", "step", "line"), STOPS)
def test_a_stopped_run_saves_its_place_and_resumes_to_the_uninterrupted_metrics(data, uninterrupted, tmp_path, capsys,
                                                                                request, sig, pause_at, cache, step,
                                                                                line):  # fmt: skip
    out = tmp_path / "run"
    group, spawn = (word in request.node.callspec.id for word in ("process-group", "spawned"))
    # spawned workers are the point: there as many as on a 2-core machine by default, also where fewer CPUs are usable
    workers = ["--workers", "2"] if spawn else []
    stopped = _stopped_run(_argv(data, out, cache, *workers), pause_at, sig, tmp_path, group=group, spawn=spawn)
    assert stopped.returncode == 128 + sig, stopped.stderr
    assert stopped.stderr == f"freezetune: stopped by {line}\n"  # one line, no traceback
    if step:  # stopped in the training loop: last.pt holds that step, not a finished epoch
        last, rows = checkpoint.load(out / "last.pt"), _rows(out) if (out / "metrics.csv").exists() else []
        assert last["progress"]["step"] == step and len(rows) == last["epoch"]
    code, stdout, err = run_cli(capsys, *_argv(data, out, cache, "--resume", *workers))
    assert code == 0, err
    if step:  # where the stop line left it; "after epoch 0 and step 5/5 of epoch 1" named an epoch never trained
        at = re.search(r"at step (\d+)/(\d+) of epoch \d+", line)
        assert f"resumed {out} {at[0]}" in stdout
        assert ("the epoch's validation runs next" in stdout) == (at[1] == at[2])
    _assert_same_run(uninterrupted[cache], out)  # (its --workers 2 draws what the default's do, whatever their count)


# --- the auto recipe: trials, recipe.json, then the final run -------------------------------------------------------
# Compared by the final weights, the test split and the trials' scores: not by the final run's val columns, which
# depend on how the final run uses the validation images.


def _assert_same_auto_run(a: Path, b: Path) -> None:
    ra, rb = (json.loads((d / "recipe.json").read_text()) for d in (a, b))
    assert [t["val_acc"] for t in rb["trials"]] == [t["val_acc"] for t in ra["trials"]]
    assert {k: rb["choice"][k] for k in ("freeze", "lr", "epochs")} == {
        k: ra["choice"][k] for k in ("freeze", "lr", "epochs")
    }
    assert checkpoint.load(b / "last.pt")["epoch"] == checkpoint.load(a / "last.pt")["epoch"] == 2
    _assert_same_weights_and_test(a, b)


def test_an_auto_run_killed_during_a_trial_restarts_its_trials_to_the_uninterrupted_result(data, uninterrupted_auto,
                                                                                           tmp_path, capsys):  # fmt: skip
    out = tmp_path / "run"
    # the trial's last step: the features cached, the trial's epoch not finished
    killed = _stopped_run(_auto_argv(data, out), f"step#{TRIAL_STEPS}", signal.SIGKILL, tmp_path)
    assert killed.returncode == -signal.SIGKILL
    trials = out / "auto-trials"
    assert sorted(p.name for p in trials.iterdir()) == ["last-3"] and not (trials / "last-3" / "metrics.csv").exists()
    assert not (out / "recipe.json").exists() and not (out / "last.pt").exists()
    code, stdout, err = run_cli(capsys, *_auto_argv(data, out))  # the same command: no --resume, no --overwrite
    assert code == 0, err
    assert (
        f"{out}: the run there stopped before it finished an epoch (no last.pt): starting it afresh (cleared auto-trials)"
        in stdout
    )
    _assert_same_auto_run(uninterrupted_auto, out)
    assert _no_temp_files(out)


def test_an_auto_run_stopped_while_its_first_trial_builds_the_cache_says_so(data, tmp_path):
    # "stopped by SIGINT during the trial of the last 3 stage(s)": the user had seen the cache bar alone, and in a log
    # file not even the plan, printed only once the cache was built
    stopped = _stopped_run(_auto_argv(data, tmp_path / "run"), "cache", signal.SIGINT, tmp_path)
    assert stopped.returncode == 130
    assert stopped.stderr == ("freezetune: stopped by SIGINT during the trial of the last 3 stage(s) (trials are not "
                              "resumed), while building the feature cache; the same command, with or without "
                              "--resume, starts them again\n")  # fmt: skip
    said = stopped.stdout.splitlines()
    assert said[0].startswith("auto: choosing how many of the last stages to train"), said
    assert said[1].startswith("  what comes before blocks.1 is frozen in all of them"), said  # the intro's 2nd line
    assert said[2].startswith("  feature cache: building the training store: "), said


def test_a_train_command_stopped_before_its_run_starts_says_so_in_one_line(data, tmp_path):
    # a SIGTERM while the command still imported torch and read its config ended it with 143 and nothing said
    stopped = _stopped_run(_argv(data, tmp_path / "run", "off"), "start", signal.SIGTERM, tmp_path)
    assert stopped.returncode == 143
    assert stopped.stderr == ("freezetune: stopped by SIGTERM before the run started (nothing new saved); the same "
                              "command runs it again\n")  # fmt: skip
    assert not (tmp_path / "run").exists()
    swept = _stopped_run(["sweep", "--data", str(data), "--out", str(tmp_path / "sweep"), "--recipes", "linear-probe",
                          *TINY], "start", signal.SIGTERM, tmp_path)  # fmt: skip
    assert swept.returncode == 143
    assert swept.stderr.startswith("freezetune: stopped by SIGTERM outside its recipes' runs; --resume continues the "
                                   "sweep"), swept.stderr  # fmt: skip


def test_an_auto_run_killed_in_its_final_run_resumes_with_the_saved_decision(
    data, uninterrupted_auto, tmp_path, capsys
):
    out = tmp_path / "run"
    # the final run's second step: recipe.json written, no epoch finished
    killed = _stopped_run(_auto_argv(data, out), f"step#{TRIAL_STEPS + PROBE_STEPS + 2}", signal.SIGKILL, tmp_path)
    assert killed.returncode == -signal.SIGKILL
    assert (out / "recipe.json").exists() and not (out / "last.pt").exists()
    decision = snapshot(out / "auto-trials") | {"recipe.json": (out / "recipe.json").read_bytes()}
    # --resume keeps the decision and restarts the final run; killed again with epoch 2's last.pt not yet renamed
    killed = _stopped_run(_auto_argv(data, out, "--resume"), "rename:last.pt#2", signal.SIGKILL, tmp_path)
    assert killed.returncode == -signal.SIGKILL and "auto: choosing" not in killed.stdout
    assert checkpoint.load(out / "last.pt")["epoch"] == 1
    code, stdout, err = run_cli(capsys, *_auto_argv(data, out, "--resume"))
    assert code == 0 and "resumed" in stdout, err
    assert snapshot(out / "auto-trials") | {"recipe.json": (out / "recipe.json").read_bytes()} == decision
    _assert_same_auto_run(uninterrupted_auto, out)
    assert _no_temp_files(out)


# --- the run dir's states, in-process -------------------------------------------------------------------------------


def test_a_finished_epoch_is_never_restarted_over(data, uninterrupted, capsys):
    # the refusal of a plain re-run stays: what an earlier run finished is the user's
    before = snapshot(uninterrupted["off"])
    code, _, err = run_cli(capsys, *_argv(data, uninterrupted["off"], "off"))
    assert code == 2 and "--resume" in err and snapshot(uninterrupted["off"]) == before


def test_preparing_a_run_dir_clears_what_an_unfinished_run_left_and_stale_temp_files(tmp_path):
    run = tmp_path / "run"
    (run / "cache" / "train").mkdir(parents=True)
    (run / "notes.txt").write_text("x")
    (run / "classes.json").write_text('["a", "b"]')  # a run writes it first, as a list of its class names
    (run / "config.yaml").write_text("model: m\nepochs: 1\n")  # then its config, a mapping of config keys
    # stopped between epoch 1's best.pt and last.pt: a checkpoint of those classes, a row of a run's columns
    torch.save({"state_dict": {}, "classes": ["a", "b"], "model": "m", "preprocess": {}}, run / "best.pt")
    (run / "metrics.csv").write_text("epoch,epochs,train_loss,train_acc,val_acc\n1,1,0.9,0.5,0.5\n")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = run / f".last.pt.{dead.stdout.strip()}.0123abcd.tmp", run / f".best.pt.{os.getpid()}.0123abcd.tmp"
    stale.write_text("half"), live.write_text("being written")
    lines = []
    assert runtime.prepare_run_dir(str(run), "m", resume=True, echo=lines.append) == run
    assert len(lines) == 1 and "starting it afresh" in lines[0] and "metrics.csv" in lines[0]
    left = sorted(p.name for p in run.iterdir())
    assert left == [live.name, "classes.json", "config.yaml", "notes.txt"]  # the user's file and a live writer's stay


@pytest.mark.parametrize("resume", [False, True])
def test_files_of_a_runs_names_that_no_run_wrote_are_refused_and_kept(tmp_path, resume):
    # --out . in a project with its own cache/ folder and TensorBoard logs: "starting it afresh (cleared cache, ...)"
    # deleted them, although no run had ever been there
    run = tmp_path / "project"
    (run / "cache").mkdir(parents=True)
    (run / "cache" / "mine.npy").write_text("x")
    (run / "events.out.tfevents.123.host").write_text("x")
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"holds cache, events.out.tfevents.123.host, which no run wrote there"):
        runtime.prepare_run_dir(str(run), "m", resume=resume)
    assert snapshot(run) == before


@pytest.mark.parametrize("name", ["skipped.txt", "train.log"])
def test_a_users_own_file_a_run_writes_into_is_refused_and_kept(tmp_path, name):
    # --skip-bad replaced a user's skipped.txt in --out with its list, and a run appended its log to a user's train.log
    run = tmp_path / "project"
    run.mkdir()
    (run / name).write_text("MY NOTES\n")
    before = snapshot(run)
    with pytest.raises(ConfigError, match=rf"holds {name}, which no run wrote there \(no classes.json\)"):
        runtime.prepare_run_dir(str(run), "m", resume=False)
    assert snapshot(run) == before


@pytest.mark.parametrize("resume", [False, True])
def test_a_users_own_classes_json_does_not_make_their_files_a_stopped_runs(tmp_path, resume):
    # a project folder with its own classes.json (index -> name) and an auto-trials/ of notes was taken for a stopped
    # run: "starting it afresh (cleared metrics.csv, cache, auto-trials, ...)" deleted them, and classes.json was
    # overwritten
    run = tmp_path / "project"
    (run / "cache").mkdir(parents=True)
    (run / "auto-trials").mkdir()
    (run / "classes.json").write_text('{"0": "cat", "1": "dog"}')
    (run / "cache" / "embeddings.npy").write_text("x")
    (run / "auto-trials" / "notes.txt").write_text("mine")
    (run / "metrics.csv").write_text("epoch,acc\n1,0.9\n")
    (run / "events.out.tfevents.1700000000.host.1.0").write_text("x")
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"which no run wrote there \(its classes.json is not a run's, a JSON list"):
        runtime.prepare_run_dir(str(run), "m", resume=resume)
    assert snapshot(run) == before
    (run / "classes.json").unlink()  # its classes.json alone: a run's would replace it
    (run / "metrics.csv").unlink()
    shutil.rmtree(run / "cache"), shutil.rmtree(run / "auto-trials")
    (run / "events.out.tfevents.1700000000.host.1.0").unlink()
    (run / "classes.json").write_text("cat\ndog\n")
    with pytest.raises(ConfigError, match=r"holds classes.json, which no run wrote there"):
        runtime.prepare_run_dir(str(run), "m", resume=resume)
    assert (run / "classes.json").read_text() == "cat\ndog\n"


@pytest.mark.parametrize("resume", [False, True])
def test_a_users_list_of_class_names_does_not_make_their_files_a_stopped_runs(tmp_path, resume):
    # a classes.json of class names, as many projects keep, made the folder a stopped run's: "starting it afresh
    # (cleared cache, events...)" deleted the user's cache/ tree and TensorBoard files
    run = tmp_path / "project"
    (run / "cache" / "emb").mkdir(parents=True)
    (run / "classes.json").write_text('["cat", "dog"]')
    (run / "cache" / "emb" / "vectors.npy").write_text("x")
    (run / "events.out.tfevents.1700000000.host.1.0").write_text("x")
    before = snapshot(run)
    with pytest.raises(
        ConfigError,
        match=r"which no run wrote there \(no .freezetune-run, nor a run's config.yaml "
        r"beside its classes.json: a run of an earlier freezetune stopped",
    ):
        runtime.prepare_run_dir(str(run), "m", resume=resume)
    assert snapshot(run) == before
    (run / "classes.json").rename(tmp_path / "kept.json")  # an earlier freezetune's auto trial's: said the same way
    (run / "auto-trials" / "last-3").mkdir(parents=True)
    (tmp_path / "kept.json").rename(run / "auto-trials" / "last-3" / "classes.json")
    with pytest.raises(ConfigError, match=r"which no run wrote there \(no .freezetune-run, nor a run's config.yaml"):
        runtime.prepare_run_dir(str(run), "m", resume=resume)
    shutil.rmtree(run / "auto-trials")
    (run / "classes.json").write_text('["cat", "dog"]')
    # a run of an earlier freezetune, which wrote no mark: its class names and its config.yaml say it was one
    (run / "config.yaml").write_text("model: m\nepochs: 1\n")
    runtime.prepare_run_dir(str(run), "m", resume=resume, echo=lambda *_: None)
    assert sorted(p.name for p in run.iterdir()) == ["classes.json", "config.yaml"]


@pytest.mark.parametrize("resume", [False, True])
def test_a_users_model_beside_a_list_of_its_class_names_is_not_a_stopped_runs(tmp_path, resume):
    # a list of class names in classes.json, a best.pt and a metrics.csv of one row: taken for a run stopped after its
    # first epoch, "starting it afresh (cleared best.pt, metrics.csv)" deleted the user's model
    run = tmp_path / "mine"
    run.mkdir()
    (run / runtime.RUN_MARK).write_text("")  # even in a run's dir: a model it did not write is kept
    (run / "classes.json").write_text('["cat", "dog"]')
    (run / "best.pt").write_text("USERMODEL")
    (run / "metrics.csv").write_text("epoch,val_acc\n1,0.9\n")
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"holds best.pt, metrics.csv, which no run of its classes.json wrote"):
        runtime.prepare_run_dir(str(run), "m", resume=resume)
    assert snapshot(run) == before
    # a freezetune checkpoint, but of other classes than the list's
    record = {"state_dict": {}, "classes": ["ant", "bee"], "model": "m", "preprocess": {}}
    torch.save(record, run / "best.pt")
    (run / "metrics.csv").write_text("epoch,epochs,train_loss,train_acc,val_loss,val_acc\n1,3,0.9,0.6,0.8,0.7\n")
    with pytest.raises(ConfigError, match=r"holds best.pt, which no run"):
        runtime.prepare_run_dir(str(run), "m", resume=resume)
    # what a run of those classes stopped after its first epoch leaves: cleared, the run starts afresh
    torch.save({**record, "classes": ["cat", "dog"]}, run / "best.pt")
    runtime.prepare_run_dir(str(run), "m", resume=resume, echo=lambda *_: None)
    assert sorted(p.name for p in run.iterdir()) == [runtime.RUN_MARK, "classes.json"]


def test_a_run_stopped_right_after_its_mark_resumes_as_a_fresh_start(tmp_path):
    # the mark is its first file: a stop before classes.json left only it, and --resume said "holds no run"
    run = tmp_path / "run"
    run.mkdir()
    (run / runtime.RUN_MARK).write_text("")
    assert runtime.prepare_run_dir(str(run), "m", resume=True, echo=lambda *_: None) == run


def test_a_stopped_auto_runs_trial_marks_its_dir_as_a_runs(tmp_path):
    # the auto recipe's trials run below auto-trials/ before its own dir holds anything of a run's: what a run
    # stopped in its trials left there is cleared by the next start, as before
    run = tmp_path / "run"
    (run / "auto-trials" / "last-3").mkdir(parents=True)
    (run / "auto-trials" / "last-3" / runtime.RUN_MARK).write_text("")  # a run's first file
    lines = []
    runtime.prepare_run_dir(str(run), "m", resume=False, echo=lines.append)
    assert not (run / "auto-trials").exists() and "cleared auto-trials" in lines[0]


def test_a_run_is_refused_in_a_sweeps_folder(tmp_path):
    # train --out <a sweep's --out> put a run's files beside the sweep's, whose --resume then refused the folder
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "linear-probe").mkdir(parents=True)
    (sweep_dir / "sweep_config.yaml").write_text("lr: 0.001\n")
    before = snapshot(sweep_dir)
    for resume in (False, True):
        with pytest.raises(ConfigError, match=r"holds a sweep \(sweep_config.yaml\).*choose another --out"):
            runtime.prepare_run_dir(str(sweep_dir), "m", resume=resume)
    assert snapshot(sweep_dir) == before


@pytest.mark.parametrize(
    ("files", "needles"),
    [
        ({"metrics.csv": "epoch\n1\n2\n", "best.pt": "x"}, ["metrics.csv: 2 epochs"]),  # a run stopped mid-way
        ({"metrics.csv": "epoch\n1\n", "best.pt": "x", "report.png": "x"}, ["report.png"]),  # a 1-epoch run that ended
        ({"best.pt": "x", "classes.json": "[]"}, ["best.pt"]),  # only the weights kept
    ],
)
@pytest.mark.parametrize("resume", [False, True])
def test_a_run_dir_whose_last_pt_was_deleted_is_refused_not_restarted_over(tmp_path, files, needles, resume):
    # users delete last.pt, the largest file, to save disk: what the run finished is still theirs
    run = tmp_path / "run"
    run.mkdir()
    for name, text in files.items():
        (run / name).write_text(text)
    before = snapshot(run)
    with pytest.raises(ConfigError, match="no last.pt") as info:
        runtime.prepare_run_dir(str(run), "m", resume=resume)
    assert all(n in str(info.value) for n in [*needles, "another --out"]), info.value
    assert snapshot(run) == before


def test_a_run_logs_its_second_epoch_only_once_its_first_last_pt_is_on_disk(data, tmp_path, capsys, monkeypatch):
    # the rule above restarts a dir without last.pt holding one row: a slow disk must not let a second row in first
    from freezetune.run import reporting

    save, log_epoch, seen = checkpoint.save, reporting.MetricsLogger.log_epoch, []

    def slow_save(record, path):
        time.sleep(0.5 if Path(path).name == "last.pt" else 0)
        return save(record, path)

    def logged(self, row):
        seen.append((row["epoch"], (self.run_dir / "last.pt").exists()))
        log_epoch(self, row)

    monkeypatch.setattr(checkpoint, "save", slow_save)
    monkeypatch.setattr(reporting.MetricsLogger, "log_epoch", logged)
    code, _, err = run_cli(capsys, *_argv(data, tmp_path / "run", "off", "--epochs", "2", "--workers", "0"))
    assert code == 0, err
    assert seen == [(1, False), (2, True)]


def test_resume_of_a_dir_no_run_started_in_is_refused_and_a_finished_one_needs_it(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    for where in ("missing", "other"):  # a typo, or the user's own folder: nothing to resume, nothing touched
        with pytest.raises(CheckpointError, match=r"--resume \(resume=True\) needs the run dir of an existing run"):
            runtime.prepare_run_dir(str(tmp_path / where), "m", resume=True)
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "last.pt").write_text("x")
    with pytest.raises(ConfigError, match="--resume"):
        runtime.prepare_run_dir(str(tmp_path / "done"), "m", resume=False)


def test_signal_handlers_found_are_restored_after_listening():
    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        with StopRequest().listening(defer=True):
            assert signal.getsignal(signal.SIGTERM) is not mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_second_ctrl_c_in_the_training_loop_stops_at_once_and_says_so():
    # pressed twice a fraction of a second apart: "outside a training step (nothing new saved)" in mid-epoch
    stop = StopRequest()
    with pytest.raises(KeyboardInterrupt) as info, stop.listening(defer=True):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested  # the first is recorded, for the step's end
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert str(info.value).startswith("stopped by SIGINT a second time, at once, before the run saved its place")
    assert "outside a training step" not in str(info.value) and info.value.exit_code == 130


def test_a_loader_workers_death_after_a_recorded_stop_is_reported_as_the_stop():
    # where Ctrl-C cannot be blocked as workers are spawned (Windows), it killed them before the step it was recorded
    # for ended: the run said "a data loader worker exited unexpectedly ... try --workers 0", exit 2
    stop, died = StopRequest(), RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
    try:
        with pytest.raises(RunInterrupted) as info, stop.listening(defer=True):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            raise died
        assert str(info.value) == f"stopped by SIGINT {WORKERS_KILLED}" and info.value.exit_code == 130
        assert raised_stop() is info.value  # a later error of the dead workers is the stop's too
        forget_stop()
        with pytest.raises(RuntimeError, match="exited unexpectedly"), StopRequest().listening(defer=True):
            raise died  # no stop recorded: the worker's own death
        with pytest.raises(ValueError, match="bug"), StopRequest().listening(defer=True):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            raise ValueError("bug")  # not a worker's death: not the stop's
    finally:
        forget_stop()


def test_a_ctrl_c_that_kills_spawned_workers_as_they_start_is_the_runs_stop_without_signal_masks(data, tmp_path,
                                                                                                monkeypatch, capsys):  # fmt: skip
    # Windows: no pthread_sigmask to block it while the workers are spawned, so a console's Ctrl-C killed them, and
    # the run ended on "a data loader worker exited unexpectedly ... try --workers 0", exit 2
    multiprocessing.resource_tracker.ensure_running()  # (Windows has none; started without the mask, it needs one)
    monkeypatch.delattr(signal, "pthread_sigmask")
    out, workers = tmp_path / "run", ("--workers", "2")
    stopped = _stopped_run(_argv(data, out, "off", *workers), "workers#1", signal.SIGINT, tmp_path, group=True,
                           spawn=True)  # fmt: skip
    assert stopped.returncode == 130, stopped.stderr
    # freezetune's one line, among the workers' own KeyboardInterrupt, printed as they died
    said = [line for line in stopped.stderr.splitlines() if line.startswith("freezetune")]
    assert said == [f"freezetune: stopped by SIGINT {WORKERS_KILLED}"], stopped.stderr
    assert not (out / "last.pt").exists()  # no step was trained: the same command restarts the run
    monkeypatch.undo()  # (this process's forked workers read the mask)
    code, _, err = run_cli(capsys, *_argv(data, out, "off", *workers))
    assert code == 0, err


def test_a_signal_after_a_closed_output_pipe_is_still_acted_on_at_the_steps_end():
    # it counted as "a second time" and stopped at once, before the run saved its place
    from freezetune.run.interrupt import PIPE_CLOSED, output_closed

    stop = StopRequest()
    assert not output_closed()  # nobody listening: the write's error stands
    with stop.listening(defer=True):
        assert output_closed() and stop.signum == PIPE_CLOSED
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.signum == signal.SIGTERM  # recorded, for the step's end
    assert str(stop.interrupted("at step 2/5 of epoch 1 (saved in last.pt)")).startswith("stopped by SIGTERM at step")


def test_a_hangup_is_left_to_nohup():
    # under nohup (SIGHUP ignored) the run is meant to outlive the session
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopRequest().listening(defer=True):
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with StopRequest().listening(defer=True):
            assert signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)


_HANGUP_IN_A_TERMINAL = """
import os, signal, sys, time
from freezetune.run.interrupt import StopRequest
stop = StopRequest()
with stop.listening(defer=True):
    print("listening", flush=True)
    while stop.signum is None:  # until the terminal is closed: the kernel sends SIGHUP
        time.sleep(0.01)
    print("step after the hangup")  # into the closed terminal, it failed (EIO)
with open(sys.argv[1], "w") as f:
    f.write(f"{stop.name} {os.readlink('/proc/self/fd/1')} {os.readlink('/proc/self/fd/2')}")
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads where the output goes in /proc")
def test_a_hangup_of_a_run_printing_to_its_terminal_is_a_stop_with_the_output_put_aside(tmp_path):
    # a closed SSH session or terminal window (a killed tmux pane) under a run printing to it: SIGHUP's default killed
    # it mid-epoch, nothing saved and no line in train.log. It is now recorded as a stop, and the output that went to
    # the terminal goes to /dev/null, where writing it cannot fail the save. The terminal is really closed: once cut
    # off, it no longer says it is one (isatty)
    import pty

    said = tmp_path / "said"
    pid, main_fd = pty.fork()
    if pid == 0:  # the child: a session whose controlling terminal is the pty
        os.execv(sys.executable, [sys.executable, "-c", _HANGUP_IN_A_TERMINAL, str(said)])
    try:
        seen = b""
        while b"listening" not in seen:
            seen += os.read(main_fd, 1024)
    finally:
        os.close(main_fd)  # the terminal's other end goes: the kernel hangs up the child's session
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert said.read_text() == "SIGHUP /dev/null /dev/null"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_an_export_stopped_by_a_signal_says_so_and_leaves_no_temporary_file(data, uninterrupted, tmp_path, sig):
    # killed by the default SIGTERM mid-write, export said nothing (exit 143) and left ".m.onnx.PID.RANDOM.tmp" in
    # the user's folder, which no run dir's clean-up ever visits
    target = tmp_path / "out" / "m.safetensors"
    stopped = _stopped_run(["export", "--checkpoint", str(uninterrupted["off"] / "best.pt"), "--to", str(target)],
                           f"rename:{target.name}", sig, tmp_path)  # fmt: skip
    name = signal.Signals(sig).name
    assert stopped.returncode == 128 + sig, stopped.stderr
    assert stopped.stderr == f"freezetune: stopped by {name} before export finished (no file is left half-written)\n"
    assert not list((tmp_path / "out").iterdir())  # nor the file, nor its temporary one


@pytest.mark.parametrize("recipe", [None, "auto"])
def test_a_stopped_run_the_command_gave_no_out_names_its_run_dir_to_resume(data, tmp_path, capsys, monkeypatch, recipe):
    # "continue with --resume (resume=True)" (or, stopped in a trial, "the same command, with or without --resume"): without --out
    # the resume was refused ("no run dir given"), and nothing had named which of runs/ the run was
    from _engine_fixtures import TINY
    from freezetune.training import trainer

    monkeypatch.chdir(tmp_path)
    # Ctrl-C as the second epoch starts (the auto recipe: in its first trial)
    stop = stopping_at(lambda run, epoch: epoch == 1 or recipe == "auto", lambda: signal.raise_signal(signal.SIGINT))
    monkeypatch.setattr(trainer.Trainer, "_run_epoch", stop)
    argv = ["train", "--data", str(data), *TINY, "--epochs", "2", *(["--freeze", "backbone"] if recipe is None else [])]
    code, _, err = run_cli(capsys, *argv)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert code == 130 and f"(the run dir: give --out {run_dir} (out='{run_dir}'))" in err, err
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *argv, "--out", str(run_dir), "--resume")
    assert code == 0 and "test accuracy" in out, err


def test_a_stop_while_the_cache_is_rebuilt_after_an_unfreeze_ends_the_run_at_once(data, tmp_path, capsys):
    # the rebuild ran to its end (minutes on a large set, past a cluster's grace period), then a step trained only
    # to be saved mid-epoch
    out = tmp_path / "run"
    argv = _argv(data, out, "auto", "--unfreeze", "epoch:1")
    stopped = _stopped_run(argv, "rebuild", signal.SIGTERM, tmp_path)
    assert stopped.returncode == 143 and stopped.stderr == (
        "freezetune: stopped by SIGTERM while the feature cache was rebuilt after epoch 1 (saved in last.pt); "
        "continue with --resume (resume=True)\n"
    ), stopped.stderr
    last = checkpoint.load(out / "last.pt")
    assert last["epoch"] == 1 and not last["progress"]["step"]  # the finished epoch, no step of the next
    code, _, err = run_cli(capsys, *argv, "--resume")
    assert code == 0 and checkpoint.load(out / "last.pt")["epoch"] == 3, err


def test_a_stopped_resume_leaves_its_report_and_test_files_true_to_what_it_saved(data, tmp_path, capsys, monkeypatch):
    # a resume that moved best.pt and was then stopped kept the earlier best.pt's test_metrics.json and confusion.png,
    # and a report.png of the epochs before it: both were put right only at a run's end
    import json

    from freezetune.run import directory as runtime
    from freezetune.training import trainer

    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(out), *TINY, "--freeze", "-3", "--scheduler", "none"]
    assert run_cli(capsys, *argv, "--epochs", "1")[0] == 0
    scored = json.loads((out / runtime.TEST_METRICS).read_text())
    (out / runtime.TEST_METRICS).write_text(json.dumps({**scored, "epoch": 7}))  # another best.pt's score
    # SIGTERM in the resume's second epoch
    stop = stopping_at(lambda run, epoch: epoch == 2, lambda: signal.raise_signal(signal.SIGTERM))
    monkeypatch.setattr(trainer.Trainer, "_run_epoch", stop)
    code, stdout, err = run_cli(capsys, *argv, "--epochs", "4", "--resume")
    assert code == 143 and "removed test_metrics.json, confusion.png: they scored an earlier best.pt" in stdout, err
    assert not (out / runtime.TEST_METRICS).exists() and not (out / runtime.CONFUSION_PNG).exists()
    assert (out / "report.png").stat().st_mtime_ns >= (out / "metrics.csv").stat().st_mtime_ns  # redrawn


def test_a_second_sigterm_in_the_training_loop_lets_the_save_go_on(monkeypatch):
    # a scheduler's wrapper sending SIGTERM twice 50 ms apart (to the job, to its step) stopped the run "a second
    # time, at once, before the run saved its place": SIGKILL is the deadline, a second Ctrl-C the user's own
    from freezetune.run import interrupt

    monkeypatch.setattr(interrupt, "_leave_the_terminal", lambda fds: None)  # pytest -s: its terminal stays its own
    stop = StopRequest()
    with stop.listening(defer=True):
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGHUP):
            os.kill(os.getpid(), sig)
            time.sleep(0.05)
        assert stop.name == "SIGTERM"  # recorded, for the step's end
        with pytest.raises(KeyboardInterrupt, match="^stopped by SIGINT a second time, at once"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
