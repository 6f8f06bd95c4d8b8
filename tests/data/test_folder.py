"""Image folders and CSV files as users have them (``freezetune.data.folder``): what is read, what is left out, and
what is said about it."""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from freezetune.data.folder import folder_classes, list_images, load_image, scan_folder
from freezetune.data.image_csv import read_csv
from freezetune.data.text import list_text_files
from freezetune.errors import DataError


def _images(folder: Path, n: int = 2, colour=(200, 30, 30)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8 + i, 8), colour).save(folder / f"{i}.png")
    return folder


def test_a_broken_symlink_where_a_class_folder_would_be_is_named_not_dropped(tmp_path):
    # a class folder linked from a share that is not mounted: the run trained on the other classes without a word
    _images(tmp_path / "bag")
    _images(tmp_path / "coat")
    (tmp_path / "sneaker").symlink_to("/mnt/not-mounted/sneaker")
    with pytest.raises(DataError, match=r"broken symbolic link.*'sneaker'.*/mnt/not-mounted/sneaker"):
        folder_classes(tmp_path)


def test_a_link_back_up_the_tree_inside_a_class_is_not_followed_and_is_named(tmp_path, caplog):
    # test/fox/up -> .. read test/cat's and test/dog's images again as fox: 30 test images of 18, scored 60 %
    root = tmp_path / "test"
    for name in ("cat", "dog", "fox"):
        _images(root / name)
    (root / "fox" / "up").symlink_to("..")
    with caplog.at_level(logging.WARNING):
        ds = scan_folder(root)
    assert sorted(ds.classes[y] for _, y in ds.samples) == ["cat", "cat", "dog", "dog", "fox", "fox"]
    assert any("fox/up' leads to" in r.getMessage() and "a folder above it" in r.getMessage() for r in caplog.records)


def test_freezetunes_run_folders_in_an_image_folder_are_no_classes_nor_images_of_one(tmp_path, caplog):
    # an old run copied into a flat layout trained as a class 'runs' (its report.png and confusion.png its images)
    for name in ("cat", "dog"):
        _images(tmp_path / name)
    for run in (tmp_path / "runs" / "old", tmp_path / "old2", tmp_path / "cat" / "sweep"):
        _images(run)  # a run's report.png, confusion.png
    (tmp_path / "runs" / "old" / ".freezetune-run").write_text("")
    (tmp_path / "old2" / ".freezetune-run").write_text("")
    (tmp_path / "cat" / "sweep" / "sweep_config.yaml").write_text("")
    (tmp_path / "dog" / "train.log").write_text("a user's own log beside images: no run")
    with caplog.at_level(logging.WARNING):
        ds = scan_folder(tmp_path)
    assert ds.classes == ["cat", "dog"] and len(ds.samples) == 4
    said = [r.getMessage() for r in caplog.records]
    assert any("'old2', 'runs' in" in m and "not read as classes" in m for m in said), said
    assert any("cat/sweep' is a freezetune run's or sweep's folder" in m for m in said), said


def test_class_folders_named_alike_in_two_unicode_forms_are_refused_and_alike_in_case_warned_of(tmp_path, caplog):
    # "café" composed (Linux) and decomposed (macOS): classes are matched in NFC, so one of them got every image and
    # the other none, a phantom class predicted by an untrained output
    composed = unicodedata.normalize("NFC", "café")
    _images(tmp_path / "a" / composed)
    _images(tmp_path / "a" / unicodedata.normalize("NFD", composed))
    _images(tmp_path / "a" / "dog")
    with pytest.raises(DataError, match="two Unicode forms"):
        scan_folder(tmp_path / "a")
    _images(tmp_path / "b" / "Cat")
    _images(tmp_path / "b" / "cat")
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        assert scan_folder(tmp_path / "b").classes == ["Cat", "cat"]
    assert "'Cat' / 'cat'" in caplog.text


def test_files_left_out_are_named_and_archives_beside_the_classes_said_but_windows_thumbnails_are_not(tmp_path,
                                                                                                      caplog):  # fmt: skip
    _images(tmp_path / "bag")
    _images(tmp_path / "coat")
    (tmp_path / "bag" / "notes.txt").write_text("x")
    (tmp_path / "bag" / "Thumbs.db").write_bytes(b"\0")
    (tmp_path / "sneaker.zip").write_bytes(b"PK")  # a class still zipped
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        ds = scan_folder(tmp_path)
    assert ds.classes == ["bag", "coat"] and len(ds) == 4
    assert "1 file(s) left out" in caplog.text and "bag/notes.txt" in caplog.text and "Thumbs" not in caplog.text
    assert "'sneaker.zip'" in caplog.text and "unpack" in caplog.text


def test_a_csvs_missing_files_are_refused_with_the_way_out_or_left_to_skip_bad(tmp_path):
    _images(tmp_path / "img", n=2)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nimg/0.png,a\nimg/1.png,b\nimg/gone.png,b\n")
    with pytest.raises(DataError, match="1 missing image file.*--skip-bad"):
        read_csv(csv)
    assert len(read_csv(csv, missing_ok=True)) == 3  # the pre-scan then leaves the missing one out, named
    csv.write_text("path,label\nimg/0.png,a\nimg/1.png,b\nimg,b\n")  # a row naming a folder: "missing" it was not
    with pytest.raises(DataError, match=r"lists 1 folder\(s\) where an image file belongs, first: '\S+img'"):
        read_csv(csv)


def test_a_bad_csv_row_is_named_by_its_line_in_the_file(tmp_path):
    _images(tmp_path / "img", n=2)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nimg/0.png,a\n\nimg/1.png,\n")  # line 4: no label (line 3 is blank)
    with pytest.raises(DataError, match=r"line 4 is \['img/1.png', ''\]"):
        read_csv(csv)


def test_an_image_csv_not_in_utf8_is_named_with_the_byte_and_line(tmp_path):
    _images(tmp_path / "img", n=2)
    csv = tmp_path / "labels.csv"
    csv.write_bytes("path,label\nimg/0.png,café\nimg/1.png,thé\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"CSV '.*labels.csv': byte 0xe9 on line 2 is not UTF-8 text"):
        read_csv(csv)


def test_an_image_csv_separated_by_semicolons_or_tabs_is_told_so(tmp_path):
    # "has 1 columns ... and no header; add a header naming the image column": it had one
    _images(tmp_path / "img", n=2)
    csv = tmp_path / "labels.csv"
    for text, said in (("path;label\nimg/0.png;a\n", "separated by semicolons ('path;label'): save it "
                        "comma-separated"), ("path\tlabel\nimg/0.png\ta\n", "separated by tabs ('path\\tlabel'): "
                        "name the file .tsv")):  # fmt: skip
        csv.write_text(text)
        with pytest.raises(DataError, match=re.escape(said)):
            read_csv(csv)


def test_missing_images_written_with_backslashes_are_told_to_use_slashes(tmp_path):
    _images(tmp_path / "img", n=2)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nimg\\0.png,a\nimg\\1.png,b\n")
    with pytest.raises(DataError, match=r"written with backslashes \(Windows'\): write them with /"):
        read_csv(csv)
    csv.write_text("path,label\nimg/0.png,a\nimg/9.png,b\n")  # a file missing for another reason: no such hint
    with pytest.raises(DataError, match=r"missing image file") as caught:
        read_csv(csv)
    assert "backslash" not in str(caught.value)


def test_an_image_csv_in_utf16_is_named_as_such_with_the_conversion_from_it(tmp_path):
    # Excel's "Unicode Text": "byte 0xff on line 1 is not UTF-8 ... iconv -f cp1252", a conversion that garbles it
    _images(tmp_path / "img", n=2)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nimg/0.png,a\nimg/1.png,b\n", encoding="utf-16")
    with pytest.raises(DataError, match=r"CSV '.*labels.csv': it is UTF-16 text \(its first bytes: ff fe 70 00\), not "
                                        r"UTF-8; .*iconv -f utf-16 -t utf-8"):  # fmt: skip
        read_csv(csv)


def test_a_broken_symlink_named_like_a_file_beside_the_classes_is_no_class(tmp_path):
    _images(tmp_path / "bag")
    _images(tmp_path / "coat")
    (tmp_path / "labels.csv").symlink_to("/nonexistent/labels.csv")
    assert folder_classes(tmp_path) == ["bag", "coat"]


def _photo(path: Path, size=(1200, 900), orientation: int | None = None) -> Path:
    """A textured JPEG (a gradient with noise), of ``size``, with an EXIF orientation tag if given."""
    rng = np.random.default_rng(0)
    w, h = size
    across, down = np.linspace(0, 200, w, dtype=np.float32), np.linspace(0, 50, h, dtype=np.float32)
    ramp = across[None, :, None] + down[:, None, None]
    img = np.clip(ramp + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=90, exif=exif)
    return path


def test_a_large_jpeg_decodes_reduced_while_both_its_sides_stay_at_least_min_side(tmp_path):
    photo = _photo(tmp_path / "photo.jpg")
    assert load_image(photo).size == (1200, 900)  # no min_side: whole
    assert load_image(photo, min_side=146).size == (300, 225)  # 1/4: 1/8 would make the short side 113
    assert load_image(photo, min_side=450).size == (600, 450)
    assert load_image(photo, min_side=451).size == (1200, 900)  # half would be too short: whole
    assert load_image(_photo(tmp_path / "turned.jpg", orientation=6), min_side=146).size == (225, 300)  # upright
    Image.open(photo).convert("RGB").save(tmp_path / "photo.png")
    assert load_image(tmp_path / "photo.png", min_side=146).size == (1200, 900)  # only JPEG scales as it decodes


def test_a_phones_jpeg_that_pillow_opens_as_mpo_decodes_reduced_and_is_scanned_as_a_jpeg(tmp_path):
    # a JPEG with an MPF segment (Samsung, Android Ultra HDR) is Pillow's "MPO": read whole at 2x the time, and
    # its markers never walked (a cut one passed the pre-scan)
    from freezetune.data.scan import image_problem

    photo = Image.open(_photo(tmp_path / "photo.jpg")).convert("RGB")
    photo.save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[photo.resize((120, 90))])
    assert Image.open(tmp_path / "phone.jpg").format == "MPO"
    assert load_image(tmp_path / "phone.jpg", min_side=146).size == (300, 225)
    assert image_problem(str(tmp_path / "phone.jpg")) is None
    data = (tmp_path / "phone.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])  # inside its first image's compressed data
    assert "truncated" in (image_problem(str(tmp_path / "cut.jpg")) or "")


def test_datasets_read_a_photo_reduced_by_the_models_decode_side_and_it_barely_moves_the_input(tmp_path):
    from freezetune.data import build_datasets, build_eval_dataset
    from freezetune.data.transforms import eval_transform
    from freezetune.model.preprocess import Preprocess

    for split in ("train", "test"):
        for name in ("a", "b"):
            _photo(tmp_path / split / name / "0.jpg")
    pre = Preprocess(input_size=64)
    assert pre.decode_side == 2 * pre.eval_resize == 146
    bundle = build_datasets(str(tmp_path), preprocess=pre, aug="none", val_split=None)
    test = build_eval_dataset(str(tmp_path), preprocess=pre, classes=["a", "b"])
    assert {bundle.train.min_side, bundle.test.min_side, test.min_side} == {146}
    assert bundle.train.select(torch.tensor([0])).min_side == 146 and test.joined(test).min_side == 146
    path = test.samples[0][0]
    whole = eval_transform(pre)(load_image(path))
    reduced = test[0][0]
    assert torch.equal(reduced, eval_transform(pre)(load_image(path, min_side=146)))
    levels = (whole - reduced).abs() * torch.tensor(pre.std).view(3, 1, 1) * 255
    assert 0 < levels.max() <= 4 and levels.mean() < 0.5  # a different decode, the same picture


def test_an_image_over_pils_pixel_limit_is_named_in_megapixels_and_one_near_it_is_noted(tmp_path, monkeypatch,
                                                                                        caplog):  # fmt: skip
    # PIL's "Image size (182000000 pixels) exceeds limit of 178956970 pixels, could be decompression bomb DOS
    # attack." named no way out; below twice the limit its DecompressionBombWarning came raw from every worker
    import warnings

    from freezetune.data.scan import image_problem, unreadable

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")  # 1 600 pixels: over the limit, under twice it
    Image.new("RGB", (40, 40)).save(tmp_path / "big.jpg")  # a JPEG decodes scaled down: nothing to say
    Image.new("RGB", (50, 50)).save(tmp_path / "huge.png")  # 2 500: PIL refuses it
    refused = "0.0025 megapixels, over the 0.002 that PIL decodes, its guard against decompression bombs: save a " \
              "downscaled copy"  # fmt: skip
    with pytest.raises(DataError, match=f"huge.png': {refused}$"):
        load_image(tmp_path / "huge.png")
    assert image_problem(str(tmp_path / "huge.png")) == refused
    Image.new("RGB", (40, 40)).save(tmp_path / "big2.png")
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):  # a folder of such scans: one line
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL's own: the command line drops it
        assert image_problem(str(tmp_path / "big.png")) is None and image_problem(str(tmp_path / "big.jpg")) is None
        found = unreadable([str(tmp_path / n) for n in ("big.png", "big2.png", "big.jpg", "huge.png")])
    assert found == [(str(tmp_path / "huge.png"), refused)]
    notes = [r.getMessage() for r in caplog.records if "megapixels, e.g." in r.getMessage()]
    assert notes == [f"2 image file(s) are over 0.001 megapixels, e.g. '{tmp_path / 'big.png'}' (0.0016), "
                     f"'{tmp_path / 'big2.png'}' (0.0016): each read decodes all of them (a second or more); "
                     "downscaled copies train as well, faster"]  # fmt: skip
    assert "big.jpg" not in caplog.text


def test_an_image_with_corrupt_exif_is_read_and_named_once_in_freezetunes_words(tmp_path, caplog):
    # PIL's raw "TiffImagePlugin.py:982: UserWarning: Corrupt EXIF data.  Expecting to read 12 bytes but only got 6."
    # reached stderr from every loader worker, naming no file, and not train.log
    import warnings

    from _engine_fixtures import cut_exif_jpeg
    from freezetune.data.scan import quiet_pil_warnings, unreadable

    turned, kept = cut_exif_jpeg(tmp_path / "turned.jpg", True), cut_exif_jpeg(tmp_path / "kept.jpg", False)
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        load_image(kept)
    assert any("Corrupt EXIF data" in str(w.message) for w in raw)  # PIL's own, which the filter must match
    with warnings.catch_warnings(record=True) as raw, caplog.at_level(logging.WARNING, logger="freezetune"):
        warnings.simplefilter("always")
        quiet_pil_warnings()  # the command line's and each loader worker's filter
        assert unreadable([str(turned), str(kept)]) == [] and unreadable([str(turned), str(kept)]) == []
        assert load_image(turned).size == (40, 50) and load_image(kept).size == (50, 40)  # as the note says
    assert not raw
    notes = [r.getMessage() for r in caplog.records if "EXIF" in r.getMessage()]
    assert notes == [f"2 image file(s) have corrupt EXIF data (its first directory cut short); their pixels are read "
                     f"as usual, e.g.\n  '{turned}' (its orientation tag, 6, read before the cut: turned by it)\n  "
                     f"'{kept}' (read as stored: no orientation before the cut turns it)"]  # fmt: skip


def test_a_link_to_nothing_is_named_with_its_target(tmp_path):
    # "cannot read image 'broken.png': [Errno 2] No such file or directory:" (PIL's message, its path cut, a colon left)
    (tmp_path / "broken.png").symlink_to(tmp_path / "moved.png")
    with pytest.raises(DataError, match=rf"broken.png': a link to '{tmp_path / 'moved.png'}', which does not exist$"):
        load_image(tmp_path / "broken.png")
    with pytest.raises(DataError, match=r"none.png': \[Errno 2\] No such file or directory$"):
        load_image(tmp_path / "none.png")


def test_integer_labels_that_tie_as_numbers_sort_the_same_in_every_process():
    # "1" and "01" tie on int(): their order followed the set's hash order, which changes with each process, so the
    # same command gave other class indices, another hold-out, and a resume was refused as "the data changed"
    from freezetune.data.labels import sorted_labels

    assert sorted_labels(["1", "01", "10", "2"]) == sorted_labels(["01", "1", "2", "10"]) == ["01", "1", "2", "10"]


def test_labels_that_look_like_numbers_and_are_not_sort_as_text():
    # "①" passed str.isdigit and failed int() (a traceback); pandas' "nan" made the numeric sort's order follow the
    # set's (NaN compares false with all): another process, other class indices, and a refused resume
    from itertools import permutations

    from freezetune.data.labels import sorted_labels

    assert sorted_labels(["②", "①", "³"]) == ["³", "①", "②"]  # as text: no int() traceback
    assert {tuple(sorted_labels(list(p))) for p in permutations(["1.0", "nan", "0.0", "2.0"])} == {
        ("0.0", "1.0", "2.0", "nan")
    }
    assert sorted_labels(["٣", "١٠", "٢"]) == ["٢", "٣", "١٠"]  # Arabic-Indic digits are decimal: int() reads them
    assert sorted_labels(["10", "inf", "9"]) == ["9", "10", "inf"] and sorted_labels(["10", "nan", "2"])[0] == "2"


def test_a_class_whose_name_holds_a_slash_is_read_from_its_folder_spelling(tmp_path):
    # a Fashion-MNIST checkpoint ("T-shirt/top") and an image folder: no folder can be named so, and the refusal
    # said to rename the folder to the training class
    classes = ["T-shirt/top", "Trouser"]
    _images(tmp_path / "test" / "T-shirt_top", n=2)
    _images(tmp_path / "test" / "Trouser", n=1)
    data = scan_folder(tmp_path / "test", classes=classes)
    assert data.classes == classes and sorted(int(t) for t in data.targets) == [0, 0, 1]
    (tmp_path / "few" / "T-shirt_top").mkdir(parents=True)  # empty, as a training class's may be: accepted
    _images(tmp_path / "few" / "Trouser", n=1)
    assert [int(t) for t in scan_folder(tmp_path / "few", classes=classes).targets] == [1]
    _images(tmp_path / "other" / "Shirt")
    with pytest.raises(DataError, match=r"'Shirt'.*not training classes.*'T-shirt/top' is the folder 'T-shirt_top'"):
        scan_folder(tmp_path / "other", classes=classes)


def test_a_folder_that_cannot_be_listed_is_refused_not_left_out_with_its_images(tmp_path, monkeypatch):
    # a folder chmod 000 (or on a share gone stale) was skipped by the walk: eval scored a test set without its images
    # and train learnt a class from fewer, both saying nothing (root reads any folder: the refusal is simulated)
    for split in ("train", "test"):
        for c in ("red", "green"):
            _images(tmp_path / split / c)
            _images(tmp_path / split / c / "more")
    real = os.scandir

    def scandir(path="."):
        if Path(path).name == "more" and Path(path).parent.name == "green":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    (tmp_path / "test" / "green" / "more" / "texts.csv").write_text("text,label\nhi,green\n")
    monkeypatch.setattr(os, "scandir", scandir)
    test = [str(tmp_path / "test")]
    for listing in (lambda: scan_folder(tmp_path / "train"), lambda: list_images(test), lambda: list_text_files(test)):
        with pytest.raises(DataError, match=r"cannot list folder '.*green/more': Permission denied; its images would"):
            listing()


def test_a_folder_beside_the_splits_that_cannot_be_listed_is_no_reason_to_refuse_the_data(tmp_path, monkeypatch):
    # a data disk mounted at its root: its root-only lost+found beside train/ is only counted for a warning; refusing
    # it stopped a run that trained before
    from freezetune.data.folder import count_images

    _images(tmp_path / "train" / "red")
    (tmp_path / "lost+found").mkdir()
    real = os.scandir

    def scandir(path="."):
        if Path(path).name == "lost+found":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert count_images(tmp_path / "lost+found") == 0 and count_images(tmp_path / "train") == 2
