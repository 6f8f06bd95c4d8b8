"""The training loss: cross-entropy with label smoothing and, when asked, class weights against imbalance.

A classifier trained on 900 images of one class and 30 of another learns mostly the first; plain accuracy then hides
that the small class is barely recognised (per-class accuracy and macro-F1 show it: ``freezetune eval``).
``--class-weights balanced`` weighs each class's loss by the inverse of its frequency, so every class counts as much
as if the classes were equally frequent. Validation and test losses stay unweighted, comparable across runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from freezetune.config.options import IMBALANCE_NOTED
from freezetune.errors import DataError


def balanced_class_weights(targets: torch.Tensor | Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-class loss weights ``n / (classes present * count)``: every class present weighs the same in the loss,
    the weights average 1 over the samples, and a class without samples gets 0. ``targets``: the training labels,
    a tensor or a list (an ImageFolder's ``targets``), each in ``0..num_classes - 1``.

    >>> balanced_class_weights(torch.tensor([0, 0, 0, 1]), 2).tolist()
    [0.6666666865348816, 2.0]
    >>> balanced_class_weights([0, 0, 0, 1], 2).tolist()
    [0.6666666865348816, 2.0]
    """
    targets = torch.as_tensor(targets)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise DataError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise DataError(f"labels must lie in 0..{num_classes - 1} for {num_classes} classes; they run from "
                        f"{int(targets.min())} to {int(targets.max())}")  # fmt: skip
    counts = torch.bincount(targets.long().cpu(), minlength=num_classes).float()
    present = int((counts > 0).sum())
    return torch.where(counts > 0, len(targets) / (present * counts), torch.zeros_like(counts))


def training_loss(class_weights: str, label_smoothing: float, targets: torch.Tensor, num_classes: int,
                  device: torch.device) -> nn.CrossEntropyLoss:  # fmt: skip
    """The loss a run trains with: ``class_weights`` "balanced" weighs the classes of ``targets`` (the training
    set's labels), "none" does not.

    >>> training_loss("balanced", 0.1, torch.tensor([0, 0, 0, 1]), 2, torch.device("cpu")).weight.tolist()
    [0.6666666865348816, 2.0]
    """
    weight = balanced_class_weights(targets, num_classes).to(device) if class_weights == "balanced" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def imbalance_note(class_weights: str, targets: torch.Tensor, num_classes: int, noun: str = "images") -> str | None:
    """A line for a run whose largest class has ``IMBALANCE_NOTED`` times the smallest's items and no class weights.

    >>> imbalance_note("none", torch.tensor([0] * 9 + [1] * 2), 2)
    'note: the classes are imbalanced (9 to 2 training images): --class-weights balanced weighs the loss by inverse class frequency; eval shows per-class accuracy and macro-F1'
    """
    counts = torch.bincount(targets.long().cpu(), minlength=num_classes)
    present = counts[counts > 0]
    if class_weights != "none" or len(present) < 2 or present.max() < IMBALANCE_NOTED * present.min():
        return None
    return (f"note: the classes are imbalanced ({int(present.max())} to {int(present.min())} training {noun}): "
            "--class-weights balanced weighs the loss by inverse class frequency; eval shows per-class accuracy and "
            "macro-F1")  # fmt: skip
