"""Training memory estimate: freezing must shrink gradients, optimizer state and (measured) activations."""

from __future__ import annotations

import pytest
import torch

import freezetune as ft
from freezetune.memory import estimate_memory, format_memory
from freezetune.models import create_model

pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture
def model():
    torch.manual_seed(0)
    m, _ = create_model("timm:test_efficientnet", "none")
    ft.replace_head(m, 3)
    ft.freeze(m, "backbone")
    return m


def test_freezing_shrinks_every_trainable_component(model):
    est = estimate_memory(model, 32, 16)
    full, frozen = est["full"], est["frozen"]
    assert frozen["weights"] == full["weights"] > 0  # frozen weights still sit in memory
    for part in ("grads", "optimizer", "activations", "total"):
        assert frozen[part] < full[part], part
    trainable, total = ft.count_parameters(model)
    assert frozen["grads"] == pytest.approx(trainable * 4 / 2**20)
    assert frozen["optimizer"] == pytest.approx(2 * frozen["grads"])  # AdamW: two moments per parameter
    assert full["grads"] == pytest.approx(total * 4 / 2**20)


def test_activations_are_measured_from_the_input_size_and_batch(model):
    ft.unfreeze(model, "all")
    small = estimate_memory(model, 32, 8)["full"]["activations"]
    large = estimate_memory(model, 64, 8)["full"]["activations"]
    assert large > 3 * small  # four times the pixels
    assert estimate_memory(model, 32, 16)["full"]["activations"] == pytest.approx(2 * small)


def test_sgd_keeps_half_the_optimizer_state_of_adamw(model):
    adamw = estimate_memory(model, 32, 4)["frozen"]["optimizer"]
    sgd = estimate_memory(model, 32, 4, optimizer="sgd")["frozen"]["optimizer"]
    assert sgd == pytest.approx(adamw / 2)


def test_estimating_leaves_the_model_as_it_was(model):
    model.eval()
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    flags = [p.requires_grad for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    ft.unfreeze(model, "blocks.4")  # a trainable stage whose BatchNorm would update its statistics in train mode
    flags = [p.requires_grad for p in model.parameters()]
    estimate_memory(model, 32, 4)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert not any(m.training for m in model.modules())
    assert torch.equal(model.classifier.weight.grad, torch.ones_like(model.classifier.weight))


def test_format_memory_is_a_table_of_both_modes(model):
    text = format_memory(estimate_memory(model, 32, 4), 4)
    lines = text.splitlines()
    assert "batch 4" in lines[0] and lines[1].split() == ["weights", "grads", "optimizer", "activations", "total"]
    assert [line.split()[0] for line in lines[2:]] == ["full", "frozen"]


class _SmallDevice(torch.nn.Module):
    """A CNN on a pretend device that runs out of memory above ``limit`` images a batch."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.batches = limit, []
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                        torch.nn.LazyLinear(2))  # fmt: skip
        self.body(torch.zeros(2, 3, 8, 8))

    def forward(self, x):
        self.batches.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.body(x)


_DOUBLING = [2, 4, 8, 16, 32, 64, 128, 256]


@pytest.mark.parametrize(
    ("limit", "cap", "want", "tried"),
    [(100, 1000, 64, _DOUBLING[:7]), (64, 1000, 64, _DOUBLING[:7]), (1000, 300, 300, [*_DOUBLING, 300]),
     (5, 3, 3, [2, 3])],
)  # fmt: skip
def test_batch_size_search_keeps_the_largest_power_of_two_that_fits(limit, cap, want, tried):
    from contextlib import nullcontext

    from freezetune.memory import _fits, find_batch_size

    model = _SmallDevice(limit).train()
    running = model.body[1].running_mean.clone()
    got = find_batch_size(lambda b: _fits(model, 8, b, torch.device("cpu"), nullcontext), cap)
    assert got == want
    assert model.batches == tried  # doubling until the first size that does not fit (then backed off), or the cap
    assert model.training and all(p.grad is None for p in model.parameters())  # the probe left no trace
    assert torch.equal(model.body[1].running_mean, running)


def test_batch_size_auto_off_cuda_keeps_the_default_and_says_so():
    from freezetune.memory import auto_batch_size

    size, why = auto_batch_size(_SmallDevice(1), 8, device=torch.device("cpu"), cap=1000, default=32)
    assert size == 32 and "default 32" in why and "no CUDA device" in why
