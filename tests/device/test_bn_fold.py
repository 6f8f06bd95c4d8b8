"""BatchNorm folded into convolutions for evaluation (``freezetune.device.bn_fold``): the same logits, only safe pairs
folded, the trained model untouched, and the evaluation loop on a CPU running the folded copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TinyCNN, clone_params
from freezetune.device.bn_fold import foldable, foldable_pairs, folded
from freezetune.device.precision import resolve_precision
from freezetune.training import eval_loop as evaluate_module
from freezetune.training.eval_loop import evaluate


def _trained_stats(model: nn.Module) -> nn.Module:
    """Running statistics and affine values away from their defaults, as a pretrained model's are."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def _same_logits(model: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        torch.testing.assert_close(folded(model)(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18", "test_efficientnet"])
def test_a_folded_timm_model_gives_the_same_logits_and_leaves_the_model_as_it_was(name):
    import timm

    torch.manual_seed(0)
    model = _trained_stats(timm.create_model(name, pretrained=False, num_classes=5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 64, 64)
    copy = folded(model)
    assert len(foldable_pairs(model)) >= 10 and not any(isinstance(m, nn.BatchNorm2d) for m in copy.modules())
    with torch.inference_mode():
        torch.testing.assert_close(copy(x), model(x), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


class _Residual(nn.Module):
    """A convolution whose output feeds its norm and a skip connection: folding the norm in would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.other, self.other_bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y + self.other_bn(self.other(x))


class _Standardised(nn.Conv2d):
    """Weight standardisation: its forward rescales the weights, so a scale folded into them would be undone."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


def test_only_a_convolution_that_feeds_its_norm_alone_is_folded():
    model = _trained_stats(_Residual())
    assert foldable_pairs(model) == (("other", "other_bn"),)
    _same_logits(model, torch.randn(2, 4, 8, 8))


class _Shared(nn.Module):
    """One convolution called twice, its norm after the first call only; one norm called after two convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.a, self.b, self.shared_bn = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x) + self.shared_bn(self.a(x)) + self.shared_bn(self.b(x))


def test_a_module_called_twice_is_not_folded_for_one_of_its_calls():
    model = _trained_stats(_Shared())
    assert foldable_pairs(model) == ()
    _same_logits(model, torch.randn(2, 4, 8, 8))


def test_a_model_changed_since_its_pairs_were_found_is_traced_again():
    model = _trained_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert foldable_pairs(model) == (("0", "1"),)
    model.insert(1, nn.ReLU())  # a notebook's edit: the norm no longer reads the convolution's output
    assert foldable_pairs(model) == ()
    _same_logits(model, torch.randn(2, 3, 8, 8))


def test_a_convolution_that_changes_its_weights_or_a_norm_without_running_statistics_stays():
    standardised = _trained_stats(nn.Sequential(_Standardised(3, 4, 3), nn.BatchNorm2d(4)))
    batch_stats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert foldable_pairs(standardised) == () and folded(standardised) is standardised
    assert foldable_pairs(batch_stats) == () and folded(batch_stats) is batch_stats


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("wrap", [nn.utils.weight_norm, nn.utils.parametrizations.weight_norm])
def test_a_convolution_whose_weight_is_recomputed_at_each_call_is_not_folded(wrap):
    # the old weight_norm rebuilds .weight in a pre-hook; the new one makes .weight a parametrization's output
    model = _trained_stats(nn.Sequential(wrap(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)))
    assert foldable_pairs(model) == ()
    _same_logits(model, torch.randn(2, 3, 8, 8))


def test_a_model_that_cannot_be_copied_is_evaluated_as_it_is():
    import threading

    model = _trained_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.lock = threading.Lock()  # deepcopy: "cannot pickle '_thread.lock' object"
    assert foldable_pairs(model) == (("0", "1"),) and folded(model) is model


def test_a_model_that_does_not_trace_or_holds_no_norm_is_evaluated_as_it_is():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # data-dependent control flow: fx cannot trace it

    assert foldable(Branchy()) and foldable_pairs(Branchy()) == ()
    assert not foldable(nn.Linear(4, 2))
    assert not foldable(nn.DataParallel(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))  # a wrapper


def test_evaluation_on_a_cpu_runs_the_folded_copy_with_the_same_metrics_and_keeps_the_training_mode(monkeypatch):
    torch.manual_seed(0)
    model = _trained_stats(TinyCNN(num_classes=3)).train()
    params = clone_params(model)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    precision = resolve_precision(torch.device("cpu"), "off")
    ran = []
    monkeypatch.setattr(evaluate_module, "folded", lambda m: ran.append(folded(m)) or ran[-1])
    metrics = evaluate(model, batches, precision, num_classes=3)
    monkeypatch.setattr(evaluate_module, "foldable", lambda m: False)  # the model as it is, for comparison
    plain = evaluate(model, batches, precision, num_classes=3)
    assert ran and not any(isinstance(m, nn.BatchNorm2d) for m in ran[0].modules())
    assert metrics["loss"] == pytest.approx(plain["loss"], abs=1e-5) and metrics["confusion"] == plain["confusion"]
    assert model.training and all(torch.equal(p, params[n]) for n, p in model.named_parameters())
