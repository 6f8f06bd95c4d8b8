"""Evaluation and prediction: metrics over batches, model outputs of every library, and untouched model state."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from freezetune.evaluate import evaluate, logits_of, predict_probs, to_device
from freezetune.precision import resolve_precision

CPU = resolve_precision(torch.device("cpu"), "off")


class _Fixed(nn.Module):
    """Returns the logits it is given as input: the test controls exactly what the model predicts."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x)  # identity in eval mode; evaluate must switch to it


def test_evaluate_counts_accuracy_loss_and_confusion():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1, 2, 2, 1])
    batches = [(logits[:3], targets[:3]), (logits[3:], targets[3:])]  # uneven batches
    model = _Fixed().train()
    result = evaluate(model, batches, CPU, num_classes=3)
    assert result["n"] == 5 and result["acc"] == pytest.approx(3 / 5)
    assert result["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert result["per_class_acc"] == pytest.approx([1.0, 0.5, 0.5])
    expected_loss = nn.functional.cross_entropy(logits, targets).item()
    assert result["loss"] == pytest.approx(expected_loss)
    assert model.training  # restored


def test_evaluate_runs_without_autograd():
    model = nn.Linear(4, 2)
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    evaluate(model, [(torch.randn(3, 4), torch.tensor([0, 1, 0]))], CPU, num_classes=2)
    assert seen == [False]


def test_logits_of_tensors_dicts_and_output_objects():
    t = torch.ones(2, 3)
    assert logits_of(t) is t
    assert logits_of({"logits": t}) is t
    assert logits_of(SimpleNamespace(logits=t, hidden_states=None)) is t


def test_predict_probs_are_softmax_and_keep_the_model_mode():
    model = _Fixed().train()
    probs = predict_probs(model, torch.tensor([[0.0, math.log(3.0)]]), CPU)
    assert probs[0].tolist() == pytest.approx([0.25, 0.75])
    assert model.training


def test_to_device_channels_last_only_for_images():
    images = to_device(torch.zeros(2, 3, 4, 4), torch.device("cpu"), channels_last=True)
    assert images.is_contiguous(memory_format=torch.channels_last)
    tokens = to_device(torch.zeros(2, 7, dtype=torch.long), torch.device("cpu"), channels_last=True)
    assert tokens.shape == (2, 7) and tokens.is_contiguous()
