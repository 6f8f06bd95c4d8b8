"""The optimizer and scheduler as the Unfreezer reads them: wrapped ones (Accelerate, Lightning), the weight decay of
the stages it opens, a scheduler built after it, and an optimizer over model.parameters() that decays biases."""

from __future__ import annotations

import torch

import freezetune as ft
from conftest import TinyCNN

LR = 0.1


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
