"""Image files on disk: class-per-folder trees, single-image loading for predict, and how class names are ordered
and compared (image CSVs are read by ``data.image_csv``)."""

from __future__ import annotations

import glob
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, features
from torch.utils.data import Dataset

from freezetune.config.options import ALPHA_DEFAULT
from freezetune.data.alpha import flatten
from freezetune.data.bit_depth import eight_bit
from freezetune.data.labels import folder_name, nfc, warn_similar_labels
from freezetune.data.large import too_large
from freezetune.errors import DataError, choices
from freezetune.run.log import RUN_FOLDER_MARKS, RUN_LOGS, warn_once

log = logging.getLogger(__name__)

ARCHIVE_EXTENSIONS = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".7z", ".rar")
HEIF_EXTENSIONS = (".heic", ".heif")  # an iPhone's photos: read through pillow-heif (extra [heic]) when installed
HEIF_HINT = "pip install 'freezetune[heic]' (pillow-heif) to read .heic/.heif"


def _heif_readable() -> bool:
    """Whether PIL can open HEIC/HEIF here: pillow-heif, when installed, registers its opener with PIL, the one
    decoder every read path ends in (``load_image``, the pre-scan, the GPU path's fallback for files torchvision
    cannot decode). It applies the photo's rotation as it decodes and resets the EXIF tag, so nothing turns twice."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


_HEIF_READABLE = _heif_readable()
# Pillow's names of a JPEG: a phone's with an MPF segment (Samsung, Android Ultra HDR) opens as "MPO", and missed the
# reduced decode (a 12 MP photo read whole, 2x the time) and the pre-scan's marker walk
JPEG_FORMATS = ("JPEG", "MPO")
# Netpbm (the AT&T faces' .pgm) and TGA are Pillow's own; JPEG 2000 and AVIF where this Pillow was built with them
# (a folder of .pgm files was "no class folders with images", though predict read such a file)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pbm", ".pnm", ".tga") + tuple(
    suffix for suffix, feature in ((".jp2", "jpg_2000"), (".avif", "avif")) if features.check(feature)
) + (HEIF_EXTENSIONS if _HEIF_READABLE else ())  # fmt: skip


def heif_hint(paths) -> str:
    """``"; pip install ..."`` when one of ``paths`` is a HEIC/HEIF photo and nothing here reads them, else "": a
    photo named directly (``predict``, a CSV) was said to be no image file, as if it were broken.

    >>> heif_hint(["a.jpg"])
    ''
    """
    if _HEIF_READABLE or not any(str(p).lower().endswith(HEIF_EXTENSIONS) for p in paths):
        return ""
    return f"; {HEIF_HINT}"


def load_image(path: str | Path, alpha: str = ALPHA_DEFAULT, min_side: int | None = None) -> Image.Image:
    """Open an image file as an RGB PIL image (grayscale, palette and RGBA are converted; transparent pixels are
    composited onto white, or with ``alpha="drop"`` keep the colour stored under them: ``data/alpha.py``).

    ``min_side``: a JPEG is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's scaling, in the DCT: PIL's ``draft``)
    where both of its sides stay at least this long (``Preprocess.decode_side``): a 12-megapixel photo then reaches a
    224-px model's input 3.2 times faster, a 64-px one's 4.3 times (``benchmarks/decode.py``). Other formats ignore it.

    Raises:
        DataError: the file is missing or is not an image PIL can read.

    >>> load_image("photo.jpg").mode  # doctest: +SKIP
    'RGB'
    """
    try:
        with Image.open(path) as img:
            if min_side and img.format in JPEG_FORMATS:
                img.draft(None, (min_side, min_side))  # the largest reduction that keeps both sides >= min_side
            return flatten(eight_bit(ImageOps.exif_transpose(img)), alpha)  # upright: data/orientation.py
    except MemoryError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(f"cannot read image '{path}': {too_large(e)}") from e
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, struct.error ... for broken
        # files (a cut PPM header: ValueError, a traceback from predict); scan.image_problem catches the same
        why = str(e).replace(f" {str(path)!r}", "").replace(f" '{path}'", "")  # PIL's message names the path again
        why = why.rstrip(": ") or type(e).__name__
        if os.path.islink(path) and not os.path.exists(path):  # "No such file or directory" of a file listed
            why = f"a link to '{os.readlink(path)}', which does not exist"
        raise DataError(f"cannot read image '{path}': {why}{heif_hint([path])}") from e


def has_image_suffix(p: Path) -> bool:
    """Whether ``p`` is named as an image of a type read here (``IMAGE_EXTENSIONS``, any case)."""
    return p.suffix.lower() in IMAGE_EXTENSIONS


def files_under(folder: Path) -> list[Path]:
    """Every file below ``folder`` that is not hidden, sorted (images and the files beside them). A hidden folder
    (``.thumbnails/``) and Synology's ``@eaDir`` hold previews of the images, not more of them. Symlinked folders are
    followed (once each), but not one that leads back up the tree (to ``folder`` or above it: its other folders'
    images would join this one's, under its label), nor into a freezetune run's or sweep's folder below (its
    ``report.png`` is no image of the data); each is named in a warning. A broken symlink is kept, so the image check
    names it rather than it vanishing."""
    return sorted(_walk(folder))


def _walk(folder: Path, counting: bool = False, runs: list[str] | None = None) -> Iterator[Path]:
    """``files_under``'s files in walk order, as found (a caller that needs only the first stops there).
    ``counting``: files counted for a warning, not read: leave out the folders of freezetune's runs and sweeps
    (``run.log.RUN_LOGS``) and all below them, and those that cannot be listed. ``runs``: where the run folders left
    out are listed, for the caller to name (else a warning names each)."""
    seen = set()
    above = os.path.realpath(folder) + os.sep  # a folder it is inside, followed from a link below, brings its parents'
    # a folder of the data that cannot be listed is refused; one a run only counts for a warning (a disk's root-only
    # lost+found beside train/) is not
    for top, dirs, files in os.walk(folder, followlinks=True, onerror=None if counting else _unlisted):
        real = os.path.realpath(top)
        if real in seen or (counting and not set(RUN_LOGS).isdisjoint(files)):  # a link back to itself; a run
            dirs[:] = []
            continue
        below = top != str(folder)
        if below and above.startswith(real + os.sep):  # a link up the tree, to a folder that holds this one
            dirs[:] = []
            warn_once(log, "'%s' leads to '%s', a folder above it: not followed (its other folders' files would be "
                      "read as this folder's)", top, real)  # fmt: skip
            continue
        if below and not counting and not set(RUN_FOLDER_MARKS).isdisjoint(files):  # freezetune's own output
            dirs[:] = []
            if runs is not None:  # (the caller names them)
                runs.append(top)
            else:
                warn_once(log, "'%s' is a freezetune run's or sweep's folder: its files are not data, left out", top)
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not is_hidden(d)]
        yield from (Path(top) / f for f in files if not is_hidden(f))


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is a freezetune run's or sweep's (it holds ``run.log.RUN_FOLDER_MARKS``)."""
    return any((folder / mark).is_file() for mark in RUN_FOLDER_MARKS)


def _unlisted(exc: OSError) -> None:
    """``os.walk``'s ``onerror``: a folder that cannot be listed is refused. The walk would skip it, and its images with
    it: a test set scored without them, a class trained on fewer, said nowhere. One gone since it was listed (a
    temporary folder) held nothing to read."""
    if isinstance(exc, FileNotFoundError):
        return
    raise DataError(f"cannot list folder '{exc.filename}': {exc.strerror or type(exc).__name__}; its images would be "
                    "left out: fix its permissions (chmod -R u+rX), or move it out of the data") from exc  # fmt: skip


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is never data, nor worth a warning: dot files (macOS's), a Synology NAS's
    previews (``@eaDir``), Windows' thumbnail cache and folder settings."""
    return name.startswith(".") or name in ("@eaDir", "Thumbs.db", "desktop.ini")


def is_skipped_folder(name: str) -> bool:
    """Whether a folder below a data folder is never a class nor a split: a hidden one (``is_hidden``), or the
    resource forks an unzipped macOS archive carries (``__MACOSX``)."""
    return is_hidden(name) or name == "__MACOSX"


def count_images(folder: Path) -> int:
    """How many image files lie below ``folder``, those of a run's or a sweep's directory (its ``report.png``) not
    counted: ``runs/`` beside ``train/`` holds no data."""
    return sum(map(has_image_suffix, _walk(folder, counting=True)))


def _images_under(folder: Path) -> list[Path]:
    """The image files below ``folder``; the others are named in a warning, as a training folder's are."""
    files = files_under(folder)
    _warn_left_out(folder, [p for p in files if not has_image_suffix(p)])
    return [p for p in files if has_image_suffix(p)]


def list_images(paths: list[str]) -> list[str]:
    """Expand a list of files and directories into image files; directories are searched recursively, sorted.

    Files named explicitly are kept as given (in order); directories contribute their images with a known extension
    (``IMAGE_EXTENSIONS``).

    Raises:
        DataError: a path does not exist, or no image was found at all.

    >>> list_images(["cat.jpg", "more_pets/"])  # doctest: +SKIP
    ['cat.jpg', 'more_pets/a.png', 'more_pets/sub/b.jpg']
    """
    return expand_paths(paths, _images_under, "image path", "images", IMAGE_EXTENSIONS)


def expand_paths(paths: list[str], files_under, what: str, kind: str, suffixes, missing_hint: str = "") -> list[str]:
    """Files named explicitly, in order, and ``files_under(folder)`` for each folder (``list_images``, and a text
    model's ``list_text_files``); a glob no shell expanded (quoted, from a script or a Windows prompt) is expanded
    here, its matches sorted. A missing path is a DataError naming ``what`` (and ``missing_hint``); no file at all,
    one naming ``kind`` and the ``suffixes`` a folder is searched for."""
    out: list[str] = []
    for given in map(str, paths):
        p = Path(given)
        if p.is_dir():
            out += [str(f) for f in files_under(p)]
        elif p.is_file():  # as typed ("./a.png", "a//b.png"): a record must match its input (Path made it "a.png")
            out.append(given)
        elif glob.has_magic(str(p)):  # as the shell would expand it: a matched folder gives its files, as when typed
            matched = []  # ("data/test/*" matched only folders: "no file"); "**" gives a file and its folder: once
            for f in sorted(glob.glob(str(p), recursive=True)):
                if Path(f).is_dir():
                    matched += [str(g) for g in files_under(Path(f))]
                elif f.lower().endswith(tuple(suffixes)):
                    matched.append(f)
            if not matched:
                raise DataError(f"{what} pattern '{p}' matches no file ending in {', '.join(suffixes)}")
            out += matched
        else:
            raise DataError(f"{what} '{p}' does not exist{missing_hint}")
    if not out:
        raise DataError(f"no {kind} found in {choices(paths)}; expected files ending in {', '.join(suffixes)}")
    return list(dict.fromkeys(out))  # a file named twice (a glob and its folder) is predicted once


_GROUPED_PIXELS = 256 * 256  # images up to this size are held to go through the eval pipeline in groups of one size


class FileImageDataset(Dataset):
    """Images read from disk on access: ``samples`` is a list of ``(path, class_index)``.

    ``__getitem__`` returns ``(transform(pil_rgb_image), label)``; without a transform the PIL image. ``alpha``:
    how transparent pixels are read, ``min_side``: how far a large JPEG may be scaled down as it decodes
    (``load_image``; ``build_datasets`` sets the model's ``Preprocess.alpha`` and ``Preprocess.decode_side``).

    >>> ds = FileImageDataset([("a.png", 0), ("b.png", 1)], ["cat", "dog"])
    >>> len(ds), ds.targets.tolist()
    (2, [0, 1])
    """

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform: Callable | None = None,
                 alpha: str = ALPHA_DEFAULT, min_side: int | None = None):  # fmt: skip
        self.samples, self.classes, self.transform, self.alpha = list(samples), list(classes), transform, alpha
        self.min_side = min_side
        self.targets = torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = self._load(path)
        return (self.transform(img) if self.transform else img), label

    def _load(self, path: str) -> Image.Image:
        try:
            return load_image(path, self.alpha, self.min_side)
        except DataError as exc:  # a JPEG whose compressed data is corrupt passes the pre-scan's header check
            raise DataError(f"{exc} (the check before the images are read reads headers only: fix or remove the "
                            "file, or pass --skip-bad, whose check decodes every image and leaves such files out)"
                            ) from exc  # fmt: skip

    def __getitems__(self, indices: list[int]) -> list[tuple]:
        # a DataLoader's batch: a transform that allows it (the eval pipeline's) runs once on each group of small
        # decoded images of one size, bit for bit as image by image (10 000 28-px PNGs: 2.8x faster, decoding
        # included; benchmarks/eval_pass.py). A large one (a photo) goes through alone as soon as it is decoded: held
        # for a group, 16 decoded 12-megapixel photos took 1 GB more than one by one, for no gain (the resize is the
        # cost)
        if not getattr(self.transform, "batchable", False):
            return [self[i] for i in indices]
        out: list[tuple] = [()] * len(indices)
        small: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        for k, i in enumerate(indices):
            image, label = self._load(self.samples[i][0]), self.samples[i][1]
            if image.width * image.height > _GROUPED_PIXELS:
                out[k] = (self.transform(image), label)
            else:
                array = np.asarray(image)  # RGB, uint8 [H, W, 3]
                small.setdefault(array.shape, []).append((k, array))
        for group in small.values():
            batch = torch.from_numpy(np.stack([array for _, array in group])).permute(0, 3, 1, 2)
            for (k, _), x in zip(group, self.transform(batch).unbind(0), strict=True):
                out[k] = (x, self.samples[indices[k]][1])
        return out

    def select(self, indices: torch.Tensor, transform: Callable | None = None) -> FileImageDataset:
        """A new dataset with the samples at ``indices`` and ``transform``."""
        return FileImageDataset([self.samples[int(i)] for i in indices], self.classes, transform, self.alpha,
                                self.min_side)  # fmt: skip

    def joined(self, other: FileImageDataset) -> FileImageDataset:
        """This dataset's samples, then ``other``'s (this one's classes and transform); ``parts`` keeps the two."""
        ds = FileImageDataset(self.samples + other.samples, self.classes, self.transform, self.alpha, self.min_side)
        ds.parts = (self, other)
        return ds


def folder_classes(root: str | Path, known: Iterable[str] = ()) -> list[str]:
    """Class names of a ``root/<class>/*`` tree: the sorted subfolders that hold at least one image.

    ``known``: the training classes, when ``root`` is a validation or test folder: an empty folder of one of them is
    a class without images there (as an absent folder is), not a class the run would leave out.

    Raises:
        DataError: ``root`` is not a directory or has no class subfolder with images.

    >>> folder_classes("flowers/train")  # doctest: +SKIP
    ['daisy', 'rose', 'tulip']
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist; expected a directory with one subfolder per class")
    entries = [d for d in root.iterdir() if not is_skipped_folder(d.name)]
    # a link to an unmounted share is a class folder that would vanish from the run in silence; one named like a file
    # (labels.csv, a.jpg) is not a class
    broken = sorted(d.name for d in entries if d.is_symlink() and not d.exists() and not d.suffix)
    if broken:
        raise DataError(f"'{root}' holds broken symbolic link(s) {choices(broken)} (to "
                        f"'{os.readlink(root / broken[0])}'): whatever class they lead to would be left out; mount or "
                        "fix the link(s), or remove them")  # fmt: skip
    subdirs = sorted(d for d in entries if d.is_dir())
    runs: list[str] = []  # a folder without an image is walked through, its runs listed

    def a_class(d: Path) -> bool:  # stops at the class's first image
        return not is_run_folder(d) and any(has_image_suffix(p) for p in _walk(d, runs=runs))

    classes = [d.name for d in subdirs if a_class(d)]
    # a run's folder (an old run copied in, runs/ of a flat layout) is no class: its report.png trained as one
    ours = [d.name for d in subdirs if d.name not in classes and (is_run_folder(d) or any(
        Path(r).is_relative_to(d) for r in runs))]  # fmt: skip
    if ours:
        warn_once(log, "%s in '%s': freezetune's run or sweep folder(s), not data: not read as classes", choices(ours),
                  root)  # fmt: skip
    _same_names(root, classes)
    if not classes:
        raise DataError(
            f"no class folders with images in '{root}'; expected {root}/<class>/*.jpg (extensions: "
            f"{', '.join(IMAGE_EXTENSIONS)})"
        )
    known = {nfc(c) for c in known}
    empty = [d.name for d in subdirs if d.name not in (*classes, *ours) and nfc(d.name) not in known]
    if empty:  # training on N-1 classes in silence would be wrong: say which folders, and how to proceed
        raise DataError(f"class folder(s) {choices(empty)} in '{root}' hold no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder(s)")  # fmt: skip
    return classes


def _same_names(root: Path, classes: list[str]) -> None:
    """Refuse two class folders whose names are one name in two Unicode forms ("café" composed, as Linux writes it,
    and decomposed, as macOS does): classes are matched in NFC, so one of them would be a class with no image.
    Names that differ only in case or spacing are warned about: each is a class of its own."""
    forms: dict[str, list[str]] = {}
    for c in classes:
        forms.setdefault(nfc(c), []).append(c)
    same = next((names for names in forms.values() if len(names) > 1), None)
    if same is not None:
        raise DataError(f"'{root}': class folders {' and '.join(map(ascii, same))} are one name written in two Unicode "
                        "forms (composed and decomposed, as macOS writes it): they would be two classes; merge them "
                        "into one folder")  # fmt: skip
    warn_similar_labels(root, classes)


def scan_folder(root: str | Path, classes: list[str] | None = None) -> FileImageDataset:
    """Read a ``root/<class>/*`` tree (images found recursively inside each class folder).

    Args:
        root: the directory holding one subfolder per class.
        classes: class list to index against (e.g. the train classes when reading val); defaults to the folder's own.

    Raises:
        DataError: the folder is missing or empty, or has a class not in ``classes``.

    >>> scan_folder("flowers/val", classes=["daisy", "rose"]).classes  # doctest: +SKIP
    ['daisy', 'rose']
    """
    own = folder_classes(root, known=[*classes, *map(folder_name, classes)] if classes else ())
    classes = list(classes) if classes is not None else own
    # names compared in NFC: macOS writes "café" decomposed (NFD), Linux and Windows composed, and both look alike
    index = {nfc(c): i for i, c in enumerate(classes)}
    for i, c in enumerate(classes):  # a class no folder can be named (Fashion-MNIST's "T-shirt/top"): its spelling
        index.setdefault(nfc(folder_name(c)), i)
    unknown = [c for c in own if nfc(c) not in index]
    if unknown:
        spelt = [f"{c!r} is the folder {folder_name(c)!r}" for c in classes if folder_name(c) != c]
        raise DataError(f"class folder(s) {choices(unknown)} in '{root}' are not training classes: {choices(classes)} "
                        f"(rename them to a training class, or move them out of it{'; ' if spelt else ''}"
                        f"{', '.join(spelt[:3])})")  # fmt: skip
    samples, left_out = [], []
    for c in own:
        files = files_under(Path(root) / c)
        samples += [(str(p), index[nfc(c)]) for p in files if has_image_suffix(p)]
        left_out += [p for p in files if not has_image_suffix(p)]
    _warn_loose(Path(root))
    _warn_left_out(root, left_out)
    return FileImageDataset(samples, classes)


def _warn_loose(root: Path) -> None:
    """Name the images beside the class folders (no class to train them as) and the archives there (a class folder
    still zipped)."""
    files = sorted(p for p in root.iterdir() if p.is_file() and not is_hidden(p.name))
    loose = [p.name for p in files if has_image_suffix(p)]
    if loose:
        warn_once(log, "'%s': %d image file(s) lie outside the class folders and are left out (%s)", root, len(loose),
                  _first(loose))  # fmt: skip
    archives = [p.name for p in files if "".join(p.suffixes[-2:]).lower().endswith(ARCHIVE_EXTENSIONS)]
    if archives:
        warn_once(log, "'%s': archive(s) %s lie beside the class folders and are not read: unpack a class's images "
                  "into its own folder", root, _first(archives))  # fmt: skip


def _first(names: list[str], n: int = 3) -> str:
    """Up to ``n`` names, and how many more.

    >>> _first(["a", "b"]), _first(["a", "b", "c", "d", "e"])
    ("'a', 'b'", "'a', 'b', 'c' and 2 more")
    """
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(map(repr, names[:n])) + more


def _warn_left_out(root: str | Path, files: list[Path]) -> None:
    """Say which files in the class folders are not read, by extension and the first few: an iPhone's .heic photos,
    say, would otherwise drop out of the training set in silence."""
    if files:
        by_suffix = Counter(p.suffix.lower() or "(no extension)" for p in files)
        counts = ", ".join(f"{suffix}: {n}" for suffix, n in by_suffix.most_common())
        hint = f"; {HEIF_HINT}" if any(suffix in HEIF_EXTENSIONS for suffix in by_suffix) else ""
        where = [str(p.relative_to(root)) for p in files]
        warn_once(log, "'%s': %d file(s) left out, not of an image type read here (%s), e.g. %s; images are %s%s", root,
                  len(files), counts, _first(where), ", ".join(IMAGE_EXTENSIONS), hint)  # fmt: skip
