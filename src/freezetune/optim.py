"""Optimizer and learning-rate schedule over freezetune's per-stage parameter groups."""

from __future__ import annotations

import torch
from torch import nn

from freezetune.config import TrainConfig
from freezetune.param_groups import param_groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD over the trainable parameters only, one group per stage (see ``param_groups``)."""
    groups = param_groups(model, cfg.lr, stage_lrs=cfg.stage_lrs, decay=cfg.decay, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # One fused kernel per step instead of a dozen: a cached head-only step is launch-bound on a GPU
    cuda = any(p.is_cuda for g in groups for p in g["params"])
    return cls(groups, lr=cfg.lr, **({"fused": True} if cuda else {}))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """A per-step schedule: one-cycle (warm-up then cosine annealing), cosine with optional linear warm-up, or none.

    Returns None for ``scheduler: none``. Groups added later by the Unfreezer are driven too (it extends the
    scheduler's per-group lists).
    """
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.scheduler == "onecycle":
        pct = warmup / total if warmup else 0.25
        # OneCycleLR divides by (pct_start * total - 1): the warm-up must span at least two steps, or a short run
        # (e.g. 4 steps at the default 0.25) dies with ZeroDivisionError before training starts.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=min(max(pct, 2.0 / total), 0.9),
            cycle_momentum=cfg.optimizer == "sgd",  # Adam's betas cycling gives nothing measurable here
        )
    if cfg.scheduler == "cosine":
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
        if not warmup:
            return cosine
        ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
    return None
