"""Training memory estimate: weights, gradients, optimizer state and activations, full vs as frozen now.

Activations are measured, not guessed: one forward/backward on a tiny batch counts the bytes autograd saves for the
backward pass (which is exactly what freezing removes), then scales to the batch size.
"""

from __future__ import annotations

import torch
from torch import nn

from freezetune.evaluate import logits_of

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
