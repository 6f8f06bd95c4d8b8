"""The pre-scan of image files: every file's header is read before training, so a corrupt or truncated image stops
the run at its start, named, instead of surfacing hours in as a worker traceback.

Only headers are read (PIL opens lazily; ``verify`` checks the structure without decoding pixels), in a few threads
because the cost is file-system latency, so ten thousand files take seconds.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from freezetune.data.folder import FileImageDataset
from freezetune.errors import DataError

log = logging.getLogger(__name__)

_THREADS = 8  # file opens wait on the disk, not the CPU
_NAMED = 5  # unreadable files named in the error; the count says how many more


def image_problem(path: str) -> str | None:
    """Why ``path`` is not a readable image (one short reason), or None when its header is sound.

    >>> image_problem("/nonexistent.png")
    'No such file or directory'
    """
    try:
        with Image.open(path) as img:
            img.verify()  # structure and checksums where the format has them; no pixel decode
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error ... for broken files
        why = getattr(exc, "strerror", None) or str(exc).split("\n")[0] or type(exc).__name__
        return why.replace(f" {str(path)!r}", "")  # PIL repeats the path the message is already about
    return None


def unreadable(paths: list[str]) -> list[tuple[str, str]]:
    """``(path, reason)`` of each file in ``paths`` whose image header cannot be read, in the order given.

    >>> unreadable([])
    []
    """
    with ThreadPoolExecutor(_THREADS) as pool:
        reasons = list(pool.map(image_problem, paths))
    return [(p, why) for p, why in zip(paths, reasons, strict=True) if why is not None]


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
    if not isinstance(ds, FileImageDataset):
        return ds, []
    bad = unreadable([path for path, _ in ds.samples])
    if not bad:
        return ds, []
    if not skip_bad:
        named = ", ".join(f"'{path}' ({why})" for path, why in bad[:_NAMED])
        more = f" and {len(bad) - _NAMED} more" if len(bad) > _NAMED else ""
        raise DataError(f"{len(bad)} of {len(ds)} {what} image file(s) cannot be read: {named}{more}; {hint}")
    skipped = [path for path, _ in bad]
    left_out = set(skipped)
    keep = [i for i, (path, _) in enumerate(ds.samples) if path not in left_out]
    log.warning("skipping %d unreadable %s image file(s), first: %s", len(bad), what, skipped[0])
    return ds.select(keep, ds.transform), skipped
