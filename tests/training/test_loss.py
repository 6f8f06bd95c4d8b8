"""The training loss: class weights against imbalance, and the note a run prints when its classes are imbalanced."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from torch.nn import functional as F

import freezetune.run.setup as run_setup
from _engine_fixtures import make_image_folder, run_cli, train_argv
from freezetune.training.loss import balanced_class_weights, imbalance_note, training_loss


def test_balanced_weights_make_every_class_weigh_the_same_and_average_one():
    targets = torch.tensor([0] * 90 + [1] * 30 + [3] * 10)  # class 2 has no samples
    w = balanced_class_weights(targets, 4)
    per_class_total = torch.bincount(targets, minlength=4).float() * w
    assert torch.allclose(per_class_total[[0, 1, 3]], torch.full((3,), 130 / 3))
    assert w[2] == 0 and torch.isclose(w[targets].mean(), torch.tensor(1.0))


def test_the_balanced_loss_is_the_weighted_cross_entropy():
    targets, logits = torch.tensor([0, 0, 0, 1]), torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    loss = training_loss("balanced", 0.0, targets, 2, torch.device("cpu"))(logits, targets)
    expected = F.cross_entropy(logits, targets, weight=torch.tensor([4 / 6, 2.0]))
    assert torch.isclose(loss, expected)
    assert training_loss("none", 0.1, targets, 2, torch.device("cpu")).weight is None


@pytest.mark.parametrize(("counts", "noted"), [((9, 3), True), ((8, 3), False), ((9, 0, 3), True)])
def test_imbalance_is_noted_from_three_to_one(counts, noted):
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    assert (imbalance_note("none", targets, len(counts)) is not None) == noted
    assert imbalance_note("balanced", targets, len(counts)) is None  # the user has acted on it


def test_a_run_on_imbalanced_data_says_so_and_balanced_weights_train_with_its_labels(tmp_path, capsys, monkeypatch):
    data = make_image_folder(tmp_path / "data", train=12, val=3, test=0)
    for i in range(9):  # red keeps 3 training images against 12
        (data / "train" / "red" / f"red_{i}.png").unlink()
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "plain", "--epochs", "1"))
    assert code == 0, err
    assert "note: the classes are imbalanced (12 to 3 training images): --class-weights balanced" in out
    seen = []
    real = run_setup.training_loss
    monkeypatch.setattr(run_setup, "training_loss", lambda *a: seen.append(a) or real(*a))
    args = train_argv(data, tmp_path / "balanced", "--epochs", "1", "--class-weights", "balanced")
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "the classes are imbalanced" not in out  # (the run dir's name, in the last line, has the word)
    class_weights, _, targets, num_classes, _ = seen[0]
    assert class_weights == "balanced" and torch.bincount(targets, minlength=3).tolist() == [12, 12, 3]
    saved = yaml.safe_load((tmp_path / "balanced" / "config.yaml").read_text())
    assert saved["class_weights"] == "balanced"
    shutil.rmtree(tmp_path / "plain")


def test_an_unknown_class_weights_value_lists_the_choices(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", train=2, val=1, test=0)
    code, _, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--class-weights", "inverse"))
    assert code == 2 and "class_weights" in err and "'none', 'balanced'" in err and "Traceback" not in err


def test_class_weights_take_a_list_of_labels_and_refuse_labels_past_the_classes():
    from freezetune.errors import DataError

    # an ImageFolder's targets are a list: docs/python-api.md passes train_set.targets
    assert (
        balanced_class_weights([0, 0, 0, 1], 2).tolist()
        == balanced_class_weights(torch.tensor([0, 0, 0, 1]), 2).tolist()
    )
    with pytest.raises(DataError, match=r"labels must lie in 0..2 for 3 classes; they run from 0 to 5"):
        balanced_class_weights(torch.tensor([0, 0, 5]), 3)  # gave 6 weights for 3 classes
    with pytest.raises(DataError, match="labels must lie in 0..2"):
        balanced_class_weights([-1, 0], 3)
