"""Named recipes end to end on a tiny model (``recipes/named.py``): what each freezes and trains, the options a recipe
sets itself, their phases, and stopping and resuming them (the auto recipe: test_auto.py; sweeps: test_sweep.py)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from _engine_fixtures import CLASSES, make_idx_dir, make_image_folder, recipe_cfg, run_cli, stopping_at, train_argv
from freezetune.config.check import validate
from freezetune.config.file import load_config
from freezetune.config.train_config import TrainConfig
from freezetune.errors import ConfigError
from freezetune.freezing.freeze import freeze
from freezetune.model.create import create_model
from freezetune.model.stages import replace_head
from freezetune.recipes import named as recipes
from freezetune.recipes.named import phases, recipe_of
from freezetune.run import checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # no val/ folder: the validation split is held out of train, and test/ is scored only at the end
    return make_image_folder(tmp_path_factory.mktemp("images"), train=14, val=0, test=4)


def test_each_named_recipe_says_what_it_freezes():
    cfg = TrainConfig(data="d", out="runs/x")
    assert recipe_of(cfg) == "auto" and recipe_of(TrainConfig(data="d", freeze="none")) is None
    single = {name: phases(cfg, name)[0].cfg for name in ("linear-probe", "full", "gradual", "plateau", "bitfit")}
    assert single["linear-probe"].freeze == "backbone" and single["linear-probe"].unfreeze is None
    # the head alone takes lp-ft's probe's step (at 1x --lr a sweep rated linear-probe 30 % where lp-ft's probe, the
    # same procedure at 10x, reached 63 %)
    assert single["linear-probe"].lr == phases(cfg, "lp-ft")[0].cfg.lr == 10 * cfg.lr
    for recipe in ("linear-probe", "lp-ft"):  # the head alone, a sweep's --bn or not
        assert phases(dataclasses.replace(cfg, bn="affine-only"), recipe)[0].cfg.bn == "frozen"
    assert single["full"].freeze == "none"
    assert single["gradual"].unfreeze == "epoch:1" and single["plateau"].unfreeze.startswith("plateau")
    assert single["bitfit"].freeze == "bitfit"
    assert phases(cfg, "last-k")[0].cfg.freeze == -3 and phases(cfg, "last-1")[0].cfg.freeze == -2
    probe, tune = phases(cfg, "lp-ft")
    assert (probe.cfg.freeze, tune.cfg.freeze) == ("backbone", "none") and probe.cfg.out == "runs/x/probe"
    assert tune.cfg.bn_stats == "frozen" and single["full"].bn_stats == "auto"  # a plain run: updated
    # gradual opens a stage an epoch under a head fitted on frozen statistics: held, unless asked otherwise
    assert single["gradual"].bn_stats == "frozen" and single["plateau"].bn_stats == "auto"
    assert phases(dataclasses.replace(cfg, bn_stats="update"), "gradual")[0].cfg.bn_stats == "update"
    assert probe.cfg.lr > tune.cfg.lr and not probe.cfg.final_test


def test_lp_ft_s_probe_leaves_decay_and_stage_lrs_to_the_fine_tune_and_probes_at_10x_its_head_lr():
    # the probe trains the head alone: it printed "not used" for --decay and --stage-lrs, which the fine-tune uses,
    # and a head LR given in --stage-lrs replaced its 10x step (1x the fine-tune's head LR)
    cfg = TrainConfig(data="d", out="runs/x", model="timm:test_efficientnet", img_size=32, lr=1e-3, decay=2.0,
                      stage_lrs={"classifier": 4e-3, "blocks.*": 1e-4})  # fmt: skip
    probe, tune = phases(cfg, "lp-ft")
    assert (probe.cfg.stage_lrs, probe.cfg.decay, probe.cfg.lr) == ({}, None, pytest.approx(4e-2))
    assert (tune.cfg.stage_lrs, tune.cfg.decay, tune.cfg.lr) == (cfg.stage_lrs, 2.0, 1e-3)
    assert phases(dataclasses.replace(cfg, stage_lrs={"blocks.4": 1e-4}), "lp-ft")[0].cfg.lr == pytest.approx(1e-2)
    # linear-probe is that probe: the head's --stage-lrs trained it at 1x while --print-config said "lr 10x"
    (probe_alone,) = phases(cfg, "linear-probe")
    assert (probe_alone.cfg.stage_lrs, probe_alone.cfg.decay, probe_alone.cfg.lr) == ({}, None, pytest.approx(4e-2))
    assert "lr 0.04" in recipes.plan_comment(dataclasses.replace(cfg, recipe="linear-probe"))


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"recipe": "lp-ft", "bn": "frozen"}, "recipe 'lp-ft' sets bn itself"),
        ({"recipe": "full", "freeze": "auto"}, "recipe 'full' sets freeze itself (to 'none')"),
        ({"cache_at": None}, None),  # unset, as it is anyway
        ({"freeze": "auto"}, None),  # asks for the auto recipe itself
        ({"recipe": "auto", "freeze": "auto"}, None),
        ({"bn": "frozen"}, None),  # the auto recipe leaves bn to the user
    ],
)
def test_an_option_given_at_its_default_value_beside_a_recipe_that_sets_it_is_refused(kw, needle, tmp_path):
    # the recipe replaced a value typed at its default in silence: only a value other than the default was refused
    if needle is None:
        load_config(overrides={"data": "d", **kw})
    else:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config(overrides={"data": "d", **kw})
    # a config file's keys are not typed: --print-config writes every key, the recipe's too
    saved = tmp_path / "run.yaml"
    saved.write_text(TrainConfig(data="d", **kw).dump())
    load_config(saved)


def test_an_asked_bn_stats_update_beside_lp_ft_is_refused_from_a_config_file_too(tmp_path):
    # lp-ft's fine-tune holds the statistics; "update" was the default, so a file asking for it passed in silence
    saved = tmp_path / "run.yaml"
    saved.write_text(TrainConfig(data="d", recipe="lp-ft", bn_stats="update").dump())
    with pytest.raises(ConfigError, match="recipe 'lp-ft' sets bn_stats itself"):
        load_config(saved)
    with pytest.raises(ConfigError, match="recipe 'lp-ft' sets bn_stats itself"):
        load_config(overrides={"data": "d", "recipe": "lp-ft", "bn_stats": "update"})


def test_recipe_and_freeze_together_or_an_unknown_recipe_are_refused():
    with pytest.raises(ConfigError, match="not both"):
        load_config(overrides={"data": "d", "recipe": "full", "freeze": "-2"})
    with pytest.raises(ConfigError, match="unknown recipe 'fast'.*'lp-ft'"):
        load_config(overrides={"data": "d", "recipe": "fast"})
    assert load_config(overrides={"data": "d", "recipe": "last-4"}).recipe == "last-4"


@pytest.mark.parametrize(
    ("kw", "needles"),
    [
        ({"recipe": "gradual", "unfreeze": "epoch:2"}, ["recipe 'gradual' sets unfreeze itself (to 'epoch:1')"]),
        (
            {"recipe": "last-2", "unfreeze": "epoch:1", "freeze": "-2"},  # every conflict in one message
            ["recipe 'last-2' sets freeze itself", "recipe 'last-2' sets unfreeze itself"],
        ),
        ({"recipe": "lp-ft", "unfreeze": "plateau:patience=1"}, ["recipe 'lp-ft' sets unfreeze itself"]),
        # the head alone: under affine-only the backbone's BatchNorm trained too (a sweep's "linear-probe" row)
        ({"recipe": "linear-probe", "bn": "affine-only"}, ["recipe 'linear-probe' sets bn itself (to 'frozen')"]),
        ({"recipe": "lp-ft", "bn": "train"}, ["recipe 'lp-ft' sets bn itself"]),
        ({"cache_at": "blocks.2"}, ["freeze 'auto' (the default) sets cache_at itself"]),
        ({"budget": "5s", "freeze": "backbone"}, ["budget '5s'", "with freeze 'backbone' it has no effect"]),
        ({"budget": "5s", "recipe": "full"}, ["with recipe 'full' it has no effect"]),
    ],
)
def test_an_option_the_recipe_would_replace_is_refused(kw, needles):
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"data": "d", **kw})
    for needle in needles:
        assert needle in str(err.value)


def test_options_a_recipe_leaves_alone_pass():
    for kw in ({"recipe": "gradual", "stage_lrs": "blocks.4=1e-4"}, {"recipe": "last-2", "cache_at": "blocks.2"},
               {"budget": "5m"}, {"freeze": "backbone", "unfreeze": "epoch:1", "cache_at": "blocks.2"}):  # fmt: skip
        load_config(overrides={"data": "d", **kw})


def test_bitfit_trains_only_biases_norms_and_the_head():
    model, _ = create_model("timm:test_efficientnet", "none", img_size=32)
    replace_head(model, 3)
    freeze(model, "bitfit")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    norms = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)
             for p, _ in mod.named_parameters(recurse=False)}  # fmt: skip
    assert trainable and all(n.endswith("bias") or n in norms or n.startswith("classifier") for n in trainable)
    assert norms <= set(trainable)
    assert "classifier.weight" in trainable and "conv_stem.weight" not in trainable
    assert any(n.startswith("blocks.") and n.endswith("bn1.weight") for n in trainable)


def test_bitfit_trains_rms_norms_as_norms():
    # RMSNorm (torch's, and Hugging Face's *RMSNorm classes) was frozen as a weight: a Llama classifier, which has
    # no biases, trained its head alone
    class LlamaRMSNorm(torch.nn.Module):  # as transformers names it: a class of its own, not torch's
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(n))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    body = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.RMSNorm(16), torch.nn.Linear(16, 16),
                               LlamaRMSNorm(16))  # fmt: skip
    model = torch.nn.Sequential(body, torch.nn.Linear(16, 3))
    freeze(model, "bitfit")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["0.1.weight", "0.2.bias", "0.3.weight", "1.weight", "1.bias"]


def test_a_linear_probe_names_the_lower_stage_lrs_and_decay_it_does_not_use(data, tmp_path, capsys):
    # the recipe's run drops them (its head trains alone at 10x), and said nothing: a plain run with the head alone
    # names them "not used"
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--recipe", "linear-probe", "--epochs", "1",
                                                 "--decay", "3", "--stage-lrs", "blocks.*=1e-5,classifier=1e-3"))  # fmt: skip
    assert code == 0, err
    assert ("note: recipe linear-probe trains the head alone, the stages below it frozen: stage_lrs for 'blocks.0', "
            "'blocks.1', 'blocks.2', 'blocks.3', 'blocks.4' and decay 3.0 are not used\n") in out  # fmt: skip
    cfg = TrainConfig(data="d", model="timm:test_efficientnet", img_size=32, stage_lrs={"classifier": 1e-3})
    assert recipes._unused_by_the_probe(cfg) is None  # the head's LR it uses (at 10x)


def test_lp_ft_fine_tunes_every_layer_from_the_probed_head(data, tmp_path, capsys):
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--recipe", "lp-ft"))
    assert code == 0, err
    assert "phase 1/2 (probe)" in out and "phase 2/2 (fine-tune)" in out
    probe = checkpoint.load(tmp_path / "run" / "probe" / "best.pt")
    final = checkpoint.load(tmp_path / "run" / "last.pt")
    assert final["config"]["init"] == str(tmp_path / "run" / "probe" / "best.pt")
    assert final["config"]["freeze"] == "none" and probe["config"]["freeze"] == "backbone"
    # the probe trained only the head: its backbone is the starting (random-init) one, the fine-tune moved it
    assert not torch.equal(final["state_dict"]["conv_stem.weight"], probe["state_dict"]["conv_stem.weight"])
    assert (tmp_path / "run" / "test_metrics.json").is_file()
    # the fine-tune holds the BatchNorm statistics the probe's head was fitted on (batch statistics moved them under
    # it: 9 and 6 points of test accuracy lost on Fashion-MNIST); their scale and shift train with the rest
    assert final["config"]["bn_stats"] == "frozen" and "trainable, eval stats" in out
    stats = [k for k in probe["state_dict"] if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(final["state_dict"][k], probe["state_dict"][k]) for k in stats)
    assert not torch.equal(final["state_dict"]["bn1.weight"], probe["state_dict"]["bn1.weight"])


def test_a_recipes_training_seconds_count_every_phase(data, tmp_path):
    # the sweep listed lp-ft at its fine-tune's seconds: the probe (its cache build too) trained first, uncounted
    from freezetune.training.progress import RunResult

    def timed(cfg, echo, recipe_run=False):
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        seconds = {"cache": 2.0, "epochs": 4.0, "val": 1.0} if "probe" in cfg.out else {"epochs": 10.0, "val": 3.0}
        return RunResult(Path(cfg.out), 1, 0.5, seconds=seconds)

    result = recipes.run(recipe_cfg(data, tmp_path / "run", recipe="lp-ft"), echo=lambda _: None, train=timed)
    assert result.train_seconds == (2.0 + 4.0 - 1.0) + (10.0 - 3.0)
    # resumed after its probe finished: the probe's seconds come from its last.pt
    real = recipes.run(recipe_cfg(data, tmp_path / "real", recipe="lp-ft", epochs=1), echo=lambda _: None)
    probe = checkpoint.load(tmp_path / "real" / "probe" / "last.pt")["progress"]["spent"]
    resumed = recipes.run(recipe_cfg(data, tmp_path / "real", recipe="lp-ft", epochs=1, resume=True),
                          echo=lambda _: None, train=timed)  # fmt: skip
    assert probe["epochs"] > 0 and real.train_seconds > 0
    assert resumed.seconds["epochs"] == pytest.approx(probe["epochs"] + 10.0)


def test_a_two_phase_recipe_without_out_keeps_its_phases_in_one_run_dir(data, tmp_path, monkeypatch):
    # without --out, lp-ft's probe and fine-tune made two unrelated runs/ dirs and no log held the phase lines
    from freezetune.training.trainer import train

    monkeypatch.chdir(tmp_path)
    result = train(dataclasses.replace(recipe_cfg(data, None, recipe="lp-ft", epochs=1), out=None), echo=lambda _: None)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert result.run_dir.resolve() == run_dir.resolve() and (run_dir / "probe" / "best.pt").is_file()
    assert "recipe lp-ft: phase 1/2 (probe)" in (run_dir / "train.log").read_text()
    assert load_config(run_dir / "config.yaml").init == str((run_dir / "probe" / "best.pt").resolve())


def test_an_lp_ft_stopped_in_its_probe_is_kept_from_any_other_command(data, tmp_path, capsys):
    # "starting it afresh (cleared recipe.json)": a --freeze run or another recipe trained in its dir, its probe/
    # orphaned; --recipe full --resume trained a fresh full run there, and the lp-ft's own --resume was refused
    from _engine_fixtures import snapshot

    run = tmp_path / "lpft"
    (run / "probe").mkdir(parents=True)
    (run / "recipe.json").write_text(json.dumps({"recipe": "lp-ft", "phases": ["probe", "fine-tune"], "asked": {}}))
    (run / "probe" / "last.pt").write_bytes(b"the probe's first epoch")
    before = snapshot(run)
    for extra in (
        ("--freeze", "-2"),
        ("--recipe", "full"),
        ("--recipe", "full", "--resume"),
        ("--freeze", "-2", "--resume"),
    ):
        code, out, err = run_cli(capsys, *train_argv(data, run, "--epochs", "1", *extra))
        assert code == 2 and "a run of recipe" in err and "lp-ft" in err, (extra, err)
        assert "--resume" in err and snapshot(run) == before, extra


def test_img_size_below_one_is_refused_with_the_other_settings_before_a_model_is_built():
    with pytest.raises(ConfigError, match="img_size must be >= 1, got -5"):
        validate(TrainConfig(data="images", img_size=-5))


def test_early_stopping_or_plateau_unfreezing_without_validation_images_is_refused_before_training(tmp_path, capsys):
    # one image a class: a plateau unfreeze failed after epoch 1 with the Python API's "call step(epoch, metric)",
    # and --early-stop was ignored in silence
    data = make_image_folder(tmp_path / "images", train=1, val=0, test=2)
    for asked, said in (
        (("--freeze", "backbone", "--unfreeze", "plateau:patience=1"), "plateau unfreezing"),
        (("--recipe", "plateau"), "plateau unfreezing ('plateau:patience=1': --unfreeze, or the"),
        (("--freeze", "backbone", "--early-stop", "1"), "early stopping (--early-stop 1) needs"),
    ):
        out_dir = tmp_path / "run"
        code, out, err = run_cli(capsys, *train_argv(data, out_dir, "--epochs", "2", *asked))
        assert code == 2 and len(err.strip().splitlines()) == 1, (asked, err)
        assert said in err and "validation data, and this run has none (none (every class has a single" not in err
        assert "this run has none" in err and "--val-data" in err and "epoch 1/" not in out, (asked, err)
        assert not list(out_dir.rglob("*.pt")), asked  # nothing trained


@pytest.mark.parametrize("recipe, stop_in", [("gradual", None), ("lp-ft", "probe")])
def test_a_named_recipe_stopped_in_any_phase_resumes_with_its_own_command_and_resume(data, tmp_path, capsys,
                                                                                      monkeypatch, recipe, stop_in):  # fmt: skip
    # "stopped ... continue with --resume": the same command with --resume was refused (recipe gradual sets freeze
    # itself, laid over its phase's config.yaml); an lp-ft stopped in its probe could not be resumed at all
    from freezetune.training import trainer

    argv = train_argv(data, tmp_path / "run", "--epochs", "2", "--recipe", recipe)
    # Ctrl-C as the second epoch of the phase starts
    stop = stopping_at(lambda run, epoch: epoch == 1 and (stop_in is None or run.run_dir.name == stop_in))
    with monkeypatch.context() as patch:
        patch.setattr(trainer.Trainer, "_run_epoch", stop)
        code, _, err = run_cli(capsys, *argv)
    assert code == 130 and "--resume continues" in err, err
    code, out, err = run_cli(capsys, *argv, "--resume")
    assert code == 0 and "test accuracy" in out, err
    assert "resumed" in out and checkpoint.load(tmp_path / "run" / "last.pt")["epoch"] == 2
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["asked"]["recipe"] == recipe


def test_a_recipe_record_of_another_freezetune_falls_back_to_the_runs_config(tmp_path):
    # a key this freezetune no longer knows raised from TrainConfig (now a ConfigError): the fallback missed it
    import json

    from freezetune.recipes.named import asked_config

    (tmp_path / "recipe.json").write_text(json.dumps({"recipe": "lp-ft", "asked": {"data": "d", "old_key": 1}}))
    (tmp_path / "config.yaml").write_text("freeze: none\n")
    assert asked_config(tmp_path) is None


def test_checking_the_test_split_builds_no_model_for_an_image_folder_beside_a_train_csv(tmp_path, monkeypatch):
    # Kaggle's train/, test/ and train.csv (of image ids): the model was built only to learn it is not a text model
    from freezetune.recipes import named as recipes

    make_image_folder(tmp_path / "kaggle")
    (tmp_path / "kaggle" / "train.csv").write_text("id,label\n1,red\n")
    monkeypatch.setattr(recipes, "structure", lambda *a: pytest.fail("the model was built"))
    recipes.check_test_data(TrainConfig(data=str(tmp_path / "kaggle"), model="timm:test_efficientnet"))


def test_checking_the_test_split_counts_its_images_or_texts(tmp_path):
    # what a --budget leaves time to score at the end
    from freezetune.recipes import named as recipes

    make_image_folder(tmp_path / "images", train=3, val=0, test=2)
    assert recipes.check_test_data(TrainConfig(data=str(tmp_path / "images"))) == 2 * len(CLASSES)
    make_image_folder(tmp_path / "no-test", train=3, val=0, test=0)
    assert recipes.check_test_data(TrainConfig(data=str(tmp_path / "no-test"))) is None
    assert recipes.check_test_data(TrainConfig(data=str(make_idx_dir(tmp_path / "idx", n_test=20)))) == 20


@pytest.mark.parametrize("recipe", ["lp-ft", "gradual"])
def test_a_named_recipe_refused_at_its_first_phases_set_up_leaves_no_run_dir(data, tmp_path, capsys, recipe):
    # a plain run makes its dir once the model and data are ready; a recipe left one holding only recipe.json
    argv = train_argv(data, tmp_path / "run", "--recipe", recipe, "--decode", "gpu", "--device", "auto")
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and "decode 'gpu'" in err and not (tmp_path / "run").exists(), (out, err)
    mine = tmp_path / "mine"  # a folder the user made: stays, as empty as it was
    mine.mkdir()
    code, out, err = run_cli(capsys, *train_argv(data, mine, "--recipe", recipe, "--decode", "gpu", "--device", "auto"))
    assert code == 2 and mine.is_dir() and not list(mine.iterdir()), err
    # the user's shell writing the command's output to train.log there (> mine/train.log): it was deleted, the error
    # with it
    (mine / "train.log").write_text("my own log\n")
    code, out, err = run_cli(capsys, *train_argv(data, mine, "--recipe", recipe, "--decode", "gpu", "--device", "auto"))
    assert code == 2 and sorted(p.name for p in mine.iterdir()) == ["train.log"], err
    assert (mine / "train.log").read_text() == "my own log\n"


def test_a_gradual_run_an_earlier_freezetune_began_resumes_with_its_statistics_updated(data, tmp_path, capsys,
                                                                                     monkeypatch):  # fmt: skip
    # gradual holds the BatchNorm statistics under bn_stats auto since 2026-12-07; a run begun before recorded "auto",
    # which then updated them: refused as "bn_stats 'auto' -> 'frozen'", it goes on as it began
    from freezetune.training import trainer

    argv = train_argv(data, tmp_path / "run", "--epochs", "2", "--recipe", "gradual")
    with monkeypatch.context() as patch:
        patch.setattr(trainer.Trainer, "_run_epoch", stopping_at(lambda run, epoch: epoch == 1))
        code, _, err = run_cli(capsys, *argv)
    assert code == 130, err
    last = tmp_path / "run" / "last.pt"
    record = checkpoint.load(last)
    assert record["config"]["bn_stats"] == "frozen"
    record["config"]["bn_stats"] = "auto"  # as the earlier freezetune recorded it
    checkpoint.save(record, last)
    code, out, err = run_cli(capsys, *argv, "--resume")
    assert code == 0 and "resumed" in out, err
    assert checkpoint.load(last)["config"]["bn_stats"] == "auto"


def test_a_named_recipe_stopped_by_an_error_after_its_first_phase_keeps_its_request_to_resume(data, tmp_path,
                                                                                             monkeypatch):  # fmt: skip
    from freezetune.errors import DataError
    from freezetune.recipes import named as recipes
    from freezetune.run.directory import RECIPE_FILE
    from freezetune.training import trainer

    calls = []

    def second_fails(cfg, **kw):
        calls.append(cfg.out)
        if len(calls) == 2:
            raise DataError("the data changed under the run")
        return trainer.train(cfg, **kw)

    with pytest.raises(DataError):
        recipes.run(
            recipe_cfg(data, tmp_path / "run", recipe="lp-ft", epochs=1), echo=lambda _: None, train=second_fails
        )
    assert (tmp_path / "run" / RECIPE_FILE).is_file()  # phase 1's work is there: --resume continues from it


def test_a_named_recipe_resumed_between_its_phases_refuses_a_changed_setting(data, tmp_path, capsys, monkeypatch):
    # an lp-ft stopped before its fine-tune's first epoch ended resumed with --lr 0.01: the finished probe was kept,
    # the fine-tune trained at the new LR, and the run's own --resume was refused from then on
    from _engine_fixtures import snapshot
    from freezetune.training import trainer

    argv = train_argv(data, tmp_path / "run", "--epochs", "2", "--recipe", "lp-ft")
    # Ctrl-C as the fine-tune's first epoch starts (the probe has finished)
    stop = stopping_at(lambda run, epoch: epoch == 0 and run.run_dir.name == "run")
    with monkeypatch.context() as patch:
        patch.setattr(trainer.Trainer, "_run_epoch", stop)
        assert run_cli(capsys, *argv)[0] == 130
    assert (tmp_path / "run" / "probe" / "best.pt").is_file() and not (tmp_path / "run" / "last.pt").exists()
    before = snapshot(tmp_path / "run")
    code, out, err = run_cli(capsys, *argv, "--resume", "--lr", "0.01")
    assert code == 2 and "-> 0.01" in err and "continues as it was asked" in err, err
    assert "already done" not in out and snapshot(tmp_path / "run") == before
    code, out, err = run_cli(capsys, *argv, "--resume", "--no-progress")  # a setting a resume may change
    assert code == 0 and checkpoint.load(tmp_path / "run" / "last.pt")["epoch"] == 2, err


def test_a_named_recipe_stopped_in_its_first_phase_refuses_a_fresh_command_and_still_resumes(data, tmp_path, capsys,
                                                                                            monkeypatch):  # fmt: skip
    # the command again without --resume (and another --lr) rewrote recipe.json and was refused only by the probe;
    # the run's own --resume was then refused for "lr 0.01 -> 0.1", a change the user never made
    from _engine_fixtures import snapshot
    from freezetune.training import trainer

    argv = train_argv(data, tmp_path / "run", "--epochs", "2", "--recipe", "lp-ft")
    stop = stopping_at(lambda run, epoch: epoch == 1 and run.run_dir.name == "probe")  # as the probe's 2nd epoch starts
    with monkeypatch.context() as patch:
        patch.setattr(trainer.Trainer, "_run_epoch", stop)
        assert run_cli(capsys, *argv)[0] == 130
    before = snapshot(tmp_path / "run")
    code, out, err = run_cli(capsys, *argv, "--lr", "0.01")
    assert code == 2 and "already holds a run of recipe lp-ft, stopped in its probe phase" in err, err
    assert "--resume" in err and "starting it afresh" not in out and snapshot(tmp_path / "run") == before
    code, out, err = run_cli(capsys, *argv, "--resume")
    assert code == 0 and checkpoint.load(tmp_path / "run" / "last.pt")["epoch"] == 2, err
    code, out, err = run_cli(capsys, *argv)  # finished: the run dir's own refusal, not "stopped in its probe phase"
    assert code == 2 and "already holds a run (" in err and "probe phase" not in err, err
    # stopped as the fine-tune's first epoch ran, its probe finished: it said "stopped in its probe phase"
    again = train_argv(data, tmp_path / "again", "--epochs", "2", "--recipe", "lp-ft")
    with monkeypatch.context() as patch:
        patch.setattr(trainer.Trainer, "_run_epoch", stopping_at(lambda run, epoch: run.run_dir.name == "again"))
        assert run_cli(capsys, *again)[0] == 130
    code, out, err = run_cli(capsys, *again)
    assert code == 2 and "stopped in its fine-tune phase, before that finished an epoch (its probe phase finished: " \
        in err, err  # fmt: skip


def test_a_user_error_in_a_recipes_set_up_is_the_one_line_printed(data, tmp_path, capsys):
    # "recipe last-2: phase 1/1 (last-2): freeze -3" came first, on stdout, before the error the set-up found
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, *train_argv(data, out, "--recipe", "last-2", "--stage-lrs", "nosuch=1e-4"))
    assert code == 2 and err.startswith("freezetune: error: stage_lrs names unknown stage(s) 'nosuch'"), err
    assert "phase 1/1" not in stdout and not out.exists()
    code, stdout, err = run_cli(capsys, *train_argv(data, out, "--recipe", "last-2", "--epochs", "1"))
    assert code == 0 and stdout.startswith("recipe last-2: phase 1/1 (last-2): freeze -3\n"), err


def test_a_local_hugging_face_model_saved_over_is_planned_from_its_new_stages(tmp_path, request):
    # a notebook: the folder saved again with four layers where it held one, and the auto recipe planned from the
    # first model's stages (its candidates, its cut), held by the model's name
    from transformers import BertForSequenceClassification

    from conftest import tiny_bert_config

    request.addfinalizer(recipes.structure.cache_clear)
    folder = tmp_path / "bert"
    for layers in (1, 4):
        config = tiny_bert_config()
        config.num_hidden_layers = layers
        BertForSequenceClassification(config).save_pretrained(folder)
        names, text = recipes.structure(f"hf:{folder}", None)
        assert text and sum(name.startswith("encoder.layer.") for name in names) == layers, names


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="the process's mappings are read from Linux's /proc")
def test_a_phase_resumed_trains_with_its_last_pt_no_longer_mapped(tmp_path):
    # the record read to see whether the phase was done kept last.pt mapped while the phase trained on: Windows
    # refuses to replace a mapped file, and the phase's first save of last.pt failed (PermissionError)
    phase = tmp_path / "probe"
    phase.mkdir()
    record = {"state_dict": {"w": torch.zeros(256, 256)}, "classes": CLASSES, "model": {}, "preprocess": {},
              "epoch": 1, "progress": {"spent": {"epochs": 2.0}}}  # fmt: skip
    torch.save(record, phase / "last.pt")
    mapped = []

    def train(cfg, **kwargs):
        mapped.extend(line for line in Path("/proc/self/maps").read_text().splitlines() if "last.pt" in line)
        return cfg

    cfg = TrainConfig(data="d", out=str(phase), epochs=3, resume=True)
    assert recipes._run_phase(cfg, train, lambda _: None, last=False).resume  # not done: it trains on
    assert mapped == []
