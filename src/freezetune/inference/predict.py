"""Predicting with a trained model: the most likely classes of image files, of a text model's files (CSV rows, text
lines) or of texts given as strings, and the lines ``freezetune predict`` prints for them.

A checkpoint (path or record) or a ``LoadedModel`` (``inference.evaluation.load_model``) is accepted, so a notebook
loads a model once and predicts many times.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from freezetune.config.options import TOPK, check, column_name_problem, positive_int_problem
from freezetune.data.text import refuse_other_settings
from freezetune.data.text_table import Columns, blank
from freezetune.data.utf8 import decoded
from freezetune.device.bn_fold import foldable, folded
from freezetune.errors import ConfigError, DataError
from freezetune.inference.evaluation import BATCH_SIZE, LoadedModel, count_cut, load_model, text_tokenizer, warn_cut
from freezetune.run.display import printable
from freezetune.training.eval_loop import predict_probs

log = logging.getLogger(__name__)


def predict_files(
    model: LoadedModel | str | Path | dict,
    paths: Sequence[str | Path] | str | Path,
    *,
    topk: int = TOPK,
    batch_size: int = BATCH_SIZE,
    device: str = "auto",
    text_column: str | None = None,
    progress: bool = False,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """The ``topk`` most likely classes of each image under ``paths`` (files, or folders searched recursively); for
    a text model, of each text in ``paths``: a CSV's (a ``.jsonl``'s) text column, or a text file's lines (one text a
    line; folders give their ``.txt``, ``.csv``, ``.tsv`` and ``.jsonl`` files), read by ``data.text.numbered_texts``.

    Args:
        model: a ``LoadedModel`` or a checkpoint (path or record), loaded on ``device``.
        paths: image files and folders; for a text model, text files and folders.
        topk: classes per image or text (all of them if the model has fewer).
        batch_size: images or texts per forward pass.
        device: where a checkpoint is loaded (``auto``: CUDA, then MPS, then CPU).
        text_column: a text model's CSVs: the column of their texts (default: the column the model trained on,
            ``--text-column``, else the one named text, sentence, review, document or content).
        progress: a progress bar over the images on stderr (``epoch_log.progress_bar``; the command line's).
        on_record: called with each record, in the order returned, as soon as its batch is scored (the command line
            prints it then: 10 000 images printed nothing until the last was scored, and ``| head`` waited for all).

    Returns:
        One JSON-ready record per image, in path order: ``{"path": str, "top": [{"class": str, "prob": float}]}``,
        most likely first; a file that cannot be read gets ``{"path": str, "error": str}`` instead. A text model
        gives one record per text, in file order, with ``"row"`` (the line of the file the text starts on, from 1;
        a CSV's header is line 1) and ``"text"`` added; a file it cannot read gets one error record.

    >>> predict_files("runs/r50/best.pt", ["photos/"], topk=2)  # doctest: +SKIP
    [{'path': 'photos/a.jpg', 'top': [{'class': 'cat', 'prob': 0.93}, {'class': 'dog', 'prob': 0.05}]}]
    """
    for name, value in (("topk", topk), ("batch_size", batch_size)):
        check(positive_int_problem(name, value))
    if isinstance(paths, (str, os.PathLike)):  # one path, not its characters
        paths = [paths]
    check(column_name_problem("text_column", text_column))
    paths = [str(p) for p in paths]
    if not paths:  # it said "no images found in ;" (the folder of no name)
        raise ConfigError("no paths to predict: give image files or folders (a text model's: text files or folders)")
    if empty := [p for p in paths if not p.strip()]:  # "$IMG" unset: the current folder was scored, all of it
        raise ConfigError(f"empty path {empty[0]!r} among the paths to predict (an unset shell variable?): give files "
                          "or folders")  # fmt: skip
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device)
    if loaded.preprocess.is_text:
        pre = replace(loaded.preprocess, text_column=text_column or loaded.preprocess.text_column)
        return _predict_text_files(loaded, paths, topk, batch_size, Columns.of(pre), on_record or _ignore)
    refuse_other_settings("this checkpoint's model", {"text_column": text_column} if text_column is not None else {},
                          text_model=False)  # fmt: skip
    return _predict_image_files(loaded, _stdin_paths(paths), topk, batch_size, progress, on_record or _ignore)


def _ignore(record: dict) -> None:
    pass


STDIN = "-"  # a path that reads standard input: image paths, one a line; a text model's texts, one a line


def _stdin_lines() -> list[tuple[int, str]]:
    """Standard input's non-blank lines, numbered from 1 (a pipe: ``ls *.jpg | freezetune predict ... -``).

    Raises:
        DataError: its bytes are not UTF-8, named as a file's are (read as text, a Latin-1 byte ended in a traceback).
    """
    raw = getattr(sys.stdin, "buffer", None)  # a notebook's or a test's stdin holds text already
    text = sys.stdin.read() if raw is None else decoded(raw.read(), "standard input")
    return [(i, line.removesuffix("\r")) for i, line in enumerate(text.split("\n"), 1) if not blank(line)]


def _around_stdin(paths: list[str]) -> tuple[list[str], list[str]] | None:
    """The paths given before ``-`` and after it (a second ``-`` dropped), or None without one."""
    if STDIN not in paths:
        return None
    at = paths.index(STDIN)
    return paths[:at], [p for p in paths[at + 1 :] if p != STDIN]


def _stdin_paths(paths: list[str]) -> list[str]:
    """``paths`` with ``-`` replaced by the image paths standard input lists, one a line."""
    if (around := _around_stdin(paths)) is None:
        return paths
    listed = [line.strip() for _, line in _stdin_lines()]
    if not listed:
        raise DataError("'-' reads image paths from standard input, one a line, and it gave none")
    return [*around[0], *listed, *around[1]]


def _text_sources(paths: list[str]) -> list[str]:
    """The text files under ``paths``, with ``-`` (standard input) where it was given, in the order given."""
    from freezetune.data.text import list_text_files

    if (around := _around_stdin(paths)) is None:
        return list_text_files(paths)
    before, after = around
    return [*(list_text_files(before) if before else []), STDIN, *(list_text_files(after) if after else [])]


def _predict_image_files(loaded: LoadedModel, paths: list[str], topk: int, batch_size: int,
                         progress: bool, on_record: Callable[[dict], None]) -> list[dict]:  # fmt: skip
    from freezetune.data import eval_transform, list_images
    from freezetune.data.scan import unreadable
    from freezetune.training.epoch_log import progress_bar

    pre = loaded.preprocess
    transform = eval_transform(pre)
    files = list_images(paths)
    loaded = _folded_for(loaded, len(files))
    unreadable(files)  # its notes, as a run's pre-scan says them (a corrupt EXIF block); each error is the file's own
    records: dict[str, dict] = {}
    # 10 000 images said nothing for 19 s on a CPU (a 224 px model, a larger folder: minutes), as eval once did
    with progress_bar(len(files), "predicting", enabled=progress, unit="img") as bar:
        for start in range(0, len(files), batch_size):
            batch = files[start : start + batch_size]
            _predict_batch(loaded, batch, transform, topk, records)
            with bar.external_write_mode():  # a line printed under a live bar: the bar steps aside, then comes back
                for path in batch:
                    on_record(records[path])
            bar.update(len(batch))
    return [records[p] for p in files]


# images: for fewer, folding the model's BatchNorm layers (about 70 ms for EfficientNet-Lite0, its fx trace included:
# benchmarks/bn_fold.py) costs more than the faster forward saves
FOLD_FROM = 256


def _folded_for(loaded: LoadedModel, n: int) -> LoadedModel:
    """``loaded`` with its BatchNorm layers folded into its convolutions (``bn_fold``), to predict ``n`` images on a
    CPU; as it is for a few images or on a GPU."""
    if n < FOLD_FROM or loaded.precision.device.type != "cpu" or not foldable(loaded.model):
        return loaded
    return replace(loaded, model=folded(loaded.model))


def _predict_batch(loaded: LoadedModel, batch: list[str], transform, topk: int, records: dict[str, dict]) -> None:
    """Score the image files ``batch`` into ``records`` (an unreadable one gets its error record)."""
    from freezetune.data import load_image

    pre = loaded.preprocess
    chunk, images = [], []
    for path in batch:
        try:  # one unreadable file must not cost the predictions of all the others
            images.append(transform(load_image(path, pre.alpha, pre.decode_side)))
            chunk.append(path)
        except DataError as exc:
            records[path] = {"path": path, "error": str(exc)}
    if not images:
        return
    probs = predict_probs(loaded.model, torch.stack(images), loaded.precision)
    for path, ranked in zip(chunk, _ranked(probs, loaded.classes, topk), strict=True):
        records[path] = {"path": path, "top": ranked}


def predict_texts(
    model: LoadedModel | str | Path | dict,
    texts: Sequence[str],
    *,
    topk: int = TOPK,
    batch_size: int = BATCH_SIZE,
    device: str = "auto",
) -> list[dict]:
    """The ``topk`` most likely classes of each of ``texts`` for a text model (``hf:`` sequence classifier).

    Args:
        model: a ``LoadedModel`` or a checkpoint (path or record) of a text model, loaded on ``device``.
        texts: the texts, as strings.
        topk: classes per text (all of them if the model has fewer).
        batch_size: texts per forward pass (each batch is padded to its longest text).
        device: where a checkpoint is loaded (``auto``: CUDA, then MPS, then CPU).

    Returns:
        One JSON-ready record per text, in order: ``{"text": str, "top": [{"class": str, "prob": float}]}``.

    Raises:
        ConfigError: the model is an image model, ``texts`` is one string rather than a list of them, or ``topk`` or
            ``batch_size`` is not a positive integer.

    >>> predict_texts("runs/minilm/best.pt", ["a joy to watch"], topk=1)  # doctest: +SKIP
    [{'text': 'a joy to watch', 'top': [{'class': 'pos', 'prob': 0.91}]}]
    """
    for name, value in (("topk", topk), ("batch_size", batch_size)):
        check(positive_int_problem(name, value))
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"texts must be a list of strings, got {texts!r:.80}")
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device)
    if not loaded.preprocess.is_text:
        raise ConfigError("predict_texts needs a text model (hf:DIR_OR_ID sequence classifier); this checkpoint's "
                          "model reads images: use predict_files")  # fmt: skip
    tokenizer = text_tokenizer(loaded)
    empty = [i for i, text in enumerate(texts) if blank(text)]
    if empty:  # kept, one record a text in order, but said: predict on files leaves them out, train refuses them
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        log.warning("%d of the texts are empty (index %s): scored from the model's special tokens alone, their classes "
                    "say nothing of them", len(empty), shown)  # fmt: skip
    warn_cut(count_cut(list(texts), tokenizer), tokenizer.max_length)
    return _rank_texts(loaded, tokenizer, list(texts), topk, batch_size)


def _rank_texts(loaded: LoadedModel, tokenizer, texts: list[str], topk: int, batch_size: int) -> list[dict]:
    records = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        probs = predict_probs(loaded.model, tokenizer.tokenize(chunk), loaded.precision)
        records += [{"text": t, "top": r} for t, r in zip(chunk, _ranked(probs, loaded.classes, topk), strict=True)]
    return records


def _predict_text_files(loaded: LoadedModel, paths: list[str], topk: int, batch_size: int, columns: Columns,
                        on_record: Callable[[dict], None]) -> list[dict]:  # fmt: skip
    from freezetune.data.text import numbered_texts

    tokenizer = text_tokenizer(loaded)  # once, not once a file
    records, cut = [], (0, 0, 0)
    for path in _text_sources(paths):
        try:  # one unreadable file must not cost the predictions of all the others
            numbered = _stdin_lines() if path == STDIN else numbered_texts(path, columns)
            if not numbered:
                raise DataError("'-' reads texts from standard input, one a line, and it gave none")
        except DataError as exc:
            records.append({"path": path, "error": str(exc)})
            on_record(records[-1])
            continue
        empty = [line for line, text in numbered if blank(text)]
        if empty:  # a CSV's empty text keeps its row (its file is read whole) but has nothing to score, as a .txt's
            log.warning("'%s': %d empty text(s) not scored (line%s %s)", path, len(empty), "s" * (len(empty) > 1),
                        ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else ""))  # fmt: skip
            numbered = [(line, text) for line, text in numbered if not blank(text)]
        texts = [text for _, text in numbered]
        cut = count_cut(texts, tokenizer, cut)
        for start in range(0, len(texts), batch_size):  # a batch at a time: a long file's records are said as they come
            part = numbered[start : start + batch_size]
            ranked = _rank_texts(loaded, tokenizer, [text for _, text in part], topk, batch_size)
            for (line, _), r in zip(part, ranked, strict=True):
                records.append({"path": path, "row": line, **r})
                on_record(records[-1])
    warn_cut(cut, tokenizer.max_length)
    return records


def _ranked(probs: torch.Tensor, classes: list[str], topk: int) -> list[list[dict]]:
    """Per row of ``probs``, its ``topk`` classes with their probabilities, most likely first."""
    top = probs.topk(min(topk, len(classes)), dim=-1)
    return [
        [{"class": classes[i], "prob": round(float(v), 6)} for v, i in zip(values, indices, strict=True)]
        for values, indices in zip(top.values, top.indices, strict=True)
    ]


def format_predictions(records: list[dict]) -> str:
    """One line per image: its path, then each class with its probability in percent; per text: its file and row
    (when it came from a file), the classes, then the text (its first 60 characters). A control character in a path or
    a class name (an ANSI escape, a newline in a folder's name) is shown as its escape (``run.display.printable``):
    raw, it recoloured the terminal and split an image's line in two. ``--json`` keeps the real names.

    >>> print(format_predictions([{"path": "a.jpg", "top": [{"class": "cat", "prob": 0.9}, {"class": "dog", "prob": 0.1}]}]))
    a.jpg  cat 90.0%  dog 10.0%
    >>> print(format_predictions([{"path": "r.txt", "row": 2, "text": "a joy", "top": [{"class": "pos", "prob": 0.8}]}]))
    r.txt:2  pos 80.0%  'a joy'
    """
    return "\n".join(_prediction_line(r) for r in records if "top" in r)


def _prediction_line(record: dict) -> str:
    classes = "  ".join(f"{printable(p['class'])} {100 * p['prob']:.1f}%" for p in record["top"])
    if "text" not in record:
        return f"{printable(record['path'])}  {classes}"
    where = f"{printable(record['path'])}:{record['row']}  " if "path" in record else ""
    text = record["text"] if len(record["text"]) <= 60 else record["text"][:59] + "…"
    return f"{where}{classes}  {text!r}"


class PredictionPrinter:
    """Prints ``predict``'s records as they come: a line each (``text``: ``format_predictions``'s; ``jsonl``: the
    record as JSON), or ``json``: one list, indented as ``json.dumps(records, indent=1)`` writes it; an unreadable
    file's error goes to stderr at once (and, as JSON, among the records)."""

    def __init__(self, how: str) -> None:
        self.how, self.count = how, 0

    def __call__(self, record: dict) -> None:
        if "error" in record:
            print(f"freezetune: error: {printable(record['error'])}", file=sys.stderr)
        if self.how == "json":
            item = "\n".join(" " + line for line in json.dumps(record, indent=1).splitlines())
            print(("[\n" if not self.count else ",\n") + item, end="", flush=True)
        elif self.how == "jsonl":
            print(json.dumps(record), flush=True)
        elif "error" not in record:
            print(format_predictions([record]), flush=True)
        self.count += 1

    def end(self, *, complete: bool = True) -> None:
        """Closes the ``json`` list; a run cut short (Ctrl-C, an error) closes the list it began, so what was printed
        stays one valid JSON document, and prints nothing where it had not begun one."""
        if self.how == "json" and (self.count or complete):
            print("\n]" if self.count else "[]", flush=True)
