"""IDX datasets (MNIST, Fashion-MNIST): read ``*-idx?-ubyte[.gz]`` files into an in-memory uint8 dataset.

An in-memory dataset keeps every image as one uint8 tensor, so a GPU pipeline can move ``.images`` to the device once
and augment whole batches there instead of decoding per sample.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from freezetune.data.labels import folder_name, nfc
from freezetune.errors import DataError, choices

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DIGIT_CLASSES = [str(d) for d in range(10)]

# The third magic byte names the element type; only uint8 (0x08) makes sense for images and labels.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4")}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw) into a numpy array of its declared shape.

    Args:
        path: an ``*-idx?-ubyte`` file, optionally ``.gz``.

    Returns:
        The array, e.g. ``uint8 [N, 28, 28]`` for images or ``uint8 [N]`` for labels.

    Raises:
        DataError: the file is missing, has a bad magic number or is shorter/longer than its header says.

    >>> read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").shape  # doctest: +SKIP
    (10000,)
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file '{path}': {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or not 1 <= raw[3] <= 4:
        raise DataError(
            f"'{path}' is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'}; "
            "expected 0000 + type byte + 1..4 dimensions (e.g. 00000803 for images, 00000801 for labels)"
        )
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4")) if len(raw) >= header else ()
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(shape) != ndim or len(raw) != expected:
        raise DataError(f"IDX file '{path}' is truncated or corrupt: {len(raw)} bytes, header says {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(root: Path, prefix: str, kind: str) -> Path | None:
    # Accept the common spellings: train-images-idx3-ubyte, train-images.idx3-ubyte, with or without .gz.
    hits = sorted(p for p in root.glob(f"{prefix}-{kind}*") if "ubyte" in p.name and p.is_file())
    return hits[0] if hits else None


def idx_files(root: str | Path, split: str) -> tuple[Path, Path] | None:
    """Return the (images, labels) IDX files of ``split`` ("train" or "test") under ``root``, or None if absent.

    >>> idx_files("/nonexistent", "train") is None
    True
    """
    prefix = _SPLIT_PREFIX[split]
    images, labels = _find(Path(root), prefix, "images"), _find(Path(root), prefix, "labels")
    return (images, labels) if images and labels else None


def idx_pair_problem(root: str | Path) -> str | None:
    """What is missing where a directory holds one file of the train IDX pair (images, labels) and not the other, or
    only the test pair: it was then read as an image folder, "no class folders with images".

    >>> idx_pair_problem("/nonexistent") is None
    True
    """
    root = Path(root)
    images, labels = _find(root, "train", "images"), _find(root, "train", "labels")
    if not root.is_dir():
        return None
    if images is None and labels is None:  # the test pair alone (t10k-*): "no class folders with images" said too
        test = [p.name for p in (_find(root, _SPLIT_PREFIX["test"], kind) for kind in ("images", "labels")) if p]
        return (f"holds {' and '.join(test)} (the IDX test split) but no train-images-idx3-ubyte[.gz] and "
                "train-labels-idx1-ubyte[.gz]: an IDX directory needs its train pair") if test else None  # fmt: skip
    if (images is None) == (labels is None):
        return None
    has, lacks = (
        (images.name, "train-labels-idx1-ubyte[.gz]") if images else (labels.name, "train-images-idx3-ubyte[.gz]")
    )
    return f"holds {has} but no {lacks}: an IDX directory needs both"


def is_idx_dir(path: str | Path) -> bool:
    """True if ``path`` is a directory holding at least the train IDX image and label files.

    >>> is_idx_dir("/nonexistent")
    False
    """
    return Path(path).is_dir() and idx_files(path, "train") is not None


CLASS_NAMES_FILE = "classes.txt"  # an IDX directory's own class names, one a line (label 0 first)


def idx_class_names(root: str | Path) -> list[str]:
    """Class names of an IDX directory: its ``classes.txt`` (IDX files carry labels, not names), else Fashion-MNIST's
    if the directory's name contains 'fashion', else digits '0'..'9'.

    >>> idx_class_names("/data/fashion-mnist")[0]
    'T-shirt/top'
    """
    named = Path(root) / CLASS_NAMES_FILE
    if not named.is_file():
        return list(FASHION_CLASSES if "fashion" in Path(root).name.lower() else DIGIT_CLASSES)
    try:  # utf-8-sig: Notepad's byte-order mark became part of the first name ('\ufeffzero')
        names = [line.strip() for line in named.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read class names '{named}': {e}") from e
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # two labels under one name: eval and predict matched a folder of that name to one of them
        raise DataError(f"'{named}' names {choices(twice)} more than once; give each label a name of its own")
    return names


class InMemoryImageDataset(Dataset):
    """Images held as one uint8 tensor ``[N, H, W]`` or ``[N, H, W, C]`` plus int64 ``targets``.

    ``__getitem__`` returns ``(transform(image_chw_uint8), label)``; without a transform the uint8 ``[C, H, W]``
    tensor itself.

    >>> ds = InMemoryImageDataset(torch.zeros(2, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
    >>> ds[1][0].shape, ds[1][1]
    (torch.Size([1, 4, 4]), 1)
    """

    def __init__(
        self, images: torch.Tensor, targets: torch.Tensor, classes: list[str], transform: Callable | None = None
    ):
        if images.dtype != torch.uint8 or images.dim() not in (3, 4) or len(images) != len(targets):
            raise DataError(
                f"in-memory images must be uint8 [N,H,W] or [N,H,W,C] with one target each; got "
                f"{images.dtype} {tuple(images.shape)} and {len(targets)} targets"
            )
        self.images, self.targets = images, targets.long()
        self.classes, self.transform = list(classes), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        img = img.unsqueeze(0) if img.dim() == 2 else img.permute(2, 0, 1)
        return (self.transform(img) if self.transform else img), int(self.targets[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        # a DataLoader's batch: a transform that allows it (the eval pipeline's) runs once on the stacked images; the
        # final test's 10 000 images spent 3.5 s of a 50 s run in it, image by image
        if not getattr(self.transform, "batchable", False):
            return [self[i] for i in indices]
        rows = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[rows]
        images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
        return list(zip(self.transform(images).unbind(0), self.targets[rows].tolist(), strict=True))

    def select(self, indices: torch.Tensor, transform: Callable | None = None) -> InMemoryImageDataset:
        """A new dataset with the rows ``indices`` (copied, so the original can be freed) and ``transform``."""
        return InMemoryImageDataset(self.images[indices], self.targets[indices], self.classes, transform)

    def joined(self, other: InMemoryImageDataset) -> InMemoryImageDataset:
        """This dataset's rows, then ``other``'s (this one's classes and transform); ``parts`` keeps the two, so
        feature stores cached for each serve the join (``FeaturePath``)."""
        ds = InMemoryImageDataset(torch.cat([self.images, other.images]), torch.cat([self.targets, other.targets]),
                                  self.classes, self.transform)  # fmt: skip
        ds.parts = (self, other)
        return ds


def load_idx(root: str | Path, split: str = "train", transform: Callable | None = None) -> InMemoryImageDataset:
    """Load the official ``split`` ("train" or "test") of an IDX directory into memory.

    Args:
        root: directory with ``train-*`` and ``t10k-*`` IDX files (e.g. a Fashion-MNIST download).
        split: "train" or "test".
        transform: applied per sample in ``__getitem__``.

    Raises:
        DataError: files missing, unreadable, or images and labels disagree in count.

    >>> ds = load_idx("/usr/share/datasets/fashion-mnist", "test")  # doctest: +SKIP
    >>> len(ds), ds.images.shape  # doctest: +SKIP
    (10000, torch.Size([10000, 28, 28]))
    """
    if split not in _SPLIT_PREFIX:
        raise DataError(f"unknown IDX split {split!r}; choose one of: {choices(_SPLIT_PREFIX)}")
    files = idx_files(root, split)
    if files is None:
        prefix = _SPLIT_PREFIX[split]
        raise DataError(
            f"no {split} IDX files in '{root}'; expected {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]"
        )
    images, labels = read_idx(files[0]), labels_of(files[1])
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"IDX files in '{root}' do not match: images {images.dtype} {images.shape}, labels {labels.shape}; "
            "expected uint8 images [N,H,W] and N labels"
        )
    classes = split_classes(root, labels)
    # np.frombuffer arrays are read-only; copy once so torch owns writable memory.
    images_t, targets = torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
    dataset = InMemoryImageDataset(images_t, targets, classes, transform)
    dataset.source_files = (os.path.realpath(files[0]),)  # which file it is: one split read twice is refused
    return dataset


def split_classes(root: str | Path, labels: np.ndarray) -> list[str]:
    """The class names of a split of ``root`` whose labels are ``labels``: ``idx_class_names``', or, past them and
    without ``classes.txt``, the labels' numbers.

    Raises:
        DataError: ``classes.txt`` names fewer classes than the labels need.
    """
    classes = idx_class_names(root)
    if len(labels) and int(labels.max()) >= len(classes):
        if (Path(root) / CLASS_NAMES_FILE).is_file():
            raise DataError(f"'{root}' has labels up to {int(labels.max())} but {CLASS_NAMES_FILE} names "
                            f"{len(classes)} classes; give one name a line for every label")  # fmt: skip
        classes = [str(c) for c in range(int(labels.max()) + 1)]
    return classes


def labels_of(path: str | Path) -> np.ndarray:
    """The labels of an IDX labels file: whole numbers from 0 (a negative one ended in torch's bincount traceback, a
    fraction was cut to an integer in silence).

    Raises:
        DataError: a label that is no class index, named with the file.
    """
    labels = read_idx(path)
    if labels.dtype.kind == "f" and len(labels) and not np.all(np.mod(labels, 1) == 0):
        raise DataError(f"IDX labels file '{path}' holds a label that is not a whole number "
                        f"({labels[np.mod(labels, 1) != 0][0].item()!r}): labels are class indices 0, 1, 2...")  # fmt: skip
    if len(labels) and labels.min() < 0:
        raise DataError(f"IDX labels file '{path}' holds the label {labels.min().item()!r}: labels are class indices 0, 1, "
                        "2...")  # fmt: skip
    return labels


def check_test_labels(highest: int, classes: int, test_labels: str | Path) -> None:
    """Refuse a test split whose ``highest`` label (of its ``test_labels`` file) is past the training split's
    ``classes``: the run scored it only after it had trained, ending in "label 11 is outside num_classes"."""
    if highest >= classes:
        raise DataError(f"IDX labels file '{test_labels}' has labels up to {highest}, and the training split has "
                        f"{classes} classes (0 to {classes - 1}): the test split is scored by them")  # fmt: skip


def name_labels_as(ds: InMemoryImageDataset, classes: list[str], root: str | Path,
                   known_by: str = "the checkpoint") -> None:  # fmt: skip
    """Give the labels of ``ds`` (an IDX split of ``root``) the model's class indices, matched by name as a folder's
    are: IDX labels are positions, named by ``classes.txt`` (else ``idx_class_names``'s defaults), and a model trained
    on a folder lists its classes alphabetically (a slash written ``_``: ``labels.folder_name``), a model trained on
    the IDX files in label order.

    Raises:
        DataError: a label present in ``ds`` has a name that is not one of ``classes``.

    >>> ds = InMemoryImageDataset(torch.zeros(3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 1]), ["zero", "one"])
    >>> name_labels_as(ds, ["one", "two", "zero"], "/data")
    >>> ds.targets.tolist(), ds.classes
    ([2, 0, 0], ['one', 'two', 'zero'])
    """
    if ds.classes == list(classes):
        return
    index = {nfc(folder_name(c)): i for i, c in enumerate(classes)}  # 'T-shirt/top' of a folder is 'T-shirt_top'
    unknown = [ds.classes[t] for t in torch.unique(ds.targets).tolist() if nfc(folder_name(ds.classes[t])) not in index]
    present = len(torch.unique(ds.targets))
    if unknown and present > len(classes):  # no classes.txt names more labels than there are classes
        raise DataError(f"'{root}' has {present} labels, {choices(unknown)} among them, and {known_by} knows "
                        f"{len(classes)} classes ({choices(classes)}): no naming of the labels maps one onto the "
                        f"other; give data of {known_by}'s classes")  # fmt: skip
    if unknown:
        named = Path(root) / CLASS_NAMES_FILE
        by = f"named by {named}" if named.is_file() else f"without {named}, named {choices(ds.classes[:3])}..."
        raise DataError(f"'{root}' has label(s) named {choices(unknown)}, which {known_by} does not know (IDX labels "
                        f"are positions, {by}); its classes are {choices(classes)}: write {known_by}'s name of "
                        f"each label 0, 1, 2... into {named}, one a line, in label order")  # fmt: skip
    ds.targets = torch.tensor([index.get(nfc(folder_name(c)), -1) for c in ds.classes])[ds.targets]
    ds.classes = list(classes)
