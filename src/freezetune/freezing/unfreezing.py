"""Progressive unfreezing: widen the trainable part of a model on a schedule or when the metric stalls.

The ``Unfreezer`` opens stages (or, by a plan, what a spec names) and gives what now trains its optimizer groups by
the ``param_groups`` LR rule, keeping a given LR scheduler driving them; the schedule's forms are parsed in
``freezing.schedule``. ``step(epoch, metric)`` is called once at the end of each epoch (0-based); what it unfreezes
trains from the next epoch. A second call for an epoch already stepped (a notebook cell run again) changes nothing,
with a warning.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from freezetune.errors import CheckpointError, SpecError, choices
from freezetune.freezing.bn_policy import check_bn_policy, policies
from freezetune.freezing.freeze import (
    Spec,
    count_parameters,
    is_count,
    resolve_stages,
    spec_items,
    unfreeze,
    warn_negative_unfreeze,
)
from freezetune.freezing.schedule import MODES, Schedule, parse_schedule
from freezetune.freezing.unfreezer_optimizer import (
    check_rule,
    decay_in_use,
    reference,
    warn_held,
    warn_scheduler_left_out,
)
from freezetune.model.stages import Stage, stages
from freezetune.model.tree import unwrap, wrapping
from freezetune.training.optim import add_group_like, check_scheduler, unwrap_optimizer
from freezetune.training.param_groups import (
    LRRule,
    check_weight_decay,
    group_stage,
    no_decay_names,
    stage_groups,
    stage_lr_text,
)


class Unfreezer:
    """Unfreeze stages on a schedule, adding their parameters to ``optimizer`` with the ``param_groups`` LR rule.

    A given ``scheduler`` keeps driving the new groups: their LR keys and the scheduler's per-group lists are
    extended from a reference group, scaled by the ratio of the two stages' rule LRs; one built after the Unfreezer is
    given by ``unfreezer.scheduler = sched`` (checked as ``scheduler=`` is). The optimizer and scheduler may be
    wrapped as Accelerate's ``prepare`` and Lightning wrap them: the groups go to the torch optimizer inside.
    ``weight_decay`` None (the default) gives the new groups the decay of the optimizer's groups of weights (biases
    and norms get a ``/no_decay`` twin with 0 when it is not 0); ``bn`` None keeps the BatchNorm policy each frozen
    layer has, a policy gives it to every layer still frozen at the first unfreeze (the optimizer holds what trains
    until then; a policy that differs from the frozen layers' is warned of here; what it releases, ``"affine"``'s
    scale and shift, gets a group at its stage's LR). ``held_elsewhere``: parameters another optimizer steps (a
    second one of the same model); they are opened but never added to ``optimizer``, which would update them twice a
    step.

    >>> import torch, torchvision, freezetune as ft
    >>> m = torchvision.models.resnet18(); ft.freeze(m, "backbone")
    >>> opt = torch.optim.SGD(ft.param_groups(m, 0.1, decay=10), lr=0.1)
    >>> u = ft.Unfreezer(m, opt, "epoch:1", lr=0.1, decay=10)
    >>> u.step(0), [g["name"] for g in opt.param_groups]
    (['layer4'], ['fc', 'fc/no_decay', 'layer4'])
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: str | Mapping[int, Spec] | Schedule,
        *,
        lr: float,
        stage_lrs: Mapping[str, float] | None = None,
        decay: float | None = None,
        bn: str | None = None,
        weight_decay: float | None = None,
        scheduler: object | None = None,
        mode: str = "max",
        held_elsewhere: Iterable[torch.Tensor] = (),
    ) -> None:
        if bn is not None:
            check_bn_policy(bn)
        # groups added to a wrapper's own lists (Accelerate's, Lightning's) would never be stepped
        optimizer = unwrap_optimizer(optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise SpecError(f"Unfreezer takes the optimizer (a torch.optim.Optimizer) it adds groups to, got "
                            f"{type(optimizer).__name__}")  # fmt: skip
        if mode not in MODES:  # any other spelling ("Max") was taken for "min": a rising accuracy a stall
            raise SpecError(f"unknown mode {mode!r}; modes are: {choices(MODES)}")
        # DDP all-reduces the gradients of the parameters that trained when it wrapped the model, and no others
        self.under_ddp = any(isinstance(m, nn.parallel.DistributedDataParallel) for m in wrapping(model))
        self.model, self.optimizer = unwrap(model), optimizer
        self.scheduler = scheduler  # the setter checks it can drive the groups added (and undoes a wrapper)
        self._told_scheduler = False  # the warning that a stage opened under a scheduler not given, said once
        self.schedule = parse_schedule(schedule)
        self.mode = self.schedule.mode or mode  # a plateau on a loss waits for it to stop falling
        self.rule = LRRule([s.name for s in stages(model)], lr, stage_lrs=stage_lrs, decay=decay)
        self.bn = bn
        held = policies(self.model)
        if bn is not None and held - {bn}:  # the frozen layers' statistics would start moving mid-run, unasked
            warnings.warn(f"the frozen BatchNorm layers have policy {choices(sorted(held))} and this Unfreezer's bn is "
                          f"{bn!r}: it applies to the layers still frozen from the first unfreeze on; give freeze() "
                          "the same bn to have it from the start", stacklevel=2)  # fmt: skip
        check_weight_decay(weight_decay)
        self.weight_decay = decay_in_use(optimizer) if weight_decay is None else weight_decay
        check_rule(optimizer, self.rule, bool(stage_lrs))
        # said now, while the optimizer can still be built otherwise, not epochs later as each stage opens (the
        # stages are traced for it only when the optimizer holds a frozen parameter)
        held_frozen = any(not p.requires_grad for g in optimizer.param_groups for p in g["params"])
        frozen = {s.name: s for s in self.frozen_stages()} if held_frozen else {}
        no_decay = no_decay_names(self.model) if frozen else set()
        self._told_held = warn_held(optimizer, self.rule, frozen, list(frozen), no_decay, opened=False, stacklevel=3)
        if scheduler is None:
            warn_scheduler_left_out(optimizer, None)
        # another optimizer's parameters (a second one of Lightning's configure_optimizers): it steps them; added to
        # this one too, they were updated twice a step
        self.held_elsewhere = {id(p) for p in held_elsewhere}
        self.unfrozen: list[str] = []
        self.events: list[tuple[int, list[str]]] = []
        self.added_groups: list[str] = []
        self.best: float | None = None
        self.num_bad = 0
        self._stepped: int | None = None  # the last epoch stepped
        self._stepped_known = True  # False: restored from a state saved before the state held it
        for spec in (self.schedule.plan or {}).values():
            resolve_stages(model, spec)  # validate the whole plan now, not at epoch 40
            warn_negative_unfreeze(spec)
        self._plan = {epoch: _ints_as_names(self.model, spec) for epoch, spec in self.schedule.plan.items()}
        if 0 in self._plan:
            self._unfreeze_spec(self._plan[0])

    @property
    def scheduler(self) -> object | None:
        """The LR scheduler that drives the groups this Unfreezer adds (under a wrapper, the one inside). Set it to
        one built after the Unfreezer, before the next stage opens; it is checked as ``scheduler=`` is.

        >>> import torch, torchvision, freezetune as ft
        >>> m = torchvision.models.resnet18(); ft.freeze(m, "backbone")
        >>> opt = torch.optim.SGD(ft.param_groups(m, 0.1), lr=0.1)
        >>> u = ft.Unfreezer(m, opt, "epoch:1", lr=0.1)
        >>> u.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9**step)
        >>> u.step(0), len(u.scheduler.lr_lambdas) == len(opt.param_groups)
        (['layer4'], True)
        """
        return self._scheduler

    @scheduler.setter
    def scheduler(self, scheduler: object | None) -> None:
        # one it cannot extend left the stages opened later at their first LR, unsaid
        self._scheduler = None if scheduler is None else check_scheduler(scheduler, self.optimizer)

    def step(self, epoch: int, metric: float | None = None, *, warming_up: bool = False) -> list[str]:
        """Advance the schedule at the end of ``epoch`` (0-based); returns the stages unfrozen by this call.

        ``warming_up``: the LR schedule is still raising the LR; a plateau schedule then keeps its best metric but
        counts no stall (a metric that stalls while the LR climbs to its peak has not plateaued).
        """
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise SpecError(f"Unfreezer.step: epoch must be the 0-based int of the epoch that ended, got {epoch!r}")
        epoch = int(epoch)  # a numpy int, from a loop over np.arange, is saved in the state as a plain int
        if self._stepped is not None and epoch <= self._stepped:  # it opened the next stage again (a plateau: a stall)
            warnings.warn(f"Unfreezer.step({epoch}) after step({self._stepped}): each epoch's end is stepped once; "
                          "this call changes nothing", stacklevel=2)  # fmt: skip
            return []
        self._stepped = epoch
        done: list[str] = []
        if self.schedule.kind == "epoch" and (epoch + 1) % self.schedule.every == 0:
            done = self._unfreeze(self._next_frozen())
        elif self.schedule.kind == "plateau" and self._stalled(metric, warming_up):
            done = self._unfreeze(self._next_frozen())
            if done:  # the stage opened is judged by its own epochs: one that dips first (it often does) never beat the
                # best from before it opened within a patience of 1, and the next stage opened each epoch after it
                self.best = None
        elif self.schedule.kind == "plan" and (epoch + 1) in self._plan:
            done = self._unfreeze_spec(self._plan[epoch + 1])
        if done:
            self.events.append((epoch, done))
        return done

    def skipped(self, epoch: int) -> bool:
        """Whether the end of ``epoch`` was not stepped: a run's last epoch is not (nothing trains after it), so a
        resume that trains on past it takes that step first. False where a state saved before freezetune recorded
        its steps was loaded."""
        return self._stepped_known and (self._stepped is None or self._stepped < epoch)

    def unfrozen_after(self, epoch: int) -> list[str]:
        """The stages this Unfreezer unfroze at the end of ``epoch`` (0-based), in the order it unfroze them."""
        return [name for e, names in self.events if e == epoch for name in names]

    def describe_opened(self, epoch: int, names: list[str], monitor: str) -> str:
        """The line that says what opened after ``epoch`` (``names``, as ``step`` returned them), why, and the
        trainable parameters and learning rates it leaves."""
        sched = self.schedule
        why = (f"{monitor} did not improve by more than {sched.min_delta:g} for {sched.patience} epoch(s); "
               if sched.kind == "plateau" else "")  # fmt: skip
        what, spec = ", ".join(names), sched.plan.get(epoch + 1) if sched.kind == "plan" else None
        items = [str(x) for x in spec_items(spec)]
        if spec is not None and items != names:  # part of a stage ("*.bias"), or an index: what, then where
            what = f"{', '.join(items)} (in {what})"
        lrs = stage_lr_text(self.optimizer.param_groups, names)
        return (f"unfroze {what} ({why}trainable {count_parameters(self.model)[0]:,} parameters"
                f"{'; ' if lrs else ''}{lrs})")  # fmt: skip

    def frozen_stages(self) -> list[Stage]:
        """Stages that still hold a frozen parameter, in model order."""
        return [s for s in stages(self.model) if any(not p.requires_grad for p in s.params)]

    def state_dict(self) -> dict:
        return {
            "unfrozen": list(self.unfrozen),
            "events": [[e, list(n)] for e, n in self.events],
            "groups": list(self.added_groups),
            "best": self.best,
            "num_bad": self.num_bad,
            "stepped": self._stepped,
        }

    def load_state_dict(self, state: dict) -> None:
        """Re-apply the unfrozen stages and re-create their optimizer groups, in the order they were made.

        Call it after building the model, freezing it as at the start and creating the optimizer (and scheduler),
        and before ``optimizer.load_state_dict`` — whose group count then matches.
        """
        keys = ("unfrozen", "groups", "events", "best", "num_bad")
        if not isinstance(state, Mapping) or any(k not in state for k in keys):
            got = choices(state) if isinstance(state, Mapping) else type(state).__name__
            raise CheckpointError(f"not an Unfreezer state (Unfreezer.state_dict() holds {choices(keys)}; got {got})")
        missing = [n for n in state["unfrozen"] if n not in self.rule.depth]
        if missing:
            raise CheckpointError(f"checkpoint unfroze stage(s) {choices(missing)} this model does not have")
        # event by event, as they happened: the first unfreeze under a bn policy also grouped what the policy released
        # in the stages still frozen, so unfreezing them all at once would make other groups; a plan's event opens
        # what its spec names (part of a stage, maybe), as it did
        for epoch, names in state["events"]:
            spec = self._plan.get(int(epoch) + 1) if self.schedule.kind == "plan" else None
            self._unfreeze(names, spec)
        self._unfreeze([n for n in state["unfrozen"] if n not in self.unfrozen])
        if self.added_groups != list(state["groups"]):
            raise CheckpointError(
                f"re-created optimizer groups {self.added_groups} differ from the checkpoint's {state['groups']}; "
                "freeze the model as at the start of the run before loading (this attempt opened stages and added "
                "groups: build the model and the optimizer again)"
            )
        self.events = [(int(e), list(n)) for e, n in state["events"]]
        self.best, self.num_bad = state["best"], int(state["num_bad"])
        self._stepped, self._stepped_known = state.get("stepped"), "stepped" in state

    # --- internals ------------------------------------------------------------------------------------------

    def _next_frozen(self) -> list[str]:
        frozen = self.frozen_stages()
        return [frozen[-1].name] if frozen else []

    def _stalled(self, metric: float | None, warming_up: bool = False) -> bool:
        if metric is None:
            raise SpecError("a plateau schedule needs the monitored metric: call step(epoch, metric)")
        sched, metric = self.schedule, float(metric)
        sign = 1.0 if self.mode == "max" else -1.0
        # a NaN is no improvement and never the best: kept as best, every later value compared False with it (a
        # stall each epoch, whatever the metric did)
        if math.isfinite(metric) and (self.best is None or sign * (metric - self.best) > sched.min_delta):
            self.best, self.num_bad = metric, 0
            return False
        self.num_bad = 0 if warming_up else self.num_bad + 1
        if self.num_bad >= sched.patience:
            self.num_bad = 0
            return True
        return False

    def _unfreeze_spec(self, spec: Spec) -> list[str]:
        """Open what a plan's ``spec`` names; returns the stages it touched that held a frozen parameter."""
        return self._unfreeze([s.name for s in resolve_stages(self.model, spec)], spec)

    def _unfreeze(self, names: list[str], spec: Spec | None = None) -> list[str]:
        """Open stages ``names``, or, given ``spec``, what it names in them (part of a stage, maybe), and give what
        now trains its groups."""
        frozen = {s.name for s in self.frozen_stages()}
        names = [n for n in names if n in frozen]  # a plan may name a stage that already trains: nothing to do
        if not names:
            return []
        trained = {id(p) for p in self.model.parameters() if p.requires_grad}
        unfreeze(self.model, names if spec is None else spec, bn=self.bn)
        by_name = {s.name: s for s in stages(self.model)}
        # opened: what now trains that did not. A spec may name only what trains already ("*.bias" over BatchNorm
        # biases under affine-only, in a ResNet whose convolutions have none): those stages were reported as opened
        names = [n for n in names if any(p.requires_grad and id(p) not in trained for p in by_name[n].params)]
        seen = {id(p) for g in self.optimizer.param_groups for p in g["params"]} | self.held_elsewhere
        no_decay = no_decay_names(self.model)
        self._warn_if_grouped_already(names, by_name, no_decay)
        if self.under_ddp and names:
            warnings.warn(f"unfroze {choices(names)} under DistributedDataParallel: DDP averages the gradients of "
                          "the parameters trainable when it wrapped the model only; wrap the model again (as "
                          "freezetune's trainer and Lightning callback do) or the ranks drift apart", stacklevel=3)  # fmt: skip
        if names and self.scheduler is None and not self._told_scheduler:
            self._told_scheduler = warn_scheduler_left_out(self.optimizer, names)
        for name in names:
            for group in stage_groups(by_name[name], self.rule(name), self.weight_decay, no_decay, seen):
                self._add_group(group)
            if name not in self.unfrozen:
                self.unfrozen.append(name)
        self._group_released(by_name, names, seen | trained, no_decay)
        return names

    def _group_released(self, by_name: dict[str, Stage], opened: list[str], skip: set[int],
                        no_decay: set[str]) -> None:  # fmt: skip
        """Groups for what a BatchNorm policy given here released in the stages still frozen (``bn="affine"`` over
        layers frozen with ``"frozen"``: their scale and shift): trainable, in no group, they were never stepped.
        ``skip``: what the optimizer holds, and what trained before (left out of the optimizer by the caller)."""
        for name, stage in by_name.items():
            if name not in opened:
                for group in stage_groups(stage, self.rule(name), self.weight_decay, no_decay, skip):
                    self._add_group(group)

    def _warn_if_grouped_already(self, names: list[str], by_name: dict[str, Stage], no_decay: set[str]) -> None:
        """An optimizer built over ``model.parameters()`` holds the frozen stages too: opened, they train at their
        group's LR and decay, whatever ``stage_lrs``, ``decay`` or ``param_groups``' exemptions say. (Under
        ``bn="affine"`` a stage's norms are in its own group already, which is right.)"""
        elsewhere = [n for n in names if any(id(p) in self.held_elsewhere for p in by_name[n].params)]
        if elsewhere:
            warnings.warn(f"stage(s) {choices(elsewhere)} are in another optimizer: they train there, at its LR (this "
                          "Unfreezer adds groups to its own optimizer only)", stacklevel=4)  # fmt: skip
        untold = [n for n in names if n not in self._told_held]
        self._told_held |= warn_held(self.optimizer, self.rule, by_name, untold, no_decay, opened=True, stacklevel=5)

    def _add_group(self, group: dict) -> None:
        existing = next((g for g in self.optimizer.param_groups if g.get("name") == group["name"]), None)
        if existing is not None:
            # e.g. BN affine params trained under bn="affine": the stage already has a group; grow it
            existing["params"].extend(group["params"])
            self.added_groups.append(f"+{group['name']}")
            return
        ref_index, ratio = reference(self.optimizer, self.rule, group_stage(group))
        add_group_like(self.optimizer, self.scheduler, group, ref_index, ratio)
        self.added_groups.append(group["name"])


def _ints_as_names(model: nn.Module, spec: Spec) -> list:
    """A plan's ``spec`` with each int replaced by the names of the stages it counts, as ``unfreeze`` takes it: the
    int was warned of when the plan was read, not again when it opens.

    >>> import torchvision
    >>> _ints_as_names(torchvision.models.resnet18(), [2, "*.bias"])
    ['stem', 'layer1', '*.bias']
    """
    named: list = []
    for item in spec_items(spec):
        named += [s.name for s in resolve_stages(model, item)] if is_count(item) else [item]
    return named
