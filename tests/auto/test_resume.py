"""An auto run resumed (``auto/resume.py``): the decision ``recipe.json`` kept is trained, an earlier freezetune's too."""

from __future__ import annotations

import json

import pytest

from _engine_fixtures import make_image_folder, run_cli, stopping_at, train_argv
from freezetune.config.file import load_config
from freezetune.run.reporting import read_metrics

# the keys freezetune 3f213e7 (2026-12-03) wrote in recipe.json, and those of its choice besides its trial's row
_OLD_KEYS = ("procedure", "asked", "cut", "trials", "default_trained_stages", "trial_fraction", "compared_by",
             "budget_s", "choice")  # fmt: skip
_OLD_CHOICE_KEYS = ("epochs", "refit", "why", "init", "run_lr")
_OLD_ASKED_LACKS = ("frozen_dropout", "cuda_graph", "average_weights")  # settings added since


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), train=14, val=0, test=4)


def _as_3f213e7_wrote(decision: dict) -> dict:
    """``decision`` as freezetune 3f213e7 wrote it: no format, pilot, probe or budget, a request without the settings
    added since, and a choice that is the chosen trial's row (its ``epoch_images`` the images an epoch it measured, a
    float) with the run's epochs, refit, why, start weights and LR; no bn_stats, warm-up or epoch_images of the run."""
    choice = decision["choice"]
    trial = next(t for t in decision["trials"] if t["trained_stages"] == choice["trained_stages"])
    old = {k: decision[k] for k in _OLD_KEYS}
    old["asked"] = {k: v for k, v in decision["asked"].items() if k not in _OLD_ASKED_LACKS}
    old["choice"] = {**trial, **{k: choice[k] for k in _OLD_CHOICE_KEYS}}
    return old


def test_an_auto_run_an_earlier_freezetune_decided_resumes_and_trains_its_epochs_whole(data, tmp_path, capsys,
                                                                                       monkeypatch):  # fmt: skip
    # a run of 3f213e7 stopped in its final run: the resume read its choice's epoch_images, the trial's measured
    # images an epoch (24.0), as the run's setting: "invalid config: epoch_images expects int | None, got 24.0"
    from freezetune.training import trainer

    out = tmp_path / "run"
    argv = train_argv(data, out, "--epochs", "2", "--average-weights", "0")  # its run averaged no weights
    with monkeypatch.context() as patch:  # Ctrl-C as the final run's second epoch starts
        patch.setattr(trainer.Trainer, "_run_epoch", stopping_at(lambda run, epoch: epoch == 1 and run.run_dir == out))
        code, _, err = run_cli(capsys, *argv)
    assert code == 130, err
    decision = json.loads((out / "recipe.json").read_text())
    old = _as_3f213e7_wrote(decision)
    assert isinstance(old["choice"]["epoch_images"], float) and decision["choice"]["epoch_images"] is None
    (out / "recipe.json").write_text(json.dumps(old, indent=1))
    code, said, err = run_cli(capsys, "train", "--out", out, "--resume")
    assert code == 0 and "auto: resuming with the earlier decision" in said and "test accuracy" in said, err
    assert [row["epoch"] for row in read_metrics(out / "metrics.csv")] == [1, 2]
    assert load_config(out / "config.yaml").epoch_images is None  # every epoch draws the whole set, as asked
