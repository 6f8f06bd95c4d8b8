"""Shared tiny models for the core-API tests: small enough to build and train on a CPU in milliseconds."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn


class TinyCNN(nn.Sequential):
    """A five-stage CNN with BatchNorm in every body stage (generic fallback: stem, block1..3, head).

    Each stage is a top-level child, so ``ft.stages`` gives ``["stem", "block1", "block2", "block3", "head"]``.
    """

    STAGES = ("stem", "block1", "block2", "block3", "head")

    def __init__(self, num_classes: int = 3, width: int = 8) -> None:
        def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        super().__init__()
        self.stem = conv_bn(3, width)
        self.block1 = conv_bn(width, width)
        self.block2 = conv_bn(width, 2 * width, stride=2)
        self.block3 = conv_bn(2 * width, 2 * width, stride=2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)


class Terminal(io.StringIO):
    """A stream that says it is a terminal: where progress bars are live (redrawn in place) rather than written as
    lines once a minute (``epoch_log.progress_bar``)."""

    def isatty(self) -> bool:
        return True


def make_batch(seed: int, n: int = 4, size: int = 16, num_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic batch that depends only on ``seed`` (so two runs see the same data at the same step)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def tiny_bert_config(num_labels: int = 3):
    """A BERT config small enough to build in milliseconds (two layers, hidden size 16)."""
    import transformers

    return transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
    )


def tiny_bert(num_labels: int = 3) -> nn.Module:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_labels)).eval()


def clone_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def bn_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()


@pytest.fixture
def resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.fixture(scope="module")
def single_thread_module():
    """Torch on one thread for a whole module: with the 2 cores shared, two threads each spin-wait and crawl.

    Engine test modules opt in with ``pytestmark = pytest.mark.usefixtures("single_thread_module")``.
    """
    from _engine_fixtures import one_thread

    with one_thread():
        yield
