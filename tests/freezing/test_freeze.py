"""Freeze specs, freeze_to, the BatchNorm policies, a real optimizer step on a frozen model, deepcopy and summary."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import freezetune as ft
from conftest import TinyCNN, bn_layers, clone_params, make_batch
from freezetune.freezing.bn_policy import policies

RESNET = ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]


def stage_sizes(model: nn.Module) -> dict[str, int]:
    return {s.name: s.num_params for s in ft.stages(model)}


def trainable_stages(model: nn.Module) -> list[str]:
    """Stages whose parameters are all trainable (a frozen stage under bn="frozen" has none)."""
    return [s.name for s in ft.stages(model) if all(p.requires_grad for p in s.parameters())]


def expect_trainable(model: nn.Module, names: list[str]) -> None:
    sizes = stage_sizes(model)
    assert trainable_stages(model) == names
    assert ft.count_parameters(model) == (sum(sizes[n] for n in names), sum(sizes.values()))


# --- specs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "trainable"),
    [
        ("backbone", ["fc"]),
        ("all", []),
        ("none", RESNET),
        (2, ["layer2", "layer3", "layer4", "fc"]),
        (-2, ["layer4", "fc"]),
        (0, RESNET),
        ("layer3", ["stem", "layer1", "layer2", "layer4", "fc"]),
        ("layer[1-3]*", ["stem", "layer4", "fc"]),
        (["stem", "layer1", "fc"], ["layer2", "layer3", "layer4"]),
        (["stem", 3], ["layer3", "layer4", "fc"]),
    ],
)
def test_freeze_spec_forms(resnet18, spec, trainable):
    ft.freeze(resnet18, spec)
    expect_trainable(resnet18, trainable)


def test_freeze_glob_over_qualified_module_names(resnet18):
    ft.freeze(resnet18, "layer4.*.conv2")
    frozen = [n for n, p in resnet18.named_parameters() if not p.requires_grad]
    assert frozen == ["layer4.0.conv2.weight", "layer4.1.conv2.weight"]
    assert ft.count_parameters(resnet18)[0] == ft.count_parameters(resnet18)[1] - 2 * 512 * 512 * 9


def test_freeze_everything_is_allowed(resnet18):
    ft.freeze(resnet18, "all")
    assert ft.count_parameters(resnet18)[0] == 0


@pytest.mark.parametrize("spec", ["layer5", "block*", ["stem", "nope"]])
def test_unknown_spec_lists_stage_names(resnet18, spec):
    with pytest.raises(ft.FreezetuneError) as info:
        ft.freeze(resnet18, spec)
    message = str(info.value)
    assert "matches no stage" in message
    for name in RESNET:
        assert repr(name) in message
    assert all(p.requires_grad for p in resnet18.parameters()), "a failed freeze must not half-apply"


def test_a_short_name_is_hinted_at_its_full_name_only_where_that_module_has_parameters(resnet18):
    # a MiniLM's --freeze pooler was told "did you mean 'bert.pooler'?" (a parameterless TokenPooler), which was
    # then refused as matching no stage in turn
    with pytest.raises(ft.FreezetuneError, match=r"did you mean 'layer1\.0\.conv1'\?"):
        ft.freeze(resnet18, "0.conv1")
    with pytest.raises(ft.FreezetuneError) as info:
        ft.freeze(resnet18, "relu")  # layer1.0.relu is there, with nothing to freeze
    assert "matches no stage" in str(info.value) and "did you mean" not in str(info.value)


def test_unknown_spec_in_unfreeze_and_bad_types(resnet18):
    with pytest.raises(ft.FreezetuneError, match="layer9"):
        ft.unfreeze(resnet18, "layer9")
    with pytest.raises(ft.FreezetuneError, match="float"):
        ft.freeze(resnet18, 1.5)
    with pytest.raises(ft.FreezetuneError, match="int"):
        ft.freeze_to(resnet18, "2")


def test_public_unfreeze_is_the_function():
    # the Unfreezer's module (freezetune.freezing.unfreezing) must not shadow the public ``ft.unfreeze`` function.
    from freezetune.freezing.freeze import unfreeze

    assert ft.unfreeze is unfreeze


def test_unfreeze_spec(resnet18):
    ft.freeze(resnet18, "all")
    ft.unfreeze(resnet18, "layer4")
    expect_trainable(resnet18, ["layer4"])
    ft.unfreeze(resnet18, ["fc", "layer[23]"])
    expect_trainable(resnet18, ["layer2", "layer3", "layer4", "fc"])


@pytest.mark.parametrize(
    ("n", "trainable"),
    [(2, ["layer2", "layer3", "layer4", "fc"]), (-3, ["layer3", "layer4", "fc"]), (0, RESNET), (6, []), (-1, ["fc"])],
)
def test_freeze_to(resnet18, n, trainable):
    ft.freeze(resnet18, "all")  # freeze_to also re-opens stages[n:]
    ft.freeze_to(resnet18, n)
    expect_trainable(resnet18, trainable)


# --- BatchNorm policies -------------------------------------------------------------------------------------


def train_forward(model: nn.Module, seed: int = 0) -> None:
    model.train()
    with torch.no_grad():
        model(make_batch(seed, size=32)[0])


def bn_stats(module: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for bn in bn_layers(module) for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("bn", "stats_move", "affine_trainable"), [("frozen", False, False), ("affine", True, True), ("train", True, False)]
)
def test_bn_policy(resnet18, bn, stats_move, affine_trainable):
    ft.freeze_to(resnet18, -2, bn=bn)  # stem..layer3 frozen; layer4 and fc trainable
    frozen_part, open_part = resnet18.layer2, resnet18.layer4
    before_frozen, before_open = bn_stats(frozen_part), bn_stats(open_part)
    train_forward(resnet18)
    assert same(bn_stats(frozen_part), before_frozen) is not stats_move
    assert not same(bn_stats(open_part), before_open), "BN of trainable stages must always update"
    for bn_layer in bn_layers(frozen_part):
        assert bn_layer.weight.requires_grad is affine_trainable
        assert bn_layer.bias.requires_grad is affine_trainable
        assert bn_layer.training is stats_move  # "frozen" BN stays in eval under model.train()
    assert all(p.requires_grad for p in open_part.parameters())
    assert all(not p.requires_grad for n, p in resnet18.layer2.named_parameters() if "conv" in n)


def test_frozen_bn_uses_running_stats_in_train_mode(tiny_cnn):
    ft.freeze(tiny_cnn, "backbone")
    x = make_batch(1)[0]
    tiny_cnn.eval()
    with torch.no_grad():
        expected = tiny_cnn(x)
    tiny_cnn.train()
    with torch.no_grad():
        assert torch.equal(tiny_cnn(x), expected)


def test_unfreezing_makes_bn_ordinary_again(resnet18):
    ft.freeze(resnet18, "backbone")
    ft.unfreeze(resnet18, "layer4")
    before_l4, before_l1 = bn_stats(resnet18.layer4), bn_stats(resnet18.layer1)
    train_forward(resnet18)
    assert not same(bn_stats(resnet18.layer4), before_l4)
    assert same(bn_stats(resnet18.layer1), before_l1)
    assert all(bn.training and bn.weight.requires_grad for bn in bn_layers(resnet18.layer4))
    resnet18.eval()
    assert not any(bn.training for bn in bn_layers(resnet18.layer4))


def test_a_layer_unfrozen_mid_epoch_trains_at_once_in_a_model_in_train_mode(resnet18):
    # the Unfreezer opens a stage between epochs, the model in train mode: a released BatchNorm layer stayed in eval
    # (running statistics, frozen) until the loop's next model.train(), which a user's own loop may call only once
    ft.freeze(resnet18, "backbone")
    train_forward(resnet18)  # model.train() and a batch: the frozen layers' hook puts them in eval
    assert not any(bn.training for bn in bn_layers(resnet18.layer4))
    ft.unfreeze(resnet18, "layer4")
    assert all(bn.training for bn in bn_layers(resnet18.layer4))
    assert not any(bn.training for bn in bn_layers(resnet18.layer1))
    ft.unfreeze(resnet18.eval(), "layer3")  # a model in eval mode: the released layers stay in eval too
    assert not any(bn.training for bn in bn_layers(resnet18.layer3))


@pytest.mark.parametrize(
    "switch",
    [
        lambda m: ft.freeze(m, "backbone", bn="train"),  # a second freeze switches the frozen part's policy
        lambda m: ft.unfreeze(m, "layer4", bn="train"),  # unfreeze re-applies its policy to the parts still frozen
    ],
    ids=["freeze-again", "unfreeze"],
)
def test_a_later_call_switches_the_policy_of_the_frozen_part(resnet18, switch):
    ft.freeze(resnet18, "backbone", bn="frozen")
    switch(resnet18)
    before = bn_stats(resnet18.layer1)
    train_forward(resnet18)
    assert not same(bn_stats(resnet18.layer1), before)
    assert not resnet18.layer1[0].bn1.weight.requires_grad


@pytest.mark.parametrize("bn", ["affine", "train"])
def test_unfreezing_a_stage_keeps_the_policy_the_rest_was_frozen_with(resnet18, bn):
    ft.freeze(resnet18, "backbone", bn=bn)
    ft.unfreeze(resnet18, "layer4")  # no bn given: layer1..3 go on training as the user chose
    before = bn_stats(resnet18.layer1)
    train_forward(resnet18)
    assert not same(bn_stats(resnet18.layer1), before)
    assert all(x.weight.requires_grad is (bn == "affine") for x in bn_layers(resnet18.layer1))
    assert [row for row in ft.summary(resnet18).splitlines() if row.startswith("layer1")][0].endswith(bn)


def test_affine_only_trains_scale_and_shift_on_the_pretrained_statistics(tiny_cnn):
    # the brief's "affine-only trainable": "affine" moved the statistics too, "frozen" froze the scale and shift
    ft.freeze(tiny_cnn, "backbone", bn="affine-only")
    bns = bn_layers(tiny_cnn)
    assert bns and all(b.weight.requires_grad and b.bias.requires_grad for b in bns)
    grouped = {id(p) for g in ft.param_groups(tiny_cnn, 0.1) for p in g["params"]}
    assert all(id(b.weight) in grouped for b in bns)
    opt = torch.optim.SGD(ft.param_groups(tiny_cnn, 0.1), lr=0.1)
    before, stats = clone_params(tiny_cnn), bn_stats(tiny_cnn)
    tiny_cnn.train()
    x, y = make_batch(0)
    nn.functional.cross_entropy(tiny_cnn(x), y).backward()
    opt.step()
    after = clone_params(tiny_cnn)
    assert same(bn_stats(tiny_cnn), stats) and not any(b.training for b in bns)  # eval kept after model.train()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    bn_names = {f"{n}.{k}" for n, m in tiny_cnn.named_modules() if m in bns for k in ("weight", "bias")}
    assert bn_names <= moved and all(n in bn_names or n.startswith("head.") for n in moved)
    assert policies(tiny_cnn) == {"affine-only"}
    assert [r for r in ft.summary(tiny_cnn).splitlines() if r.startswith("block1")][0].endswith("affine-only")


@pytest.mark.parametrize("call", [ft.freeze, ft.unfreeze, lambda m, s, bn: ft.freeze_to(m, 2, bn=bn)])
def test_unknown_bn_policy_names_them_all(resnet18, call):
    with pytest.raises(ft.FreezetuneError) as info:
        call(resnet18, "backbone", bn="eval")
    for word in ("'eval'", "'frozen'", "'affine'", "'train'", "'affine-only'"):
        assert word in str(info.value)


def test_non_affine_bn_follows_its_parent():
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)))
    model.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    model.add_module("head", nn.Linear(4, 2))
    ft.freeze(model, "backbone")
    before = bn_stats(model.body)
    train_forward(model)
    assert same(bn_stats(model.body), before)


def _instance_norm_model(stats: bool = True) -> nn.Module:
    model = nn.Sequential()
    model.add_module(
        "body", nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=stats))
    )
    model.add_module("top", nn.Sequential(nn.Conv2d(4, 4, 1), nn.InstanceNorm2d(4, track_running_stats=stats)))
    model.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    model.add_module("head", nn.Linear(4, 2))
    return model


@pytest.mark.parametrize(("bn", "stats_move"), [("frozen", False), ("train", True)])
def test_a_frozen_instance_norm_with_running_statistics_takes_the_bn_policy(bn, stats_move):
    # InstanceNorm(track_running_stats=True) updates running statistics in train mode as BatchNorm does: a frozen
    # one drifted under model.train(), unsaid, and the frozen model's eval outputs with it
    model = _instance_norm_model()
    ft.freeze(model, "backbone", bn=bn)
    norm = model.body[1]
    before = norm.running_mean.clone()
    train_forward(model)
    assert torch.equal(norm.running_mean, before) is not stats_move
    assert norm.training is stats_move


@pytest.mark.parametrize("bn", ["affine", "train"])
@pytest.mark.parametrize("norm", [nn.InstanceNorm2d, nn.BatchNorm2d])
def test_a_norm_without_running_statistics_freezes_as_any_layer(bn, norm):
    # it has no statistics to hold: under bn="affine" its frozen weights trained, and under bn="train" the cache was
    # refused as "BatchNorm ... updates its statistics in training"
    from freezetune.cache.model_split import split_model

    model = _instance_norm_model(stats=False)
    model.body[1] = norm(4, affine=True, track_running_stats=False)
    ft.freeze(model, "body", bn=bn)
    assert not any(p.requires_grad for p in model.body.parameters())
    split, why = split_model(model)
    assert split is not None and split.boundary == "top", why


def test_the_cached_suffix_keeps_an_instance_norm_following_train_and_eval():
    # traced, InstanceNorm's "use the batch's statistics" (self.training) was baked in at trace time
    from freezetune.cache.model_split import split_model

    model = _instance_norm_model()
    ft.freeze(model, "body")
    split, _ = split_model(model)
    x = make_batch(0, size=32)[0]
    with torch.no_grad():
        feats = split.prefix(x)
        model.train()
        before = model.top[1].running_mean.clone()
        split.suffix_train(feats)
        assert not torch.equal(model.top[1].running_mean, before)  # it trained: its statistics moved
        model.eval()
        assert torch.allclose(split.suffix_eval(feats), model(x), atol=1e-6)


# --- a real optimizer step ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make_opt", ["sgd", "adamw"])
def test_optimizer_step_leaves_frozen_weights_bit_identical(tiny_cnn, make_opt):
    ft.freeze(tiny_cnn, "backbone")
    if make_opt == "sgd":
        opt = torch.optim.SGD(ft.param_groups(tiny_cnn, 0.1), lr=0.1, momentum=0.9)
    else:  # decoupled weight decay would move any frozen parameter that sat in a group, even without a gradient
        groups = ft.param_groups(tiny_cnn, 0.1, weight_decay=0.5)
        grouped = {id(p) for g in groups for p in g["params"]}
        assert grouped == {id(p) for p in tiny_cnn.head.parameters()}
        opt = torch.optim.AdamW(groups, lr=0.1)
    before, stats = clone_params(tiny_cnn), bn_stats(tiny_cnn)
    tiny_cnn.train()
    for step in range(2):
        x, y = make_batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(tiny_cnn(x), y).backward()
        opt.step()
    after = clone_params(tiny_cnn)
    for name in before:
        if name.startswith("head."):
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"frozen {name} moved"
    assert same(bn_stats(tiny_cnn), stats)


# --- deepcopy -----------------------------------------------------------------------------------------------


def test_deepcopy_keeps_frozen_bn_and_is_independent(tiny_cnn):
    ft.freeze(tiny_cnn, "backbone", bn="frozen")
    twin = copy.deepcopy(tiny_cnn)
    before = bn_stats(twin)
    train_forward(twin)
    assert same(bn_stats(twin), before), "the copy's frozen BN updated its statistics"
    assert not any(bn.training for bn in bn_layers(twin))
    assert ft.summary(twin) == ft.summary(tiny_cnn)

    ft.unfreeze(twin, "all")
    train_forward(twin)
    assert not same(bn_stats(twin), before), "the unfrozen copy's BN should update"
    original = bn_stats(tiny_cnn)
    train_forward(tiny_cnn)
    assert same(bn_stats(tiny_cnn), original), "unfreezing the copy released the original's BN"
    assert trainable_stages(tiny_cnn) == ["head"]


# --- counting and summary -----------------------------------------------------------------------------------


def test_count_parameters_counts_shared_once():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight
    assert ft.count_parameters(model) == (9 + 3 + 3, 9 + 3 + 3)
    model[0].bias.requires_grad_(False)
    assert ft.count_parameters(model) == (12, 15)


def test_summary_has_one_row_per_stage(resnet18):
    ft.freeze_to(resnet18, -2, bn="affine")
    lines = ft.summary(resnet18).splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    sizes = stage_sizes(resnet18)
    assert list(rows)[:-1] == RESNET and list(rows)[-1] == "total"
    trainable = {s.name: s.num_trainable for s in ft.stages(resnet18)}
    for name in RESNET:
        assert rows[name][1] == f"{sizes[name]:,}"
        assert rows[name][2] == f"{trainable[name]:,}"
    assert rows["layer1"][3] == "affine" and rows["layer4"][3] == "trainable" and rows["fc"][3] == "-"
    assert int(rows["layer1"][2].replace(",", "")) > 0  # BN affine params train under "affine"
    assert rows["total"][2] == f"{ft.count_parameters(resnet18)[0]:,}"


def test_summary_generic_model_shows_frozen_bn():
    model = TinyCNN()
    ft.freeze(model, "backbone")
    text = ft.summary(model)
    for name in TinyCNN.STAGES:
        assert name in text
    assert text.splitlines()[1].split()[2:] == ["0", "frozen"]


@pytest.mark.parametrize(
    "call",
    [lambda m: ft.freeze(m, 7), lambda m: ft.freeze(m, -7), lambda m: ft.freeze_to(m, 99), lambda m: ft.unfreeze(m, 7)],
    ids=["freeze-7", "freeze--7", "freeze_to-99", "unfreeze-7"],
)
def test_an_int_spec_past_the_stage_count_names_the_count(resnet18, call):
    before = [p.requires_grad for p in resnet18.parameters()]
    with pytest.raises(
        ft.FreezetuneError, match=r"out of range: the model has 6 stages \('stem', 'layer1', .*'fc'\).* from -6 to 6"
    ):
        call(resnet18)  # it froze everything, head included (7, 99) or nothing (-7)
    assert [p.requires_grad for p in resnet18.parameters()] == before
    ft.freeze(resnet18, 6)  # the edges are valid: all six stages
    assert ft.count_parameters(resnet18)[0] == 0
    ft.freeze_to(resnet18, -6)
    assert ft.count_parameters(resnet18)[0] == ft.count_parameters(resnet18)[1]


@pytest.mark.parametrize("wrap", [nn.DataParallel, torch.compile, lambda m: torch.compile(nn.DataParallel(m))])
def test_a_wrapped_model_freezes_and_groups_as_the_model_itself(wrap):
    # a wrapper was one stage "module" (or "_orig_mod") beside the head: freeze(wrapped, -2) froze nothing and
    # freeze(wrapped, "layer4") said there was no such stage
    import torchvision

    model = torchvision.models.resnet18()
    wrapped = wrap(model)
    assert [s.name for s in ft.stages(wrapped)] == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    ft.freeze(wrapped, -2)
    assert [s.name for s in ft.stages(model) if s.num_trainable] == ["layer4", "fc"]
    ft.freeze(wrapped, "layer4")
    assert [g["name"] for g in ft.param_groups(wrapped, 1e-3)] == ["fc", "fc/no_decay"]
    assert ft.summary(wrapped) == ft.summary(model) and ft.head_name(wrapped) == "fc"
    opt = torch.optim.AdamW(ft.param_groups(wrapped, 1e-3))
    ft.Unfreezer(wrapped, opt, "epoch:1", lr=1e-3).step(0)
    assert [g["name"] for g in opt.param_groups] == ["fc", "fc/no_decay", "layer4", "layer4/no_decay"]
    assert ft.replace_head(wrapped, 3) is wrapped and model.fc.out_features == 3


def test_a_run_says_when_its_bn_policy_changes_nothing(tmp_path, capsys):
    # --bn affine on a model of LayerNorms (a ViT) did nothing, and nothing said so
    from _engine_fixtures import make_image_folder, run_cli, train_argv

    data = make_image_folder(tmp_path / "images", train=4, val=2, test=0)
    for model, noted in (("timm:test_vit", True), ("timm:test_efficientnet", False)):
        code, out, err = run_cli(capsys, *train_argv(data, tmp_path / model.split(":")[1], "--epochs", "1", "--freeze",
                                                     "-2", "--bn", "affine", "--model", model))  # fmt: skip
        assert code == 0, err
        assert ("note: --bn affine changes nothing: the model has no BatchNorm layers" in out) == noted


def test_a_bn_policy_no_batchnorm_layer_is_frozen_for_is_said_to_change_nothing():
    # --recipe bitfit --bn affine-only was taken, config.yaml said bn: affine-only, and every statistic moved
    import torchvision

    from freezetune.freezing.bn_policy import idle_bn_policy

    for spec, noted in (("none", True), ("bitfit", True), ("backbone", False)):
        model = torchvision.models.resnet18()
        ft.freeze(model, spec, bn="affine-only")
        note = idle_bn_policy(model, "affine-only")
        assert (note is not None and "no BatchNorm layer is frozen in this run" in note) == noted, spec


def test_held_batchnorm_statistics_stay_held_in_the_layers_an_unfreeze_releases():
    # a run re-held them each epoch; an Unfreezer in a user's loop released layer4's to batch statistics
    import torchvision

    model = torchvision.models.resnet18()
    ft.freeze(model, "backbone")
    ft.hold_bn_statistics(model)
    ft.unfreeze(model, "layer4")
    model.train()
    before = model.layer4[0].bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(model.layer4[0].bn1.running_mean, before) and model.layer4[0].bn1.weight.requires_grad
    assert "trainable, eval stats" in ft.summary(model)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_frozen_model_can_be_scripted_for_inference():
    # the frozen BatchNorm's pre-hook had an annotation TorchScript refused, and a body it cannot compile
    import torchvision

    model = torchvision.models.resnet18(num_classes=3)
    ft.freeze(model, "backbone")
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(torch.jit.script(model)(x), model(x))


def test_unfreezing_parameters_of_a_frozen_batchnorm_by_name_trains_them_and_keeps_its_statistics():
    # unfreeze(m, "*.bias") left every frozen BatchNorm's bias frozen, without a word: the policy set it back
    import torchvision

    model = torchvision.models.resnet18(num_classes=3)
    ft.freeze(model, "backbone")
    ft.unfreeze(model, "*.bias")
    bn = model.layer1[0].bn1
    assert bn.bias.requires_grad and not bn.weight.requires_grad
    before = bn.running_mean.clone()
    model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert not bn.training and torch.equal(bn.running_mean, before) and bn.bias.grad is not None
    assert [r for r in ft.summary(model).splitlines() if r.startswith("layer1")][0].endswith("frozen, bias trains")
    ft.unfreeze(model, "layer4")  # the policies applied again: the biases stay open
    assert bn.bias.requires_grad and model.layer4[0].bn1.weight.requires_grad
    ft.freeze(model, "*.bias")  # and named again, they close
    ft.unfreeze(model, "layer4")
    assert not bn.bias.requires_grad and not bn.weight.requires_grad


def test_unfreeze_finds_the_eval_hooks_of_a_freeze_made_before_the_module_was_reloaded(monkeypatch):
    # a notebook's %autoreload: hooks were matched by identity with the new _keep_eval, so unfreeze left the layer
    # in eval with frozen statistics while summary said it trained
    import importlib

    import torchvision

    policy_module = importlib.import_module("freezetune.freezing.bn_policy")
    model = torchvision.models.resnet18(num_classes=3)
    ft.freeze(model, "backbone")

    def _keep_eval(module, args):  # what the reloaded module defines: equal by name, another function
        pass

    _keep_eval.__module__ = policy_module.__name__
    monkeypatch.setattr(policy_module, "_keep_eval", _keep_eval)
    ft.unfreeze(model, "layer4")
    bn = model.layer4[0].bn1
    assert not bn._forward_pre_hooks and model.train() and bn.training


@pytest.mark.parametrize("old_module", ["freezetune.freeze", "freezetune.bn_policy"])
def test_a_model_pickled_whole_by_an_earlier_freezetune_loads_and_unfreezes(monkeypatch, old_module):
    # its frozen BatchNorm layers' hook is pickled by name: freezetune.freeze._keep_eval before the BatchNorm policy
    # had a module of its own, freezetune.bn_policy._keep_eval before the subpackages; without the name there,
    # torch.load(model) failed
    import pickle

    import torchvision

    from freezetune.freezing import bn_policy

    model = torchvision.models.resnet18(num_classes=3)
    ft.freeze(model, "backbone")
    monkeypatch.setattr(bn_policy._keep_eval, "__module__", old_module)  # how the earlier one named it
    data = pickle.dumps(model)
    monkeypatch.undo()
    assert old_module.encode() in data
    loaded = pickle.loads(data)
    ft.unfreeze(loaded, "layer1")
    bn = loaded.layer1[0].bn1
    assert loaded.train() and bn.training and not bn._forward_pre_hooks and bn.weight.requires_grad


def test_a_batchnorm_without_parameters_beside_the_head_is_frozen_with_the_layer_before_it():
    # judged by its parent's parameters, the model's, it held the head's, which train: its statistics moved
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
            self.norm = nn.BatchNorm1d(8, affine=False)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.norm(self.body(x)))

    model = Model()
    ft.freeze(model, "backbone")
    model.train()
    before = model.norm.running_mean.clone()
    model(torch.randn(8, 4))
    assert torch.equal(model.norm.running_mean, before)
    ft.unfreeze(model)
    model.train()
    model(torch.randn(8, 4))
    assert not torch.equal(model.norm.running_mean, before)


def test_a_batchnorm_without_parameters_in_a_frozen_stage_of_a_sequential_backbone_is_frozen_with_its_layer():
    # judged by its parent's parameters, the whole Sequential's, which hold the last stage's too: it kept training
    # mode and moved its statistics in frozen stage features.0, while the affine one of the stage that trains did not
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                                          nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                                          nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
            self.classifier = nn.Linear(16, 3)

        def forward(self, x):
            return self.classifier(self.features(x))

    model = Net()
    ft.freeze_to(model, -2)  # the last conv stage and the head train
    first, second, last = model.features[1], model.features[4], model.features[7]
    before = [bn.running_mean.clone() for bn in (first, second, last)]
    model.train()
    model(torch.randn(4, 3, 16, 16))
    assert not first.training and not second.training and last.training
    assert torch.equal(first.running_mean, before[0]) and torch.equal(second.running_mean, before[1])
    assert not torch.equal(last.running_mean, before[2])
    ft.unfreeze(model)  # released with the layers before them
    model.train()
    model(torch.randn(4, 3, 16, 16))
    assert first.training and not torch.equal(first.running_mean, before[0])


def test_an_input_batchnorm_without_parameters_first_in_the_model_is_frozen_with_the_layer_that_reads_it():
    # an audio model's BatchNorm over mel bins, first at the top level: no layer before it, its parent the model,
    # so it was judged by nothing and kept moving its statistics under freeze("all")
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn0 = nn.BatchNorm2d(3, affine=False)
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )  # fmt: skip
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.features(self.bn0(x)))

    for spec, frozen in (("all", True), (1, True), ("backbone", True), ("none", False)):
        model = Net()
        ft.freeze(model, spec)
        model.train()
        model(torch.randn(4, 3, 16, 16) + 5)
        assert torch.equal(model.bn0.running_mean, torch.zeros(3)) == frozen, spec
    model = Net()
    ft.freeze(model, "features.2")  # a later layer frozen: the first conv, which reads bn0, trains, and so does bn0
    model.train()
    model(torch.randn(4, 3, 16, 16) + 5)
    assert not torch.equal(model.bn0.running_mean, torch.zeros(3))


def test_frozen_batchnorm_statistics_survive_swa_update_bn_and_come_back_resettable_when_released(resnet18):
    # torch's update_bn resets every BatchNorm's statistics and recomputes them in train mode: the hook kept a frozen
    # layer in eval, so its pretrained statistics became mean 0, variance 1 in the averaged model
    from torch.optim.swa_utils import AveragedModel, update_bn

    with torch.no_grad():
        resnet18.bn1.running_mean.fill_(0.5), resnet18.bn1.running_var.fill_(2.0)
        resnet18.layer4[1].bn2.running_mean.fill_(0.5)
    ft.replace_head(resnet18, 3)
    ft.freeze_to(resnet18, -2)  # layer4 and the head train
    averaged = AveragedModel(resnet18)
    update_bn([torch.randn(4, 3, 32, 32) for _ in range(2)], averaged)
    frozen, trained = averaged.module.bn1, averaged.module.layer4[1].bn2
    assert torch.all(frozen.running_mean == 0.5) and torch.all(frozen.running_var == 2.0)
    assert not torch.all(trained.running_mean == 0.5)  # the layers that train: recomputed, as update_bn means
    ft.unfreeze(resnet18)
    resnet18.bn1.reset_running_stats()  # an ordinary layer again
    assert torch.all(resnet18.bn1.running_var == 1.0)


def test_bitfit_or_none_after_an_earlier_freeze_warns_that_what_it_froze_stays_frozen(resnet18):
    # freeze(m, "bitfit") after "backbone" trained the head alone (1,539 parameters of a 3-class head, not bitfit's
    # 11,139), and "none" changed nothing, both in silence
    ft.replace_head(resnet18, 3)
    ft.freeze(resnet18, "backbone")
    with pytest.warns(UserWarning, match=r"freeze 'bitfit' adds to what is frozen: [\d,]+ parameters frozen earlier"):
        ft.freeze(resnet18, "bitfit")
    with pytest.warns(UserWarning, match="freeze 'none' adds to what is frozen.*unfreeze\\(model\\) first"):
        ft.freeze(resnet18, "none")
    ft.unfreeze(resnet18)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trainable model: nothing to say
        ft.freeze(resnet18, "bitfit")
        ft.freeze(resnet18, "backbone")  # adding to bitfit is what the call says
    assert ft.count_parameters(resnet18)[0] == 1539


def test_counting_a_model_with_lazy_layers_before_its_first_forward_names_them():
    model = nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(3))
    for count in (ft.summary, ft.count_parameters):
        with pytest.raises(ft.FreezetuneError, match=r"lazy layers have no size yet \('1.weight', '1.bias'\): run one"):
            count(model)
    model(torch.randn(2, 4))
    assert ft.count_parameters(model) == (35, 35)


def test_summary_shows_a_small_trainable_share_as_more_than_none(resnet18):
    # a linear probe of ResNet-18 trains 0.014 %: one decimal printed "(0.0% trainable)", as if nothing trained
    ft.replace_head(resnet18, 3)
    ft.freeze(resnet18, "backbone")
    assert ft.summary(resnet18).splitlines()[-1].endswith("(0.014% trainable)")
    ft.freeze(resnet18, "all")
    assert ft.summary(resnet18).splitlines()[-1].endswith("(0.0% trainable)")


def test_a_module_glob_short_of_its_full_name_is_refused_with_the_full_one():
    # a GPT-2's stages are named 'h.0', 'h.1'; 'h.*.attn' matched nothing and the message named only the stages
    model = nn.Module()
    model.transformer = nn.Module()
    model.transformer.h = nn.ModuleList(nn.Sequential() for _ in range(2))
    for block in model.transformer.h:
        block.attn = nn.Linear(4, 4)
    model.score = nn.Linear(4, 2)
    with pytest.raises(ft.FreezetuneError, match=r"did you mean 'transformer\.h\.\*\.attn'\?"):
        ft.freeze(model, "h.*.attn")
    ft.freeze(model, "transformer.h.*.attn")
    with pytest.raises(ft.FreezetuneError) as err:
        ft.freeze(model, "layer9")
    assert "did you mean" not in str(err.value)
