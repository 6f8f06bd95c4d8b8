"""Progressive unfreezing: schedules, optimizer groups, LR schedulers driving new groups, and resume."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, OneCycleLR
from torch.optim.swa_utils import SWALR

import freezetune as ft
from conftest import TinyCNN, make_batch
from freezetune.training.optim import build_scheduler

LR = 0.1


def frozen_setup(schedule, *, decay=2.0, weight_decay=0.0, bn="frozen", make_scheduler=None):
    """TinyCNN with only the head trainable, its optimizer (AdamW), an optional LR scheduler and the Unfreezer."""
    torch.manual_seed(0)
    model = TinyCNN()
    ft.freeze(model, "backbone", bn=bn)
    opt = torch.optim.AdamW(ft.param_groups(model, LR, decay=decay, weight_decay=weight_decay))
    sched = make_scheduler(opt) if make_scheduler else None
    unfreezer = ft.Unfreezer(
        model, opt, schedule, lr=LR, decay=decay, bn=bn, weight_decay=weight_decay, scheduler=sched
    )
    return model, opt, sched, unfreezer


def group_names(opt: torch.optim.Optimizer) -> list[str]:
    return [g["name"] for g in opt.param_groups]


def assert_each_param_once(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter sits in two optimizer groups"
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}


def run_schedule(unfreezer: ft.Unfreezer, epochs: int, metrics=None) -> dict[int, list[str]]:
    events = {}
    for epoch in range(epochs):
        done = unfreezer.step(epoch, None if metrics is None else metrics[epoch])
        if done:
            events[epoch] = done
    return events


# --- schedules ----------------------------------------------------------------------------------------------


def test_epoch_schedule_unfreezes_from_the_head_every_n_epochs():
    model, opt, _, unfreezer = frozen_setup("epoch:2")
    assert run_schedule(unfreezer, 12) == {1: ["block3"], 3: ["block2"], 5: ["block1"], 7: ["stem"]}
    assert group_names(opt) == ["head", "block3", "block2", "block1", "stem"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([LR / 2**d for d in range(5)])
    assert unfreezer.frozen_stages() == []
    assert ft.count_parameters(model)[0] == ft.count_parameters(model)[1]
    assert_each_param_once(model, opt)


def test_unfrozen_stage_trains_and_its_bn_updates():
    model, opt, _, unfreezer = frozen_setup("epoch:1")
    unfreezer.step(0)
    stem_before = model.stem[0].weight.detach().clone()
    block3_before = [t.detach().clone() for t in (model.block3[0].weight, model.block3[1].running_mean)]
    model.train()
    x, y = make_batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(model.block3[0].weight, block3_before[0])
    assert not torch.equal(model.block3[1].running_mean, block3_before[1])
    assert torch.equal(model.stem[0].weight, stem_before)


def test_unfreezing_keeps_the_bn_policy_the_rest_was_frozen_with():
    torch.manual_seed(0)
    model = TinyCNN()
    ft.freeze(model, "backbone", bn="affine")
    opt = torch.optim.AdamW(ft.param_groups(model, LR, weight_decay=0))
    ft.Unfreezer(model, opt, "epoch:1", lr=LR).step(0)  # no bn given
    assert model.stem[1].weight.requires_grad and model.block1[1].weight.requires_grad  # still "affine"


def test_an_optimizer_built_by_another_lr_rule_is_reported():
    model = TinyCNN()
    ft.freeze(model, "backbone")
    ft.unfreeze(model, "block3")
    opt = torch.optim.AdamW(ft.param_groups(model, 1e-3, stage_lrs={"block3": 1e-4}))
    with pytest.warns(UserWarning, match=r"do not follow this Unfreezer's rule: block3 has 0.0001 .* gives 1e-05"):
        ft.Unfreezer(model, opt, "epoch:1", lr=1e-3, decay=100)  # README's old example: two rules
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ft.Unfreezer(model, opt, "epoch:1", lr=1e-3, stage_lrs={"block3": 1e-4})  # the same rule: silent
        sched_opt = torch.optim.AdamW(ft.param_groups(model, 1e-3, decay=10))
        sched = OneCycleLR(sched_opt, max_lr=[g["lr"] for g in sched_opt.param_groups], total_steps=10)  # moves lrs
        ft.Unfreezer(model, sched_opt, "epoch:1", lr=1e-3, decay=10, scheduler=sched)


def test_a_stage_at_lr_zero_neither_breaks_an_unfreeze_nor_sets_the_others_lrs():
    # the stem's affine BatchNorm at stage_lrs 0: the first unfreeze divided by its LR (ZeroDivisionError)
    model = TinyCNN()
    ft.freeze(model, "backbone", bn="affine")
    rule = {"lr": 1e-3, "stage_lrs": {"stem": 0.0}}
    opt = torch.optim.AdamW(ft.param_groups(model, **rule))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the optimizer follows the rule: nothing to report
        unfreezer = ft.Unfreezer(model, opt, "epoch:1", **rule)
    assert unfreezer.step(0) == ["block3"]
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["stem/no_decay"] == 0 and lrs["head"] == 1e-3 and lrs["block3"] == pytest.approx(1e-3)


@pytest.mark.parametrize("mode", ["max", "min"])
def test_plateau_schedule(mode):
    metrics = [0.50, 0.60, 0.605, 0.609, 0.70, 0.70, 0.695, 0.80, 0.80, 0.805, 0.90]
    sign = 1 if mode == "max" else -1
    _, opt, _, unfreezer = frozen_setup(f"plateau:patience=2,min_delta=0.01,mode={mode}")
    events = run_schedule(unfreezer, len(metrics), [sign * m for m in metrics])
    assert events == {3: ["block3"], 6: ["block2"], 9: ["block1"]}
    assert group_names(opt) == ["head", "block3", "block2", "block1"]
    state = unfreezer.state_dict()
    assert state["best"] == pytest.approx(sign * 0.90) and state["num_bad"] == 0


def test_a_plateau_counts_no_stall_while_the_lr_warms_up():
    # a metric that stalls while the LR still climbs to its peak has not plateaued; its best is kept all the same
    _, _, _, unfreezer = frozen_setup("plateau:patience=1")
    assert [unfreezer.step(e, m, warming_up=True) for e, m in enumerate([0.5, 0.4, 0.6, 0.6])] == [[]] * 4
    assert unfreezer.state_dict()["best"] == 0.6 and unfreezer.state_dict()["num_bad"] == 0
    assert unfreezer.step(4, 0.55) == ["block3"]  # the first stall after the warm-up, against the best seen in it


def test_a_stage_opened_on_a_plateau_is_judged_by_its_own_epochs():
    # an opened stage that dips first was measured against the best from before it opened: under a patience of 1
    # every later epoch was a stall, and the rest of the stages opened one an epoch (seen: all 9 of EfficientNet-Lite0
    # in 8 epochs, the run ending well below its linear probe)
    _, _, _, unfreezer = frozen_setup("plateau:patience=1")
    opened = [unfreezer.step(e, m) for e, m in enumerate([0.50, 0.60, 0.60, 0.30, 0.35, 0.40, 0.45])]
    assert opened == [[], [], ["block3"], [], [], [], []]
    assert unfreezer.best == 0.45
    assert unfreezer.step(7, 0.44) == ["block2"]  # a stall of the new stage's own


def test_plateau_needs_the_metric():
    _, _, _, unfreezer = frozen_setup("plateau:patience=1")
    with pytest.raises(ft.FreezetuneError, match="metric"):
        unfreezer.step(0)


def test_dict_plan():
    model, opt, _, unfreezer = frozen_setup({0: "block3", 2: ["block2", "block1"], 4: "st*"})
    assert group_names(opt) == ["head", "block3"], "epoch 0 of the plan applies at once"
    assert run_schedule(unfreezer, 6) == {1: ["block1", "block2"], 3: ["stem"]}
    assert unfreezer.frozen_stages() == []
    assert_each_param_once(model, opt)


def trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_a_plan_opens_what_its_spec_names_not_the_whole_stages_it_touches():
    # {1: "*.bias"} opened every stage it touched, the whole network; {1: "block3.0*"} all of block3
    for spec in ("*.bias", "block3.0*", ["block3.0*", "block1"]):
        model, opt, _, unfreezer = frozen_setup({1: spec})
        twin = TinyCNN()
        ft.freeze(twin, "backbone")
        ft.unfreeze(twin, spec)
        unfreezer.step(0)
        assert trainable(model) == trainable(twin) and len(trainable(model)) < len(list(model.parameters())), spec
        assert_each_param_once(model, opt)
        # a resume re-opens what the plan opened, and makes the same groups, which the optimizer's state then fits
        resumed, resumed_opt, _, again = frozen_setup({1: spec})
        again.load_state_dict(unfreezer.state_dict())
        resumed_opt.load_state_dict(opt.state_dict())
        assert trainable(resumed) == trainable(model) and group_names(resumed_opt) == group_names(opt), spec


def test_a_plan_that_opens_part_of_a_stage_then_all_of_it_grows_its_group():
    model, opt, _, unfreezer = frozen_setup({1: "block3.1*", 2: "block3"})
    assert run_schedule(unfreezer, 3) == {0: ["block3"], 1: ["block3"]}
    assert trainable(model) == [n for n, _ in model.named_parameters() if n.startswith(("block3", "head"))]
    assert_each_param_once(model, opt)


def test_a_second_step_for_an_epoch_already_stepped_changes_nothing():
    # a notebook cell run again opened the next stage each time, all under the same epoch
    for schedule in ("epoch:1", "plateau:patience=1"):
        _, opt, _, unfreezer = frozen_setup(schedule)
        unfreezer.step(0, 0.5)
        opened = unfreezer.step(1, 0.4)
        with pytest.warns(UserWarning, match=r"step\(1\) after step\(1\): each epoch's end is stepped once"):
            assert unfreezer.step(1, 0.4) == []
        assert unfreezer.events == ([(0, ["block3"]), (1, ["block2"])] if schedule == "epoch:1" else [(1, opened)])
        assert unfreezer.state_dict()["num_bad"] == 0


@pytest.mark.parametrize("bad", ["0", 1.0, True, -1, None])
def test_a_step_refuses_an_epoch_that_is_not_a_0_based_int(bad):
    # an epoch read from a config or a logger as "0" raised Python's "can only concatenate str" from the schedule
    _, _, _, unfreezer = frozen_setup("epoch:1")
    with pytest.raises(ft.FreezetuneError, match=r"epoch must be the 0-based int of the epoch that ended, got"):
        unfreezer.step(bad)
    assert unfreezer.step(np.int64(0)) == ["block3"]  # a numpy int (a loop over np.arange) is one
    assert unfreezer.state_dict()["stepped"] == 0 and type(unfreezer.state_dict()["stepped"]) is int


def test_plan_naming_a_trainable_stage_reports_nothing():
    _, opt, _, unfreezer = frozen_setup({1: "head", 2: "block3"})
    assert run_schedule(unfreezer, 3) == {1: ["block3"]}
    assert group_names(opt) == ["head", "block3"]


def test_a_plan_step_that_opens_nothing_new_reports_no_stage():
    # "*.bias" over BatchNorm biases that train already (affine-only), in a ResNet whose convolutions have none: the
    # step said it opened stem, layer1, ..., layer4, and they were listed as unfrozen, with nothing changed
    import torchvision

    model = torchvision.models.resnet18(num_classes=5)
    ft.freeze(model, "backbone", bn="affine-only")
    trainable = ft.count_parameters(model)[0]
    optimizer = torch.optim.AdamW(ft.param_groups(model, 1e-3))
    unfreezer = ft.Unfreezer(model, optimizer, {1: "*.bias", 2: "layer4"}, lr=1e-3)
    assert unfreezer.step(0, 0.1) == [] and unfreezer.unfrozen == [] and ft.count_parameters(model)[0] == trainable
    assert unfreezer.step(1, 0.1) == ["layer4"] and unfreezer.unfrozen == ["layer4"]


def test_plan_is_validated_up_front():
    with pytest.raises(ft.FreezetuneError, match="'block9'") as info:
        frozen_setup({0: "block3", 40: "block9"})
    assert "'stem'" in str(info.value)


@pytest.mark.parametrize(
    "bad",
    [
        "epoch:0",
        "epoch:x",
        "plateau:patience=0",
        "plateau:speed=1",
        "cosine",
        "plateau:mode=up",
        "plateau:min_delta=-1",
    ],
)
def test_bad_schedule_lists_the_forms(bad):
    with pytest.raises(ft.FreezetuneError, match="epoch:N") as info:
        frozen_setup(bad)
    assert repr(bad) in str(info.value)


def test_bad_bn_policy_is_reported_at_construction():
    _, opt, _, unfreezer = frozen_setup("epoch:1")
    with pytest.raises(ft.FreezetuneError, match="'frozen'"):
        ft.Unfreezer(unfreezer.model, opt, "epoch:1", lr=LR, bn="eval")


def test_a_stage_opened_without_a_weight_decay_given_takes_the_optimizers_not_its_first_groups():
    # under bn affine-only every frozen stage's BatchNorm trains (no decay): the first groups are /no_decay twins,
    # whose 0 the Unfreezer gave each stage it opened when no weight_decay was named
    torch.manual_seed(0)
    model = TinyCNN()
    ft.freeze(model, "backbone", bn="affine-only")
    opt = torch.optim.AdamW(ft.param_groups(model, LR, weight_decay=0.05))
    assert opt.param_groups[0]["name"].endswith("/no_decay")
    unfreezer = ft.Unfreezer(model, opt, "epoch:1", lr=LR, bn="affine-only")
    assert unfreezer.step(0) == ["block3"]
    opened = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert opened["block3"] == 0.05 and opened["block3/no_decay"] == 0.0


@pytest.mark.parametrize(("bn", "weight_decay"), [("frozen", 0.0), ("frozen", 0.05), ("affine", 0.0), ("affine", 0.05)])
def test_no_duplicate_params_after_repeated_steps(bn, weight_decay):
    model, opt, _, unfreezer = frozen_setup("epoch:1", bn=bn, weight_decay=weight_decay)
    assert_each_param_once(model, opt)
    for epoch in range(8):
        unfreezer.step(epoch)
        assert_each_param_once(model, opt)
        model.train()
        opt.zero_grad()
        x, y = make_batch(epoch)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for g in opt.param_groups:
        expected = LR / 2.0 ** (4 - TinyCNN.STAGES.index(g["name"].split("/")[0]))
        assert g["lr"] == pytest.approx(expected)
        assert g["weight_decay"] == (0.0 if g["name"].endswith("/no_decay") else weight_decay)


# --- LR schedulers keep driving new groups ------------------------------------------------------------------

TOTAL = 12


def cosine(opt):
    return CosineAnnealingLR(opt, T_max=TOTAL + 4)  # ends above zero, so LR ratios stay defined


def one_cycle(opt):
    return OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=TOTAL + 1, pct_start=0.4)


def lambda_lr(opt):
    return LambdaLR(opt, lambda step: 0.9**step)


def warmup_cosine(opt):
    """The trainer's ``--scheduler cosine --warmup-epochs``: a SequentialLR (linear ramp, then cosine) whose inner
    schedulers keep their own per-group lists; stages are unfrozen both during the ramp and after it."""
    return build_scheduler(opt, "cosine", epochs=TOTAL + 4, steps_per_epoch=1, warmup_epochs=4)


def swa(opt):
    """SWALR anneals each group to its own ``swa_lr``: a stage opened later anneals to its rule's share of the head's."""
    return SWALR(opt, swa_lr=[g["lr"] * 0.5 for g in opt.param_groups], anneal_epochs=TOTAL - 2)


@pytest.mark.parametrize("make_scheduler", [cosine, one_cycle, lambda_lr, warmup_cosine, swa])
def test_scheduler_drives_new_groups_like_groups_present_from_the_start(make_scheduler):
    """A stage unfrozen mid-run follows the schedule phase: its LR equals that of a run where it always had a group."""
    model, opt, sched, unfreezer = frozen_setup("epoch:3", weight_decay=0.01, make_scheduler=make_scheduler)
    torch.manual_seed(0)
    reference = TinyCNN()  # every stage trainable from step 0: the LRs the unfrozen groups must follow
    ref_opt = torch.optim.AdamW(ft.param_groups(reference, LR, decay=2.0, weight_decay=0.01))
    ref_sched = make_scheduler(ref_opt)
    for step in range(TOTAL):
        for o, s in ((opt, sched), (ref_opt, ref_sched)):
            o.step()  # no gradients: parameters do not move, only the schedule advances
            s.step()
        new = unfreezer.step(step)
        ref = {g["name"]: g for g in ref_opt.param_groups}
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(ref[g["name"]]["lr"], rel=1e-9), (step, g["name"])
            assert g["betas"] == pytest.approx(ref[g["name"]]["betas"]), "OneCycleLR momentum must follow too"
            assert g.get("swa_lr", 0) == pytest.approx(ref[g["name"]].get("swa_lr", 0), rel=1e-9), (step, g["name"])
        if new:
            ratio = opt.param_groups[-1]["lr"] / opt.param_groups[0]["lr"]
            assert ratio == pytest.approx(unfreezer.rule(new[0]) / unfreezer.rule("head"))
    assert group_names(opt)[::2] == ["head", "block3", "block2", "block1", "stem"]
    assert sched.get_last_lr() == pytest.approx([g["lr"] for g in opt.param_groups])


# --- state_dict / resume ------------------------------------------------------------------------------------

EPOCHS, STEPS = 4, 3


def build_run():
    """Everything a training script builds at start: model frozen to its head, AdamW + weight decay, OneCycleLR."""
    torch.manual_seed(0)
    model = TinyCNN()
    ft.freeze_to(model, -1)
    opt = torch.optim.AdamW(ft.param_groups(model, LR, decay=2.0, weight_decay=0.05))
    sched = OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=EPOCHS * STEPS)
    unfreezer = ft.Unfreezer(model, opt, "epoch:1", lr=LR, decay=2.0, weight_decay=0.05, scheduler=sched)
    return model, opt, sched, unfreezer


def train(model, opt, sched, unfreezer, epochs: range) -> None:
    for epoch in epochs:
        model.train()
        for i in range(STEPS):
            x, y = make_batch(100 * epoch + i)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        unfreezer.step(epoch)


def test_resume_through_state_dict_matches_an_uninterrupted_run(tmp_path):
    straight = build_run()
    train(*straight, range(EPOCHS))

    first = build_run()
    train(*first, range(2))
    model, opt, sched, unfreezer = first
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "unfreezer": unfreezer.state_dict(),
        },
        path,
    )
    del first, model, opt, sched, unfreezer  # "kill" the run

    saved = torch.load(path, weights_only=False)
    model, opt, sched, unfreezer = resumed = build_run()  # freeze_to as at start -> optimizer -> scheduler
    unfreezer.load_state_dict(saved["unfreezer"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    model.load_state_dict(saved["model"])
    assert group_names(opt) == group_names(straight[1])[: len(group_names(opt))]
    train(*resumed, range(2, EPOCHS))

    assert group_names(opt) == group_names(straight[1])
    for (name, a), b in zip(straight[0].state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in straight[1].param_groups]
    assert unfreezer.state_dict() == straight[3].state_dict()


def test_state_dict_records_stages_plateau_and_groups():
    _, _, _, unfreezer = frozen_setup("plateau:patience=2", weight_decay=0.05)
    run_schedule(unfreezer, 4, [0.5, 0.4, 0.4, 0.45])
    state = unfreezer.state_dict()
    assert state["unfrozen"] == ["block3"]
    assert state["groups"] == ["block3", "block3/no_decay"]
    assert state["best"] == 0.45 and state["num_bad"] == 0  # (block3's own best, after it opened)
    assert state["events"] == [[2, ["block3"]]]

    _, opt, _, fresh = frozen_setup("plateau:patience=2", weight_decay=0.05)
    fresh.load_state_dict(state)
    assert group_names(opt) == ["head", "head/no_decay", "block3", "block3/no_decay"]
    # against the saved best, two epochs without news: restarted, the first would have become the best
    assert fresh.step(4, 0.45) == [] and fresh.step(5, 0.44) == ["block2"], "plateau counter must resume, not restart"


def test_load_state_dict_rejects_a_model_not_frozen_as_at_start():
    _, _, _, unfreezer = frozen_setup("epoch:1")
    unfreezer.step(0)
    state = unfreezer.state_dict()
    torch.manual_seed(0)
    model = TinyCNN()
    ft.freeze_to(model, -2)  # block3 already trainable: its group would not be re-created
    opt = torch.optim.AdamW(ft.param_groups(model, LR))
    with pytest.raises(ft.FreezetuneError, match="freeze the model as at the start"):
        ft.Unfreezer(model, opt, "epoch:1", lr=LR).load_state_dict(state)
    state["unfrozen"] = ["block7"]
    with pytest.raises(ft.FreezetuneError, match="'block7'"):
        ft.Unfreezer(model, opt, "epoch:1", lr=LR).load_state_dict(state)


def test_load_state_dict_names_what_is_not_an_unfreezer_state():
    _, _, _, unfreezer = frozen_setup("epoch:1")
    for state in ({"foo": 1}, [], {"unfrozen": []}):  # a KeyError: 'unfrozen' before
        with pytest.raises(ft.FreezetuneError, match="not an Unfreezer state .*'unfrozen', 'groups'"):
            unfreezer.load_state_dict(state)


def test_a_plan_keyed_by_anything_but_epochs_is_a_spec_error():
    model = TinyCNN()
    ft.freeze(model, "backbone")
    opt = torch.optim.AdamW(ft.param_groups(model, LR, weight_decay=0))
    with pytest.raises(ft.FreezetuneError, match=r"maps epochs \(ints\) to freeze specs.*got key\(s\) 'two'"):
        ft.Unfreezer(model, opt, {"two": "block3", 3: "block2"}, lr=LR)
    assert ft.Unfreezer(model, opt, {"2": "block3"}, lr=LR).schedule.plan == {2: "block3"}  # YAML may give "2"
    # --unfreeze "{1:block3}": YAML reads one key, "1:block3"; the message names the missing space
    with pytest.raises(ft.FreezetuneError, match=r"got key\(s\) '1:block3'; write a space after each colon"):
        ft.Unfreezer(model, opt, {"1:block3": None}, lr=LR)


def test_a_plateau_without_a_mode_follows_the_unfreezers_mode():
    # a run monitoring val_loss: a falling loss is progress (it unfroze a stage every epoch as the loss fell)
    model = TinyCNN()
    ft.freeze(model, "backbone")
    opt = torch.optim.AdamW(ft.param_groups(model, LR))
    unfreezer = ft.Unfreezer(model, opt, "plateau:patience=1", lr=LR, mode="min")
    assert run_schedule(unfreezer, 6, [2.0, 1.5, 1.2, 1.4, 1.3, 1.35]) == {3: ["block3"], 5: ["block2"]}


def test_a_plateau_mode_against_the_monitor_is_refused():
    from freezetune.config.check import validate
    from freezetune.config.train_config import TrainConfig

    with pytest.raises(ft.FreezetuneError, match=r"has mode=max, but val_loss improves as it goes down"):
        validate(TrainConfig(data="d", monitor="val_loss", unfreeze="plateau:patience=2,mode=max", freeze=-2))
    validate(TrainConfig(data="d", monitor="val_loss", unfreeze="plateau:patience=2,mode=min", freeze=-2))


def test_a_timm_scheduler_drives_the_groups_the_unfreezer_adds():
    # timm keeps its per-group values in base_values, which was not extended: the new group kept its first LR while
    # the head annealed to zero
    from timm.scheduler import CosineLRScheduler

    for warmup in ({}, {"warmup_t": 3}):  # warmup: timm's per-group warmup_steps too (block3 stayed at 0 meanwhile)
        model, opt, sched, unfreezer = frozen_setup(
            "epoch:1", make_scheduler=lambda o, w=warmup: CosineLRScheduler(o, t_initial=6, **w)
        )
        ratios = []
        for epoch in range(4):
            unfreezer.step(epoch)
            sched.step(epoch + 1)
            lrs = {g["name"]: g["lr"] for g in opt.param_groups}
            ratios.append(lrs["block3"] / lrs["head"])
        assert ratios == pytest.approx([unfreezer.rule("block3") / unfreezer.rule("head")] * 4), warmup


def test_a_head_only_optimizer_at_another_lr_than_the_rules_absolute_stage_lrs_is_reported():
    # the check needed two stages with groups: from the head alone (the usual start) layer LRs came out scaled by
    # head lr / rule lr, 1e-5 for a stage_lrs of 1e-4, in silence
    model = TinyCNN()
    ft.freeze(model, "backbone")
    opt = torch.optim.AdamW(ft.param_groups(model, 1e-3))
    with pytest.warns(UserWarning, match=r"head group has lr 0.001, this Unfreezer's rule 0.01"):
        ft.Unfreezer(model, opt, "epoch:1", lr=1e-2, stage_lrs={"block3": 1e-4})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ft.Unfreezer(model, opt, "epoch:1", lr=1e-3, stage_lrs={"block3": 1e-4})
        ft.Unfreezer(model, opt, "epoch:1", lr=1e-2, decay=10)  # relative: scaled from whatever the head has


def test_stages_already_in_an_optimizer_over_all_parameters_are_reported_when_stage_lrs_are_asked():
    model = TinyCNN()
    ft.freeze(model, "backbone")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # frozen parameters included, a common habit
    # said as the Unfreezer is made, while the optimizer can be built otherwise (it was said as each stage opened)
    with pytest.warns(UserWarning, match=r"frozen stage\(s\) .*'block3'.* are in the optimizer already .* not by "
                                         r"stage_lrs/decay"):  # fmt: skip
        unfreezer = ft.Unfreezer(model, opt, "epoch:1", lr=1e-3, stage_lrs={"block3": 1e-5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        assert unfreezer.step(0) == ["block3"]
    later = torch.optim.AdamW(ft.param_groups(model, 1e-3, stage_lrs={"block3": 1e-5}))  # block3 trains, block2 not
    unfreezer = ft.Unfreezer(model, later, "epoch:1", lr=1e-3, stage_lrs={"block3": 1e-5})
    later.add_param_group({"params": list(model.block2.parameters()), "name": "mine"})  # a group added afterwards
    with pytest.warns(UserWarning, match=r"'block2' were in the optimizer already .* not by stage_lrs/decay"):
        assert unfreezer.step(0) == ["block2"]


def test_stages_already_in_an_optimizer_at_another_lr_than_the_unfreezers_are_reported():
    # an optimizer at 1e-2 over model.parameters(), lr=1e-3 given here: the opened stage trained at 1e-2, in silence
    model = TinyCNN()
    ft.freeze(model, "backbone")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match=r"frozen stage\(s\) .*'block3'.* are in the optimizer already .* their "
                                         r"group's LR, not at lr 0.001"):  # fmt: skip
        unfreezer = ft.Unfreezer(model, opt, "epoch:1", lr=1e-3)
    assert unfreezer.step(0) == ["block3"] and opt.param_groups[0]["lr"] == 1e-2
    with warnings.catch_warnings():  # the same LR, no decay: nothing differs, nothing said
        warnings.simplefilter("error")
        ft.Unfreezer(model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0), "epoch:1", lr=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "Max"}, r"unknown mode 'Max'; modes are: 'max', 'min'"),  # was taken for "min"
        ({"schedule": {-1: "block3"}}, r"epochs from 0; got key\(s\) '-1'"),  # never fired
        ({"optimizer": "params"}, r"takes the optimizer .* got str"),  # was AttributeError on param_groups
        # both were taken, and the stages opened later kept their first LR while the scheduler moved the others'
        ({"scheduler": object()}, r"scheduler= is the LR scheduler of the optimizer .* got object$"),
        (
            {"scheduler": LambdaLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))]), lambda step: 1.0)},
            r"scheduler= drives another optimizer than the one given",
        ),  # fmt: skip
    ],
)
def test_unfreezer_arguments_that_cannot_work_are_refused(kwargs, match):
    model = TinyCNN()
    ft.freeze(model, "backbone")
    args = {"optimizer": torch.optim.AdamW(ft.param_groups(model, LR)), "schedule": "plateau:patience=1", **kwargs}
    with pytest.raises(ft.FreezetuneError, match=match):
        ft.Unfreezer(model, args.pop("optimizer"), args.pop("schedule"), lr=LR, **args)


def test_an_optimizer_with_a_scheduler_not_given_to_the_unfreezer_is_reported():
    model = TinyCNN()
    ft.freeze(model, "backbone")
    opt = torch.optim.AdamW(ft.param_groups(model, LR))
    LambdaLR(opt, lambda step: 0.9**step)  # LambdaLR then failed at its next step: "zip() argument 2 is shorter"
    with pytest.warns(UserWarning, match="pass scheduler= so the groups it adds follow it"):
        ft.Unfreezer(model, opt, "epoch:1", lr=LR)


def test_unfreezing_under_ddp_says_the_model_must_be_wrapped_again(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = TinyCNN()
        ft.freeze(model, "backbone")
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(ft.param_groups(ddp, LR))
        unfreezer = ft.Unfreezer(ddp, opt, "epoch:1", lr=LR)
        with pytest.warns(UserWarning, match="under DistributedDataParallel: .* wrap the model again"):
            assert unfreezer.step(0) == ["block3"]
    finally:
        dist.destroy_process_group()


def test_an_unfreezer_whose_bn_differs_from_the_frozen_layers_says_when_it_applies():
    # the frozen stages' statistics started moving at the first unfreeze, an event unrelated to the policy
    import warnings

    import torchvision

    import freezetune as ft

    m = torchvision.models.resnet18()
    ft.freeze(m, "backbone", bn="frozen")
    opt = torch.optim.SGD(ft.param_groups(m, 0.1), lr=0.1)
    with pytest.warns(UserWarning, match="from the first unfreeze on"):
        ft.Unfreezer(m, opt, "epoch:2", lr=0.1, bn="train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ft.Unfreezer(m, opt, "epoch:2", lr=0.1, bn="frozen")  # the same policy: nothing to say


def test_unfreezing_a_negative_count_warns_that_it_opens_all_but_the_last_stages():
    # fastai's freeze_to(-2) habit: unfreeze(m, -2) trained stem..layer3 and kept the head frozen, in silence
    import torchvision

    import freezetune as ft

    m = torchvision.models.resnet18()
    ft.freeze(m, "all")
    with pytest.warns(UserWarning, match=r"opens every stage but the last 2.*freeze_to\(model, -2\)"):
        ft.unfreeze(m, -2)
    m = torchvision.models.resnet18()
    ft.freeze(m, "backbone")
    opt = torch.optim.SGD(ft.param_groups(m, 0.1), lr=0.1)
    with pytest.warns(UserWarning, match="opens every stage but the last 2"):
        ft.Unfreezer(m, opt, {1: -2}, lr=0.1)


def test_a_bn_policy_given_to_the_unfreezer_alone_groups_the_affine_parameters_it_releases_and_resumes():
    # bn="affine" over layers frozen with "frozen" made every still-frozen BatchNorm's scale and shift trainable at the
    # first unfreeze, in no optimizer group: trainable, with gradients, never stepped
    def setup():
        torch.manual_seed(0)
        model = TinyCNN()
        ft.freeze(model, "backbone", bn="frozen")
        opt = torch.optim.AdamW(ft.param_groups(model, LR, decay=2.0, weight_decay=0.0))
        with pytest.warns(UserWarning, match="from the first unfreeze on"):
            return model, opt, ft.Unfreezer(model, opt, "epoch:1", lr=LR, decay=2.0, bn="affine", weight_decay=0.0)

    model, opt, unfreezer = setup()
    assert unfreezer.step(0) == ["block3"]
    assert_each_param_once(model, opt)
    assert model.stem[1].weight.requires_grad and not model.stem[0].weight.requires_grad
    assert {g["name"]: g["lr"] for g in opt.param_groups}["stem"] == LR / 2**4  # at its stage's LR
    assert unfreezer.step(1) == ["block2"]  # its norms had a group already: it grows
    assert_each_param_once(model, opt)
    state, opt_state = unfreezer.state_dict(), opt.state_dict()

    model2, opt2, fresh = setup()
    fresh.load_state_dict(state)  # replayed event by event: the same groups, in the same order
    assert group_names(opt2) == group_names(opt)
    opt2.load_state_dict(opt_state)
    assert_each_param_once(model2, opt2)


def test_a_nan_metric_is_never_the_plateaus_best():
    # a NaN first value stayed the best: every later comparison was False, a stall each epoch while the loss fell
    _, _, _, unfreezer = frozen_setup("plateau:patience=2,mode=min")
    opened = [unfreezer.step(epoch, value) for epoch, value in enumerate([float("nan"), 1.0, 0.9, 0.8, 0.7, 0.6])]
    assert opened == [[]] * 6 and unfreezer.best == 0.6
    assert unfreezer.step(6, float("nan")) == [] and unfreezer.step(7, float("nan")) == ["block3"]  # two without news


def test_a_schedule_that_opens_nothing_the_run_trains_is_noted():
    # --epochs 3 --unfreeze epoch:5, or a plan past the last epoch, or nothing frozen: the run trained without a word
    from freezetune.freezing.schedule import idle_schedule_note

    for schedule, epochs, said in [("epoch:5", 3, "opens nothing the 3-epoch run trains"), ("epoch:2", 3, None),
                                   ({4: "block3", 2: "block2"}, 2, "first opening comes after epoch 2"),
                                   ({1: "block3", 5: "block2"}, 2, None), ("plateau:patience=9", 3, None)]:  # fmt: skip
        _, _, _, unfreezer = frozen_setup(schedule)
        note = idle_schedule_note(unfreezer, epochs)
        assert (note is None) if said is None else (said in note), (schedule, note)
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    assert "nothing to open: every stage trains" in idle_schedule_note(ft.Unfreezer(model, opt, "epoch:1", lr=LR), 3)
    _, _, _, resumed = frozen_setup("epoch:1")  # a resumed run whose schedule opened every stage: no note
    for epoch in range(4):
        resumed.step(epoch)
    assert not resumed.frozen_stages() and idle_schedule_note(resumed, 6) is None
    # --early-stop 2 beside a plateau's patience of 3: the run stopped early, no stage ever opened, without a word
    _, _, _, plateau = frozen_setup("plateau:patience=3")
    assert "--early-stop 2 ends the run after 2" in idle_schedule_note(plateau, 12, early_stop=2)
    assert idle_schedule_note(plateau, 12, early_stop=3) is None  # at 3 the plateau opens first, and the count restarts


def test_a_plateau_min_delta_read_as_points_is_noted_for_either_fraction_but_not_for_a_loss():
    from freezetune.freezing.schedule import parse_schedule, plateau_units_note

    schedule = parse_schedule("plateau:patience=1,min_delta=0.5")
    assert "is in val_f1 units, a fraction: 0.5 is 50 points of macro-F1" in plateau_units_note(schedule, "val_f1")
    assert "0.5 is 50 points of accuracy" in plateau_units_note(schedule, "val_acc")
    assert plateau_units_note(schedule, "val_loss") is None


@pytest.mark.parametrize(
    ("schedule", "why"),
    [
        ("plateau:patience=0", "patience takes an integer >= 1, got '0'"),
        ("epoch:0", "N takes an integer >= 1, got '0'"),
        ("plateau:patience=2,mode=up", "mode takes 'max', 'min', got 'up'"),
        ("plateau:min_delta=-1", "min_delta takes a number >= 0, got '-1'"),
        ("plateau:patience=2,every=3", "'every=3' is none of patience=, min_delta=, mode="),
    ],
)
def test_a_schedule_of_the_right_form_with_a_bad_value_names_the_value(schedule, why):
    # each got the forms alone, which its form already matched: the user could not tell what was wrong
    from freezetune.errors import SpecError
    from freezetune.freezing.schedule import parse_schedule

    with pytest.raises(SpecError, match=f"^bad unfreeze schedule '{schedule}': {why}; the forms are: 'epoch:N'"):
        parse_schedule(schedule)
