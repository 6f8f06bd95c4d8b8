"""``_io``: every write lands whole or not at all, and leaves no temporary file behind."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

from freezetune._io import atomic_save, atomic_write_text


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
