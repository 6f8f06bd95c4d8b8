"""Optimizer and learning-rate schedule over freezetune's per-stage parameter groups."""

from __future__ import annotations

import torch
from torch import nn

from freezetune.config import TrainConfig
from freezetune.options import OPTIMIZERS, check_choice
from freezetune.param_groups import param_groups


def build_optimizer(model: nn.Module, name: str = TrainConfig.optimizer, lr: float = TrainConfig.lr, *,
                    stage_lrs: dict[str, float] | None = None, decay: float | None = None,
                    weight_decay: float = TrainConfig.weight_decay,
                    momentum: float = TrainConfig.momentum) -> torch.optim.Optimizer:  # fmt: skip
    """AdamW/Adam/SGD over the trainable parameters only, one group per stage (see ``param_groups``).

    >>> build_optimizer(nn.Linear(2, 2), "sgd", 0.1).defaults["nesterov"]
    True
    """
    check_choice("optimizer", name, OPTIMIZERS)  # "lion" ran as Adam
    groups = param_groups(model, lr, stage_lrs=stage_lrs, decay=decay, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    # One fused kernel per step instead of a loop of small ops per tensor: a cached head-only step is launch-bound on
    # a GPU, and on CPU the AdamW update of EfficientNet-Lite0's last 3 stages took 24.6 ms a step as a loop against
    # 3.9 ms fused (benchmarks/optimizer.py, 1 thread), a sixth of a cached 64 px training step
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"}
    return cls(groups, lr=lr, **({"fused": True} if fused else {}))


def momentum_note(optimizer: str, momentum: float, default: float) -> str | None:
    """A note when a momentum other than the default is given to an optimizer without one (it was ignored without a
    word). A note, not a refusal: an earlier run's config.yaml holds it, and must resume.

    >>> print(momentum_note("adamw", 0.5, 0.9))
    note: momentum 0.5 is SGD's (optimizer sgd); with optimizer 'adamw' it has no effect
    """
    if momentum == default or optimizer == "sgd":
        return None
    return f"note: momentum {momentum:g} is SGD's (optimizer sgd); with optimizer {optimizer!r} it has no effect"


def idle_warmup_note(scheduler: str, warmup_epochs: float) -> str | None:
    """A note when a warm-up is asked of no schedule (``--scheduler none``: the LR stays constant): it was ignored.

    >>> print(idle_warmup_note("none", 1.0))
    note: --warmup-epochs 1 has no effect with --scheduler none (a constant LR); cosine or onecycle warm up
    """
    if scheduler != "none" or not warmup_epochs:
        return None
    return (f"note: --warmup-epochs {warmup_epochs:g} has no effect with --scheduler none (a constant LR); cosine or "
            "onecycle warm up")  # fmt: skip


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, *, epochs: int, steps_per_epoch: int,
                    warmup_epochs: float = 0.0):  # fmt: skip
    """A per-step schedule: one-cycle (warm-up then cosine annealing), cosine with optional linear warm-up, or none.

    Returns None for ``kind="none"``, and for one-cycle over fewer than 3 steps in all: such a run cannot both warm
    up and anneal (over 2 steps it trained at lr/25, then near 0, and never at ``lr``), so it trains at ``lr``.
    Groups added later by the Unfreezer are driven too (it extends the scheduler's per-group lists). One-cycle cycles
    momentum only for SGD, from the optimizer's own momentum down by 0.1 and back (torch's default 0.95/0.85 replaced
    whatever was asked: momentum 0 ran at 0.95); momentum 0 stays 0.

    >>> from torch import nn
    >>> opt = build_optimizer(nn.Linear(2, 2), "sgd", 0.1, momentum=0.5)
    >>> _ = build_scheduler(opt, "onecycle", epochs=1, steps_per_epoch=8)
    >>> round(opt.param_groups[0]["momentum"], 2)
    0.5
    """
    total, warmup = _steps(epochs, steps_per_epoch, warmup_epochs)
    if kind == "onecycle" and total < 3:
        return None
    if kind == "onecycle":
        pct = _onecycle_pct(warmup, total)
        momentum = optimizer.defaults.get("momentum", 0.0) if isinstance(optimizer, torch.optim.SGD) else 0.0
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=pct,
            cycle_momentum=momentum > 0,  # SGD's only: Adam's betas cycling gives nothing measurable
            max_momentum=momentum,
            base_momentum=max(0.0, momentum - 0.1),
        )
    if kind == "cosine":
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
        if not warmup:
            return cosine
        ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
    return None


def warmup_steps(kind: str, *, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0) -> int:
    """The steps over which ``build_scheduler``'s schedule raises the LR to its peak (0: none).

    >>> warmup_steps("onecycle", epochs=30, steps_per_epoch=10)
    75
    >>> warmup_steps("cosine", epochs=30, steps_per_epoch=10, warmup_epochs=2)
    20
    >>> warmup_steps("onecycle", epochs=10, steps_per_epoch=4, warmup_epochs=0.1)  # the asked step (with 2 its least)
    2
    """
    total, warmup = _steps(epochs, steps_per_epoch, warmup_epochs)
    if kind == "onecycle":
        return 0 if total < 3 else round(_onecycle_pct(warmup, total) * total)
    return warmup if kind == "cosine" else 0


def _steps(epochs: int, steps_per_epoch: int, warmup_epochs: float) -> tuple[int, int]:
    """The schedule's steps in all and its asked warm-up steps (``build_scheduler`` and ``warmup_steps`` alike): a
    warm-up asked is at least one step (0.1 of a 4-step epoch rounded to none, which one-cycle reads as not asked:
    its default quarter of the run, a longer warm-up than the one asked)."""
    warmup = int(round(warmup_epochs * steps_per_epoch))
    return max(1, epochs * steps_per_epoch), max(warmup, 1) if warmup_epochs > 0 else 0


def _onecycle_pct(warmup: int, total: int) -> float:
    # OneCycleLR divides by (pct_start * total - 1): the warm-up must span at least two steps, or a short run (e.g.
    # 4 steps at the default 0.25) dies with ZeroDivisionError before training starts
    return min(max(warmup / total if warmup else 0.25, 2.0 / total), 0.9)
