"""The files an ``hf:DIR`` model's checkpoint carries, written back where the model is built from them."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from freezetune.model.hf_bundle import rebuilt_folder


def test_a_home_without_a_writable_cache_rebuilds_the_bundle_in_the_temp_dir(tmp_path, monkeypatch):
    # a read-only home (a container, a cluster node) stopped eval, predict and a resume in "Not a directory"
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))  # under a file: no folder can be made
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    files = {"config.json": base64.b64encode(b'{"model_type": "bert"}').decode()}
    folder = rebuilt_folder(f"hf:{tmp_path / 'gone'}", files)
    assert folder.startswith(str(tmp_path / "tmp" / f"freezetune-hf-bundles-{os.getuid()}"))
    assert (Path(folder) / "config.json").read_bytes() == b'{"model_type": "bert"}'
    assert rebuilt_folder(f"hf:{tmp_path / 'gone'}", files) == folder  # once: the same folder, by its content
