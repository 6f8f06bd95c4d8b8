"""``build_datasets`` on the layouts users bring: which splits are read, and what is said of the validation set."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from freezetune.data import build_datasets
from freezetune.errors import DataError
from freezetune.model.preprocess import Preprocess

PRE = Preprocess(input_size=16)


def _images(folder: Path, n: int = 3, colour=(200, 30, 30)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8 + i, 8), (colour[0], colour[1] + 10 * i, colour[2])).save(folder / f"{i}.png")
    return folder


def _layout(root: Path, splits=("train", "val", "test"), classes=("bag", "coat", "sneaker")) -> Path:
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            _images(root / split / name, colour=(40 * c + 10 * s, 30, 30))
    return root


def test_an_unlabelled_test_folder_names_the_way_out_and_a_run_that_scores_no_test_reads_none(tmp_path):
    # Kaggle's layout: test/ holds the images to predict, without labels. The run was refused, even with
    # --no-final-test, by a split it never scores
    root = _layout(tmp_path / "d", splits=("train",))
    _images(tmp_path / "d" / "test")
    with pytest.raises(DataError, match="no class folders.*--no-final-test"):
        build_datasets(str(root), preprocess=PRE)
    bundle = build_datasets(str(root), preprocess=PRE, final_test=False)
    assert bundle.test is None and "the test split is not used" in bundle.val_source


def test_a_broken_test_file_does_not_stop_a_run_that_scores_no_test(tmp_path):
    root = _layout(tmp_path / "d")
    (root / "test" / "bag" / "zero.png").write_bytes(b"")
    with pytest.raises(DataError, match="zero.png"):
        build_datasets(str(root), preprocess=PRE)
    assert build_datasets(str(root), preprocess=PRE, final_test=False).test is None


def test_a_flat_layout_with_a_class_called_train_is_told_why_it_was_read_as_the_split(tmp_path):
    root = tmp_path / "d"
    for c, name in enumerate(("bus", "car", "train")):
        _images(root / name, colour=(60 * c, 30, 30))
    with pytest.raises(DataError, match="read as the training split.*rename"):
        build_datasets(str(root), preprocess=PRE)


def test_validation_without_a_training_class_is_warned_of_by_name(tmp_path, caplog):
    root = _layout(tmp_path / "d", splits=("train", "test"))
    for c, name in enumerate(("bag", "coat")):  # val/ has no sneaker
        _images(root / "val" / name, colour=(40 * c + 5, 30, 30))
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        build_datasets(str(root), preprocess=PRE)
    assert "no images of 1 of the 3 classes" in caplog.text and "'sneaker'" in caplog.text
    # the automatic hold-out: a class of one image gives none, and that is said too
    caplog.clear()
    flat = tmp_path / "flat"
    _images(flat / "bag", n=10)
    _images(flat / "coat", n=10, colour=(90, 30, 30))
    _images(flat / "sneaker", n=1, colour=(150, 30, 30))
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        bundle = build_datasets(str(flat), preprocess=PRE)
    assert len(bundle.val) == 2 and "'sneaker'" in caplog.text and "a class of one training image" in caplog.text


def test_a_second_validation_folder_is_named_as_not_read(tmp_path, caplog):
    root = _layout(tmp_path / "d", splits=("train", "val", "valid"))
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        bundle = build_datasets(str(root), preprocess=PRE)
    assert bundle.val_source == "the validation folder"
    assert "val/ and valid/: val/ is read, valid/ not" in caplog.text


def test_a_folder_of_images_beside_the_split_folders_is_named_as_left_out(tmp_path, caplog):
    # a class folder put one level too high (d/horse/ beside d/train/): the run trained on the other classes in silence
    root = _layout(tmp_path / "d", splits=("Train", "Validation", "Test"))  # split names in any of their spellings
    _images(root / "horse")
    _images(root / "more" / "zebra", n=2)
    _images(root / "runs" / "r1", n=1).joinpath("train.log").write_text("")  # a run's report.png: no data
    _images(root / ".git" / "objects", n=1)
    (root / "features").mkdir()
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        assert build_datasets(str(root), preprocess=PRE).classes == ["bag", "coat", "sneaker"]
    (line,) = [r.getMessage() for r in caplog.records if "beside the split folders" in r.getMessage()]
    assert line == (f"'{root}': folder(s) 'horse/' (3), 'more/' (2) beside the split folders hold 5 image file(s), "
                    f"which are left out: a class folder belongs in {root / 'Train'}/ (and in the validation and test "
                    "folders)")  # fmt: skip


def test_val_data_replaces_the_layouts_validation_folder_unread(tmp_path):
    # an unlabelled val/ was refused although --val-data said where validation comes from
    root = _layout(tmp_path / "d", splits=("train", "test"))
    _images(root / "val")  # images, no class folders
    other = _layout(tmp_path / "other", splits=("v",))
    bundle = build_datasets(str(root), val_data=str(other / "v"), preprocess=PRE)
    assert len(bundle.val) == 9 and bundle.val_source.startswith("val_data")


def test_an_unlabelled_test_folder_stops_the_auto_recipe_before_its_trials(tmp_path, capsys):
    # the trials do not score the test split, so they did not read it: the refusal came after all of them
    from _engine_fixtures import make_image_folder, run_cli, train_argv

    root = make_image_folder(tmp_path / "d", test=0)
    _images(root / "test")
    code, out, err = run_cli(capsys, *train_argv(root, tmp_path / "run", "--epochs", "1"))
    assert code == 2 and "--no-final-test" in err and "auto: last" not in out
    assert not (tmp_path / "run").exists()
    # a test image cut in half stopped the run only after the trials too (their feature cache, minutes at scale)
    good = make_image_folder(tmp_path / "cut", test=2)
    broken = next((good / "test").rglob("*.png"))
    broken.write_bytes(broken.read_bytes()[:40])
    code, out, err = run_cli(capsys, *train_argv(good, tmp_path / "cut-run", "--epochs", "1"))
    assert code == 2 and "1 of 6 test image file(s) cannot be read" in err and "auto: last" not in out
    code, out, err = run_cli(capsys, *train_argv(good, tmp_path / "cut-run", "--epochs", "1", "--skip-bad"))
    assert code == 0 and "auto: chose" in out, err  # --skip-bad: the run leaves it out


def test_unreadable_files_of_every_split_are_named_in_one_error(tmp_path, capsys):
    # one split at a time: bad files in test/, train/ and val/ took three failed runs to find
    from _engine_fixtures import make_image_folder, run_cli, train_argv

    root = make_image_folder(tmp_path / "d", test=2)
    cut = {split: next((root / split).rglob("*.png")) for split in ("train", "val", "test")}
    for path in cut.values():
        path.write_bytes(path.read_bytes()[:40])
    named = {"train": "training", "val": "validation", "test": "test"}
    for extra in ((), ("--freeze", "-2")):
        # the auto recipe checks test/ before its trials (with train/ and val/: it named val/'s only on the next
        # attempt); a plain run reads the three at once
        code, out, err = run_cli(capsys, *train_argv(root, tmp_path / "run", "--epochs", "1", *extra))
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--skip-bad" in err, err
        for split in ("train", "val", "test"):
            assert f"1 of {len(list((root / split).rglob('*.png')))} {named[split]} image file(s) cannot be read: " \
                   f"'{cut[split]}'" in err, (split, err)  # fmt: skip


def test_a_foreign_class_says_the_way_out_and_val_data_at_a_datasets_root_names_its_split(tmp_path):
    root = _layout(tmp_path / "d")
    _images(root / "test" / "scarf")  # a class the training folder lacks
    with pytest.raises(DataError, match=r"'scarf'.*not training classes.*\(rename them to a training class, or move"):
        build_datasets(str(root), preprocess=PRE)
    other = _layout(tmp_path / "other")  # --val-data at a dataset's root read train/ and val/ as two unknown classes
    with pytest.raises(DataError, match=r"holds split folders \(train/, val/, test/\), not class folders: give its "
                                        r"validation folder: --val-data .*other/val$"):  # fmt: skip
        build_datasets(str(root), val_data=str(other), preprocess=PRE, final_test=False)
    no_val = _layout(tmp_path / "no-val", splits=("train", "test"))  # never its test split: it must not pick a model
    with pytest.raises(DataError, match=r"\(train/, test/\), not class folders: give a folder of class folders$"):
        build_datasets(str(root), val_data=str(no_val), preprocess=PRE, final_test=False)


def test_a_folder_of_image_csvs_one_a_split_names_the_csvs_to_give(tmp_path):
    # train.csv, val.csv, test.csv beside imgs/ (Kaggle's layout) trained 'imgs' as the only class, said as "a
    # classifier needs at least two", and eval called 'imgs' a class the model lacks: the CSVs were never named
    from freezetune.data.datasets import build_eval_dataset

    (tmp_path / "imgs").mkdir()
    rows = ["path,label"]
    for i, (name, colour) in enumerate((("cat", "red"), ("dog", "blue")) * 2):
        Image.new("RGB", (8, 8), colour).save(tmp_path / "imgs" / f"{i}.png")
        rows.append(f"imgs/{i}.png,{name}")
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(
        DataError,
        match=r"split files .*no train/ folder: an image model reads one 'path,label' "
        r"CSV a --data.*give --data \S+train\.csv --val-data \S+val\.csv .*eval --data \S+test\.csv",
    ):
        build_datasets(str(tmp_path), preprocess=PRE)
    with pytest.raises(DataError, match=r"give --data \S+test\.csv$"):
        build_eval_dataset(str(tmp_path), preprocess=PRE, classes=["cat", "dog"])
    assert len(build_datasets(str(tmp_path / "train.csv"), preprocess=PRE, final_test=False).train) == 4


def test_data_that_is_neither_a_file_nor_a_folder_is_named_as_such(tmp_path):
    # /dev/null, /dev/stdin or a FIFO as --data: "Not a directory (/dev/null); files written before are intact"
    import os

    fifo = tmp_path / "rows.csv"
    os.mkfifo(fifo)
    for given in ("/dev/null", str(fifo)):
        with pytest.raises(DataError, match=rf"data path '{given}' is neither a file nor a folder .*save it to a file"):
            build_datasets(given, preprocess=PRE)


def test_validation_data_that_is_the_test_split_is_refused_before_anything_is_built(tmp_path, capsys):
    # the auto recipe made its choice on the test images before their files were refused; with --no-final-test, or
    # in a sweep (which scores no test split), they picked best.pt and the winner without a word
    from _engine_fixtures import TINY, make_idx_dir, make_image_folder, run_cli

    root = make_image_folder(tmp_path / "images", train=4, val=1, test=2)
    runs = tmp_path / "runs"
    for argv in (
        ["train", "--data", root, "--val-data", root / "test", "--out", runs / "auto", *TINY],
        ["train", "--data", root, "--val-data", f"{root}/test/", "--recipe", "linear-probe", "--no-final-test",
         "--out", runs / "probe", *TINY],
        ["sweep", "--data", root, "--val-data", root / "test", "--recipes", "linear-probe", "--out", runs / "s", *TINY],
    ):  # fmt: skip
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "is the test split of" in err and "Traceback" not in err, err
    assert not runs.exists()  # nothing was built or written
    # a text model's split files beside the folders (train.csv, test.csv): test/ is still the image model's test
    for split in ("train", "test"):
        (root / f"{split}.csv").write_text("text,label\na,red\n")
    code, _, err = run_cli(capsys, "train", "--data", root, "--val-data", root / "test", "--out", runs / "csv", *TINY)
    assert code == 2 and "is the test split of" in err, err
    for split in ("train", "test"):
        (root / f"{split}.csv").unlink()
    assert not runs.exists()
    idx = make_idx_dir(tmp_path / "idx")  # an IDX directory given as validation data reads its t10k files
    code, _, err = run_cli(capsys, "train", "--data", idx, "--val-data", idx, "--out", runs / "idx", *TINY)
    assert code == 2 and "reads the test split (t10k files) of" in err, err
    assert not runs.exists()
    assert run_cli(capsys, "train", "--data", root, "--val-data", root / "val", "--out", runs / "ok", "--epochs", "1",
                   *TINY)[0] == 0  # fmt: skip
