"""``_io``: every write lands whole or not at all, and leaves no temporary file behind."""

from __future__ import annotations

import pickle

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
