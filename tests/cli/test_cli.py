"""The ``freezetune`` command line end to end on a CPU: train -> eval / predict / export / inspect, and user errors.

One tiny run (timm ``test_efficientnet``, random init, 32 px, generated PNGs) is trained once per module and shared.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import freezetune as ft
from _engine_fixtures import CLASSES, make_idx_dir, make_image_folder, run_cli, snapshot, train_argv
from conftest import Terminal
from freezetune import __version__
from freezetune.cli.main import main
from freezetune.inference.evaluation import default_plot
from freezetune.run import checkpoint
from freezetune.run.reporting import plot_report, read_metrics, unfreeze_events

RUN_FILES = ("config.yaml", "metrics.csv", "report.png", "classes.json", "best.pt", "last.pt", "confusion.png",
             "test_metrics.json")  # fmt: skip


pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished 2-epoch run: head first, ``blocks.4`` unfrozen after epoch 1; stdout kept for the checks."""
    out = tmp_path_factory.mktemp("runs") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(train_argv(data, out, "--epochs", "2", "--freeze", "backbone", "--unfreeze", "epoch:1"))
    assert code == 0, stdout.getvalue()
    return out, stdout.getvalue()


def _metrics_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- train --------------------------------------------------------------------------------------------------------


def test_frozen_layers_of_a_model_without_pretrained_weights_are_said_to_stay_random(data, tmp_path, capsys):
    # the auto recipe's default froze random layers and trained a probe of random features (val_loss 356), unsaid
    assert run_cli(capsys, *train_argv(data, tmp_path / "a", "--epochs", "1", "--freeze", "backbone"))[0] == 0
    logged = (tmp_path / "a" / "train.log").read_text()  # (on stderr too, where the CLI sets up logging)
    assert logged.count("--weights none: the frozen stage(s) 'stem', 'blocks.0'") == 1, logged
    assert "keep their random initial weights (nothing pretrained to keep); --recipe full trains every layer" in logged
    assert run_cli(capsys, *train_argv(data, tmp_path / "b", "--epochs", "1", "--freeze", "none"))[0] == 0
    assert "--weights none: " not in (tmp_path / "b" / "train.log").read_text()


def test_a_frozen_new_head_is_said_to_stay_random(data, tmp_path, capsys):
    # --freeze classifier: the backbone trained against a random head that never moved, shown only as "classifier 0"
    code, _, err = run_cli(capsys, *train_argv(data, tmp_path / "a", "--epochs", "1", "--freeze", "classifier"))
    assert code == 0, err
    logged = (tmp_path / "a" / "train.log").read_text()
    assert "the new head (classifier) is frozen: it keeps its random initial weights" in logged, logged
    assert run_cli(capsys, *train_argv(data, tmp_path / "b", "--epochs", "1", "--freeze", "backbone"))[0] == 0
    assert "the new head" not in (tmp_path / "b" / "train.log").read_text()


def test_verbose_info_lines_are_in_train_log_as_on_stderr(data, tmp_path):
    # train.log holds "every line the run printed", but -v's INFO lines reached stderr alone
    out = tmp_path / "run"
    argv = [*train_argv(data, out, "--epochs", "1", "--freeze", "backbone", "--no-final-test"), "-v"]
    done = subprocess.run([sys.executable, "-m", "freezetune", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    info = [line for line in done.stderr.splitlines() if line.startswith("INFO freezetune.")]
    logged = (out / "train.log").read_text()
    assert info and all(line in logged for line in info), (info, logged)


def test_train_writes_every_run_file(run):
    run_dir, stdout = run
    missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
    assert not missing, f"missing {missing} in {sorted(p.name for p in run_dir.iterdir())}"
    assert list(run_dir.glob("events.out.tfevents.*")), "no TensorBoard events file"
    assert json.loads((run_dir / "classes.json").read_text()) == sorted(CLASSES)
    for png in ("report.png", "confusion.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    test = json.loads((run_dir / "test_metrics.json").read_text())
    assert test["n"] == 12 and 0.0 <= test["acc"] <= 1.0
    assert "epoch 2/2" in stdout and "test accuracy" in stdout
    assert " on cpu fp32, channels_last: " in stdout  # the header says the memory format a convnet ran in


def test_a_notebook_rerunning_a_cell_into_a_finished_run_is_told_what_to_write_in_python(run, data):
    # "pass --resume to continue it or choose another --out": nothing a Python user could type
    with pytest.raises(ft.FreezetuneError) as info:
        ft.train(ft.TrainConfig(data=str(data), out=str(run[0]), model="timm:test_efficientnet", weights="none"))
    assert "pass --resume (resume=True) to continue it or choose another --out (out=...)" in str(info.value)


def test_eval_of_best_pt_reproduces_the_runs_test_metrics_to_the_last_digit(run, data):
    # the run scored its test split in its own memory format (channels_last for a convnet); eval rebuilds it the same
    run_dir, _ = run
    again = ft.evaluate_checkpoint(run_dir / "best.pt", str(data), device="cpu")
    assert again.pop("classes") == sorted(CLASSES) and again.pop("data") == f"the test/ folder of {data}"
    written = json.loads((run_dir / "test_metrics.json").read_text())
    assert (
        written.pop("checkpoint") == "best.pt" and written.pop("epoch") == checkpoint.load(run_dir / "best.pt")["epoch"]
    )
    # eval names the checkpoint it was given, and the epoch that saved it, as the run's file does
    assert (
        again.pop("checkpoint") == str(run_dir / "best.pt")
        and again.pop("epoch") == checkpoint.load(run_dir / "best.pt")["epoch"]
    )
    assert again == written


def test_metrics_csv_has_one_row_per_epoch_with_every_column(run):
    rows = _metrics_rows(run[0])
    assert [r["epoch"] for r in rows] == ["1", "2"]
    expected = ("train_loss", "train_acc", "val_loss", "val_acc", "lr/classifier", "trainable_params", "epoch_time_s",
                "img_per_s", "peak_mem_mb", "unfrozen")  # fmt: skip
    assert set(expected) <= set(rows[0]), f"columns: {list(rows[0])}"
    assert "samples" not in rows[0]  # the sample count feeds img/s; it is not a metric
    for row in rows:
        for key in expected[:-1]:
            assert float(row[key]) >= 0, (key, row[key])
        assert 0 <= float(row["val_acc"]) <= 1 and float(row["img_per_s"]) > 0 and float(row["peak_mem_mb"]) > 0
    # the head trains from epoch 1; blocks.4 joins (with its own LR group) from epoch 2
    assert rows[0]["lr/blocks.4"] == "" and float(rows[1]["lr/blocks.4"]) > 0
    assert int(rows[1]["trainable_params"]) > int(rows[0]["trainable_params"])


def test_tensorboard_events_hold_the_epoch_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run[0]))
    acc.Reload()
    assert {"train_loss", "val_acc", "lr/classifier"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train_loss")] == [1, 2]
    rows = _metrics_rows(run[0])
    assert acc.Scalars("val_loss")[1].value == pytest.approx(float(rows[1]["val_loss"]), rel=1e-6)


def test_unfreeze_event_reaches_metrics_csv_and_report(run, tmp_path):
    run_dir = run[0]
    rows = read_metrics(run_dir / "metrics.csv")
    assert unfreeze_events(rows) == [(2, "blocks.4")]  # trained from epoch 2 on
    assert "unfroze blocks.4" in run[1]
    # report.png draws the event: the same CSV with the unfrozen cell cleared renders fewer red (marker) pixels.
    rows = _metrics_rows(run_dir)
    with open(tmp_path / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "unfrozen": ""} for r in rows)
    plain = plot_report(tmp_path / "metrics.csv", tmp_path / "report.png")
    assert _red_pixels(run_dir / "report.png") > _red_pixels(plain) + 50


def _red_pixels(png) -> int:
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    marker = np.array([214, 39, 40])  # matplotlib "tab:red", the unfreeze line colour
    return int((np.abs(rgb - marker).sum(-1) < 60).sum())


def test_config_yaml_of_the_run_resolves_to_the_same_config(run, data, capsys):
    from freezetune.config.file import load_config

    saved = load_config(run[0] / "config.yaml")
    argv = train_argv(data, run[0], "--epochs", "2", "--freeze", "backbone", "--unfreeze", "epoch:1", "--print-config")
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    printed = load_config(overrides=yaml.safe_load(out))
    assert saved == printed
    assert (saved.epochs, saved.freeze, saved.unfreeze, saved.img_size) == (2, "backbone", "epoch:1", 32)


# --- eval / predict / export / inspect ----------------------------------------------------------------------------


def test_eval_beside_a_checkpoint_in_a_read_only_folder_prints_its_scores_and_warns(run, data, capsys, monkeypatch):
    # the default confusion plot goes beside the checkpoint: in a read-only folder (a shared model store) the scores
    # were thrown away and the error named a hidden temporary file
    import errno

    from freezetune.training import metrics

    def read_only(result, classes, path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(metrics, "plot_confusion", read_only)
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run[0] / "best.pt", "--data", data, "--device", "cpu")
    assert code == 0 and "macro-F1" in out and "per-class accuracy" in out
    assert err == (f"freezetune: warning: the confusion matrix was not drawn: Read-only file system "
                   f"({default_plot(run[0] / 'best.pt', data)}); --plot PATH puts it elsewhere\n")  # fmt: skip
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run[0] / "best.pt", "--data", data, "--device", "cpu",
                             "--plot", run[0] / "mine.png")  # fmt: skip
    assert code == 2 and "macro-F1" in out and err.startswith("freezetune: error: Read-only file system")
    # the metrics asked for by name are written though the default plot cannot be
    metrics_file = run[0].parent / "m.json"
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run[0] / "best.pt", "--data", data, "--device", "cpu",
                             "--metrics", metrics_file)  # fmt: skip
    assert code == 0 and "confusion matrix was not drawn" in err and json.loads(metrics_file.read_text())["n"]


def test_eval_prints_the_report_and_matches_the_run_test_metrics(run, data, capsys, tmp_path):
    run_dir = run[0]
    plot = tmp_path / "confusion.png"
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run_dir / "best.pt", "--data", data, "--device", "cpu",
                             "--plot", plot)  # fmt: skip
    assert code == 0, err
    scored, head = out.splitlines()[:2]
    assert (
        scored == f"scored {json.loads((run_dir / 'test_metrics.json').read_text())['n']} of the test/ folder of {data}"
    )
    for word in ("loss", "top-1", "top-3", "macro-F1"):
        assert word in head
    assert "per-class accuracy" in out and "confusion matrix" in out
    assert all(name in out for name in CLASSES)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # eval evaluates data/test with best.pt, as the run's final test did
    test = json.loads((run_dir / "test_metrics.json").read_text())
    assert f"top-1 {100 * test['acc']:5.1f}%" in head, (head, test["acc"])
    assert f"n {test['n']} " in head


def test_predict_json_gives_topk_classes_with_probabilities(run, data, capsys):
    images = data / "test" / "red"
    code, out, err = run_cli(capsys, "predict", "--checkpoint", run[0] / "best.pt", images, "--topk", "2", "--json",
                             "--device", "cpu")  # fmt: skip
    assert code == 0, err
    results = json.loads(out)
    assert len(results) == 4 and {r["path"] for r in results} == {str(p) for p in images.glob("*.png")}
    for r in results:
        assert [set(p) for p in r["top"]] == [{"class", "prob"}] * 2
        assert {p["class"] for p in r["top"]} <= set(CLASSES)
        probs = [p["prob"] for p in r["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    # all classes: the probabilities of one image sum to one
    code, out, _ = run_cli(capsys, "predict", "--checkpoint", run[0] / "best.pt", images / "red_0.png", "--topk", "9",
                           "--json", "--device", "cpu")  # fmt: skip
    (only,) = json.loads(out)
    assert code == 0 and len(only["top"]) == 3 and sum(p["prob"] for p in only["top"]) == pytest.approx(1, abs=1e-5)


def test_predict_json_cut_short_leaves_the_printed_records_one_valid_json_list(run, data, capsys, monkeypatch):
    from freezetune.inference import predict

    real = predict.predict_files

    def interrupted(*args, on_record, **kwargs):  # Ctrl-C after the first image's record is printed
        def record_then_stop(record):
            on_record(record)
            raise KeyboardInterrupt

        return real(*args, on_record=record_then_stop, **kwargs)

    monkeypatch.setattr(predict, "predict_files", interrupted)
    code, out, _ = run_cli(capsys, "predict", "--checkpoint", run[0] / "best.pt", data / "test" / "red", "--json",
                           "--device", "cpu")  # fmt: skip
    assert code == 130
    (only,) = json.loads(out)  # what was printed parses: the list it began is closed
    assert only["path"].endswith(".png") and only["top"]
    monkeypatch.setattr(predict, "predict_files", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, out, _ = run_cli(capsys, "predict", "--checkpoint", run[0] / "best.pt", data / "test" / "red", "--json",
                           "--device", "cpu")  # fmt: skip
    assert code == 130 and out == ""  # stopped before any record: no list begun, none printed


def test_predict_text_output_names_classes_with_percentages(run, data, capsys):
    code, out, _ = run_cli(capsys, "predict", "--checkpoint", run[0] / "best.pt", data / "test" / "blue" / "blue_0.png",
                           "--topk", "1", "--device", "cpu")  # fmt: skip
    assert code == 0
    line = out.strip()
    assert line.startswith(str(data / "test" / "blue" / "blue_0.png")) and line.endswith("%")
    assert any(f"  {name} " in line for name in CLASSES)


def test_predict_into_a_pipe_its_reader_closed_stops_quietly_as_the_shell_expects(run, data):
    # `predict ... | head -1`: "freezetune: error: Broken pipe; files written before are intact", exit 2
    argv = [sys.executable, "-m", "freezetune", "predict", "--checkpoint", str(run[0] / "best.pt"), str(data / "test"),
            "--json", "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == "", err


def test_eval_into_a_pipe_its_reader_closed_still_writes_its_metrics_file(run, data, tmp_path):
    # `eval ... --metrics m.json | head -1`: the report's print met the closed pipe first and the command ended, exit
    # 141, without the file the batch job reads (and its confusion plot)
    metrics, plot = tmp_path / "m.json", tmp_path / "c.png"
    argv = [sys.executable, "-m", "freezetune", "eval", "--checkpoint", str(run[0] / "best.pt"), "--data", str(data),
            "--metrics", str(metrics), "--plot", str(plot), "--device", "cpu", "--workers", "0"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == "", err
    assert json.loads(metrics.read_text())["n"] and plot.stat().st_size


def test_the_command_line_does_not_print_pils_raw_decompression_bomb_warning(run, tmp_path):
    # "PIL/Image.py:3593: DecompressionBombWarning: Image size (90250000 pixels) exceeds limit of 89478485 pixels,
    # could be decompression bomb DOS attack." and its source line, from each loader worker
    from PIL import Image

    Image.new("1", (9500, 9500)).save(tmp_path / "scan.png")  # 90 megapixels, 11 kB
    argv = [sys.executable, "-m", "freezetune", "predict", "--checkpoint", str(run[0] / "best.pt"),
            str(tmp_path / "scan.png"), "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith(str(tmp_path / "scan.png")), proc.stderr
    assert "DecompressionBomb" not in proc.stderr, proc.stderr


def test_the_command_line_names_a_photo_with_corrupt_exif_once_in_place_of_pils_raw_warning(run, tmp_path):
    # "PIL/TiffImagePlugin.py:982: UserWarning: Corrupt EXIF data.  Expecting to read 12 bytes but only got 6." and
    # its source line, naming no file
    from _engine_fixtures import cut_exif_jpeg

    photo = cut_exif_jpeg(tmp_path / "photo.jpg", orientation_first=False)
    argv = [sys.executable, "-m", "freezetune", "predict", "--checkpoint", str(run[0] / "best.pt"), str(photo),
            "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith(str(photo)), proc.stderr
    assert "Corrupt EXIF" not in proc.stderr and "TiffImagePlugin" not in proc.stderr, proc.stderr
    line, example = proc.stderr.splitlines()  # the file on a line of its own
    assert line.startswith("WARNING freezetune.data.scan: 1 image file(s) have corrupt EXIF data"), line
    assert example == f"  '{photo}' (read as stored: no orientation before the cut turns it)"


def test_predict_prints_a_name_the_terminal_cannot_encode_as_its_escape(run, data, tmp_path):
    # a Windows console's code page (cp1252) and a folder named in another script: UnicodeEncodeError, a traceback
    folder = tmp_path / "鳥"
    folder.mkdir()
    shutil.copy(data / "test" / "blue" / "blue_0.png", folder / "写真.png")
    argv = [sys.executable, "-m", "freezetune", "predict", "--checkpoint", str(run[0] / "best.pt"), str(folder),
            "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    proc = subprocess.run(argv, capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode("cp1252", "replace")[-2000:]
    assert proc.stdout.decode("cp1252").startswith(str(tmp_path / "\\u9ce5" / "\\u5199\\u771f.png"))


def test_a_run_whose_output_pipe_closes_stops_with_one_line_on_stderr(data, tmp_path):
    # quiet for predict; a long run stopped by it (`train ... | head`, a logger that died) says why and what it kept
    argv = [sys.executable, "-m", "freezetune", *train_argv(data, tmp_path / "run", "--epochs", "1")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141, err
    assert err.splitlines()[-1] == ("freezetune: stopped: its output pipe was closed; last.pt, where there is one, "
                                    "holds the last finished epoch (--resume continues; the same command restarts a "
                                    "run that has none)")  # fmt: skip


def test_a_run_whose_output_and_error_pipe_closes_stops_as_the_shell_expects(data, tmp_path):
    # `train ... 2>&1 | head -1`: the stop line went into the closed pipe too, a second broken pipe, exit code 1
    argv = [sys.executable, "-m", "freezetune", *train_argv(data, tmp_path / "run", "--epochs", "1")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc.stdout.close()
    proc.wait(timeout=300)
    assert proc.returncode == 141
    log = (tmp_path / "run" / "train.log").read_text()  # the log, which the user can still read, says why
    assert log.splitlines()[-1].endswith("freezetune: stopped: its output pipe was closed"), log[-2000:]


def test_a_run_whose_output_pipe_closes_in_its_training_loop_saves_the_epoch_and_resumes(data, tmp_path):
    # `train ... | tee log`, tee gone with the SSH session during epoch 2: the epoch's line raised BrokenPipeError
    # before its save (metrics.csv had 2 rows, last.pt epoch 1), and a resume trained epoch 2 again
    from freezetune.run.interrupt import PAUSE_ENV, PAUSE_MARKER_ENV

    out, marker, err = tmp_path / "run", tmp_path / "paused", tmp_path / "stderr"
    run = train_argv(data, out, "--epochs", "3", "--epoch-images", "16", "--freeze", "-3")
    argv = [sys.executable, "-m", "freezetune", *run]
    env = {**os.environ, PAUSE_ENV: "step#3", PAUSE_MARKER_ENV: str(marker)}  # 2 steps an epoch: epoch 2's first
    with err.open("w") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, env=env)
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), err.read_text()
        proc.stdout.close()  # the reader is gone while epoch 2 trains
        marker.unlink()
        proc.wait(timeout=240)
    line = "freezetune: stopped by a closed output pipe after epoch 2 (saved in last.pt); continue with --resume (resume=True)"
    assert proc.returncode == 141 and err.read_text().splitlines()[-1] == line, err.read_text()[-2000:]
    assert (out / "train.log").read_text().splitlines()[-1].endswith(line)
    assert len(read_metrics(out / "metrics.csv")) == 2
    assert torch.load(out / "last.pt", weights_only=False)["progress"]["epoch"] == 2
    with contextlib.redirect_stdout(io.StringIO()) as said:
        assert main([*run, "--resume"]) == 0
    assert "resumed" in said.getvalue() and "after epoch 2" in said.getvalue(), said.getvalue()
    assert [row["epoch"] for row in read_metrics(out / "metrics.csv")] == [1, 2, 3]


def test_predict_reports_a_bad_file_and_still_predicts_the_others(run, data, capsys, tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("blue_0.png", "red_1.png"):
        (folder / name).write_bytes((data / "test" / name.split("_")[0] / name).read_bytes())
    (folder / "broken.jpg").write_text("not an image")
    (folder / "notes.txt").write_text("not an image, not named one")  # left out, and said so (train says so)
    code, out, err = run_cli(capsys, "predict", "--checkpoint", run[0] / "best.pt", folder, "--json", "--device", "cpu")
    assert code == 2 and "Traceback" not in err
    assert "1 file(s) left out, not of an image type read here (.txt: 1), e.g. 'notes.txt'" in caplog.text
    records = {Path(r["path"]).name: r for r in json.loads(out)}
    assert set(records) == {"blue_0.png", "red_1.png", "broken.jpg"}
    assert "top" in records["blue_0.png"] and "top" in records["red_1.png"]
    assert "broken.jpg" in records["broken.jpg"]["error"]
    assert "broken.jpg" in err and "1 of 3 file(s) could not be read" in err
    code, out, err = run_cli(capsys, "predict", "--checkpoint", run[0] / "best.pt", folder / "broken.jpg")
    _assert_user_error(code, out, err, "broken.jpg")  # no empty line before it, no "1 of 1 file(s)" line after it


def test_export_safetensors_loads_into_a_fresh_model_with_identical_logits(run, capsys, tmp_path):
    import timm

    target = tmp_path / "m.safetensors"
    code, out, err = run_cli(capsys, "export", "--checkpoint", run[0] / "best.pt", "--to", target)
    assert code == 0, err
    meta = json.loads((tmp_path / "m.json").read_text())
    record = checkpoint.load(run[0] / "best.pt")
    assert meta["classes"] == sorted(CLASSES) and meta["model"] == "timm:test_efficientnet"
    assert meta["preprocess"] == record["preprocess"] and meta["preprocess"]["input_size"] == 32
    fresh = ft.replace_head(timm.create_model("test_efficientnet"), len(meta["classes"]))
    fresh.load_state_dict(load_file(target), strict=True)
    trained, _ = checkpoint.build_model(record)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), trained.eval()(x))


def test_inspect_prints_stage_table_and_memory_estimate(capsys):
    code, out, err = run_cli(capsys, "inspect", "--model", "timm:test_efficientnet", "--img-size", "32")
    assert code == 0, err
    assert "head: classifier" in out
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()}
    for stage in ("stem", "blocks.0", "blocks.4", "classifier"):
        assert stage in table, out
    assert table["blocks.0"][1] == "0" and table["classifier"][0] == table["classifier"][1]  # backbone frozen
    full, frozen = (float(table[mode][-1].replace(",", "")) for mode in ("full", "frozen"))
    assert 0 < frozen < full


def test_inspect_of_a_timm_model_built_without_a_head_names_the_flag_that_adds_one(capsys):
    # EVA-02's MIM weights come with num_classes=0: the error named a Python call on the command line
    argv = ("inspect", "--model", "timm:eva02_tiny_patch14_224", "--img-size", "224")
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "Eva has no classifier head" in err, err
    assert err.strip().endswith("(freezetune inspect: --num-classes N)"), err
    code, out, err = run_cli(capsys, *argv, "--num-classes", "5")
    assert code == 0 and "head: head" in out, err


def test_inspect_batch_size_auto_says_what_train_would_pick(capsys):
    code, out, err = run_cli(capsys, "inspect", "--model", "timm:test_efficientnet", "--img-size", "32",
                             "--batch-size", "auto")  # fmt: skip
    assert code == 0, err
    assert "--batch-size auto -> 32: the default 32 (no CUDA device to measure on cpu)" in out
    assert "training memory estimate at batch 32," in out


@pytest.mark.parametrize(("amp", "shown"), [("bf16", "bf16 autocast"), ("off", "fp32")])
def test_inspect_estimates_the_step_in_the_precision_asked_for(capsys, amp, shown):
    code, out, err = run_cli(capsys, "inspect", "--model", "timm:test_efficientnet", "--img-size", "32", "--amp", amp)
    assert code == 0, err
    assert f"batch 32, {shown}:" in out


# --- user errors --------------------------------------------------------------------------------------------------


def _assert_user_error(code, out, err, *needles):
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("freezetune: error: "), err
    assert "Traceback" not in err + out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--model", "timm:no_such_net"], ["no_such_net"]),
        (["--freeze", "blocks.9"], ["blocks.9", "stages are", "blocks.4"]),
        (["--bn", "bogus"], ["bogus", "frozen"]),
        (["--unfreeze", "weekly"], ["weekly", "epoch:N"]),
        (["--epochs", "0", "--lr", "-1"], ["epochs", "lr"]),  # every problem in one message
        (["--skip-nonfinite", "-1"], ["skip_nonfinite must be >= 0, got -1"]),
        (
            ["--freeze", "backbone", "--cache", "memory", "--cache-at", "nosuch"],
            ["unknown cache_at stage 'nosuch'", "'blocks.0'"],
        ),
        # beside cache off (the tiny runs' --cache off) a cut does nothing: refused with the config
        (["--freeze", "backbone", "--cache-at", "blocks.1"], ["cache_at 'blocks.1' sets where", "drop one of them"]),
        # a stage that trains from the start: the run went on uncached, exit 0 ("feature cache off: cannot cut")
        (  # a plan's epoch-0 stage too (it opens as the optimizer is built)
            ["--freeze", "-1", "--unfreeze", "{0: blocks.3}", "--cache", "memory", "--cache-at", "blocks.4"],
            ["cache_at 'blocks.4' trains from the start of the run", "'blocks.2', 'blocks.3'; give one"],
        ),
        (
            ["--freeze", "-3", "--cache", "memory", "--cache-at", "classifier"],
            ["cache_at 'classifier' trains from the start of the run", "'blocks.2', 'blocks.3'; give one"],
        ),  # fmt: skip
        (["--recipe", "last-99"], ["'last-99': k is out of range", "last-1 to last-6"]),  # not "stage count -100"
        # the API's "unfreeze a stage first", in a CLI run, named nothing the user could do
        (["--freeze", "all"], ["freeze 'all' leaves no parameter to train; freeze less: 'backbone' trains the head"]),
        (["--freeze", "all", "--unfreeze", "epoch:1"], ["to train in the first epoch (an unfreeze schedule opens"]),
    ],
)
def test_train_user_errors_exit_2_with_one_line(data, tmp_path, capsys, extra, needles):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, *train_argv(data, out_dir, *extra))
    _assert_user_error(code, out, err, *needles)
    assert not out_dir.exists()  # a failed set-up leaves no empty run dir behind


def test_bad_data_path_is_a_user_error(tmp_path, capsys):
    code, out, err = run_cli(capsys, *train_argv(tmp_path / "nope", tmp_path / "run"))
    _assert_user_error(code, out, err, "nope", "does not exist")


def test_existing_run_dir_without_resume_is_refused_and_left_untouched(run, data, capsys):
    before = snapshot(run[0])
    code, out, err = run_cli(capsys, *train_argv(data, run[0], "--epochs", "1"))
    _assert_user_error(code, out, err, str(run[0]), "--resume")
    assert snapshot(run[0]) == before


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_a_users_own_config_yaml_in_the_out_dir_is_refused_and_kept(data, tmp_path, capsys, resume):
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "config.yaml").write_text(f"data: {data}\nimg_size: 32\nepochs: 1\n")
    before = snapshot(out_dir)
    code, out, err = run_cli(capsys, *train_argv(data, out_dir, "--config", out_dir / "config.yaml",
                                                 "--freeze", "backbone", *resume))  # fmt: skip
    _assert_user_error(code, out, err, str(out_dir), "config.yaml that no run wrote", "another --out")
    assert snapshot(out_dir) == before


def test_a_users_own_config_yaml_beside_a_class_list_is_refused_and_kept(data, tmp_path, capsys):
    # a classes.json of class names (the first file a run writes) made the folder a stopped run's: the user's
    # config.yaml was replaced by the run's without a word
    out_dir = tmp_path / "proj"
    out_dir.mkdir()
    (out_dir / "config.yaml").write_text("my_team_settings: {owner: alice}\n")
    (out_dir / "classes.json").write_text(json.dumps(CLASSES))
    before = snapshot(out_dir)
    code, out, err = run_cli(capsys, *train_argv(data, out_dir, "--freeze", "backbone"))
    _assert_user_error(code, out, err, str(out_dir), "config.yaml that no run wrote", "another --out")
    assert snapshot(out_dir) == before


def test_a_fresh_run_clears_an_earlier_auto_runs_decision_so_its_resume_resumes_it(data, tmp_path, capsys):
    # an auto run stopped before its final run's first epoch left recipe.json and auto-trials/; a --freeze run started
    # there kept them, and its --resume took the stale decision and refused every setting of the run
    import shutil

    code, _, err = run_cli(capsys, *train_argv(data, tmp_path / "auto", "--epochs", "1"))
    assert code == 0, err
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    for name in ("classes.json", "recipe.json"):
        shutil.copy(tmp_path / "auto" / name, stopped / name)
    shutil.copytree(tmp_path / "auto" / "auto-trials", stopped / "auto-trials")
    code, out, err = run_cli(capsys, *train_argv(data, stopped, "--freeze", "-3", "--epochs", "1"))
    assert code == 0, err
    assert "starting it afresh (cleared recipe.json, auto-trials)" in out
    assert not (stopped / "recipe.json").exists() and not (stopped / "auto-trials").exists()
    code, out, err = run_cli(capsys, "train", "--out", str(stopped), "--resume")
    assert code == 0 and "auto:" not in out, err
    # a dir a freezetune before this fix left so (the stale recipe.json kept): its decision is not the run's
    shutil.copy(tmp_path / "auto" / "recipe.json", stopped / "recipe.json")
    code, out, err = run_cli(capsys, "train", "--out", str(stopped), "--resume")
    assert code == 0 and "auto:" not in out, err


def test_a_resume_that_moves_best_pt_without_scoring_it_removes_the_earlier_test_files(tmp_path, capsys):
    # test_metrics.json (acc of the old best.pt, which it did not name) and confusion.png outlived the resume
    data = make_image_folder(tmp_path / "images", train=6, val=0, test=2)
    argv = train_argv(data, tmp_path / "run", "--freeze", "-3", "--refit", "--scheduler", "none")  # best.pt: the last
    code, _, err = run_cli(capsys, *argv, "--epochs", "1")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "test_metrics.json").read_text())["epoch"] == 1
    code, out, err = run_cli(capsys, *argv, "--epochs", "2", "--resume", "--no-final-test")
    assert code == 0, err
    assert "removed test_metrics.json, confusion.png: they scored an earlier best.pt (this run's is epoch 2" in out
    assert not (tmp_path / "run" / "test_metrics.json").exists() and not (tmp_path / "run" / "confusion.png").exists()
    # moved by an earlier attempt (stopped before its final test): judged by the epoch the file names
    code, out, err = run_cli(capsys, *argv, "--epochs", "2", "--resume")  # its config keeps --no-final-test's false
    assert code == 0 and ("(report; the test split is not scored: final_test is off (--no-final-test, or a sweep's "
                          "run)) runs again") in out, err  # fmt: skip
    code, _, err = run_cli(capsys, *argv, "--epochs", "2", "--resume", "--final-test")  # the finished run's test
    assert code == 0 and json.loads((tmp_path / "run" / "test_metrics.json").read_text())["epoch"] == 2, err
    code, out, err = run_cli(capsys, *argv, "--epochs", "2", "--resume", "--no-final-test")
    assert code == 0 and (tmp_path / "run" / "test_metrics.json").exists(), err  # it scored this best.pt: kept
    scored = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    (tmp_path / "run" / "test_metrics.json").write_text(json.dumps({**scored, "epoch": 1}))
    code, out, err = run_cli(capsys, *argv, "--epochs", "2", "--resume", "--no-final-test")
    assert code == 0 and "removed test_metrics.json, confusion.png" in out, err


def test_a_stage_lr_that_a_schedule_opening_nothing_leaves_unused_is_noted(data, tmp_path, capsys):
    # the note was held back whenever a schedule was given, even one whose first opening comes after the last epoch
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--freeze", "backbone", "--epochs", "1",
                                                 "--stage-lrs", "blocks.4=1e-4", "--unfreeze", "epoch:5",
                                                 "--no-final-test"))  # fmt: skip
    assert code == 0, err
    assert "note: unfreeze 'epoch:5' opens nothing the 1-epoch run trains" in out
    assert "note: stage_lrs sets 'blocks.4', frozen in this run with nothing to unfreeze it" in out


def test_a_plateau_says_why_it_unfroze_and_a_min_delta_read_as_points_is_named(data, tmp_path, capsys):
    # min_delta=0.5 on val_acc (a fraction: 50 points) unfroze a stage every epoch, with nothing said of why
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--freeze", "backbone", "--epochs", "3",
                                                 "--unfreeze", "plateau:patience=1,min_delta=0.5"))  # fmt: skip
    assert code == 0, err
    assert "note: plateau min_delta 0.5 is in val_acc units, a fraction: 0.5 is 50 points of accuracy" in out
    assert "unfroze blocks.4 (val_acc did not improve by more than 0.5 for 1 epoch(s); trainable " in out
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "r2", "--freeze", "backbone", "--epochs", "1",
                                                 "--unfreeze", "plateau:patience=1,min_delta=0.005"))  # fmt: skip
    assert code == 0 and "note: plateau" not in out, err


def test_the_run_header_says_how_many_loader_workers_read_the_images(data, tmp_path, capsys):
    # each worker draws its own augmentations: two runs differed, and their logs did not say why
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--freeze", "-3", "--epochs", "1",
                                                 "--workers", "1", "--no-final-test"))  # fmt: skip
    assert code == 0 and " on cpu fp32, channels_last, 1 loader worker: " in out, out + err


@pytest.mark.parametrize("command", ["eval", "predict", "export", "inspect"])
def test_a_command_of_one_process_under_torchrun_is_refused(run, data, tmp_path, capsys, monkeypatch, command):
    # torchrun -m freezetune eval/export: every rank scored the data and wrote the same files, and printed it all
    argv = {"eval": ["--checkpoint", run[0] / "best.pt", "--data", data],
            "predict": ["--checkpoint", run[0] / "best.pt", data / "test"],
            "export": ["--checkpoint", run[0] / "best.pt", "--to", tmp_path / "m.onnx"],
            "inspect": ["--model", "timm:test_efficientnet", "--weights", "none"]}[command]  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 0 (RANK unset) of a two-process job
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, command, *argv)
    _assert_user_error(code, out, err, f"freezetune {command} runs in one process; torchrun is for train and sweep")
    assert snapshot(tmp_path) == before


def test_a_sigterm_under_torchrun_says_it_may_be_torchruns_own_after_another_process_ended(
    data, tmp_path, capsys, monkeypatch
):
    # rank 1 killed alone: torchrun sent SIGTERM to rank 0, which said "stopped by SIGTERM" of a signal nobody sent
    import signal

    from freezetune.run.interrupt import RunInterrupted
    from freezetune.training import trainer

    def stopped(cfg, **kwargs):
        raise RunInterrupted.by(signal.SIGTERM, "under torchrun, at once; --resume continues the run")

    monkeypatch.setattr(trainer, "train", stopped)
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run"))
    assert code == 143 and err.strip().endswith("--resume continues the run"), err  # one process: a signal sent
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run"))
    assert code == 143 and err.strip().endswith(
        "--resume continues the run (under torchrun: sent to the job, or by "
        "torchrun to every process once another one of them ended)"
    ), err


def test_rank_0_says_in_one_line_that_another_rank_of_the_job_ended(data, tmp_path, capsys, monkeypatch):
    # SIGTERM to rank 1 alone: rank 0 printed gloo's "Connection closed by peer" traceback, and no line said why
    from freezetune.training import trainer

    def peer_ended(cfg, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [::1]:1234")

    monkeypatch.setattr(trainer, "train", peer_ended)
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 0 (RANK unset) of a two-process job
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run"))
    assert code == 1 and err.strip() == ("freezetune: stopped: another process of this torchrun job ended (a signal "
                                         "to it, or its own error); last.pt, where there is one, holds the last epoch "
                                         "saved (--resume continues) ([../third_party/gloo/gloo/transport/tcp/pair.cc"
                                         ":561] Connection closed by peer [::1]:1234)"), err  # fmt: skip
    from torch.distributed import DistBackendError

    from freezetune.run.log import ending_line

    assert ending_line(RuntimeError("Connection closed by peer [::1]:1")).startswith("freezetune: stopped: another")
    # rank 0's own NCCL error (out of memory inside NCCL) is no peer's: its traceback is the only place it is said
    own = DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1, unhandled cuda error, ncclUnhandledCudaError")
    monkeypatch.setattr(trainer, "train", lambda cfg, **kwargs: (_ for _ in ()).throw(own))
    with pytest.raises(DistBackendError):
        main(train_argv(data, tmp_path / "run2"))


def test_an_unfreeze_says_the_learning_rate_the_opened_stage_trains_at(data, tmp_path, capsys):
    # the epoch line's "lr 7.5e-05..7.5e-04" never tied a rate to the stage that opened: --stage-lrs unconfirmed
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--freeze", "backbone", "--epochs", "3",
                                                 "--unfreeze", "epoch:1", "--stage-lrs", "blocks.4=1e-4"))  # fmt: skip
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("unfroze blocks.4"))
    assert "parameters; lr 1.0e-04 at its peak, " in line and line.endswith(" now)"), line
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["optimizer"]["param_groups"]
    assert [g.get("max_lr") for g in state if g.get("name") == "blocks.4"] == [1e-4]


def test_a_plan_that_opens_part_of_a_stage_says_what_it_opened_and_where(data, tmp_path, capsys):
    # "{1: '*.bias'}" trained the whole network and said "unfroze stem, blocks.0, ..." (each stage it touched)
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--freeze", "backbone", "--epochs", "2",
                                                 "--unfreeze", "{1: 'blocks.4.*.bias'}"))  # fmt: skip
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("unfroze"))
    assert line.startswith("unfroze blocks.4.*.bias (in blocks.4) (trainable "), line
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    added = int(rows[1]["trainable_params"]) - int(rows[0]["trainable_params"])
    assert 0 < added < 1000, added  # the biases, not the stage's convolutions


def test_half_precision_on_a_cpu_is_named_slow_and_fp16_trains_with_loss_scaling(data, tmp_path, capsys):
    # --amp fp16 on a CPU: 50 times fp32's epoch without a word, and no GradScaler (fp16 gradients underflow)
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--freeze", "backbone", "--epochs", "1",
                                                 "--amp", "fp16"))  # fmt: skip
    assert code == 0, err
    assert "note: --amp fp16 on cpu: a CPU without native half-precision units emulates it" in out
    scaler = checkpoint.load(tmp_path / "run" / "last.pt")["scaler"]
    assert scaler and scaler["scale"] > 0  # a disabled scaler saves an empty state
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "off", "--freeze", "backbone", "--epochs", "1"))
    assert code == 0 and "note: --amp" not in out, err


def test_a_cpu_fp16_run_saved_before_its_loss_scaling_resumes(data, tmp_path, capsys):
    # its last.pt holds a disabled scaler's empty state: GradScaler.load_state_dict({}) raised a traceback
    argv = train_argv(data, tmp_path / "run", "--freeze", "backbone", "--amp", "fp16", "--scheduler", "none")
    code, _, err = run_cli(capsys, *argv, "--epochs", "1")
    assert code == 0, err
    record = checkpoint.load(tmp_path / "run" / "last.pt")
    torch.save({**record, "scaler": {}}, tmp_path / "run" / "last.pt")
    code, out, err = run_cli(capsys, *argv, "--epochs", "2", "--resume")
    assert code == 0 and "epoch 2/2" in out, err


def test_inspect_freeze_auto_shows_what_the_auto_recipes_default_candidate_trains(capsys):
    # it said "run it through freezetune.train(cfg) or the CLI" to a user of the CLI
    code, out, err = run_cli(capsys, "inspect", "--model", "timm:test_efficientnet", "--img-size", "32", "--freeze",
                             "auto")  # fmt: skip
    assert code == 0, err
    assert "freeze: auto (measured when train runs; its default candidate, the last 3 stages: -4;" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.startswith(("blocks", "stem"))}
    assert rows["blocks.1"][2] == "0" and rows["blocks.2"][2] != "0"  # frozen through blocks.1: the last 3 train


def test_a_run_without_its_final_test_ends_on_a_line_naming_best_pt(data, tmp_path, capsys):
    # --no-final-test ended on the last epoch line: which epoch best.pt held was left to the reader
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--epochs", "2", "--no-final-test"))
    assert code == 0, err
    ends = [line for line in out.splitlines() if line.startswith("best.pt: epoch ")]
    assert len(ends) == 1 and out.rstrip().endswith(ends[0])  # the final run's, not each auto trial's
    assert "(the test split is not scored in this run) -> " in ends[0]


def test_resume_without_last_pt_is_a_user_error(data, tmp_path, capsys):
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "fresh", "--resume"))
    _assert_user_error(
        code, out, err, "fresh' does not exist", "--resume (resume=True) needs the run dir of an existing run"
    )


def test_a_resume_with_fewer_epochs_than_trained_is_refused_and_leaves_the_run_as_it_was(data, tmp_path, capsys):
    # accepted: "all 2 epochs were trained; nothing trains", and config.yaml said epochs 2 beside 3 epochs of rows
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_argv(data, out, "--epochs", "3", "--freeze", "backbone", "--scheduler",
                                                "none"))  # fmt: skip
    assert code == 0, err
    before = snapshot(out)
    code, stdout, err = run_cli(capsys, "train", "--out", out, "--resume", "--epochs", "2")
    _assert_user_error(
        code, stdout, err, "with epochs 2: it has trained 3 epochs", "give --epochs 3 (epochs=3) or more"
    )
    assert snapshot(out) == before


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        # no run there and no --data: the missing run is the problem, not the data (was "data is required")
        (
            ["--out", "runs/typo", "--resume"],
            ["'runs/typo' does not exist", "--resume (resume=True) needs the run dir"],
        ),
        # a run dir a run stopped in before it wrote its settings (here: empty): "data is required"
        (
            ["--out", "runs/empty", "--resume"],
            ["cannot resume 'runs/empty': it holds no settings of a run to resume", "again, without --resume"],
        ),
        # no --out: was "cannot resume: runs/<model>-<timestamp>/last.pt does not exist", a dir never named
        (
            ["--resume", "--data", "images"],
            [
                "nothing to resume: no run dir given",
                "--resume (resume=True) needs the run dir",
                "given with --out (out=...)",
            ],
        ),
    ],
)
def test_resume_without_a_run_dir_says_resume_needs_one(tmp_path, capsys, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "images")
    if "runs/empty" in argv:
        (tmp_path / "runs" / "empty").mkdir(parents=True)
    code, out, err = run_cli(capsys, "train", *argv)
    _assert_user_error(code, out, err, *needles)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs" / "empty").iterdir())


def test_a_run_whose_config_yaml_is_gone_resumes_with_last_pts_config_and_a_lost_metrics_csv_is_said(
    data, tmp_path, capsys
):
    # refused as holding "no settings of a run" (run it again without --resume), which was refused as holding a run
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_argv(data, out, "--freeze", "-2", "--scheduler", "none", "--epochs", "1"))
    assert code == 0, err
    (out / "config.yaml").unlink()
    code, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--epochs", "2")
    assert code == 0, err
    assert [row["epoch"] for row in read_metrics(out / "metrics.csv")] == [1, 2]
    assert yaml.safe_load((out / "config.yaml").read_text())["freeze"] == -2  # the run's own, written again
    # metrics.csv deleted: a new one of the later epochs alone, and report.png drawn from it, without a word
    (out / "metrics.csv").unlink()
    code, stdout, err = run_cli(capsys, "train", "--out", out, "--resume", "--epochs", "3")
    assert code == 0 and "note: metrics.csv lacks the row(s) of epoch(s) 1-2 (deleted since they were logged)" in stdout
    assert [row["epoch"] for row in read_metrics(out / "metrics.csv")] == [3]


def test_a_run_given_relative_paths_resumes_from_another_directory(data, tmp_path, capsys, monkeypatch):
    # config.yaml kept `data: images` as typed: a --resume from another directory said "data path 'images' does not
    # exist", and so did `train --config` of that file
    import shutil

    shutil.copytree(data, tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *train_argv(Path("images"), Path("r"), "--epochs", "2", "--freeze", "backbone",
                                                 "--scheduler", "none", "--cache-dir", "feats"))  # fmt: skip
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["data"] == str(tmp_path / "images") and saved["cache_dir"] == str(tmp_path / "feats")
    assert saved["weights"] == "none" and saved["model"] == "timm:test_efficientnet"  # keywords and names stay
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out, err = run_cli(capsys, "train", "--out", tmp_path / "r", "--resume", "--epochs", "3")
    assert code == 0 and "resumed" in out, err
    monkeypatch.chdir(tmp_path)  # a resume given the same paths as typed, from where they were typed, is the same run
    code, out, err = run_cli(capsys, "train", "--out", "r", "--resume", "--data", "images", "--epochs", "4")
    assert code == 0 and "resumed" in out, err


def test_out_naming_a_file_is_a_user_error_and_the_file_is_kept(data, tmp_path, capsys):
    outfile = tmp_path / "outfile"
    outfile.write_text("mine")
    for out in (outfile, outfile / "run"):  # was "File exists (outfile)" / "Not a directory", as if a disk error
        code, stdout, err = run_cli(capsys, *train_argv(data, out, "--freeze", "backbone"))
        _assert_user_error(code, stdout, err, "outfile' is a file, not a directory")
    assert outfile.read_text() == "mine"


def test_a_cache_dir_or_out_that_cannot_be_a_folder_is_refused_before_anything_is_computed(data, tmp_path,
                                                                                          monkeypatch):  # fmt: skip
    # --cache-dir naming a file failed with FileExistsError from pathlib, after the feature cache was built
    import dataclasses

    from freezetune.errors import ConfigError
    from freezetune.run import directory as runtime

    (tmp_path / "afile").write_text("mine")
    built = []
    monkeypatch.setattr(runtime, "prepare_run_dir", lambda *a, **k: built.append(1))  # nothing may start
    cfg = ft.TrainConfig(data=str(data), out=str(tmp_path / "run"), cache_dir=str(tmp_path / "afile"), epochs=1)
    with pytest.raises(ConfigError, match=r"--cache-dir '.*afile': '.*afile' is a file, not a directory"):
        ft.train(cfg)
    monkeypatch.setattr(runtime.os, "access", lambda path, mode: False)  # a read-only mount (root may write anywhere)
    with pytest.raises(ConfigError, match=r"--out '.*run': '.*' is not writable \(where it would be made\)"):
        ft.train(dataclasses.replace(cfg, cache_dir=None))
    assert not built and (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "run").exists()
    monkeypatch.undo()  # (the real os.access and prepare_run_dir again) a dangling link where the run dir would be:
    (tmp_path / "link").symlink_to(tmp_path / "gone")  # mkdir failed with FileExistsError after the set-up
    with pytest.raises(ConfigError, match=r"--out '.*link': '.*link' is a broken link, not a directory"):
        ft.train(dataclasses.replace(cfg, out=str(tmp_path / "link"), cache_dir=None))


def test_a_run_dir_or_cache_inside_the_data_folder_read_for_classes_is_refused_before_any_work(tmp_path, capsys,
                                                                                              monkeypatch):  # fmt: skip
    # its auto-trials/ and features/ became class folders: the run failed after its trials, and every later one on
    # that data; with --freeze none a second run trained a class "runs" of one image, the first's report.png
    import shutil

    flat = tmp_path / "flat"
    shutil.copytree(make_image_folder(tmp_path / "split", val=0, test=0) / "train", flat)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for data, out in (
        (flat, flat / "runs" / "r1"),
        (flat, flat / "red" / "r"),
        (tmp_path / "split", tmp_path / "split" / "train" / "r"),
    ):
        code, stdout, err = run_cli(capsys, *train_argv(data, out))
        _assert_user_error(code, stdout, err, f"--out '{out}' lies inside the data folder", "give --out outside it")
    code, stdout, err = run_cli(capsys, *train_argv(tmp_path / "split", tmp_path / "r", "--cache-dir", flat / "f",
                                                    "--val-data", flat))  # fmt: skip
    _assert_user_error(code, stdout, err, f"--cache-dir '{flat / 'f'}' lies inside the data folder '{flat}'")
    monkeypatch.chdir(flat)  # the default runs/ of a user who trains from inside the data
    code, stdout, err = run_cli(
        capsys, "train", "--data", ".", "--model", "timm:test_efficientnet", "--weights", "none"
    )
    _assert_user_error(code, stdout, err, "the default run dir (runs/ in the current folder")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    code, stdout, err = run_cli(capsys, *train_argv(tmp_path / "split", tmp_path / "split" / "runs" / "r"))
    assert code == 0, err  # beside the split folders: not read, allowed


def test_export_refuses_to_overwrite_without_force(run, capsys, tmp_path):
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"precious")
    code, out, err = run_cli(capsys, "export", "--checkpoint", run[0] / "best.pt", "--to", target)
    _assert_user_error(code, out, err, "m.safetensors", "--force")
    assert target.read_bytes() == b"precious" and not (tmp_path / "m.json").exists()
    code, _, _ = run_cli(capsys, "export", "--checkpoint", run[0] / "best.pt", "--to", target, "--force")
    assert code == 0 and target.read_bytes() != b"precious"


@pytest.mark.parametrize("kind", ["png", "text", "directory", "missing"])
def test_eval_of_a_non_checkpoint_is_a_user_error(run, data, capsys, tmp_path, kind):
    path = {
        "png": data / "test" / "red" / "red_0.png",
        "text": tmp_path / "notes.pt",
        "directory": run[0],
        "missing": tmp_path / "gone.pt",
    }[kind]
    (tmp_path / "notes.pt").write_text("hello\n")
    code, out, err = run_cli(capsys, "eval", "--checkpoint", path, "--data", data, "--device", "cpu")
    hint = {"png": "not a PyTorch checkpoint", "text": "not a PyTorch checkpoint", "directory": "best.pt",
            "missing": "does not exist"}[kind]  # fmt: skip
    _assert_user_error(code, out, err, str(path), hint)


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["predict", "IMAGE_MISSING", "--topk", "2"], ["nothere.png", "does not exist"]),
        (["predict", "IMAGE", "--topk", "0"], ["topk must be >= 1, got 0"]),
        (["eval", "--data", "DATA", "--batch-size", "0"], ["batch_size must be >= 1, got 0"]),
        (["inspect", "--model", "timm:test_efficientnet", "--freeze", "blocks.9"], ["blocks.9", "blocks.4"]),
        (["inspect", "--model", "test_efficientnet"], ["test_efficientnet", "timm:"]),  # no library prefix
        (["inspect", "--model", "timm:test_efficientnet", "--amp", "fp8"], ["fp8", "'bf16'"]),
        (["inspect", "--model", "timm:test_efficientnet", "--batch-size", "0"], ["batch_size", "got 0"]),
        (["inspect", "--model", "timm:test_efficientnet", "--batch-size", "many"], ["batch_size", "'many'", "'auto'"]),
        (["inspect", "--model", "timm:test_efficientnet", "--num-classes", "0"], ["num_classes", "got 0"]),
    ],
)
def test_predict_eval_and_inspect_user_errors(run, data, capsys, argv, needles):
    image = data / "test" / "red" / "red_0.png"
    argv = [
        {"IMAGE": str(image), "IMAGE_MISSING": str(data / "nothere.png"), "DATA": str(data)}.get(a, a) for a in argv
    ]
    if argv[0] in ("predict", "eval"):
        argv += ["--checkpoint", str(run[0] / "best.pt"), "--device", "cpu"]
    _assert_user_error(*run_cli(capsys, *argv), *needles)


def test_unknown_device_is_a_user_error(run, data, capsys):
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run[0] / "best.pt", "--data", data, "--device", "tpu9")
    _assert_user_error(code, out, err, "tpu9")


# --- the installed entry point -----------------------------------------------------------------------------------


def test_python_dash_m_freezetune_help_and_version():
    help_ = subprocess.run([sys.executable, "-m", "freezetune", "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0, help_.stderr
    for command in ("train", "eval", "predict", "inspect", "export"):
        assert command in help_.stdout
    version = subprocess.run([sys.executable, "-m", "freezetune", "--version"], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    assert version.returncode == 0 and version.stdout.strip() == f"freezetune {__version__}"


def test_the_command_exits_without_the_interpreters_exit_time_walk_of_every_object():
    # a second between a command's last line and the prompt went to collections of objects that die with the process
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["freezetune"] == "freezetune.cli.main:run"
    probe = ("import atexit, gc, sys; sys.argv = ['freezetune', '--version']; "
             "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0)); "
             "from freezetune.cli.main import run; run()")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split("\n")[-2:] == ["frozen True", ""], done.stdout + done.stderr


def test_the_command_line_starts_without_the_data_pipeline_or_the_plots():
    # --help's text imported data.datasets for two numbers, and with it torchvision: a second more on every command;
    # the sweep's defaults imported the sweep, and with it matplotlib: two more seconds on --help and --version
    probe = "import sys, freezetune.cli.main; print('torchvision' in sys.modules, 'matplotlib' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "False False", loaded.stderr


def test_the_command_line_starts_without_torch_and_help_never_loads_it():
    # the package imported torch for its public names: 1.5 s before --help or --version printed anything
    probe = ("import sys; sys.argv = ['freezetune', '--help']\nimport freezetune, freezetune.cli.main\n"
             "print('torch' in sys.modules)\ntry:\n    freezetune.cli.main.run()\n"
             "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    out = done.stdout
    assert done.returncode == 0 and out.startswith("False\nusage:") and out.endswith("\n0 False\n"), out + done.stderr


def test_ctrl_c_while_torch_loads_is_one_line_not_a_traceback(tmp_path):
    # Ctrl-C in a command's first second or two lands in torch's import; that import ran with the package's, before
    # the command's own handling, and printed a traceback. The hook stands in for the key: it interrupts that import.
    probe = ("import sys\nclass CtrlC:\n    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'torch':\n            raise KeyboardInterrupt\n"
             "sys.meta_path.insert(0, CtrlC())\nsys.argv = ['freezetune', *sys.argv[1:]]\n"
             "from freezetune.cli.main import run\nrun()")  # fmt: skip
    argv = ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("freezetune: interrupted"), done.stderr
    assert len(done.stderr.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_the_packages_functions_keep_their_names_beside_submodules_of_the_same_name():
    # freeze, param_groups and stages are functions of the package and modules in it: once the trainer (or any
    # code) imported the module, the package's lazy attribute would have become the module, not the function
    probe = ("import freezetune as ft, freezetune.training.trainer, freezetune.training.param_groups\n"
             "print(all(callable(f) for f in (ft.freeze, ft.param_groups, ft.stages, ft.replace_head)))\n"
             "print(sorted({'freeze', 'train', 'TrainConfig'} - set(dir(ft))))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split("\n") == ["True", "[]", ""], done.stdout + done.stderr


def test_commands_that_draw_nothing_do_not_import_matplotlib():
    # predict, export and inspect imported it (half a second) through the metrics and the report's modules. One
    # process imports them in turn (a process each took 4 s of torch imports): the first that loads it is named.
    modules = ["inference.evaluation", "inference.predict", "inference.export", "model.describe", "training.trainer"]
    probe = ("import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module('freezetune.' + m)\n"
             "    print(m, 'matplotlib' in sys.modules)")  # fmt: skip
    loaded = subprocess.run([sys.executable, "-c", probe, *modules], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split("\n")[: len(modules)] == [f"{m} False" for m in modules], loaded.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="device auto finds CUDA here")
def test_decode_gpu_without_cuda_is_refused_unless_the_cpu_is_asked_for(data, tmp_path, capsys):
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--device", "auto", "--decode", "gpu"))
    _assert_user_error(code, out, err, "decode 'gpu'", "device auto -> cpu", "--decode cpu")
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli(capsys, *train_argv(data, tmp_path / "cpu", "--device", "cpu", "--decode", "gpu",
                                               "--epochs", "1", "--freeze", "backbone", "--no-final-test"))  # fmt: skip
    assert code == 0, err


def test_no_command_is_a_usage_error(capsys):
    code, out, err = run_cli(capsys)
    assert code == 2 and out == "" and "usage: freezetune" in err and "train" in err


def test_key_value_overrides_may_follow_flags_and_a_stray_argument_is_one_line_naming_the_commands_help(capsys):
    code, out, err = run_cli(capsys, "train", "--data", "x", "epochs=2", "--lr", "0.5", "seed=3", "--print-config")
    printed = yaml.safe_load(out)
    assert code == 0 and (printed["epochs"], printed["lr"], printed["seed"]) == (2, 0.5, 3)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", "x", "epochs=2", "--lr", "0.5", "stray", "--print-config"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err == (
        "freezetune train: error: unrecognized arguments: stray (see freezetune train --help)\n"
    )


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        # argparse's usage block (some 30 lines) came first and buried the line
        (["--epochs", "2.5"], "argument --epochs: invalid int value: '2.5'"),
        (["--val-split", "10%"], "argument --val-split: invalid float value: '10%'"),
        # "override 'false' is not key=value; keys are: ..." (forty of them), never that the flag is a switch
        (["--progress", "false"], "--progress is a switch and takes no value ('false' follows it): give --progress "
         "or --no-progress alone, or the override progress=false"),
        (["--verbose", "yes"], "--verbose is a switch and takes no value ('yes' follows it): give -v or --verbose "
         "alone"),
        # the word given earlier too (argv.index found the first), an abbreviation argparse takes, a word not a value
        (["--epochs", "1", "--progress", "1"], "--progress is a switch and takes no value ('1' follows it): give "
         "--progress or --no-progress alone, or the override progress=1"),
        (["--prog", "false"], "--prog is a switch and takes no value ('false' follows it): give --progress or "
         "--no-progress alone, or the override progress=false"),
        (["--final-test", "epochs"], "--final-test is a switch and takes no value ('epochs' follows it): give "
         "--final-test or --no-final-test alone"),
        # "expected one argument" alone: argparse took the value for an option, and the budget's check never saw it
        (["--budget", "-1m"], "argument --budget: expected one argument ('-1m' was read as an option: give "
         "--budget=-1m)"),
        (["--out", "--epochs", "2"], "argument --out: expected one argument"),  # a missing value: no such advice
    ],
)  # fmt: skip
def test_a_flags_mistake_is_one_line_that_says_what_is_wrong(capsys, argv, line):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", "x", "--print-config", *argv])
    _, err = capsys.readouterr()
    assert exit_.value.code == 2 and err == f"freezetune train: error: {line} (see freezetune train --help)\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "", "--print-config"],
        ["train", "--data", "x", "--out", " ", "--print-config"],
        ["sweep", "--data", ""],
        ["eval", "--checkpoint", "", "--data", "x"],
        ["eval", "--checkpoint", "best.pt", "--data", ""],
        ["export", "--checkpoint", "best.pt", "--to", ""],
    ],
)
def test_an_empty_path_is_refused_not_read_as_the_current_directory(capsys, tmp_path, monkeypatch, argv):
    # --data "$DATA" with DATA unset trained on the current directory and recorded data: '' for a resume to look for
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    _, err = capsys.readouterr()
    flag = argv[[i for i, a in enumerate(argv) if not a.strip()][0] - 1]
    assert exit_.value.code == 2
    assert err.startswith(f"freezetune {argv[0]}: error: argument {flag}: empty path ") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_an_empty_path_in_a_config_file_is_refused(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("data: ''\ncache_dir: ''\n")
    code, _, err = run_cli(capsys, "train", "--config", tmp_path / "c.yaml")
    assert code == 2 and "data is an empty path (''): give a file or folder, or leave it out" in err
    assert "cache_dir is an empty path" in err and err.count("\n") == 1


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_second_config_file_is_refused_not_read_in_place_of_the_first(capsys, tmp_path, command):
    # the second file alone was read: the first's model, epochs and recipe back at their defaults, unsaid
    (tmp_path / "base.yaml").write_text("epochs: 2\nimg_size: 32\n")
    (tmp_path / "over.yaml").write_text("lr: 0.005\n")
    with pytest.raises(SystemExit) as exit_:
        main([command, "--config", str(tmp_path / "base.yaml"), "--config", str(tmp_path / "over.yaml"),
              "--print-config"])  # fmt: skip
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and not out and err.count("\n") == 1, err
    assert f"--config is given twice ({tmp_path / 'base.yaml'}, {tmp_path / 'over.yaml'}): one file is read" in err


def test_print_config_says_what_a_recipe_sets_and_reads_back_as_a_config(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "--recipe", "lp-ft", "--lr", "0.002", "--print-config")
    assert code == 0, err
    plan = "#   probe: freeze 'backbone', lr 0.02\n#   fine-tune: freeze 'none', bn_stats 'frozen'\n"
    assert plan in out  # not only "freeze: auto"
    (tmp_path / "c.yaml").write_text(out)
    code, again, err = run_cli(capsys, "train", "--config", tmp_path / "c.yaml", "--print-config")
    assert code == 0 and again == out, err
    _, auto, _ = run_cli(capsys, "train", "--print-config")
    assert "# freeze auto: the stages to freeze are measured on the validation split" in auto
    _, plain, _ = run_cli(capsys, "train", "--freeze", "-3", "--print-config")
    assert "#" not in plain


def test_command_defaults_come_from_the_config_dataclass():
    from freezetune.cli.main import _parser
    from freezetune.config.options import FREEZE_DEFAULT
    from freezetune.config.train_config import TrainConfig

    parser, defaults = _parser(), TrainConfig()
    evaluate = parser.parse_args(["eval", "--checkpoint", "c.pt", "--data", "d"])
    assert (evaluate.batch_size, evaluate.device) == (None, defaults.device)  # None: the run's (run_batch_size)
    inspect = parser.parse_args(["inspect", "--model", "timm:x"])
    assert (inspect.batch_size, inspect.bn, inspect.freeze) == (defaults.batch_size, defaults.bn, FREEZE_DEFAULT)
    assert parser.parse_args(["predict", "--checkpoint", "c.pt", "a.png"]).device == defaults.device


def test_train_help_explains_every_flag_under_its_section():
    from freezetune.cli.main import _parser
    from freezetune.config.train_config import field_names

    train = _parser()._subparsers._group_actions[0].choices["train"]
    sections = {group.title: [a.dest for a in group._group_actions] for group in train._action_groups}
    for name in field_names():  # a field added to TrainConfig without a word for --help fails here
        action = next(a for a in train._actions if a.dest == name)
        assert action.help and not action.help.startswith("[default"), f"--{name} has no help"
        assert "[default: None]" not in action.help, f"--{name}: say what None decides"
    assert sections["data"][:2] == ["data", "val_data"] and "lr" in sections["optimisation"]
    assert [t for t in sections if t in ("model", "data", "freezing", "optimisation", "speed", "run")] == [
        "model", "data", "freezing", "optimisation", "speed", "run"]  # fmt: skip
    assert sum(len(dests) for title, dests in sections.items() if title not in ("positional arguments", "options")) \
        == len(field_names())  # fmt: skip
    assert "[default: on]" in train.format_help() and "[default: True]" not in train.format_help()
    sweep = _parser()._subparsers._group_actions[0].choices["sweep"]  # its own words, still with choices and default
    said = {a.dest: a.help for a in sweep._actions}
    assert said["monitor"].startswith("what each recipe's best.pt") and said["monitor"].endswith(
        "one of val_acc | val_loss | val_f1 [default: val_acc]")  # fmt: skip
    # no default for a flag it refuses; auto, which it takes, is said (the help said "refused")
    assert said["freeze"] == "refused but for auto, which changes nothing: each of --recipes sets its own"
    assert said["recipe"] == "refused but for auto, which changes nothing: give --recipes"


def test_unreadable_image_stops_train_before_it_starts_and_skip_bad_trains_without_it(tmp_path, capsys):
    data = make_image_folder(tmp_path / "img", train=4, val=2, test=2)
    bad = data / "train" / "red" / "red_1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    before = snapshot(data)
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--epochs", "1"))
    _assert_user_error(code, out, err, "1 of 12 training image file(s) cannot be read", str(bad), "--skip-bad")
    assert not (tmp_path / "run").exists() and snapshot(data) == before
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--epochs", "1", "--skip-bad"))
    assert code == 0, err
    assert "skipped 1 unreadable image file(s)" in out
    assert (tmp_path / "run" / "skipped.txt").read_text() == f"{bad}\n"


def test_an_image_that_fails_in_a_loader_worker_is_one_line_too(tmp_path, capsys, monkeypatch):
    # the DataLoader re-raises a worker's error with the worker's traceback as its message; the user gets its last line
    from freezetune.data import scan

    data = make_image_folder(tmp_path / "img", train=4, val=2, test=0)
    bad = data / "train" / "red" / "red_1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    # as if the file broke after the pre-scan
    monkeypatch.setattr(scan, "unreadable", lambda paths, decode=False, **_: [])
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--epochs", "1", "--workers", "2"))
    _assert_user_error(code, out, err, f"cannot read image '{bad}'")
    assert "worker process" not in err


@pytest.mark.parametrize("fmt", ["folder", "csv", "idx"])
def test_eval_refuses_data_whose_class_names_differ_from_the_checkpoint(run, capsys, tmp_path, fmt):
    other = make_image_folder(tmp_path / "img", train=0, val=0, test=1)
    (other / "test" / "red").rename(other / "test" / "purple")
    data = {"folder": other / "test", "csv": tmp_path / "a.csv", "idx": tmp_path / "mnist"}[fmt]
    (tmp_path / "a.csv").write_text("path,label\nimg/test/purple/red_0.png,purple\n")
    make_idx_dir(tmp_path / "mnist")
    before = snapshot(run[0])
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run[0] / "best.pt", "--data", data, "--device", "cpu")
    _assert_user_error(code, out, err, "'blue', 'green', 'red'", "'0', '1'" if fmt == "idx" else "'purple'")
    assert snapshot(run[0]) == before


def test_disk_cache_without_room_is_refused_before_it_is_written(tmp_path, capsys, monkeypatch):
    import shutil

    from freezetune.cache import disk

    data = make_image_folder(tmp_path / "img", train=4, val=2, test=0)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda _: usage._replace(free=2**20))
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, *train_argv(data, run_dir, "--epochs", "1", "--cache", "disk",
                                                 "--freeze", "backbone"))  # fmt: skip
    _assert_user_error(code, out, err, "not enough disk space for the feature cache", "1.0 MiB free",
                       str(run_dir / "cache" / "train"), "--cache off")  # fmt: skip
    assert not list(run_dir.rglob("feature_cache.bin"))  # refused before the sparse file existed
    monkeypatch.undo()  # room again: the same command runs in the same run dir, no --overwrite needed
    code, out, err = run_cli(capsys, *train_argv(data, run_dir, "--epochs", "1", "--cache", "disk",
                                                 "--freeze", "backbone"))  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize("memory", ["device", "ram"])
@pytest.mark.parametrize("where", ["training", "caching"])
def test_device_out_of_memory_names_the_batch_size_to_try_and_keeps_the_run(tmp_path, capsys, monkeypatch, where,
                                                                           memory):  # fmt: skip
    # the machine's RAM running out (CPU training, the cache build at the training batch size) was a traceback
    from freezetune.cache import store
    from freezetune.training.step import Step

    data = make_image_folder(tmp_path / "img", train=4, val=2, test=0)
    argv = train_argv(data, tmp_path / "run", "--freeze", "backbone", "--cache", "memory", "--scheduler", "none")
    assert run_cli(capsys, *argv, "--epochs", "1")[0] == 0
    before = snapshot(tmp_path / "run")

    def out_of_memory(*_args, **_kwargs):
        if memory == "ram":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 3623878656 bytes. Error code 12")  # fmt: skip
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(*((Step, "_optimize") if where == "training" else (store, "prefix_features")), out_of_memory)
    code, out, err = run_cli(capsys, *argv, "--epochs", "2", "--resume")
    said = {"ram": "the machine ran out of memory (RAM) at batch size 8", "device": "ran out of memory at batch size 8"}
    _assert_user_error(code, out, err, said[memory], "try --batch-size 4")
    after = snapshot(tmp_path / "run")
    for name in ("best.pt", "last.pt", "metrics.csv"):
        assert after[name] == before[name]


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_eval_and_predict_out_of_memory_name_the_batch_size_to_try(data, run, capsys, monkeypatch, command):
    from freezetune.inference import evaluation as inference
    from freezetune.inference import predict

    def out_of_memory(*_args, **_kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    if command == "eval":
        monkeypatch.setattr(inference, "evaluate", out_of_memory)
    else:
        monkeypatch.setattr(predict, "predict_probs", out_of_memory)
    where = ["--data", str(data / "test")] if command == "eval" else [str(data / "test")]
    before = snapshot(run[0])
    code, out, err = run_cli(capsys, command, "--checkpoint", run[0] / "best.pt", *where, "--batch-size", "16")
    _assert_user_error(code, out, err, "ran out of memory at batch size 16", "try --batch-size 8")
    assert "--amp" not in err and snapshot(run[0]) == before


def test_batch_size_auto_on_cpu_keeps_the_default_and_config_yaml_keeps_the_number(tmp_path, capsys):
    data = make_image_folder(tmp_path / "img", train=4, val=2, test=0)
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--epochs", "1", "--batch-size", "auto"))
    assert code == 0, err
    assert "--batch-size auto -> 12: the default 32 (no CUDA device to measure on cpu), capped at 12 training" in out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["batch_size"] == 12  # a run from this config.yaml trains with the same batches
    code, out, _ = run_cli(capsys, "train", "--config", tmp_path / "run" / "config.yaml", "--print-config")
    assert code == 0 and yaml.safe_load(out)["batch_size"] == 12
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run2", "--batch-size", "big"))
    _assert_user_error(code, out, err, "batch_size must be an integer, got 'big' (or 'auto')")


def test_what_fails_after_a_stop_signal_is_reported_as_the_stop_once(capsys, monkeypatch):
    # under torchrun the same SIGTERM kills the loader workers, whose death the DataLoader reports over the stop
    import signal

    from freezetune.cli import main as cli
    from freezetune.run import interrupt

    def killed_workers(args):
        interrupt._raised = interrupt.RunInterrupted.by(signal.SIGTERM, "under torchrun, at once")
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

    monkeypatch.setattr(interrupt, "_raised", None)
    monkeypatch.setattr(cli, "_cmd_train", killed_workers)
    code, _, err = run_cli(capsys, "train", "--data", "x")
    assert code == 143 and err == "freezetune: stopped by SIGTERM under torchrun, at once\n"
    monkeypatch.setenv("RANK", "1")  # the other ranks got the same signal: one line for the job
    code, _, err = run_cli(capsys, "train", "--data", "x")
    assert code == 143 and err == ""

    def a_bug(args):  # a later command in the same process (a notebook's): its failure is its own, not the stop
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_cmd_train", a_bug)
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(capsys, "train", "--data", "x")


def test_an_output_file_that_is_a_folder_is_named_before_the_evaluation_not_a_temporary_file(run, data, capsys,
                                                                                              tmp_path):  # fmt: skip
    # the write failed after the whole evaluation, with "Is a directory" and the name of its temporary file (then the
    # folder itself, without the flag)
    (tmp_path / "plot.png").mkdir()  # a directory where the plot should go
    for flag in ("--plot", "--metrics"):
        code, out, err = run_cli(capsys, "eval", "--checkpoint", run[0] / "best.pt", "--data", data, flag,
                                 tmp_path / "plot.png")  # fmt: skip
        _assert_user_error(code, out, err, f"{flag} '{tmp_path / 'plot.png'}': ", "is a directory: name a file in it")
        assert ".tmp" not in err and "scored" not in out, err


def test_eval_never_writes_over_its_checkpoint_and_replaces_another_file_only_with_force(run, data, capsys, tmp_path):
    # --metrics best.pt replaced the trained model with JSON; --plot report.png, a config, anything, silently
    import shutil

    ckpt = shutil.copy(run[0] / "best.pt", tmp_path / "best.pt")
    before = Path(ckpt).read_bytes()
    for force in ([], ["--force"]):
        code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", data, "--metrics", ckpt, *force)
        _assert_user_error(code, out, err, f"'{ckpt}': ", "the metrics are written as JSON; give a .json")
    json_ckpt = shutil.copy(ckpt, tmp_path / "model.json")  # a checkpoint of any name is not replaced
    code, out, err = run_cli(capsys, "eval", "--checkpoint", json_ckpt, "--data", data, "--metrics", json_ckpt,
                             "--force")  # fmt: skip
    _assert_user_error(code, out, err, f"--metrics '{json_ckpt}': ", "is the checkpoint being evaluated")
    (tmp_path / "config.json").write_text('{"mine": 1}\n')
    (tmp_path / "report.png").write_bytes(b"a run's chart")
    (tmp_path / "metrics.csv").write_text("epoch\n1\n")  # beside it: a run's files
    for flag, path in (("--metrics", tmp_path / "config.json"), ("--plot", tmp_path / "report.png")):
        code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", data, flag, path)
        _assert_user_error(code, out, err, flag, "exists: give --force to replace it")
    # --metrics m.csv got JSON in it
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", data, "--metrics", tmp_path / "m.csv")
    _assert_user_error(code, out, err, "--metrics", "the metrics are written as JSON; give a .json file")
    assert not (tmp_path / "m.csv").exists()
    assert Path(ckpt).read_bytes() == before and (tmp_path / "config.json").read_text() == '{"mine": 1}\n'
    assert (tmp_path / "report.png").read_bytes() == b"a run's chart"
    (tmp_path / "m.json").write_text("{}")
    code, _, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", data, "--metrics", tmp_path / "m.json",
                           "--force")  # fmt: skip
    assert code == 0 and json.loads((tmp_path / "m.json").read_text())["n"] > 0, err
    # a batch job run again replaces what eval wrote before, without --force: its metrics and its plot
    for _ in range(2):
        code, _, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", data, "--metrics",
                               tmp_path / "m.json", "--plot", tmp_path / "cm.png")  # fmt: skip
        assert code == 0, err
    # the run's own final test (its test_metrics.json looks like an evaluation's) is not eval's to replace
    (tmp_path / "test_metrics.json").write_text(json.dumps({"n": 10000, "confusion": [[1]], "epoch": 3}))
    (tmp_path / "confusion.png").write_bytes(b"the run's test")
    for flag, path in (("--metrics", tmp_path / "test_metrics.json"), ("--plot", tmp_path / "confusion.png")):
        code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", data, flag, path)
        _assert_user_error(code, out, err, flag, "exists: give --force to replace it")
    assert json.loads((tmp_path / "test_metrics.json").read_text())["n"] == 10000
    assert (tmp_path / "confusion.png").read_bytes() == b"the run's test"


def test_validation_the_final_test_and_eval_show_progress_bars_when_the_run_does(data, tmp_path, monkeypatch):
    # after the epoch's bar nothing was drawn while 10 000 test images were scored (41 s of silence), nor by eval
    for progress in ("--progress", "--no-progress"):
        terminal = Terminal()
        with monkeypatch.context() as patch:
            patch.setattr(sys, "stderr", terminal)
            argv = train_argv(data, tmp_path / progress.lstrip("-"), "--epochs", "1", "--freeze", "-3", progress)
            assert main(argv) == 0
        drawn = terminal.getvalue()
        for label in ("epoch 1/1", "validation", "test (best.pt)"):
            assert (label in drawn) == (progress == "--progress"), (label, drawn)
    terminal = Terminal()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stderr", terminal)
        assert main(["eval", "--checkpoint", str(tmp_path / "progress" / "best.pt"), "--data", str(data)]) == 0
    assert "scoring" in terminal.getvalue() and "batch" in terminal.getvalue()
    # predict too: 10 000 images printed nothing for 19 s, then every line at once
    terminal = Terminal()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stderr", terminal)
        assert main(["predict", "--checkpoint", str(tmp_path / "progress" / "best.pt"), str(data / "test")]) == 0
    assert "predicting" in terminal.getvalue() and "/12 " in terminal.getvalue(), terminal.getvalue()


def test_eval_skip_bad_reproduces_the_test_score_of_a_run_that_skipped_an_unreadable_test_image(tmp_path, capsys):
    # the run left the file out (--skip-bad) and scored its test split; eval refused the data and had no --skip-bad
    data = make_image_folder(tmp_path / "images")
    (data / "test" / sorted(CLASSES)[0] / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n not a whole png")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_argv(data, out, "--epochs", "1", "--freeze", "backbone", "--skip-bad"))
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "eval", "--checkpoint", out / "best.pt", "--data", data)
    _assert_user_error(code, stdout, err, "cut.png", "fix or remove them, or give --skip-bad")
    code, stdout, err = run_cli(capsys, "eval", "--checkpoint", out / "best.pt", "--data", data, "--skip-bad",
                                "--metrics", tmp_path / "m.json")  # fmt: skip
    assert code == 0, err
    assert "(1 unreadable image file(s) left out: --skip-bad)" in stdout.splitlines()[0]
    written, again = json.loads((out / "test_metrics.json").read_text()), json.loads((tmp_path / "m.json").read_text())
    assert {k: again[k] for k in ("n", "acc", "loss", "confusion")} == {
        k: written[k] for k in ("n", "acc", "loss", "confusion")
    }


def test_eval_replaces_a_plot_it_drew_but_not_a_users_image_at_the_plot_path(run, data, capsys, tmp_path):
    # any existing image counted as an earlier evaluation's plot: --plot thesis.pdf replaced the user's PDF in silence
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), "red").save(photo)
    (tmp_path / "thesis.pdf").write_bytes(b"%PDF-1.4\n% my thesis draft\n")
    for path in (photo, tmp_path / "thesis.pdf"):
        before = path.read_bytes()
        code, out, err = run_cli(capsys, "eval", "--checkpoint", run[0] / "best.pt", "--data", data, "--plot", path)
        _assert_user_error(code, out, err, f"--plot '{path}': ", "exists: give --force to replace it")
        assert path.read_bytes() == before
    for name in ("cm.png", "cm.pdf", "cm.svg", "cm.jpg"):  # what eval drew, it replaces when run again
        for _ in range(2):
            code, _, err = run_cli(capsys, "eval", "--checkpoint", run[0] / "best.pt", "--data", data, "--plot",
                                   tmp_path / name)  # fmt: skip
            assert code == 0, err


def test_eval_refuses_one_file_for_both_its_metrics_and_its_plot(run, data, capsys, tmp_path):
    # the plot, drawn second, replaced the JSON asked for, and the line said both were written
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run[0] / "best.pt", "--data", data, "--metrics",
                             tmp_path / "out.png", "--plot", tmp_path / "out.png")  # fmt: skip
    _assert_user_error(code, out, err, "--metrics (metrics=...) and --plot (plot=...) both name", "its own file")
    assert not (tmp_path / "out.png").exists()


def test_eval_refuses_to_write_its_files_into_the_image_folder_it_reads_classes_from(run, data, capsys, tmp_path):
    # the plot drawn into test/<class>/ was scored as a test image of that class by the next eval
    copy = shutil.copytree(data, tmp_path / "data")
    cls = next(d for d in sorted((copy / "test").iterdir()) if d.is_dir())
    before = snapshot(copy)
    for flag, path in (("--plot", cls / "cm.png"), ("--metrics", copy / "test" / "m.json")):
        code, out, err = run_cli(capsys, "eval", "--checkpoint", run[0] / "best.pt", "--data", copy, flag, path)
        _assert_user_error(code, out, err, f"{flag} ", "lies inside the data folder", f"give {flag} outside it")
    shutil.copy(run[0] / "best.pt", cls / "best.pt")  # the default plot goes beside the checkpoint
    code, out, err = run_cli(capsys, "eval", "--checkpoint", cls / "best.pt", "--data", copy)
    _assert_user_error(code, out, err, "the confusion plot's default place", "give --plot outside it")
    (cls / "best.pt").unlink()
    assert snapshot(copy) == before


def test_eval_draws_a_plot_per_dataset_even_for_two_of_one_name(run, data, capsys, tmp_path):
    # named after the data's last component alone, a second folder's test set replaced the first one's plot
    import shutil

    ckpt = shutil.copy(run[0] / "best.pt", tmp_path / "best.pt")
    for where in ("a", "b"):
        shutil.copytree(data, tmp_path / where / "images")
        code, _, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", tmp_path / where / "images")
        assert code == 0, err
    plots = sorted(p.name for p in tmp_path.glob("eval_images-*_confusion.png"))
    assert len(plots) == 2, plots
    code, _, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", tmp_path / "a" / "images")
    assert code == 0 and sorted(p.name for p in tmp_path.glob("eval_*_confusion.png")) == plots, err  # its own again


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_ctrl_c_outside_training_says_no_word_of_last_pt(run, data, capsys, monkeypatch, command):
    from freezetune.inference import evaluation as inference
    from freezetune.inference import predict

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    if command == "eval":
        monkeypatch.setattr(inference, "evaluate_checkpoint", interrupted)
    else:
        monkeypatch.setattr(predict, "predict_files", interrupted)
    argv = ["--data", data] if command == "eval" else [str(data)]
    code, _, err = run_cli(capsys, command, "--checkpoint", run[0] / "best.pt", *argv)
    assert code == 130 and err == "freezetune: interrupted\n", err


def test_eval_writes_its_metrics_for_batch_jobs_and_a_plot_per_dataset(run, data, capsys, tmp_path):
    run_dir = run[0]
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run_dir / "best.pt", "--data", data, "--metrics",
                             tmp_path / "m.json")  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert f"top-1 {100 * metrics['acc']:5.1f}%" in out and metrics["n"] > 0
    assert list(run_dir.glob(f"eval_{Path(data).name}-*_confusion.png"))  # not one eval_confusion.png for all data
    stale = tmp_path / ".cm.jpg.999999999.0123abcd.tmp"  # an eval killed while it wrote the plot left it, and it stayed
    stale.write_bytes(b"half")
    code, _, err = run_cli(capsys, "eval", "--checkpoint", run_dir / "best.pt", "--data", data, "--plot",
                           tmp_path / "cm.jpg")  # fmt: skip
    assert code == 0 and (tmp_path / "cm.jpg").read_bytes()[:2] == b"\xff\xd8", err  # JPEG data, not PNG
    assert not stale.exists()
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run_dir / "best.pt", "--data", data, "--plot",
                             tmp_path / "cm.gif")  # fmt: skip
    assert code == 2 and ".gif is none of them" in err and not out, err  # refused before the evaluation


def test_a_run_whose_output_goes_to_a_file_writes_each_line_as_it_comes(tmp_path):
    # `nohup freezetune train ... > log`: block-buffered, the log stayed empty until the process ended (tail -f
    # showed nothing for the whole run, and a killed run lost its last lines)
    import os
    import time

    from freezetune.run.interrupt import PAUSE_ENV, PAUSE_MARKER_ENV

    data, marker, log = make_image_folder(tmp_path / "data"), tmp_path / "paused", tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update({PAUSE_ENV: "step#2", PAUSE_MARKER_ENV: str(marker), "OMP_NUM_THREADS": "1"})
    argv = [sys.executable, "-m", "freezetune", *train_argv(data, tmp_path / "run", "--freeze", "-2", "--epochs", "2")]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), log.read_text()
        held = log.read_text()  # the process holds in epoch 1: what it printed so far is in the file
        assert "validation:" in held and "trainable" in held, held
    finally:
        marker.unlink(missing_ok=True)
        proc.wait(timeout=120)
    assert proc.returncode == 0 and "epoch 2/2" in log.read_text()


def test_a_disk_that_fills_under_a_checkpoint_is_one_line_naming_the_file_and_exit_2(tmp_path):
    # torch's zip writer turned the failed write into a RuntimeError: a 40-line traceback and exit code 1
    import resource

    data, out = make_image_folder(tmp_path / "imgs", train=6, val=2, test=2), tmp_path / "run"

    def small_disk():  # every file this process writes stops at 64 KiB; a checkpoint of the tiny model is larger
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    # nothing frozen: random weights frozen would add their note to stderr, the one line checked here
    argv = [sys.executable, "-m", "freezetune", *train_argv(data, out, "--epochs", "1", "--freeze", "none")]
    done = subprocess.run(argv, capture_output=True, text=True, preexec_fn=small_disk)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("freezetune: error: File too large (") and len(done.stderr.splitlines()) == 1
    assert f"({out}{'/'}" in done.stderr and ".tmp" not in done.stderr
    assert not list(out.rglob("*.tmp"))


def test_eval_of_last_pt_draws_its_own_plot_beside_best_pts(run, data, capsys, tmp_path):
    # both were eval_<data>-<digest>_confusion.png: the eval of last.pt replaced best.pt's plot
    import shutil

    for name in ("best.pt", "last.pt"):
        ckpt = shutil.copy(run[0] / name, tmp_path / name)
        code, _, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", data)
        assert code == 0, err
    plots = sorted(p.name for p in tmp_path.glob("eval_*_confusion.png"))
    assert len(plots) == 2 and plots[1].endswith("_last_confusion.png"), plots


def test_options_that_change_nothing_beside_others_are_noted(data, tmp_path, capsys):
    # --scheduler none --warmup-epochs 1: a constant LR, unsaid; --aug none --cache-views 2: "1 view(s)" beside a
    # config.yaml of 2, unsaid
    argv = train_argv(data, tmp_path / "run", "--epochs", "2", "--freeze", "backbone", "--scheduler", "none",
                      "--warmup-epochs", "1", "--aug", "none", "--cache", "auto", "--cache-views", "2")  # fmt: skip
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "note: --warmup-epochs 1 has no effect with --scheduler none (a constant LR)" in out, out
    assert "note: --cache-views 2 has no effect with --aug none" in out, out


def test_an_image_that_fails_to_decode_mid_epoch_ends_the_run_in_one_line(tmp_path):
    # with loader workers, the failed run's frames held the workers to the exit: multiprocessing killed them first,
    # and torch's SIGCHLD handler printed "Exception ignored in atexit callback" and a traceback after the one line
    data = make_image_folder(tmp_path / "data", train=6, val=2, test=2)
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(data / "train" / "green" / "rot.jpg", quality=90)
    broken = bytearray((data / "train" / "green" / "rot.jpg").read_bytes())
    for i in range(len(broken) // 2, len(broken) - 10, 7):  # its header reads (the pre-scan passes it), its data not
        broken[i] = 0xFF if broken[i] != 0xFF else 0x00
    (data / "train" / "green" / "rot.jpg").write_bytes(bytes(broken))
    argv = [sys.executable, "-m", "freezetune", "train", "--data", str(data), "--model", "timm:test_efficientnet",
            "--weights", "none", "--img-size", "32", "--epochs", "1", "--batch-size", "4", "--no-progress",
            "--workers", "2", "--cache", "off", "--recipe", "full", "--out"]  # fmt: skip
    for run in ("a", "b"):  # the teardown's race lost about 2 runs in 3
        done = subprocess.run([*argv, str(tmp_path / run)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert done.returncode == 2 and "cannot read image" in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
