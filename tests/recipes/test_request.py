"""A named recipe's request (``recipe.json``) and the resumes it refuses or lets go on."""

from __future__ import annotations

import json

import pytest

from _engine_fixtures import make_image_folder, recipe_cfg, run_cli, stopping_at, train_argv
from freezetune.errors import ConfigError
from freezetune.recipes.named import phases
from freezetune.recipes.request import keep_request, refuse_a_changed_request
from freezetune.run import checkpoint
from freezetune.run.directory import RECIPE_FILE


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), train=14, val=0, test=4)


def _as_an_earlier_freezetune_asked(run_dir) -> None:
    """Rewrite a run's request as a freezetune before 2026-12-05 kept it: bn_stats at its default of then, "update",
    and no frozen_dropout (added later)."""
    record = json.loads((run_dir / RECIPE_FILE).read_text())
    record["asked"]["bn_stats"] = "update"
    record["asked"].pop("frozen_dropout")
    (run_dir / RECIPE_FILE).write_text(json.dumps(record, indent=1))


def test_a_request_holding_an_earlier_default_of_an_option_the_recipe_sets_resumes(tmp_path):
    # a sweep gives lp-ft bn_stats at today's default ("auto", sweep_config.own_batchnorm): its lp-ft, stopped under
    # an earlier freezetune, was refused "with bn_stats 'update' -> 'auto'"
    cfg = recipe_cfg(tmp_path, tmp_path / "run", recipe="lp-ft", resume=True)
    keep_request(tmp_path / "run", "lp-ft", cfg, phases(cfg, "lp-ft"))
    _as_an_earlier_freezetune_asked(tmp_path / "run")
    refuse_a_changed_request(cfg, "lp-ft", phases(cfg, "lp-ft"))
    changed = recipe_cfg(tmp_path, tmp_path / "run", recipe="lp-ft", resume=True, lr=0.01)
    with pytest.raises(ConfigError, match=r"with lr 0.001 -> 0.01: a run of recipe lp-ft continues as it was asked"):
        refuse_a_changed_request(changed, "lp-ft", phases(changed, "lp-ft"))


def test_an_lp_ft_an_earlier_freezetune_stopped_in_its_fine_tune_resumes_with_its_command(data, tmp_path, capsys,
                                                                                           monkeypatch):  # fmt: skip
    # its request held bn_stats "update" (the default then): its own command with --resume was refused, "recipe
    # 'lp-ft' sets bn_stats itself: give the recipe or bn_stats 'update', not both", and no flag got past it
    from freezetune.training import trainer

    argv = train_argv(data, tmp_path / "run", "--epochs", "2", "--recipe", "lp-ft")
    stop = stopping_at(lambda run, epoch: epoch == 1 and run.run_dir.name == "run")  # the fine-tune's second epoch
    with monkeypatch.context() as patch:
        patch.setattr(trainer.Trainer, "_run_epoch", stop)
        assert run_cli(capsys, *argv)[0] == 130
    _as_an_earlier_freezetune_asked(tmp_path / "run")
    code, out, err = run_cli(capsys, *argv, "--resume")
    assert code == 0 and "test accuracy" in out, err
    assert checkpoint.load(tmp_path / "run" / "last.pt")["epoch"] == 2


def test_a_named_recipes_run_resumed_for_more_epochs_resumes_again_with_a_plain_resume(data, tmp_path, capsys):
    # the request kept the epochs first asked: the next --resume, without --epochs, asked 1 where 2 had trained and
    # was refused ("cannot resume ... with epochs 1: it has trained 2 epochs"), naming a value never given
    run = tmp_path / "run"
    argv = train_argv(data, run, "--recipe", "last-2", "--scheduler", "none", "--epochs", "1")
    assert run_cli(capsys, *argv)[0] == 0
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--epochs", "2")
    assert code == 0, err
    assert json.loads((run / RECIPE_FILE).read_text())["asked"]["epochs"] == 2
    code, out, err = run_cli(capsys, "train", "--out", run, "--resume")
    assert code == 0 and "test accuracy" in out, err
    assert checkpoint.load(run / "last.pt")["epoch"] == 2
