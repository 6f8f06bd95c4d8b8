"""The pre-scan of image files: every file's header is read before training, so a corrupt or truncated image stops
the run at its start, named, instead of surfacing hours in as a worker traceback.

Only headers are read (PIL opens lazily; ``verify`` checks the structure without decoding pixels), in a few threads
because the cost is file-system latency, so ten thousand files take seconds. ``verify`` does not notice a JPEG cut
short (an interrupted download or copy): PIL fails on it only when it decodes the pixels, mid-training. So a JPEG's
markers are walked to the compressed data, which must be followed by the end-of-image marker. Formats other than
JPEG, PNG and WebP are decoded in full: nothing short of that tells a cut GIF, BMP or TIFF from a whole one. Under
``--skip-bad`` those three are decoded too (slower): a JPEG whose compressed data is corrupt (bit rot) has sound
headers and markers, and only its decode fails, which stopped a run that was asked to skip what cannot be read.
Files shared between splits, or copied, are ``data/overlap.py``'s. The scan notes files that read but are worth a
word: over PIL's warning limit, or with corrupt EXIF data (what PIL warns of raw, from every loader worker, is said
here once: ``quiet_pil_warnings``). A process remembers the files it found sound by path, size, inode, modification
and change time (``file_stamp``): the auto recipe builds its data once a trial and once for its run, and 70 000 files
took 12-17 s a scan.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from freezetune.config.options import PIL_WARNINGS
from freezetune.data.folder import JPEG_FORMATS, FileImageDataset, heif_hint
from freezetune.data.large import megapixels, too_large
from freezetune.errors import DataError
from freezetune.run.log import warn_once

log = logging.getLogger(__name__)

_THREADS = 8  # file opens wait on the disk, not the CPU
_NAMED = 5  # unreadable files named in the error; the count says how many more
SCAN_SAID = 5_000  # a split of this many files not checked yet is said before its check (a few seconds or more)
# a file's absolute path, size, inode and modification and change times (ns): a replacement that keeps the
# modification time (cp -p, rsync -t, tar x) still changes the change time
_Stamp = tuple[str, int, int, int, int]
_SOUND: set[_Stamp] = set()  # files this process found readable
_DECODED: set[_Stamp] = set()  # ... and whose pixels it decoded whole (``decode``)


# Formats whose truncation is caught without decoding pixels: PNG by verify's checksums up to its end chunk, WebP
# (its decoder refuses a short file when it opens), JPEG by the marker walk. The headers of the others (GIF, BMP,
# TIFF, PPM ...) do not say where their pixel data ends, so they are decoded; they are rare in datasets.
_CHECKED_WITHOUT_DECODE = {*JPEG_FORMATS, "PNG", "WEBP"}


def quiet_pil_warnings() -> None:
    """Drop PIL's raw warnings about what the pre-scan names once a file in freezetune's words (``PIL_WARNINGS``): an
    image over 89 megapixels ("Image.py:3593: ... could be decompression bomb DOS attack"), an EXIF block cut short
    ("TiffImagePlugin.py:982: UserWarning: Corrupt EXIF data"), each with its source line, from the command and from
    every loader worker. Installed by the command line and in each loader worker, which a spawned or forkserver start
    does not give the filters of the process that started it."""
    for message in PIL_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


class _Look(NamedTuple):
    """What the pre-scan found of one file: why it cannot be read (None: it can); its pixels when they are over
    PIL's warning limit in a format other than JPEG, which decodes scaled down (every read decodes them all; else
    0); and, when its EXIF block is cut short, the orientation read before the cut (1: none; else 0)."""

    why: str | None
    pixels: int = 0
    cut_exif: int = 0


def image_problem(path: str) -> str | None:
    """Why ``path`` is not a readable image (one short reason), or None when its header is sound.

    >>> image_problem("/nonexistent.png")
    'No such file or directory'
    """
    return _looked_at(path).why


def _looked_at(path: str, decode: bool = False) -> _Look:
    """``image_problem``'s answer, and what is worth a note of a file that reads (``_Look``). ``decode``: JPEG, PNG and
    WebP pixels are decoded too (a JPEG at 1/8 scale: every coefficient is still read), so that corrupt compressed
    data is found here: no header, checksum or end marker tells it, and PIL fails on it only mid-training."""
    try:
        with Image.open(path) as img:
            img.verify()  # structure and checksums where the format has them; no pixel decode
            fmt, pixels, exif = img.format, img.width * img.height, img.info.get("exif") or b""
        if fmt in JPEG_FORMATS and not jpeg_complete(Path(path).read_bytes()):
            return _Look("truncated: the JPEG data stops before its end-of-image marker")
        if decode or fmt not in _CHECKED_WITHOUT_DECODE:
            with Image.open(path) as img:  # verify() leaves the image unusable: open it again
                if fmt in JPEG_FORMATS:
                    img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
    except Image.DecompressionBombError as exc:
        return _Look(too_large(exc))
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error ... for broken files
        why = getattr(exc, "strerror", None) or str(exc).split("\n")[0] or type(exc).__name__
        return _Look(why.replace(f" {str(path)!r}", ""))  # PIL repeats the path the message is already about
    large = fmt not in JPEG_FORMATS and bool(Image.MAX_IMAGE_PIXELS) and pixels > Image.MAX_IMAGE_PIXELS
    # read here, not through PIL's Exif, whose "Corrupt EXIF data" is a warning: catching one is not thread-safe
    orientation, whole = tiff_orientation(exif.removeprefix(b"Exif\0\0"))
    return _Look(None, pixels if large else 0, 0 if whole else orientation)


_STANDALONE = {0x01, *range(0xD0, 0xD9)}  # markers without a length: TEM, RST0-7, SOI


def jpeg_segments(data: bytes | memoryview) -> Iterator[tuple[int, int, int]]:
    """``(marker, start, end)`` of each marker segment of a JPEG up to its first scan; ``data[start:end]`` is the
    segment's payload. The walk ends after the start-of-scan segment (its ``end`` is where the compressed data
    begins) or at an end-of-image marker (yielded with an empty payload). Fill bytes, standalone markers and junk
    between segments are skipped, as PIL's reader does.

    >>> list(jpeg_segments(bytes.fromhex("ffd8 ffe00004 0000 00 ffda0002 12 ffd9")))  # a stray byte before the scan
    [(224, 6, 8), (218, 13, 13)]
    """
    pos = 2  # after SOI
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:  # junk between segments
            pos += 1
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker in _STANDALONE:
            pos += 2
        elif marker == 0xD9:  # the end before any scan
            yield marker, pos, pos
            return
        else:
            end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
            yield marker, pos + 4, end
            if marker == 0xDA:
                return
            pos = end


_ORIENTATION_TAG = 0x0112


def tiff_orientation(tiff: bytes | memoryview) -> tuple[int, bool]:
    """The orientation (1-8; 1 when it has none) in the first image directory of an EXIF block (a little TIFF file,
    after its ``Exif\\0\\0``), and whether that directory reads whole. Of one cut short PIL keeps the entries before
    the cut, as this does, and warns "Corrupt EXIF data" (dropped for the pre-scan's note: ``unreadable``).

    >>> tiff_orientation(bytes.fromhex("4d4d002a00000008 0001 0112000300000001 00060000 00000000"))
    (6, True)
    >>> tiff_orientation(bytes.fromhex("4d4d002a00000008 0005 0112000300000001 00060000 ffff"))  # 5 entries, 1 there
    (6, False)
    """
    order = {b"II": "little", b"MM": "big"}.get(bytes(tiff[:2]))
    if order is None or len(tiff) < 8:  # no TIFF header: PIL reads no tag from it either, and says nothing
        return 1, True
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1, False
    end = ifd + 2 + 12 * int.from_bytes(tiff[ifd : ifd + 2], order)  # the entries, then the next directory's offset
    orientation = 1
    for entry in range(ifd + 2, min(end, len(tiff) - 11), 12):
        if int.from_bytes(tiff[entry : entry + 2], order) == _ORIENTATION_TAG:  # a later one wins, as in PIL
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)  # a SHORT sits first in the value field
            orientation = value if 1 <= value <= 8 else 1
    return orientation, end + 4 <= len(tiff)


def jpeg_complete(data: bytes) -> bool:
    """Whether the JPEG in ``data`` has its end-of-image marker after its first scan's compressed data.

    Segments before the scan are skipped by their lengths (an EXIF thumbnail, a JPEG of its own with its own end
    marker, lies inside one). Inside compressed data a 0xFF byte is always followed by 0x00 or a restart marker, so
    the first 0xFF 0xD9 after the scan starts is the image's end; data appended after it (a phone's motion photo)
    is allowed.

    >>> jpeg_complete(bytes.fromhex("ffd8 ffda0002 1234ff00 ffd9")), jpeg_complete(bytes.fromhex("ffd8 ffda0002 1234"))
    (True, False)
    >>> jpeg_complete(bytes.fromhex("ffd8 ffe00004 0000 00 ffda0002 12 ffd9"))  # a stray byte before the scan
    True
    """
    for marker, _, end in jpeg_segments(data):
        if marker == 0xDA:  # start of scan: the compressed data follows its header
            return data.find(b"\xff\xd9", end) != -1
    return False


def unreadable(paths: list[str], *, decode: bool = False, say: Callable[[str], None] | None = None,
               what: str = "") -> list[tuple[str, str]]:  # fmt: skip
    """``(path, reason)`` of each file in ``paths`` whose image header cannot be read, in the order given; ``decode``:
    or whose pixels cannot be decoded (``_looked_at``), what ``--skip-bad`` asks: a file it lets through stops the run
    mid-epoch. ``say``: told first, where ``SCAN_SAID`` files or more are to be read (of the ``what`` split).

    >>> unreadable([])
    []
    """
    known = _DECODED if decode else _SOUND
    todo = [path for path in dict.fromkeys(paths) if file_stamp(path) not in known]
    if say is not None and len(todo) >= SCAN_SAID:  # 60 000 files took 17 s, the run silent from its start
        how = "decoded whole (--skip-bad)" if decode else "each one's headers read"
        say(f"data: checking {len(todo):,} {what} image files before training ({how}: a broken file is named now, "
            "not mid-training)")  # fmt: skip
    with ThreadPoolExecutor(_THREADS) as pool:
        looked = dict(zip(todo, pool.map(lambda p: _checked(p, decode), todo), strict=True))
    large = {p: look.pixels for p, look in looked.items() if look.pixels}
    if large:  # one line for a folder of scans, not one a file
        shown = ", ".join(f"'{p}' ({megapixels(n)})" for p, n in list(large.items())[:3])
        warn_once(log, "%d image file(s) are over %s megapixels, e.g. %s: each read decodes all of them (a second or "
                  "more); downscaled copies train as well, faster", len(large), megapixels(Image.MAX_IMAGE_PIXELS),
                  shown)  # fmt: skip
    _note_cut_exif({p: look.cut_exif for p, look in looked.items() if look.cut_exif})
    return [(p, looked[p].why) for p in paths if p in looked and looked[p].why is not None]


def _note_cut_exif(cut: dict[str, int]) -> None:
    """One line for the image files whose EXIF block is cut short (PIL's raw "Corrupt EXIF data" came from every
    loader worker, naming no file): their pixels read, and whether they are turned upright."""
    if cut:
        kept = "its orientation tag, {}, read before the cut: turned by it"
        lost = "read as stored: no orientation before the cut turns it"
        # one file a line, indented: the three in one line made 400 characters, five lines of a terminal pane
        shown = [f"'{p}' ({kept.format(o) if o > 1 else lost})" for p, o in list(cut.items())[:3]]
        warn_once(log, "%d image file(s) have corrupt EXIF data (its first directory cut short); their pixels are "
                  "read as usual, e.g." + "\n  %s" * len(shown), len(cut), *shown)  # fmt: skip


def _checked(path: str, decode: bool = False) -> _Look:
    """``_looked_at``, remembered as sound only when the file did not change while it was read."""
    before = file_stamp(path)
    look = _looked_at(path, decode)
    if look.why is None and before is not None and file_stamp(path) == before:
        _SOUND.add(before)
        if decode:
            _DECODED.add(before)
    return look


def file_stamp(path: str) -> _Stamp | None:
    """What tells a file from a replacement of it: its absolute path, size, inode, modification and change times (None:
    gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.abspath(path), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns


_HINT = "fix or remove them, or pass --skip-bad to train without them"


def check_images(ds, what: str, *, skip_bad: bool, hint: str = _HINT) -> tuple[object, list[str]]:
    """Scan the image files of ``ds`` (a ``FileImageDataset``; other datasets hold no files and pass through).

    Returns:
        ``(dataset, skipped)``: ``ds`` itself when every file reads, else (with ``skip_bad``) a dataset without the
        unreadable files, and the paths left out.

    Raises:
        DataError: unreadable files and no ``skip_bad``; the message names the first few, and how many there are.

    >>> check_images(None, "training", skip_bad=False)
    (None, [])
    """
    checked, skipped = check_splits([(ds, what)], skip_bad=skip_bad, hint=hint)
    return checked[0], skipped


def check_splits(splits: list[tuple[object, str]], *, skip_bad: bool, hint: str = _HINT,
                 say: Callable[[str], None] | None = None) -> tuple[list, list[str]]:  # fmt: skip
    """``check_images`` of each ``(dataset, what)``: the datasets (without their unreadable files, with
    ``skip_bad``) and the paths left out. Without ``skip_bad`` one error names the unreadable files of every split
    (named one split at a time, bad files in three splits took three failed runs to find). ``say``: ``unreadable``'s.

    >>> check_splits([(None, "training"), (None, "test")], skip_bad=False)
    ([None, None], [])
    """
    found = [(ds, what, unreadable([p for p, _ in ds.samples], decode=skip_bad, say=say, what=what)
              if isinstance(ds, FileImageDataset) else []) for ds, what in splits]  # fmt: skip
    if not skip_bad and any(bad for _, _, bad in found):
        parts = [_cannot_read(bad, len(ds), what) for ds, what, bad in found if bad]
        heif = heif_hint(path for _, _, bad in found for path, _ in bad)
        raise DataError(f"{'; '.join(parts)}; {hint}{heif}")
    checked, skipped = [], []
    for ds, what, bad in found:
        if bad and len(bad) == len(ds):  # nothing left: the run trained, then crashed scoring an empty test set
            raise DataError(f"--skip-bad left no {what} image: {_cannot_read(bad, len(ds), what)}; fix or remove "
                            "them")  # fmt: skip
        if bad:
            left_out = {path for path, _ in bad}
            warn_once(log, "skipping %d unreadable %s image file(s), first: %s", len(bad), what, bad[0][0])
            ds = ds.select([i for i, (path, _) in enumerate(ds.samples) if path not in left_out], ds.transform)
            skipped += [path for path, _ in bad]
        checked.append(ds)
    return checked, skipped


def _cannot_read(bad: list[tuple[str, str]], n: int, what: str) -> str:
    named = ", ".join(f"'{path}' ({why})" for path, why in bad[:_NAMED])
    more = f" and {len(bad) - _NAMED} more" if len(bad) > _NAMED else ""
    return f"{len(bad)} of {n} {what} image file(s) cannot be read: {named}{more}"
