"""Weight averaging (``average_weights``): the moving average's arithmetic, and a run whose weights end as the average
of its steps' with BatchNorm statistics of their own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import freezetune as ft
from _engine_fixtures import make_image_folder
from freezetune.config.train_config import TrainConfig
from freezetune.errors import ConfigError
from freezetune.run import checkpoint
from freezetune.training import averaging, bn_refresh, step
from freezetune.training.averaging import WeightAverage, decay_of

pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), test=0)


def test_the_decay_spans_the_share_of_the_steps_asked():
    assert 1 / (1 - decay_of(0.5, 200)) == pytest.approx(100)
    assert decay_of(0.5, 1) == 0.0  # a horizon under one step: the last step's weights


def test_the_average_moves_towards_each_steps_weights_and_a_later_parameter_joins_at_its_weights_then():
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    model[1].weight.requires_grad_(False)
    with torch.no_grad():
        model[0].weight.fill_(0.0)
        model[1].weight.fill_(10.0)
    average = WeightAverage(model, decay=0.75)
    with torch.no_grad():
        model[0].weight.fill_(4.0)
    average.update()  # 0 -> 1
    model[1].weight.requires_grad_(True)  # unfrozen: joins at its weights of the next update, 10
    average.update()  # 1 -> 1.75
    with torch.no_grad():
        model[0].weight.fill_(1.75)
        model[1].weight.fill_(14.0)
    average.update()  # 1.75 -> 1.75, 10 -> 11
    restored = WeightAverage(model, decay=0.5)  # a resume's: the decay of the run as configured now
    restored.load_state_dict(average.state_dict())
    restored.apply()
    assert (model[0].weight.item(), model[1].weight.item()) == (1.75, 11.0)
    assert restored.decay == 0.5  # (a resume that added epochs averages over the last share of them all)


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_a_share_outside_0_to_1_is_refused(share):
    with pytest.raises(ConfigError, match=r"average_weights must be in \[0, 1\]"):
        ft.train(TrainConfig(data="nowhere", average_weights=share))


def test_a_runs_weights_end_as_the_average_of_its_steps_with_statistics_recomputed(data, tmp_path, monkeypatch):
    steps, starts, refreshed = [], [], []
    scheduled, init, refresh = step.Step._scheduled, WeightAverage.__init__, bn_refresh.refresh_if_stale

    def trainable(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def record_step(self):
        scheduled(self)
        steps.append(trainable(self.state.model))

    def record_start(self, model, decay):
        starts.append((trainable(model), decay))
        init(self, model, decay)

    def record_refresh(module, n, *args, **kwargs):
        refreshed.append(n)
        return refresh(module, n, *args, **kwargs)

    monkeypatch.setattr(step.Step, "_scheduled", record_step)
    monkeypatch.setattr(averaging.WeightAverage, "__init__", record_start)
    monkeypatch.setattr(bn_refresh, "refresh_if_stale", record_refresh)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), model="timm:test_efficientnet", weights="none",
                      img_size=32, device="cpu", workers=0, progress=False, batch_size=8, epochs=2, freeze=-3,
                      average_weights=0.5, tensorboard=False, final_test=False)  # fmt: skip
    said = []
    result = ft.train(cfg, echo=said.append)
    # said where a user reads the run (a named recipe's said nothing, its last epoch lower for no reason shown)
    total = 2 * result.steps_per_epoch
    assert f"note: the weights end as their average over the last 50% of the run's {total} steps" in "\n".join(said)

    ((expected, decay),) = starts
    assert len(steps) == 2 * result.steps_per_epoch and decay == pytest.approx(decay_of(0.5, len(steps)))
    for weights in steps:
        for name, value in weights.items():
            expected[name] = expected[name] * decay + value * (1 - decay)
    saved = checkpoint.load(tmp_path / "run" / "last.pt")["state_dict"]
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=1e-6, msg=name)
        assert not torch.equal(saved[name], steps[-1][name])  # not the last step's weights
    # the averaged weights' BatchNorm statistics are their own: a pass over the training data after the swap
    assert refreshed[-1] == 0


def test_the_auto_recipes_run_averages_half_its_steps_and_its_trials_none(data, tmp_path, monkeypatch):
    decays, init = [], WeightAverage.__init__

    def record(self, model, decay):
        decays.append(decay)
        init(self, model, decay)

    monkeypatch.setattr(averaging.WeightAverage, "__init__", record)
    said = []
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), model="timm:test_efficientnet", weights="none",
                      img_size=32, device="cpu", workers=0, progress=False, batch_size=8, epochs=2,
                      tensorboard=False, final_test=False)  # fmt: skip
    result = ft.train(cfg, echo=said.append)
    steps = 2 * result.steps_per_epoch
    assert decays == [pytest.approx(decay_of(0.5, steps))]  # one average: the run's, none in the trial
    assert any("weights averaged over the last 50% of its steps" in line for line in said), said
    recipe = (tmp_path / "run" / "recipe.json").read_text()
    assert '"average_weights": 0.5' in recipe

    decays.clear()
    off = TrainConfig(**{**cfg.recorded(), "out": str(tmp_path / "off"), "average_weights": 0.0})
    ft.train(off, echo=lambda line: None)
    assert decays == []
