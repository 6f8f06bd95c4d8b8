"""Tests for freezetune.data: IDX/folder/CSV readers, splits, few-shot subsets, transforms and loaders."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _engine_fixtures import fashion_mnist_dir, make_idx_dir, write_idx
from freezetune.data import (
    build_datasets,
    build_eval_dataset,
    build_loader,
    eval_transform,
    folder,
    list_images,
    load_image,
    train_transform,
)
from freezetune.data.folder import HEIF_EXTENSIONS, IMAGE_EXTENSIONS, scan_folder
from freezetune.data.idx import FASHION_CLASSES, InMemoryImageDataset, load_idx, read_idx
from freezetune.data.sampling import per_class_indices, stratified_split
from freezetune.data.text import TextDataset
from freezetune.data.validation import hold_out
from freezetune.errors import ConfigError, DataError
from freezetune.model.preprocess import Preprocess

FASHION_DIR = fashion_mnist_dir()
PRE = Preprocess(input_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def make_folder(root: Path, per_class: int, fmt: str = "png") -> Path:
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20 + i, 24), rgb).save(root / name / f"{i}.{fmt}")
    return root


# ---- IDX ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "pre"),
    [
        ((12, 28, 28), Preprocess(input_size=64)),  # Fashion-MNIST up to the main job's size
        ((12, 40, 30, 3), Preprocess(input_size=16, crop_pct=0.875, interpolation="bicubic")),  # RGB, down, cropped
    ],
)
def test_a_batch_of_in_memory_images_through_the_eval_pipeline_is_each_image_through_it(shape, pre):
    # the eval transform runs once on a loader's batch (the final test spent 3.5 s of a 50 s run image by image)
    from torch.utils.data import DataLoader

    from freezetune.data.transforms import eval_transform, train_transform

    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds = InMemoryImageDataset(images, torch.arange(12) % 3, ["a", "b", "c"], eval_transform(pre))
    one_by_one = [ds[i] for i in (7, 0, 11, 3)]
    batched = ds.__getitems__([7, 0, 11, 3])
    assert [label for _, label in batched] == [label for _, label in one_by_one]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batched, one_by_one, strict=True))
    x, y = next(iter(DataLoader(ds, batch_size=12)))
    assert torch.equal(x, torch.stack([ds[i][0] for i in range(12)])) and y.tolist() == (torch.arange(12) % 3).tolist()
    ds.transform = train_transform(pre)  # random: image by image, as before
    assert len(ds.__getitems__([1, 2])) == 2 and not getattr(ds.transform, "batchable", False)


def test_a_batch_of_image_files_through_the_eval_pipeline_is_each_image_through_it(tmp_path):
    # grouped by size: make_folder's images are 20-23 px wide, three of each size, and a grey one among them
    from torch.utils.data import DataLoader

    from freezetune.data.transforms import eval_transform

    root = make_folder(tmp_path / "imgs", 4)
    Image.new("L", (21, 24), 90).save(root / "red" / "grey.png")
    ds = scan_folder(root)
    ds.transform = eval_transform(Preprocess(input_size=16, crop_pct=0.875, interpolation="bicubic"))
    order = [5, 0, 11, 3, 9, 12, 1]
    batched, one_by_one = ds.__getitems__(order), [ds[i] for i in order]
    assert [label for _, label in batched] == [label for _, label in one_by_one]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batched, one_by_one, strict=True))
    x, _ = next(iter(DataLoader(ds, batch_size=len(ds))))
    assert torch.equal(x, torch.stack([ds[i][0] for i in range(len(ds))]))
    # a photo goes through alone, decoded and resized before the next is read (held for a group, a batch of
    # 12-megapixel photos took gigabytes); the same tensors
    Image.new("RGB", (300, 260), (10, 200, 30)).save(root / "green" / "big.png")
    ds = scan_folder(root)
    ds.transform = eval_transform(Preprocess(input_size=16))
    calls = []
    ds.transform = _Counting(ds.transform, calls)
    out = ds.__getitems__(list(range(len(ds))))
    assert [shape[0] for shape in calls].count(None) == 1  # the big one alone, as [3, H, W]
    assert all(torch.equal(x, ds[i][0]) for i, (x, _) in enumerate(out))


class _Counting:
    """A transform that records each call's batch size (None for one image) and passes it on."""

    batchable = True

    def __init__(self, transform, calls):
        self.transform, self.calls = transform, calls

    def __call__(self, x):
        self.calls.append((len(x) if isinstance(x, torch.Tensor) and x.dim() == 4 else None,))
        return self.transform(x)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_gzip_and_raw(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x-idx3-ubyte", arr, gz)
    out = read_idx(tmp_path / "x-idx3-ubyte")
    assert out.dtype == np.uint8 and np.array_equal(out, arr)


def test_read_idx_bad_magic_and_truncated(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 20)
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 5, 5)), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")


def test_idx_dir_classes_and_a_held_out_val_never_the_test_split(tmp_path):
    fashion = build_datasets(str(make_idx_dir(tmp_path / "fashion-tiny")), preprocess=PRE)
    assert fashion.source == "idx" and fashion.classes == FASHION_CLASSES
    assert isinstance(fashion.train, InMemoryImageDataset) and fashion.train.images.dtype == torch.uint8
    # no val_split: the model selection set is held out of train, never the official test split
    assert fashion.val is not fashion.test and len(fashion.test) == 20
    assert "held out" in fashion.val_source and "test split is only scored at the end" in fashion.val_source
    # a run that scores no test split (a sweep's, a trial's) does not say it will; a refit is a refit, whoever asked
    trial = build_datasets(str(tmp_path / "fashion-tiny"), preprocess=PRE, final_test=False)
    assert trial.val_source.endswith("; the test split is not used") and "scored" not in trial.val_source
    refit = build_datasets(str(tmp_path / "fashion-tiny"), preprocess=PRE, refit=True)
    assert refit.val is None and "train too (refit); best.pt is the last epoch" in refit.val_source
    assert "auto recipe" not in refit.val_source
    train_ids, val_ids = set(fashion.train.images[:, 0, 0].tolist()), set(fashion.val.images[:, 0, 0].tolist())
    assert len(val_ids) == 10 and not train_ids & val_ids  # 10 % of each class's 6, at least one: one per class
    x, y = fashion.train[3]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 3
    digits = build_datasets(str(make_idx_dir(tmp_path / "mnist", gz=False)), preprocess=PRE)
    assert digits.classes == [str(d) for d in range(10)]


def test_an_idx_folders_test_split_as_its_own_validation_data_is_refused(tmp_path):
    # --val-data of the same IDX folder read its t10k files, which the final test reads too: best.pt, early stopping
    # and the auto recipe were decided on the test split, unsaid (a folder's test/ as --val-data was refused)
    root = make_idx_dir(tmp_path / "digits")
    with pytest.raises(DataError, match=r"the test images are the validation images \(both read from '.*t10k-images"):
        build_datasets(str(root), val_data=str(root), preprocess=PRE)
    assert build_datasets(str(root), val_data=str(root), preprocess=PRE, final_test=False).val is not None


def test_idx_class_names_drop_a_byte_order_mark_and_refuse_a_name_given_twice(tmp_path):
    # Notepad's BOM became part of the first name ('\ufeffzero'); two labels under one name were scored as one
    root = make_idx_dir(tmp_path / "digits")
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    (root / "classes.txt").write_bytes(b"\xef\xbb\xbf" + "\n".join(names).encode())
    assert build_datasets(str(root), preprocess=PRE).classes == names
    (root / "classes.txt").write_text("\n".join(["a", "a", *names[2:]]))
    with pytest.raises(DataError, match="names 'a' more than once; give each label a name of its own"):
        build_datasets(str(root), preprocess=PRE)


def test_idx_val_split_and_per_class_never_overlap(tmp_path):
    root = str(make_idx_dir(tmp_path / "mnist", n_train=200))
    b = build_datasets(root, val_split=0.2, per_class=5, seed=1, preprocess=PRE)
    train_ids = set(b.train.images[:, 0, 0].tolist())
    val_ids = set(b.val.images[:, 0, 0].tolist())
    assert len(val_ids) == 40 and len(train_ids) == 50 and not train_ids & val_ids
    assert torch.bincount(b.train.targets, minlength=10).tolist() == [5] * 10
    assert torch.bincount(b.val.targets, minlength=10).tolist() == [4] * 10
    assert len(b.test) == 20
    # said: the share is of the whole class, not of the K a class kept (12000 validation images for 200 training)
    assert b.val_source.startswith("val_split 0.2: 40 training images held out of the whole training set, before "
                                   "per_class=5 drew its 50;")  # fmt: skip


@pytest.mark.parametrize("per_class", [None, 20])
def test_refit_trains_on_exactly_the_trials_training_and_held_out_images(tmp_path, per_class):
    root = str(make_idx_dir(tmp_path / "mnist", n_train=200))  # 20 a class: 2 held out, 18 train
    held = build_datasets(root, per_class=per_class, seed=1, preprocess=PRE)
    refit = build_datasets(root, per_class=per_class, seed=1, preprocess=PRE, refit=True)
    assert refit.val is None and "train too (refit" in refit.val_source and len(refit.test) == 20
    # the trials' training images (per_class drawn after the hold-out), then the images they were scored on
    assert torch.equal(refit.train.images, torch.cat([held.train.images, held.val.images]))
    assert torch.equal(refit.train.targets, torch.cat([held.train.targets, held.val.targets]))
    assert refit.train.parts[0].images.shape[0] == 180 and refit.train.transform is not None


def test_refit_keeps_validation_it_did_not_hold_out_or_beyond_per_class(tmp_path):
    # held out of a larger pool than the few-shot budget, the validation images are not the user's training data
    root = str(make_idx_dir(tmp_path / "mnist", n_train=200))
    few = build_datasets(root, per_class=5, seed=1, preprocess=PRE, refit=True)
    assert (len(few.train), len(few.val)) == (50, 20) and "not refit" in few.val_source
    # a validation set the user gave is theirs: refit joins only the automatic hold-out
    make_folder(tmp_path / "f" / "train", 4)
    make_folder(tmp_path / "f" / "val", 2)
    folder = build_datasets(str(tmp_path / "f"), preprocess=PRE, refit=True)
    assert (len(folder.train), len(folder.val)) == (12, 6)
    assert (
        folder.val_source == "the validation folder (not refit: refit joins only what is held out automatically, "
        "and these were given)"
    )  # the run went on validating, and its log did not say why


def test_per_class_warns_about_the_classes_that_train_short_and_why(tmp_path, caplog):
    # 20 a class and per_class 20: the automatic hold-out takes 2 a class first, so the trials train on 18; refit gives
    # them back (no warning), a val_split keeps them (the warning says where they went); 15 a class is short anyway
    root = str(make_idx_dir(tmp_path / "mnist", n_train=200))

    def warned(data: str = root, **kwargs) -> str:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="freezetune"):
            build_datasets(data, seed=1, preprocess=PRE, **kwargs)
        return caplog.text

    assert "per_class" not in warned(per_class=20, refit=True)
    assert "per_class=20: 10 of 10 classes have fewer training images after the 20 held out for validation and use all" \
        in warned(per_class=20)  # fmt: skip
    # the auto recipe's trials hold 2 a class out, which its final run's refit gives back: a note, not a warning that
    # the data is short (it blamed the hold-out for every class, those short anyway too)
    assert "per_class" not in warned(per_class=20, refit_follows=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="freezetune"):
        build_datasets(root, seed=1, preprocess=PRE, per_class=20, refit_follows=True)
    assert "per_class=20: 10 of 10 classes train on fewer images after the 20 held out for validation; a refit " \
        "(the auto recipe's final run) trains on them too (" in caplog.text  # fmt: skip
    short = warned(per_class=21, refit_follows=True)  # short without the hold-out too: warned of, with what each has
    assert "per_class=21: 10 of 10 classes have fewer training images and use all they have (" in short
    assert "after the 40 held out" in warned(per_class=20, val_split=0.2)
    assert "per_class=20" not in warned(per_class=18)
    make_folder(tmp_path / "f" / "train", 4)
    make_folder(tmp_path / "f" / "val", 2)  # a validation folder takes nothing from the training images
    assert "3 of 3 classes have fewer training images and use all they have (blue: 4" in warned(
        str(tmp_path / "f"), per_class=5
    )


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    b = build_datasets(str(FASHION_DIR), preprocess=PRE)
    # all 60 000 official training images: 50 per class held out for validation (10 %, capped), the rest train
    assert (len(b.train), len(b.val), len(b.test)) == (59500, 500, 10000)
    assert b.train.images.shape == (59500, 28, 28) and b.train.targets.dtype == torch.int64
    assert torch.bincount(b.val.targets).tolist() == [50] * 10
    assert b.classes[0] == "T-shirt/top" and b.classes[9] == "Ankle boot"
    assert torch.bincount(b.test.targets).tolist() == [1000] * 10


# ---- folders and CSV ----------------------------------------------------------------------------------------------


def test_folder_train_val_test_dirs(tmp_path):
    make_folder(tmp_path / "train", 4)
    make_folder(tmp_path / "valid", 2, fmt="jpg")
    make_folder(tmp_path / "test", 1, fmt="bmp")
    b = build_datasets(str(tmp_path), preprocess=PRE, aug="none")
    assert b.source == "folder" and b.classes == ["blue", "green", "red"]
    assert (len(b.train), len(b.val), len(b.test)) == (12, 6, 3)
    x, y = b.val[0]
    # A pure colour survives the pipeline: un-normalise and the label's channel is the bright one.
    rgb = (x * 0.25 + 0.5).mean(dim=(1, 2))
    assert b.classes[y] == "blue" and rgb.argmax() == 2 and rgb[2] > 0.95


def test_folder_val_dir_with_unknown_class(tmp_path):
    make_folder(tmp_path / "train", 2)
    (tmp_path / "val" / "purple").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "purple" / "a.png")
    with pytest.raises(DataError, match="purple"):
        build_datasets(str(tmp_path), preprocess=PRE)


def test_flat_folder_with_val_split_is_stratified_and_disjoint(tmp_path):
    make_folder(tmp_path, 10)
    b = build_datasets(str(tmp_path), val_split=0.3, preprocess=PRE)
    assert (len(b.train), len(b.val)) == (21, 9) and b.test is None
    assert torch.bincount(b.val.targets).tolist() == [3, 3, 3]
    assert not {p for p, _ in b.train.samples} & {p for p, _ in b.val.samples}
    again = build_datasets(str(tmp_path), val_split=0.3, preprocess=PRE)
    assert again.val.samples == b.val.samples


def test_csv_with_and_without_header(tmp_path):
    make_folder(tmp_path / "imgs", 3)
    lines = [f"imgs/{c}/{i}.png,{c}" for c in COLOURS for i in range(2)]
    (tmp_path / "plain.csv").write_text("\n".join(lines) + "\n")
    # validation: other images than the training ones (the same files in two splits are refused)
    val = ["imgs/blue/2.png,blue", "imgs/blue/2.png,blue", "imgs/green/2.png,green"]
    (tmp_path / "head.csv").write_text("path,label\n" + "\n".join(val) + "\n")
    b = build_datasets(str(tmp_path / "plain.csv"), val_data=str(tmp_path / "head.csv"), preprocess=PRE)
    assert b.source == "csv" and b.classes == ["blue", "green", "red"]
    assert (len(b.train), len(b.val)) == (6, 3) and b.val.targets.tolist() == [0, 0, 1]
    assert b.train[5][0].shape == (3, 16, 16) and b.train[5][1] == 2


def test_a_headerless_csv_of_label_path_rows_reads_as_its_path_label_twin_does(tmp_path):
    # "label,path" rows were read as path "red" and refused as 6 missing image files, first 'red'
    make_folder(tmp_path / "imgs", 2)
    rows = [(f"imgs/{c}/{i}.png", c) for c in COLOURS for i in range(2)]
    (tmp_path / "path_label.csv").write_text("".join(f"{p},{c}\n" for p, c in rows))
    (tmp_path / "label_path.csv").write_text("".join(f"{c},{p}\n" for p, c in rows))
    one, two = (build_datasets(str(tmp_path / f), preprocess=PRE) for f in ("path_label.csv", "label_path.csv"))
    assert two.classes == one.classes == ["blue", "green", "red"]
    assert sorted(two.train.samples + two.val.samples) == sorted(one.train.samples + one.val.samples)
    (tmp_path / "gone.csv").write_text("red,imgs/red/0.png\nblue,imgs/nothere.png\n")  # its second column's file
    with pytest.raises(DataError, match=r"lists 1 missing image file\(s\), first: '.*nothere.png'"):
        build_datasets(str(tmp_path / "gone.csv"), preprocess=PRE)
    # its first row's file missing: judged by that row alone, every path became a class (--skip-bad: "left class(es)
    # 'imgs/blue/0.png', ... without a training image")
    (tmp_path / "first_gone.csv").write_text("red,imgs/nothere.png\n" + "".join(f"{c},{p}\n" for p, c in rows))
    skipped = build_datasets(str(tmp_path / "first_gone.csv"), preprocess=PRE, skip_bad=True)
    assert skipped.classes == one.classes and skipped.skipped == [str(tmp_path / "imgs" / "nothere.png")]


def test_an_image_list_separated_by_tabs_reads_as_its_csv_does(tmp_path):
    # 'path<TAB>label' lists were refused as "a .tsv without a text column", for training and validation alike
    make_folder(tmp_path / "imgs", 3)
    rows = [f"imgs/{c}/{i}.png\t{c}" for c in COLOURS for i in range(2)]
    (tmp_path / "plain.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "head.tsv").write_text("image\tlabel\n" + "\n".join(f"imgs/{c}/2.png\t{c}" for c in COLOURS) + "\n")
    b = build_datasets(str(tmp_path / "plain.tsv"), val_data=str(tmp_path / "head.tsv"), preprocess=PRE)
    assert b.source == "csv" and b.classes == ["blue", "green", "red"] and (len(b.train), len(b.val)) == (6, 3)
    assert [(Path(p).parent.name, b.classes[y]) for p, y in b.val.samples] == [(c, c) for c in COLOURS]
    head = build_datasets(str(tmp_path / "head.tsv"), preprocess=PRE)
    assert head.source == "csv" and len(head.train) == 3 and head.val is None  # one image a class: none held out


def test_csv_errors_name_the_problem(tmp_path):
    make_folder(tmp_path / "imgs", 1)
    (tmp_path / "train.csv").write_text("imgs/red/0.png,red\nimgs/blue/0.png,blue\n")
    (tmp_path / "val.csv").write_text("imgs/red/0.png,cyan\n")
    with pytest.raises(DataError, match="cyan"):
        build_datasets(str(tmp_path / "train.csv"), val_data=str(tmp_path / "val.csv"), preprocess=PRE)
    (tmp_path / "gone.csv").write_text("imgs/nothere.png,red\n")
    with pytest.raises(DataError, match="nothere.png"):
        build_datasets(str(tmp_path / "gone.csv"), preprocess=PRE)


def test_a_csv_row_with_a_field_past_the_header_is_refused_naming_its_line(tmp_path):
    # an unquoted comma cut the label: "Persian, cat" trained as class "Persian"
    make_folder(tmp_path / "imgs", 2)
    rows = [
        "path,label",
        "imgs/red/0.png,red",
        "imgs/red/1.png,red,",
        "imgs/blue/0.png,blue, dark",
        "imgs/blue/1.png,blue",
    ]
    (tmp_path / "wide.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"line 4 has 3 fields, the header 2: a path or label with a comma must be"):
        build_datasets(str(tmp_path / "wide.csv"), preprocess=PRE)
    (tmp_path / "bare.csv").write_text("\n".join(rows[1:]) + "\n")  # no header
    with pytest.raises(DataError, match=r"line 3 has 3 fields, a 'path,label' row 2: a path or label with a comma"):
        build_datasets(str(tmp_path / "bare.csv"), preprocess=PRE)
    # an empty trailing cell (a spreadsheet's export) is no field; a quoted comma is part of the label
    rows[3] = 'imgs/blue/0.png,"blue, dark"'
    (tmp_path / "quoted.csv").write_text("\n".join(rows) + "\n")
    assert build_datasets(str(tmp_path / "quoted.csv"), val_split=0.5, preprocess=PRE).classes == [
        "blue",
        "blue, dark",
        "red",
    ]


def test_missing_or_empty_paths_raise_data_error(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(DataError, match=str(missing)):
        build_datasets(str(missing), preprocess=PRE)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders with images"):
        build_datasets(str(tmp_path / "empty"), preprocess=PRE)


def test_bad_options_are_config_errors_before_any_io(tmp_path):
    missing = str(tmp_path / "missing")  # ConfigError, not DataError: options are checked before the data is read
    with pytest.raises(ConfigError, match="not both"):
        build_datasets(missing, val_data=missing, val_split=0.1, preprocess=PRE)
    with pytest.raises(ConfigError, match="val_split.*per_class"):
        build_datasets(missing, val_split=1.5, per_class=0, preprocess=PRE)


def test_list_images_and_load_image(tmp_path):
    make_folder(tmp_path / "d", 2)
    (tmp_path / "d" / "notes.txt").write_text("not an image")
    Image.new("L", (5, 5), 128).save(tmp_path / "gray.png")
    found = list_images([str(tmp_path / "gray.png"), str(tmp_path / "d")])
    assert found[0].endswith("gray.png") and len(found) == 7 and found[1:] == sorted(found[1:])
    assert load_image(found[0]).mode == "RGB"
    with pytest.raises(DataError, match="nope"):
        list_images([str(tmp_path / "nope")])
    with pytest.raises(DataError, match="notes.txt"):
        load_image(tmp_path / "d" / "notes.txt")


def test_load_image_palette_with_transparency_is_quiet(tmp_path):
    # Icons and emoji often come as palette PNGs with a transparent index: PIL warns on each one it converts
    # straight to RGB (a warning per image, from every loader worker). The transparent entry (alpha 0) reads as
    # white, the half-transparent one (alpha 128) half way to white; "drop" (a checkpoint saved before compositing)
    # keeps the colours stored in the palette.
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 200, 30, 10] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.save(tmp_path / "icon.png", transparency=bytes([0, 128] + [255] * 254))  # partial alpha: kept as bytes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb, kept = load_image(tmp_path / "icon.png"), load_image(tmp_path / "icon.png", alpha="drop")
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 1)) == (227, 142, 132)
    assert kept.mode == "RGB" and kept.getpixel((0, 0)) == (0, 0, 0) and kept.getpixel((1, 1)) == (200, 30, 10)


def test_files_of_other_types_in_class_folders_are_named_not_dropped_in_silence(tmp_path, caplog, monkeypatch):
    # without pillow-heif an iPhone's photos are not images here: they are named, with what reads them
    monkeypatch.setattr(folder, "IMAGE_EXTENSIONS", tuple(e for e in IMAGE_EXTENSIONS if e not in HEIF_EXTENSIONS))
    make_folder(tmp_path, 2)
    for i in range(3):
        (tmp_path / "red" / f"IMG_{i}.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    (tmp_path / "blue" / "notes.txt").write_text("labels checked")
    (tmp_path / "blue" / ".DS_Store").write_bytes(b"")  # hidden: not the user's data
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        ds = scan_folder(tmp_path)
    assert len(ds) == 6
    assert "4 file(s) left out, not of an image type read here (.heic: 3, .txt: 1)" in caplog.text
    assert "pip install 'freezetune[heic]'" in caplog.text
    caplog.clear()
    for i in range(3):
        (tmp_path / "red" / f"IMG_{i}.HEIC").unlink()
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        scan_folder(tmp_path)
    assert ".txt: 1" in caplog.text and "heic" not in caplog.text  # the hint only where it helps


def test_a_heic_photo_named_directly_without_pillow_heif_names_the_extra_not_a_broken_file(tmp_path, monkeypatch):
    # predict IMG.heic, or a CSV listing one, said "cannot identify image file", as of a broken file
    from freezetune.data.scan import check_images

    monkeypatch.setattr(folder, "_HEIF_READABLE", False)
    photo = tmp_path / "IMG_1.HEIC"
    photo.write_bytes(b"\0\0\0\x18ftypheic")
    with pytest.raises(DataError, match=r"cannot read image .*IMG_1.HEIC.*; pip install 'freezetune\[heic\]'"):
        load_image(photo)
    make_folder(tmp_path / "f", 2)
    ds = scan_folder(tmp_path / "f")
    ds.samples.append((str(photo), 0))
    with pytest.raises(DataError, match=r"cannot be read: .*IMG_1.HEIC.*--skip-bad to train without them; pip inst"):
        check_images(ds, "training", skip_bad=False)


def _heic(path: Path, pixels: np.ndarray) -> Path:
    pytest.importorskip("pillow_heif")
    Image.fromarray(pixels).save(path, quality=95)  # pillow-heif's encoder (x265), registered by freezetune.data
    return path


def test_heic_photos_are_read_on_every_path_when_pillow_heif_is_installed(tmp_path, caplog):
    from torchvision.io import read_file

    from freezetune.data.gpu import _decode_cpu

    rng = np.random.default_rng(0)
    make_folder(tmp_path, 2)
    smooth = np.repeat(np.repeat(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), 8, axis=0), 8, axis=1)
    photo = _heic(tmp_path / "red" / "IMG_0001.HEIC", smooth)  # 48 x 64, as a camera names it
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        b = build_datasets(str(tmp_path), val_split=0.3, preprocess=PRE)
    assert "left out" not in caplog.text
    assert str(photo) in [path for ds in (b.train, b.val) for path, _ in ds.samples]
    pixels = np.asarray(load_image(photo))
    assert pixels.shape == smooth.shape and np.abs(pixels.astype(int) - smooth).mean() < 6  # lossy, close
    on_gpu_path = _decode_cpu(read_file(str(photo)), str(photo))  # torchvision cannot: the PIL fallback reads it
    assert torch.equal(on_gpu_path, torch.from_numpy(pixels.copy()).permute(2, 0, 1))


def test_load_image_turns_a_photo_upright_by_its_exif_orientation(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn a quarter clockwise to view", as a phone held upright writes it
    Image.fromarray(pixels).save(tmp_path / "phone.png", exif=exif)
    upright = np.asarray(load_image(tmp_path / "phone.png"))
    assert upright.shape == (40, 24, 3) and np.array_equal(upright, np.rot90(pixels, -1))


def test_16_bit_and_float_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    # PIL's RGB conversion clips at 255: a 16-bit PNG (microscopy, medical, satellite) came out almost all white and a
    # float TIFF in [0, 1] almost all black, silently
    ramp16 = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp16).save(tmp_path / "ramp16.png")
    rgb = np.asarray(load_image(tmp_path / "ramp16.png"))
    assert rgb.shape == (32, 32, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.abs(rgb[..., 0].astype(int) - ramp16 / 257).max() <= 1  # 0..65535 -> 0..255, the ramp kept
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32).astype(np.float32)
    Image.fromarray(ramp, mode="F").save(tmp_path / "ramp.tif")
    assert np.abs(np.asarray(load_image(tmp_path / "ramp.tif"))[..., 0] - ramp * 255).max() <= 1
    wide = (ramp * 1000 - 100).astype(np.float32)  # a float image not in [0, 1]: its values, clipped to 0..255
    Image.fromarray(wide, mode="F").save(tmp_path / "wide.tif")
    assert np.abs(np.asarray(load_image(tmp_path / "wide.tif"))[..., 0] - np.clip(wide, 0, 255)).max() <= 1
    # a 32-bit integer TIFF (PIL's mode I) of 8-bit values loaded all black (read as 16-bit), one of values past 16
    # bits all white (clipped)
    ramp8 = np.linspace(0, 255, 32 * 32).reshape(32, 32).astype(np.int32)
    Image.fromarray(ramp8, mode="I").save(tmp_path / "ramp8.tif")
    assert Image.open(tmp_path / "ramp8.tif").mode == "I"
    assert np.abs(np.asarray(load_image(tmp_path / "ramp8.tif"))[..., 0] - ramp8).max() <= 1
    Image.fromarray(ramp8 * 4096, mode="I").save(tmp_path / "ramp32.tif")
    assert np.abs(np.asarray(load_image(tmp_path / "ramp32.tif"))[..., 0] - ramp8).max() <= 1


# ---- sampling -----------------------------------------------------------------------------------------------------


def test_per_class_counts_and_seeded_determinism(caplog):
    targets = torch.tensor([0] * 20 + [1] * 3 + [2] * 8)
    idx, counts = per_class_indices(targets, k=5, seed=0)
    assert counts == {0: 5, 1: 3, 2: 5} and len(set(idx.tolist())) == 13
    assert torch.equal(idx, per_class_indices(targets, k=5, seed=0)[0])
    assert not torch.equal(idx, per_class_indices(targets, k=5, seed=1)[0])
    with pytest.raises(ConfigError, match="per_class"):
        per_class_indices(targets, k=0)


def test_per_class_warns_about_short_classes(tmp_path, caplog):
    root = make_idx_dir(tmp_path / "mnist", n_train=25)  # classes 0-4 have 3 images, 5-9 have 2
    with caplog.at_level(logging.WARNING, logger="freezetune.data"):
        # explicit validation data: nothing is held out of the 25 training images
        b = build_datasets(str(root), per_class=3, val_data=str(make_idx_dir(tmp_path / "val")), preprocess=PRE)
    assert len(b.train) == 25 and "5 of 10 classes have fewer" in caplog.text


def test_idx_validation_data_is_labelled_by_class_name_not_position(tmp_path):
    # a folder's classes are alphabetical, an IDX's labels positions named by classes.txt: they were taken by position,
    # and a run validated Fashion-MNIST's "Ankle boot" (label 9) as the folder's class 9, "Trouser", without a word
    for name in ("c0", "c1", "c2"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "train" / name / f"{i}.png")
    val = make_idx_dir(tmp_path / "val", n_train=0, n_test=9)
    (val / "classes.txt").write_text("\n".join(f"c{9 - i}" for i in range(10)) + "\n")  # label 9 is c0, 8 c1...
    write_idx(val / "t10k-labels-idx1-ubyte.gz", np.array([9, 8, 7] * 3), True)
    data = build_datasets(str(tmp_path / "train"), val_data=str(val), preprocess=PRE, final_test=False)
    assert data.val.targets.tolist() == [0, 1, 2] * 3 and data.val.classes == ["c0", "c1", "c2"]
    write_idx(val / "t10k-labels-idx1-ubyte.gz", np.array([9, 8, 6] * 3), True)  # c3: no training class
    with pytest.raises(DataError, match="label\\(s\\) named 'c3', which the training data does not know"):
        build_datasets(str(tmp_path / "train"), val_data=str(val), preprocess=PRE, final_test=False)


def test_stratified_split_edge_cases():
    train, val = stratified_split(torch.tensor([0, 1, 1, 2, 2, 2, 2]), fraction=0.5, seed=0)
    assert sorted(train.tolist() + val.tolist()) == list(range(7))
    assert 0 in train.tolist()  # a single-image class stays in train
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="val_split"):
            stratified_split(torch.tensor([0, 1]), fraction=bad)


def test_a_key_under_two_classes_stays_in_training_whole_and_other_keys_split_as_before():
    # one text labelled "pos" and "neg" was grouped per class: its "pos" copy trained, its "neg" copy validated
    targets = torch.tensor([0] * 6 + [1] * 6)
    groups = [f"a{i}" for i in range(6)] + [f"a{i}" for i in range(3)] + [f"b{i}" for i in range(3)]
    for seed in range(10):
        train, val = stratified_split(targets, fraction=0.5, seed=seed, groups=groups)
        held = {groups[i] for i in val.tolist()}
        assert held and not held & {"a0", "a1", "a2"}
        assert not held & {groups[i] for i in train.tolist()}
    plain = [f"k{i}" for i in range(12)]  # no key under two classes: the same draws as without keys
    assert [t.tolist() for t in stratified_split(targets, 0.5, seed=3, groups=plain)] == [
        t.tolist() for t in stratified_split(targets, 0.5, seed=3)
    ]


def test_the_automatic_hold_out_takes_its_share_of_each_class_up_to_its_cap():
    # 10 % of a class, at most AUTO_VAL_MAX_PER_CLASS: Fashion-MNIST's 6 000 a class held out 50, not 600, and a
    # small class gives one
    from freezetune.config.options import AUTO_VAL_FRACTION, AUTO_VAL_MAX_PER_CLASS

    targets = torch.tensor([0] * 2000 + [1] * 200 + [2] * 5)
    _, val = stratified_split(targets, AUTO_VAL_FRACTION, seed=0, max_per_class=AUTO_VAL_MAX_PER_CLASS)
    held = torch.bincount(targets[val], minlength=3).tolist()
    assert held == [AUTO_VAL_MAX_PER_CLASS, 20, 1]


def test_a_class_between_trained_labels_without_a_training_image_is_named(tmp_path, caplog):
    # IDX labels 0-9 but 5: a 10-class head trained with class 5 never seen, and the only warning said "a class of one
    # training image gives none"
    root = tmp_path / "idx"
    root.mkdir()
    for prefix, labels in (("train", [c for c in range(10) if c != 5] * 3), ("t10k", list(range(10)))):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", np.zeros((len(labels), 8, 8)), True)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.array(labels), True)
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        build_datasets(str(root), preprocess=PRE)
    assert (
        "has no training images of class(es) '5', among labels up to '9': the model trains against them" in caplog.text
    )
    assert "relabel the kept classes 0, 1, ..." in caplog.text and "a class of one" not in caplog.text
    caplog.clear()  # a subset of the digits (labels 0 and 1, the default names up to 9): no gap, but ten classes
    write_idx(root / "train-labels-idx1-ubyte.gz", np.array([0, 1] * 14 + [0]), True)
    write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((29, 8, 8)), True)
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        assert len(build_datasets(str(root), preprocess=PRE).classes) == 10
    assert "no training images of class" not in caplog.text
    # which a user with two labels did not expect (a 10-class head, a 10x10 confusion matrix, top-5 100 %), in silence
    assert (f"has training labels up to 1 and no classes.txt: the model takes its 10 default class names ('0', '1', "
            f"'2'...), 8 of them never trained; name the classes of labels 0 to 1, one a line, in {root}/classes.txt"
            ) in caplog.text  # fmt: skip
    caplog.clear()
    (root / "classes.txt").write_text("no\nyes\n")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.array([0, 1] * 5), True)
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        assert build_datasets(str(root), preprocess=PRE).classes == ["no", "yes"]
    assert "default class names" not in caplog.text


def test_split_folders_inside_class_folders_are_refused_with_the_way_out(tmp_path, caplog):
    # a dataset one folder too deep was "training images of 1 class ('ds')"; one split per class (cat/test/) trained
    # on its test images as the class's, in silence
    for split in ("train", "val", "test"):
        make_folder(tmp_path / "wrapped" / "ds" / split, 2)
    with pytest.raises(DataError, match=r"holds one folder, 'ds', and it holds split folders \(test/, train/, val/\): "
                                        r"give --data .*wrapped/ds$"):  # fmt: skip
        build_datasets(str(tmp_path / "wrapped"), preprocess=PRE)
    for split in ("train", "test"):
        for name, rgb in COLOURS.items():
            (tmp_path / "percls" / name / split).mkdir(parents=True)
            Image.new("RGB", (20, 24), rgb).save(tmp_path / "percls" / name / split / "0.png")
    with pytest.raises(DataError, match=r"3 of the 3 class folders of .* hold split folders .*test images included"):
        build_datasets(str(tmp_path / "percls"), preprocess=PRE)
    make_folder(tmp_path / "some", 2)  # one class with a subfolder of that name: a warning, and it trains
    make_folder(tmp_path / "some" / "red" / "dev", 1)
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        assert len(build_datasets(str(tmp_path / "some"), preprocess=PRE).classes) == 3
    assert "1 of the 3 class folders of" in caplog.text and "/train/<class>/" in caplog.text


def test_the_held_out_validation_never_splits_one_image_or_text_between_train_and_val(tmp_path):
    # a CSV listing each file twice (oversampling), and byte-identical copies under other names: the held-out
    # validation took one copy and trained on the other, so its score was on images the model had seen
    make_folder(tmp_path / "imgs", 10)
    rows = [f"imgs/{c}/{i}.png,{c}" for c in COLOURS for i in range(10) for _ in range(2)]
    for c in COLOURS:
        for i in range(3):
            shutil.copyfile(tmp_path / "imgs" / c / f"{i}.png", tmp_path / "imgs" / c / f"copy{i}.png")
            rows.append(f"imgs/{c}/copy{i}.png,{c}")
    (tmp_path / "twice.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    for val_split in (None, 0.3):
        b = build_datasets(str(tmp_path / "twice.csv"), val_split=val_split, preprocess=PRE)
        content = {p: Path(p).read_bytes() for p, _ in b.train.samples + b.val.samples}
        seen = {content[p] for p, _ in b.train.samples}
        assert len(b.val) > 0 and not [p for p, _ in b.val.samples if content[p] in seen]
        assert len(b.train) + len(b.val) == len(rows)
    few = build_datasets(str(tmp_path / "twice.csv"), per_class=5, val_split=0.2, preprocess=PRE)
    for c in range(3):  # five images a class, each with both of its listings (14 distinct for 15 slots, before)
        assert len({Path(p).read_bytes() for p, y in few.train.samples if y == c}) == 5
    words = ["good", "good ", "bad", "fine", "nice", "poor", "ok", "awful"] * 3
    texts = TextDataset(words, torch.tensor([int(w in ("bad", "poor", "awful")) for w in words]), ["pos", "neg"])
    train, val = hold_out(texts, 0.5, seed=0)
    assert len(val) and not {t.strip() for t in val.texts} & {t.strip() for t in train.texts}


def test_files_copied_over_others_between_two_builds_in_one_process_are_held_out_together(tmp_path):
    # a notebook: the first build found no copies and kept that answer for the same file names, so the second held out
    # one of six byte-identical files and trained on the other five
    make_folder(tmp_path / "imgs", 10)
    build_datasets(str(tmp_path / "imgs"), val_split=0.3, preprocess=PRE)
    for i in range(1, 6):
        shutil.copyfile(tmp_path / "imgs" / "red" / "0.png", tmp_path / "imgs" / "red" / f"{i}.png")
    b = build_datasets(str(tmp_path / "imgs"), val_split=0.3, preprocess=PRE)
    copies = {str(tmp_path / "imgs" / "red" / f"{i}.png") for i in range(6)}
    held = {os.path.normpath(p) for p, _ in b.val.samples} & copies
    assert held in (set(), copies), sorted(held)


# ---- transforms ---------------------------------------------------------------------------------------------------


def test_eval_transform_shape_dtype_and_normalisation():
    t = eval_transform(PRE)
    for img in (Image.new("RGB", (40, 30), (51, 102, 204)), torch.full((1, 30, 40), 102, dtype=torch.uint8)):
        x = t(img)
        assert type(x) is torch.Tensor and x.shape == (3, 16, 16) and x.dtype == torch.float32
    expected = (torch.tensor([51, 102, 204]) / 255 - 0.5) / 0.25
    assert torch.allclose(t(Image.new("RGB", (40, 30), (51, 102, 204))).mean(dim=(1, 2)), expected, atol=1e-4)
    gray = t(torch.full((1, 30, 40), 102, dtype=torch.uint8))
    assert torch.allclose(gray, torch.full_like(gray, (102 / 255 - 0.5) / 0.25), atol=1e-4)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_a_16_bit_or_float_pil_image_is_transformed_as_predict_reads_its_file(tmp_path, mode):
    # a user's Image.open(...) of a 16-bit PNG went through the resize as uint16 and a bright edge's bicubic overshoot
    # wrapped around to black; predict's load_image scales to 8 bits first, and eval_transform promises its input
    halves = np.full((64, 64), 1000, np.uint16)
    halves[:, 32:] = 65000
    image = {
        "I;16": lambda: Image.fromarray(halves),
        "I": lambda: Image.fromarray(halves).convert("I"),
        "F": lambda: Image.fromarray(halves.astype(np.float32) / 100, mode="F"),
    }[mode]()  # F: beyond [0, 1]
    path = tmp_path / ("img.png" if mode == "I;16" else "img.tif")
    image.save(path)
    pre = Preprocess(input_size=24, interpolation="bicubic", crop_pct=1.0)
    for transform in (eval_transform(pre), train_transform(pre, "light")):
        with Image.open(path) as opened:
            assert opened.mode == mode
            torch.manual_seed(0)
            mine = transform(opened)
        torch.manual_seed(0)
        assert torch.equal(mine, transform(load_image(path, pre.alpha, pre.decode_side)))


def test_a_photo_the_user_opens_is_transformed_upright_as_predict_reads_its_file(tmp_path):
    # eval_transform of Image.open(a phone photo) ignored its EXIF orientation: sideways, where predict turned it
    stripes = np.zeros((32, 48, 3), np.uint8)
    stripes[:, :16] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # stored a quarter turn off
    Image.fromarray(stripes).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    pre = Preprocess(input_size=24, crop_pct=1.0)
    with Image.open(tmp_path / "phone.jpg") as opened:
        mine = eval_transform(pre)(opened)
    assert torch.equal(mine, eval_transform(pre)(load_image(tmp_path / "phone.jpg", pre.alpha, pre.decode_side)))
    assert not torch.equal(mine, eval_transform(pre)(Image.fromarray(stripes)))  # turned, not as stored


@pytest.mark.parametrize("aug", ["none", "light", "standard"])
def test_train_presets_output(aug):
    torch.manual_seed(0)
    t = train_transform(PRE, aug)
    for img in (Image.new("RGB", (37, 23)), torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)):
        x = t(img)
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32


def test_train_light_is_random_and_none_is_not():
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    light, none = train_transform(PRE, "light"), train_transform(PRE, "none")
    assert not torch.equal(light(img), light(img))
    assert torch.equal(none(img), none(img))


def test_unknown_aug_and_interpolation_are_config_errors():
    with pytest.raises(ConfigError, match="'none', 'light', 'standard'"):
        train_transform(PRE, "heavy")
    with pytest.raises(ConfigError, match="lanczos"):
        eval_transform(Preprocess(input_size=16, interpolation="lanczos"))


# ---- loaders ------------------------------------------------------------------------------------------------------


def _labels_dataset(n: int = 40) -> InMemoryImageDataset:
    return InMemoryImageDataset(torch.zeros(n, 4, 4, dtype=torch.uint8), torch.arange(n), [str(i) for i in range(n)])


@pytest.mark.parametrize(("cpus", "workers"), [(1, 0), (2, 2), (8, 2)])
def test_image_files_on_the_cpu_get_a_worker_only_where_it_has_a_cpu_of_its_own(tmp_path, monkeypatch, cpus, workers):
    # one CPU (taskset, a one-CPU container) started one worker, which only shared the core: 26 s against 21 s
    from freezetune.data import loaders

    monkeypatch.setattr(loaders, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(loaders, "shared_memory_short", lambda: None)  # the host's /dev/shm is not this test's
    files = scan_folder(make_folder(tmp_path / "imgs", 1))
    assert loaders.default_workers(files, cuda=False) == workers
    assert loaders.default_workers(files, cuda=True) == min(4, cpus)  # the GPU computes while the worker decodes


def test_a_containers_small_shared_memory_gets_no_default_workers_and_says_so(tmp_path, monkeypatch, caplog):
    # Docker's and Kubernetes' 64 MB /dev/shm: the default two workers failed at the first batches of 224 px images,
    # a 60-line traceback, and eval had no flag to turn them off
    from freezetune.data import loaders, workers

    monkeypatch.setattr(loaders, "usable_cpus", lambda: 8)
    real = shutil.disk_usage
    monkeypatch.setattr(
        workers.shutil, "disk_usage", lambda p: real(p)._replace(free=64 << 20) if p == "/dev/shm" else real(p)
    )
    files = scan_folder(make_folder(tmp_path / "imgs", 1))
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        assert loaders.default_workers(files, cuda=False) == 0 and loaders.default_workers(files, cuda=True) == 0
    said = [r.getMessage() for r in caplog.records if "/dev/shm has 64 MiB free" in r.getMessage()]
    assert said and "--shm-size 2g" in said[0] and "--workers N" in said[0]  # (once a run: warn_once)
    assert build_loader(files, batch_size=2, train=False, workers=2).loader.num_workers == 2  # asked for: as asked


class _DiesInAWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 5:  # as the kernel's out-of-memory killer ends a worker
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(2), 0


@pytest.mark.multiprocess
def test_a_loader_worker_killed_mid_run_is_one_line_naming_the_likely_cause(monkeypatch):
    # the OOM killer ending a worker gave a 95-line traceback ("DataLoader worker (pid(s) N) exited unexpectedly"),
    # or, the batch in transit, "Connection reset by peer; files written before are intact" as if the disk had failed
    from freezetune.data.workers import dataloader, shut_down
    from freezetune.device.memory import out_of_memory_hint
    from freezetune.errors import ResourceError

    batches = iter(dataloader(_DiesInAWorker(), range(8), batch_size=2, workers=1, pin=False, persistent=False))
    try:
        with pytest.raises(ResourceError, match=r"^a data loader worker (\(pid \d+\) )?(was killed|exited|was gone).*; "
                           r"try --workers 0 or a smaller --batch-size; files written before are intact$"):  # fmt: skip
            with out_of_memory_hint(2, training=False):
                list(batches)
    finally:  # torch's SIGCHLD handler, armed while the workers are joined, raised again at a child's exit
        shut_down(batches)


def test_more_workers_than_usable_cpus_is_said_once_in_freezetunes_words(monkeypatch, caplog):
    # torch's raw UserWarning came twice an epoch, with a source line, and nothing of freezetune's
    from freezetune.data import workers

    monkeypatch.setattr(workers, "usable_cpus", lambda: 1)
    loader = build_loader(_labels_dataset(), batch_size=8, train=True, workers=2)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="freezetune"):
        warnings.simplefilter("error")  # torch's own warning fails here
        for _ in range(2):
            assert len(list(loader)) == 5
    said = [r.getMessage() for r in caplog.records if "--workers 2 is more than the 1 CPU(s)" in r.getMessage()]
    assert len(said) == 1


def test_loader_shuffle_is_seeded_and_eval_is_ordered():
    def order(seed, train=True):
        return torch.cat([y for _, y in build_loader(_labels_dataset(), batch_size=8, train=train, seed=seed)])

    assert torch.equal(order(3), order(3)) and not torch.equal(order(3), order(4))
    assert order(3, train=False).tolist() == list(range(40))
    loader = build_loader(_labels_dataset(), batch_size=8, train=True)
    assert loader.loader.num_workers == 0 and not loader.loader.pin_memory  # in-memory data on CPU: no workers
    with pytest.raises(ConfigError, match="batch_size"):
        build_loader(_labels_dataset(), batch_size=0, train=True)


@pytest.mark.multiprocess
def test_worker_augmentation_is_reproducible(tmp_path):
    root = str(make_idx_dir(tmp_path / "mnist", n_train=16))

    def first_batch():
        b = build_datasets(root, preprocess=PRE, aug="standard")
        return next(iter(build_loader(b.train, batch_size=16, train=True, workers=1, seed=5)))[0]

    assert torch.equal(first_batch(), first_batch())


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_standard_augmentation_runs_with_every_interpolation(interpolation):
    # most timm models ask for bicubic, which TrivialAugmentWide cannot apply to tensors
    t = train_transform(Preprocess(input_size=24, interpolation=interpolation), aug="standard")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):  # TrivialAugmentWide draws one op per call: enough calls to reach the geometric ones
        out = t(torch.randint(0, 256, (3, 30, 36), dtype=torch.uint8, generator=gen))
        assert out.shape == (3, 24, 24) and torch.isfinite(out).all()


# ---- data that must fail loudly, before training ---------------------------------------------------------------


def test_csv_columns_are_found_by_header_name(tmp_path, caplog):
    make_folder(tmp_path / "img", 2)
    rows = [f"img/{c}/{i}.png,{'train' if i else 'val'},{c}" for c in COLOURS for i in range(2)]
    (tmp_path / "a.csv").write_text("path,split,label\n" + "\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        b = build_datasets(str(tmp_path / "a.csv"), val_split=0.5, preprocess=PRE)
    assert b.classes == sorted(COLOURS)  # the label column, not the split column next to the path
    # ... which is not read: its val (or test) rows trained in silence (a Kaggle CSV's split column)
    assert "has a 'split' column, which freezetune does not read: every row trains" in caplog.text
    from freezetune.data.image_csv import read_csv

    caplog.clear()  # a validation or evaluation CSV's split column trains nothing: not warned of
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        read_csv(tmp_path / "a.csv", sorted(COLOURS))
    assert "split" not in caplog.text
    (tmp_path / "b.csv").write_text("label,file,class\n" + "\n".join(f"{c},img/{c}/0.png,{c}" for c in COLOURS))
    with pytest.raises(DataError, match="more than one label column"):
        build_datasets(str(tmp_path / "b.csv"), preprocess=PRE)
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="3 columns and no header"):
        build_datasets(str(tmp_path / "c.csv"), preprocess=PRE)


def test_one_class_or_an_empty_class_folder_is_refused(tmp_path):
    (tmp_path / "solo" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "solo" / "cat" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "solo" / "cat" / "b.png")
    with pytest.raises(DataError, match="1 class.*'cat'.*at least two"):
        build_datasets(str(tmp_path / "solo"), preprocess=PRE)
    make_folder(tmp_path / "gap", 2)
    (tmp_path / "gap" / "yellow").mkdir()
    with pytest.raises(DataError, match="'yellow'.*hold no images"):
        build_datasets(str(tmp_path / "gap"), preprocess=PRE)


def test_an_empty_folder_of_a_training_class_in_test_or_val_is_a_class_without_images_there(tmp_path):
    # refused ("hold no images") though the same class's folder left out of test/ was accepted
    make_folder(tmp_path / "d" / "train", 4)
    for split in ("val", "test"):
        make_folder(tmp_path / "d" / split, 1)
        shutil.rmtree(tmp_path / "d" / split / "red")
        (tmp_path / "d" / split / "red").mkdir()
    bundle = build_datasets(str(tmp_path / "d"), preprocess=PRE)
    assert len(bundle.val) == len(bundle.test) == len(COLOURS) - 1 and bundle.test.classes == bundle.train.classes
    (tmp_path / "d" / "test" / "purple").mkdir()  # not a training class: a typo, or a class the run lacks
    with pytest.raises(DataError, match="'purple'.*hold no images"):
        build_datasets(str(tmp_path / "d"), preprocess=PRE)


def _break(folder: Path) -> list[Path]:
    """Spoil two images of ``folder``: one is not an image at all, one is a PNG cut in half."""
    junk, cut = folder / "blue" / "0.png", folder / "red" / "1.png"
    junk.write_bytes(b"not an image")
    cut.write_bytes(cut.read_bytes()[:40])
    return [junk, cut]


@pytest.mark.parametrize("fmt", ["folder", "csv"])
def test_unreadable_images_are_named_before_training_or_skipped(tmp_path, fmt):
    bad = _break(make_folder(tmp_path / "img", 4))
    data = tmp_path / "img"
    if fmt == "csv":
        rows = [f"img/{c}/{i}.png,{c}" for c in COLOURS for i in range(4)]
        (tmp_path / "a.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
        data = tmp_path / "a.csv"
    with pytest.raises(
        DataError, match=r"2 of 12 training image file\(s\) cannot be read: .*0\.png.*1\.png.*--skip-bad"
    ):
        build_datasets(str(data), val_split=0.25, preprocess=PRE)
    b = build_datasets(str(data), val_split=0.25, preprocess=PRE, skip_bad=True)
    assert sorted(b.skipped) == sorted(str(p) for p in bad)
    kept = [path for ds in (b.train, b.val) for path, _ in ds.samples]
    assert len(kept) == 10 and not set(b.skipped) & set(kept)


def test_a_jpeg_cut_short_is_caught_by_the_pre_scan_though_its_header_verifies(tmp_path):
    # PIL's verify() passes a JPEG whose compressed data was cut (an interrupted download); only a decode fails, so
    # without the marker walk it would stop training mid-epoch even under --skip-bad
    rng = np.random.default_rng(0)
    make_folder(tmp_path, 0)
    for name in COLOURS:
        for i, progressive in enumerate((False, True, False)):
            pixels = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.jpg", progressive=progressive, quality=85)
    cut, cut_progressive, extended = (
        tmp_path / "red" / "0.jpg",
        tmp_path / "green" / "1.jpg",
        tmp_path / "blue" / "2.jpg",
    )
    for path in (cut, cut_progressive):
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
        with Image.open(path) as img:
            img.verify()  # what the pre-scan used to rely on
    extended.write_bytes(extended.read_bytes() + b"\x00\x00\x00\x18ftypmp42" + bytes(500))  # a motion photo's video
    with pytest.raises(DataError, match=r"2 of 9 training image file\(s\) cannot be read: .*truncated.*--skip-bad"):
        build_datasets(str(tmp_path), val_split=0.3, preprocess=PRE)
    b = build_datasets(str(tmp_path), val_split=0.3, preprocess=PRE, skip_bad=True)
    assert sorted(b.skipped) == sorted([str(cut), str(cut_progressive)])
    for path, _ in [*b.train.samples, *b.val.samples]:
        load_image(path)  # everything kept decodes, the appended video included


def test_skip_bad_leaves_out_a_jpeg_whose_compressed_data_is_corrupt(tmp_path):
    # bit rot inside the entropy-coded data: headers, markers and the end marker are sound, only the decode fails
    # ("broken data stream"), and it stopped a --skip-bad run mid-epoch; without --skip-bad the header scan is kept
    import io
    import random

    from freezetune.data.scan import image_problem

    make_folder(tmp_path, 3)
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    whole, rotten = buf.getvalue(), tmp_path / "red" / "rot.jpg"
    for seed in range(2000):  # flipped bytes in the second half of the file until one such file is made
        data, rng = bytearray(whole), random.Random(seed)
        for _ in range(5):
            data[rng.randrange(len(data) // 2, len(data) - 2)] = rng.randrange(256)
        rotten.write_bytes(data)
        if image_problem(str(rotten)) is None:
            try:
                load_image(str(rotten))
            except DataError:  # "cannot read image ...: broken data stream when reading image file"
                break
    else:
        pytest.skip("no byte flips made a JPEG whose header scan passes and whose decode fails")
    # without --skip-bad the run stops where it reads the file, mid-epoch: its line names the way out
    plain = build_datasets(str(tmp_path), val_split=0.3, preprocess=PRE)
    split = next(ds for ds in (plain.train, plain.val) if str(rotten) in [path for path, _ in ds.samples])
    with pytest.raises(DataError, match=r"broken data stream.*fix or remove the file, or pass --skip-bad"):
        split[[path for path, _ in split.samples].index(str(rotten))]
    b = build_datasets(str(tmp_path), val_split=0.3, preprocess=PRE, skip_bad=True)
    assert b.skipped == [str(rotten)]
    for path, _ in [*b.train.samples, *b.val.samples]:
        load_image(path)  # everything kept decodes


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "PNG", "WEBP", "ICO", "PPM", "HEIF"])
def test_every_format_cut_short_is_caught_by_the_pre_scan(tmp_path, fmt):
    # GIF, BMP, uncompressed TIFF and HEIC headers verify when their pixel data is cut short, as a JPEG's did
    from freezetune.data.scan import image_problem

    pixels = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    whole = tmp_path / f"whole.{fmt.lower()}"
    if fmt == "HEIF":
        _heic(whole, pixels)
    else:
        Image.fromarray(pixels).save(whole, fmt)
    assert image_problem(str(whole)) is None
    for keep in (0.5, 0.98):
        cut = tmp_path / f"cut{keep}.{fmt.lower()}"
        cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * keep)])
        assert image_problem(str(cut)) is not None, f"{fmt} cut to {keep:.0%} passed the pre-scan"


def test_copies_of_training_files_in_validation_test_or_training_itself_are_named(tmp_path, caplog):
    # a test image that is a training image in another folder inflates the test score, in silence
    make_folder(tmp_path / "d" / "train", 4)
    make_folder(tmp_path / "d" / "val", 2)
    make_folder(tmp_path / "d" / "test", 2)
    shutil.copyfile(tmp_path / "d" / "train" / "red" / "3.png", tmp_path / "d" / "test" / "red" / "copy.png")
    shutil.copyfile(tmp_path / "d" / "train" / "blue" / "0.png", tmp_path / "d" / "train" / "blue" / "again.png")
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        build_datasets(str(tmp_path / "d"), preprocess=PRE)
    # val/test images of make_folder equal the training images of the same index: 2 + 2 a class, then the copy
    assert "7 of 7 test image file(s) are byte-identical copies of training files" in caplog.text
    assert "6 of 6 validation image file(s) are byte-identical copies" in caplog.text
    assert "1 training image file(s) are byte-identical copies of other training files" in caplog.text
    assert "again.png' = '" in caplog.text and "blue/0.png'" in caplog.text
    assert "another class" not in caplog.text  # a copy within its own class


def test_a_training_image_copied_into_another_class_is_named_as_taught_as_two_classes(tmp_path, caplog):
    # it was "a copy held out for validation is scored on an image the model trained on", beside a val/ folder
    make_folder(tmp_path / "d" / "train", 4)
    make_folder(tmp_path / "d" / "val", 1)
    shutil.copyfile(tmp_path / "d" / "train" / "red" / "3.png", tmp_path / "d" / "train" / "blue" / "zz.png")
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        build_datasets(str(tmp_path / "d"), preprocess=PRE)
    assert "1 training image file(s) are byte-identical copies of training files of another class" in caplog.text
    assert "blue/zz.png' (blue)" in caplog.text and "red/3.png' (red)" in caplog.text
    assert "the same image is taught as two classes; remove it from the wrong one" in caplog.text
    assert "copies of other training files" not in caplog.text


def test_distinct_files_are_not_called_copies(tmp_path, caplog):
    make_folder(tmp_path / "d" / "train", 3)
    rng = np.random.default_rng(0)
    for name in COLOURS:
        (tmp_path / "d" / "test" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(
            tmp_path / "d" / "test" / name / "t.png"
        )
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        build_datasets(str(tmp_path / "d"), val_split=0.34, preprocess=PRE)
    assert "byte-identical" not in caplog.text


def test_pre_scan_names_the_first_few_and_counts_the_rest(tmp_path):
    make_folder(tmp_path, 4)
    for i in range(4):
        (tmp_path / "green" / f"{i}.png").write_bytes(b"")
    for i in range(2):
        (tmp_path / "blue" / f"{i}.png").write_bytes(b"GIF89a")
    with pytest.raises(DataError) as err:
        build_datasets(str(tmp_path), val_split=0.25, preprocess=PRE)
    assert "6 of 12" in str(err.value) and "and 1 more;" in str(err.value)
    assert str(err.value).count(".png' (") == 5


def test_eval_data_with_an_unreadable_image_is_refused(tmp_path):
    from freezetune.data import build_eval_dataset

    _break(make_folder(tmp_path, 2))
    with pytest.raises(
        DataError, match=r"2 of 6 evaluation image file\(s\) cannot be read.*fix or remove them, or give --skip-bad$"
    ):
        build_eval_dataset(str(tmp_path), preprocess=PRE, classes=sorted(COLOURS))


def test_an_idx_directory_missing_one_file_of_its_train_pair_names_it(tmp_path):
    # read as an image folder: "no class folders with images", the labels file never named
    root = make_idx_dir(tmp_path / "mnist")
    (root / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"holds train-images-idx3-ubyte.gz but no train-labels-idx1-ubyte\[.gz\]"):
        build_datasets(str(root), preprocess=PRE)
    from freezetune.data import build_eval_dataset  # eval reads it the same way

    with pytest.raises(DataError, match=r"holds train-images-idx3-ubyte.gz but no train-labels"):
        build_eval_dataset(str(root), preprocess=PRE, classes=[str(d) for d in range(10)])
    (root / "train-images-idx3-ubyte.gz").unlink()  # the test pair alone
    with pytest.raises(DataError, match=r"holds t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz \(the IDX "
                       r"test split\) but no train-images-idx3-ubyte\[.gz\] and train-labels"):  # fmt: skip
        build_datasets(str(root), preprocess=PRE)


def test_eval_data_given_as_an_image_file_points_to_predict(tmp_path):
    # eval --data cat.png read the PNG as a CSV: "byte 0x89 ... is not UTF-8"
    from freezetune.data import build_eval_dataset

    make_folder(tmp_path, 1)
    with pytest.raises(
        DataError,
        match="is not a CSV, TSV or JSON Lines file; .*to classify files without labels, use freezetune predict",
    ):
        build_eval_dataset(str(tmp_path / "red" / "0.png"), preprocess=PRE, classes=sorted(COLOURS))


def test_eval_refuses_class_names_the_checkpoint_does_not_have_in_every_format(tmp_path):
    from freezetune.data import build_eval_dataset

    ckpt_classes = sorted(COLOURS)
    make_folder(tmp_path / "folder", 1)
    (tmp_path / "folder" / "red").rename(tmp_path / "folder" / "purple")
    with pytest.raises(DataError, match="'purple'.*not training classes: 'blue', 'green', 'red'"):
        build_eval_dataset(str(tmp_path / "folder"), preprocess=PRE, classes=ckpt_classes)
    (tmp_path / "a.csv").write_text("label,path\nblue,folder/blue/0.png\npurple,folder/purple/0.png\n")
    with pytest.raises(DataError, match="'purple'.*not training classes: 'blue', 'green', 'red'"):
        build_eval_dataset(str(tmp_path / "a.csv"), preprocess=PRE, classes=ckpt_classes)
    idx = make_idx_dir(tmp_path / "fashion")  # ten labels, named by the directory: Fashion-MNIST's names
    with pytest.raises(DataError, match=r"label\(s\) named 'T-shirt/top', .* which the checkpoint does not know "
                                        r"\(IDX labels are positions, without .*classes.txt, named 'T-shirt/top', "
                                        r"'Trouser', 'Pullover'...\); its classes are '0', '1'.*write the checkpoint's "
                                        r"name of each label 0, 1, 2... into .*classes.txt"):  # fmt: skip
        build_eval_dataset(str(idx), preprocess=PRE, classes=[str(d) for d in range(10)])
    # more labels than the checkpoint has classes: no classes.txt would help (it was advised all the same)
    with pytest.raises(DataError, match=r"has 10 labels, 'T-shirt/top', .* among them, and the checkpoint knows 3 "
                                        r"classes \('blue', 'green', 'red'\): no naming of the labels maps one onto "
                                        r"the other; give data of the checkpoint's classes"):  # fmt: skip
        build_eval_dataset(str(idx), preprocess=PRE, classes=ckpt_classes)
    names = [f"c{d}" for d in range(10)]
    with pytest.raises(DataError, match="its classes are 'c0'"):  # same count, other names
        build_eval_dataset(str(idx), preprocess=PRE, classes=names)
    (idx / "classes.txt").write_text("\n".join(names) + "\n")
    assert build_eval_dataset(str(idx), preprocess=PRE, classes=names).classes == names
    # a checkpoint trained on a folder lists its classes alphabetically: the IDX labels are matched by name (the
    # checkpoint's list written into classes.txt, as the message said before, scored label 0 as the first name)
    alphabetical = sorted(names, key=lambda n: n[::-1])  # another order than the labels'
    ds = build_eval_dataset(str(idx), preprocess=PRE, classes=alphabetical)
    before = load_idx(idx, "test").targets
    assert ds.classes == alphabetical and [alphabetical[t] for t in ds.targets] == [names[t] for t in before]
    (idx / "classes.txt").unlink()  # Fashion-MNIST's names: 'T-shirt/top' is the folder 'T-shirt_top' a model knows
    folders = sorted(f.replace("/", "_") for f in FASHION_CLASSES)
    ds = build_eval_dataset(str(idx), preprocess=PRE, classes=folders)
    assert [folders[t] for t in ds.targets[:2]] == ["T-shirt_top", "Trouser"]
    (idx / "classes.txt").write_text("c0\nc1\n")
    with pytest.raises(DataError, match="labels up to 9 but classes.txt names 2 classes"):
        build_eval_dataset(str(idx), preprocess=PRE, classes=names)


# --- what a user's own folders look like (QA round 3) ---------------------------------------------------------------


def _tiny_split_folder(root: Path, names=("train", "val", "test"), n=3) -> Path:
    from _engine_fixtures import make_image_folder

    make_image_folder(root, train=n, val=n, test=n, size=16)
    for old, new in zip(("train", "val", "test"), names, strict=True):
        if old != new:
            (root / old).rename(root / new)
    return root


def test_val_split_beside_a_validation_folder_is_refused_not_ignored(tmp_path):
    # ignored with a warning, exit 0: the run validated on val/, not on the share of train/ the user asked for
    root = _tiny_split_folder(tmp_path / "d")
    with pytest.raises(ConfigError, match="has a validation folder of its own, which is its validation set: give "
                       r"--val-split 0.2 \(val_split=0.2\) only for data without one, not both"):  # fmt: skip
        build_datasets(str(root), val_split=0.2, preprocess=PRE)
    assert len(build_datasets(str(root), preprocess=PRE).val) == 9  # val/ as it is: 3 a class


@pytest.mark.parametrize(
    "names", [("Train", "Val", "Test"), ("training", "dev", "testing"), ("TRAIN", "valid", "Test")]
)
def test_split_folders_are_found_whatever_their_case_or_usual_name(tmp_path, names):
    # Train/ + Test/ trained a 2-class "Test vs Train" model; train/ + Val/ + Test/ ignored Val and Test in silence
    data = build_datasets(str(_tiny_split_folder(tmp_path / "d", names)), preprocess=PRE)
    assert len(data.classes) == 3 and "Train" not in data.classes
    assert len(data.val) == len(data.test) == 3 * 3 and data.val_source == "the validation folder"


def test_a_folder_of_split_folders_without_a_training_one_is_refused(tmp_path):
    root = _tiny_split_folder(tmp_path / "d")
    shutil.rmtree(root / "train")
    with pytest.raises(DataError, match=r"holds split folders \('test', 'val'\) but no training folder"):
        build_datasets(str(root), preprocess=PRE)


def test_split_folders_beside_class_folders_are_refused_not_trained_as_classes(tmp_path):
    # cat/, dog/, val/<class>/ and an unlabelled test/: classes 'cat', 'dog', 'test', 'val' trained, in silence
    root = make_folder(tmp_path / "d", 2)
    make_folder(root / "val", 1)
    (root / "test").mkdir()
    Image.new("RGB", (20, 20)).save(root / "test" / "0001.png")
    refused = (
        r"holds split folder\(s\) 'test', 'val' beside its class folders \('blue', 'green', 'red'\).* put the "
        r"class folders in .*train/ \(beside test/, val/\)"
    )
    with pytest.raises(DataError, match=refused):
        build_datasets(str(root), preprocess=PRE)


def test_a_split_folder_that_is_a_broken_link_is_refused_and_two_spellings_of_one_are_named(tmp_path, caplog):
    # a val/ link to an unmounted share: the run held validation out of train/ and scored no test split, unsaid
    root = _tiny_split_folder(tmp_path / "d")
    shutil.rmtree(root / "val")
    (root / "val").symlink_to(tmp_path / "unmounted" / "val")
    with pytest.raises(DataError, match=r"'.*val' is a link to '.*unmounted/val', which does not exist"):
        build_datasets(str(root), preprocess=PRE)
    (root / "val").unlink()
    # train/ beside Train/: one was read, nothing said which; then Train/ was read and said so, and a Train/ of fewer
    # classes failed the run on its test classes, never naming the two folders
    shutil.copytree(root / "train", root / "Train")
    with pytest.raises(DataError, match=r"has Train/ and train/: one split under two spellings; keep one"):
        build_datasets(str(root), preprocess=PRE)


@pytest.mark.parametrize("fmt", ["pgm", "ppm", "tga"])
def test_a_folder_of_netpbm_or_tga_images_is_read(tmp_path, fmt):
    # the AT&T faces (.pgm): "no class folders with images", though predict read such a file
    for c, name in enumerate(COLOURS):
        (tmp_path / name).mkdir()
        for i in range(3):  # (no image a copy of another class's: those stay in training)
            Image.new("L" if fmt == "pgm" else "RGB", (20, 24), 40 * i + 7 * c).save(tmp_path / name / f"{i}.{fmt}")
    data = build_datasets(str(tmp_path), preprocess=PRE)
    assert data.classes == sorted(COLOURS) and len(data.train) + len(data.val) == 9
    assert data.train[0][0].shape == (3, 16, 16)  # decoded, as RGB


def test_the_same_files_in_two_splits_are_refused(tmp_path):
    root = _tiny_split_folder(tmp_path / "d")
    with pytest.raises(DataError, match=r"9 of 9 validation image file\(s\) are also training files"):
        build_datasets(str(root / "train"), val_data=str(root / "train"), preprocess=PRE)
    shutil.rmtree(root / "val")
    (root / "val").symlink_to(root / "test")  # validation = test: the test score would have decided the run
    with pytest.raises(DataError, match=r"test image file\(s\) are also validation files"):
        build_datasets(str(root), preprocess=PRE)


def test_val_data_beside_a_val_folder_names_the_folder_it_leaves_out(tmp_path, caplog):
    # its val/ images were neither trained nor validated on, said nowhere
    root, other = _tiny_split_folder(tmp_path / "d"), _tiny_split_folder(tmp_path / "o")
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        build_datasets(str(root), val_data=str(other / "val"), preprocess=PRE)
    assert (
        f"'{root}' has a validation folder of its own, 'val': --val-data '{other / 'val'}' validates instead, and "
        "what 'val' holds is neither trained nor validated on" in caplog.text
    ), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        build_datasets(str(root), val_data=str(root / "val"), preprocess=PRE)
    assert "of its own" not in caplog.text


def test_a_csv_listing_an_image_under_two_labels_is_refused_and_twice_under_one_is_named(tmp_path, caplog):
    root = _tiny_split_folder(tmp_path / "d")
    rows = [f"{p},{p.parent.name}" for p in sorted((root / "train").rglob("*.png"))]
    (tmp_path / "two.csv").write_text("path,label\n" + "\n".join(rows + [rows[0].rsplit(",", 1)[0] + ",zzz"]))
    with pytest.raises(
        DataError, match=r"1 training image file\(s\) are listed with two or more labels .* as '.*', 'zzz'"
    ):
        build_datasets(str(tmp_path / "two.csv"), preprocess=PRE)
    (tmp_path / "twice.csv").write_text("path,label\n" + "\n".join(rows + rows[:2]))
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        build_datasets(str(tmp_path / "twice.csv"), preprocess=PRE)
    first = rows[0].rsplit(",", 1)[0]  # the CSV's paths are absolute
    assert f"2 training image file(s) are listed more than once (first: '{first}'" in caplog.text, caplog.text


def test_a_folder_link_into_a_sibling_class_of_the_test_split_is_refused_by_a_run_and_by_eval(tmp_path):
    # test/blue/reds -> ../red: each red test image scored once as red and once as blue, the blue score always wrong
    root = _tiny_split_folder(tmp_path / "d")
    classes = sorted(p.name for p in (root / "train").iterdir())
    one, other = classes[:2]
    (root / "test" / one / "more").symlink_to(root / "test" / other, target_is_directory=True)
    refused = rf"3 (test|evaluation) image file\(s\) are listed with two or more labels \(first: '.*' as '{one}', "
    refused += rf"'{other}'\): each is scored once as each, all but one score wrong; give each image one label"
    with pytest.raises(DataError, match=refused.replace("(test|evaluation)", "test")):
        build_datasets(str(root), preprocess=PRE)
    with pytest.raises(DataError, match=refused.replace("(test|evaluation)", "evaluation")):
        build_eval_dataset(str(root), preprocess=PRE, classes=classes)


def test_an_image_linked_twice_under_its_own_class_in_the_test_split_is_named(tmp_path, caplog):
    root = _tiny_split_folder(tmp_path / "d")
    classes = sorted(p.name for p in (root / "train").iterdir())
    first = sorted((root / "test" / classes[0]).iterdir())[0]
    (root / "test" / classes[0] / "again.png").symlink_to(first)
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        ds = build_eval_dataset(str(root), preprocess=PRE, classes=classes)
    assert len(ds) == 3 * len(classes) + 1
    assert "1 evaluation image file(s) are listed more than once" in caplog.text, caplog.text
    assert "each listing is scored once more" in caplog.text


def test_skip_bad_that_empties_a_class_is_refused(tmp_path):
    root = _tiny_split_folder(tmp_path / "d")
    for f in (root / "train" / "blue").iterdir():
        f.write_bytes(b"")
    with pytest.raises(DataError, match=r"--skip-bad left class\(es\) 'blue' without a training image"):
        build_datasets(str(root), preprocess=PRE, skip_bad=True)


@pytest.mark.parametrize("split", ["test", "val"])
def test_skip_bad_that_leaves_a_split_without_an_image_is_refused_before_training(tmp_path, split):
    # a test split all unreadable trained the whole run, then crashed scoring nothing ("compute() called before any
    # update()"); a validation split so was reported as "every class has a single training image"
    root = _tiny_split_folder(tmp_path / "d")
    for f in (root / split).rglob("*.png"):
        f.write_bytes(b"junk")
    what = {"test": "test", "val": "validation"}[split]
    with pytest.raises(DataError, match=rf"--skip-bad left no {what} image: 9 of 9 {what} image file\(s\) cannot be"):
        build_datasets(str(root), preprocess=PRE, skip_bad=True)
    with pytest.raises(DataError, match="--skip-bad left no evaluation image"):  # eval --skip-bad crashed alike
        build_eval_dataset(str(root / split), preprocess=PRE, classes=["blue", "green", "red"], skip_bad=True)


def test_a_file_name_that_is_not_utf8_trains_caches_and_is_listed(tmp_path):
    import os

    from freezetune._io import atomic_write_text
    from freezetune.data.fingerprint import cache_fingerprint

    root = _tiny_split_folder(tmp_path / "d")
    first = sorted((root / "train" / "red").iterdir())[0]
    latin = os.fsdecode(bytes(root / "train" / "red") + b"/caf\xe9.png")  # an old Latin-1 zip's name
    shutil.copy(first, latin)
    data = build_datasets(str(root), preprocess=PRE)
    assert latin in [p for p, _ in data.train.samples] and cache_fingerprint(data.train)
    assert atomic_write_text(tmp_path / "skipped.txt", latin + "\n").read_bytes().endswith(b"caf\xe9.png\n")


def test_an_image_too_large_for_pil_is_a_data_error(tmp_path, monkeypatch):
    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # past twice the limit: PIL's DecompressionBombError
    with pytest.raises(DataError, match="cannot read image .*big.png"):
        load_image(tmp_path / "big.png")


def test_a_broken_file_that_pil_fails_on_with_value_error_is_a_data_error(tmp_path):
    # a cut PPM header raises ValueError in PIL: predict and eval ended in a traceback
    (tmp_path / "bad.ppm").write_bytes(b"P6\n4 4\n255J\x00\x00\x00")
    with pytest.raises(DataError, match=r"cannot read image .*bad.ppm.*: invalid literal for int"):
        load_image(tmp_path / "bad.ppm")


def test_hidden_and_preview_folders_inside_a_class_are_not_images_of_it(tmp_path):
    root = _tiny_split_folder(tmp_path / "d")
    some = sorted((root / "train" / "red").iterdir())[0]
    for hidden in (".thumbnails", "@eaDir"):
        (root / "train" / "blue" / hidden).mkdir()
        shutil.copy(some, root / "train" / "blue" / hidden / "preview.png")
    (root / "train" / "blue" / "chrome.jfif").write_bytes(some.read_bytes())  # a JPEG extension Chrome uses
    data = build_datasets(str(root), preprocess=PRE)
    names = [Path(p).name for p, y in data.train.samples + data.val.samples if data.classes[y] == "blue"]
    assert "preview.png" not in names and "chrome.jfif" in names


def test_a_csv_header_of_other_names_is_named_as_a_header(tmp_path):
    root = _tiny_split_folder(tmp_path / "d")
    rows = [f"{p},{p.parent.name}" for p in sorted((root / "train").rglob("*.png"))]
    (tmp_path / "odd.csv").write_text("image_id,species\n" + "\n".join(rows))
    with pytest.raises(DataError, match=r"header \['image_id', 'species'\] has no image column; name exactly one of"):
        build_datasets(str(tmp_path / "odd.csv"), preprocess=PRE)


def test_a_headerless_csv_whose_first_image_is_missing_names_the_missing_file(tmp_path):
    # its first row was read as a header "with no image column", and --skip-bad could not leave the file out
    root = _tiny_split_folder(tmp_path / "d")
    rows = [f"{p},{p.parent.name}" for p in sorted((root / "train").rglob("*.png"))]
    (tmp_path / "gone.csv").write_text("\n".join([f"{root}/nope.png,blue", *rows]))
    with pytest.raises(DataError, match=r"lists 1 missing image file\(s\)"):
        build_datasets(str(tmp_path / "gone.csv"), preprocess=PRE)
    data = build_datasets(str(tmp_path / "gone.csv"), preprocess=PRE, skip_bad=True)
    assert len(data.train) + len(data.val) == len(rows)


def test_an_image_csv_with_a_caption_column_is_read_as_images(tmp_path):
    # refused as "a text CSV" for an image model because its header also named a text column
    root = _tiny_split_folder(tmp_path / "d")
    rows = [f"{p},{p.parent.name},a photo of {p.parent.name}" for p in sorted((root / "train").rglob("*.png"))]
    (tmp_path / "captions.csv").write_text("filename,label,text\n" + "\n".join(rows))
    data = build_datasets(str(tmp_path / "captions.csv"), preprocess=PRE)
    assert data.classes == ["blue", "green", "red"] and len(data.train) + len(data.val) == 9


def test_class_names_written_decomposed_by_macos_match_the_composed_ones(tmp_path):
    import unicodedata

    root = _tiny_split_folder(tmp_path / "d")
    for split, form in (("train", "NFC"), ("val", "NFD"), ("test", "NFD")):
        (root / split / "red").rename(root / split / unicodedata.normalize(form, "café"))
    data = build_datasets(str(root), preprocess=PRE)  # it said "'café' ... are not training classes: 'café', ..."
    assert len(data.classes) == 3 and len(data.val) == len(data.test) == 9


def test_labels_that_differ_only_in_case_or_number_format_are_named(tmp_path, caplog):
    root = _tiny_split_folder(tmp_path / "d")
    files = sorted((root / "train").rglob("*.png"))
    labels = ["1.0", "2.0", "10.0", "Cat", "cat", "01", "1", "2.0", "10.0"]
    (tmp_path / "l.csv").write_text("path,label\n" + "\n".join(f"{f},{y}" for f, y in zip(files, labels, strict=True)))
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        data = build_datasets(str(tmp_path / "l.csv"), preprocess=PRE)
    assert "'Cat' / 'cat'" in caplog.text and "'01' / '1' / '1.0'" in caplog.text and "'2.0' /" not in caplog.text
    assert len(data.classes) == 7  # each is still a class: the warning names them, it does not merge them


def test_a_macos_resource_fork_folder_is_not_a_class(tmp_path):
    root = _tiny_split_folder(tmp_path / "d")
    shutil.copytree(root / "train" / "red", root / "train" / "__MACOSX")
    assert build_datasets(str(root), preprocess=PRE).classes == ["blue", "green", "red"]


def test_symlinked_folders_inside_a_class_are_followed_and_loose_images_named(tmp_path, caplog):
    root = _tiny_split_folder(tmp_path / "d")
    shutil.copytree(root / "test" / "blue", tmp_path / "elsewhere")
    (root / "train" / "blue" / "more").symlink_to(tmp_path / "elsewhere")  # 3 more blue images, kept elsewhere
    (root / "train" / "blue" / "loop").symlink_to(root / "train" / "blue")  # a link back up the tree: walked once
    shutil.copy(next((root / "train" / "red").iterdir()), root / "train" / "stray.png")
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        data = build_datasets(str(root), preprocess=PRE)
    blue = [p for p, y in data.train.samples if data.classes[y] == "blue"]  # val/ holds the validation images
    assert len(blue) == 6  # a symlinked folder was not followed (Python 3.11's rglob)
    assert "1 image file(s) lie outside the class folders" in caplog.text


def test_a_process_that_leaves_a_loader_open_still_exits(tmp_path):
    # loader workers that ignored every SIGTERM (so that one sent to the process group could not kill them before the
    # main process saved its step) also ignored the one their own process sends at exit: it waited for them forever
    import subprocess
    import sys

    script = ("import torch; from freezetune.data import build_loader; "
              "from freezetune.data.idx import InMemoryImageDataset; "
              "ds = InMemoryImageDataset(torch.zeros(8, 4, 4, dtype=torch.uint8), torch.arange(8) % 2, ['a', 'b']); "
              "it = iter(build_loader(ds, batch_size=2, train=True, workers=2)); next(it); print('left open')")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "left open", proc.stderr[-2000:]


@pytest.mark.parametrize("start", ["fork", "forkserver"])  # forkserver: Python 3.14's default on Linux
def test_a_loader_worker_dies_of_its_main_processs_sigterm_whatever_started_it(start):
    # a worker dies of a SIGTERM from the process that made the loader (sent at exit to a worker still alive: one
    # that lived through it kept the exit waiting forever). It took its parent for that process; under forkserver
    # its parent is the fork server. (There a thread torch starts before the worker's init does not block the
    # signal: the worker dies of SIGTERM's default action, -15, and so of a stranger's too.)
    import subprocess
    import sys

    script = (f"import multiprocessing as mp, os, signal, torch\nif __name__ == '__main__':\n"
              f"    mp.set_start_method({start!r})\n"
              "    from freezetune.data import build_loader\n    from freezetune.data.idx import InMemoryImageDataset\n"
              "    ds = InMemoryImageDataset(torch.zeros(8, 4, 4, dtype=torch.uint8), torch.arange(8) % 2, ['a', 'b'])\n"
              "    loader = build_loader(ds, batch_size=2, train=True, workers=1); it = iter(loader); next(it)\n"
              "    (worker,) = it._workers\n    os.kill(worker.pid, signal.SIGTERM)\n"
              "    try:\n        worker.join(timeout=20)\n    except RuntimeError:\n        pass  # torch's SIGCHLD handler\n"
              "    print(worker.exitcode, flush=True); os._exit(0)\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    died = {"143"} if start == "fork" else {"143", "-15"}
    assert proc.returncode == 0 and proc.stdout.strip() in died, proc.stderr[-2000:]


def test_a_second_build_of_the_same_folder_scans_only_files_that_changed_or_failed(tmp_path, monkeypatch):
    # the auto recipe builds its data once a trial and once for its run: each build scanned every file again (70 000
    # files, 12-17 s each time)
    import os

    from freezetune.data import scan

    root = _tiny_split_folder(tmp_path / "d")
    real, scanned = scan._looked_at, []
    monkeypatch.setattr(scan, "_looked_at", lambda path, decode=False: scanned.append(path) or real(path, decode))
    build_datasets(str(root), preprocess=PRE)
    first = len(scanned)
    assert first == len(list(root.rglob("*.png")))
    changed = next((root / "train").rglob("*.png"))
    os.utime(changed, ns=(1, 1))  # touched: scanned again
    broken = next((root / "test").rglob("*.png"))
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.raises(DataError, match="1 of 9 test image file"):
        build_datasets(str(root), preprocess=PRE)
    assert sorted(scanned[first:]) == sorted([str(changed), str(broken)])
    with pytest.raises(DataError, match="1 of 9 test image file"):  # a broken file is never taken for sound
        build_datasets(str(root), preprocess=PRE)


def test_a_spawned_loader_worker_drops_pils_raw_decompression_bomb_warning(tmp_path):
    # the command line's filter reached forked workers only: spawned ones (macOS, Windows) and forkserver ones
    # (Linux from Python 3.14) printed PIL's warning and its source line, each
    import subprocess
    import sys

    Image.new("1", (9500, 9500)).save(tmp_path / "scan.png")  # 90 megapixels, 11 kB
    script = (
        "import os, sys\n"
        "from PIL import Image\n"
        "from freezetune.data.workers import _seed_worker\n"
        "_seed_worker(0, main=os.getpid())\n"
        "Image.open(sys.argv[1]).close()\n"
        "print('read')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "scan.png")], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == "read\n", proc.stderr
    assert "DecompressionBomb" not in proc.stderr, proc.stderr


def test_a_spawned_worker_leaving_as_its_last_batch_is_sent_exits_cleanly():
    # a worker stopped mid-batch (a Ctrl-C as spawned workers start) puts the batch and exits at once; its queue's
    # feeder thread, copying the batch into shared memory without the GIL, was ended by the interpreter's
    # finalization inside torch's C++ frame: "terminate called without an active exception", the worker aborted
    import subprocess
    import sys

    script = (
        "import os, sys, time, torch\n"
        "from freezetune.data.workers import _seed_worker\n"
        "_seed_worker(0, main=os.getpid())\n"
        "queue = torch.multiprocessing.get_context('spawn').Queue()\n"
        "queue.put(torch.ones(16 * 2**20))  # 64 MB in plain memory: the feeder copies it into shared memory\n"
        "queue.cancel_join_thread(); queue.close()  # as torch's worker loop leaves\n"
        "time.sleep(0.005)  # the feeder starts the copy\n"
        "sys.exit(0)  # as multiprocessing.spawn ends a spawned worker: the interpreter is finalized\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr


def test_eval_of_a_folder_of_split_folders_without_train_reads_its_test_or_val_folder(tmp_path, caplog):
    # d/test/ alone was read as a class named "test": "rename them to a training class, or move them out of it"
    from freezetune.data import build_eval_dataset

    make_folder(tmp_path / "d" / "val", 1)
    make_folder(tmp_path / "d" / "test", 2)
    (tmp_path / "d" / "__MACOSX").mkdir()  # an unzipped macOS archive's, beside them
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        ds = build_eval_dataset(str(tmp_path / "d"), preprocess=PRE, classes=sorted(COLOURS))
    assert ds.source == f"the test/ folder of {tmp_path / 'd'}" and len(ds) == 6
    assert "test/ is read" not in caplog.text  # the usual layout: every eval warned "has test/ and val/"
    make_folder(tmp_path / "d" / "Validation", 1)  # two names of one split: which one is read is worth a word
    os.rename(tmp_path / "d" / "test", tmp_path / "x")
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        assert len(build_eval_dataset(str(tmp_path / "d"), preprocess=PRE, classes=sorted(COLOURS))) == 3
    assert "val/ and Validation/: val/ is read, Validation/ not" in caplog.text, caplog.text
    make_folder(tmp_path / "v" / "Valid", 1)
    assert len(build_eval_dataset(str(tmp_path / "v"), preprocess=PRE, classes=sorted(COLOURS))) == 3
    make_folder(tmp_path / "t" / "test", 1)  # a model with a class named "test" reads it as that class
    ds = build_eval_dataset(str(tmp_path / "t"), preprocess=PRE, classes=["blue", "test"])
    assert ds.source == f"every image under {tmp_path / 't'}"


def test_a_share_of_an_epoch_draws_two_images_where_one_would_be_a_batch_of_one():
    # the auto recipe's half-epoch trial of a set of 2 training images drew 1: a batch of one, which BatchNorm cannot
    # train ("give more --epoch-images", a flag the user never gave)
    from freezetune.data.loaders import EpochOrder, epoch_share

    drawn = [len(EpochOrder(n, shuffle=True, batch_size=32, fraction=epoch_share(n, 0.5, None))) for n in (2, 3, 10)]
    assert drawn == [2, 2, 5]
    assert epoch_share(1, 0.5, None) == 1.0  # all there is: one
    assert epoch_share(10, 1.0, 1) == 0.1  # --epoch-images 1 is the user's to ask


def test_idx_labels_past_the_training_classes_or_below_zero_are_refused_before_training(tmp_path):
    # a t10k label of 11 beside training labels 0-9 stopped the run after it trained ("label 11 is outside
    # num_classes"); a negative one ended in torch's bincount traceback
    import gzip
    import struct

    from freezetune.data.layout import check_test_split

    root = make_idx_dir(tmp_path / "mnist", n_train=20, n_test=12)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(12), True)
    for check in (lambda: check_test_split(str(root)), lambda: build_datasets(str(root), preprocess=PRE)):
        with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz' has labels up to 11, and the training split "
                                            r"has 10 classes \(0 to 9\)"):  # fmt: skip
            check()
    signed = struct.pack(">BBBB", 0, 0, 0x09, 1) + struct.pack(">I", 20) + np.array([-1] + [0] * 19, np.int8).tobytes()
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(signed))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz' holds the label -1: labels are class indices"):
        build_datasets(str(root), preprocess=PRE, final_test=False)


def test_a_long_check_of_image_files_is_said_before_it_starts_once_a_process(tmp_path, monkeypatch):
    # 60 000 files took 17 s to check, and the run printed nothing from its start; the auto recipe's later trials,
    # which find the files checked already, say nothing
    from freezetune.data import scan

    monkeypatch.setattr(scan, "SCAN_SAID", 4)
    ds = scan_folder(make_folder(tmp_path / "f", 2))
    lines = []
    scan.check_splits([(ds, "training"), (None, "test")], skip_bad=False, say=lines.append)
    assert lines == [f"data: checking {len(ds)} training image files before training (each one's headers read: a "
                     "broken file is named now, not mid-training)"]  # fmt: skip
    scan.check_splits([(ds, "training")], skip_bad=False, say=lines.append)
    assert len(lines) == 1
    small = scan_folder(make_folder(tmp_path / "g", 1))  # fewer than SCAN_SAID: a moment, not said
    scan.check_splits([(small, "training")], skip_bad=False, say=lines.append)
    assert len(lines) == 1
