"""The optimizer and scheduler as the Unfreezer reads them: wrapped ones (Accelerate, Lightning), the weight decay of
the stages it opens, a scheduler built after it, and an optimizer over model.parameters() that decays biases."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

import freezetune as ft
from conftest import TinyCNN

LR = 0.1


class PreparedOptimizer(torch.optim.Optimizer):
    """The shape of Accelerate's ``AcceleratedOptimizer``: a torch Optimizer that holds the real one as
    ``.optimizer`` and hands it its groups."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # no super().__init__: it owns no groups
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def step(self, closure=None):
        return self.optimizer.step(closure)


class PreparedScheduler:
    """The shape of Accelerate's ``AcceleratedScheduler``: no optimizer of its own, the real one as ``.scheduler``."""

    def __init__(self, scheduler: object) -> None:
        self.scheduler = scheduler

    def step(self) -> None:
        self.scheduler.step()


class LightningLikeOptimizer:
    """The shape of Lightning's ``LightningOptimizer``: no torch Optimizer itself, the real one as ``.optimizer``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer


def frozen(weight_decay: float = 0.0) -> tuple[TinyCNN, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyCNN()
    ft.freeze(model, "backbone")
    return model, torch.optim.AdamW(ft.param_groups(model, LR, decay=2.0, weight_decay=weight_decay))


def lrs(opt: torch.optim.Optimizer) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in opt.param_groups}


@pytest.mark.parametrize("given", ["both prepared", "inner scheduler", "lightning optimizer"])
def test_an_optimizer_and_scheduler_wrapped_by_accelerate_or_lightning_are_taken_as_prepared(given):
    # accelerator.prepare(model, opt, get_linear_schedule_with_warmup(opt, ...)) (a LambdaLR): the prepared pair was
    # refused ("got AcceleratedScheduler"), the inner scheduler with the prepared optimizer too ("drives another
    # optimizer"), and a LightningOptimizer was "not a torch.optim.Optimizer"
    model, inner = frozen()
    sched = LambdaLR(inner, lambda step: 0.5**step)
    opt = LightningLikeOptimizer(inner) if given == "lightning optimizer" else PreparedOptimizer(inner)
    scheduler = PreparedScheduler(sched) if given == "both prepared" else sched
    unfreezer = ft.Unfreezer(model, opt, "epoch:1", lr=LR, decay=2.0, scheduler=scheduler)
    for epoch in range(3):
        inner.step()
        scheduler.step()  # a LambdaLR not extended fails here: "zip() argument 2 is shorter than argument 1"
        unfreezer.step(epoch)
    sched.step()
    assert list(lrs(inner)) == ["head", "block3", "block2", "block1"]  # added to the torch optimizer itself
    assert lrs(inner) == pytest.approx({"head": LR * 0.5**4, "block3": LR / 2 * 0.5**4, "block2": LR / 4 * 0.5**4,
                                        "block1": LR / 8 * 0.5**4})  # fmt: skip


def test_a_scheduler_of_another_optimizer_is_still_refused_through_a_wrapper():
    model, opt = frozen()
    _, other = frozen()
    with pytest.raises(ft.FreezetuneError, match="scheduler= drives another optimizer than the one given"):
        ft.Unfreezer(model, PreparedOptimizer(opt), "epoch:1", lr=LR, scheduler=PreparedScheduler(LambdaLR(other, abs)))


def test_a_stage_opened_under_timms_no_decay_first_groups_takes_their_weight_decay():
    # timm's create_optimizer_v2 puts its no-decay group (unnamed) first: the stage opened took its 0, and its
    # convolutions trained without the 0.05 asked
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    model = TinyCNN()
    ft.freeze(model, "backbone")
    opt = create_optimizer_v2(model, "adamw", lr=LR, weight_decay=0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05]
    unfreezer = ft.Unfreezer(model, opt, "epoch:1", lr=LR)
    assert unfreezer.step(0) == ["block3"]
    decays = {g.get("name"): g["weight_decay"] for g in opt.param_groups}
    assert decays["block3"] == 0.05 and decays["block3/no_decay"] == 0.0


def test_a_scheduler_built_after_the_unfreezer_and_not_given_is_warned_of_as_a_stage_opens():
    # LambdaLR then failed at its next step ("zip() argument 2 is shorter"), timm's CosineLRScheduler left the stage
    # at warmup_lr_init the whole run: neither said a word (the warning was the constructor's only)
    from timm.scheduler import CosineLRScheduler

    for build in (lambda o: LambdaLR(o, lambda step: 0.9**step), lambda o: CosineLRScheduler(o, t_initial=6)):
        model, opt = frozen()
        unfreezer = ft.Unfreezer(model, opt, "epoch:1", lr=LR, decay=2.0)
        build(opt)
        with pytest.warns(UserWarning, match=r"unfroze 'block3': the optimizer has an LR scheduler .* this Unfreezer "
                                             r"was not given, .* set unfreezer.scheduler = sched"):  # fmt: skip
            assert unfreezer.step(0) == ["block3"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once
            assert unfreezer.step(1) == ["block2"]


def test_a_scheduler_set_on_the_unfreezer_after_it_is_built_drives_the_new_groups_and_is_checked():
    model, opt = frozen()
    unfreezer = ft.Unfreezer(model, opt, "epoch:1", lr=LR, decay=2.0)
    sched = LambdaLR(opt, lambda step: 0.5**step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unfreezer.scheduler = PreparedScheduler(sched)
        assert unfreezer.step(0) == ["block3"] and unfreezer.scheduler is sched
    opt.step()
    sched.step()
    assert lrs(opt) == pytest.approx({"head": LR / 2, "block3": LR / 4})
    _, other = frozen()
    with pytest.raises(ft.FreezetuneError, match="drives another optimizer"):  # was kept, and extended for the wrong
        unfreezer.scheduler = LambdaLR(other, abs)  # optimizer's groups
    # built before block3 opened, set after: its lists lack block3's group, which it never scheduled, unsaid
    model, opt = frozen()
    unfreezer = ft.Unfreezer(model, opt, "epoch:1", lr=LR, decay=2.0)
    stale = LambdaLR(opt, lambda step: 0.5**step)
    with pytest.warns(UserWarning, match="not given"):
        assert unfreezer.step(0) == ["block3"]
    with pytest.raises(ft.FreezetuneError, match=r"keeps 1 per-group base_lrs and the optimizer has 2 groups: it was "
                                                 r"built before groups were added"):  # fmt: skip
        unfreezer.scheduler = stale


def test_an_optimizer_over_all_parameters_that_decays_the_biases_and_norms_of_frozen_stages_is_reported_once():
    # AdamW(model.parameters(), weight_decay=0.05) at the Unfreezer's own LR: opened, each stage's biases and norms
    # decayed at 0.05, where ft.param_groups exempts them, in silence (only an LR that differed was said)
    torch.manual_seed(0)
    model = TinyCNN()
    ft.freeze(model, "backbone")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    with pytest.warns(UserWarning) as said:
        unfreezer = ft.Unfreezer(model, opt, "epoch:1", lr=LR)
    assert len(said) == 1, [str(w.message) for w in said]
    assert str(said[0].message) == (
        "frozen stage(s) 'block1', 'block2', 'block3', 'stem' are in the optimizer already (built over "
        "model.parameters()?): opened, their 8 bias and norm tensor(s) will decay at its weight_decay 0.05, where "
        "ft.param_groups gives them 0; build it over ft.param_groups(model, ...) or over the parameters that train "
        "(filter(lambda p: p.requires_grad, model.parameters()))"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, as it was made
        assert unfreezer.step(0) == ["block3"]
    # over the parameters that train, the stages it opens get param_groups' exemptions, and nothing is said
    torch.manual_seed(0)
    model = TinyCNN()
    ft.freeze(model, "backbone")
    opt = torch.optim.AdamW(filter(lambda p: p.requires_grad, model.parameters()), lr=LR, weight_decay=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ft.Unfreezer(model, opt, "epoch:1", lr=LR).step(0) == ["block3"]
    assert {g.get("name"): g["weight_decay"] for g in opt.param_groups}["block3/no_decay"] == 0.0
