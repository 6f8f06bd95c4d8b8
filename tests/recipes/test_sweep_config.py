"""What a sweep is asked and records (``recipes/sweep_config.py``): its recipes, each recipe's run config and the
winner's; the sweeps themselves are ``test_sweep.py``'s."""

from __future__ import annotations

import pytest

from freezetune.config.file import load_config
from freezetune.config.options import SWEEP_DEFAULT_RECIPES
from freezetune.config.train_config import TrainConfig
from freezetune.errors import ConfigError
from freezetune.recipes import sweep_config


def test_a_sweeps_recipes_come_from_the_flag_else_its_config_file_else_the_default_list(tmp_path):
    # sweep --print-config > s.yaml writes the recipes into the file, which `sweep --config s.yaml` reads back; the
    # config's other values go on without the key (TrainConfig has no such field)
    saved = tmp_path / "s.yaml"
    saved.write_text(sweep_config.printed(TrainConfig(data="d", lr=0.01), ["full", "linear-probe"]))
    values, recipes = sweep_config.request(saved, None)
    assert recipes == "full,linear-probe" and "recipes" not in values and load_config(values).lr == 0.01
    assert sweep_config.request(saved, "auto")[1] == "auto"  # --recipes over the file's
    assert sweep_config.request(None, None) == (None, ",".join(SWEEP_DEFAULT_RECIPES))


def test_a_recipe_given_under_two_names_is_refused_as_given_twice():
    # last-k is last-2: the sweep trained it twice, into two folders, as two rows
    with pytest.raises(ConfigError, match=r"recipe\(s\) given twice: 'last-2', 'last-k'"):
        sweep_config.recipe_names("last-k,full,last-2")
    assert sweep_config.recipe_names("last-k,last-3") == ["last-k", "last-3"]


def test_a_sweeps_bn_applies_to_its_recipes_but_linear_probe_which_trains_the_head_alone(tmp_path):
    runs = sweep_config.run_configs(
        TrainConfig(data="d", bn="affine-only"), ["linear-probe", "last-2", "auto"], tmp_path
    )
    assert {name: run.bn for name, run in runs.items()} == {"linear-probe": "frozen", "last-2": "affine-only",
                                                            "auto": "affine-only"}  # fmt: skip


def test_a_sweeps_recipes_train_the_epochs_a_plain_run_does_even_under_its_budget(tmp_path):
    # unset (a budget plans an auto run's alone), they reached recipes.named.run as None: a resume of a sweep stopped
    # after lp-ft's probe compared the probe's epochs with None (TypeError), and the recipe's own --resume was refused
    runs = sweep_config.run_configs(TrainConfig(data="d", budget="5m"), ["lp-ft", "auto"], tmp_path)
    assert {run.epochs for run in runs.values()} == {10} and {run.budget for run in runs.values()} == {None}
    assert sweep_config.run_configs(TrainConfig(data="d", epochs=3), ["full"], tmp_path)["full"].epochs == 3


def test_a_sweeps_winner_yaml_of_a_recipe_that_sets_its_own_batchnorm_is_one_train_accepts(tmp_path):
    # sweep --bn train: linear-probe and lp-ft ran with their own BatchNorm, and winner.yaml gave them bn train, which
    # `train --config winner.yaml` refused ("recipe 'lp-ft' sets bn itself")
    asked = TrainConfig(data="d", bn="train", bn_stats="frozen")
    for recipe in ("lp-ft", "linear-probe"):
        values = sweep_config.winner_config(asked, {"recipe": recipe, "run_dir": str(tmp_path)})
        assert load_config(values).recipe == recipe  # as --config winner.yaml reads it: no conflict
    assert sweep_config.winner_config(asked, {"recipe": "full", "run_dir": str(tmp_path)})["bn"] == "train"


def test_a_resume_records_what_it_changed_of_the_settings_the_file_holds_and_no_setting_it_lacks(tmp_path):
    # an earlier freezetune's file (without cuda_graph, frozen_dropout, device...) was rewritten with every setting
    # this one knows, and that freezetune then refused it as a file "no sweep wrote there"
    import dataclasses

    out, cfg = tmp_path / "s", TrainConfig(data=str(tmp_path), budget="1h")
    out.mkdir()
    old = {k: v for k, v in sweep_config.kept_settings(out, cfg, ["full"]).items()
           if k not in ("cuda_graph", "frozen_dropout", "device", "workers")}  # fmt: skip
    sweep_config.record_settings(out, old)
    resumed = dataclasses.replace(cfg, resume=True, device="cpu", workers=0)
    assert sweep_config.kept_settings(out, resumed, ["full"]) is None  # nothing to record
    again = sweep_config.kept_settings(out, dataclasses.replace(resumed, budget="2h"), ["full"])
    assert again == {**old, "budget": "2h"} and list(again) == list(old)


def test_sweep_print_config_refuses_an_option_a_recipe_sets_itself_as_the_sweep_does(capsys, tmp_path):
    # it wrote a config with the conflict (exit 0), which `sweep --config` then refused
    from _engine_fixtures import run_cli

    code, out, err = run_cli(capsys, "sweep", "--recipes", "gradual", "--unfreeze", "epoch:2", "--print-config")
    assert code == 2 and not out and "recipe 'gradual' sets unfreeze itself" in err, err
    code, out, err = run_cli(capsys, "sweep", "--recipes", "gradual,last-2", "--budget", "5m", "--print-config")
    assert code == 0 and "recipes: gradual,last-2" in out and "budget: 5m" in out, err  # a sweep's budget is its own
    # a sweep's --bn, which linear-probe leaves (it trains the head alone), is no conflict: as the sweep takes it
    code, out, err = run_cli(
        capsys, "sweep", "--recipes", "linear-probe,last-2", "--bn", "affine-only", "--print-config"
    )
    assert code == 0 and "bn: affine-only" in out, err


def test_a_moved_sweeps_winner_reads_its_features_where_the_sweep_lies_now(tmp_path):
    # winner.yaml names the sweep's features/ by its absolute path: a sweep moved (or copied to another machine)
    # made its winner's run try the old folder, refused where its parents are not the user's
    from freezetune.run.log import SWEEP_SETTINGS

    old, new = tmp_path / "old" / "sweep", tmp_path / "new" / "sweep"
    (new / "features").mkdir(parents=True)
    (new / SWEEP_SETTINGS).write_text("recipes: auto\n")
    winner = new / "winner.yaml"
    winner.write_text(f"data: d\nrecipe: auto\ncache_dir: {old / 'features'}\n")
    assert load_config(str(winner)).cache_dir == str(new / "features")
    renamed = tmp_path / "new" / "sweep-renamed"  # renamed: the old folder was made again, empty, and read
    new.rename(renamed)
    assert load_config(str(renamed / "winner.yaml")).cache_dir == str(renamed / "features")
    renamed.rename(new)
    (new / "features").rmdir()  # gone with the old folder: the run computes its features again
    assert load_config(str(winner)).cache_dir is None
    winner.write_text(f"data: d\nrecipe: auto\ncache_dir: {tmp_path / 'team' / 'features'}\n")  # the user's own
    assert load_config(str(winner)).cache_dir == str(tmp_path / "team" / "features")
