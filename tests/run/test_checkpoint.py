"""Checkpoints: what ``best.pt``/``last.pt`` hold, rebuilding a model from one, unreadable files (their RNG state:
test_rng.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import freezetune as ft
from freezetune.errors import CheckpointError, ConfigError
from freezetune.model.create import create_model
from freezetune.model.preprocess import Preprocess
from freezetune.run import checkpoint, checkpoint_writer

CLASSES = ["cat", "dog", "emu"]


pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def trained():
    """A timm test model with a new 3-class head, its BatchNorm statistics moved away from the init."""
    torch.manual_seed(0)
    model, _ = create_model("timm:test_efficientnet", "none")
    ft.replace_head(model, len(CLASSES))
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32) * 3 + 1)
    return model.eval()


def _record(model, **cfg):
    config = {"model": "timm:test_efficientnet", "epochs": 2, **cfg}
    return checkpoint.model_record(model, config, CLASSES, Preprocess(input_size=32, crop_pct=1.0))


def test_saved_checkpoint_rebuilds_the_same_model(trained, tmp_path):
    path = checkpoint.save(_record(trained), tmp_path / "best.pt")
    record = checkpoint.load(path)
    assert record["classes"] == CLASSES and record["model"] == "timm:test_efficientnet"
    assert record["config"]["epochs"] == 2 and record["freezetune_version"] == ft.__version__
    rebuilt, pre = checkpoint.build_model(record)
    assert pre == Preprocess(input_size=32, crop_pct=1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), trained(x))


def test_a_checkpoint_records_the_versions_that_trained_it(trained, tmp_path):
    from importlib import metadata

    checkpoint.save(_record(trained), tmp_path / "m.pt")
    versions = checkpoint.load(tmp_path / "m.pt")["versions"]
    assert versions["freezetune"] == ft.__version__ and versions["torch"] == metadata.version("torch")
    assert {"python", "torchvision", "timm", "numpy"} <= set(versions)


def test_weights_saved_mid_epoch_are_named_so_when_rebuilt(trained, tmp_path, caplog):
    # predict, eval and export took a mid-epoch last.pt (--save-every-steps, a stop signal) without a word
    record = {**_record(trained), "epoch": 1, "steps_per_epoch": 40, "progress": {"epoch": 1, "step": 12}}
    with caplog.at_level("WARNING", logger="freezetune.run.checkpoint"):
        checkpoint.build_model(checkpoint.load(checkpoint.save(record, tmp_path / "last.pt")))
    assert "saved mid-epoch, 12 of 40 steps into epoch 2: its weights are part of the way" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="freezetune.run.checkpoint"):  # at an epoch's end: nothing to say
        checkpoint.build_model({**record, "progress": {"epoch": 2, "step": 0}})
        checkpoint.build_model(_record(trained))
    assert caplog.text == ""


def test_compiled_and_wrapped_models_save_plain_keys(trained):
    compiled = torch.compile(trained, backend="eager")  # wraps without compiling until called
    keys = set(_record(compiled)["state_dict"])
    assert keys == set(trained.state_dict()) and not any(k.startswith("_orig_mod") for k in keys)


def test_a_googlenet_an_earlier_freezetune_trained_with_its_aux_classifiers_rebuilds_without_them():
    # its weights hold aux1/aux2 (never trained): the model now built without them loads the rest, the same output
    import torchvision

    earlier = ft.replace_head(torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True), 3)
    config = {"model": "torchvision:googlenet", "weights": "none"}
    record = checkpoint.model_record(earlier, config, CLASSES, Preprocess(input_size=64))
    assert any(k.startswith("aux1.") for k in record["state_dict"])
    rebuilt, _ = checkpoint.build_model(record)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), earlier.eval()(x))


def test_a_googlenet_run_an_earlier_freezetune_began_with_its_aux_classifiers_resumes_with_them(tmp_path, capsys,
                                                                                                  monkeypatch):  # fmt: skip
    # its last.pt holds the aux weights and its optimizer their state: the resume, built without them, was refused
    # ("the optimizer state ... does not fit this config's trainable parameters (changed --freeze ...?)")
    from _engine_fixtures import make_image_folder, run_cli, stopping_at
    from freezetune.model import create
    from freezetune.training import trainer

    data = make_image_folder(tmp_path / "data", train=4, val=2, test=0, size=64)
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "torchvision:googlenet",
            "--weights", "none", "--img-size", "64", "--device", "cpu", "--workers", "0", "--freeze", "-3",
            "--cache", "off", "--no-progress", "--no-tensorboard", "--epochs", "2"]  # fmt: skip
    with monkeypatch.context() as earlier:  # the earlier freezetune (the model kept them), stopped after epoch 1
        earlier.setattr(create, "drop_aux_classifiers", lambda model: [])
        earlier.setattr(trainer.Trainer, "_run_epoch", stopping_at(lambda t, epoch: epoch == 1))
        code, _, err = run_cli(capsys, *argv)
    assert code == 130, err
    assert any(k.startswith("aux1.") for k in checkpoint.load(tmp_path / "run" / "last.pt")["state_dict"])
    code, out, err = run_cli(capsys, *argv, "--resume")
    assert code == 0 and "resumed" in out, err
    assert checkpoint.load(tmp_path / "run" / "last.pt")["epoch"] == 2


def test_a_resume_of_a_best_pt_copied_over_last_pt_is_refused_before_anything_is_loaded(tmp_path, capsys):
    # restore loaded the weights, then stopped at KeyError: 'optimizer' (a traceback)
    import shutil

    from _engine_fixtures import make_image_folder, run_cli

    data = make_image_folder(tmp_path / "data", train=2, val=1, test=0)
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "timm:test_efficientnet",
            "--weights", "none", "--img-size", "32", "--device", "cpu", "--workers", "0", "--freeze", "-2",
            "--no-progress", "--no-tensorboard", "--epochs", "1"]  # fmt: skip
    assert run_cli(capsys, *argv)[0] == 0
    shutil.copy(tmp_path / "run" / "best.pt", tmp_path / "run" / "last.pt")
    before = (tmp_path / "run" / "last.pt").read_bytes()
    code, _, err = run_cli(capsys, *argv, "--resume")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert (
        "last.pt: it holds a model's weights without the run's optimizer/scaler/progress/rng state (a best.pt " in err
    )
    assert f"--init {tmp_path / 'run' / 'last.pt'}" in err
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_checkpoint_of_another_architecture_does_not_load(trained):
    record = _record(trained)
    record["state_dict"] = {"weight": torch.zeros(3, 4)}
    with pytest.raises(CheckpointError, match="do not fit timm:test_efficientnet"):
        checkpoint.build_model(record)


def test_a_checkpoint_without_its_preprocess_or_with_classes_unlike_its_head_is_named_not_a_traceback(trained,
                                                                                                      tmp_path):  # fmt: skip
    # eval, predict and export stopped at KeyError: 'preprocess', or at torch's size mismatch
    record = _record(trained)
    del record["preprocess"]
    checkpoint.save(record, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="a freezetune checkpoint without its preprocess: it cannot be rebuilt"):
        checkpoint.load(tmp_path / "bare.pt")
    record = _record(trained)
    record["classes"] = [*CLASSES, "gnu"]
    with pytest.raises(CheckpointError, match=r"do not fit timm:test_efficientnet with its 4 classes: size mismatch"):
        checkpoint.build_model(record)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "does not exist"),
        ("text", "not a PyTorch checkpoint file"),
        ("pickled module", "beyond tensors and plain data, which are not read"),
        ("plain tensor", "not a freezetune checkpoint"),
        ("dict without classes", "not a freezetune checkpoint"),
        ("directory", "is a directory"),
        # a state dict and an export's files were "no state_dict/classes" and "not a PyTorch checkpoint file"
        ("state dict", r"holds weights alone \(a state_dict\), not a freezetune checkpoint.*give a run's best.pt"),
        ("onnx", r"is an ONNX export, not a checkpoint: give a run's best.pt or last.pt"),
        ("safetensors", r"is a safetensors weights file, not a checkpoint"),
    ],
)
def test_unreadable_checkpoints_say_why_in_one_line(tmp_path, kind, message):
    path = tmp_path / ("x." + kind if kind in ("onnx", "safetensors") else "x.pt")
    if kind in ("onnx", "safetensors"):
        path.write_bytes(b"an export's bytes")
    if kind == "state dict":
        torch.save(nn.Linear(2, 2).state_dict(), path)
    if kind == "text":
        path.write_text("hello\n")
    elif kind == "pickled module":
        torch.save(nn.Linear(2, 2), path)  # loading it would need arbitrary unpickling
    elif kind == "plain tensor":
        torch.save(torch.zeros(2), path)
    elif kind == "dict without classes":
        torch.save({"state_dict": {}}, path)
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(CheckpointError, match=message) as info:
        checkpoint.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_run_directory_given_as_checkpoint_points_to_best_pt(trained, tmp_path):
    checkpoint.save(_record(trained), tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match="did you mean .*best.pt"):
        checkpoint.load(tmp_path)


# --- the background writer ----------------------------------------------------------------------------------------


class _GatedSave:
    """Stands in for ``checkpoint.save``: records each write and holds the first until ``release``."""

    def __init__(self, real):
        self.real, self.written, self.first = real, [], True
        self.started, self.gate = threading.Event(), threading.Event()

    def __call__(self, record, path):
        self.started.set()
        if self.first:
            self.first = False
            assert self.gate.wait(10)
        self.written.append((path.name, record["epoch"]))
        return self.real(record, path)

    def release(self):
        self.gate.set()


def test_the_writer_saves_a_snapshot_the_training_cannot_change(tmp_path, monkeypatch):
    gated = _GatedSave(checkpoint.save)
    monkeypatch.setattr(checkpoint, "save", gated)
    weights, moment = torch.zeros(3), torch.zeros(3)
    writer = checkpoint_writer.Writer(tmp_path)
    writer.submit(best={"epoch": 1, "state_dict": {"w": weights}},
                  last={"epoch": 1, "state_dict": {"w": weights}, "optimizer": {"state": {0: [moment]}}})  # fmt: skip
    assert gated.started.wait(10)
    weights += 1  # the next step trains in place while the save is on its way to the disk
    moment += 1
    gated.release()
    writer.wait()
    best, last = torch.load(tmp_path / checkpoint.BEST), torch.load(tmp_path / checkpoint.LAST)
    assert best["state_dict"]["w"].tolist() == last["state_dict"]["w"].tolist() == [0.0, 0.0, 0.0]
    assert last["optimizer"]["state"][0][0].tolist() == [0.0, 0.0, 0.0]


def test_a_save_that_waits_is_replaced_by_the_next_but_keeps_its_best(tmp_path, monkeypatch):
    gated = _GatedSave(checkpoint.save)
    monkeypatch.setattr(checkpoint, "save", gated)
    writer = checkpoint_writer.Writer(tmp_path)
    for epoch, improved in ((1, True), (2, True), (3, False), (4, False)):
        writer.submit(best={"epoch": epoch} if improved else None, last={"epoch": epoch})
        assert gated.started.wait(10)  # epoch 1's best.pt is being written; the others wait their turn
    gated.release()
    writer.wait()
    # epochs 2 and 3 waited and were replaced: epoch 4's last.pt, with epoch 2's best.pt written before it
    assert gated.written == [("best.pt", 1), ("last.pt", 1), ("best.pt", 2), ("last.pt", 4)]
    assert torch.load(tmp_path / checkpoint.BEST)["epoch"] == 2 and torch.load(tmp_path / checkpoint.LAST)["epoch"] == 4


def test_a_failed_write_is_raised_by_the_next_save_and_by_wait(tmp_path, monkeypatch):
    import errno

    def full_disk(record, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "save", full_disk)
    writer = checkpoint_writer.Writer(tmp_path)
    writer.submit(best=None, last={"epoch": 1})
    with pytest.raises(OSError, match="No space"):
        writer.wait()
    writer.wait()  # raised once
    writer.submit(best=None, last={"epoch": 2})
    writer.wait(raise_error=False)  # a run failing for another reason: its own error is the one reported
    writer.submit(best=None, last={"epoch": 3})
    for thread in threading.enumerate():  # the write fails in the background
        if thread.name == "freezetune-checkpoint":
            thread.join()
    with pytest.raises(OSError, match="No space"):
        writer.submit(best=None, last={"epoch": 4})


def test_an_init_checkpoint_of_another_model_or_shape_says_which(trained, tmp_path):
    path = checkpoint.save(_record(trained), tmp_path / "best.pt")
    other, _ = create_model("timm:resnet18", "none")
    ft.replace_head(other, len(CLASSES))
    with pytest.raises(CheckpointError, match=r"is a timm:test_efficientnet model; this run's is timm:resnet18: give "
                                              r"--model timm:test_efficientnet"):  # fmt: skip
        checkpoint.init_from(other, path, CLASSES, model_name="timm:resnet18")
    with pytest.raises(CheckpointError, match=r"does not fit .*(Missing key|Unexpected key|size mismatch)"):
        checkpoint.init_from(other, path, CLASSES)  # it ended at torch's "Error(s) in loading state_dict for ..."
    model, _ = create_model("timm:test_efficientnet", "none")
    ft.replace_head(model, 2)
    with pytest.raises(CheckpointError, match=r"trained on 3 other classes .*; the data has 'x', 'y': to start from "
                                              r"its weights with a new head, give it as --weights '.*best.pt'"):  # fmt: skip
        checkpoint.init_from(model, path, ["x", "y"])


def test_a_resume_on_other_classes_of_the_same_count_names_them():
    # "is a run of M on 2 classes; this config is M on 2": nothing said what differed
    record = {"model": "timm:test_efficientnet", "classes": ["neg", "pos"], "config": {}}
    expect = {"model": "timm:test_efficientnet", "classes": ["bad", "good"]}
    with pytest.raises(CheckpointError, match=r"on classes 'neg', 'pos'; this config's data has 'bad', 'good': resume "
                                              r"with the run's own config and data"):  # fmt: skip
        checkpoint._check_resumable(Path("r/last.pt"), record, expect)
    many = [f"c{i}" for i in range(9)]
    with pytest.raises(CheckpointError, match=r"'c5' and 3 more; this config's data has 'd0'"):
        checkpoint._check_resumable(Path("r/last.pt"), {**record, "classes": many}, {**expect, "classes": [
            f"d{i}" for i in range(9)]})  # fmt: skip
    with pytest.raises(CheckpointError, match=r"on 2 classes; this config is timm:test_efficientnet on 3"):
        checkpoint._check_resumable(Path("r/last.pt"), record, {**expect, "classes": ["a", "b", "c"]})


def test_a_writer_without_background_writes_at_submit_in_this_thread(tmp_path):
    writer = checkpoint_writer.Writer(tmp_path, background=False)
    weights = torch.zeros(2)
    writer.submit(best=None, last={"epoch": 1, "state_dict": {"w": weights}})
    assert torch.load(tmp_path / checkpoint.LAST)["epoch"] == 1  # on disk before submit returned, no wait
    assert not [t for t in threading.enumerate() if t.name == "freezetune-checkpoint"]


def test_a_resume_on_another_number_of_processes_says_what_steps_per_epoch_is(tmp_path):
    # "steps_per_epoch 5 -> 10" named a setting no user ever gave: a 2-process torchrun run resumed on one process
    config = {"model": "timm:test_efficientnet", "scheduler": "onecycle", "epochs": 3}
    record = {"model": config["model"], "classes": ["a", "b"], "config": config, "steps_per_epoch": 5}
    expect = {**config, "classes": ["a", "b"], "steps_per_epoch": 10}
    with pytest.raises(ConfigError, match=r"steps_per_epoch 5 -> 10: .* the number of torchrun processes set it"):
        checkpoint._check_resumable(tmp_path / "last.pt", record, expect)


def test_a_mid_epoch_checkpoint_resumes_on_another_number_of_processes_only_from_an_epochs_end(tmp_path):
    # under scheduler none a 1-process stop at step 35 of 45 resumed on 2 processes "at step 35/23" and skipped the
    # epoch's last batches
    config = {"model": "timm:test_efficientnet", "scheduler": "none", "epochs": 3}
    expect = {**config, "classes": ["a", "b"], "steps_per_epoch": 23}
    record = {"model": config["model"], "classes": ["a", "b"], "config": config, "steps_per_epoch": 45, "epoch": 0,
              "progress": {"epoch": 0, "step": 35}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"on 23 batches an epoch: it was saved mid-epoch, 35 of the 45 batches"):
        checkpoint._check_resumable(tmp_path / "last.pt", record, expect)
    checkpoint._check_resumable(tmp_path / "last.pt", {**record, "progress": {"epoch": 1, "step": 0}}, expect)
    checkpoint._check_resumable(tmp_path / "last.pt", record, {**expect, "steps_per_epoch": 45})


def test_a_data_digest_not_had_on_either_side_is_not_compared():
    # a file unreadable for a moment gives no digest: "other files or contents" refused a resume of the same data
    from freezetune.run.checkpoint import _check_data

    saved = {"training": {"n": 3, "digest": "abc", "noun": "images"}}
    _check_data(Path("last.pt"), saved, {"training": {"n": 3, "digest": None, "noun": "images"}})
    with pytest.raises(CheckpointError, match=r"3 -> 4 training images"):
        _check_data(Path("last.pt"), saved, {"training": {"n": 4, "digest": None, "noun": "images"}})


def test_a_validation_split_there_then_and_not_now_is_named_by_its_count():
    # it read "no validation split then, no one now" (and "a ... then, a one now" the other way round)
    from freezetune.run.checkpoint import _check_data

    train = {"n": 3, "digest": "abc", "noun": "images"}
    with pytest.raises(CheckpointError, match=r"\(2 -> 0 validation images\)"):
        _check_data(Path("last.pt"), {"training": train, "validation": {**train, "n": 2}}, {"training": train})
    with pytest.raises(CheckpointError, match=r"\(0 -> 2 validation images\)"):
        _check_data(Path("last.pt"), {"training": train}, {"training": train, "validation": {**train, "n": 2}})


def test_a_refused_resume_names_files_rewritten_or_of_another_class_and_a_listless_record_names_none(tmp_path):
    # "other files or contents" left the user to find which of thousands of files had changed
    from freezetune.data import FileImageDataset
    from freezetune.data.fingerprint import data_record
    from freezetune.run.checkpoint import _check_data

    for name in ("a1.png", "a2.png", "b1.png"):
        (tmp_path / name).write_bytes(b"12345")
    files = [(str(tmp_path / "a1.png"), 0), (str(tmp_path / "a2.png"), 0), (str(tmp_path / "b1.png"), 1)]
    before = data_record(FileImageDataset(files[:2], ["a", "b"]), FileImageDataset(files[2:], ["a", "b"]))
    (tmp_path / "a1.png").write_bytes(b"123456")
    relabelled = [files[0], (files[1][0], 1), files[2]]  # a CSV's label changed
    now = data_record(FileImageDataset(relabelled[:2], ["a", "b"]), FileImageDataset(relabelled[2:], ["a", "b"]))
    named = r"files: 1 of another size \('a1.png'\), 1 of another class \('a2.png'\)"
    with pytest.raises(CheckpointError, match=named):
        _check_data(Path("last.pt"), before, now)
    older = {split: {k: v for k, v in entry.items() if k != "files"} for split, entry in before.items()}
    with pytest.raises(CheckpointError, match=r"other files or contents\); resume") as refused:
        _check_data(Path("last.pt"), older, now)  # a last.pt of a freezetune that kept no list
    assert "files:" not in str(refused.value)


def test_a_checkpoint_cut_short_is_called_that(tmp_path):
    # a copy that did not finish read "not a PyTorch checkpoint file (RuntimeError)"
    whole = tmp_path / "best.pt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "classes": ["a"]}, whole)
    (tmp_path / "cut.pt").write_bytes(whole.read_bytes()[:1500])
    with pytest.raises(CheckpointError, match=r"cut.pt': cut short or corrupt: it begins as a PyTorch checkpoint"):
        checkpoint.load(tmp_path / "cut.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes.pt': not a PyTorch checkpoint file"):
        checkpoint.load(tmp_path / "notes.pt")


def test_the_file_list_of_last_pt_holds_any_name_and_splits_on_two_drives_keep_none(tmp_path, monkeypatch):
    # a name with a newline broke the list's lines (a traceback where the refusal was due); on Windows, splits on two
    # drives have no folder in common: commonpath's ValueError stopped every resumable run's set-up
    import os

    from freezetune.data import FileImageDataset, fingerprint

    (tmp_path / "a\nb.png").write_bytes(b"1")
    ds = FileImageDataset([(str(tmp_path / "a\nb.png"), 0)], ["x"])
    before = fingerprint.data_record(ds, None)
    (tmp_path / "a\nb.png").write_bytes(b"12")
    assert (
        fingerprint.files_changed(before, fingerprint.data_record(ds, None)) == "files: 1 of another size ('a\\nb.png')"
    )

    def two_drives(paths):
        raise ValueError("Paths don't have the same drive")

    monkeypatch.setattr(os.path, "commonpath", two_drives)
    record = fingerprint.data_record(ds, FileImageDataset([(str(tmp_path / "a\nb.png"), 0)], ["x"]))
    assert all("files" not in split and split["digest"] for split in record.values())  # one file a split: a digest


def test_other_files_drawn_by_per_class_are_said_to_be_a_draw_not_the_files_changed(tmp_path):
    # one file added to a class made --per-class draw other files of it: the refusal named dozens "gone" and "new",
    # never the one added
    from freezetune.data import FileImageDataset, fingerprint

    for name in ("1", "2", "3"):
        (tmp_path / f"{name}.png").write_bytes(b"1")
    drawn = [FileImageDataset([(str(tmp_path / f"{n}.png"), 0)], ["x"]) for n in ("1", "2")]
    before, now = (fingerprint.data_record(ds, None, per_class=1) for ds in drawn)
    assert fingerprint.files_changed(before, now) == (
        "files drawn by --per-class 1: 1 gone ('1.png'), 1 new ('2.png') (each class's are drawn from all of its "
        "files: one file added to or removed from a class changes the draw)"
    )
    # the same files, one of another size: no draw to explain
    (tmp_path / "1.png").write_bytes(b"12")
    assert fingerprint.files_changed(before, fingerprint.data_record(drawn[0], None, per_class=1)) == (
        "files: 1 of another size ('1.png')"
    )


def test_a_run_of_an_earlier_freezetune_resumes_with_the_frozen_dropout_it_had_and_refuses_another():
    # its config.yaml names no frozen_dropout: its frozen layers' dropout drew; --frozen-dropout off went on silently
    config = {"model": "timm:test_efficientnet", "scheduler": "onecycle", "epochs": 3}
    record = {"model": config["model"], "classes": ["a", "b"], "config": config, "steps_per_epoch": 5}
    expect = {**config, "classes": ["a", "b"], "steps_per_epoch": 5}
    checkpoint._check_resumable(Path("r/last.pt"), record, {**expect, "frozen_dropout": "keep"})
    with pytest.raises(ConfigError, match=r"frozen_dropout 'keep' -> 'off'"):
        checkpoint._check_resumable(Path("r/last.pt"), record, {**expect, "frozen_dropout": "off"})


# the config an early freezetune recorded (d_res's, 2026-11-28): its keys, freeze as typed
_EARLY_KEYS = ("model weights img_size data val_data val_split per_class aug batch_size workers freeze bn unfreeze epochs "
               "optimizer lr stage_lrs decay weight_decay momentum scheduler warmup_epochs label_smoothing grad_clip amp "
               "channels_last compile cache cache_views decode device seed out resume early_stop monitor tensorboard "
               "progress").split()  # fmt: skip


def _as_an_early_freezetune_saved(run: Path) -> None:
    """Rewrite a run stopped after an epoch as a freezetune before 2026-11-30 (e14081e) saved it: ``last.pt`` with the
    best epoch apart (``best``), no ``progress`` nor data record, and ``freeze`` recorded as typed, a string, there
    and in ``config.yaml``."""
    record = torch.load(run / "last.pt", weights_only=False)
    progress = record.pop("progress")
    record.pop("data")
    record["best"] = {"epoch": progress["best_epoch"], "metric": progress["best_metric"],
                      "bad_epochs": progress["bad_epochs"]}  # fmt: skip
    record["config"] = {k: record["config"][k] for k in _EARLY_KEYS} | {"freeze": str(record["config"]["freeze"])}
    torch.save(record, run / "last.pt")
    (run / "config.yaml").write_text(yaml.safe_dump(record["config"], sort_keys=False))


def test_a_run_an_early_freezetune_stopped_resumes(tmp_path, capsys, monkeypatch):
    # its last.pt, with no progress, was refused as "a best.pt copied over it?", and its freeze '-2' as changed to -2
    from _engine_fixtures import make_image_folder, run_cli, stopping_at
    from freezetune.training import trainer

    data = make_image_folder(tmp_path / "data", train=4, val=2, test=0)
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "timm:test_efficientnet",
            "--weights", "none", "--img-size", "32", "--device", "cpu", "--workers", "0", "--freeze", "-2",
            "--no-progress", "--no-tensorboard", "--epochs", "2"]  # fmt: skip
    with monkeypatch.context() as patch:
        patch.setattr(trainer.Trainer, "_run_epoch", stopping_at(lambda t, epoch: epoch == 1))
        assert run_cli(capsys, *argv)[0] == 130
    _as_an_early_freezetune_saved(tmp_path / "run")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["freeze"] == "-2"
    code, out, err = run_cli(capsys, "train", "--out", tmp_path / "run", "--resume")  # its config.yaml's settings
    assert code == 0 and "resumed" in out and "epoch 2/2" in out, err
    resumed = checkpoint.load(tmp_path / "run" / "last.pt")
    assert resumed["epoch"] == 2 and resumed["progress"]["epoch"] == 2


def test_an_early_freezetunes_last_pt_without_a_state_a_resume_needs_says_so():
    # not "a best.pt copied over it?": the user's own last.pt, which the run's weights still start a new run from
    record = {"freezetune_version": "0.1.0", "epoch": 3, "steps_per_epoch": 5, "optimizer": {}, "scaler": {},
              "best": {"epoch": 2, "metric": 0.5, "bad_epochs": 1}}  # fmt: skip
    with pytest.raises(CheckpointError, match=r"a last.pt of an earlier freezetune \(0.1.0\) without the run's rng"):
        checkpoint._check_resume_state(Path("r/last.pt"), record)
    checkpoint._check_resume_state(Path("r/last.pt"), {**record, "rng": {}})
    assert checkpoint._progress_of(record) == {"epoch": 3, "best_epoch": 2, "best_metric": 0.5, "bad_epochs": 1}


def test_an_early_freezetunes_settings_are_compared_as_this_one_reads_them():
    config = {"model": "timm:test_efficientnet", "scheduler": "onecycle", "epochs": 3, "freeze": "-2"}
    record = {"model": config["model"], "classes": ["a", "b"], "config": config, "steps_per_epoch": 5}
    expect = {**config, "classes": ["a", "b"], "steps_per_epoch": 5, "freeze": -2}
    checkpoint._check_resumable(Path("r/last.pt"), record, expect)
    with pytest.raises(ConfigError, match=r"freeze -2 -> -3"):
        checkpoint._check_resumable(Path("r/last.pt"), record, {**expect, "freeze": -3})


def test_bn_stats_update_and_auto_are_one_setting_in_a_run():
    # lp-ft's probe, stopped under an earlier freezetune (bn_stats "update", its default), was refused "bn_stats
    # 'update' -> 'auto'": a run's auto updates them too
    config = {"model": "timm:test_efficientnet", "scheduler": "onecycle", "epochs": 3, "bn_stats": "update"}
    record = {"model": config["model"], "classes": ["a", "b"], "config": config, "steps_per_epoch": 5}
    expect = {**config, "classes": ["a", "b"], "steps_per_epoch": 5}
    checkpoint._check_resumable(Path("r/last.pt"), record, {**expect, "bn_stats": "auto"})
    with pytest.raises(ConfigError, match=r"bn_stats 'update' -> 'frozen'"):
        checkpoint._check_resumable(Path("r/last.pt"), record, {**expect, "bn_stats": "frozen"})
