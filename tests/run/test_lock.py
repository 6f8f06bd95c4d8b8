"""One run directory, one process: a second process is refused, whatever the files in the directory say."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from _engine_fixtures import make_image_folder, run_cli, snapshot, train_argv
from freezetune.run import directory as runtime
from freezetune.run import lock as run_lock
from freezetune.run.lock import RunDirInUse

HOLDER = "import sys, time; from freezetune.run import lock as run_lock; run_lock.claim(sys.argv[1]); print('held', flush=True); " \
         "time.sleep(120)"  # fmt: skip


@contextlib.contextmanager
def held_elsewhere(run_dir: Path, env: dict | None = None):
    """Another process holding ``run_dir`` (as a run training there does) until the block ends; its pid."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_directory_another_process_holds_is_refused_until_that_process_dies(tmp_path):
    with held_elsewhere(tmp_path / "run") as holder:
        with pytest.raises(RunDirInUse, match=rf"is in use by another freezetune process \(pid {holder.pid}\)"):
            run_lock.claim(tmp_path / "run")
        with pytest.raises(RunDirInUse):  # the same directory by another path
            run_lock.claim(tmp_path / "x" / ".." / "run")
        holder.send_signal(signal.SIGKILL)  # killed, it leaves no lock behind
        holder.wait()
        with run_lock.scope():
            run_lock.claim(tmp_path / "run")


def test_a_process_with_a_temp_dir_of_its_own_holds_the_same_lock(tmp_path, monkeypatch):
    # two batch jobs, each given a TMPDIR of its own by the scheduler, both ran into one --out: each locked in its own
    import os
    import tempfile

    (tmp_path / "job1").mkdir(), (tmp_path / "job2").mkdir()
    with held_elsewhere(tmp_path / "run", env={**os.environ, "TMPDIR": str(tmp_path / "job1")}) as holder:
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "job2"))
        with pytest.raises(RunDirInUse, match=rf"in use by another freezetune process \(pid {holder.pid}\)"):
            run_lock.claim(tmp_path / "run")
    assert list((tmp_path / "job1").iterdir()) == list((tmp_path / "job2").iterdir()) == []


def test_claims_are_reentrant_in_a_process_and_released_by_the_scope_that_made_them(tmp_path):
    # the auto recipe claims its dir, its final run claims it again: the run's end must not release the recipe's
    with run_lock.scope():
        run_lock.claim(tmp_path / "run")
        with run_lock.scope():
            run_lock.claim(tmp_path / "run")
            run_lock.claim(tmp_path / "run" / "trial")
        assert _refused_elsewhere(tmp_path / "run") and not _refused_elsewhere(tmp_path / "run" / "trial")
    assert not _refused_elsewhere(tmp_path / "run")


def test_two_spellings_of_one_directory_are_one_lock(tmp_path):
    # on macOS's file systems (case-insensitive by default) --out runs/A and --out runs/a are one folder: two locks, and
    # two runs wrote into it. A folder here that finds an entry under its name in the other case (a hard link under the
    # swapped name, as such a file system answers) stands for one
    folds, keeps = tmp_path / "folds", tmp_path / "keeps"
    for folder in (folds, keeps):
        folder.mkdir()
        (folder / "Probe").write_text("")
    (folds / "pROBE").hardlink_to(folds / "Probe")
    (tmp_path / "link").symlink_to(folds)
    with held_elsewhere(folds / "Run"):  # not made yet: named the same once it is
        assert _refused_elsewhere(folds / "run") and _refused_elsewhere(tmp_path / "link" / "RUN")
    with held_elsewhere(keeps / "Run"):  # a folder that tells them apart: two directories
        assert not _refused_elsewhere(keeps / "run") and _refused_elsewhere(keeps / "Run")


def test_a_run_dirs_lock_is_named_the_same_before_and_after_its_folders_are_made(tmp_path, monkeypatch):
    # a run claims its dir before it makes it: a second run, started once it was made, must find the same lock
    from freezetune.run import lock

    folds = tmp_path / "folds"
    folds.mkdir()
    monkeypatch.setattr(lock, "_folds_case", lambda folder: folder.is_relative_to(folds) or None)
    before = lock._identity(folds / "Run" / "Sub")
    (folds / "Run" / "Sub").mkdir(parents=True)
    assert lock._identity(folds / "run" / "SUB") == before == str(folds / "run" / "sub")


def _refused_elsewhere(run_dir: Path) -> bool:
    code = "import sys; from freezetune.run import lock as run_lock\ntry:\n run_lock.claim(sys.argv[1])\nexcept run_lock." \
           "RunDirInUse:\n sys.exit(3)"  # fmt: skip
    return subprocess.run([sys.executable, "-c", code, str(run_dir)]).returncode == 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), train=8, val=0, test=2)


@pytest.mark.parametrize("extra", [(), ("--freeze", "-3"), ("--freeze", "-3", "--resume"),
                                   ("--recipe", "lp-ft", "--resume")])  # fmt: skip
def test_a_run_into_a_directory_in_use_is_refused_in_one_line_and_changes_nothing(data, tmp_path, capsys, extra):
    # two runs on one --out both exited 0: metrics.csv held both runs' rows, and one scored the other's best.pt
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_argv(data, out, "--epochs", "1", *extra[:2]))
    assert code == 0, err
    before = snapshot(out)
    with held_elsewhere(out) as holder:
        code, stdout, err = run_cli(capsys, *train_argv(data, out, "--epochs", "1", *extra))
    assert code == 2 and stdout == ""
    assert err == f"freezetune: error: '{out}' is in use by another freezetune process (pid {holder.pid}): wait for " \
                  "it to end, or give another --out (out=...)\n"  # fmt: skip
    assert snapshot(out) == before


def test_a_refused_resume_of_an_auto_run_asking_more_epochs_leaves_its_decision_as_it_was(data, tmp_path, capsys):
    # the resume rewrote recipe.json ("trains 3 epochs, as --epochs asks now") before it was refused: a later plain
    # --resume of the finished run then trained on to the refused command's epochs
    out = tmp_path / "run"
    flat = ("--scheduler", "none")  # (a run of a constant LR may be resumed for more epochs)
    code, _, err = run_cli(capsys, *train_argv(data, out, "--epochs", "1", *flat))  # the default recipe: auto
    assert code == 0 and (out / "recipe.json").is_file(), err
    before = snapshot(out)
    with held_elsewhere(out) as holder:
        code, _, err = run_cli(capsys, *train_argv(data, out, "--epochs", "3", *flat, "--resume"))
    assert code == 2 and f"is in use by another freezetune process (pid {holder.pid})" in err
    assert snapshot(out) == before


def test_runs_without_out_started_in_one_second_get_a_directory_each(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runtime, "default_run_dir", lambda model: Path("runs") / "m-20261202-101010")
    (tmp_path / "runs" / "m-20261202-101010").mkdir(parents=True)  # a run that began this second (or ended)
    with held_elsewhere(tmp_path / "runs" / "m-20261202-101010-2"), run_lock.scope():  # one starting beside us
        assert runtime.new_run_dir("timm:m") == Path("runs/m-20261202-101010-3")
        assert _refused_elsewhere(tmp_path / "runs" / "m-20261202-101010-3")  # and claimed for this run


def test_a_second_sweep_into_a_directory_in_use_is_refused_before_any_recipe(tmp_path):
    from freezetune.config.train_config import TrainConfig
    from freezetune.recipes.sweep import sweep

    (tmp_path / "no-data-needed").mkdir()  # not read: the sweep only checks that it exists
    cfg = TrainConfig(data=str(tmp_path / "no-data-needed"), model="timm:test_efficientnet", weights="none",
                      img_size=32)  # fmt: skip
    with held_elsewhere(tmp_path / "sweep"), pytest.raises(RunDirInUse):
        sweep(cfg, "linear-probe", out=tmp_path / "sweep", echo=lambda line: None)
    assert not (tmp_path / "sweep").exists()


def test_a_lock_folder_others_can_write_is_not_used_and_the_run_goes_on_unguarded(tmp_path, monkeypatch, caplog):
    # the temp dir is shared: a folder another user made first could hold links to this user's files, which the
    # pid would then be written into
    import os

    monkeypatch.setattr(run_lock, "LOCK_ROOT", str(tmp_path))
    folder = tmp_path / f"freezetune-locks-{os.getuid()}"
    folder.mkdir()
    folder.chmod(0o777)
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    with caplog.at_level("WARNING"), run_lock.scope():
        run_lock.claim(tmp_path / "run")  # no error: unguarded, said once
    assert "not locked against a second process" in caplog.text and victim.read_text() == "mine"
    assert list(folder.iterdir()) == []


def test_a_run_started_by_a_worker_importing_an_unguarded_script_is_refused_with_the_fix(tmp_path, monkeypatch):
    # macOS and Windows spawn loader workers, which import the user's script as __mp_main__: a script that trains at
    # top level started a run in each worker ("in use by another freezetune process (pid <the user's own>)")
    import multiprocessing

    import freezetune as ft
    from freezetune.config.train_config import TrainConfig

    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)  # (as spawn sets it)
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "finetune.py")])
    out = tmp_path / "run"
    with pytest.raises(run_lock.ConfigError, match=r"while it imported .*finetune\.py: .*if __name__ == \"__main__\":"):
        ft.train(TrainConfig(data=str(tmp_path / "images"), out=str(out)))  # (a run dir beside it, not in it)
    assert not out.exists()


def test_an_unguarded_script_run_with_spawned_workers_says_what_to_do(tmp_path):
    data = make_image_folder(tmp_path / "data", train=4, val=2, test=0, size=16)
    script = tmp_path / "finetune.py"
    script.write_text(
        "import multiprocessing\n"
        "multiprocessing.set_start_method('spawn', force=True)  # as on macOS\n"
        "import freezetune as ft\n"
        "from freezetune.config.train_config import TrainConfig\n"
        f"ft.train(TrainConfig(model='timm:test_efficientnet', weights='none', data={str(data)!r}, img_size=16, "
        f"epochs=1, freeze='-2', workers=2, cache='off', device='cpu', out={str(tmp_path / 'run')!r}, "
        "tensorboard=False, progress=False, final_test=False))\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"while it imported {script}: on macOS and Windows each loader worker" in proc.stderr
    assert "in use by another freezetune process" not in proc.stderr
