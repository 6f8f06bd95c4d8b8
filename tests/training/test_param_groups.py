"""Optimizer parameter groups: trainable-only, identity de-dup, per-stage LR rule, no-decay twins."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn

import freezetune as ft
from conftest import TinyCNN

RESNET = ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]


def lrs(groups: list[dict]) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in groups}


def grouped_ids(groups: list[dict]) -> list[int]:
    return [id(p) for g in groups for p in g["params"]]


def test_seed_example(resnet18):
    ft.freeze_to(resnet18, -3)
    groups = ft.param_groups(resnet18, 1e-3, stage_lrs={"layer4": 1e-4, "layer3": 5e-5}, weight_decay=0)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("layer3", 5e-5, 0.0),
        ("layer4", 1e-4, 0.0),
        ("fc", 1e-3, 0.0),
    ]
    expected = [p for name in ("layer3", "layer4", "fc") for p in resnet18.get_submodule(name).parameters()]
    assert grouped_ids(groups) == [id(p) for p in expected]


@pytest.mark.parametrize(
    ("make", "decay"),
    [(lambda g: torch.optim.AdamW(g), 0.01), (lambda g: torch.optim.SGD(g, lr=0.1, weight_decay=5e-4), 5e-4)],
    ids=["adamw-default", "sgd-asked"],
)
def test_without_weight_decay_the_optimizers_own_applies_and_biases_and_norms_are_spared(resnet18, make, decay):
    # the seed's call, in the README's own AdamW(ft.param_groups(...)): the optimizer's decay must not be overridden
    ft.freeze_to(resnet18, -2)
    optimizer = make(ft.param_groups(resnet18, 1e-3, stage_lrs={"layer4": 1e-4}))
    assert [(g["name"], g["weight_decay"]) for g in optimizer.param_groups] == [
        ("layer4", decay), ("layer4/no_decay", 0.0), ("fc", decay), ("fc/no_decay", 0.0)
    ]  # fmt: skip
    assert all(p.ndim <= 1 for g in optimizer.param_groups if g["name"].endswith("/no_decay") for p in g["params"])
    unfreezer = ft.Unfreezer(resnet18, optimizer, "epoch:1", lr=1e-3, stage_lrs={"layer4": 1e-4})
    unfreezer.step(0)  # layer3 opens with the decay the optimizer's groups have
    assert [(g["name"], g["weight_decay"]) for g in optimizer.param_groups][-2:] == [
        ("layer3", decay), ("layer3/no_decay", 0.0)
    ]  # fmt: skip


def test_only_trainable_params_each_exactly_once(resnet18):
    ft.freeze(resnet18, ["stem", "layer2"])
    groups = ft.param_groups(resnet18, 0.1, weight_decay=0.01)
    ids = grouped_ids(groups)
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in resnet18.parameters() if p.requires_grad}
    assert not {"stem", "layer2", "stem/no_decay", "layer2/no_decay"} & {g["name"] for g in groups}
    for g in groups:
        assert set(g) >= {"params", "name", "lr", "weight_decay"}


class TiedWithTwins(nn.Module):
    """Tied input/output embeddings, plus two distinct parameters with identical values."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.twin_a = nn.Parameter(torch.zeros(4, 4))
        self.twin_b = nn.Parameter(torch.zeros(4, 4))  # equal values, different tensors: both must be optimized
        self.out = nn.Linear(4, 10)
        self.out.weight = self.embed.weight


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_identity_dedup_with_tied_weights(weight_decay):
    model = TiedWithTwins()
    groups = ft.param_groups(model, 1e-3, weight_decay=weight_decay)
    ids = grouped_ids(groups)
    assert ids.count(id(model.embed.weight)) == 1
    assert id(model.twin_a) in ids and id(model.twin_b) in ids
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    torch.optim.AdamW(groups)  # torch itself rejects a parameter that appears twice


def test_decay_counts_every_stage_frozen_or_not(resnet18):
    ft.freeze_to(resnet18, -2)
    assert lrs(ft.param_groups(resnet18, 1e-2, decay=10, weight_decay=0)) == pytest.approx({"layer4": 1e-3, "fc": 1e-2})
    ft.unfreeze(resnet18, "all")
    got = lrs(ft.param_groups(resnet18, 1.0, decay=2, weight_decay=0))
    assert list(got) == RESNET
    assert got == pytest.approx({name: 1.0 / 2**depth for depth, name in enumerate(reversed(RESNET))})


def test_stage_lrs_override_decay(resnet18):
    got = lrs(ft.param_groups(resnet18, 1e-2, decay=10, stage_lrs={"layer1": 0.5, "fc": 0.25}))
    assert got["layer1"] == 0.5 and got["fc"] == 0.25
    assert got["layer4"] == pytest.approx(1e-3) and got["layer2"] == pytest.approx(1e-5)


def test_without_decay_every_stage_gets_lr(resnet18):
    assert set(lrs(ft.param_groups(resnet18, 3e-4)).values()) == {3e-4}


def test_no_decay_twins_hold_biases_and_norm_params(resnet18):
    ft.freeze_to(resnet18, -2)
    groups = ft.param_groups(resnet18, 1e-3, decay=10, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["layer4", "layer4/no_decay", "fc", "fc/no_decay"]
    bn_ids = {id(p) for m in resnet18.layer4.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in by_name["layer4/no_decay"]["params"]} == bn_ids
    assert [id(p) for p in by_name["fc/no_decay"]["params"]] == [id(resnet18.fc.bias)]
    assert [id(p) for p in by_name["fc"]["params"]] == [id(resnet18.fc.weight)]
    assert all(p.ndim >= 2 for p in by_name["layer4"]["params"])
    assert by_name["layer4"]["weight_decay"] == 0.05 and by_name["layer4/no_decay"]["weight_decay"] == 0.0
    assert by_name["layer4/no_decay"]["lr"] == by_name["layer4"]["lr"] == pytest.approx(1e-4)


def test_declared_no_weight_decay_names_go_to_the_twin():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)
    ft.freeze(model, "all")
    ft.unfreeze(model, "stem")  # patch_embed, cls_token, pos_embed
    groups = {g["name"]: g for g in ft.param_groups(model, 1e-3, weight_decay=0.05)}
    skip = {id(p) for p in groups["stem/no_decay"]["params"]}
    assert {id(model.cls_token), id(model.pos_embed), id(model.patch_embed.proj.bias)} <= skip
    assert [id(p) for p in groups["stem"]["params"]] == [id(model.patch_embed.proj.weight)]


def test_tokens_and_position_embeddings_a_model_does_not_declare_go_to_the_twin():
    # torchvision's ViT declares no no_weight_decay(): its class token and position embedding decayed as weights
    model = torchvision.models.VisionTransformer(32, 16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                                                 num_classes=3)  # fmt: skip
    groups = ft.param_groups(model, 1e-3, weight_decay=0.05)
    skip = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert {id(model.class_token), id(model.encoder.pos_embedding)} <= skip
    assert id(model.conv_proj.weight) in decayed and id(model.heads.head.weight) in decayed


def test_groups_drive_a_real_optimizer():
    model = TinyCNN()
    ft.freeze_to(model, 2)
    opt = torch.optim.AdamW(ft.param_groups(model, 1e-3, decay=2, weight_decay=0.1))
    assert [g["name"] for g in opt.param_groups] == [
        "block2",
        "block2/no_decay",
        "block3",
        "block3/no_decay",
        "head",
        "head/no_decay",
    ]
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)


def test_no_trainable_params_is_a_clear_error(resnet18):
    ft.freeze(resnet18, "all")  # allowed ...
    with pytest.raises(ft.FreezetuneError, match="no trainable parameters") as info:
        ft.param_groups(resnet18, 1e-3)  # ... but there is nothing to optimize
    assert "'layer4'" in str(info.value)


def test_a_stage_lrs_glob_sets_every_stage_it_matches_and_a_named_stage_keeps_its_own(resnet18):
    # a timm model's blocks.0..6 or a ViT's twelve layers, named one by one: the freeze spec took globs, stage_lrs not
    got = lrs(ft.param_groups(resnet18, 1e-3, stage_lrs="layer[2,3,4]=1e-4,layer4=5e-4", weight_decay=0))
    assert got == {"stem": 1e-3, "layer1": 1e-3, "layer2": 1e-4, "layer3": 1e-4, "layer4": 5e-4, "fc": 1e-3}
    with pytest.raises(ft.FreezetuneError, match=r"'layer5\*'.*stages are: 'stem'"):
        ft.param_groups(resnet18, 1e-3, stage_lrs={"layer5*": 1e-4})
    with pytest.raises(ft.FreezetuneError, match=re.escape("stage 'layer3' matches both 'layer[23]' and 'layer[34]'")):
        ft.param_groups(resnet18, 1e-3, stage_lrs={"layer[23]": 1e-4, "layer[34]": 1e-5})
    # a stage unfrozen later gets the glob's LR, as one named outright does
    ft.freeze(resnet18, "backbone")
    opt = torch.optim.AdamW(ft.param_groups(resnet18, 1e-3), lr=1e-3)
    unfreezer = ft.Unfreezer(resnet18, opt, "epoch:1", lr=1e-3, stage_lrs={"layer*": 1e-5})
    assert unfreezer.step(0) == ["layer4"] and lrs(opt.param_groups)["layer4"] == 1e-5


def test_bad_stage_lrs_and_decay(resnet18):
    with pytest.raises(ft.FreezetuneError, match="'layer9'") as info:
        ft.param_groups(resnet18, 1e-3, stage_lrs={"layer9": 1e-4})
    assert "'fc'" in str(info.value)
    with pytest.raises(ft.FreezetuneError, match="decay"):
        ft.param_groups(resnet18, 1e-3, decay=0)


def test_stage_lrs_as_text_is_read_as_the_cli_reads_it(resnet18):
    ft.freeze_to(resnet18, -2)
    groups = ft.param_groups(resnet18, 1e-3, stage_lrs="layer4=1e-4", weight_decay=0)  # not '-', '1', '4', '='...
    assert lrs(groups) == {"layer4": 1e-4, "fc": 1e-3}


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"lr": -1e-3}, "lr=-0.001"), ({"stage_lrs": {"block3": -1}}, "block3=-1"),
    ({"lr": float("inf")}, "lr=inf"), ({"stage_lrs": {"block3": float("nan")}}, "block3=nan"),  # NaN LRs trained
])  # fmt: skip
def test_a_negative_or_infinite_learning_rate_is_refused(kwargs, named):
    model = TinyCNN()
    ft.freeze(model, "backbone")
    ft.unfreeze(model, "block3")
    with pytest.raises(ft.FreezetuneError, match=f"learning rates must be finite numbers >= 0, got {named}"):
        ft.param_groups(model, **{"lr": 1e-3, **kwargs})


@pytest.mark.parametrize("decay", [True, 0, -2.0, float("nan"), float("inf"), "10", 0.75])
def test_a_decay_that_is_not_a_number_of_at_least_one_is_refused(decay):
    # decay=True ran as 1.0: every stage at lr, nothing decayed, without a word (lr=True was refused); timm's
    # layer_decay 0.75 given as decay gave the stem 42x the head's LR
    refused = (
        f"decay must be >= 1 and finite, got {re.escape(repr(decay))}: "
        r"a stage at depth i below the head trains at lr / decay\*\*i, unless stage_lrs names it .* decay 1/x"
    )
    with pytest.raises(ft.FreezetuneError, match=refused):
        ft.param_groups(TinyCNN(), 1e-3, decay=decay)


@pytest.mark.parametrize("weight_decay", [-0.5, float("nan"), float("inf"), True, "0.05"])
def test_a_negative_or_non_finite_weight_decay_is_refused_where_the_groups_are_made(weight_decay):
    # AdamW checks only its constructor's default: -0.5 in the groups pushed every weight away from zero
    model = TinyCNN()
    ft.freeze(model, "backbone")
    with pytest.raises(ft.FreezetuneError, match=r"weight_decay must be a finite number >= 0 \(or None"):
        ft.param_groups(model, 1e-3, weight_decay=weight_decay)
    optimizer = torch.optim.AdamW(ft.param_groups(model, 1e-3))
    with pytest.raises(ft.FreezetuneError, match="weight_decay must be a finite number >= 0"):
        ft.Unfreezer(model, optimizer, "epoch:1", lr=1e-3, weight_decay=weight_decay)
    assert ft.param_groups(model, 1e-3, weight_decay=0)[0]["weight_decay"] == 0


@pytest.mark.parametrize(
    ("asked", "note", "used"),
    [  # --freeze -3 --stage-lrs for a frozen stage, --decay with the head alone training: the LR went nowhere, silently
        (("--freeze", "-3", "--stage-lrs", "blocks.0=1e-4,blocks.4=1e-4"),
         "note: stage_lrs sets 'blocks.0', frozen in this run with nothing to unfreeze it",
         [("--freeze", "-3", "--stage-lrs", "blocks.0=1e-4", "--unfreeze", "epoch:1")]),
        (("--freeze", "backbone", "--decay", "10"),
         "note: decay 10.0 sets the LR of the stages below the head, and only the head trains",
         [("--freeze", "-3", "--decay", "10"), ("--freeze", "backbone", "--decay", "10", "--unfreeze", "epoch:1")]),
    ],
)  # fmt: skip
def test_a_run_says_when_a_learning_rate_it_was_given_is_never_used(tmp_path, capsys, asked, note, used):
    from _engine_fixtures import make_image_folder, run_cli, train_argv

    data = make_image_folder(tmp_path / "images", train=4, val=2, test=0)
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--epochs", "1", *asked))
    assert code == 0 and note in out, err
    for i, more in enumerate(used):  # a stage it unfreezes, or one below the head that trains: the LR is used
        code, out, err = run_cli(capsys, *train_argv(data, tmp_path / f"used{i}", "--epochs", "2", *more))
        assert code == 0 and note.partition(" sets")[0] not in out, err


def test_param_groups_without_an_lr_is_a_spec_error_and_a_numpy_decay_is_a_number():
    # lr=None reached float() (a TypeError) once the Lightning callback's checks were shared; np.float32 decay was
    # refused as not a number
    import numpy as np

    model = TinyCNN()
    with pytest.raises(ft.FreezetuneError, match="got lr=None"):
        ft.param_groups(model, None)
    lrs = {g["name"]: g["lr"] for g in ft.param_groups(model, 1e-3, decay=np.float32(2.0))}
    assert lrs == pytest.approx({name: lr for name, lr in ((g["name"], g["lr"]) for g in
                                 ft.param_groups(model, 1e-3, decay=2.0))})  # fmt: skip
    assert lrs["head"] == pytest.approx(1e-3) and lrs["block3"] == pytest.approx(5e-4)  # the decay applied


def test_a_numpy_or_tensor_learning_rate_is_a_number_as_torchs_optimizers_take_it():
    # np.float32(1e-3) was refused: "learning rates must be finite numbers >= 0, got lr=np.float32(0.001)"
    import numpy as np

    model = TinyCNN()
    for lr in (np.float32(1e-3), torch.tensor(1e-3)):
        lrs = {g["name"]: g["lr"] for g in ft.param_groups(model, lr, stage_lrs={"block3": np.float64(5e-4)})}
        assert lrs["head"] == pytest.approx(1e-3) and lrs["block3"] == pytest.approx(5e-4)
    with pytest.raises(ft.FreezetuneError, match="got lr=np.float32"):
        ft.param_groups(model, np.float32(-1e-3))


def test_a_norm_layers_parameters_of_any_shape_and_a_nested_backbones_declared_names_go_to_the_twin():
    # LayerNorm([C, H, W]) holds C x H x W weights and biases: decayed as weights; a timm backbone inside the user's
    # own model declared its exempt parameters (no_weight_decay()) to nobody: only the top-level model was asked
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.table = nn.Parameter(torch.zeros(3, 4))

        def forward(self, x):
            return self.proj(x) + self.table.sum()

        def no_weight_decay(self):
            return {"table"}

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.LayerNorm([4, 6, 6]), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), Scaled(), nn.Linear(4, 3))  # fmt: skip
    groups = ft.param_groups(model, 1e-3, weight_decay=0.05)
    skip = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert {id(model[1].weight), id(model[1].bias), id(model[4].table)} <= skip
    assert {id(model[0].weight), id(model[4].proj.weight), id(model[5].weight)} <= decayed
