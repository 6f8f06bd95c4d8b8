"""Using a trained model: load it from a checkpoint, evaluate it on a dataset and write the evaluation (predicting
the classes of files or texts: ``inference/predict.py``).

The CLI's ``eval`` and the trainer's final test call these functions; a checkpoint (path or loaded record) or an
in-memory model are both accepted, so the same evaluation runs in a notebook.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from freezetune._io import atomic_write_text, remove_stale_temps_of
from freezetune.config.options import check, column_name_problem, non_negative_int_problem, positive_int_problem
from freezetune.config.train_config import TrainConfig
from freezetune.data.loaders import Loaders, close_loader
from freezetune.data.transforms import eval_transform
from freezetune.device.hardware import use_channels_last
from freezetune.device.memory import out_of_memory_hint
from freezetune.device.precision import Precision, resolve_device, resolve_precision
from freezetune.errors import ConfigError, DataError, choices, setting
from freezetune.model.preprocess import Preprocess
from freezetune.run import checkpoint as ckpt
from freezetune.training.eval_loop import evaluate
from freezetune.training.metrics import check_labels

log = logging.getLogger(__name__)

BATCH_SIZE = TrainConfig.batch_size  # the dataclass default for predict: results hardly depend on it


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

    Inference runs in fp32 (AMP off, whatever the run trained with): the numbers do not depend on the card's bf16
    or fp16, and match an export's graph. The memory format is the run's (``hardware.use_channels_last``), so
    ``eval`` of ``best.pt`` on the machine that trained it reproduces the run's ``test_metrics.json`` to the last
    digit where the run scored in fp32 (no ``--amp``: the CPU's default; CUDA's is bf16, whose last digits differ).

    >>> loaded = load_model("runs/r50/best.pt", device="cpu")  # doctest: +SKIP
    >>> loaded.classes[:2]  # doctest: +SKIP
    ['cat', 'dog']
    """
    record = checkpoint if isinstance(checkpoint, dict) else ckpt.load(checkpoint)
    model, pre = ckpt.build_model(record)
    precision = resolve_precision(resolve_device(device), "off")  # ("auto" was bf16 on CUDA)
    channels_last = use_channels_last(record.get("config", {}).get("channels_last"), model)
    model.to(precision.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    return LoadedModel(model.eval(), list(record["classes"]), pre, precision, channels_last)


def default_plot(checkpoint: str | Path, data: str | Path) -> Path:
    """Where ``freezetune eval`` draws the confusion matrix of ``data`` without ``--plot``: beside the checkpoint,
    named after the data and a digest of its absolute path, so that evaluating a second dataset (another folder's
    ``test.csv``) never replaces the first one's plot, and evaluating the same data again replaces its own. Another
    checkpoint than ``best.pt`` (``last.pt``) adds its name: the eval of ``last.pt`` replaced ``best.pt``'s plot.

    >>> default_plot("runs/r1/best.pt", "/data/shop/test.csv").name
    'eval_test.csv-e3bac4_confusion.png'
    >>> default_plot("runs/r1/last.pt", "/data/shop/test.csv").name
    'eval_test.csv-e3bac4_last_confusion.png'
    """
    name = re.sub(r"[^\w.-]+", "_", Path(data).name or "data")
    digest = hashlib.sha1(os.path.abspath(data).encode("utf-8", "surrogateescape")).hexdigest()[:6]
    stem = Path(checkpoint).stem
    which = "" if stem == "best" else "_" + re.sub(r"[^\w.-]+", "_", stem)
    return Path(checkpoint).with_name(f"eval_{name}-{digest}{which}_confusion.png")


def check_outputs(plot: str | Path | None, metrics: str | Path | None) -> None:
    """Refuse one file named for both the plot and the metrics (the plot, drawn second, replaced the JSON), and a
    metrics file named for another format than the JSON it holds (``--metrics m.csv`` got JSON)."""
    if plot is not None and metrics is not None and Path(plot).resolve() == Path(metrics).resolve():
        raise ConfigError(f"{setting('metrics')} and {setting('plot')} both name {str(metrics)!r}: the plot would "
                          "replace the metrics; give each its own file")  # fmt: skip
    if metrics is not None and Path(metrics).suffix.lower() != ".json" and not Path(metrics).is_dir():
        raise ConfigError(f"{setting('metrics')} {str(metrics)!r}: the metrics are written as JSON; give a .json file "
                          "(the run's per-epoch metrics.csv is in its run dir)")  # fmt: skip


def eval_outputs(checkpoint: str | Path, data: str | Path, *, plot: str | Path | None = None,
                 metrics: str | Path | None = None, force: bool = False) -> Path:  # fmt: skip
    """Where an evaluation of ``checkpoint`` on ``data`` draws its confusion matrix (``plot``, else ``default_plot``),
    its files checked before anything is scored (a bad one cost the whole evaluation's time): the plot's format, one
    file named for both, a folder or the checkpoint named as a file, an existing file ``kept_output`` keeps (unless
    ``force``). What ``freezetune eval`` checks; ``write_evaluation`` then writes them.

    Raises:
        ConfigError: a file it must not or cannot write, named with why.

    >>> eval_outputs("runs/r1/best.pt", "/data/shop/test", metrics="scores.json").name
    'eval_test-1d531f_confusion.png'
    """
    from freezetune.run.directory import file_problem
    from freezetune.training.metrics import plot_format

    drawn = Path(plot) if plot else default_plot(checkpoint, data)
    plot_format(drawn)
    check_outputs(drawn, metrics)
    _outside_the_data(data, drawn, plot, metrics, checkpoint)
    for flag, path in (("--metrics", metrics), ("--plot", plot)):  # so does a folder given as the file
        problem = path and (
            file_problem(path) or kept_output(path, checkpoint, force=force, metrics=flag == "--metrics")
        )
        if problem:
            raise ConfigError(f"{flag} {str(path)!r}: {problem}")
    return drawn


def _outside_the_data(data: str | Path, drawn: Path | None, plot: str | Path | None, metrics: str | Path | None,
                      checkpoint: str | Path) -> None:  # fmt: skip
    """Refuse a plot or metrics file inside an image folder of ``data`` read for classes: the next evaluation scored
    the plot as a test image of the class folder it was drawn in. The default plot's place (beside the checkpoint)
    only where the checkpoint is one (a zip, as ``torch.save`` writes): an image of the data given as the checkpoint
    is told it is no checkpoint."""
    import zipfile

    from freezetune.data.layout import class_roots

    if plot is None and not (Path(checkpoint).is_file() and zipfile.is_zipfile(checkpoint)):
        drawn = None
    roots = [r.resolve() for r in class_roots(str(data))]
    plot_is = f"--plot {str(plot)!r}" if plot else f"the confusion plot's default place {str(drawn)!r} (beside the " \
        "checkpoint)"  # fmt: skip
    for flag, path, what in (("--plot", drawn, plot_is), ("--metrics", metrics, f"--metrics {str(metrics)!r}")):
        inside = next((r for r in roots if Path(path).resolve().is_relative_to(r)), None) if path else None
        if inside is not None:
            raise ConfigError(f"{what} lies inside the data folder '{inside}', whose folders are read as classes: "
                              f"the next evaluation or run would read it as data; give {flag} outside it")  # fmt: skip


def kept_output(path: str | Path, checkpoint: str | Path, *, force: bool, metrics: bool) -> str | None:
    """Why an evaluation must not write its ``metrics`` JSON or its plot to ``path``, or None: it is the checkpoint
    (``--metrics best.pt`` replaced the model with JSON), or an existing file, unless ``force`` or it is what an
    evaluation wrote there before (a batch job run again): for metrics, a JSON of an evaluation; for a plot, a
    confusion plot freezetune drew (``metrics.drawn_confusion``: a user's photo there is kept). A run's own files
    (its ``report.png``, and its final test's ``confusion.png`` and ``test_metrics.json``) are not an evaluation's.

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
    from freezetune.run.directory import END_FILES
    from freezetune.run.reporting import METRICS_CSV
    from freezetune.training.metrics import drawn_confusion

    if path.name in END_FILES and (path.parent / METRICS_CSV).exists():  # a run's: an eval replaced its test record
        return False
    if not metrics:
        return drawn_confusion(path)
    try:
        written = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(written, dict) and {"confusion", "n", "data"} <= written.keys()


def _check_labels(dataset: Dataset, num_classes: int) -> None:
    """A dataset whose labels (``targets``, where it has them) a ``num_classes`` model cannot score, named before a
    batch is scored (``evaluate`` checks each batch of any other dataset as it scores it)."""
    targets = getattr(dataset, "targets", None)
    if isinstance(targets, torch.Tensor):
        check_labels(targets, num_classes)


def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    *,
    num_classes: int,
    precision: Precision | None = None,
    batch_size: int = BATCH_SIZE,
    workers: int | None = None,
    channels_last: bool = False,
    loaders: Loaders | None = None,
    shard: bool = False,
    bar: str | None = None,
) -> dict:
    """Evaluate ``model`` on every sample of ``dataset`` (its transform already set), in order, without gradients.

    Returns ``evaluate``'s metrics: loss, acc, top-k, per-class accuracy, macro-F1, confusion, n. ``precision``:
    default the model's device with ``amp="auto"`` (``precision.resolve_precision``). ``workers``: loader
    processes (default: ``data.default_workers``). ``loaders``: a run's loader factory (then ``batch_size`` and
    ``workers`` are its own, and image data may go through the device pipeline); default the CPU loader over the
    dataset's own transform. ``shard``: every rank of the ``loaders``' torchrun job calls this, scores its block of
    the dataset and returns the merged metrics of all (one process's numbers exactly; rank 0 need not score it alone).
    ``bar``: the label of a progress bar (None: none).

    >>> from freezetune.data import InMemoryImageDataset
    >>> ds = InMemoryImageDataset(torch.zeros(5, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1, 0]), ["a", "b"])
    >>> ds.transform = lambda img: img.float().flatten()
    >>> model = torch.nn.Linear(4, 2)
    >>> evaluate_model(model, ds, num_classes=2)["n"]
    5
    """
    _check_labels(dataset, num_classes)
    if loaders is None and _yields_images(dataset):  # a notebook's dataset (a run's and a checkpoint's are tensors)
        raise DataError(f"the dataset yields PIL images ({type(dataset).__name__} without a transform to tensors): "
                        "give it transform=ft.eval_transform(pre), pre the model's preprocessing (create_model's, or "
                        "load_model's .preprocess), or score a checkpoint with ft.evaluate_checkpoint, which applies "
                        "its own")  # fmt: skip
    if precision is None:  # a notebook's call: the model's device, its automatic precision
        precision = resolve_precision(next(model.parameters()).device)
    if loaders is None:
        loaders = Loaders(batch_size=batch_size, device=precision.device, seed=0, preprocess=Preprocess(),
                          decode="cpu", workers=workers)  # fmt: skip
    batches = loaders.eval(dataset, shard=shard)
    try:
        return evaluate(model, batches, precision, num_classes=num_classes, channels_last=channels_last,
                        dist=loaders.dist if shard else None, bar=bar)  # fmt: skip
    finally:  # an error's traceback keeps this frame, and the loader's persistent workers with it: stop them now
        close_loader(batches)


def evaluate_checkpoint(
    checkpoint: str | Path | dict,
    data: str | Dataset,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    workers: int | None = None,
    progress: bool = False,
    skip_bad: bool = False,
    text_column: str | None = None,
    label_column: str | None = None,
) -> dict:
    """Evaluate a checkpoint on ``data``: a path (its test split, see ``data.build_eval_dataset``; a text model's is a
    ``text,label`` CSV, its columns those the run read unless ``text_column``/``label_column`` name others) or a
    dataset, read as it is (its transform and, image files, its ``alpha``; a path's are the checkpoint's).

    ``batch_size`` (default: the run's, ``run_batch_size``) changes no prediction, but the loss's float rounding may
    differ with it (and with the CPU threads): at the run's, ``eval`` of ``best.pt`` on the machine that trained it
    reproduces the run's ``test_metrics.json`` to the last digit, where the run scored in fp32 (``load_model``).
    ``workers``: loader processes (default: ``data.default_workers``). ``progress``: a progress bar over the batches.
    ``skip_bad``: a path's unreadable image files are left out (``data.build_eval_dataset``), as a run's
    ``--skip-bad`` left them out of its test split, rather than refused.

    Returns:
        ``evaluate_model``'s metrics plus ``classes``, the class names index-aligned with the confusion matrix, and
        ``data``: what was scored, in words (``None`` for a dataset given).

    >>> result = evaluate_checkpoint("runs/r50/best.pt", "images/", device="cpu")  # doctest: +SKIP
    >>> print(write_evaluation(result, result["classes"], plot="runs/r50/eval_confusion.png"))  # doctest: +SKIP
    """
    if batch_size is not None:
        check(positive_int_problem("batch_size", batch_size))  # before the checkpoint and the data are read
    if workers is not None:
        check(non_negative_int_problem("workers", workers))
    columns = {k: v for k, v in (("text_column", text_column), ("label_column", label_column)) if v is not None}
    for name, value in columns.items():
        check(column_name_problem(name, value))
    record = checkpoint if isinstance(checkpoint, dict) else ckpt.load(checkpoint)
    batch_size = batch_size or run_batch_size(record)
    loaded = load_model(record, device)
    if isinstance(data, Dataset):
        # torchvision's ImageFolder without a transform yields PIL images: seen through the checkpoint's own eval
        # transform, as a path's images are (a worker's collate raised a TypeError on them)
        text = loaded.preprocess.is_text
        _check_classes(data, loaded.classes)
        dataset = _Transformed(data, eval_transform(loaded.preprocess)) if not text and _yields_images(data) else data
    else:
        from freezetune.data import build_eval_dataset
        from freezetune.data.text import refuse_other_settings

        if not loaded.preprocess.is_text:  # an image model's data has no columns
            refuse_other_settings("this checkpoint's model", columns, text_model=False)
        dataset = build_eval_dataset(str(data), preprocess=replace(loaded.preprocess, **columns),
                                     classes=loaded.classes, skip_bad=skip_bad,
                                     text_column_given="text_column" in columns)  # fmt: skip
    if loaded.preprocess.is_text:
        tokenizer = text_tokenizer(loaded)
        warn_cut(count_cut([dataset[i][0] for i in range(len(dataset))], tokenizer), tokenizer.max_length)
    loaders = Loaders(batch_size=batch_size, device=loaded.precision.device, seed=0, preprocess=loaded.preprocess,
                      workers=workers)  # fmt: skip
    with out_of_memory_hint(batch_size, training=False):
        result = evaluate_model(loaded.model, dataset, num_classes=len(loaded.classes), precision=loaded.precision,
                                loaders=loaders, channels_last=loaded.channels_last,
                                bar="scoring" if progress else None)  # fmt: skip
    # which weights were scored, as a run's test_metrics.json says (an eval's --metrics file did not)
    scored = {"checkpoint": None if isinstance(checkpoint, dict) else str(checkpoint), "epoch": record.get("epoch")}
    return {**result, "classes": loaded.classes, "data": getattr(dataset, "source", None), **scored}


def _check_classes(dataset: Dataset, classes: list[str]) -> None:
    """A dataset that names its classes (``classes``, as torchvision's ``ImageFolder``) in another order or set than
    the checkpoint's is refused: its labels are indices into its own list, and were scored against the checkpoint's
    classes of those indices (a test folder without one class shifted every label after it)."""
    own = getattr(dataset, "classes", None)
    if not isinstance(own, (list, tuple)) or not all(isinstance(c, str) for c in own) or list(own) == list(classes):
        return
    raise DataError(f"the dataset's classes {choices(own)} are not the checkpoint's {choices(classes)}, in that order: "
                    "its labels index its own list; give it the checkpoint's classes (for a folder, score the path: "
                    "evaluate_checkpoint(checkpoint, 'DIR') maps its class folders by name)")  # fmt: skip


def _yields_images(dataset: Dataset) -> bool:
    """Whether ``dataset``'s first sample is a PIL image (or an ``(image, label)`` pair of one)."""
    from PIL import Image

    try:
        if len(dataset) == 0:  # (refused as empty where it is scored)
            return False
    except TypeError:  # no length: an iterable dataset, read as it is
        return False
    sample = dataset[0]
    return isinstance(sample[0] if isinstance(sample, (tuple, list)) else sample, Image.Image)


class _Transformed(Dataset):
    """``dataset``'s samples with ``transform`` applied to each one's first element (its image); its ``targets``
    kept where it has them."""

    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform
        self.targets = getattr(dataset, "targets", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, *rest = self.dataset[index]
        return (self.transform(image), *rest)


def run_batch_size(record: dict) -> int:
    """The batch size the checkpoint's run trained and scored its test split at (``config.yaml`` keeps ``auto``'s
    number); ``BATCH_SIZE`` for a checkpoint without one.

    >>> run_batch_size({"config": {"batch_size": 8}}), run_batch_size({"config": {"batch_size": "auto"}})
    (8, 32)
    """
    value = record.get("config", {}).get("batch_size")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else BATCH_SIZE


def evaluate_best(model: nn.Module, best: Path, test: Dataset, *, num_classes: int, precision: Precision,
                  channels_last: bool, loaders: Loaders, dist, bar: str | None = None) -> dict | None:  # fmt: skip
    """A run's ``best.pt`` (rank 0's file) loaded into ``model`` and scored on ``test``; None when it was not written.

    Under DDP (``dist``) every rank scores its block of ``test`` with rank 0's weights and the counts are merged: no
    rank waits at a barrier (and its timeout) while rank 0 scores a large test set alone.
    """
    from freezetune.device.distributed import broadcast, broadcast_tensors

    if not broadcast(best.exists(), dist):  # rank 0 wrote it; the other ranks may not see its disk
        return None
    if dist.is_main:
        model.load_state_dict(ckpt.load(best)["state_dict"])
    broadcast_tensors(model.state_dict().values(), dist)
    return evaluate_model(model, test, num_classes=num_classes, precision=precision, channels_last=channels_last,
                          loaders=loaders, shard=True, bar=bar)  # fmt: skip


def write_evaluation(
    result: dict, classes: list[str], *, plot: str | Path | None = None, metrics: str | Path | None = None
) -> str:
    """Write what an evaluation found and return its report text (``metrics.format_report``) for printing.

    Args:
        result: metrics from ``evaluate_model`` or ``evaluate_checkpoint``.
        classes: class names, index-aligned with the confusion matrix.
        plot: where to draw the confusion matrix (PNG); None draws none.
        metrics: where to write ``result`` as JSON; None writes none.

    >>> from freezetune.training.metrics import ClassificationMeter
    >>> meter = ClassificationMeter(2)
    >>> meter.update(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    >>> write_evaluation(meter.compute(), ["cat", "dog"]).splitlines()[0].split()[:2]
    ['n', '2']
    """
    from freezetune.training.metrics import check_class_names, format_report, plot_confusion  # matplotlib: only here

    check_class_names(result, classes)  # before any file is written: a refused call leaves none behind
    check_outputs(plot, metrics)
    # what a write of these files killed mid-way left beside them (an eval's target folder is the user's: only theirs)
    remove_stale_temps_of(p for p in (plot, metrics) if p is not None)
    if metrics is not None:  # first: the numbers asked for by name do not wait on a plot that may fail
        atomic_write_text(metrics, json.dumps(result, indent=1))
    if plot is not None:
        plot_confusion(result, classes, plot)
    return format_report(result, classes)


def text_tokenizer(loaded: LoadedModel):
    """The batch tokenizer of a text model's checkpoint (its tokenizer, at its ``max_length``)."""
    from freezetune.data.text import TokenizeBatch

    return TokenizeBatch(loaded.preprocess.tokenizer, loaded.preprocess.max_length)


def warn_cut(counted: tuple[int, int, int], max_length: int) -> None:
    """Say how many texts the model sees only the start of (the tokenizer cuts them silently), from ``count_cut``'s
    (long, total, longest)."""
    from freezetune.data.text import scoring_cut_note

    if note := scoring_cut_note(*counted, max_length):
        log.warning(note)


def count_cut(texts: list[str], tokenizer, counted: tuple[int, int, int] = (0, 0, 0)) -> tuple[int, int, int]:
    """(long, total, longest) of ``texts`` added to those ``counted`` before (a file at a time)."""
    from freezetune.data.text import long_texts

    long, longest = long_texts(texts, tokenizer)
    return counted[0] + long, counted[1] + len(texts), max(counted[2], longest)
