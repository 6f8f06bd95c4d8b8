"""The files an ``hf:DIR`` model's checkpoint carries, written back where the model is built from them."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

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


def test_a_checkpoint_carrying_files_outside_its_model_folder_writes_nothing(tmp_path, capsys, monkeypatch):
    # the bundled files are written back by their names: a crafted best.pt's "../x" or "/home/me/.bashrc" was written
    # by predict and eval, and export overwrote it (a .pth file in site-packages then ran at the next python start)
    import torch

    from _engine_fixtures import confident_checkpoint, run_cli
    from freezetune.errors import CheckpointError
    from freezetune.model import hf_bundle
    from freezetune.run import checkpoint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's")
    record = torch.load(confident_checkpoint(tmp_path / "run"), weights_only=True)
    evil = base64.b64encode(b"overwritten").decode()
    record["hf_files"] = {"config.json": base64.b64encode(b"{}").decode(), "../../../victim.txt": evil,
                          str(tmp_path / "absolute.pth"): evil}  # fmt: skip
    torch.save(record, tmp_path / "crafted.pt")
    for argv in (["export", "--checkpoint", tmp_path / "crafted.pt", "--to", tmp_path / "m.safetensors"],
                 ["predict", "--checkpoint", tmp_path / "crafted.pt", tmp_path]):  # fmt: skip
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert "carries file(s) '../../../victim.txt', " in err and "refused" in err
    assert victim.read_text() == "the user's" and not (tmp_path / "absolute.pth").exists()
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.raises(CheckpointError, match=r"carries file\(s\) '\.\./\.\./\.\./victim\.txt'"):
        hf_bundle.write(record["hf_files"], tmp_path / "folder")  # a record made in memory: refused where written
    assert not (tmp_path / "folder").exists() and victim.read_text() == "the user's"
    assert checkpoint.load(tmp_path / "run" / "best.pt")  # an honest one loads


def test_a_bundle_folder_written_anew_removes_a_dead_exports_leftovers_and_not_a_live_ones(tmp_path):
    # an export to the same target running beside this one had its half-written folder removed as "an earlier
    # export's leftover", and failed on "No such file or directory (ex/.m.hf.23018.new.tmp/config.json)"
    import subprocess
    import sys

    from freezetune.model.hf_bundle import write_anew

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        for pid in (live.pid, int(dead.stdout), os.getpid()):  # (this process's: an earlier call's, stopped)
            (tmp_path / f".m.hf.{pid}.new.tmp").mkdir()
        (tmp_path / f".m.hf.{os.getpid()}.new.tmp" / "modules.json").write_text("[]")  # not in the new bundle
        (tmp_path / ".m.hf.mine.tmp").mkdir()  # named otherwise: not an export's
        write_anew({"config.json": base64.b64encode(b"{}").decode()}, tmp_path / "m.hf")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["m.hf", f".m.hf.{live.pid}.new.tmp", ".m.hf.mine.tmp"]
        )
        assert [p.name for p in (tmp_path / "m.hf").iterdir()] == ["config.json"]
    finally:
        live.kill()
        live.wait()


def test_a_bundle_in_the_temp_dir_keeps_no_file_another_user_placed_there(tmp_path, monkeypatch):
    # the temp dir's folder is every user's to make: a config.json planted under the checkpoint's digest built another
    # model (relu for gelu) for predict, in silence
    import tempfile

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))
    (tmp_path / "file").write_text("")  # no cache folder can be made under a file: the temp dir is used
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    files = {"config.json": base64.b64encode(b'{"hidden_act": "gelu"}').decode()}
    folder = Path(rebuilt_folder(f"hf:{tmp_path / 'gone'}", files))
    (folder / "config.json").write_text('{"hidden_act": "relu"}')  # planted
    assert Path(rebuilt_folder(f"hf:{tmp_path / 'gone'}", files)) == folder
    assert (folder / "config.json").read_text() == '{"hidden_act": "gelu"}'
    os.chmod(folder.parent, 0o777)  # this user's, others may write in it: made private again
    assert Path(rebuilt_folder(f"hf:{tmp_path / 'gone'}", files)) == folder
    assert (folder.parent.stat().st_mode & 0o777) == 0o700
    if os.getuid() != 0:
        pytest.skip("a folder of another user's: only root can make one")
    os.chown(folder.parent, 65534, 65534)
    elsewhere = Path(rebuilt_folder(f"hf:{tmp_path / 'gone'}", files))  # another user's: not used
    assert elsewhere.parent != folder.parent and (elsewhere.parent.stat().st_mode & 0o777) == 0o700
    assert (elsewhere / "config.json").read_text() == '{"hidden_act": "gelu"}'


@pytest.mark.parametrize("name", ["D:evil.pth", "D:", "D:1_Pooling/config.json", "1_Pooling/C:/config.json",
                                  "C:\\Users\\me\\evil.pth", "\\\\host\\share\\config.json", "/x/config.json",
                                  "//host/share/config.json", "1_Pooling/../../config.json"])  # fmt: skip
def test_a_bundled_name_that_leaves_the_model_folder_on_windows_is_refused(name, monkeypatch):
    # D:x is the current folder of drive D there, and /x is no absolute path (the current drive's root): joined to
    # the model folder, a crafted checkpoint's names were written outside it
    from pathlib import PureWindowsPath

    from freezetune.model import text_pooling
    from freezetune.model.hf_bundle import foreign_names

    honest = {"config.json": "", "1_Pooling/config.json": ""}
    for flavour in (text_pooling.Path, PureWindowsPath):  # this system's paths, and Windows' (a path read as there)
        monkeypatch.setattr(text_pooling, "Path", flavour)
        assert foreign_names({name: "", **honest}) == [name]


@pytest.mark.parametrize("name", ["NUL", "con.json", "Aux.txt", "COM1", "lpt9.json", "COM\u00b9", "CONOUT$",
                                  "nul /config.json", "PRN/config.json"])  # fmt: skip
def test_a_bundled_name_that_is_a_windows_device_is_refused(name):
    # in every folder of Windows, NUL or con.json is a device whatever the extension: written back, a checkpoint's
    # file went to the console, a printer port or nowhere
    from freezetune.model.hf_bundle import foreign_names

    honest = {"config.json": "", "1_Pooling/config.json": "", "console.json": "", "nullable.txt": "", "COM10": ""}
    assert foreign_names({name: "", **honest}) == [name]


def test_a_bundle_goes_to_the_temp_dir_where_the_system_has_no_user_ids(tmp_path, monkeypatch):
    # Windows has no os.getuid: a checkpoint whose model folder was gone stopped eval there with AttributeError
    import getpass
    import tempfile

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))  # under a file: the temp dir is used
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.delattr(os, "getuid")
    monkeypatch.setattr(getpass, "getuser", lambda: "me")
    files = {"config.json": base64.b64encode(b'{"model_type": "bert"}').decode()}
    folder = rebuilt_folder(f"hf:{tmp_path / 'gone'}", files)
    assert Path(folder).parent == tmp_path / "tmp" / "freezetune-hf-bundles-me"
    assert rebuilt_folder(f"hf:{tmp_path / 'gone'}", files) == folder  # its own folder: used again
