"""The optimizer as the ``Unfreezer`` reads it: the group a stage it opens is scaled from, the weight decay it gives
it, and what it warns of in the optimizer and scheduler it was given (LRs off its rule, frozen stages another group
holds already, an LR scheduler it was not given)."""

from __future__ import annotations

import math
import warnings

import torch

from freezetune.errors import SpecError, choices
from freezetune.model.stages import Stage
from freezetune.training.optim import nominal_lr
from freezetune.training.param_groups import LRRule, group_stage, is_no_decay

# what torch's and timm's LR schedulers leave in each group they were built over (timm's: initial_lr, as torch's)
_SCHEDULER_TRACES = ("initial_lr", "swa_lr")
_HOW_TO_BUILD = ("build it over ft.param_groups(model, ...) or over the parameters that train "
                 "(filter(lambda p: p.requires_grad, model.parameters()))")  # fmt: skip


def decay_in_use(optimizer: torch.optim.Optimizer) -> float:
    """The weight decay of ``optimizer``'s groups of weights (those holding a parameter of 2 or more dimensions; the
    largest where they differ), else its default. The first group would not do: timm's ``create_optimizer_v2`` puts
    its no-decay group (biases, norms, unnamed) first, and every stage opened trained without decay.

    >>> w, b = torch.nn.Linear(2, 2).parameters()
    >>> opt = torch.optim.AdamW([{"params": [b], "weight_decay": 0.0}, {"params": [w], "weight_decay": 0.05}])
    >>> decay_in_use(opt)
    0.05
    """
    decays = [float(g.get("weight_decay", 0.0)) for g in optimizer.param_groups
              if not is_no_decay(g) and any(p.ndim >= 2 for p in g["params"])]  # fmt: skip
    return max(decays) if decays else float(optimizer.defaults.get("weight_decay", 0.0))


def reference(optimizer: torch.optim.Optimizer, rule: LRRule, stage: str) -> tuple[int, float]:
    """A group to copy scheduler state from for a group of ``stage``, and the LR ratio of ``stage`` to it."""
    target = rule(stage)
    for i, g in enumerate(optimizer.param_groups):
        held = group_stage(g)
        if held in rule.depth and rule(held) > 0:  # a stage at LR 0 (stage_lrs) scales nothing
            return i, target / rule(held)
    first = nominal_lr(optimizer.param_groups[0])
    if first > 0 or target == 0:
        return 0, target / first if first > 0 else 0.0
    raise SpecError(f"cannot give the unfrozen {stage} its lr {target:g}: every group the optimizer trains has lr 0, "
                    "so none gives a schedule to scale; give one a learning rate > 0")  # fmt: skip


def check_rule(optimizer: torch.optim.Optimizer, rule: LRRule, absolute: bool) -> None:
    """Warn when the optimizer's stage groups do not follow the Unfreezer's LR ``rule``: the LRs of the stages it
    unfreezes are scaled from a present group by the rule, so a rule other than the optimizer's gives them LRs that
    neither set of settings says. With ``absolute`` LRs (``stage_lrs``), one group must have its own."""
    lrs = {}  # stage -> its group's LR before any scheduler moved it
    for group in optimizer.param_groups:
        stage = group_stage(group)
        if stage in rule.depth:
            lrs.setdefault(stage, nominal_lr(group))
    if len(lrs) == 1 and absolute:  # the head alone trains: its LR is the one the others are scaled from
        ((stage, lr),) = lrs.items()
        if rule(stage) > 0 and abs(lr - rule(stage)) > 1e-6 * rule(stage):
            warnings.warn(f"the optimizer's {stage} group has lr {lr:g}, this Unfreezer's rule {rule(stage):g}: the "
                          f"stages it unfreezes get the rule's LRs scaled by {lr / rule(stage):g}, not the stage_lrs "
                          "given; give it the lr given to param_groups", stacklevel=3)  # fmt: skip
        return
    # the reference: the head, else the shallowest stage the rule gives an LR > 0 (a stage at 0 scales nothing)
    scalable = [s for s in sorted(lrs, key=rule.depth.__getitem__) if rule(s) > 0]
    if len(lrs) < 2 or not scalable:
        return
    ref, ref_lr = scalable[0], lrs[scalable[0]]
    for stage, lr in ((s, lr) for s, lr in lrs.items() if s != ref):
        expected = ref_lr * rule(stage) / rule(ref)
        if abs(lr - expected) > 1e-6 * max(abs(expected), 1e-12):
            warnings.warn(f"the optimizer's LRs do not follow this Unfreezer's rule: {stage} has {lr:g} where the "
                          f"rule, scaled to {ref}'s {ref_lr:g}, gives {expected:g}; the stages it unfreezes get LRs "
                          "by the rule: give it the lr, stage_lrs and decay given to param_groups",
                          stacklevel=3)  # fmt: skip
            return


def warn_held(optimizer: torch.optim.Optimizer, rule: LRRule, by_name: dict[str, Stage], names: list[str],
              no_decay: set[str], *, opened: bool, stacklevel: int) -> set[str]:  # fmt: skip
    """One warning for the stages ``names`` that an optimizer built over ``model.parameters()`` holds already: they
    train at their group's LR, not the rule's (any other LR), and their biases and norms at its weight decay, which
    ``param_groups`` exempts them from. ``opened``: they open now, else they will. Returns the stages named."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    off_rule = [n for n in names if any(_off_rule(optimizer, rule, n, group_of.get(id(p))) for p in by_name[n].params)]
    decaying = {n: found for n in names if (found := _exempt_but_decaying(by_name[n], group_of, no_decay))}
    said = set(off_rule) | set(decaying)
    if not said:
        return said
    what = [f"they {'' if opened else 'will '}train at their group's LR, not {_rule_says(rule)}"] if off_rule else []
    if decaying:
        decays = "/".join(
            f"{d:g}" for d in sorted({group_of[id(p)]["weight_decay"] for ps in decaying.values() for p in ps})
        )
        what.append(f"their {sum(map(len, decaying.values()))} bias and norm tensor(s) {'' if opened else 'will '}"
                    f"decay at its weight_decay {decays}, where ft.param_groups gives them 0")  # fmt: skip
    stages = f"stage(s) {choices(sorted(said))} were" if opened else f"frozen stage(s) {choices(sorted(said))} are"
    warnings.warn(f"{stages} in the optimizer already (built over model.parameters()?): {'' if opened else 'opened, '}"
                  f"{'; '.join(what)}; {_HOW_TO_BUILD}", stacklevel=stacklevel)  # fmt: skip
    return said


def _exempt_but_decaying(stage: Stage, group_of: dict[int, dict], no_decay: set[str]) -> list[torch.Tensor]:
    """``stage``'s parameters that ``param_groups`` exempts from weight decay (1-D: biases, norms; or named by
    ``no_decay``) and that sit in a group with a weight decay."""
    return [p for name, p in zip(stage.param_names, stage.params, strict=True)
            if (p.ndim <= 1 or name in no_decay) and group_of.get(id(p), {}).get("weight_decay", 0) > 0]  # fmt: skip


def _off_rule(optimizer: torch.optim.Optimizer, rule: LRRule, name: str, group: dict | None) -> bool:
    """Whether stage ``name``, held in ``group``, trains there at another LR than the rule gives it (any, under
    ``stage_lrs`` or ``decay``; a group at 1e-2 and ``lr=1e-3`` here)."""
    if group is None or group_stage(group) == name:
        return False
    if rule.stage_lrs or rule.decay:
        return True
    ref_index, ratio = reference(optimizer, rule, name)
    return not math.isclose(nominal_lr(group), nominal_lr(optimizer.param_groups[ref_index]) * ratio)


def _rule_says(rule: LRRule) -> str:
    return "by stage_lrs/decay" if rule.stage_lrs or rule.decay else f"at lr {rule.lr:g}"


def warn_scheduler_left_out(optimizer: torch.optim.Optimizer, opened: list[str] | None) -> bool:
    """Warn when ``optimizer``'s groups show an LR scheduler the Unfreezer was not given: the groups it adds are not
    in the scheduler's per-group lists (LambdaLR, CyclicLR and others fail at their next step; timm's leave them at
    their first LR). ``opened``: the stages opening now; None: said as the Unfreezer is made. Returns whether it
    warned."""
    if not any(key in g for g in optimizer.param_groups for key in _SCHEDULER_TRACES):
        return False
    later = "or, for one built after the Unfreezer, set unfreezer.scheduler = sched"
    if opened is None:
        warnings.warn("the optimizer has an LR scheduler (its groups hold initial_lr), not given to the Unfreezer: "
                      "pass scheduler= so the groups it adds follow it (some schedulers fail at their next step on a "
                      f"group they do not know), {later}", stacklevel=3)  # fmt: skip
    else:
        warnings.warn(f"unfroze {choices(opened)}: the optimizer has an LR scheduler (its groups hold initial_lr) this "
                      "Unfreezer was not given, so their groups do not follow it (some schedulers fail at their next "
                      f"step on them); pass scheduler= {later}", stacklevel=4)  # fmt: skip
    return True
