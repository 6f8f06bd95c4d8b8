"""BatchNorm statistics recomputed for the weights a short run reached, before they are scored or saved.

A BatchNorm layer that trains keeps running statistics as an exponential average (``momentum`` 0.1 in torch): after
``n`` steps the statistics it started with still weigh ``0.9 ** n`` of them. Those are ImageNet's, or a frozen
stage's, computed for other weights and other images: after 8 steps (48 images of 4 colours, 4 epochs) they were 43 %
of what evaluation used, and ``best.pt`` scored 58 % on the very images it trained to 98 % on. So when the layers
that train have taken too few steps for their average to forget its start, the statistics are computed again, over
the epoch's training batches, for the weights as they are (what "precise BN" does), before validation scores them
and the checkpoints keep them. A run long enough to forget its start (29 steps at momentum 0.1, one epoch of 900
images at batch 32) never pays for the extra forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from freezetune.freezing.bn_policy import STAT_NORMS, holds_stats
from freezetune.model.tree import unwrap

# The share of the start's statistics in a layer's running average above which they are recomputed
STALE_SHARE = 0.05
# Training batches a forward of the pass joins at most: a layer's statistics depend on the batch its inputs were
# normalised with upstream (train mode), and 3 batches of 8, 8 and 2 images moved them from epoch to epoch for the
# same weights. A forward without gradients holds a layer or two at a time, where a training step of one batch holds
# every layer's activations: four batches stay within what training needed.
JOINED = 4


def updating_norms(module: nn.Module) -> list[nn.Module]:
    """The norms of ``module`` that update running statistics in its forward: in train mode, keeping statistics, and
    not held (``bn_policy.holds_stats``: ``model.train()`` sets a held layer's ``.training`` too, which only its next
    Python forward undoes; after a CUDA graph's replay, or a resume with no step left in its epoch, the pass reset the
    held statistics of frozen stages to 0 and 1, and never updated them).

    >>> from freezetune.freezing.bn_policy import hold_bn_statistics
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    >>> len(updating_norms(model)), len(updating_norms(hold_bn_statistics(model) or model.train()))
    (1, 0)
    """
    return [m for m in module.modules()
            if isinstance(m, STAT_NORMS) and m.training and m.track_running_stats and not holds_stats(m)]  # fmt: skip


def stale(norms: list[nn.Module], steps: int) -> bool:
    """Whether, after ``steps`` training steps, the statistics some of ``norms`` started with weigh more than
    ``STALE_SHARE`` of their running average (a layer with ``momentum=None`` keeps a plain average: never stale in
    this sense, as torch averages every batch it saw equally).

    >>> bn = nn.BatchNorm2d(3)
    >>> stale([bn], 8), stale([bn], 28), stale([bn], 29), stale([], 0)
    (True, True, False, False)
    """
    return any(m.momentum is not None and (1 - m.momentum) ** steps > STALE_SHARE for m in norms)


@torch.no_grad()
def refresh(
    norms: list[nn.Module], batches: Iterable, forward: Callable[[object], object], *, limit: int | None = None
) -> int:
    """Recompute the running statistics of ``norms`` as their average over ``batches`` (each ``(inputs, targets)``),
    joined into forwards of up to ``limit`` images (default: ``JOINED`` of the first batch's), each weighing by its
    images (a last batch of 2 weighed as much as one of 8), that ``forward`` runs through the model in train mode;
    returns the forwards run. Each norm's momentum is restored after, also on an error, and the statistics too when
    no batch went through; ``num_batches_tracked`` counts the forwards of this pass. (A layer with ``momentum=None``
    among them restarts its plain average here.)

    >>> bn = nn.BatchNorm1d(2)
    >>> data = [(torch.tensor([[1.0, 10.0], [3.0, 30.0]]), [0, 0]), (torch.tensor([[5.0, 50.0]] * 4), [0] * 4)]
    >>> refresh([bn], data, bn)  # one forward of the 6 rows
    1
    >>> [round(v, 4) for v in bn.running_mean.tolist()], bn.momentum
    ([4.0, 40.0], 0.1)
    """
    momenta = [m.momentum for m in norms]
    before = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.reset_running_stats()
    seen = images = 0
    try:
        for inputs in _chunks(batches, limit):
            n = len(inputs) if isinstance(inputs, torch.Tensor) else len(next(iter(inputs.values())))
            for m in norms:  # the running average of every image so far: this chunk's share of them
                m.momentum = n / (images + n)
            forward(inputs)
            seen, images = seen + 1, images + n
    finally:
        for m, momentum, kept in zip(norms, momenta, before, strict=True):
            m.momentum = momentum
            if not seen:  # no batch (or the first failed): the statistics stay as they were, not reset
                for buffer, value in zip((m.running_mean, m.running_var, m.num_batches_tracked), kept, strict=True):
                    buffer.copy_(value)
    return seen


def _chunks(batches: Iterable, limit: int | None) -> Iterator:
    """The inputs of ``batches`` joined into runs of up to ``limit`` rows (tensors; None: ``JOINED`` times the first
    batch's); other inputs (a text model's dicts) as they come."""
    held: list[torch.Tensor] = []
    for inputs, _ in batches:
        if not isinstance(inputs, torch.Tensor):
            yield inputs
            continue
        limit = limit or JOINED * len(inputs)
        if held and sum(len(t) for t in held) + len(inputs) > limit:
            yield torch.cat(held)
            held = []
        held.append(inputs)
    if held:
        yield torch.cat(held)


def steps_on(epoch: int, steps_per_epoch: int, unfreezes: Iterable[tuple[int, list[str]]]) -> int:
    """The training steps the trainable part has taken by the end of ``epoch`` (0-based) since it last changed:
    since the run's start, or the latest of ``unfreezes`` (``(epoch, stages)``, opened after that epoch) before it.

    >>> steps_on(0, 3, []), steps_on(4, 3, [(1, ["blocks.5"])]), steps_on(1, 3, [(1, ["blocks.5"])])
    (3, 9, 6)
    """
    start = max((e + 1 for e, _ in unfreezes if e < epoch), default=0)
    return (epoch + 1 - start) * steps_per_epoch


def refresh_if_stale(module: nn.Module, steps: int, batches: Callable[[], Iterable],
                     forward: Callable[[nn.Module, object], object],
                     reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     world: int = 1) -> list[nn.Module]:  # fmt: skip
    """``refresh`` the norms of ``module`` that train when ``steps`` left their statistics ``stale``: over
    ``batches()`` (called only then), each through ``forward(module, inputs)`` on ``module`` unwrapped (DDP's
    forward would broadcast rank 0's buffers before each batch). Under torchrun (``reduce_sum`` an all-reduce over
    ``world`` ranks) each rank averages its own batches, then the ranks' averages are averaged: the mean of every
    rank's images, not rank 0's half's (the variance, as the chunks', is the mean of theirs: precise BN's usual
    approximation). Returns the norms refreshed (none: not stale, or no batch)."""
    module = unwrap(module)
    norms = updating_norms(module)
    if not stale(norms, steps) or not refresh(norms, batches(), lambda inputs: forward(module, inputs)):
        return []
    if reduce_sum is not None and world > 1:
        for m in norms:
            for buffer in (m.running_mean, m.running_var):
                buffer.copy_(reduce_sum(buffer.clone()) / world)
    return norms
