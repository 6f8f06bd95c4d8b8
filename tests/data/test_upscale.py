"""Images far smaller than the model's input: a CPU run says what resizing them up costs, before it trains."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from _engine_fixtures import make_image_folder, recipe_cfg
from freezetune.data.folder import scan_folder
from freezetune.data.idx import InMemoryImageDataset
from freezetune.data.upscale import typical_side, upscale_note
from freezetune.training.trainer import Trainer

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _in_memory(h: int, w: int) -> InMemoryImageDataset:
    return InMemoryImageDataset(torch.zeros(3, h, w, dtype=torch.uint8), torch.tensor([0, 1, 0]), ["a", "b"])


def test_28_px_images_at_224_on_a_cpu_are_noted_with_what_they_cost():
    # Fashion-MNIST at EfficientNet-Lite0's 224 px: 64x the pixels, hours on a CPU, and nothing said why
    note = upscale_note(_in_memory(28, 28), 224, CPU)
    assert note == ("note: the training images are 28 px on their shorter side, resized up to the model's input of "
                    "224 px: 64x their pixels, and about that much more compute a step on this CPU; --img-size sets "
                    "the input size (smaller trains faster, and may score lower)")  # fmt: skip
    assert upscale_note(_in_memory(28, 40), 56, CPU) is not None  # twice the shorter side: 4x the pixels
    assert upscale_note(_in_memory(28, 40), 55, CPU) is None
    assert upscale_note(_in_memory(28, 28), 224, CUDA) is None  # a GPU's steps are fast: not worth a word


def test_an_image_folders_side_is_the_median_of_its_sampled_headers(tmp_path):
    root = tmp_path / "imgs"
    for i, (h, w) in enumerate([(20, 30), (24, 24), (30, 28), (100, 90), (25, 60)]):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    ds = scan_folder(root)
    assert typical_side(ds) == 25  # shorter sides 20, 24, 28, 90, 25
    (root / "c0" / "0.png").write_bytes(b"not an image")  # the pre-scan names broken files: skipped here
    assert typical_side(ds) == 28
    assert typical_side([("a", 0)]) is None  # not an image dataset


def test_a_run_at_the_models_input_size_notes_the_upscale_before_it_builds_anything(tmp_path):
    data = make_image_folder(tmp_path / "images", train=6, val=2, test=0, size=40)  # test_efficientnet's input: 160
    lines = []
    Trainer(recipe_cfg(data, tmp_path / "run", img_size=None, epochs=1, freeze="backbone"), echo=lines.append)
    (note,) = [i for i, line in enumerate(lines) if line.startswith("note: the training images are 40 px")]
    assert "160 px: 16x their pixels" in lines[note]
    assert all(not line.startswith("feature cache") for line in lines[:note])
    lines.clear()
    Trainer(recipe_cfg(data, tmp_path / "asked", img_size=160, epochs=1, freeze="backbone"), echo=lines.append)
    assert not any(line.startswith("note: the training images") for line in lines)  # --img-size chosen: no note


def test_an_auto_run_notes_the_upscale_once_not_in_its_trials_and_run_both(tmp_path):
    import freezetune as ft

    data = make_image_folder(tmp_path / "images", train=6, val=2, test=0, size=40)
    lines = []
    ft.train(recipe_cfg(data, tmp_path / "run", img_size=None, epochs=1), echo=lines.append)
    assert sum("note: the training images are 40 px" in line for line in lines) == 1, lines
