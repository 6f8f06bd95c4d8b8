"""Evaluation and prediction: run a model over data without gradients and summarise what it got right."""

from __future__ import annotations

from collections.abc import Iterable, Sized

import torch
from torch import nn

from freezetune.device.bn_fold import foldable, folded
from freezetune.device.distributed import DistInfo, all_gather
from freezetune.device.precision import Precision
from freezetune.errors import DataError
from freezetune.training.epoch_log import progress_bar
from freezetune.training.metrics import ClassificationMeter, check_labels


def logits_of(output: object) -> torch.Tensor:
    """Class scores from a model output: a tensor, or an object/dict with ``logits`` (Hugging Face)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return output["logits"]
    return output.logits


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    precision: Precision,
    *,
    num_classes: int,
    channels_last: bool = False,
    dist: DistInfo | None = None,
    bar: str | None = None,
) -> dict:
    """Loss, top-1/top-k accuracy, per-class accuracy, macro-F1 and confusion matrix over ``batches``.

    ``dist``: ``batches`` are this rank's block of a sharded evaluation (``Loaders.eval(shard=True)``); every rank
    returns the metrics of all the blocks, merged in rank order (exactly one process's numbers). ``bar``: the label of
    a progress bar over the batches (``epoch_log.progress_bar``: a minute's silence on a 10 000-image test set looked
    like a hang); None draws none.

    >>> import torch; from freezetune.device.precision import resolve_precision
    >>> m = torch.nn.Linear(4, 3)
    >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    >>> evaluate(m, data, resolve_precision(torch.device("cpu"), "off"), num_classes=3)["n"]
    8
    """
    was_training = model.training
    model.eval()
    # BatchNorm folded into the convolutions before it: 1.2x as fast on a CPU (bn_fold); a GPU's gain is not measured
    forward = folded(model) if precision.device.type == "cpu" and foldable(model) else model
    meter = ClassificationMeter(num_classes)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    shown = progress_bar(len(batches) if isinstance(batches, Sized) else None, bar or "", enabled=bar is not None,
                         unit="batch")  # fmt: skip
    try:
        for inputs, targets in batches:
            check_labels(targets, num_classes)  # before the loss, which raises torch's IndexError (a GPU: an assert)
            inputs = to_device(inputs, precision.device, channels_last)
            targets = targets.to(precision.device, non_blocking=True)
            with precision.autocast():
                logits = logits_of(run_model(forward, inputs))
            meter.update(logits.float(), targets, loss_fn(logits.float(), targets))
            shown.update()
    finally:
        shown.close()
        model.train(was_training)
    if dist is not None and dist.enabled:
        merged = ClassificationMeter(num_classes)
        for part in all_gather(meter, dist):
            merged.merge(part)
        meter = merged
    if meter.n == 0:  # the meter's own error names no data: a notebook's empty dataset (or loader) is the user's
        raise DataError("the data to evaluate has no samples: nothing was scored")
    return meter.compute()


@torch.inference_mode()
def predict_probs(model: nn.Module, inputs: torch.Tensor | dict, precision: Precision) -> torch.Tensor:
    """Softmax class probabilities for a batch of preprocessed images or of tokenized texts (a dict of tensors, as
    ``data.text.TokenizeBatch.tokenize`` gives); the model's train/eval mode is kept.

    >>> import torch; from freezetune.device.precision import resolve_precision
    >>> probs = predict_probs(torch.nn.Linear(4, 3), torch.randn(2, 4), resolve_precision(torch.device("cpu")))
    >>> probs.shape, bool(torch.allclose(probs.sum(-1), torch.ones(2)))
    (torch.Size([2, 3]), True)
    """
    was_training = model.training
    model.eval()
    try:
        with precision.autocast():
            logits = logits_of(run_model(model, to_device(inputs, precision.device)))
    finally:
        model.train(was_training)
    return logits.float().softmax(dim=-1).cpu()


def run_model(model: nn.Module, inputs: torch.Tensor | dict) -> object:
    """``model(inputs)``, or ``model(**inputs)`` for a tokenized text batch (a dict of tensors)."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def to_device(inputs: torch.Tensor | dict, device: torch.device, channels_last: bool = False) -> torch.Tensor | dict:
    if isinstance(inputs, dict):  # a tokenized text batch
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    # non_blocking pairs with pinned host memory: the copy overlaps the previous step's compute
    inputs = inputs.to(device, non_blocking=True)
    if channels_last and inputs.ndim == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs
