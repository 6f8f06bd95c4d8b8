"""Splitting a model at its first trainable stage: suffix(prefix(x)) must be the model, in train and eval mode."""

import pytest
import timm
import torch
import torchvision
from torch import nn

import freezetune as ft
from freezetune.cache.model_split import split_model


def _same_function(model: nn.Module, split, size: int = 64) -> None:
    x = torch.randn(4, 3, size, size)
    for training in (True, False):
        model.train(training)
        suffix = split.suffix_train if training else split.suffix_eval
        with torch.no_grad():
            torch.manual_seed(0)
            want = model(x)
            torch.manual_seed(0)
            got = suffix(split.prefix(x))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_resnet_splits_at_first_trainable_stage():
    model = torchvision.models.resnet18(num_classes=5)
    ft.freeze_to(model, 4)
    split, why = split_model(model)
    assert split is not None and split.boundary == "layer4" and split.how == "fx", why
    _same_function(model, split)


def test_prefix_output_shape_is_the_boundary_input():
    model = torchvision.models.resnet18(num_classes=5)
    ft.freeze_to(model, 3)
    split, _ = split_model(model)
    with torch.no_grad():
        feats = split.prefix(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 128, 8, 8)  # layer2's output feeds layer3


def test_timm_head_only_with_dropout_in_head_matches_in_training():
    model = timm.create_model("test_efficientnet", num_classes=4, drop_rate=0.3)
    ft.freeze(model, "backbone")
    split, why = split_model(model)
    assert split is not None, why
    _same_function(model, split)


def test_suffix_trains_the_models_own_parameters():
    model = torchvision.models.resnet18(num_classes=3)
    ft.freeze_to(model, -2)
    split, _ = split_model(model)
    before = model.layer4[0].conv1.weight.detach().clone()
    opt = torch.optim.SGD(ft.param_groups(model, 0.1), lr=0.1)
    with torch.no_grad():
        feats = split.prefix(torch.randn(4, 3, 64, 64))
    split.suffix_train(feats).sum().backward()
    opt.step()
    assert not torch.equal(model.layer4[0].conv1.weight, before)


@pytest.mark.parametrize(
    "bn, expected",
    [
        ("train", "updates its statistics"),
        ("affine", "updates its statistics"),
        ("affine-only", "BatchNorm scale and shift train (bn policy 'affine-only'), the first stage's (stem) too"),
    ],
)
def test_prefix_with_moving_batchnorm_is_not_cacheable(bn, expected):
    model = torchvision.models.resnet18(num_classes=3)
    ft.freeze(model, "backbone", bn=bn)
    split, why = split_model(model)
    assert split is None and expected in why


def test_dropout_in_prefix_moves_the_cut_before_it():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    ft.freeze(model, "backbone")
    split, why = split_model(model)
    assert split is not None, why
    assert not any(isinstance(m, nn.Dropout) for m in split.prefix.modules())  # the random mask is drawn each step
    x = torch.randn(5, 8)
    model.train()
    torch.manual_seed(1)
    want = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(split.suffix_train(split.prefix(x)), want)


def _drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:  # as Hugging Face's models write it
    if not training or not drop_prob:
        return x
    keep = (torch.rand(x.shape[0], 1) >= drop_prob).to(x.dtype)
    return x * keep / (1 - drop_prob)


class ModelDropPath(nn.Module):  # Hugging Face's ConvNextDropPath, BeitDropPath...
    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _drop_path(x, self.drop_prob, self.training)


class _Residual(nn.Module):
    def __init__(self, drop: nn.Module) -> None:
        super().__init__()
        self.linear, self.drop = nn.Linear(8, 8), drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.linear(x))


@pytest.mark.parametrize("drop", [torchvision.ops.StochasticDepth(0.5, "row"), ModelDropPath(0.5)],
                         ids=["torchvision", "hugging-face"])  # fmt: skip
def test_stochastic_depth_drawn_in_a_frozen_stage_moves_the_cut_before_it(drop):
    # torchvision's StochasticDepth (EfficientNet, ConvNeXt, Swin) was traced through, its training flag fixed in the
    # prefix: cached features held one random depth an image, and the prefix differed from call to call in eval.
    # Drawn in the frozen stages (dropout "keep", the default; "off" runs them as at inference: the next test)
    model = nn.Sequential(nn.Linear(8, 8), _Residual(drop), _Residual(nn.Identity()), nn.Linear(8, 3))
    ft.freeze(model, "backbone")
    split, why = split_model(model)
    assert split.boundary == "1" and "stochastic depth" in why, why
    x = torch.randn(64, 8)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(split.suffix_eval(split.prefix(x)), model(x))
        torch.testing.assert_close(split.prefix(x), split.prefix(x))
        model.train()  # the drop still draws its mask each step, in the suffix
        torch.manual_seed(1)
        want = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(split.suffix_train(split.prefix(x)), want)
        assert not torch.equal(split.suffix_train(split.prefix(x)), want)


@pytest.mark.parametrize("drop", [torchvision.ops.StochasticDepth(0.5, "row"), ModelDropPath(0.5), nn.Dropout(0.5)],
                         ids=["torchvision", "hugging-face", "dropout"])  # fmt: skip
def test_stochastic_depth_held_in_the_frozen_stages_leaves_the_cut_at_the_first_that_trains(drop):
    # dropout "off": the frozen stages' random layers run as at inference, so the whole frozen prefix is cached
    # (torchvision's EfficientNet-B0 at --freeze backbone is cut after its first blocks otherwise), and the cached
    # path trains the same numbers as the whole model in training mode
    model = nn.Sequential(nn.Linear(8, 8), _Residual(drop), _Residual(nn.Identity()), nn.Linear(8, 3))
    ft.freeze(model, "backbone", dropout="off")
    split, why = split_model(model)
    assert split.boundary == "3" and why == "cached at the input of 3 (fx)", why
    x = torch.randn(64, 8)
    model.train()
    torch.testing.assert_close(split.prefix(x), split.prefix(x), rtol=0, atol=0)  # no mask drawn
    torch.testing.assert_close(split.suffix_train(split.prefix(x)), model(x))
    ft.unfreeze(model, "1")  # the stage opened draws again: the cut moves before it, the drop in the suffix
    assert split_model(model)[0].boundary == "1"
    assert not torch.equal(model(x), model(x))


def test_nothing_frozen_is_not_cacheable():
    model = torchvision.models.resnet18(num_classes=3)
    split, why = split_model(model)
    assert split is None and "no frozen prefix" in why


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4, 3))

    def forward(self, x):
        if x.sum() > 0:
            x = x * 1.0
        return self.head(self.body(x))


def test_untraceable_model_falls_back_to_the_head_input():
    model = _Untraceable()
    ft.freeze(model, "backbone")
    split, why = split_model(model)
    assert split is not None and split.how == "head-hook" and "does not trace" in why
    _same_function(model, split, size=16)


class _UntraceableThreeStages(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 1.0
        return self.head(self.mid(self.stem(x)))


def test_untraceable_model_with_trainable_body_is_not_cached():
    model = _UntraceableThreeStages()
    ft.freeze(model, "stem")
    split, why = split_model(model)
    assert split is None and "before the head train" in why, why


class _UntraceableWithDropout(_Untraceable):
    def __init__(self) -> None:
        super().__init__()
        self.body.insert(2, nn.Dropout(0.3))


def test_untraceable_model_with_dropout_before_head_is_not_cached():
    model = _UntraceableWithDropout()
    ft.freeze(model, "backbone")
    split, why = split_model(model)
    assert split is None and "random" in why


def test_an_earlier_cut_runs_the_frozen_stages_in_the_suffix():
    # the auto recipe's candidates share one cache: a model frozen up to layer4 can be cut before layer3
    model = torchvision.models.resnet18(num_classes=3).eval()
    ft.freeze_to(model, 4)  # stem .. layer3 frozen; layer4 and fc train
    split, why = split_model(model, at="layer3")
    assert split.boundary == "layer3" and "layer3" in why
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = split.prefix(x)
        assert features.shape == (2, 128, 8, 8)  # layer3's input, not layer4's
        torch.testing.assert_close(split.suffix_eval(features), model(x))
    split.suffix_train(features).sum().backward()
    assert model.layer4[0].conv1.weight.grad is not None and model.layer3[0].conv1.weight.grad is None
    assert split_model(model, at="layer4")[0].boundary == "layer4"
    assert split_model(model, at="fc")[0] is None  # past the first trainable stage: refused, with the reason


def test_a_vision_transformer_with_optional_inputs_splits_at_its_first_trainable_block():
    # timm ViT's forward(x, attn_mask=None, is_causal=False): traced as inputs, attn_mask crossed every cut with
    # the tokens, so the cache was off ("no single tensor crosses the stage boundary")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=3).eval()
    ft.freeze_to(model, -2)  # the last block and the head train
    split, why = split_model(model)
    assert split is not None and why == "cached at the input of blocks.2 (fx)", why
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(split.suffix_eval(split.prefix(x)), model(x), rtol=0, atol=0)


def test_a_cut_moved_by_a_random_op_names_the_stage_it_is_at():
    # a frozen block with dropout (Swin's drop path at rate 0.1): the cut moved before it, and the log still said
    # "cached at the input of" the first trainable stage, while every frozen stage after the cut ran each step
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 3))
    assert [s.name for s in ft.stages(model)] == ["0", "1", "3"]
    ft.freeze(model, "backbone")
    split, why = split_model(model)
    assert split.boundary == "1" and why.startswith("cached at the input of 1 (fx), not of 3: frozen layers"), why
    assert split.prefix(torch.randn(2, 8)).shape == (2, 8)


@pytest.mark.parametrize(("arch", "first"), [("googlenet", "inception5a"), ("inception_v3", "Mixed_7b")])
def test_a_model_built_with_aux_classifiers_is_cached_up_to_its_first_trainable_stage(arch, first):
    # the aux classifiers counted as trainable: the cut fell before the first (after inception4a, Mixed_6e) and the
    # log named a stage after it, while the frozen blocks between ran each step
    from freezetune.model.create import create_model

    model, _ = create_model(f"torchvision:{arch}", "none", load=False)
    ft.replace_head(model, 3)
    ft.freeze_to(model, -3)
    split, why = split_model(model)
    assert split.boundary == first and why == f"cached at the input of {first} (fx)", why


def test_a_cut_moved_by_aux_classifiers_that_train_names_them_and_where_the_main_path_is_cut():
    # a GoogLeNet built by hand with them: the cut fell at aux1's input, and the log said "cached at the input of
    # inception5b" (the stage aux1 belongs to) "...: frozen layers between them draw random numbers"
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    ft.replace_head(model, 3)
    ft.freeze_to(model, -3)
    split, why = split_model(model)
    assert split.boundary == "inception4b", why
    assert why == ("cached at the input of inception4b (fx), not of inception5a: the auxiliary classifier(s) 'aux1', "
                   "'aux2' train and branch off before it (create_model builds the model without them), so the frozen "
                   "layers from inception4b on run every step")  # fmt: skip


def test_a_cut_moved_by_two_tensors_crossing_is_not_blamed_on_random_numbers():
    # HRNet's branches enter its stage2 side by side: the log said its frozen layers "draw random numbers in
    # training", which nothing in it does
    class TwoBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.fuse, self.head = nn.Bilinear(8, 8, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            return self.head(self.fuse(self.a(x), self.b(x)))

    model = TwoBranches()
    assert [s.name for s in ft.stages(model)] == ["stem", "a", "b", "fuse", "head"]
    ft.freeze_to(model, -2)  # fuse and the head train
    split, why = split_model(model)
    assert split.boundary == "a" and why == ("cached at the input of a (fx), not of fuse: more than one tensor (or a "
                                             "random op) crosses into fuse, so the frozen layers from a on run every "
                                             "step"), why  # fmt: skip
    x = torch.randn(2, 8)
    torch.testing.assert_close(split.suffix_eval(split.prefix(x)), model(x))


def test_a_failure_after_tracing_is_not_blamed_on_the_model(monkeypatch):
    # a fault in freezetune's own graph surgery is named as such: it is not "the model does not trace"
    from freezetune.cache import model_split as split_module

    def broken(*args, **kwargs):
        raise KeyError("node")

    monkeypatch.setattr(split_module, "_find_cut", broken)
    model = torchvision.models.resnet18(num_classes=3)
    ft.freeze(model, "backbone")
    split, why = split_model(model)
    assert "does not trace" not in why and "KeyError" in why and "freezetune bug" in why, why
    assert split is not None and split.how == "head-hook"  # the run still goes on, reading the head's input


def test_attention_dropout_a_fused_kernel_draws_moves_the_cut_before_it():
    # timm's Attention hands attn_drop.p to scaled_dot_product_attention in training: traced as a constant of the
    # prefix, cached features held one random attention mask an image
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=3,
                              attn_drop_rate=0.5)  # fmt: skip
    ft.freeze_to(model, -2)  # blocks.2 and the head train
    split, why = split_model(model)
    assert split.boundary == "blocks.0", why
    x = torch.randn(2, 3, 32, 32)
    model.train()
    torch.testing.assert_close(split.prefix(x), split.prefix(x), rtol=0, atol=0)
    ft.freeze_to(model, -2, dropout="off")  # held with their attention layers: cached up to blocks.2
    assert split_model(model)[0].boundary == "blocks.2"


class _ModeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        if self.training:  # a frozen layer that branches on its mode: more nodes in the train graph
            x = x * 1.0
        return x


class _BranchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.fc = _ModeBranch(), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c(self.b(self.a(x))))


def test_train_and_eval_graphs_of_other_shapes_are_not_cut_at_one_index():
    # cut at the same index of both graphs, the eval suffix skipped a frozen layer: suffix_eval(prefix(x)) != model(x)
    model = _BranchNet()
    assert [s.name for s in ft.stages(model)] == ["a", "b", "c", "fc"]
    ft.freeze_to(model, -2)  # c and fc train
    split, why = split_model(model)
    if split is not None:
        x = torch.randn(4, 8)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(split.suffix_eval(split.prefix(x)), model(x))


def test_dropout_inside_torchs_own_attention_layers_moves_the_cut():
    # nn.TransformerEncoderLayer is a leaf of the trace; its dropouts and its MultiheadAttention's float dropout were
    # not seen, and its features were cached with one random mask an image
    torch.manual_seed(0)
    layer = lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.3, batch_first=True)  # noqa: E731
    model = nn.Sequential(nn.Linear(8, 8), layer(), layer(), nn.Flatten(), nn.Linear(32, 3))
    ft.freeze_to(model, -1)
    split, why = split_model(model)
    x = torch.randn(2, 4, 8)
    model.train()
    assert split is None or torch.equal(split.prefix(x), split.prefix(x)), why
    ft.freeze_to(model, -1, dropout="off")
    split, why = split_model(model)
    assert why == "cached at the input of 4 (fx)", why
    torch.testing.assert_close(split.prefix(x), split.prefix(x), rtol=0, atol=0)
