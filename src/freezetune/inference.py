"""Using a trained model: evaluate it on a dataset, write the evaluation, and predict the classes of image files.

The CLI's ``eval`` and ``predict`` and the trainer's final test call these functions; a checkpoint (path or loaded
record) or an in-memory model are both accepted, so the same evaluation runs in a notebook.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from freezetune import checkpoint as ckpt
from freezetune._io import atomic_write_text
from freezetune.config import TrainConfig
from freezetune.data.loaders import Loaders, close_loader
from freezetune.errors import DataError
from freezetune.evaluate import evaluate, predict_probs
from freezetune.options import check, positive_int_problem
from freezetune.precision import Precision, resolve_device, resolve_precision
from freezetune.preprocess import Preprocess
from freezetune.runtime import use_channels_last

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
    channels_last = use_channels_last(record.get("config", {}).get("channels_last"), model, precision.device)
    model.to(precision.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    return LoadedModel(model.eval(), list(record["classes"]), pre, precision, channels_last)


def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    *,
    num_classes: int,
    precision: Precision,
    batch_size: int = _BATCH_SIZE,
    workers: int | None = None,
    channels_last: bool = False,
    loaders: Loaders | None = None,
    shard: bool = False,
) -> dict:
    """Evaluate ``model`` on every sample of ``dataset`` (its transform already set), in order, without gradients.

    Returns ``evaluate``'s metrics: loss, acc, top-k, per-class accuracy, macro-F1, confusion, n. ``workers``: loader
    processes (default: ``data.default_workers``). ``loaders``: a run's loader factory (then ``batch_size`` and
    ``workers`` are its own, and image data may go through the device pipeline); default the CPU loader over the
    dataset's own transform. ``shard``: every rank of the ``loaders``' torchrun job calls this, scores its block of
    the dataset and returns the merged metrics of all (one process's numbers exactly; rank 0 need not score it alone).

    >>> from freezetune.data import InMemoryImageDataset
    >>> ds = InMemoryImageDataset(torch.zeros(5, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1, 0]), ["a", "b"])
    >>> ds.transform = lambda img: img.float().flatten()
    >>> model = torch.nn.Linear(4, 2)
    >>> evaluate_model(model, ds, num_classes=2, precision=resolve_precision(torch.device("cpu")))["n"]
    5
    """
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
    """Evaluate a checkpoint on ``data``: a path (its test split, see ``data.build_eval_dataset``) or a dataset.

    Returns:
        ``evaluate_model``'s metrics plus ``classes``, the class names index-aligned with the confusion matrix.

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
    loaders = Loaders(batch_size=batch_size, device=loaded.precision.device, seed=0, preprocess=loaded.preprocess)
    result = evaluate_model(loaded.model, dataset, num_classes=len(loaded.classes), precision=loaded.precision,
                            loaders=loaders, channels_last=loaded.channels_last)  # fmt: skip
    return {**result, "classes": loaded.classes}


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

    if plot is not None:
        plot_confusion(result, classes, plot)
    if metrics is not None:
        atomic_write_text(metrics, json.dumps(result, indent=1))
    return format_report(result, classes)


def predict_files(
    model: LoadedModel | str | Path | dict,
    paths: Sequence[str | Path],
    *,
    topk: int = 5,
    batch_size: int = _BATCH_SIZE,
    device: str = "auto",
) -> list[dict]:
    """The ``topk`` most likely classes of each image under ``paths`` (files, or folders searched recursively).

    Args:
        model: a ``LoadedModel`` or a checkpoint (path or record), loaded on ``device``.
        paths: image files and folders.
        topk: classes per image (all of them if the model has fewer).
        batch_size: images per forward pass.
        device: where a checkpoint is loaded (``auto``: CUDA, then MPS, then CPU).

    Returns:
        One JSON-ready record per image, in path order: ``{"path": str, "top": [{"class": str, "prob": float}]}``,
        most likely first; a file that cannot be read gets ``{"path": str, "error": str}`` instead.

    >>> predict_files("runs/r50/best.pt", ["photos/"], topk=2)  # doctest: +SKIP
    [{'path': 'photos/a.jpg', 'top': [{'class': 'cat', 'prob': 0.93}, {'class': 'dog', 'prob': 0.05}]}]
    """
    from freezetune.data import eval_transform, list_images, load_image

    for name, value in (("topk", topk), ("batch_size", batch_size)):
        check(positive_int_problem(name, value))
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device)
    transform, classes = eval_transform(loaded.preprocess), loaded.classes
    files = list_images([str(p) for p in paths])
    records: dict[str, dict] = {}
    for start in range(0, len(files), batch_size):
        chunk, images = [], []
        for path in files[start : start + batch_size]:
            try:  # one unreadable file must not cost the predictions of all the others
                images.append(transform(load_image(path)))
                chunk.append(path)
            except DataError as exc:
                records[path] = {"path": path, "error": str(exc)}
        if not images:
            continue
        probs = predict_probs(loaded.model, torch.stack(images), loaded.precision)
        top = probs.topk(min(topk, len(classes)), dim=-1)
        for path, values, indices in zip(chunk, top.values, top.indices, strict=True):
            ranked = [{"class": classes[i], "prob": round(float(v), 6)} for v, i in zip(values, indices, strict=True)]
            records[path] = {"path": path, "top": ranked}
    return [records[p] for p in files]


def format_predictions(records: list[dict]) -> str:
    """One line per image: its path, then each class with its probability in percent.

    >>> print(format_predictions([{"path": "a.jpg", "top": [{"class": "cat", "prob": 0.9}, {"class": "dog", "prob": 0.1}]}]))
    a.jpg  cat 90.0%  dog 10.0%
    """
    return "\n".join(
        r["path"] + "  " + "  ".join(f"{p['class']} {100 * p['prob']:.1f}%" for p in r["top"])
        for r in records
        if "top" in r
    )
