"""Input pipelines that run on the training device: decode, resize, augment and normalise whole batches there.

A CPU ``DataLoader`` transforms one image at a time in worker processes and becomes the bottleneck of a frozen-backbone
run long before the GPU does. These loaders keep the per-image CPU work to reading bytes:

- ``DeviceImageLoader``: in-memory datasets (IDX, arrays) are copied to the device once as uint8; every batch is
  indexed, resized, augmented and normalised there.
- ``DeviceJpegLoader``: image files are read by a few threads, JPEGs are decoded as one batch with nvJPEG
  (``torchvision.io.decode_jpeg(device="cuda")``), other formats are decoded on the CPU per file, then the batch goes
  through the same augmentation (``freezetune.data.augment.BatchAugment``).

Both yield ``(inputs, targets)`` on the device, with inputs float32 ``[B, 3, S, S]``, and expose ``len()`` (batches)
and a ``generator`` that seeds shuffling and augmentation, like the CPU loader. They ignore ``dataset.transform``.
On a CPU device they work too (slowly): that is how they are tested.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

from freezetune.config.options import ALPHA_DEFAULT, AUG_DEFAULT, DECODE_MODES
from freezetune.data.augment import BatchAugment, resize
from freezetune.data.folder import FileImageDataset, load_image
from freezetune.data.idx import InMemoryImageDataset
from freezetune.data.loaders import EpochOrder, check_batch_size, epoch_seed
from freezetune.data.orientation import exif_orientation, upright
from freezetune.data.workers import usable_cpus
from freezetune.device.hardware import available_device_memory
from freezetune.errors import ConfigError, DataError, choices
from freezetune.model.preprocess import Preprocess

log = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _DeviceLoader:
    """Shared batching: ``len`` in batches (last one partial), each epoch's order from ``order`` (an ``EpochOrder``:
    shuffled when training, under DDP this rank's shard), augmentation drawn from ``generator``."""

    def __init__(self, n: int, *, batch_size: int, train: bool, device, seed: int, preprocess: Preprocess, aug: str,
                 order: EpochOrder | None, rank: int = 0) -> None:  # fmt: skip
        self.n, self.batch_size, self.train = n, check_batch_size(batch_size), train
        self.order = order if order is not None else EpochOrder(n, shuffle=train, seed=seed)
        self.seed, self.rank = seed, rank
        self.device = torch.device(device)
        self.generator = torch.Generator()
        self.augment = BatchAugment(preprocess, aug if train else "none", self.device)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch's order and augmentation (a resumed run repeats both)."""
        self.order.set_epoch(epoch)
        self.generator.manual_seed(epoch_seed(self.seed, epoch, self.rank))

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def _batches(self) -> list[torch.Tensor]:
        return list(self.order.indices().split(self.batch_size))


class DeviceImageLoader(_DeviceLoader):
    """Batches of an in-memory dataset, held on ``device`` as uint8 and augmented there.

    Args:
        dataset: an ``InMemoryImageDataset`` (``images`` uint8 ``[N, H, W]`` or ``[N, H, W, C]``, C = 1 or 3).
        batch_size: images per batch; the last batch may be smaller.
        train: shuffle and apply ``aug``; else eval order and eval geometry.
        device: where the images live and the batches are produced.
        seed: initial seed of ``generator`` (the trainer reseeds it every epoch).
        preprocess: the model's input size, mean/std, interpolation and crop_pct.
        aug: augmentation preset for training, one of ``AUG_PRESETS``.
        rows: only these dataset indices, in this order (a shard); default all.
        order: each epoch's order, as positions in ``rows`` (an ``EpochOrder``; default shuffled when ``train``).
            ``EpochOrder(n, shuffle=False)`` keeps dataset order while augmenting (the feature cache's build).
        rank: the DDP rank, so ranks draw different augmentation.

    >>> ds = InMemoryImageDataset(torch.zeros(10, 28, 28, dtype=torch.uint8), torch.arange(10), list("0123456789"))
    >>> loader = DeviceImageLoader(ds, batch_size=4, train=True, device="cpu", preprocess=Preprocess(input_size=32))
    >>> len(loader), [tuple(x.shape) for x, _ in loader][-1]
    (3, (2, 3, 32, 32))
    """

    def __init__(self, dataset: InMemoryImageDataset, *, batch_size: int, train: bool, device: torch.device | str,
                 seed: int = 0, preprocess: Preprocess, aug: str = AUG_DEFAULT, rows: Sequence[int] | None = None,
                 order: EpochOrder | None = None, rank: int = 0) -> None:  # fmt: skip
        pick = slice(None) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
        images, targets = dataset.images[pick], dataset.targets[pick]  # a slice is a view: no copy of the whole set
        super().__init__(len(targets), batch_size=batch_size, train=train, device=device, seed=seed,
                         preprocess=preprocess, aug=aug, order=order, rank=rank)  # fmt: skip
        images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
        if images.shape[1] not in (1, 3):
            raise DataError(f"in-memory images need 1 or 3 channels for the device loader, got {images.shape[1]}")
        # One copy to the device for the whole run: per batch only indices and augmentation parameters move.
        self.images = images.contiguous().to(self.device)
        self.targets = targets.to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._batches()
        if not batches:
            return
        # the epoch's order goes to the device once (a per-batch copy from pageable memory syncs the stream)
        for idx in torch.cat(batches).to(self.device).split(self.batch_size):
            yield self.augment(self.images[idx], self.generator), self.targets[idx]


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 3 and bytes(data[:3].tolist()) == _JPEG_MAGIC


def _decode_cpu(data: torch.Tensor, path: str, alpha: str = ALPHA_DEFAULT) -> torch.Tensor:
    """Any image file's bytes -> uint8 ``[3, H, W]`` on the CPU: a JPEG or an opaque PNG by torchvision's decoder
    (4-6x faster than PIL's for small images), anything else (and what it cannot decode) by ``load_image``, which
    reads transparency as the CPU path does (``alpha``): torchvision's RGB mode drops the alpha channel, and its RGBA
    mode ignores a GIF's transparent colour and a grey or RGB PNG's."""
    if _is_jpeg(data) or _opaque_png(data):
        try:
            img = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
            if img.dtype == torch.uint8:
                return img
        except RuntimeError:
            pass
    return torch.from_numpy(np.array(load_image(path, alpha))).permute(2, 0, 1).contiguous()


def _opaque_png(data: torch.Tensor) -> bool:
    """Whether ``data`` is a PNG without transparency: grey, RGB or palette (colour type 0, 2, 3; not 4 or 6, which
    carry alpha) and no ``tRNS`` chunk (a transparent colour or palette entries), which comes before the pixels."""
    raw = data.numpy()
    if raw[:8].tobytes() != _PNG_MAGIC or len(raw) < 26 or raw[25] not in (0, 2, 3):
        return False
    at = 8
    while at + 8 <= len(raw):
        kind = raw[at + 4 : at + 8].tobytes()
        if kind in (b"tRNS", b"IDAT"):
            return kind == b"IDAT"
        at += 12 + int.from_bytes(raw[at : at + 4].tobytes(), "big")  # length, type, data, CRC
    return False


def _read_encoded(path: str, keep_jpeg: bool, pin: bool, alpha: str = ALPHA_DEFAULT) -> tuple[torch.Tensor, int]:
    """Runs in the reader threads: JPEG bytes stay encoded (1-D) for the batch decode on the GPU (``keep_jpeg``),
    with their EXIF orientation, read here rather than in the training thread; everything else is decoded here (and
    turned upright), in parallel, rather than one file after another in the training thread, and page-locked
    (``pin``) so its copy to the GPU does not stall the training stream. Returns ``(tensor, orientation)``."""
    try:
        data = read_file(path)
    except RuntimeError as e:
        raise DataError(f"cannot read image '{path}': {str(e).splitlines()[-1]}") from None
    if keep_jpeg and _is_jpeg(data):
        return data, exif_orientation(data)
    image = _decode_cpu(data, path, alpha)
    return (image.pin_memory() if pin else image), 1


def _by_size(images: list[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``fn`` to each group of same-sized images as one batch; results back in input order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[-2:]), []).append(i)
    parts, order = [], []
    for idx in groups.values():
        parts.append(fn(torch.stack([images[i] for i in idx]).float()))
        order += idx
    out = torch.cat(parts)
    return out[torch.argsort(torch.tensor(order, device=out.device))] if len(groups) > 1 else out


class DeviceJpegLoader(_DeviceLoader):
    """Batches of an image-file dataset: threads read bytes, JPEGs decode as one batch on ``device`` (nvJPEG on CUDA).

    Non-JPEG files (PNG, BMP, ...) are decoded per file on the CPU in the reader threads and copied over. A batch
    nvJPEG rejects (CMYK, unusual encodings) is decoded per file, each failure on the CPU; if no file of a batch
    decodes on the GPU, the loader decodes on the CPU from then on and logs a warning. Each image is resized to a
    common square canvas (train) or to the eval geometry, then augmented like ``DeviceImageLoader``.

    Args:
        dataset: a ``FileImageDataset`` (``samples`` of ``(path, label)``).
        threads: reader threads (default ``min(8, cpus)``); ``prefetch`` batches are read ahead.
        batch_decode: decode the JPEGs of a batch in one ``decode_jpeg`` call on ``device`` (default: on CUDA);
            otherwise every file is decoded in the reader threads.
        rows, order, rank: as ``DeviceImageLoader``.
        Others: as ``DeviceImageLoader``.

    >>> loader = DeviceJpegLoader(FileImageDataset([("a.jpg", 0)], ["a"]), batch_size=2, train=False,
    ...                           device="cpu", preprocess=Preprocess(input_size=32))
    >>> len(loader)
    1
    """

    def __init__(self, dataset: FileImageDataset, *, batch_size: int, train: bool, device: torch.device | str,
                 seed: int = 0, preprocess: Preprocess, aug: str = AUG_DEFAULT, threads: int | None = None,
                 prefetch: int = 2, rows: Sequence[int] | None = None, order: EpochOrder | None = None,
                 rank: int = 0, batch_decode: bool | None = None) -> None:  # fmt: skip
        rows = range(len(dataset)) if rows is None else rows
        super().__init__(len(rows), batch_size=batch_size, train=train, device=device, seed=seed,
                         preprocess=preprocess, aug=aug, order=order, rank=rank)  # fmt: skip
        self.paths = [str(dataset.samples[i][0]) for i in rows]
        self.alpha = dataset.alpha  # how transparent pixels are read, as the dataset reads them on the CPU path
        self.targets = dataset.targets[torch.as_tensor(list(rows), dtype=torch.long)].to(self.device)
        self.threads = threads or min(8, usable_cpus())
        self.prefetch = max(1, prefetch)
        self._decode_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self._batch_decode = self.device.type == "cuda" if batch_decode is None else batch_decode
        self._side_stream: torch.cuda.Stream | None = None  # created on first CUDA decode

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._batches()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="freezetune-read")
        pending = deque()

        def submit(k: int) -> None:
            if k < len(batches):
                keep, pin = self._batch_decode, self.device.type == "cuda"
                pending.append([pool.submit(_read_encoded, self.paths[i], keep, pin, self.alpha)
                                for i in batches[k].tolist()])  # fmt: skip

        try:
            for k in range(self.prefetch):
                submit(k)
            on_device = torch.cat(batches).to(self.device).split(self.batch_size) if batches else []  # one copy
            for k, (idx, idx_device) in enumerate(zip(batches, on_device, strict=True)):
                items = [f.result() for f in pending.popleft()]
                submit(k + self.prefetch)  # read ahead while this batch decodes and the model trains
                images = self._decode([self.paths[i] for i in idx.tolist()], items)
                yield self._transform(images), self.targets[idx_device]
        finally:  # also when the consumer stops early: do not leave reads running
            pool.shutdown(wait=False, cancel_futures=True)

    def _transform(self, images: list[torch.Tensor]) -> torch.Tensor:
        aug = self.augment
        if not aug.random_crop:
            return aug.finish(_by_size(images, aug.center_crop), self.generator)
        # Squashing to a square canvas keeps normalised coordinates, so crop boxes drawn in the original size keep
        # their true aspect ratio; it only changes the sampling density along the longer side.
        side = aug.canvas
        canvas = _by_size(images, lambda x: resize(x, (side, side), aug.mode))
        sizes = torch.tensor([list(img.shape[-2:]) for img in images], dtype=torch.float32)
        return aug.finish(aug.crop(canvas, sizes, self.generator), self.generator)

    def _decode(self, paths: list[str], items: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        out = [t for t, _ in items]
        jpegs = [i for i, t in enumerate(out) if t.dim() == 1]
        if jpegs:
            decoded = self._decode_jpegs([out[i] for i in jpegs], [paths[i] for i in jpegs],
                                         [items[i][1] for i in jpegs])  # fmt: skip
            for i, img in zip(jpegs, decoded, strict=True):
                out[i] = img
        return [img.to(self.device, non_blocking=True) for img in out]

    def _nvjpeg(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        """``decode_jpeg`` on the decode device; on CUDA its outputs are allocated on a stream of our own.

        nvJPEG writes on a private stream into memory allocated on the caller's current stream. Allocated on the
        training stream, that memory may have just been freed by kernels still queued there, which nvJPEG would then
        overwrite under them. A side stream's blocks hold only decode outputs (``record_stream`` keeps each until the
        training stream is done with it), and the training stream waits for the decode without the host waiting.
        """
        device = self._decode_device
        if device.type != "cuda":
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=device)
        main = torch.cuda.current_stream(device)
        with torch.cuda.stream(self._side_stream):
            out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        main.wait_stream(self._side_stream)
        for img in out:
            img.record_stream(main)
        return out

    def _decode_jpegs(self, data: list[torch.Tensor], paths: list[str], orientations: list[int]) -> list[torch.Tensor]:
        # nvJPEG ignores the EXIF orientation tag: each image is turned upright after it, as load_image turns it
        try:
            return [upright(img, o) for img, o in zip(self._nvjpeg(data), orientations, strict=True)]
        except RuntimeError:  # one bad file fails the whole call: find it and decode the rest
            pass
        out, on_device = [], 0
        for d, p, o in zip(data, paths, orientations, strict=True):
            try:
                out.append(upright(self._nvjpeg([d])[0], o))
                on_device += 1
            except RuntimeError:
                out.append(_decode_cpu(d, p, self.alpha))
        if self._decode_device.type == "cuda" and on_device == 0 and len(data) > 1:
            log.warning(
                "nvJPEG could not decode any image of a batch of %d; decoding on the CPU from now on", len(data)
            )
            self._decode_device, self._batch_decode = torch.device("cpu"), False  # decode in the reader threads
        return out


def _supported(dataset) -> bool:
    if isinstance(dataset, FileImageDataset):
        return True
    return isinstance(dataset, InMemoryImageDataset) and (
        dataset.images.dim() == 3 or dataset.images.shape[-1] in (1, 3)
    )


def should_use_device_loader(dataset, device: torch.device | str, decode: str = "auto") -> bool:
    """Whether the ``decode`` setting asks for a device loader for ``dataset`` on ``device``.

    ``"cpu"``: never. ``"auto"``: on a CUDA device, for in-memory and image-file datasets. ``"gpu"``: always for
    those datasets, on any device; on a CPU device that is slower than the ``DataLoader`` and useful for tests.

    Raises:
        ConfigError: unknown ``decode``, or ``"gpu"`` with a dataset the device loaders cannot read.

    >>> ds = InMemoryImageDataset(torch.zeros(2, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
    >>> should_use_device_loader(ds, "cpu", "auto"), should_use_device_loader(ds, "cpu", "gpu")
    (False, True)
    """
    if decode not in DECODE_MODES:
        raise ConfigError(f"unknown decode {decode!r}; choose one of: {choices(DECODE_MODES)}")
    if decode == "cpu":
        return False
    if decode == "gpu" and not _supported(dataset):
        raise ConfigError(
            f"decode='gpu' needs image files or in-memory uint8 images with 1 or 3 channels, got "
            f"{type(dataset).__name__}; use decode='cpu'"
        )
    return _supported(dataset) and (decode == "gpu" or torch.device(device).type == "cuda")


def check_decode(decode: str, device_spec: str, device: torch.device) -> None:
    """``decode="gpu"`` where ``device="auto"`` found no CUDA device is a user error: the batches would decode on the
    CPU, without nvJPEG. Asked for with an explicit ``device="cpu"`` it runs the device pipeline there (as tests do).

    >>> check_decode("gpu", "cpu", torch.device("cpu"))
    """
    if decode == "gpu" and device_spec == "auto" and device.type != "cuda":
        raise ConfigError(f"decode 'gpu' decodes on a CUDA device, and there is none here (device auto -> "
                          f"{device.type}); use --decode cpu or auto (or --device {device.type} to run the batched "
                          "device pipeline there, without nvJPEG)")  # fmt: skip


def build_device_loader(dataset, *, batch_size: int, train: bool, device: torch.device | str, seed: int,
                        preprocess: Preprocess, aug: str, rows: Sequence[int] | None = None,
                        order: EpochOrder | None = None,
                        rank: int = 0) -> DeviceImageLoader | DeviceJpegLoader | None:  # fmt: skip
    """A device loader for ``dataset``, or None when it has no device pipeline (use the CPU ``DataLoader``).

    ``rows``, ``order`` and ``rank`` are passed on (see ``DeviceImageLoader``).

    In-memory datasets larger than a quarter of the free GPU memory also give None: the model needs the rest.

    >>> ds = InMemoryImageDataset(torch.zeros(6, 8, 8, dtype=torch.uint8), torch.arange(6), list("abcdef"))
    >>> loader = build_device_loader(ds, batch_size=4, train=False, device="cpu", seed=0,
    ...                              preprocess=Preprocess(input_size=8), aug="none")
    >>> type(loader).__name__, len(loader)
    ('DeviceImageLoader', 2)
    """
    device = torch.device(device)
    kwargs = dict(batch_size=batch_size, train=train, device=device, seed=seed, preprocess=preprocess, aug=aug,
                  rows=rows, order=order, rank=rank)  # fmt: skip
    if not _supported(dataset):
        return None
    if isinstance(dataset, FileImageDataset):
        return DeviceJpegLoader(dataset, **kwargs)
    if device.type == "cuda":
        if dataset.images.nbytes > available_device_memory(device) // 4:
            log.info("in-memory images (%.1f GiB) too large for the device; using the CPU loader",
                     dataset.images.nbytes / 2**30)  # fmt: skip
            return None
    return DeviceImageLoader(dataset, **kwargs)
