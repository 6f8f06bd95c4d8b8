"""One source of choices and checks: the config and the modules acting on a choice list the same values, and both
augmentation pipelines read the same preset parameters."""

from __future__ import annotations

import pytest
import torch

from freezetune.config import options
from freezetune.config.check import validate
from freezetune.config.options import AugPreset
from freezetune.config.train_config import FIELD_CHOICES, TrainConfig
from freezetune.errors import ConfigError, FreezetuneError, choices
from freezetune.model.preprocess import Preprocess


def _message(call) -> str:
    with pytest.raises(FreezetuneError) as info:
        call()
    return str(info.value)


def _owner_calls():
    """Per config field, a call of the module that acts on the choice, with a bad value."""
    import torchvision

    from freezetune.data import InMemoryImageDataset, train_transform
    from freezetune.data.augment import BatchAugment
    from freezetune.data.gpu import should_use_device_loader
    from freezetune.device.precision import resolve_precision
    from freezetune.freezing.freeze import freeze

    ds = InMemoryImageDataset(torch.zeros(1, 4, 4, dtype=torch.uint8), torch.zeros(1), ["a"])
    return {
        "aug": [lambda: train_transform(Preprocess(8), "bogus"), lambda: BatchAugment(Preprocess(8), "bogus", "cpu")],
        "decode": [lambda: should_use_device_loader(ds, "cpu", "bogus")],
        "bn": [lambda: freeze(torchvision.models.resnet18(), "backbone", bn="bogus")],
        "frozen_dropout": [lambda: freeze(torchvision.models.resnet18(), "backbone", dropout="bogus")],
        "amp": [lambda: resolve_precision(torch.device("cpu"), "bogus")],
    }


@pytest.mark.parametrize("name", ["aug", "decode", "bn", "frozen_dropout", "amp"])
def test_config_and_owning_module_list_the_same_choices(name):
    listed = choices(FIELD_CHOICES[name])
    assert listed in _message(lambda: validate(TrainConfig(data="x", **{name: "bogus"})))
    for call in _owner_calls()[name]:
        assert listed in _message(call)


def test_every_choice_field_is_validated_against_its_list():
    for name, allowed in FIELD_CHOICES.items():
        assert getattr(TrainConfig(), name) in allowed, name  # the default is a valid choice
        message = _message(lambda name=name: validate(TrainConfig(data="x", **{name: "bogus"})))
        assert f"unknown {name} 'bogus'; choose one of: {choices(allowed)}" in message


def test_aug_presets_are_the_parameter_table():
    assert options.AUG_PRESETS == ("none", "light", "standard")
    assert options.aug_preset("light").crop_scale == (0.7, 1.0)
    assert options.aug_preset("standard") == AugPreset(crop_scale=(0.25, 1.0), flip_p=0.5, color=True, erase_p=0.25)
    with pytest.raises(ConfigError, match="'none', 'light', 'standard'"):
        options.aug_preset("heavy")


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_cpu_and_device_pipelines_read_the_same_preset(monkeypatch, flip_p):
    """A preset whose crop is the whole image: both pipelines output the image, mirrored exactly when it says so."""
    from freezetune.data import train_transform
    from freezetune.data.augment import BatchAugment

    preset = AugPreset(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=flip_p)
    monkeypatch.setitem(options.AUGMENTATIONS, "light", preset)
    pre = Preprocess(input_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    image[:, :, :4] = 255  # a bright left edge: a flip moves it to the right
    expected = image.float() / 255
    expected = expected.flip(-1) if flip_p else expected
    torch.manual_seed(0)
    cpu = train_transform(pre, "light")(image)
    device = BatchAugment(pre, "light", torch.device("cpu"))(image[None], torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(cpu, expected)
    torch.testing.assert_close(device, expected)


@pytest.mark.parametrize(
    ("check", "value", "problem"),
    [
        (options.positive_int_problem, 0, "n must be >= 1, got 0"),
        (options.positive_int_problem, True, "n must be an integer, got True"),
        (options.positive_int_problem, 2, None),
        (options.fraction_problem, 0.0, "n must be a fraction strictly between 0 and 1, got 0.0"),
        (options.fraction_problem, 0.5, None),
        (options.fraction_problem, 1.0, "n must be a fraction strictly between 0 and 1, got 1.0"),
    ],
)
def test_checks_name_the_value(check, value, problem):
    assert check("n", value) == problem


def test_a_share_that_may_be_whole_accepts_1_and_says_so():
    assert options.fraction_problem("n", 1.0, whole=True) is None
    assert options.fraction_problem("n", 1.5, whole=True) == "n must be in (0, 1], got 1.5"
    assert options.fraction_problem("n", 0, whole=True) == "n must be in (0, 1], got 0"


def test_data_checks_and_config_checks_say_the_same():
    from freezetune.data import build_datasets

    config = _message(lambda: validate(TrainConfig(data="x", val_split=1.5, per_class=0)))
    data = _message(lambda: build_datasets("x", val_split=1.5, per_class=0, preprocess=Preprocess(8)))
    for problem in (options.fraction_problem("val_split", 1.5), options.positive_int_problem("per_class", 0)):
        assert problem in config and problem in data


def test_memory_estimate_covers_every_optimizer_choice():
    from torch import nn

    from freezetune.device.memory import estimate_memory

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    state = {opt: estimate_memory(model, 8, 2, optimizer=opt)["full"]["optimizer"] for opt in options.OPTIMIZERS}
    assert state["sgd"] > 0 and state["adamw"] == state["adam"] == 2 * state["sgd"]


def test_library_defaults_are_the_config_defaults():
    import inspect

    from freezetune.data import train_transform
    from freezetune.freezing.freeze import freeze, freeze_to, unfreeze
    from freezetune.freezing.unfreezing import Unfreezer

    defaults = TrainConfig()
    for fn in (freeze, freeze_to):
        assert inspect.signature(fn).parameters["bn"].default == defaults.bn
    for fn in (unfreeze, Unfreezer):  # None: the parts still frozen keep the policy freeze gave them
        assert inspect.signature(fn).parameters["bn"].default is None
    assert inspect.signature(train_transform).parameters["aug"].default == defaults.aug
    assert inspect.signature(freeze).parameters["spec"].default == options.FREEZE_DEFAULT


@pytest.mark.parametrize("bad", ["nan", "inf", "1e400", "0", "-5m"])
def test_a_budget_that_is_no_positive_finite_duration_is_refused(bad):
    # nan and inf passed, and crashed (math.floor) after every trial of the auto recipe
    from freezetune.config.options import parse_duration

    with pytest.raises(ConfigError, match=f"budget must be a positive, finite duration such as 90s, 5m, 1.5h or "
                                          f"1h30m \\(a plain number is seconds\\), got '{bad}'"):  # fmt: skip
        parse_duration(bad)


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("5m", 300), ("1.5h", 5400), ("1h30m", 5400),
                                               ("1h 30m 10s", 5410), ("2m30s", 150), (" 5 M ", 300), ("+5m", 300),
                                               ("1e3s", 1000), ("1_000s", 1000)])  # fmt: skip
def test_a_budget_reads_a_duration_of_hours_minutes_and_seconds(text, seconds):
    # "1h30m" was refused: a budget of an hour and a half had to be typed as 5400 or 1.5h
    from freezetune.config.options import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["1:30", "5min", "1m1h", "1h1h", "1h30", "m", "30s5"])
def test_a_budget_that_is_no_duration_names_the_forms(bad):
    from freezetune.config.options import parse_duration

    with pytest.raises(ConfigError, match=f"budget '{bad}' is not a duration such as 90s, 5m, 1.5h or 1h30m"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("problem", "hint"),
    [
        (options.recipe_problem("LAST-2"), "(did you mean 'last-2'?)"),  # no suggestion: LAST-2 is far from last-k
        (options.recipe_problem("Full"), "(did you mean 'full'?)"),
        (options.choice_problem("amp", "FP16", options.AMP_MODES), "(did you mean 'fp16'?)"),
        (options.choice_problem("bn", "Frozen", ("frozen", "affine-only", "train")), "(did you mean 'frozen'?)"),
    ],
)
def test_a_choice_in_other_capitals_is_refused_with_its_spelling(problem, hint):
    assert hint in problem
