"""Device input pipelines (``freezetune.data.gpu``), exercised on the CPU device: the same code runs on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision.transforms.v2 import functional as TF

from freezetune.data import (
    FileImageDataset,
    InMemoryImageDataset,
    augment,
    build_loader,
    eval_transform,
    gpu,
    load_image,
)
from freezetune.data.gpu import (
    DeviceImageLoader,
    DeviceJpegLoader,
    build_device_loader,
    should_use_device_loader,
)
from freezetune.data.loaders import EpochOrder, Loaders
from freezetune.device.distributed import DistInfo
from freezetune.errors import ConfigError, DataError
from freezetune.model.preprocess import Preprocess

PRE = Preprocess(input_size=32)


def smooth_images(n: int, h: int, w: int, channels: int | None = 3, seed: int = 0) -> torch.Tensor:
    """Natural-looking uint8 images (smooth waves with random phases), ``[n, h, w, c]`` or ``[n, h, w]``."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    c = channels or 1
    phase = torch.rand(n, c, 1, 1, generator=g) * 6.28
    freq = 2 + 6 * torch.rand(n, c, 1, 1, generator=g)
    img = 127.5 + 127.5 * torch.sin(freq * xx + 0.7 * freq * yy + phase)
    img = img.round().to(torch.uint8).permute(0, 2, 3, 1)
    return img.contiguous() if channels else img[..., 0].contiguous()


def dataset(images: torch.Tensor) -> InMemoryImageDataset:
    n = len(images)
    return InMemoryImageDataset(images, torch.arange(n) % 5, [str(i) for i in range(5)])


def one_batch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(loader))


def normalised_bounds(pre: Preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


@pytest.mark.parametrize("shape", [(10, 28, 28), (10, 20, 24, 3)])
@pytest.mark.parametrize(("train", "aug"), [(False, "none"), (True, "none"), (True, "light"), (True, "standard")])
def test_in_memory_batches_have_model_input_shape(shape, train, aug):
    ds = dataset(torch.randint(0, 256, shape, dtype=torch.uint8))
    loader = DeviceImageLoader(ds, batch_size=4, train=train, device="cpu", preprocess=PRE, aug=aug)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert y.dtype == torch.long and torch.isfinite(x).all()


@pytest.mark.parametrize(
    ("shape", "pre", "tol"),
    [
        ((6, 28, 28), Preprocess(input_size=32), 0.02),  # upsample, grayscale
        ((6, 300, 200, 3), Preprocess(input_size=64, crop_pct=0.9), 0.02),  # antialiased downsample, portrait
        ((6, 37, 53, 3), Preprocess(input_size=96, interpolation="bicubic"), 0.05),
        ((6, 64, 64, 1), Preprocess(input_size=48, interpolation="nearest"), 1e-5),
        # a model that reads BGR (MobileViT), unnormalised: the channels reversed on both paths
        ((6, 40, 40, 3), Preprocess(input_size=32, mean=(0, 0, 0), std=(1, 1, 1), channel_order="BGR"), 0.005),
    ],
)
def test_eval_geometry_matches_cpu_eval_transform(shape, pre, tol):
    # The CPU pipeline resizes uint8 (rounding, and for bicubic clamping between its two 1-D passes); the device
    # loader resizes float in one pass and rounds: on natural images at most ~1 grey level apart (0.0175 normalised).
    ds = dataset(smooth_images(shape[0], shape[1], shape[2], shape[3] if len(shape) == 4 else None))
    x, y = one_batch(DeviceImageLoader(ds, batch_size=6, train=False, device="cpu", preprocess=pre))
    tf = eval_transform(pre)
    ref = torch.stack([tf(ds[i][0]) for i in range(6)])
    assert x.shape == ref.shape
    assert (x - ref).abs().max() < tol
    assert y.tolist() == ds.targets[:6].tolist()


def test_train_crops_are_drawn_per_sample():
    ds = dataset(smooth_images(1, 40, 40).expand(16, -1, -1, -1).contiguous())
    light, _ = one_batch(DeviceImageLoader(ds, batch_size=16, train=True, device="cpu", preprocess=PRE, aug="light"))
    diffs = [(light[i] - light[j]).abs().max().item() for i in range(16) for j in range(i)]
    assert min(diffs) > 1e-3  # no two copies of the image got the same crop
    none, _ = one_batch(DeviceImageLoader(ds, batch_size=16, train=True, device="cpu", preprocess=PRE, aug="none"))
    assert torch.equal(none, none[:1].expand_as(none))


def test_random_crop_keeps_orientation_and_flips_some():
    # A left-to-right ramp: every crop must still be monotonic along x, increasing unless the sample was flipped.
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8).expand(32, 48, 64).contiguous()
    x, _ = one_batch(
        DeviceImageLoader(dataset(ramp), batch_size=32, train=True, device="cpu", preprocess=PRE, aug="light")
    )
    dx = x[:, 0, :, 1:] - x[:, 0, :, :-1]
    increasing, decreasing = (dx >= -1e-5).flatten(1).all(1), (dx <= 1e-5).flatten(1).all(1)
    assert (increasing | decreasing).all()
    assert increasing.any() and decreasing.any()
    assert torch.allclose(x[:, :, :1], x[:, :, 1:2], atol=1e-5)  # constant along y: no rotation crept in


@pytest.mark.parametrize("canvas", [False, True])
def test_warp_matches_torchvision_resized_crop(canvas):
    # Checks the affine coordinate convention on non-square images and boxes, also through the JPEG loader's
    # squash-to-canvas step (boxes stay in original pixels). Only the interior is compared: near a box edge the warp
    # reads the neighbouring pixels where resized_crop repeats the edge.
    aug = augment.BatchAugment(Preprocess(input_size=48), "light", torch.device("cpu"))
    img = smooth_images(1, 30, 40).permute(0, 3, 1, 2).float()
    boxes = torch.tensor([[3.0, 5.0, 20.0, 12.0], [0.0, 10.0, 30.0, 25.0], [6.0, 0.0, 16.0, 40.0]])
    flip = torch.tensor([False, True, False])
    src = augment.resize(img, (aug.canvas, aug.canvas), "bilinear") if canvas else img
    out = aug.warp(src.expand(3, -1, -1, -1), torch.tensor([[30.0, 40.0]]).expand(3, 2), boxes, flip)
    for sample, (top, left, h, w), flipped in zip(out, boxes.int().tolist(), flip, strict=True):
        ref = TF.resized_crop(img[0], top, left, h, w, [48, 48], antialias=True)  # upsampling: no antialias effect
        ref = ref.flip(-1) if flipped else ref
        # in grey levels of 255; the canvas adds one more resampling
        assert (sample - ref)[:, 2:-2, 2:-2].abs().max() < (1.5 if canvas else 0.01)


def test_setting_the_epoch_replays_it():
    ds = dataset(smooth_images(12, 30, 30))
    loader = DeviceImageLoader(ds, batch_size=5, train=True, device="cpu", preprocess=PRE, aug="standard")

    def epoch(seed: int):
        loader.set_epoch(seed)
        return list(loader)

    first, again, other = epoch(7), epoch(7), epoch(8)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], other[0][0])


def test_shuffle_visits_every_image_once_per_epoch():
    n = 23
    ds = InMemoryImageDataset(torch.zeros(n, 8, 8, dtype=torch.uint8), torch.arange(n), [str(i) for i in range(n)])
    train = DeviceImageLoader(ds, batch_size=4, train=True, device="cpu", preprocess=PRE, aug="none")
    seen = torch.cat([y for _, y in train])
    assert sorted(seen.tolist()) == list(range(n)) and seen.tolist() != list(range(n))
    assert torch.cat([y for _, y in train]).tolist() != seen.tolist()  # the next epoch draws a new order
    evaluation = DeviceImageLoader(ds, batch_size=4, train=False, device="cpu", preprocess=PRE)
    assert torch.cat([y for _, y in evaluation]).tolist() == list(range(n))


def test_epoch_order_matches_the_cpu_loader_for_the_same_seed():
    # switching --decode gpu/cpu (or turning the feature cache on) must not change which images share a batch
    n = 23
    ds = InMemoryImageDataset(torch.zeros(n, 8, 8, dtype=torch.uint8), torch.arange(n), [str(i) for i in range(n)])
    device = DeviceImageLoader(ds, batch_size=4, train=True, device="cpu", preprocess=PRE, aug="none", seed=11)
    cpu = build_loader(ds, batch_size=4, train=True, workers=0, seed=11)
    for epoch in range(2):
        for loader in (device, cpu):
            loader.set_epoch(100 + epoch)
        assert [y.tolist() for _, y in device] == [y.tolist() for _, y in cpu]


def test_ddp_shards_match_the_cpu_sharded_loader():
    # under torchrun each rank's device loader must visit the same images as the CPU loader's shard
    n = 21
    ds = InMemoryImageDataset(torch.zeros(n, 8, 8, dtype=torch.uint8), torch.arange(n), [str(i) for i in range(n)])
    seen = []
    for rank in range(2):
        info = DistInfo(rank=rank, world=2)
        kw = dict(batch_size=4, device=torch.device("cpu"), seed=3, preprocess=PRE, aug="light", workers=0, dist=info)
        device, cpu = Loaders(**kw, decode="gpu").train(ds), Loaders(**kw, decode="cpu").train(ds)
        assert isinstance(device, DeviceImageLoader) and not isinstance(cpu, DeviceImageLoader)
        for epoch in range(2):
            device.set_epoch(epoch)
            cpu.set_epoch(epoch)
            got = [y.tolist() for _, y in device]
            assert got == [y.tolist() for _, y in cpu] and len(device) == len(got) == 3
            seen.append(sum(got, []))
    assert sorted(seen[0] + seen[2]) == sorted([*range(n), seen[0][0]])  # epoch 0, both ranks: one item padded
    assert seen[0] != seen[1]  # the next epoch reshuffles


def test_unshuffled_rows_keep_dataset_order_while_augmenting():
    images = smooth_images(10, 30, 30)
    ds = dataset(images)
    loader = DeviceImageLoader(ds, batch_size=4, train=True, device="cpu", preprocess=PRE, aug="light",
                               rows=[7, 2, 5], order=EpochOrder(3, shuffle=False))  # fmt: skip
    x, y = one_batch(loader)
    assert len(loader) == 1 and y.tolist() == [7 % 5, 2 % 5, 5 % 5]
    ref, _ = one_batch(DeviceImageLoader(dataset(images[[7, 2, 5]]), batch_size=4, train=False, device="cpu",
                                         preprocess=PRE))  # fmt: skip
    assert not torch.allclose(x, ref)  # augmented, not the eval geometry


@pytest.mark.parametrize("aug", ["light", "standard"])
def test_augmented_values_stay_in_normalised_range(aug):
    ds = dataset(torch.randint(0, 256, (32, 40, 40, 3), dtype=torch.uint8))
    x, _ = one_batch(DeviceImageLoader(ds, batch_size=32, train=True, device="cpu", preprocess=PRE, aug=aug))
    lo, hi = normalised_bounds(PRE)
    inside = (x >= lo - 1e-4) & (x <= hi + 1e-4)
    if aug == "light":
        assert inside.all()
    else:  # random erasing fills boxes with N(0, 1) noise; everything else stays a valid normalised pixel
        assert inside.float().mean() > 0.8 and x.abs().max() < 8
        assert x.std() > 0.5  # jitter did not collapse the images to a constant


def write_images(root, sizes=((40, 60), (50, 50), (64, 36)), subsampling: int = -1):
    """Class folders with JPEGs (RGB and grayscale), a PNG and a BMP; returns the FileImageDataset. ``subsampling``:
    PIL's JPEG chroma subsampling (-1: its default, 4:2:0 at quality 95; 0: 4:4:4, every pixel's colour stored)."""
    samples = []
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        arr = smooth_images(1, h, w, seed=i)[0].numpy()
        for fmt, img in (("jpg", Image.fromarray(arr)), ("png", Image.fromarray(arr)), ("bmp", Image.fromarray(arr))):
            path = root / f"c{i}" / f"img.{fmt}"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, quality=95, subsampling=subsampling) if fmt == "jpg" else img.save(path)
            samples.append((str(path), i))
    gray = root / "c0" / "gray.jpg"
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(gray)
    samples.append((str(gray), 0))
    return FileImageDataset(samples, ["c0", "c1", "c2"])


def test_jpeg_loader_eval_matches_cpu_pipeline_and_labels(tmp_path, monkeypatch):
    ds = write_images(tmp_path)
    fallback = []
    real = gpu._decode_cpu
    monkeypatch.setattr(gpu, "_decode_cpu", lambda data, path, alpha: fallback.append(path) or real(data, path, alpha))
    # batch_decode: the nvJPEG path's batched decode_jpeg call, run with the CPU decoder
    loader = DeviceJpegLoader(ds, batch_size=4, train=False, device="cpu", preprocess=PRE, threads=2, batch_decode=True)
    batches = list(loader)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert len(loader) == len(batches) == 3 and x.shape == (10, 3, 32, 32)
    assert y.tolist() == ds.targets.tolist()
    assert sorted(p.rsplit(".", 1)[1] for p in fallback) == ["bmp", "bmp", "bmp", "png", "png", "png"]
    tf = eval_transform(PRE)
    ref = torch.stack([tf(load_image(p)) for p, _ in ds.samples])
    assert (x - ref).abs().max() < 0.05  # same decoder library, float vs uint8 resize
    fallback.clear()
    plain = torch.cat([b[0] for b in DeviceJpegLoader(ds, batch_size=4, train=False, device="cpu", preprocess=PRE)])
    assert len(fallback) == len(ds)  # without batch decoding every file is decoded in the reader threads
    assert torch.equal(plain, x)


@pytest.mark.parametrize("aug", ["none", "light", "standard"])
def test_jpeg_loader_train_is_shuffled_and_reproducible(tmp_path, aug):
    ds = write_images(tmp_path)
    loader = DeviceJpegLoader(ds, batch_size=3, train=True, device="cpu", preprocess=PRE, aug=aug, threads=2)
    first = list(loader)
    loader.set_epoch(0)  # the epoch the loader started at
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    labels = torch.cat([y for _, y in first])
    assert sorted(labels.tolist()) == sorted(ds.targets.tolist())
    assert all(x.shape[1:] == (3, 32, 32) and torch.isfinite(x).all() for x, _ in first)


def test_jpeg_loader_names_an_unreadable_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    loader = DeviceJpegLoader(FileImageDataset([(str(bad), 0)], ["a"]), batch_size=2, train=False, device="cpu",
                              preprocess=PRE)  # fmt: skip
    with pytest.raises(DataError, match="broken.jpg"):
        list(loader)
    # batch decoding: the failed batch is retried file by file, and the bad file is still named
    good = tmp_path / "good.jpg"
    Image.fromarray(smooth_images(1, 20, 20)[0].numpy()).save(good)
    both = FileImageDataset([(str(good), 0), (str(bad), 0)], ["a"])
    batched = DeviceJpegLoader(both, batch_size=2, train=False, device="cpu", preprocess=PRE, batch_decode=True)
    with pytest.raises(DataError, match="broken.jpg"):
        list(batched)
    missing = DeviceJpegLoader(FileImageDataset([(str(tmp_path / "gone.png"), 0)], ["a"]), batch_size=2,
                               train=False, device="cpu", preprocess=PRE)  # fmt: skip
    with pytest.raises(DataError, match="gone.png"):
        list(missing)


def test_should_use_device_loader_follows_decode_setting():
    mem = dataset(torch.zeros(4, 8, 8, dtype=torch.uint8))
    files = FileImageDataset([("a.jpg", 0)], ["a"])
    other = TensorDataset(torch.zeros(2, 3))
    assert should_use_device_loader(mem, "cuda", "auto") and should_use_device_loader(files, "cuda:0", "auto")
    assert not should_use_device_loader(mem, "cpu", "auto") and not should_use_device_loader(other, "cuda", "auto")
    assert should_use_device_loader(files, "cpu", "gpu") and not should_use_device_loader(mem, "cuda", "cpu")
    with pytest.raises(ConfigError, match="'auto', 'gpu', 'cpu'"):
        should_use_device_loader(mem, "cpu", "fast")
    with pytest.raises(ConfigError, match="TensorDataset"):
        should_use_device_loader(other, "cpu", "gpu")


def test_build_device_loader_picks_the_loader_or_none():
    kw = dict(batch_size=2, train=True, device="cpu", seed=0, preprocess=PRE, aug="light")
    assert isinstance(build_device_loader(dataset(torch.zeros(4, 8, 8, dtype=torch.uint8)), **kw), DeviceImageLoader)
    assert isinstance(build_device_loader(FileImageDataset([("a.jpg", 0)], ["a"]), **kw), DeviceJpegLoader)
    assert build_device_loader(TensorDataset(torch.zeros(2, 3)), **kw) is None
    four_channel = dataset(torch.zeros(4, 8, 8, 4, dtype=torch.uint8))
    assert build_device_loader(four_channel, **kw) is None


@pytest.mark.parametrize(("kwargs", "match"), [({"batch_size": 0}, "batch_size"), ({"aug": "heavy"}, "'light'")])
def test_bad_options_raise_config_error(kwargs, match):
    kw = dict(batch_size=2, train=True, device="cpu", preprocess=PRE, aug="light") | kwargs
    with pytest.raises(ConfigError, match=match):
        DeviceImageLoader(dataset(torch.zeros(4, 8, 8, dtype=torch.uint8)), **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loaders_match_the_cpu_device_path(tmp_path):
    # nvJPEG + CUDA resampling must give what the tested CPU path gives (eval), and train batches live on the GPU.
    # JPEGs with every pixel's colour stored (4:4:4): nvJPEG's IDCT differs from libjpeg-turbo's by a few levels. A
    # 4:2:0 JPEG (PIL's and most cameras' default) differs more at colour edges: nvJPEG upsamples its colour planes
    # by nearest neighbour where libjpeg-turbo interpolates
    mem = dataset(smooth_images(8, 28, 28, channels=None))
    for ds, cls, limit in ((mem, DeviceImageLoader, (0.1, 0.1)),
                           (write_images(tmp_path / "444", subsampling=0), DeviceJpegLoader, (0.1, 0.1)),
                           (write_images(tmp_path / "420"), DeviceJpegLoader, (0.05, 0.5))):  # fmt: skip
        cpu_x, cpu_y = one_batch(cls(ds, batch_size=16, train=False, device="cpu", preprocess=PRE))
        gpu_x, gpu_y = one_batch(cls(ds, batch_size=16, train=False, device="cuda", preprocess=PRE))
        assert gpu_x.is_cuda and gpu_y.is_cuda and torch.equal(gpu_y.cpu(), cpu_y)
        diff = (gpu_x.cpu() - cpu_x).abs()
        assert diff.mean() < limit[0] and diff.max() < limit[1], (diff.mean(), diff.max())
        x, _ = one_batch(cls(ds, batch_size=16, train=True, device="cuda", preprocess=PRE, aug="standard"))
        assert x.is_cuda and x.shape[1:] == (3, 32, 32) and torch.isfinite(x).all()


def test_large_shrink_is_close_to_a_direct_antialiased_resize():
    # the block-average pre-shrink (which keeps CUDA's antialias kernels inside their limits) barely changes pixels
    img = smooth_images(1, 1200, 900).permute(0, 3, 1, 2).float()
    got = augment.resize(img, (40, 30), "bicubic")
    want = torch.nn.functional.interpolate(img, size=(40, 30), mode="bicubic", align_corners=False, antialias=True)
    assert got.shape == want.shape and (got - want).abs().max() < 1.0  # grey levels of 255


def test_an_axis_shrunk_far_more_than_the_other_is_block_averaged_on_its_own(monkeypatch):
    # a panorama squashed onto the training canvas: 6000 px to 64 (94x) beside 600 to 64; the blocks were sized by the
    # smaller shrink (none), and CUDA's antialias kernel holds its whole window (94 x 2 taps) in shared memory
    pooled = []
    real = torch.nn.functional.avg_pool2d
    monkeypatch.setattr(augment.F, "avg_pool2d", lambda x, k: pooled.append(k) or real(x, k))
    img = smooth_images(1, 6000, 600).permute(0, 3, 1, 2).float()
    got = augment.resize(img, (64, 64), "bicubic")
    want = torch.nn.functional.interpolate(img, size=(64, 64), mode="bicubic", align_corners=False, antialias=True)
    assert pooled == [(11, 1)] and (got - want).abs().max() < 1.0
    augment.resize(
        smooth_images(1, 1200, 900).permute(0, 3, 1, 2).float(), (40, 30), "bicubic"
    )  # both alike: as before
    assert pooled[1:] == [(3, 3)]


def test_a_16_bit_png_decodes_as_on_the_cpu_path(tmp_path):
    # torchvision decodes a 16-bit PNG to uint16; the device loader must hand on the same 8-bit pixels as load_image
    from torchvision.io import read_file

    from freezetune.data.gpu import _decode_cpu

    path = tmp_path / "ramp16.png"
    Image.fromarray(np.linspace(0, 65535, 24 * 20).reshape(24, 20).astype(np.uint16)).save(path)
    decoded = _decode_cpu(read_file(str(path)), str(path))
    assert decoded.dtype == torch.uint8
    assert torch.equal(decoded, torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1))


def test_photos_come_upright_by_their_exif_tag_on_every_decode_path(tmp_path):
    # a phone stores a photo as the sensor read it and an EXIF tag saying how to turn it; nvJPEG ignores the tag, so
    # the device loader turns each image itself: it must give what the CPU path (load_image) gives
    rng = np.random.default_rng(0)
    samples = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        for fmt in ("jpg", "png"):
            path = tmp_path / f"o{orientation}.{fmt}"
            Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(path, exif=exif)
            samples.append((str(path), orientation % 2))
    ds = FileImageDataset(samples, ["a", "b"])
    assert load_image(tmp_path / "o6.jpg").size == (24, 40)  # turned a quarter: the 40 x 24 photo stands up
    ref = torch.stack([eval_transform(PRE)(load_image(p)) for p, _ in samples])
    for batch_decode in (True, False):  # the batched decode_jpeg call of the nvJPEG path; the reader threads
        loader = DeviceJpegLoader(ds, batch_size=5, train=False, device="cpu", preprocess=PRE,
                                  batch_decode=batch_decode)  # fmt: skip
        x = torch.cat([b[0] for b in loader])
        assert (x - ref).abs().max() < 0.05  # same decoder library, float vs uint8 resize
