"""Using a trained model: evaluate it on a dataset, write the evaluation, and predict the classes of image files or
of texts.

The CLI's ``eval`` and ``predict`` and the trainer's final test call these functions; a checkpoint (path or loaded
record) or an in-memory model are both accepted, so the same evaluation runs in a notebook.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from freezetune import checkpoint as ckpt
from freezetune._io import atomic_write_text
from freezetune.config import TrainConfig
from freezetune.data.loaders import Loaders, close_loader
from freezetune.data.text import Columns, refuse_text_settings
from freezetune.errors import ConfigError, DataError, setting
from freezetune.evaluate import evaluate, predict_probs
from freezetune.options import check, column_name_problem, positive_int_problem
from freezetune.precision import Precision, resolve_device, resolve_precision
from freezetune.preprocess import Preprocess
from freezetune.runtime import use_channels_last

log = logging.getLogger(__name__)

_BATCH_SIZE = TrainConfig.batch_size  # the dataclass default: evaluation results do not depend on it, only speed


@dataclass
class LoadedModel:
    """A model ready for inference: in eval mode on its device, with its class names and preprocessing."""

    model: nn.Module
    classes: list[str]
    preprocess: Preprocess
    precision: Precision
    channels_last: bool = False  # the memory format the run trained and scored its test split in


def load_model(checkpoint: str | Path | dict, device: str = "auto") -> LoadedModel:
    """Rebuild the model of a checkpoint (a path or a record from ``checkpoint.load``) on ``device``.

    Inference runs in fp32 (AMP off), as the CLI always has: the numbers do not depend on the card. The memory
    format is the run's (``runtime.use_channels_last``), so ``eval`` of ``best.pt`` on the CPU reproduces the run's
    ``test_metrics.json`` to the last digit.

    >>> loaded = load_model("runs/r50/best.pt", device="cpu")  # doctest: +SKIP
    >>> loaded.classes[:2]  # doctest: +SKIP
    ['cat', 'dog']
    """
    record = checkpoint if isinstance(checkpoint, dict) else ckpt.load(checkpoint)
    model, pre = ckpt.build_model(record)
    precision = resolve_precision(resolve_device(device))
    channels_last = use_channels_last(record.get("config", {}).get("channels_last"), model)
    model.to(precision.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    return LoadedModel(model.eval(), list(record["classes"]), pre, precision, channels_last)


def default_plot(checkpoint: str | Path, data: str | Path) -> Path:
    """Where ``freezetune eval`` draws the confusion matrix of ``data`` without ``--plot``: beside the checkpoint,
    named after the data and a digest of its absolute path, so that evaluating a second dataset (another folder's
    ``test.csv``) never replaces the first one's plot, and evaluating the same data again replaces its own.

    >>> default_plot("runs/r1/best.pt", "/data/shop/test.csv").name
    'eval_test.csv-e3bac4_confusion.png'
    """
    name = re.sub(r"[^\w.-]+", "_", Path(data).name or "data")
    digest = hashlib.sha1(os.path.abspath(data).encode("utf-8", "surrogateescape")).hexdigest()[:6]
    return Path(checkpoint).with_name(f"eval_{name}-{digest}_confusion.png")


def check_outputs(plot: str | Path | None, metrics: str | Path | None) -> None:
    """Refuse one file named for both the plot and the metrics: the plot, drawn second, replaced the JSON."""
    if plot is not None and metrics is not None and Path(plot).resolve() == Path(metrics).resolve():
        raise ConfigError(f"{setting('metrics')} and {setting('plot')} both name {str(metrics)!r}: the plot would "
                          "replace the metrics; give each its own file")  # fmt: skip


def kept_output(path: str | Path, checkpoint: str | Path, *, force: bool, metrics: bool) -> str | None:
    """Why an evaluation must not write its ``metrics`` JSON or its plot to ``path``, or None: it is the checkpoint
    (``--metrics best.pt`` replaced the model with JSON), or an existing file, unless ``force`` or it is what an
    evaluation wrote there before (a batch job run again): for metrics, a JSON of an evaluation; for a plot, any
    image. A run's own files (its ``report.png``, and its final test's ``confusion.png`` and ``test_metrics.json``)
    are not an evaluation's.

    >>> kept_output("no/such/file.json", "best.pt", force=False, metrics=True) is None
    True
    """
    path = Path(path)
    if not path.exists():
        return None
    if Path(checkpoint).exists() and path.samefile(checkpoint):
        return "is the checkpoint being evaluated: name another file"
    if force or _evaluation_output(path, metrics):
        return None
    return "exists: give --force to replace it, or another path"


def _evaluation_output(path: Path, metrics: bool) -> bool:
    from freezetune.reporting import METRICS_CSV
    from freezetune.runtime import END_FILES

    if path.name in END_FILES and (path.parent / METRICS_CSV).exists():  # a run's: an eval replaced its test record
        return False
    if not metrics:
        return True
    try:
        written = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(written, dict) and {"confusion", "n", "data"} <= written.keys()


def _check_labels(dataset: Dataset, num_classes: int) -> None:
    """A dataset whose labels (``targets``, where it has them) a ``num_classes`` model cannot score: torch's
    IndexError from deep in the loss, otherwise."""
    targets = getattr(dataset, "targets", None)
    if not isinstance(targets, torch.Tensor) or not len(targets):
        return
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= num_classes:
        raise DataError(f"the dataset's labels run from {low} to {high}, and num_classes is {num_classes}: labels are "
                        f"0 to {num_classes - 1}")  # fmt: skip


def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    *,
    num_classes: int,
    precision: Precision | None = None,
    batch_size: int = _BATCH_SIZE,
    workers: int | None = None,
    channels_last: bool = False,
    loaders: Loaders | None = None,
    shard: bool = False,
) -> dict:
    """Evaluate ``model`` on every sample of ``dataset`` (its transform already set), in order, without gradients.

    Returns ``evaluate``'s metrics: loss, acc, top-k, per-class accuracy, macro-F1, confusion, n. ``precision``:
    default the model's device with ``amp="auto"`` (``precision.resolve_precision``). ``workers``: loader
    processes (default: ``data.default_workers``). ``loaders``: a run's loader factory (then ``batch_size`` and
    ``workers`` are its own, and image data may go through the device pipeline); default the CPU loader over the
    dataset's own transform. ``shard``: every rank of the ``loaders``' torchrun job calls this, scores its block of
    the dataset and returns the merged metrics of all (one process's numbers exactly; rank 0 need not score it alone).

    >>> from freezetune.data import InMemoryImageDataset
    >>> ds = InMemoryImageDataset(torch.zeros(5, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1, 0]), ["a", "b"])
    >>> ds.transform = lambda img: img.float().flatten()
    >>> model = torch.nn.Linear(4, 2)
    >>> evaluate_model(model, ds, num_classes=2)["n"]
    5
    """
    _check_labels(dataset, num_classes)
    if precision is None:  # a notebook's call: the model's device, its automatic precision
        precision = resolve_precision(next(model.parameters()).device)
    if loaders is None:
        loaders = Loaders(batch_size=batch_size, device=precision.device, seed=0, preprocess=Preprocess(),
                          decode="cpu", workers=workers)  # fmt: skip
    batches = loaders.eval(dataset, shard=shard)
    try:
        return evaluate(model, batches, precision, num_classes=num_classes, channels_last=channels_last,
                        dist=loaders.dist if shard else None)  # fmt: skip
    finally:  # an error's traceback keeps this frame, and the loader's persistent workers with it: stop them now
        close_loader(batches)


def evaluate_checkpoint(
    checkpoint: str | Path | dict, data: str | Dataset, *, batch_size: int = _BATCH_SIZE, device: str = "auto"
) -> dict:
    """Evaluate a checkpoint on ``data``: a path (its test split, see ``data.build_eval_dataset``; a text model's is a
    ``text,label`` CSV) or a dataset, read as it is (its transform and, image files, its ``alpha``; a path's are the
    checkpoint's).

    Returns:
        ``evaluate_model``'s metrics plus ``classes``, the class names index-aligned with the confusion matrix, and
        ``data``: what was scored, in words (``None`` for a dataset given).

    >>> result = evaluate_checkpoint("runs/r50/best.pt", "images/", device="cpu")  # doctest: +SKIP
    >>> print(write_evaluation(result, result["classes"], plot="runs/r50/eval_confusion.png"))  # doctest: +SKIP
    """
    check(positive_int_problem("batch_size", batch_size))  # before the checkpoint and the data are read
    loaded = load_model(checkpoint, device)
    if isinstance(data, Dataset):
        dataset = data
    else:
        from freezetune.data import build_eval_dataset

        dataset = build_eval_dataset(str(data), preprocess=loaded.preprocess, classes=loaded.classes)
    if loaded.preprocess.is_text:
        tokenizer = _tokenizer(loaded)
        _warn_cut(_count_cut([dataset[i][0] for i in range(len(dataset))], tokenizer), tokenizer.max_length)
    loaders = Loaders(batch_size=batch_size, device=loaded.precision.device, seed=0, preprocess=loaded.preprocess)
    result = evaluate_model(loaded.model, dataset, num_classes=len(loaded.classes), precision=loaded.precision,
                            loaders=loaders, channels_last=loaded.channels_last)  # fmt: skip
    return {**result, "classes": loaded.classes, "data": getattr(dataset, "source", None)}


def evaluate_best(model: nn.Module, best: Path, test: Dataset, *, num_classes: int, precision: Precision,
                  channels_last: bool, loaders: Loaders, dist) -> dict | None:  # fmt: skip
    """A run's ``best.pt`` (rank 0's file) loaded into ``model`` and scored on ``test``; None when it was not written.

    Under DDP (``dist``) every rank scores its block of ``test`` with rank 0's weights and the counts are merged: no
    rank waits at a barrier (and its timeout) while rank 0 scores a large test set alone.
    """
    from freezetune.distributed import broadcast, broadcast_tensors

    if not broadcast(best.exists(), dist):  # rank 0 wrote it; the other ranks may not see its disk
        return None
    if dist.is_main:
        model.load_state_dict(ckpt.load(best)["state_dict"])
    broadcast_tensors(model.state_dict().values(), dist)
    return evaluate_model(model, test, num_classes=num_classes, precision=precision, channels_last=channels_last,
                          loaders=loaders, shard=True)  # fmt: skip


def write_evaluation(
    result: dict, classes: list[str], *, plot: str | Path | None = None, metrics: str | Path | None = None
) -> str:
    """Write what an evaluation found and return its report text (``metrics.format_report``) for printing.

    Args:
        result: metrics from ``evaluate_model`` or ``evaluate_checkpoint``.
        classes: class names, index-aligned with the confusion matrix.
        plot: where to draw the confusion matrix (PNG); None draws none.
        metrics: where to write ``result`` as JSON; None writes none.

    >>> from freezetune.metrics import ClassificationMeter
    >>> meter = ClassificationMeter(2)
    >>> meter.update(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    >>> write_evaluation(meter.compute(), ["cat", "dog"]).splitlines()[0].split()[:2]
    ['n', '2']
    """
    from freezetune.metrics import format_report, plot_confusion  # matplotlib: only when a report is made

    check_outputs(plot, metrics)
    if metrics is not None:  # first: the numbers asked for by name do not wait on a plot that may fail
        atomic_write_text(metrics, json.dumps(result, indent=1))
    if plot is not None:
        plot_confusion(result, classes, plot)
    return format_report(result, classes)


def predict_files(
    model: LoadedModel | str | Path | dict,
    paths: Sequence[str | Path] | str | Path,
    *,
    topk: int = 5,
    batch_size: int = _BATCH_SIZE,
    device: str = "auto",
    text_column: str | None = None,
) -> list[dict]:
    """The ``topk`` most likely classes of each image under ``paths`` (files, or folders searched recursively); for
    a text model, of each text in ``paths``: a CSV's text column, or a text file's lines (one text a line; folders
    give their ``.txt`` and ``.csv`` files), read by ``data.text.numbered_texts``.

    Args:
        model: a ``LoadedModel`` or a checkpoint (path or record), loaded on ``device``.
        paths: image files and folders; for a text model, text files and folders.
        topk: classes per image or text (all of them if the model has fewer).
        batch_size: images or texts per forward pass.
        device: where a checkpoint is loaded (``auto``: CUDA, then MPS, then CPU).
        text_column: a text model's CSVs: the column of their texts (default: the column the model trained on,
            ``--text-column``, else the one named text, sentence, review, document or content).

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
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device)
    if loaded.preprocess.is_text:
        pre = replace(loaded.preprocess, text_column=text_column or loaded.preprocess.text_column)
        return _predict_text_files(loaded, [str(p) for p in paths], topk, batch_size, Columns.of(pre))
    refuse_text_settings("this checkpoint's model", {"text_column": text_column} if text_column is not None else {})
    return _predict_image_files(loaded, [str(p) for p in paths], topk, batch_size)


def _predict_image_files(loaded: LoadedModel, paths: list[str], topk: int, batch_size: int) -> list[dict]:
    from freezetune.data import eval_transform, list_images, load_image

    pre = loaded.preprocess
    transform = eval_transform(pre)
    files = list_images(paths)
    records: dict[str, dict] = {}
    for start in range(0, len(files), batch_size):
        chunk, images = [], []
        for path in files[start : start + batch_size]:
            try:  # one unreadable file must not cost the predictions of all the others
                images.append(transform(load_image(path, pre.alpha, pre.decode_side)))
                chunk.append(path)
            except DataError as exc:
                records[path] = {"path": path, "error": str(exc)}
        if not images:
            continue
        probs = predict_probs(loaded.model, torch.stack(images), loaded.precision)
        for path, ranked in zip(chunk, _ranked(probs, loaded.classes, topk), strict=True):
            records[path] = {"path": path, "top": ranked}
    return [records[p] for p in files]


def predict_texts(
    model: LoadedModel | str | Path | dict,
    texts: Sequence[str],
    *,
    topk: int = 5,
    batch_size: int = _BATCH_SIZE,
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
    tokenizer = _tokenizer(loaded)
    _warn_cut(_count_cut(list(texts), tokenizer), tokenizer.max_length)
    return _rank_texts(loaded, tokenizer, list(texts), topk, batch_size)


def _tokenizer(loaded: LoadedModel):
    from freezetune.data.text import TokenizeBatch

    return TokenizeBatch(loaded.preprocess.tokenizer, loaded.preprocess.max_length)


def _warn_cut(counted: tuple[int, int, int], max_length: int) -> None:
    """Say how many texts the model sees only the start of (the tokenizer cuts them silently), from ``_count_cut``'s
    (long, total, longest)."""
    from freezetune.data.text import scoring_cut_note

    if note := scoring_cut_note(*counted, max_length):
        log.warning(note)


def _count_cut(texts: list[str], tokenizer, counted: tuple[int, int, int] = (0, 0, 0)) -> tuple[int, int, int]:
    """(long, total, longest) of ``texts`` added to those ``counted`` before (a file at a time)."""
    from freezetune.data.text import long_texts

    long, longest = long_texts(texts, tokenizer)
    return counted[0] + long, counted[1] + len(texts), max(counted[2], longest)


def _rank_texts(loaded: LoadedModel, tokenizer, texts: list[str], topk: int, batch_size: int) -> list[dict]:
    records = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        probs = predict_probs(loaded.model, tokenizer.tokenize(chunk), loaded.precision)
        records += [{"text": t, "top": r} for t, r in zip(chunk, _ranked(probs, loaded.classes, topk), strict=True)]
    return records


def _predict_text_files(loaded: LoadedModel, paths: list[str], topk: int, batch_size: int,
                        columns: Columns) -> list[dict]:  # fmt: skip
    from freezetune.data.text import list_text_files, numbered_texts

    tokenizer = _tokenizer(loaded)  # once, not once a file
    records, cut = [], (0, 0, 0)
    for path in list_text_files(paths):
        try:  # one unreadable file must not cost the predictions of all the others
            numbered = numbered_texts(path, columns)
        except DataError as exc:
            records.append({"path": path, "error": str(exc)})
            continue
        texts = [text for _, text in numbered]
        cut = _count_cut(texts, tokenizer, cut)
        predicted = _rank_texts(loaded, tokenizer, texts, topk, batch_size)
        records += [{"path": path, "row": line, **r} for (line, _), r in zip(numbered, predicted, strict=True)]
    _warn_cut(cut, tokenizer.max_length)
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
    (when it came from a file), the classes, then the text (its first 60 characters).

    >>> print(format_predictions([{"path": "a.jpg", "top": [{"class": "cat", "prob": 0.9}, {"class": "dog", "prob": 0.1}]}]))
    a.jpg  cat 90.0%  dog 10.0%
    >>> print(format_predictions([{"path": "r.txt", "row": 2, "text": "a joy", "top": [{"class": "pos", "prob": 0.8}]}]))
    r.txt:2  pos 80.0%  'a joy'
    """
    return "\n".join(_prediction_line(r) for r in records if "top" in r)


def _prediction_line(record: dict) -> str:
    classes = "  ".join(f"{p['class']} {100 * p['prob']:.1f}%" for p in record["top"])
    if "text" not in record:
        return f"{record['path']}  {classes}"
    where = f"{record['path']}:{record['row']}  " if "path" in record else ""
    text = record["text"] if len(record["text"]) <= 60 else record["text"][:59] + "…"
    return f"{where}{classes}  {text!r}"
