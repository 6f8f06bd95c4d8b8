"""Checkpoints: what ``best.pt``/``last.pt`` hold, rebuilding a model from one, RNG state, and unreadable files."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import freezetune as ft
from freezetune import checkpoint
from freezetune.errors import CheckpointError
from freezetune.models import create_model
from freezetune.preprocess import Preprocess

CLASSES = ["cat", "dog", "emu"]


pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def trained():
    """A timm test model with a new 3-class head, its BatchNorm statistics moved away from the init."""
    torch.manual_seed(0)
    model, _ = create_model("timm:test_efficientnet", "none")
    ft.replace_head(model, len(CLASSES))
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32) * 3 + 1)
    return model.eval()


def _record(model, **cfg):
    config = {"model": "timm:test_efficientnet", "epochs": 2, **cfg}
    return checkpoint.model_record(model, config, CLASSES, Preprocess(input_size=32, crop_pct=1.0))


def test_saved_checkpoint_rebuilds_the_same_model(trained, tmp_path):
    path = checkpoint.save(_record(trained), tmp_path / "best.pt")
    record = checkpoint.load(path)
    assert record["classes"] == CLASSES and record["model"] == "timm:test_efficientnet"
    assert record["config"]["epochs"] == 2 and record["freezetune_version"] == ft.__version__
    rebuilt, pre = checkpoint.build_model(record)
    assert pre == Preprocess(input_size=32, crop_pct=1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), trained(x))


def test_compiled_and_wrapped_models_save_plain_keys(trained):
    compiled = torch.compile(trained, backend="eager")  # wraps without compiling until called
    keys = set(_record(compiled)["state_dict"])
    assert keys == set(trained.state_dict()) and not any(k.startswith("_orig_mod") for k in keys)


def test_checkpoint_of_another_architecture_does_not_load(trained):
    record = _record(trained)
    record["state_dict"] = {"weight": torch.zeros(3, 4)}
    with pytest.raises(CheckpointError, match="do not fit timm:test_efficientnet"):
        checkpoint.build_model(record)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    checkpoint.save({"rng": checkpoint.rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(again[0], expected[0]) and again[1:] == expected[1:]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "does not exist"),
        ("text", "not a PyTorch checkpoint file"),
        ("pickled module", "more than tensors and plain data"),
        ("plain tensor", "not a freezetune checkpoint"),
        ("dict without classes", "not a freezetune checkpoint"),
        ("directory", "is a directory"),
    ],
)
def test_unreadable_checkpoints_say_why_in_one_line(tmp_path, kind, message):
    path = tmp_path / "x.pt"
    if kind == "text":
        path.write_text("hello\n")
    elif kind == "pickled module":
        torch.save(nn.Linear(2, 2), path)  # loading it would need arbitrary unpickling
    elif kind == "plain tensor":
        torch.save(torch.zeros(2), path)
    elif kind == "dict without classes":
        torch.save({"state_dict": {}}, path)
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(CheckpointError, match=message) as info:
        checkpoint.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_run_directory_given_as_checkpoint_points_to_best_pt(trained, tmp_path):
    checkpoint.save(_record(trained), tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match="did you mean .*best.pt"):
        checkpoint.load(tmp_path)
