"""Predicting with a trained model: the top classes of image files, folders and globs, and the lines printed for them
(text models: test_text.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _engine_fixtures import CLASSES, confident_checkpoint, cut_exif_jpeg, make_image_folder
from freezetune.errors import ConfigError, DataError
from freezetune.inference.evaluation import load_model
from freezetune.inference.predict import format_predictions, predict_files

pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), train=1, val=0, test=4)


@pytest.fixture(scope="module")
def best_pt(tmp_path_factory):
    return confident_checkpoint(tmp_path_factory.mktemp("run"))


def test_predict_files_ranks_every_image_in_path_order(best_pt, data):
    files = sorted(str(p) for p in (data / "test" / "red").glob("*.png"))
    loaded = load_model(best_pt, device="cpu")
    records = predict_files(loaded, files, topk=9, batch_size=3)
    assert [r["path"] for r in records] == files
    for r in records:
        probs = [p["prob"] for p in r["top"]]
        assert {p["class"] for p in r["top"]} == set(CLASSES)  # topk beyond the classes: all of them
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)
    one_by_one = predict_files(best_pt, files, topk=9, batch_size=1, device="cpu")  # batching changes nothing
    assert [[p["class"] for p in r["top"]] for r in one_by_one] == [[p["class"] for p in r["top"]] for r in records]
    probs = [p["prob"] for r in one_by_one for p in r["top"]]
    assert probs == pytest.approx([p["prob"] for r in records for p in r["top"]], abs=1e-5)
    assert json.loads(json.dumps(records)) == records
    folder = str(data / "test" / "red")  # one path as a string: the folder, not its characters
    assert [r["path"] for r in predict_files(loaded, folder, topk=1)] == files
    assert [r["path"] for r in predict_files(loaded, data / "test" / "red", topk=1)] == files
    # a glob no shell expanded (quoted, a script's, a Windows prompt's): "does not exist"
    assert [r["path"] for r in predict_files(loaded, [str(data / "test" / "red" / "*.png")], topk=1)] == files
    # a file named outright keeps its spelling ("./a.png", "a//b.png"), so each record joins back to its input
    typed = [files[0].replace("/red/", "/red//"), files[1].replace("/test/", "/test/./")]
    assert [r["path"] for r in predict_files(loaded, typed, topk=1)] == typed


def test_predict_reads_a_photo_as_evaluation_does_its_jpeg_reduced_by_the_models_decode_side(best_pt, data, tmp_path):
    import numpy as np
    from PIL import Image

    from freezetune.data import build_eval_dataset
    from freezetune.training.eval_loop import predict_probs

    photo = tmp_path / "photos" / "red" / "big.jpg"
    photo.parent.mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 256, (900, 1200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(photo, quality=90)
    loaded = load_model(best_pt, device="cpu")
    dataset = build_eval_dataset(str(tmp_path / "photos"), preprocess=loaded.preprocess, classes=loaded.classes)
    assert dataset.min_side == loaded.preprocess.decode_side
    expected = predict_probs(loaded.model, dataset[0][0][None], loaded.precision)[0]
    (record,) = predict_files(loaded, [photo], topk=3)
    got = {p["class"]: p["prob"] for p in record["top"]}
    assert [got[c] for c in loaded.classes] == pytest.approx(expected.tolist(), abs=1e-6)


def test_a_dash_reads_image_paths_from_standard_input(best_pt, data, monkeypatch):
    # `ls *.png | freezetune predict --checkpoint best.pt -` said "'-' does not exist"
    import io

    files = sorted(str(p) for p in (data / "test" / "red").glob("*.png"))
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(files[1:]) + "\n\n"))
    records = predict_files(best_pt, [files[0], "-"], topk=1, device="cpu")
    assert [r["path"] for r in records] == files
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(DataError, match="'-' reads image paths from standard input, one a line, and it gave none"):
        predict_files(best_pt, ["-"], topk=1, device="cpu")


def test_standard_input_not_in_utf8_is_named_by_its_byte_and_line_as_a_file_is(best_pt, data, monkeypatch, capsys):
    # `printf 'caf\xe9' | freezetune predict ... -` ended in a UnicodeDecodeError traceback and exit 1
    import io

    from _engine_fixtures import run_cli

    files = sorted(str(p) for p in (data / "test" / "red").glob("*.png"))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(("\ufeff" + "\n".join(files)).encode()), "utf-8"))
    assert [r["path"] for r in predict_files(best_pt, ["-"], topk=1, device="cpu")] == files  # its bytes, as UTF-8
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(files[0].encode() + b"\ncaf\xe9.png\n"), "utf-8"))
    code, _, err = run_cli(capsys, "predict", "--checkpoint", best_pt, "-", "--device", "cpu")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "standard input: byte 0xe9 on line 2 is not UTF-8 text" in err


def test_predict_files_user_errors(best_pt, data):
    with pytest.raises(ConfigError, match="topk must be >= 1, got 0"):
        predict_files(best_pt, [data], topk=0, device="cpu")
    with pytest.raises(DataError, match="nothere.png"):
        predict_files(best_pt, [data / "nothere.png"], device="cpu")
    with pytest.raises(DataError, match=r"image path pattern '.*\*.jpg' matches no file ending in"):
        predict_files(best_pt, [str(data / "test" / "*.jpg")], device="cpu")
    # an empty path (an unset shell variable) scored every image below the current folder
    with pytest.raises(ConfigError, match="empty path '' among the paths to predict"):
        predict_files(best_pt, [data / "test" / "red", ""], device="cpu")
    with pytest.raises(ConfigError, match="^no paths to predict: give image files or folders"):  # "no images in ;"
        predict_files(best_pt, [], device="cpu")


def test_a_recursive_glob_predicts_each_image_once_and_skips_other_files(best_pt, data, tmp_path):
    # "shots/**" matched the folders too, whose images were listed again (2 and 3 times); a .txt failed the command
    import shutil

    (tmp_path / "shots" / "sub").mkdir(parents=True)
    shutil.copy(data / "test" / "red" / "red_0.png", tmp_path / "shots" / "a.png")
    shutil.copy(data / "test" / "red" / "red_1.png", tmp_path / "shots" / "sub" / "b.png")
    (tmp_path / "shots" / "notes.txt").write_text("not an image")
    for pattern in ("**", "**/*", "*"):  # "*" matches sub/, whose images the shell's expansion predicts too
        records = predict_files(best_pt, [str(tmp_path / "shots" / pattern)], device="cpu")
        got = sorted(Path(r["path"]).name for r in records)
        assert got == ["a.png", "b.png"], (pattern, got)
        assert all("error" not in r for r in records)


def test_a_quoted_glob_of_folders_predicts_what_the_shells_expansion_does(best_pt, data):
    # 'test/*' (quoted: no shell expanded it) matched the class folders only: "matches no file ending in .jpg, ..."
    quoted = predict_files(best_pt, [str(data / "test" / "*")], device="cpu")
    expanded = predict_files(best_pt, sorted((data / "test").iterdir()), device="cpu")
    assert [r["path"] for r in quoted] == [r["path"] for r in expanded] and len(quoted) > 2


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL's own, which the command line drops (test_folder.py)
def test_a_photo_with_corrupt_exif_is_predicted_and_named_in_freezetunes_words(best_pt, tmp_path, caplog):
    # predict printed PIL's raw "UserWarning: Corrupt EXIF data" with a site-packages path, naming no file
    import logging

    photo = cut_exif_jpeg(tmp_path / "photo.jpg", orientation_first=True)
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        (record,) = predict_files(best_pt, [photo], device="cpu")
    assert "top" in record
    assert f"corrupt EXIF data (its first directory cut short); their pixels are read as usual, e.g.\n  '{photo}' " \
        "(its orientation tag, 6" in caplog.text  # fmt: skip


def test_format_predictions_one_line_per_image():
    records = [{"path": "a.png", "top": [{"class": "red", "prob": 0.75}, {"class": "blue", "prob": 0.25}]},
               {"path": "b.png", "top": [{"class": "blue", "prob": 1.0}]}]  # fmt: skip
    assert format_predictions(records) == "a.png  red 75.0%  blue 25.0%\nb.png  blue 100.0%"


def test_a_path_or_class_with_control_characters_is_one_line_of_escapes_and_json_keeps_the_names(capsys):
    # folders named '\x1b[31mRED\x1b[0m' and 'line1\nline2': the text line recoloured the terminal and broke in two
    from freezetune.inference.predict import PredictionPrinter

    red, two = "\x1b[31mRED\x1b[0m", "line1\nline2"
    record = {"path": f"d2/test/{red}/red_0.png", "top": [{"class": red, "prob": 0.824}, {"class": two, "prob": 0.118}]}
    assert format_predictions([record]) == ("d2/test/\\x1b[31mRED\\x1b[0m/red_0.png  \\x1b[31mRED\\x1b[0m 82.4%  "
                                            "line1\\nline2 11.8%")  # fmt: skip
    for how in ("json", "jsonl"):  # the real names, as before
        say = PredictionPrinter(how)
        say(record)
        say.end()
        out = capsys.readouterr().out
        assert json.loads(out) == ([record] if how == "json" else record)


def test_each_record_is_handed_on_as_soon_as_its_batch_is_scored(best_pt, data, monkeypatch, tmp_path):
    # 10 000 images printed nothing until the last was scored (and `| head` waited for all of them)
    from freezetune.inference import predict

    files = sorted(str(p) for p in (data / "test").rglob("*.png"))
    scored, seen = [], []
    real = predict._predict_batch
    monkeypatch.setattr(predict, "_predict_batch", lambda loaded, batch, *a: (scored.append(len(batch)),
                                                                                real(loaded, batch, *a)))  # fmt: skip
    (tmp_path / "bad.png").write_bytes(b"not a png")
    records = predict_files(load_model(best_pt, device="cpu"), [*files, str(tmp_path / "bad.png")], topk=1,
                            batch_size=5, on_record=lambda r: seen.append((r, len(scored))))  # fmt: skip
    assert [r for r, _ in seen] == records and "error" in records[-1] and "error" not in records[0]
    assert [n for _, n in seen] == [1 + i // 5 for i in range(len(records))]  # each batch's, before the next batch


def test_printed_records_as_one_json_list_as_json_lines_and_as_lines(best_pt, data, capsys, tmp_path):
    from freezetune.inference.predict import PredictionPrinter

    files = sorted(str(p) for p in (data / "test" / "red").glob("*.png"))[:2]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    records = predict_files(best_pt, [*files, str(tmp_path / "bad.png")], topk=2, device="cpu")
    for how in ("json", "jsonl", "text"):
        say = PredictionPrinter(how)
        for r in records:
            say(r)
        say.end()
        out, err = capsys.readouterr()
        assert err.count("freezetune: error: ") == 1 and "bad.png" in err  # said at once, on stderr
        if how == "json":  # as one json.dumps of the list wrote it before the records streamed
            assert out == json.dumps(records, indent=1) + "\n"
        elif how == "jsonl":
            assert [json.loads(line) for line in out.splitlines()] == records
        else:
            assert out == format_predictions(records) + "\n"
    empty = PredictionPrinter("json")
    empty.end()
    assert capsys.readouterr().out == "[]\n"


def test_many_images_on_a_cpu_are_predicted_by_a_folded_copy_as_by_the_model(best_pt, data, monkeypatch):
    from freezetune.device.bn_fold import folded
    from freezetune.inference import predict as predict_module

    files = sorted(str(p) for p in (data / "test").rglob("*.png"))
    loaded = load_model(best_pt, device="cpu")
    copies = []
    monkeypatch.setattr(predict_module, "folded", lambda m: copies.append(folded(m)) or copies[-1])
    monkeypatch.setattr(predict_module, "FOLD_FROM", len(files))  # as many as a folder that pays for the fold
    records = predict_files(loaded, files, topk=3)
    few = predict_files(loaded, files[:-1], topk=3)  # fewer: the model as it is
    assert len(copies) == 1 and copies[0] is not loaded.model
    monkeypatch.setattr(predict_module, "foldable", lambda m: False)
    plain = predict_files(loaded, files, topk=3)
    assert [[p["class"] for p in r["top"]] for r in records] == [[p["class"] for p in r["top"]] for r in plain]
    got, want = ([p["prob"] for r in rs for p in r["top"]] for rs in (records, plain))
    assert got == pytest.approx(want, abs=1e-5) and few == plain[:-1]
