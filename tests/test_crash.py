"""Crash safety: a real training process killed (SIGKILL) or stopped (SIGTERM, SIGINT) at a chosen moment leaves a
run dir that ``--resume`` continues, or a plain re-run restarts, to the same metrics as an uninterrupted run.

The moments are hit exactly, not by sleeps: ``FREEZETUNE_TEST_PAUSE_AT`` holds the process at a named point
(``freezetune.interrupt.pause_point``) until the test has signalled it. CPU, fixed seed, the default loader workers
(two processes for image files).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _engine_fixtures import make_image_folder, run_cli, snapshot
from freezetune import checkpoint, runtime
from freezetune.cli import main
from freezetune.errors import CheckpointError, ConfigError
from freezetune.interrupt import PAUSE_ENV, PAUSE_MARKER_ENV, StopRequest

pytestmark = pytest.mark.usefixtures("single_thread_module")

# 18 training images in batches of 4: 5 steps an epoch. No --workers: the default (loader processes) is under test.
RUN = ["--model", "timm:test_efficientnet", "--weights", "none", "--img-size", "32", "--device", "cpu",
       "--no-progress", "--batch-size", "4", "--epochs", "3", "--freeze", "-3", "--no-tensorboard"]  # fmt: skip


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


def _argv(data: Path, out: Path, cache: str, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), *RUN, "--cache", cache, *extra]


def _stopped_run(argv: list[str], pause_at: str, sig: int, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``python -m freezetune ARGV`` until it holds at ``pause_at``, send it ``sig`` there, let it go on."""
    marker = tmp_path / "paused"
    env = {**os.environ, PAUSE_ENV: pause_at, PAUSE_MARKER_ENV: str(marker), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "freezetune", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), f"never reached {pause_at}: {proc.communicate(timeout=30)}"
    proc.send_signal(sig)
    if sig != signal.SIGKILL:
        time.sleep(0.3)  # the handler records the signal; then the run may leave the pause and act on it
        marker.unlink()
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_run(a: Path, b: Path) -> None:
    """Every epoch's train/val metrics and LRs, the final weights and the test accuracy match."""
    ra, rb = _rows(a), _rows(b)
    assert [r["epoch"] for r in rb] == [r["epoch"] for r in ra] == ["1", "2", "3"]
    for x, y in zip(ra, rb, strict=True):
        for key in [k for k in x if k.startswith(("train_", "val_", "lr/"))]:
            assert float(y[key]) == pytest.approx(float(x[key]), rel=1e-6, abs=1e-9), (x["epoch"], key)
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

STOPS = [
    pytest.param(signal.SIGTERM, "step#4", "off", "at epoch 1, step 4", id="sigterm-mid-epoch"),
    pytest.param(signal.SIGTERM, "cache", "auto", "", id="sigterm-cache-build"),
    pytest.param(signal.SIGINT, "step#7", "auto", "at epoch 2, step 2", id="sigint-mid-epoch-cached"),
]


@pytest.mark.parametrize(("sig", "pause_at", "cache", "where"), STOPS)
def test_a_stopped_run_saves_its_place_and_resumes_to_the_uninterrupted_metrics(data, uninterrupted, tmp_path, capsys,
                                                                                sig, pause_at, cache, where):  # fmt: skip
    out = tmp_path / "run"
    stopped = _stopped_run(_argv(data, out, cache), pause_at, sig, tmp_path)
    assert stopped.returncode == 128 + sig, stopped.stderr
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stopped.stderr, stopped.stderr
    assert lines[0].startswith("freezetune: stopped by SIG") and "--resume" in lines[0] and where in lines[0]
    if where:  # stopped in the training loop: last.pt holds that step, not a finished epoch
        last, rows = checkpoint.load(out / "last.pt"), _rows(out) if (out / "metrics.csv").exists() else []
        assert last["progress"]["step"] == int(where.rsplit(" ", 1)[1]) and len(rows) == last["epoch"]
    code, _, err = run_cli(capsys, *_argv(data, out, cache, "--resume"))
    assert code == 0, err
    _assert_same_run(uninterrupted[cache], out)


# --- the run dir's states, in-process -------------------------------------------------------------------------------


def test_a_finished_epoch_is_never_restarted_over(data, uninterrupted, capsys):
    # the refusal of a plain re-run stays: what an earlier run finished is the user's
    before = snapshot(uninterrupted["off"])
    code, _, err = run_cli(capsys, *_argv(data, uninterrupted["off"], "off"))
    assert code == 2 and "--resume" in err and snapshot(uninterrupted["off"]) == before


def test_preparing_a_run_dir_clears_what_an_unfinished_run_left_and_stale_temp_files(tmp_path):
    run = tmp_path / "run"
    (run / "cache" / "train").mkdir(parents=True)
    for name in ("metrics.csv", "best.pt", "config.yaml", "notes.txt"):
        (run / name).write_text("x")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = run / f".last.pt.{dead.stdout.strip()}.0123abcd.tmp", run / f".best.pt.{os.getpid()}.0123abcd.tmp"
    stale.write_text("half"), live.write_text("being written")
    lines = []
    assert runtime.prepare_run_dir(str(run), "m", resume=True, echo=lines.append) == run
    assert len(lines) == 1 and "starting it afresh" in lines[0] and "metrics.csv" in lines[0]
    left = sorted(p.name for p in run.iterdir())
    assert left == [live.name, "config.yaml", "notes.txt"]  # the user's file and a live writer's stay


def test_resume_of_a_dir_no_run_started_in_is_refused_and_a_finished_one_needs_it(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    for where in ("missing", "other"):  # a typo, or the user's own folder: nothing to resume, nothing touched
        with pytest.raises(CheckpointError, match="last.pt does not exist"):
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
