"""Transparent images read as a viewer shows them: composited onto white on every read path, bit for bit alike;
a checkpoint saved before the rule keeps the colours stored under transparent pixels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import read_file

import freezetune as ft
from freezetune.config.train_config import TrainConfig
from freezetune.data import (
    FileImageDataset,
    build_datasets,
    build_eval_dataset,
    eval_transform,
    load_image,
    train_transform,
)
from freezetune.data.alpha import flatten, flatten_tensor
from freezetune.data.gpu import DeviceJpegLoader, _decode_cpu
from freezetune.errors import ConfigError
from freezetune.inference.predict import predict_files
from freezetune.model.create import create_model
from freezetune.model.preprocess import Preprocess
from freezetune.run import checkpoint
from freezetune.training.trainer import Trainer, train

PRE = Preprocess(input_size=16)


def _transparent_files(folder) -> list:
    """One image of each kind of transparency, over colours a viewer never shows (random, black under alpha 0)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rgba = rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)
    rgba[:6, :, 3], rgba[:6, :, :3] = 0, 0  # a fully transparent band, black underneath (clip art's PNGs)
    rgb = np.ascontiguousarray(rgba[..., :3])
    palette = Image.fromarray(rgb, "RGB").quantize(8)
    cases = {
        "rgba.png": (Image.fromarray(rgba, "RGBA"), {}),
        "grey_alpha.png": (Image.fromarray(np.ascontiguousarray(rgba[..., [0, 3]]), "LA"), {}),
        "palette_entries.png": (palette, {"transparency": bytes([0, 128, 255, 40, 255, 255, 0, 255])}),
        "palette_index.png": (palette, {"transparency": 2}),
        "grey_key.png": (Image.fromarray(rgb[..., 0].copy(), "L"), {"transparency": int(rgb[10, 3, 0])}),
        "rgb_key.png": (Image.fromarray(rgb, "RGB"), {"transparency": tuple(int(v) for v in rgb[10, 3])}),
        "icon.gif": (palette, {"transparency": 2}),
        "sticker.webp": (Image.fromarray(rgba, "RGBA"), {"lossless": True}),
    }
    paths = []
    for name, (img, kwargs) in cases.items():
        img.save(folder / name, **kwargs)
        paths.append(folder / name)
    return paths


def _on_white(path) -> np.ndarray:
    """PIL's own compositing of the file onto opaque white: what a viewer shows."""
    with Image.open(path) as img:
        rgba = img.convert("RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB"))


def _as_stored(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray((img.convert("RGBA") if img.mode == "P" else img).convert("RGB"))


def test_every_kind_of_transparency_reads_as_on_white_and_drop_keeps_the_stored_colours(tmp_path):
    for path in _transparent_files(tmp_path):
        on_white = _on_white(path)
        assert (on_white != _as_stored(path)).any(), path  # each file has something a viewer shows otherwise
        assert np.array_equal(np.asarray(load_image(path)), on_white), path
        assert np.array_equal(np.asarray(load_image(path, alpha="drop")), _as_stored(path)), path
    opaque = tmp_path / "opaque.png"
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(opaque)
    assert np.array_equal(np.asarray(load_image(opaque)), np.full((4, 4, 3), 7, np.uint8))


def test_the_file_and_tensor_paths_composite_every_colour_and_alpha_alike():
    c, a = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    rgba = torch.stack([c, 255 - c, c // 2, a]).to(torch.uint8)  # [4, 256, 256]: every (colour, alpha) pair
    on_white = np.asarray(Image.alpha_composite(Image.new("RGBA", (256, 256), (255, 255, 255, 255)),
                                                Image.fromarray(rgba.permute(1, 2, 0).numpy(), "RGBA")).convert("RGB"))  # fmt: skip
    from_file = np.asarray(flatten(Image.fromarray(rgba.permute(1, 2, 0).numpy(), "RGBA")))
    assert np.array_equal(from_file, on_white)
    assert np.array_equal(flatten_tensor(rgba).permute(1, 2, 0).numpy(), on_white)


def test_the_device_loaders_cpu_decode_reads_transparency_as_load_image(tmp_path):
    # torchvision's RGB mode drops the alpha channel; its RGBA mode ignores a GIF's or a grey/RGB PNG's key colour
    for path in _transparent_files(tmp_path):
        for alpha in ("white", "drop"):
            got = _decode_cpu(read_file(str(path)), str(path), alpha).permute(1, 2, 0).numpy()
            assert np.array_equal(got, np.asarray(load_image(path, alpha))), (path, alpha)


def test_a_users_own_rgba_image_or_tensor_goes_through_the_transforms_as_its_file_would(tmp_path):
    # the transforms took a 4-channel PIL image to a 4-channel input and a grey+alpha one to an unpacking error
    for path in _transparent_files(tmp_path):
        with Image.open(path) as img:
            img.load()
            mode = "LA" if img.mode in ("L", "LA") else "RGBA"
            own = img.convert(mode)
        for pre in (PRE, Preprocess(input_size=16, alpha="drop")):
            tf = eval_transform(pre)
            assert torch.equal(tf(own), tf(load_image(path, pre.alpha))), (path, pre.alpha)
            tensor = torch.from_numpy(np.array(own)).reshape(own.height, own.width, -1).permute(2, 0, 1)
            assert torch.equal(tf(tensor), tf(own)), (path, pre.alpha)
            assert train_transform(pre, aug="none")(own).shape == (3, 16, 16)
    batch = torch.zeros(2, 4, 3, 3, dtype=torch.uint8)
    assert flatten_tensor(batch).shape == (2, 3, 3, 3) and bool((flatten_tensor(batch) == 255).all())
    assert torch.equal(flatten_tensor(batch.float() / 255), torch.ones(2, 3, 3, 3))


def test_the_rule_travels_with_the_model_and_an_older_checkpoint_reads_as_it_was_trained():
    assert Preprocess().alpha == "white" and Preprocess.from_dict(Preprocess().to_dict()).alpha == "white"
    older = {k: v for k, v in Preprocess().to_dict().items() if k != "alpha"}
    assert Preprocess.from_dict(older).alpha == "drop"
    with pytest.raises(ConfigError, match="unknown alpha 'black'.*'white', 'drop'"):
        eval_transform(Preprocess(alpha="black"))


def test_datasets_read_the_models_rule_in_training_evaluation_and_the_device_loader(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for name, colour in (("ink", (0, 0, 0)), ("paint", (200, 40, 40))):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                rgba = np.zeros((12, 12, 4), np.uint8)
                rgba[3:9, 3:9] = (*colour, 255)  # a shape on a transparent ground, black underneath
                Image.fromarray(rgba, "RGBA").save(folder / f"{i}.png")
    white, drop = Preprocess(input_size=12, crop_pct=1.0), Preprocess(input_size=12, crop_pct=1.0, alpha="drop")
    bundle = build_datasets(str(tmp_path), preprocess=white, aug="none", val_split=None)
    corner = bundle.train[0][0][:, 0, 0]  # normalised white: (1 - mean) / std
    assert torch.allclose(corner, (1 - torch.tensor(white.mean)) / torch.tensor(white.std))
    assert bundle.test.alpha == "white" and all(ds.alpha == "white" for ds in (bundle.train, bundle.test))
    older = build_eval_dataset(str(tmp_path), preprocess=drop, classes=["ink", "paint"])
    assert older.alpha == "drop"
    assert torch.allclose(older[0][0][:, 0, 0], -torch.tensor(drop.mean) / torch.tensor(drop.std))
    # the device loader reads a dataset as the dataset reads itself (a user's own, under another preprocessing too)
    loader = DeviceJpegLoader(older, batch_size=2, train=False, device="cpu", preprocess=white, threads=1)
    assert torch.allclose(next(iter(loader))[0][0], older[0][0], atol=1e-5)


def test_batched_selected_and_joined_reads_keep_the_datasets_rule(tmp_path):
    # eval reads a loader batch at once (__getitems__, small images grouped by size); splits select and join
    paths = _transparent_files(tmp_path)
    for alpha in ("white", "drop"):
        ds = FileImageDataset([(str(p), 0) for p in paths], ["a"], eval_transform(PRE), alpha=alpha)
        batch = ds.__getitems__(list(range(len(paths))))
        for (x, _), path in zip(batch, paths, strict=True):
            assert torch.equal(x, eval_transform(PRE)(load_image(path, alpha))), (path, alpha)
        assert ds.select(torch.tensor([0, 2])).alpha == alpha and ds.joined(ds).alpha == alpha


def test_a_users_own_image_in_any_pil_mode_goes_through_the_transforms_as_a_viewer_shows_it():
    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, (9, 9, 4), dtype=np.uint8), "RGBA")
    tf = eval_transform(PRE)
    for mode in ("PA", "RGBa", "La", "LA", "P", "CMYK"):
        own = rgba.convert(mode)
        seen = own.convert("RGB" if mode == "CMYK" else "LA" if mode == "La" else "RGBA").convert("RGBA")
        on_white = Image.alpha_composite(Image.new("RGBA", own.size, (255, 255, 255, 255)), seen).convert("RGB")
        assert torch.equal(tf(own), tf(on_white)), mode
    floats = torch.rand(2, 4, 5, 5)
    as_bytes = flatten_tensor((floats * 255).round().to(torch.uint8)).float() / 255
    assert torch.allclose(flatten_tensor(floats), as_bytes, atol=1.5 / 255)  # the float formula, not a constant


def test_the_device_loader_decodes_an_opaque_png_itself_and_a_transparent_one_as_load_image(tmp_path, monkeypatch):
    # torchvision's PNG decoder is 4-6x faster than PIL's on small images: only a PNG that may hold transparency
    # (colour type 4 or 6, or a tRNS chunk) goes to load_image
    from freezetune.data import gpu

    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    opaque = {"rgb.png": Image.fromarray(rgb), "grey.png": Image.fromarray(rgb[..., 0].copy()),
              "palette.png": Image.fromarray(rgb).quantize(4)}  # fmt: skip
    for name, img in opaque.items():
        img.save(tmp_path / name)
    keyed = tmp_path / "keyed.png"
    Image.fromarray(rgb).save(keyed, transparency=tuple(int(v) for v in rgb[0, 0]))
    read = []
    real = gpu.load_image
    monkeypatch.setattr(gpu, "load_image", lambda path, alpha: read.append(path) or real(path, alpha))
    for path in [*(tmp_path / name for name in opaque), keyed]:
        got = _decode_cpu(read_file(str(path)), str(path)).permute(1, 2, 0).numpy()
        assert np.array_equal(got, np.asarray(real(path))), path
    assert read == [str(keyed)]


def test_a_run_resumed_from_an_older_last_pt_reads_its_images_as_it_began(tmp_path):
    # a run stopped under a freezetune that dropped alpha, resumed by this one: its later epochs must not train on
    # other pixels than its first (nor its best.pt be tested on them)
    data = tmp_path / "data"
    for name in ("ink", "paint"):
        for i, path in enumerate(_transparent_files(data / "train" / name)[:4]):
            path.rename(path.with_name(f"{i}.png"))
    cfg = TrainConfig(model="timm:test_efficientnet", weights="none", data=str(data), img_size=16, epochs=1,
                      batch_size=4, freeze="-2", scheduler="none", device="cpu", out=str(tmp_path / "run"),
                      tensorboard=False, progress=False, final_test=False)  # fmt: skip
    train(cfg)
    last = checkpoint.load(tmp_path / "run" / "last.pt")
    last["preprocess"].pop("alpha")  # as a last.pt saved before the rule
    checkpoint.save(last, tmp_path / "run" / "last.pt")
    resumed = Trainer(dataclasses.replace(cfg, epochs=2, resume=True), echo=lambda line: None)
    assert resumed.preprocess.alpha == "drop" and resumed.data.train.alpha == "drop"
    resumed.fit()
    assert checkpoint.load(tmp_path / "run" / "last.pt")["preprocess"]["alpha"] == "drop"
    fresh = Trainer(dataclasses.replace(cfg, out=str(tmp_path / "fresh")), echo=lambda line: None)
    assert fresh.data.train.alpha == "white"


def test_predict_reads_an_image_by_its_checkpoints_rule(tmp_path):
    torch.manual_seed(0)
    model, _ = create_model("timm:test_efficientnet", "none")
    ft.replace_head(model, 3)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))
        model.get_classifier().weight.mul_(50)
    path = _transparent_files(tmp_path / "images")[0]
    twins = {}
    for alpha, pixels in (("white", _on_white(path)), ("drop", _as_stored(path))):
        twins[alpha] = tmp_path / f"{alpha}.png"
        Image.fromarray(pixels).save(twins[alpha])
    record = checkpoint.model_record(model, {"model": "timm:test_efficientnet"}, ["a", "b", "c"], Preprocess(32))
    new = checkpoint.save(record, tmp_path / "new.pt")
    record["preprocess"].pop("alpha")  # as every checkpoint saved before the rule
    old = checkpoint.save(record, tmp_path / "old.pt")
    for weights, alpha in ((new, "white"), (old, "drop")):
        probs = [[p["prob"] for p in predict_files(weights, [f], topk=3, device="cpu")[0]["top"]]
                 for f in (path, twins[alpha], twins["drop" if alpha == "white" else "white"])]  # fmt: skip
        assert probs[0] == pytest.approx(probs[1], abs=1e-6) and probs[0] != pytest.approx(probs[2], abs=1e-3)
