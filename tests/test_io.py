"""``_io``: every write lands whole or not at all, and leaves no temporary file behind."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from freezetune._io import atomic_output, atomic_save, atomic_write_text, remove_stale_temps_of


def test_atomic_save_keeps_old_file_when_save_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"epoch": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        atomic_save({"epoch": 2, "fn": lambda: None}, path)
    assert torch.load(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_atomic_write_text_replaces_and_cleans_up(tmp_path):
    path = tmp_path / "deep" / "note.txt"
    atomic_write_text(path, "one\n")
    atomic_write_text(path, "two\n")
    assert path.read_text() == "two\n"
    assert [p.name for p in path.parent.iterdir()] == ["note.txt"]


FULL_DISK = """
import resource, sys, torch
from freezetune._io import atomic_save
path = sys.argv[1]
atomic_save({"epoch": 1}, path)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))  # a full disk
try:
    atomic_save({"epoch": 2, "w": torch.zeros(1 << 18)}, path)
except OSError as exc:
    print(exc.errno, exc.filename)
"""


def test_a_full_disk_under_torch_save_is_an_os_error_naming_the_file(tmp_path):
    # torch's zip writer turned the failed write into a RuntimeError: the CLI printed a 40-line traceback, exit 1
    import errno

    path = tmp_path / "last.pt"
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(errno.EFBIG), str(path)]  # the file the user knows, not the temporary one
    assert torch.load(path) == {"epoch": 1} and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_read_only_place_is_named_by_the_users_path_not_the_hidden_temporary_one(tmp_path, monkeypatch):
    # on a read-only mount the temporary file cannot be made, nor unlinked: the unlink's error replaced the first,
    # naming the hidden temporary file
    import errno
    from pathlib import Path

    from freezetune import _io

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(args[0]))

    monkeypatch.setattr(_io, "open", read_only, raising=False)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError) as caught:
        atomic_write_text(tmp_path / "note.txt", "x")
    assert caught.value.errno == errno.EROFS and caught.value.filename == str(tmp_path / "note.txt")


@pytest.mark.parametrize(("platform", "held_for", "replaced"), [("win32", 3, True), ("win32", 99, False),
                                                                ("linux", 1, False)])  # fmt: skip
def test_a_file_another_process_holds_open_on_windows_is_replaced_once_it_lets_go(tmp_path, monkeypatch, platform,
                                                                                   held_for, replaced):  # fmt: skip
    # Windows: PermissionError [WinError 32] when a user's eval (or TensorBoard, a virus scanner) had best.pt open
    # at the moment of the save; the run died on it. On POSIX a PermissionError is a real one: no waiting
    import os

    from freezetune import _io

    real, tries = os.replace, []

    def held(src, dst):
        tries.append(dst)
        if len(tries) <= held_for:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        real(src, dst)

    monkeypatch.setattr(_io.sys, "platform", platform)
    monkeypatch.setattr(_io.os, "replace", held)
    monkeypatch.setattr(_io.time, "sleep", lambda s: None)
    target = tmp_path / "best.pt"
    target.write_text("old")
    if replaced:
        atomic_write_text(target, "new")
        assert target.read_text() == "new" and len(tries) == held_for + 1
    else:
        with pytest.raises(PermissionError):
            atomic_write_text(target, "new")
        assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temp left
        assert len(tries) == (len(_io._REPLACE_RETRY_S) + 1 if platform == "win32" else 1)


def test_a_stale_temp_that_cannot_be_removed_is_left_not_a_reason_to_stop_the_writer(tmp_path, monkeypatch):
    # another user's dead writer's file in a shared folder: eval --plot there failed with PermissionError, and its
    # --metrics, asked for by name, were not written
    from freezetune._io import remove_stale_temps_of

    stale = tmp_path / ".cm.png.999999999.0123abcd.tmp"
    stale.write_bytes(b"half")

    def refused(self, missing_ok=False):
        raise PermissionError(1, "Operation not permitted", str(self))

    monkeypatch.setattr(Path, "unlink", refused)
    assert remove_stale_temps_of([tmp_path / "cm.png"]) == [] and stale.exists()


def test_a_target_named_near_the_file_systems_limit_is_written_and_its_leftover_found(tmp_path):
    # the hidden temporary name adds ".PID.RANDOM.tmp": an export to a 244-character name (legal) failed in
    # "File name too long", naming a file the user had not named
    target = tmp_path / ("m" * 240 + ".onnx")
    atomic_write_text(target, "model")
    assert target.read_text() == "model" and os.listdir(tmp_path) == [target.name]
    with atomic_output(target) as tmp:
        leftover = tmp.with_name(tmp.name.replace(f".{os.getpid()}.", ".9999999."))  # a pid past any pid_max
        tmp.rename(leftover)  # as a writer killed mid-write leaves it
        tmp.write_text("again")
    assert remove_stale_temps_of([target]) == [leftover]
