"""Training memory: an estimate of weights, gradients, optimizer state and activations, full vs as frozen now; and
the batch size that fits a CUDA device, measured (``--batch-size auto``).

Activations are measured, not guessed: one forward/backward on a tiny batch counts the bytes autograd saves for the
backward pass (which is exactly what freezing removes), then scales to the batch size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from freezetune.errors import ResourceError
from freezetune.evaluate import logits_of
from freezetune.options import BATCH_AUTO

_OPT_STATE = {"adamw": 2, "adam": 2, "sgd": 1}  # fp32 tensors of state per trainable parameter


def estimate_memory(
    model: nn.Module, input_size: int, batch_size: int, *, optimizer: str = "adamw", bytes_per_value: int = 4
) -> dict[str, dict[str, float]]:
    """MiB of weights, grads, optimizer state and activations for full fine-tuning and for the current freeze.

    >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    >>> _ = m(torch.zeros(1, 3, 8, 8))
    >>> sorted(estimate_memory(m, 8, 4))
    ['frozen', 'full']
    """
    params = list(model.parameters())
    trainable_now = [p.requires_grad for p in params]
    out = {}
    try:
        for mode in ("full", "frozen"):
            if mode == "full":
                for p in params:
                    p.requires_grad_(True)
            else:
                for p, flag in zip(params, trainable_now, strict=True):
                    p.requires_grad_(flag)
            out[mode] = _breakdown(model, params, input_size, batch_size, optimizer, bytes_per_value)
    finally:
        for p, flag in zip(params, trainable_now, strict=True):
            p.requires_grad_(flag)
    return out


def format_memory(estimate: dict[str, dict[str, float]], batch_size: int) -> str:
    """A small table of the estimate, MiB per component."""
    cols = ("weights", "grads", "optimizer", "activations", "total")
    lines = [f"training memory estimate at batch {batch_size} (MiB, fp32; AMP roughly halves activations)",
             f"{'':<8}" + "".join(f"{c:>13}" for c in cols)]  # fmt: skip
    for mode, row in estimate.items():
        lines.append(f"{mode:<8}" + "".join(f"{row[c]:>13,.1f}" for c in cols))
    return "\n".join(lines)


def _breakdown(model, params, input_size, batch_size, optimizer, nbytes) -> dict[str, float]:
    mib = 2**20
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    row = {
        "weights": total * nbytes / mib,
        "grads": trainable * nbytes / mib,
        "optimizer": trainable * nbytes * _OPT_STATE.get(optimizer, 2) / mib,
        "activations": _activation_bytes(model, input_size) * batch_size / 2 / mib,
    }
    row["total"] = sum(row.values())
    return row


def _activation_bytes(model: nn.Module, input_size: int) -> int:
    """Bytes autograd keeps for backward on a batch of 2 (counted once per storage)."""
    seen: set[int] = set()
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        if isinstance(t, nn.Parameter):
            return t  # weights are counted apart
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            count += t.untyped_storage().nbytes()
        return t

    device = next(model.parameters()).device
    x = torch.randn(2, 3, input_size, input_size, device=device)
    # Measuring must not change the model: a train-mode forward updates BatchNorm running statistics, and
    # model.train() flips every submodule's mode; both are put back. No backward runs (the pack hook fires during
    # the forward), so the caller's .grad tensors are left alone too.
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits_of(model(x))
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, mode in modes:
            m.training = mode
    return count


def find_batch_size(fits: Callable[[int], bool], cap: int, start: int = 2) -> int | None:
    """The largest batch ``fits`` accepts among ``start, 2*start, 4*start, ...`` and ``cap``; None if none does.

    Sizes grow by doubling until one does not fit (the last that did is kept) or the cap is reached.

    >>> find_batch_size(lambda b: b <= 100, cap=1000)
    64
    >>> find_batch_size(lambda b: True, cap=300), find_batch_size(lambda b: False, cap=300)
    (300, None)
    """
    best, size = None, max(1, min(start, cap))
    while fits(size):
        best = size
        if size >= cap:
            break
        size = min(2 * size, cap)
    return best


def auto_batch_size(model: nn.Module, input_size: int, *, device: torch.device, cap: int, default: int,
                    autocast: Callable = contextlib.nullcontext) -> tuple[int, str]:  # fmt: skip
    """The batch size ``--batch-size auto`` trains with, and why, in words.

    On CUDA: the largest power of two (at most ``cap``, the training set size) whose forward and backward through
    ``model`` fit, with room held for the optimizer state. Elsewhere nothing can be measured without risking the
    machine's RAM, so ``default`` (capped) is kept.

    >>> auto_batch_size(nn.Linear(4, 2), 4, device=torch.device("cpu"), cap=10, default=32)
    (10, 'the default 32 (no CUDA device to measure on cpu), capped at 10 training images')
    """
    if device.type != "cuda":
        size = min(default, cap)
        capped = f", capped at {cap} training images" if size < default else ""
        return size, f"the default {default} (no CUDA device to measure on {device.type}){capped}"
    size = find_batch_size(lambda b: _fits(model, input_size, b, device, autocast), cap)
    if size is None:
        raise ResourceError(f"not even a batch of 2 images of {input_size} px fits on {device}; try a smaller "
                            f"--img-size or model")  # fmt: skip
    return size, f"the largest power of two whose forward and backward fit on {device} (at most {cap})"


def _fits(model: nn.Module, input_size: int, batch: int, device: torch.device, autocast: Callable) -> bool:
    """One forward and backward at ``batch`` in eval mode (BatchNorm statistics untouched), gradients dropped after,
    with the AdamW state of the trainable parameters reserved: it is allocated by the first real step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    reserve = None
    try:
        reserve = torch.empty(2 * sum(p.numel() * p.element_size() for p in trainable), dtype=torch.uint8,
                              device=device)  # fmt: skip
        x = torch.randn(batch, 3, input_size, input_size, device=device)
        with autocast():
            out = logits_of(model.eval()(x))
        if out.requires_grad:
            out.float().sum().backward()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del reserve
        model.train(was_training)
        for p in trainable:
            p.grad = None
        torch.cuda.empty_cache()


@contextlib.contextmanager
def out_of_memory_hint(batch_size: int | str, *, training: bool = True) -> Iterator[None]:
    """Device memory running out is the run's size, not a bug: one line naming the batch size to try instead (for
    ``train``, ``eval`` and ``predict``; ``training`` adds the AMP hint, which only ``train`` has a flag for).

    Checkpoints are written whole or not at all, so a run dir keeps the last finished epoch (``--resume``).

    >>> with out_of_memory_hint(64):
    ...     raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    Traceback (most recent call last):
    freezetune.errors.ResourceError: the device ran out of memory at batch size 64; try --batch-size 32 ...
    """
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        if batch_size == BATCH_AUTO:  # what auto measured did not leave room for the rest of the run
            fix = "try a fixed --batch-size below the one auto printed"
        else:
            fix = f"try --batch-size {batch_size // 2}" if batch_size > 1 else "try a smaller --img-size or model"
        amp = " (or --amp bf16)" if training else ""
        raise ResourceError(f"the device ran out of memory at batch size {batch_size}; {fix}{amp}; files written "
                            "before are intact") from e  # fmt: skip
