"""Optimizer and learning-rate schedule over freezetune's per-stage parameter groups, and a group added to both mid-run
(a stage the ``Unfreezer`` opens)."""

from __future__ import annotations

import torch
from torch import nn

from freezetune.config.options import OPTIMIZERS, check_choice
from freezetune.config.train_config import TrainConfig
from freezetune.errors import ConfigError
from freezetune.training.param_groups import param_groups

# keys LR schedulers keep per group, all scaled alike (swa_lr: SWALR's target, which every stage opened later annealed
# to at the head's value)
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr", "swa_lr")
# Per-group lists LR schedulers keep outside the optimizer (zipped strictly with the groups): LR values are scaled
# to the new stage, everything else (floors, lambdas, momenta) is copied from the reference group.
_SCALED_LISTS = ("base_lrs", "max_lrs", "base_values")  # base_values: timm's schedulers
_COPIED_LISTS = ("min_lrs", "lr_lambdas", "base_momentums", "max_momentums")


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


def add_group_like(optimizer: torch.optim.Optimizer, scheduler: object | None, group: dict, ref_index: int,
                   ratio: float) -> None:  # fmt: skip
    """Add ``group`` to a running ``optimizer`` (and its LR ``scheduler``) as a copy of group ``ref_index`` at
    ``ratio`` times its learning rates: momentum, betas and the scheduler's per-group state follow the reference, so a
    stage unfrozen mid-run is scheduled as if it had trained from the start (``Unfreezer``).

    >>> w, v = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    >>> opt = torch.optim.AdamW([{"params": [w], "lr": 1e-3, "name": "head"}], lr=1e-3)
    >>> add_group_like(opt, None, {"params": [v], "name": "layer4"}, 0, 0.1)
    >>> opt.param_groups[1]["lr"], opt.param_groups[1]["betas"]
    (0.0001, (0.9, 0.999))
    """
    ref = optimizer.param_groups[ref_index]
    for key, value in ref.items():
        if key in _LR_KEYS:
            group[key] = value * ratio
        elif key not in group and key != "params":
            group[key] = value  # momentum/betas and scheduler bookkeeping follow the reference
    optimizer.add_param_group(group)
    if scheduler is not None:
        _extend_scheduler(scheduler, len(optimizer.param_groups) - 1, ref_index, ratio, group["lr"])


def unwrap_optimizer(optimizer: object) -> object:
    """The torch optimizer under a wrapper that holds it as ``.optimizer`` (Accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``): groups added to the wrapper's own lists would never be stepped.

    >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> class Wrapped: optimizer = opt
    >>> unwrap_optimizer(Wrapped()) is opt
    True
    """
    for _ in range(8):  # a wrapper of a wrapper; a bound, against an object that holds itself
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def unwrap_scheduler(scheduler: object) -> object:
    """The LR scheduler under a wrapper that holds it as ``.scheduler`` and is built over no optimizer itself
    (Accelerate's ``AcceleratedScheduler``, Lightning's ``LRSchedulerConfig``): its per-group lists are the ones to
    extend."""
    for _ in range(8):
        inner = getattr(scheduler, "scheduler", None)
        if hasattr(scheduler, "optimizer") or inner is None or inner is scheduler:
            break
        scheduler = inner
    return scheduler


def scheduler_optimizer(scheduler: object) -> object:
    """The torch optimizer an LR scheduler drives, wrappers of either undone (None for an object that is none)."""
    return unwrap_optimizer(getattr(unwrap_scheduler(scheduler), "optimizer", None))


def check_scheduler(scheduler: object, optimizer: torch.optim.Optimizer) -> object:
    """The LR scheduler that drives ``optimizer`` (wrappers undone), or a refusal of one that cannot drive the groups
    ``add_group_like`` adds: an object that is no LR scheduler, one of another optimizer, or one built before groups
    were added (its lists were left as they were, or grown for the wrong groups, and the stages opened later kept
    their first LR, unsaid).

    >>> check_scheduler(object(), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    Traceback (most recent call last):
    freezetune.errors.ConfigError: scheduler= is the LR scheduler of the optimizer (a torch.optim.lr_scheduler or timm \
scheduler built over it), got object
    """
    inner, owner = unwrap_scheduler(scheduler), scheduler_optimizer(scheduler)
    if not isinstance(owner, torch.optim.Optimizer):
        raise ConfigError(f"scheduler= is the LR scheduler of the optimizer (a torch.optim.lr_scheduler or timm "
                          f"scheduler built over it), got {type(scheduler).__name__}")  # fmt: skip
    if owner is not unwrap_optimizer(optimizer):
        raise ConfigError(f"scheduler= drives another optimizer than the one given: the groups added to this one would "
                          f"not follow it; pass the {type(scheduler).__name__} built over this optimizer")  # fmt: skip
    n_groups = len(owner.param_groups)
    for sched in [inner, *getattr(inner, "_schedulers", [])]:
        for attr in _SCALED_LISTS + _COPIED_LISTS:
            values = getattr(sched, attr, None)
            if isinstance(values, list) and len(values) != n_groups:
                raise ConfigError(f"scheduler= keeps {len(values)} per-group {attr} and the optimizer has {n_groups} "
                                  f"groups: it was built before groups were added (stages opened since?); build it "
                                  "over the optimizer as it is now")  # fmt: skip
    return inner


def _extend_scheduler(scheduler: object, n_before: int, ref_index: int, ratio: float, lr: float) -> None:
    for sched in [scheduler, *getattr(scheduler, "_schedulers", [])]:
        for attr in _SCALED_LISTS + _COPIED_LISTS:
            values = getattr(sched, attr, None)
            if isinstance(values, list) and len(values) == n_before:
                values.append(values[ref_index] * ratio if attr in _SCALED_LISTS else values[ref_index])
        last = getattr(sched, "_last_lr", None)
        if isinstance(last, list) and len(last) == n_before:
            last.append(lr)
        _extend_timm_warmup(sched, n_before)


def _extend_timm_warmup(sched: object, n_before: int) -> None:
    """A timm scheduler's per-group warmup increments, for the group just added: computed from its base value as
    timm does (``(base - warmup_lr_init) / warmup_t``), or it stayed at warmup_lr_init all warmup long."""
    steps, bases = getattr(sched, "warmup_steps", None), getattr(sched, "base_values", None)
    if not (isinstance(steps, list) and len(steps) == n_before and isinstance(bases, list) and len(bases) > n_before):
        return
    warmup_t = getattr(sched, "warmup_t", 0)
    steps.append((bases[-1] - getattr(sched, "warmup_lr_init", 0.0)) / warmup_t if warmup_t else 1)


def nominal_lr(group: dict) -> float:
    """A group's own LR before any scheduler moved it: OneCycleLR's peak (``max_lr``; its ``initial_lr`` is the
    peak / div_factor), else the ``initial_lr`` a scheduler saved, else ``lr``."""
    return float(group.get("max_lr", group.get("initial_lr", group["lr"])))
