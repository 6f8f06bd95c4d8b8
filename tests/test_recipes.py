"""Named recipes, the auto recipe and sweeps, end to end on a tiny model (``recipes.py``, ``auto.py``, ``sweep.py``)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from _engine_fixtures import make_image_folder, run_cli, train_argv
from freezetune import auto, auto_rule, checkpoint, recipes
from freezetune.config import TrainConfig
from freezetune.config_check import validate
from freezetune.config_file import load_config
from freezetune.errors import ConfigError, FreezetuneError
from freezetune.freeze import freeze
from freezetune.models import create_model
from freezetune.recipes import phases, recipe_of
from freezetune.reporting import read_metrics
from freezetune.stages import replace_head


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # no val/ folder: the validation split is held out of train, and test/ is scored only at the end
    return make_image_folder(tmp_path_factory.mktemp("images"), train=14, val=0, test=4)


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(model="timm:test_efficientnet", weights="none", img_size=32, device="cpu", workers=0, progress=False,
                batch_size=8, epochs=2, tensorboard=False, data=str(data), out=str(out))  # fmt: skip
    return TrainConfig(**{**base, **kw})


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
    from freezetune.progress import RunResult

    def timed(cfg, echo, recipe_run=False):
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        seconds = {"cache": 2.0, "epochs": 4.0, "val": 1.0} if "probe" in cfg.out else {"epochs": 10.0, "val": 3.0}
        return RunResult(Path(cfg.out), 1, 0.5, seconds=seconds)

    result = recipes.run(_cfg(data, tmp_path / "run", recipe="lp-ft"), echo=lambda _: None, train=timed)
    assert result.train_seconds == (2.0 + 4.0 - 1.0) + (10.0 - 3.0)
    # resumed after its probe finished: the probe's seconds come from its last.pt
    real = recipes.run(_cfg(data, tmp_path / "real", recipe="lp-ft", epochs=1), echo=lambda _: None)
    probe = checkpoint.load(tmp_path / "real" / "probe" / "last.pt")["progress"]["spent"]
    resumed = recipes.run(_cfg(data, tmp_path / "real", recipe="lp-ft", epochs=1, resume=True), echo=lambda _: None,
                          train=timed)  # fmt: skip
    assert probe["epochs"] > 0 and real.train_seconds > 0
    assert resumed.seconds["epochs"] == pytest.approx(probe["epochs"] + 10.0)


def test_trials_too_short_to_tell_the_candidates_apart_keep_the_default_untried(data, tmp_path, monkeypatch):
    # 4-step trials on 400 validation images overturned the default on noise in 2 of 5 seeds, costing 5 and 2 points
    monkeypatch.setattr(auto, "MIN_VAL_TO_COMPARE", 3)  # the split is large enough: the steps decide
    lines = []
    auto.run(_cfg(data, tmp_path / "run", epochs=1), echo=lines.append)
    decision = json.loads((tmp_path / "run" / "recipe.json").read_text())
    (trial,) = decision["trials"]
    assert trial["trained_stages"] == decision["choice"]["trained_stages"] == auto.DEFAULT_TRAINED_STAGES
    assert trial["steps"] < auto.MIN_TRIAL_STEPS
    steps = f"{trial['steps']} step{'s' if trial['steps'] != 1 else ''}"
    assert (
        f"a trial of {steps} cannot tell the candidates apart (under 10, a trial's score moves more"
        in (decision["choice"]["why"])
    )
    assert any(line.startswith("auto: chose to train the last 3 stage(s)") for line in lines)


def test_a_few_shot_auto_run_fits_the_head_first_and_holds_batchnorm_statistics(data, tmp_path, monkeypatch):
    # 10 images a class at 224 px (CPU, 10 epochs, 3 seeds): the trial's boosted LR on a random head then 10 epochs at
    # half of it scored 70.4 %, a linear probe alone 70.9 %; the head probed first, then the last 3 stages at the asked
    # LR holding their statistics, 78.7 %. Holding them at 3.3e-3 collapsed every seed to one class: the LR is the asked
    monkeypatch.setattr(auto, "PROBE_BELOW_STEPS", 10)  # the trials take 3 steps
    monkeypatch.setattr(auto, "PROBE_MIN_RUN_STEPS", 0)  # however short the run
    lines = []
    result = auto.run(_cfg(data, tmp_path / "run", lr=2e-3), echo=lines.append)
    decision = json.loads((tmp_path / "run" / "recipe.json").read_text())
    (trial,) = decision["trials"]
    probe, choice = decision["probe"], decision["choice"]
    assert trial["steps"] < auto.PROBE_BELOW_STEPS and choice["trained_stages"] == auto.DEFAULT_TRAINED_STAGES
    assert probe["lr"] == pytest.approx(2e-2) and probe["epochs"] == 2 and probe["refit"] is choice["refit"] is True
    assert choice["run_lr"] == pytest.approx(2e-3) and choice["bn_stats"] == "frozen"
    weights = tmp_path / "run" / "auto-trials" / "probe" / "best.pt"
    assert choice["init"] == probe["weights"] == str(weights) and weights.is_file()
    assert not (tmp_path / "run" / "auto-trials" / "last-3" / "best.pt").exists()  # the trial's weights: unused
    # the probe trained the head alone, every BatchNorm held; the run started from its head
    probed = checkpoint.load(weights)
    assert probed["config"]["freeze"] == "backbone" and probed["config"]["bn"] == "frozen"
    final = checkpoint.load(tmp_path / "run" / "last.pt")
    assert final["config"]["init"] == str(weights) and final["config"]["bn_stats"] == "frozen"
    assert final["config"]["lr"] == pytest.approx(2e-3) and final["config"]["freeze"] == choice["freeze"]
    assert any("is too short for a new head to settle" in line and "a linear probe, 2 epoch(s) at lr 2.0e-02" in line
               for line in lines)  # fmt: skip
    assert any(line.startswith("auto: the probed head: no validation (refit) after 2 epoch(s)") for line in lines)
    assert any("BatchNorm statistics held) from the probed head for 2 epoch(s)" in line for line in lines)
    assert any("trainable, eval stats" in line for line in lines)  # the run's stage table says so
    # the probe is part of the cost, and a resume trains what was decided: from the probe, statistics held
    assert result.seconds["epochs"] >= probe["seconds"]["epochs"] + trial["seconds"]["epochs"]
    resumed, measured = auto._resumed(_cfg(data, tmp_path / "run", lr=2e-3, resume=True), tmp_path / "run", print)
    assert resumed.bn_stats == "frozen" and resumed.init == str(weights) and measured == [trial, probe]


def test_a_few_shot_auto_run_keeps_batchnorm_statistics_updating_when_the_user_asks_for_it(data, tmp_path, monkeypatch):
    # "update" was also the default, so an asked --bn-stats update was held like the default in a probed run
    monkeypatch.setattr(auto, "PROBE_BELOW_STEPS", 10)  # the trials take 3 steps
    monkeypatch.setattr(auto, "PROBE_MIN_RUN_STEPS", 0)  # however short the run
    lines = []
    auto.run(_cfg(data, tmp_path / "run", bn_stats="update"), echo=lines.append)
    choice = json.loads((tmp_path / "run" / "recipe.json").read_text())["choice"]
    final = checkpoint.load(tmp_path / "run" / "last.pt")
    assert choice["bn_stats"] == final["config"]["bn_stats"] == "update"
    assert any("from the probed head" in line and "statistics held" not in line for line in lines)
    assert not any("trainable, eval stats" in line for line in lines)  # no stage's statistics held


def test_a_few_shot_auto_run_too_short_to_move_from_a_probed_head_starts_from_its_trial(data, tmp_path, monkeypatch):
    monkeypatch.setattr(auto, "PROBE_BELOW_STEPS", 10)  # the trials take 3 steps: 2 epochs of 6, 12 steps
    lines = []
    auto.run(_cfg(data, tmp_path / "run"), echo=lines.append)
    decision = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert decision["probe"] is None and "last-3" in decision["choice"]["init"]
    assert not (tmp_path / "run" / "auto-trials" / "probe").exists()
    assert any("a run of about 12 steps is too short to move from a probed one" in line for line in lines), lines


def test_a_text_model_a_trial_long_enough_or_a_run_too_short_is_not_probed():
    assert auto.few_shot({"steps": auto.PROBE_BELOW_STEPS - 1}, text=False, epochs=10)
    assert not auto.few_shot({"steps": auto.PROBE_BELOW_STEPS}, text=False, epochs=10)
    assert not auto.few_shot({"steps": 1}, text=True, epochs=10)  # its rule was measured without one
    # 10 images a class, 64 px, 3 epochs (12 steps), 3 seeds: probed 62.07 %, from the trial 70.39 %
    lines = []
    assert not auto.few_shot({"steps": 2}, text=False, epochs=3, echo=lines.append)
    assert lines == ["auto: a trial of 2 steps is short for a new head, but a run of about 12 steps is too short to "
                     "move from a probed one (under 30): it starts from its trial"]  # fmt: skip


def test_an_auto_run_resumed_counts_its_trials_seconds_as_an_uninterrupted_one_does(data, tmp_path, monkeypatch):
    # a sweep resumed inside its auto recipe listed it at the final run's seconds: the trials' time went uncounted
    from freezetune.progress import RunResult

    monkeypatch.setattr(auto, "PROBE_BELOW_STEPS", 10)  # the trials take 3 steps: a probe too
    monkeypatch.setattr(auto, "PROBE_MIN_RUN_STEPS", 0)  # however short the run

    def timed(cfg, echo, recipe_run=False):
        return RunResult(Path(cfg.out), 1, 0.5, seconds={"cache": 1.0, "epochs": 10.0, "val": 3.0})

    auto.run(_cfg(data, tmp_path / "run", epochs=1), echo=lambda _: None)
    decision = json.loads((tmp_path / "run" / "recipe.json").read_text())
    trials = [*decision["trials"], decision["probe"]]  # a few-shot run's probe is part of its cost too
    resumed = auto.run(_cfg(data, tmp_path / "run", epochs=1, resume=True), echo=lambda _: None, train=timed)
    assert decision["probe"] and all(t["seconds"]["epochs"] > 0 for t in trials)
    assert resumed.seconds["epochs"] == pytest.approx(10.0 + sum(t["seconds"]["epochs"] for t in trials))
    assert resumed.seconds["cache"] == pytest.approx(1.0 + sum(t["seconds"]["cache"] for t in trials))


def test_an_auto_run_whose_start_weights_are_gone_before_its_first_save_says_to_redo_the_trials(data, tmp_path):
    # killed before the run saved last.pt, its trials' folder deleted: the resume failed on "checkpoint ... does not
    # exist", which named no way on
    import shutil

    auto.run(_cfg(data, tmp_path / "run", epochs=1), echo=lambda _: None)
    init = json.loads((tmp_path / "run" / "recipe.json").read_text())["choice"]["init"]
    assert init and Path(init).is_file()
    (tmp_path / "run" / checkpoint.LAST).unlink()
    shutil.rmtree(tmp_path / "run" / "auto-trials")
    with pytest.raises(
        ConfigError, match="are gone and the run saved no last.pt yet; run the command without --resume"
    ):
        auto.run(_cfg(data, tmp_path / "run", epochs=1, resume=True), echo=lambda _: None)


@pytest.mark.parametrize("refit", [None, False])
def test_auto_measures_on_the_validation_split_and_keeps_its_evidence(data, tmp_path, monkeypatch, refit):
    from freezetune import trainer
    from freezetune.cache import path as feature_path

    evaluated = []
    real = feature_path.evaluate

    def spy(module, batches, *args, **kw):  # every validation of every trial and of the final run
        result = real(module, batches, *args, **kw)
        evaluated.append(result["n"])
        return result

    monkeypatch.setattr(feature_path, "evaluate", spy)
    monkeypatch.setattr(auto, "MIN_VAL_TO_COMPARE", 3)  # every candidate's trial, on the 3 held-out images
    monkeypatch.setattr(auto, "MIN_TRIAL_STEPS", 1)  # (of a step or two each)
    monkeypatch.setattr(auto, "PROBE_BELOW_STEPS", 1)  # the run starts from its trial (a probed head: tested below)
    saved_last = []
    real_submit = checkpoint.Writer.submit

    def submit(writer, *, best, last):  # every save of every trial and of the final run
        if last is not None:
            saved_last.append(writer.run_dir / checkpoint.LAST)
        real_submit(writer, best=best, last=last)

    monkeypatch.setattr(checkpoint.Writer, "submit", submit)
    lines = []
    result = trainer.train(_cfg(data, tmp_path / "auto", cache="auto", refit=refit), echo=lines.append)
    # a trial is never resumed: it writes no last.pt (the largest file, with the optimizer's state); the run does
    assert saved_last == [tmp_path / "auto" / checkpoint.LAST] * 2
    # the stage table twice (the default's trial, the run); the other trials name what they train in one line
    assert sum("trainable  bn" in line for line in lines) == 2
    assert sum("parameters trainable: blocks." in line for line in lines) == 2
    recipe = json.loads((tmp_path / "auto" / "recipe.json").read_text())
    assert [t["trained_stages"] for t in recipe["trials"]] == [2, 3, 4]
    assert all(0 <= t["val_acc"] <= 1 and sum(t["seconds"].values()) > 0 for t in recipe["trials"])
    choice = recipe["choice"]
    assert choice["freeze"] == -(choice["trained_stages"] + 1) and choice["epochs"] == 2 and choice["why"]
    # three validation images cannot overturn the default of training the last three stages
    assert [t["n_val"] for t in recipe["trials"]] == [3, 3, 3] and choice["trained_stages"] == 3
    assert [t["lr"] for t in recipe["trials"]] == pytest.approx([1e-2, 2e-2 / 3, 5e-3])  # lr * 10 * min(1, 2 / k)
    final = checkpoint.load(tmp_path / "auto" / "last.pt")
    assert final["config"]["freeze"] == choice["freeze"] and final["config"]["lr"] == choice["run_lr"]
    assert choice["run_lr"] == pytest.approx(choice["lr"] * auto.RUN_LR_FACTOR) and auto.RUN_LR_FACTOR < 1
    # the run starts from the chosen trial's weights; the other trials' weights are gone, their metrics kept
    trials = tmp_path / "auto" / "auto-trials"
    assert final["config"]["init"] == choice["init"] == str(trials / "last-3" / "best.pt")
    assert (trials / "last-3" / "best.pt").is_file()
    assert not any((trials / f"last-{k}" / name).exists() for k in (2, 4) for name in ("best.pt", "last.pt"))
    # nor a chart of each trial's one short epoch (half a second each); the run's own is drawn
    assert not list(trials.glob("*/report.png")) and (tmp_path / "auto" / "report.png").is_file()
    assert final["epoch"] == 2 and result.run_dir == tmp_path / "auto"
    # 3 trials of one epoch, each scored on the 3 held-out images; the 12 test images once, at the end. By default
    # the chosen run then trains on those 3 images too (refit: no validation); with refit off it validates on them
    assert choice["refit"] is (refit is None) and result.test["n"] == 12
    if refit is None:
        assert evaluated == [3] * 3 and result.best_metric is None
        assert any("42 train images" in line for line in lines)  # the 39 the trials trained on + the 3 held out
        assert any("validation: none: the 3 images held out for validation train too" in line for line in lines)
    else:
        assert evaluated == [3] * 5 and any("39 train images" in line for line in lines)
    assert any("auto: chose to train the last" in line for line in lines)
    # how much each trial trained is said beside its score and in the reason for the choice (a trial of one step
    # favours the highest learning rate): 20 of the 39 images in batches of 8
    steps = {t["steps"] for t in recipe["trials"]}
    assert steps == {3}
    assert sum(" after 3 steps (" in line for line in lines if line.startswith("auto: last ")) == 3
    assert "(each trial: 3 steps)" in choice["why"]
    # one cache for all candidates and the run: built by the first trial, read back by the others (the refit run
    # reads the trials' training and validation stores one after the other)
    caches = [line for line in lines if "feature cache:" in line]
    assert len(caches) == 4 and "built" in caches[0] and all("read from" in line for line in caches[1:])
    (trial,) = read_metrics(trials / "last-2" / "metrics.csv")
    assert round(trial["img_per_s"] * trial["epoch_time_s"]) == 20  # a trial trains on half of the 39 images
    assert result.seconds["cache"] > 0 and result.seconds["epochs"] > 0


def test_an_unfreeze_plan_naming_no_stage_is_refused_before_the_auto_recipes_trials(data, tmp_path):
    # it was found by the final run, after the trials, with auto-trials/, features/ and recipe.json left behind
    with pytest.raises(FreezetuneError, match="'layer9'"):
        auto.run(_cfg(data, tmp_path / "r", unfreeze="{1: layer9}"), echo=lambda _: None)
    assert not (tmp_path / "r").exists()  # refused before the run dir was made


@pytest.mark.parametrize("body, ks", [(1, [1]), (2, [1]), (3, [2]), (4, [2, 3]), (5, [2, 3, 4]), (9, [2, 3, 4])])
def test_auto_candidates_on_models_with_few_stages_train_at_least_one(monkeypatch, request, body, ks):
    # a model of one stage and a head gave k = 0 and a ZeroDivisionError in the candidate's LR
    from torch import nn

    from freezetune import models, recipes

    layers = [m for _ in range(body) for m in (nn.Linear(4, 4), nn.ReLU())] + [nn.Linear(4, 2)]
    monkeypatch.setattr(models, "create_model", lambda *a, **k: (nn.Sequential(*layers), None))
    recipes.structure.cache_clear()  # built once a process per model name: here the name stays, the model changes
    request.addfinalizer(recipes.structure.cache_clear)  # and the fake must not stay for the tests after
    got, cut, _ = auto_rule.candidates(TrainConfig(data="images"))
    assert got == ks and all(auto_rule.candidate_lr(1e-3, k) > 0 for k in got)
    assert cut == str(2 * (body - max(ks)))  # the stage the deepest candidate trains from


def test_auto_on_a_validation_split_too_small_to_compare_runs_only_the_default_trial(data, tmp_path, monkeypatch):
    monkeypatch.setattr(auto, "PROBE_BELOW_STEPS", 1)  # the run starts from its trial (a probed head: tested below)
    lines = []
    result = auto.run(_cfg(data, tmp_path / "auto", cache="auto"), echo=lines.append)
    recipe = json.loads((tmp_path / "auto" / "recipe.json").read_text())
    (trial,) = recipe["trials"]
    assert trial["trained_stages"] == recipe["choice"]["trained_stages"] == auto.DEFAULT_TRAINED_STAGES
    assert trial["n_val"] == 3 < auto.MIN_VAL_TO_COMPARE
    assert "3 validation images cannot tell the candidates apart" in recipe["choice"]["why"]
    assert any("cannot tell the candidates apart" in line for line in lines)
    trials = tmp_path / "auto" / "auto-trials"
    assert sorted(p.name for p in trials.iterdir()) == ["last-3"]
    assert recipe["choice"]["init"] == str(trials / "last-3" / "best.pt")  # its trial still starts the run
    assert checkpoint.load(tmp_path / "auto" / "last.pt")["epoch"] == 2 and result.test["n"] == 12


def test_a_two_phase_recipe_without_out_keeps_its_phases_in_one_run_dir(data, tmp_path, monkeypatch):
    # without --out, lp-ft's probe and fine-tune made two unrelated runs/ dirs and no log held the phase lines
    from freezetune.trainer import train

    monkeypatch.chdir(tmp_path)
    result = train(dataclasses.replace(_cfg(data, None, recipe="lp-ft", epochs=1), out=None), echo=lambda _: None)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert result.run_dir.resolve() == run_dir.resolve() and (run_dir / "probe" / "best.pt").is_file()
    assert "recipe lp-ft: phase 1/2 (probe)" in (run_dir / "train.log").read_text()
    assert load_config(run_dir / "config.yaml").init == str((run_dir / "probe" / "best.pt").resolve())


def test_epoch_images_makes_the_runs_epochs_and_the_auto_recipes_trials_shorter(data, tmp_path):
    # a large training set: --epoch-images 10 trains 10 random images an epoch, and a trial half of one such epoch
    # (the trials took half the training set, whatever the epoch)
    lines = []
    auto.run(_cfg(data, tmp_path / "auto", epochs=2, cache="auto", refit=False, epoch_images=10), echo=lines.append)
    assert "a trial each on 50% of an epoch's training images" in lines[0]
    assert any(" train images (10 an epoch), 3 classes" in line for line in lines)  # the run's header
    assert any(" train images (5 an epoch), 3 classes" in line for line in lines)  # the trial's

    def samples(run_dir: Path) -> list[int]:
        return [round(row["img_per_s"] * row["epoch_time_s"]) for row in read_metrics(run_dir / "metrics.csv")]

    assert samples(tmp_path / "auto") == [10, 10]
    assert samples(tmp_path / "auto" / "auto-trials" / "last-3") == [5]


def test_sweep_compares_recipes_reuses_features_and_its_winner_reproduces(data, tmp_path, capsys, monkeypatch):
    from freezetune.cache import store

    prefix_calls = []
    real = store.prefix_features
    monkeypatch.setattr(store, "prefix_features", lambda *a, **kw: prefix_calls.append(1) or real(*a, **kw))
    recipes = "linear-probe,last-2,full"
    code, out, err = run_cli(capsys, "sweep", *train_argv(data, tmp_path / "sweep", "--cache", "auto")[1:],
                             "--recipes", recipes)  # fmt: skip
    assert code == 0, err
    rows = list(read_metrics(tmp_path / "sweep" / "sweep.csv"))
    assert [r["recipe"] for r in rows] == recipes.split(",")
    assert all(0 <= r["val_acc"] <= 1 and r["train_s"] > 0 and r["trainable_params"] > 0 for r in rows)
    assert rows[0]["trainable_params"] < rows[1]["trainable_params"] < rows[2]["trainable_params"]
    assert not any("detail" in r for r in rows)  # a named recipe's row has nothing to add
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0 and "winner:" in out
    assert not any((tmp_path / "sweep" / r["recipe"] / "test_metrics.json").exists() for r in rows)  # no test score
    # the sweep's log keeps every line it printed (its recipes' too), and each recipe's dir its own train.log
    logged = [line.split("  ", 1)[1] for line in (tmp_path / "sweep" / "sweep.log").read_text().splitlines()[1:]]
    assert [line for line in logged if not line.startswith("WARNING ")] == out.splitlines()  # (warnings: stderr's)
    assert all((tmp_path / "sweep" / r["recipe"] / "train.log").is_file() for r in rows)
    first = len(prefix_calls)
    assert first > 0
    # a second sweep with the same feature directory computes no prefix output at all
    features = tmp_path / "sweep" / "features"
    code, _, err = run_cli(capsys, "sweep", *train_argv(data, tmp_path / "again", "--cache", "auto")[1:],
                           "--recipes", "linear-probe,last-2", "--cache-dir", str(features))  # fmt: skip
    assert code == 0, err
    assert len(prefix_calls) == first
    # the winner's config trains the same run again: same validation accuracy
    winner = yaml.safe_load((tmp_path / "sweep" / "winner.yaml").read_text())
    best = max(rows, key=lambda r: (r["val_acc"], -r["train_s"]))
    assert winner["recipe"] == best["recipe"] and winner["final_test"]
    code, _, err = run_cli(capsys, "train", "--config", tmp_path / "sweep" / "winner.yaml", "--out", tmp_path / "w")
    assert code == 0, err
    again = max(r["val_acc"] for r in read_metrics(tmp_path / "w" / "metrics.csv"))
    assert again == pytest.approx(best["val_acc"], abs=1e-9)


def test_an_auto_winner_reproduces_its_validation_score_and_keeps_the_measured_batch_size(data, tmp_path, capsys):
    # the auto recipe refits by default and --batch-size auto is measured per device: the winner's YAML pins both to
    # the run the sweep scored
    code, _, err = run_cli(capsys, "sweep", *train_argv(data, tmp_path / "sweep", "--batch-size", "auto")[1:],
                           "--recipes", "auto")  # fmt: skip
    assert code == 0, err
    (row,) = read_metrics(tmp_path / "sweep" / "sweep.csv")
    winner = yaml.safe_load((tmp_path / "sweep" / "winner.yaml").read_text())
    assert winner["recipe"] == "auto" and winner["refit"] is False
    assert "auto: chose" in (tmp_path / "sweep" / "auto" / "train.log").read_text()  # the recipe's log has its choice
    # and its row: beside a last-k row that trains the same stages at another LR, it read as another freeze choice
    choice = json.loads((tmp_path / "sweep" / "auto" / "recipe.json").read_text())["choice"]
    assert row["detail"].startswith(f"chose last-{choice['trained_stages']} at lr {choice['run_lr']:.1e}"), row
    assert winner["batch_size"] == load_config(tmp_path / "sweep" / "auto" / "config.yaml").batch_size
    assert isinstance(winner["batch_size"], int)
    code, _, err = run_cli(capsys, "train", "--config", tmp_path / "sweep" / "winner.yaml", "--out", tmp_path / "w")
    assert code == 0, err
    again = max(r["val_acc"] for r in read_metrics(tmp_path / "w" / "metrics.csv"))
    assert again == pytest.approx(row["val_acc"], abs=1e-9)


def test_the_default_run_works_under_python_OO_which_strips_docstrings(data, tmp_path):
    # recipe.json's procedure is the auto module's docstring: under -OO the run crashed after its trials (None.split)
    argv = train_argv(data, tmp_path / "run", "--epochs", "1")
    done = subprocess.run([sys.executable, "-OO", "-m", "freezetune", *map(str, argv)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "docstring" in json.loads((tmp_path / "run" / "recipe.json").read_text())["procedure"]


def test_the_sweep_plot_rings_each_point_of_the_pareto_front_even_a_front_of_one():
    # the front was a dashed line through its points: a recipe both fastest and most accurate drew nothing
    from freezetune.sweep_report import _figure

    def row(name, acc, seconds):
        return {"recipe": name, "val_acc": acc, "train_s": seconds}

    for rows, front in [([row("linear-probe", 0.9, 1.0), row("full", 0.8, 9.0)], [(1.0, 90.0)]),
                        ([row("linear-probe", 0.7, 1.0), row("full", 0.8, 9.0)], [(1.0, 70.0), (9.0, 80.0)])]:  # fmt: skip
        ax = _figure(rows, "linear-probe").axes[0]
        handles, labels = ax.get_legend_handles_labels()
        ringed = handles[labels.index("Pareto front")].get_offsets().tolist()
        assert sorted(map(tuple, ringed)) == front


def test_sweep_reads_a_comma_separated_string_as_recipe_names(tmp_path):
    from freezetune.sweep import sweep

    with pytest.raises(ConfigError, match="unknown recipe 'lastk'"):  # it read 'l', the first letter
        sweep(TrainConfig(data="images"), "linear-probe, lastk", out=tmp_path / "s")


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


def test_a_recipe_given_under_two_names_is_refused_as_given_twice():
    # last-k is last-2: the sweep trained it twice, into two folders, as two rows
    from freezetune.sweep import recipe_names

    with pytest.raises(ConfigError, match=r"recipe\(s\) given twice: 'last-2', 'last-k'"):
        recipe_names("last-k,full,last-2")
    assert recipe_names("last-k,last-3") == ["last-k", "last-3"]


def test_a_resumed_sweep_keeps_the_measured_seconds_of_the_recipes_finished_before(data, tmp_path, monkeypatch):
    from freezetune import recipes
    from freezetune.sweep import sweep

    real, measured, stopped = recipes.run, {}, []

    def interrupted_at_last_2(cfg, echo):
        if cfg.recipe == "last-2" and not stopped:
            stopped.append(cfg.recipe)
            raise KeyboardInterrupt  # Ctrl-C while the second recipe trains
        result = real(cfg, echo=echo)
        measured.setdefault(cfg.recipe, result.train_seconds)
        return result

    monkeypatch.setattr(recipes, "run", interrupted_at_last_2)
    cfg = _cfg(data, None, epochs=1, cache="off")
    with pytest.raises(KeyboardInterrupt):
        sweep(cfg, "linear-probe,last-2", out=tmp_path / "sweep", echo=lambda _: None)
    resumed = sweep(TrainConfig(**{**cfg.to_dict(), "resume": True}), "linear-probe,last-2", out=tmp_path / "sweep",
                    echo=lambda _: None)  # fmt: skip
    rows = {r["recipe"]: r for r in read_metrics(tmp_path / "sweep" / "sweep.csv")}
    assert rows["linear-probe"]["train_s"] == pytest.approx(measured["linear-probe"], rel=1e-6)
    assert [r["train_s"] for r in resumed.rows] == [measured["linear-probe"], measured["last-2"]]


def test_a_sweep_resumes_from_its_out_alone_with_its_own_settings_and_recipes(data, tmp_path, capsys, monkeypatch):
    # "sweep --out S --resume" said "data is required": unlike train's, a sweep's resume needed its whole command
    real, stopped = recipes.run, []

    def interrupted_at_last_2(cfg, echo):
        if cfg.recipe == "last-2" and not stopped:
            stopped.append(cfg.recipe)
            raise KeyboardInterrupt  # Ctrl-C while the second recipe trains
        return real(cfg, echo=echo)

    monkeypatch.setattr(recipes, "run", interrupted_at_last_2)
    out = tmp_path / "sweep"
    argv = train_argv(data, out, "--epochs", "1", "--cache", "off", "--label-smoothing", "0.2", "--budget", "1h")[1:]
    code, _, _ = run_cli(capsys, "sweep", *argv, "--recipes", "linear-probe,last-2")
    assert code == 130 and stopped
    code, said, err = run_cli(capsys, "sweep", "--out", out, "--resume")
    assert code == 0, err
    rows = read_metrics(out / "sweep.csv")
    assert [r["recipe"] for r in rows] == ["linear-probe", "last-2"]
    for recipe in ("linear-probe", "last-2"):  # the recipe interrupted ran again with the sweep's settings, those a
        ran = yaml.safe_load((out / recipe / "config.yaml").read_text())  # resume may change (--no-progress) too
        got = (ran["label_smoothing"], ran["epochs"], ran["data"], ran["progress"])
        assert got == (0.2, 1, str(data.resolve()), False), recipe
    assert yaml.safe_load((out / "sweep_config.yaml").read_text())["budget"] == "1h"
    code, _, err = run_cli(capsys, "sweep", "--out", out, "--resume", "--label-smoothing", "0")  # its settings alone
    assert code == 2 and "label_smoothing 0.2 -> 0.0" in err
    code, _, err = run_cli(capsys, "sweep", "--out", tmp_path / "none", "--resume")
    assert code == 2 and err.strip() == (f"freezetune: error: cannot resume: '{tmp_path / 'none'}' holds no sweep "
                                         "(sweep_config.yaml); give the sweep's --out (out=...) or its whole command")  # fmt: skip
    # a budget given with a resume is the one it runs with: recorded for the next (the file kept saying 1h)
    code, _, err = run_cli(capsys, "sweep", "--out", out, "--resume", "--budget", "2h")
    assert code == 0, err
    settings = yaml.safe_load((out / "sweep_config.yaml").read_text())
    assert settings["budget"] == "2h" and settings["label_smoothing"] == 0.2


def test_a_sweep_refuses_cache_at_in_one_line_and_a_stop_before_it_recorded_anything_promises_no_resume(
    tmp_path, capsys
):
    # --cache-at was checked as an auto run's ("needs a freeze spec"), and a freeze spec given then was refused too
    import argparse

    from freezetune import cli

    code, _, err = run_cli(capsys, "sweep", "--data", tmp_path, "--cache-at", "blocks.3", "--out", tmp_path / "s")
    assert code == 2 and err.strip() == ("freezetune: error: sweep: cache_at 'blocks.3': each recipe caches where "
                                         "what it freezes allows (the auto recipe before its deepest candidate)")  # fmt: skip
    # Ctrl-C before the sweep recorded its settings said "--resume continues the sweep", and the resume was refused
    assert "the same command starts it" in cli._saved(argparse.Namespace(command="sweep", out=str(tmp_path / "s")))
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep_config.yaml").write_text("lr: 0.001\n")
    assert cli._saved(argparse.Namespace(command="sweep", out=str(tmp_path / "s"))) == "--resume continues the sweep"


def test_a_sweep_stopped_in_an_auto_trial_says_to_resume_it_and_resumes(data, tmp_path, monkeypatch):
    # the trial's advice, "the same command, with or without --resume", was refused for a sweep: a recipe had trained
    import signal

    from freezetune import trainer
    from freezetune.interrupt import RunInterrupted
    from freezetune.sweep import sweep

    real = trainer.train

    def stopped_in_a_trial(cfg, **kw):
        if "auto-trials" in cfg.out:
            raise RunInterrupted.by(signal.SIGINT, "at once (nothing saved); the same command restarts it")
        return real(cfg, **kw)

    cfg = _cfg(data, None, epochs=1, cache="off")
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "train", stopped_in_a_trial)
        with pytest.raises(RunInterrupted) as stop:
            sweep(cfg, "linear-probe,auto", out=tmp_path / "sweep", echo=lambda _: None)
    assert str(stop.value) == (
        "stopped by SIGINT during the trial of the last 3 stage(s) (trials are not resumed) in recipe auto; continue "
        "the sweep with its command and --resume (the recipes it finished keep their rows)"
    )
    assert stop.value.exit_code == 130
    with pytest.raises(ConfigError, match="holds a sweep that did not finish"):
        sweep(cfg, "linear-probe,auto", out=tmp_path / "sweep", echo=lambda _: None)
    resumed = sweep(dataclasses.replace(cfg, resume=True), "linear-probe,auto", out=tmp_path / "sweep",
                    echo=lambda _: None)  # fmt: skip
    assert [r["recipe"] for r in resumed.rows] == ["linear-probe", "auto"]


def test_a_row_an_earlier_sweep_kept_without_val_f1_reads_it_from_its_runs_metrics(data, tmp_path):
    # its table printed nan% and sweep.csv held nan for a recipe whose metrics.csv had the score
    from freezetune.sweep import ROW_FILE, sweep

    cfg = _cfg(data, None, epochs=1, cache="off")
    first = sweep(cfg, "linear-probe", out=tmp_path / "sweep", echo=lambda _: None).rows[0]
    saved = Path(first["run_dir"]) / ROW_FILE
    saved.write_text(json.dumps({k: v for k, v in json.loads(saved.read_text()).items() if k != "val_f1"}))
    (tmp_path / "sweep" / "sweep.csv").unlink()  # as a sweep stopped before its table
    resumed = sweep(TrainConfig(**{**cfg.to_dict(), "resume": True}), "linear-probe", out=tmp_path / "sweep",
                    echo=lambda _: None)  # fmt: skip
    assert 0 <= resumed.rows[0]["val_f1"] == first["val_f1"] <= 1


def test_a_sweep_stopped_before_its_auto_recipe_began_resumes_through_it(data, tmp_path, monkeypatch):
    # the resumed sweep asked the auto recipe to resume a run dir never made: "cannot resume: '.../auto' does not
    # exist", and the sweep ended there (auto is in the default --recipes)
    from freezetune import recipes
    from freezetune.sweep import sweep

    real, stopped = recipes.run, []

    def stopped_before_auto(cfg, echo):
        if cfg.recipe == "auto" and not stopped:
            stopped.append(cfg.recipe)
            raise KeyboardInterrupt  # Ctrl-C between two recipes
        return real(cfg, echo=echo)

    monkeypatch.setattr(recipes, "run", stopped_before_auto)
    cfg = _cfg(data, None, epochs=1, cache="off")
    with pytest.raises(KeyboardInterrupt):
        sweep(cfg, "linear-probe,auto", out=tmp_path / "sweep", echo=lambda _: None)
    assert not (tmp_path / "sweep" / "auto").exists()
    resumed = sweep(TrainConfig(**{**cfg.to_dict(), "resume": True}), "linear-probe,auto", out=tmp_path / "sweep",
                    echo=lambda _: None)  # fmt: skip
    assert [r["recipe"] for r in resumed.rows] == ["linear-probe", "auto"]
    assert (tmp_path / "sweep" / "auto" / "best.pt").is_file()


@pytest.mark.parametrize(
    ("recipes", "needle"), [("last-2,last-2", "given twice: 'last-2'"), ("", "no recipe to sweep")]
)
def test_sweep_refuses_a_repeated_or_empty_recipe_list_before_training(data, tmp_path, capsys, recipes, needle):
    code, out, err = run_cli(capsys, "sweep", *train_argv(data, tmp_path / "sweep")[1:], "--recipes", recipes)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("flag", ["--data", "--val-data"])
def test_a_sweep_on_data_that_does_not_exist_is_one_line_and_leaves_no_folder(data, tmp_path, capsys, flag):
    # it said "sweep: recipe linear-probe" and the recipe's phase before the error, and left sweep.log and its config
    code, out, err = run_cli(capsys, "sweep", *train_argv(data, tmp_path / "sweep")[1:], flag, tmp_path / "nope",
                             "--recipes", "linear-probe")  # fmt: skip
    assert code == 2 and f"path '{tmp_path / 'nope'}' does not exist" in err and len(err.strip().splitlines()) == 1
    assert not out.strip() and not (tmp_path / "sweep").exists()


def test_sweep_refuses_an_option_one_of_its_recipes_sets_itself(data, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sweep", *train_argv(data, tmp_path / "sweep", "--unfreeze", "epoch:2")[1:],
                           "--recipes", "linear-probe,gradual")  # fmt: skip
    assert code == 2 and "recipe 'gradual' sets unfreeze itself" in err and "recipe 'linear-probe'" in err
    assert not (tmp_path / "sweep").exists()


def test_a_sweeps_bn_applies_to_its_recipes_but_linear_probe_which_trains_the_head_alone(tmp_path):
    from freezetune.sweep import _run_configs

    runs = _run_configs(TrainConfig(data="d", bn="affine-only"), ["linear-probe", "last-2", "auto"], tmp_path)
    assert {name: run.bn for name, run in runs.items()} == {"linear-probe": "frozen", "last-2": "affine-only",
                                                            "auto": "affine-only"}  # fmt: skip


def test_a_sweeps_budget_counts_each_second_once_and_its_winner_names_absolute_paths(tmp_path, monkeypatch):
    from freezetune import sweep as sweep_mod
    from freezetune import sweep_report

    ran = []

    def fake(name, cfg, echo, info, clock=None):  # a recipe that reports 6 s of training and takes none
        ran.append(name)
        row = {"recipe": name, "val_acc": 0.5 + 0.1 * len(ran), "train_s": 6.0, "peak_mem_mb": None,
               "trainable_params": 10, "best_epoch": 1, "run_dir": str(tmp_path / name)}  # fmt: skip
        return row, False

    monkeypatch.setattr(sweep_mod, "_run_recipe", fake)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()  # a data path that exists (the sweep checks it first)
    result = sweep_mod.sweep(TrainConfig(data="images", budget="10s"), "full,linear-probe,last-2", out="s",
                             echo=lambda line: None)  # fmt: skip
    # the clock had already counted what was trained: adding train_s again skipped last-2 after 12 "seconds"
    assert ran == ["full", "linear-probe", "last-2"] and result.winner == "last-2"
    winner = yaml.safe_load((tmp_path / "s" / "winner.yaml").read_text())
    assert winner["data"] == str(tmp_path / "images")  # it was "images": train --config from elsewhere failed
    assert "       -" in sweep_report.format_table(result.rows, result.winner)  # no CPU peak: not one per recipe


def test_a_recipe_the_budget_skipped_is_listed_as_skipped_not_left_out(tmp_path, monkeypatch):
    # the table and sweep.csv listed linear-probe alone, "winner" of a comparison that never happened
    from freezetune import sweep as sweep_mod

    def fake(name, cfg, echo, info, clock=None):  # read back from an earlier attempt: its 6 s count against the budget
        row = {"recipe": name, "val_acc": 0.5, "train_s": 6.0, "peak_mem_mb": None, "trainable_params": 10,
               "best_epoch": 1, "run_dir": str(tmp_path / name)}  # fmt: skip
        return row, True

    monkeypatch.setattr(sweep_mod, "_run_recipe", fake)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()  # a data path that exists (the sweep checks it first)
    lines = []
    result = sweep_mod.sweep(TrainConfig(data="images", budget="10s"), "linear-probe,last-2,full", out=tmp_path / "s",
                             echo=lines.append)  # fmt: skip
    assert result.skipped == ["full"] and [r["recipe"] for r in result.rows] == ["linear-probe", "last-2"]
    lines = [line for said in lines for line in said.splitlines()]  # the table is said at once
    rows = read_metrics(tmp_path / "s" / "sweep.csv")
    assert rows[-1] == {"recipe": "full", "detail": "skipped: budget 10s spent"}
    assert any(line.startswith("full ") and line.endswith("  skipped: budget 10s spent") for line in lines), lines
    assert any(line.startswith("winner: linear-probe, by val acc (2 of 3 recipes ran: the budget was spent before "
                               "full)") for line in lines), lines  # fmt: skip


def test_a_resumed_sweep_goes_on_with_what_its_budget_had_left_not_with_its_rows_training_seconds(
    tmp_path, monkeypatch
):
    # a resume counted the rows' training seconds alone (not their set-up, cache builds, validation): each plain
    # --resume of a sweep its budget had cut short trained one more recipe
    from freezetune import sweep as sweep_mod

    now, saved, ran = [0.0], {}, []
    monkeypatch.setattr(sweep_mod.time, "perf_counter", lambda: now[0])

    def fake(name, cfg, echo, info, clock=None):  # 4 s a recipe, 2 of them training; a resume reads it back
        if name in saved:
            return saved[name], True
        ran.append(name)
        now[0] += 4.0
        saved[name] = {"recipe": name, "val_acc": 0.5, "val_f1": 0.5, "train_s": 2.0, "peak_mem_mb": None,
                       "trainable_params": 10, "best_epoch": 1, "run_dir": str(tmp_path / name),
                       "sweep_s": clock.spent()}  # fmt: skip
        return saved[name], False

    monkeypatch.setattr(sweep_mod, "_run_recipe", fake)
    (tmp_path / "images").mkdir()
    cfg = TrainConfig(data=str(tmp_path / "images"), budget="6s")
    first = sweep_mod.sweep(cfg, "linear-probe,last-2,full", out=tmp_path / "s", echo=lambda line: None)
    assert ran == ["linear-probe", "last-2"] and first.skipped == ["full"]
    now[0] = 1000.0  # another process, later
    again = sweep_mod.sweep(dataclasses.replace(cfg, resume=True), "linear-probe,last-2,full", out=tmp_path / "s",
                            echo=lambda line: None)  # fmt: skip
    assert ran == ["linear-probe", "last-2"] and again.skipped == ["full"] and again.winner == first.winner
    clock = sweep_mod._SweepClock()  # a row an earlier freezetune wrote has no sweep_s: its training seconds count
    clock.read_back({"train_s": 2.0})
    assert clock.spent() == 2.0


def test_a_sweeps_batchnorm_setting_its_recipes_do_not_use_is_said(tmp_path, monkeypatch):
    # --bn train beside linear-probe and lp-ft (which set their own) and full changed nothing, unsaid
    from freezetune import sweep as sweep_mod

    def fake(name, cfg, echo, info, clock=None):
        row = {"recipe": name, "val_acc": 0.5, "val_f1": 0.5, "train_s": 1.0, "peak_mem_mb": None,
               "trainable_params": 10, "best_epoch": 1, "run_dir": str(tmp_path / name)}  # fmt: skip
        return row, False

    monkeypatch.setattr(sweep_mod, "_run_recipe", fake)
    (tmp_path / "images").mkdir()
    lines = []
    cfg = TrainConfig(data=str(tmp_path / "images"), bn="train", bn_stats="frozen")
    sweep_mod.sweep(cfg, "linear-probe,lp-ft,last-2,full", out=tmp_path / "s", echo=lines.append)
    said = (
        "sweep: note: bn 'train' changes nothing in linear-probe, lp-ft (they set their own) and full (no "
        "BatchNorm layer frozen whole)"
    )
    assert said in lines, lines
    assert "sweep: note: bn_stats 'frozen' changes nothing in lp-ft (it sets its own)" in lines, lines
    lines.clear()
    sweep_mod.sweep(TrainConfig(data=str(tmp_path / "images")), "linear-probe,full", out=tmp_path / "t",
                    echo=lines.append)  # fmt: skip
    assert not any("sweep: note:" in line for line in lines)  # the defaults: nothing asked, nothing to say


def test_a_sweep_row_names_its_run_absolutely_and_counts_the_best_epochs_trainable_parameters(tmp_path, monkeypatch):
    # resumed from another directory, a row's relative run_dir named nothing: winner.yaml kept batch_size auto; and
    # gradual's row paired its best epoch's scores with its last epoch's (larger) trainable count
    from freezetune import sweep as sweep_mod
    from freezetune.progress import RunResult

    history = [
        {"epoch": 1, "trainable_params": 10, "val_acc": 0.7},
        {"epoch": 2, "trainable_params": 30, "val_acc": 0.6},
    ]
    monkeypatch.chdir(tmp_path)
    row = sweep_mod._row("gradual", RunResult(Path("s/gradual"), 1, 0.7, history=history), cuda=False)
    assert row["trainable_params"] == 10 and row["run_dir"] == str(tmp_path / "s" / "gradual")
    (tmp_path / "s" / "gradual").mkdir(parents=True)
    (tmp_path / "s" / "gradual" / "row.json").write_text(json.dumps({**row, "run_dir": "s/gradual", "detail": ""}))
    monkeypatch.chdir(tmp_path / "s")  # where the earlier row's relative path names nothing
    assert sweep_mod._read_back(tmp_path / "s" / "gradual" / "row.json")["run_dir"] == str(tmp_path / "s" / "gradual")


def test_an_auto_row_an_earlier_freezetune_wrote_is_read_back_with_what_it_chose(tmp_path):
    # a sweep resumed across versions: its auto row had no detail, and the table's last column stayed blank
    from freezetune import sweep as sweep_mod

    run = tmp_path / "auto"
    run.mkdir()
    trial = run / "auto-trials" / "last-3" / "best.pt"
    choice = {"trained_stages": 3, "lr": 6.7e-3, "init": str(trial)}  # an earlier recipe.json: no run_lr
    (run / "recipe.json").write_text(json.dumps({"choice": choice}))
    row = {"recipe": "auto", "val_acc": 0.5, "val_f1": 0.4, "train_s": 1.0, "peak_mem_mb": None,
           "trainable_params": 10, "best_epoch": 1, "run_dir": str(run)}  # fmt: skip
    (run / sweep_mod.ROW_FILE).write_text(json.dumps(row))
    said = sweep_mod._read_back(run / sweep_mod.ROW_FILE)["detail"]
    assert said == "chose last-3 at lr 6.7e-03, from its trial's weights"
    (run / "recipe.json").write_text(json.dumps({"choice": {**choice, "init": "/mine/init.pt", "run_lr": 3.3e-3}}))
    assert sweep_mod._read_back(run / sweep_mod.ROW_FILE)["detail"] == "chose last-3 at lr 3.3e-03"  # not the trial's
    probed = {**choice, "init": str(run / "auto-trials" / "probe" / "best.pt"), "run_lr": 1e-3}  # few images
    (run / "recipe.json").write_text(json.dumps({"choice": probed}))  # it said "from its trial's weights"
    assert (
        sweep_mod._read_back(run / sweep_mod.ROW_FILE)["detail"] == "chose last-3 at lr 1.0e-03, from the probed head"
    )


def test_a_sweeps_last_k_past_the_models_stages_is_refused_before_anything_trains(tmp_path, monkeypatch):
    from freezetune import sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "_run_recipe", lambda *a: pytest.fail("a recipe trained"))
    with pytest.raises(ConfigError, match=r"recipe 'last-99': k is out of range .* choose last-1 to last-"):
        sweep_mod.sweep(TrainConfig(data="images", model="timm:test_efficientnet"), "full,last-99", out=tmp_path / "s")


def test_a_models_stages_are_built_once_for_all_the_last_k_checks_and_the_auto_plan(monkeypatch):
    # a sweep checks each last-k before anything trains and recipes.run checks again, and the auto recipe plans its
    # candidates from the same stages: one model build for all
    from freezetune import models, recipes

    built, real = [], models.create_model
    monkeypatch.setattr(models, "create_model", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    recipes.structure.cache_clear()
    cfg = TrainConfig(data="images", model="timm:test_efficientnet")
    for recipe in ("last-1", "last-2", "last-k", "last-2"):
        recipes.check_last_k(cfg, recipe)
    assert auto_rule.candidates(cfg)[0] == [2, 3, 4]
    assert built == ["timm:test_efficientnet"]
    with pytest.raises(ConfigError, match="k is out of range"):
        recipes.check_last_k(cfg, "last-99")


@pytest.mark.parametrize("given", [["--final-test"], ["refit=true"], ["--refit", "--final-test"]])
def test_a_sweep_refuses_what_it_would_replace_rather_than_drop_it(tmp_path, capsys, given):
    # --final-test was accepted and scored nothing; the sweep judges on the validation split, which refit trains on
    code, out, err = run_cli(capsys, "sweep", "--data", tmp_path / "images", "--out", tmp_path / "s", *given)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for key in ("final_test", "refit"):
        assert (key in err) == any(key.replace("_", "-") in g or key in g for g in given), err
    assert not (tmp_path / "s").exists()
    assert run_cli(capsys, "sweep", "--data", tmp_path / "images", "--no-final-test", "--print-config")[0] == 0


def test_a_sweeps_printed_config_holds_what_the_sweep_sets_and_reads_back_as_its_config(tmp_path, capsys):
    # it printed final_test: true, which the same sweep refuses when the file comes back as --config
    code, out, err = run_cli(capsys, "sweep", "--data", tmp_path / "images", "--print-config")
    printed = yaml.safe_load(out)
    assert code == 0 and (printed["final_test"], printed["refit"]) == (False, False), err
    (tmp_path / "s.yaml").write_text(out)
    code, again, err = run_cli(capsys, "sweep", "--config", tmp_path / "s.yaml", "--print-config")
    assert code == 0 and again == out, err
    # its recipes too: the file left them out, and the sweep it started compared the default four
    code, out, err = run_cli(
        capsys, "sweep", "--data", tmp_path / "images", "--recipes", "last-2,full", "--print-config"
    )
    assert code == 0 and yaml.safe_load(out)["recipes"] == "last-2,full", err
    (tmp_path / "s.yaml").write_text(out)
    code, again, err = run_cli(capsys, "sweep", "--config", tmp_path / "s.yaml", "--print-config")
    assert code == 0 and again == out, err
    code, again, err = run_cli(capsys, "sweep", "--config", tmp_path / "s.yaml", "--recipes", "full", "--print-config")
    assert code == 0 and yaml.safe_load(again)["recipes"] == "full", err  # the flag wins


def test_img_size_below_one_is_refused_with_the_other_settings_before_a_model_is_built():
    with pytest.raises(ConfigError, match="img_size must be >= 1, got -5"):
        validate(TrainConfig(data="images", img_size=-5))


def test_a_sweep_given_a_freeze_spec_names_only_what_was_given(tmp_path):
    from freezetune.sweep import sweep

    with pytest.raises(ConfigError, match=r"drop freeze -2 \(recipe=null freeze=auto\)$"):  # it said "recipe None"
        sweep(TrainConfig(data="images", freeze=-2), "full", out=tmp_path / "s")


def test_an_auto_runs_config_names_its_start_and_cache_absolutely_and_a_resume_needs_neither(data, tmp_path,
                                                                                              monkeypatch):  # fmt: skip
    # config.yaml said init: r1/auto-trials/last-3/best.pt: a --resume or train --config from elsewhere failed
    from freezetune import trainer

    monkeypatch.chdir(tmp_path)
    trainer.train(_cfg(data, "r1", cache="auto", epochs=2), echo=lambda line: None)
    saved = load_config(tmp_path / "r1" / "config.yaml")
    assert Path(saved.init).is_absolute() and Path(saved.init).is_file() and Path(saved.cache_dir).is_absolute()
    Path(saved.init).unlink()  # the trial's weights: a resume continues from last.pt, not from them
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    resumed = dataclasses.replace(saved, out=str(tmp_path / "r1"), resume=True, data=str(data))
    assert trainer.train(resumed, echo=lambda line: None).best_epoch >= 1


def test_an_auto_run_records_the_refit_it_did_not_the_one_it_asked(data, tmp_path):
    # with per_class, held-out images from outside the few-shot budget stay validation: recipe.json and config.yaml
    # said refit: true all the same
    from freezetune import trainer

    lines = []
    result = trainer.train(_cfg(data, tmp_path / "auto", cache="auto", per_class=2, epochs=1), echo=lines.append)
    choice = json.loads((tmp_path / "auto" / "recipe.json").read_text())["choice"]
    assert choice["refit"] is False and load_config(tmp_path / "auto" / "config.yaml").refit is False
    assert any("stay validation (no refit): training on them too would train on more than per_class=2" in line
               for line in lines), lines  # fmt: skip
    chose = next(line for line in lines if line.startswith("auto: chose"))
    assert "per_class" not in chose, chose  # the choice keeps its own reason
    assert result.history[-1]["val_n"] > 0  # the run validated, as recorded


def test_an_auto_run_with_a_validation_folder_says_why_it_does_not_refit(tmp_path):
    # with a val/ folder and --per-class it blamed per_class: the images were never held out of the training data
    from freezetune import trainer

    data = make_image_folder(tmp_path / "images", train=14, val=4, test=4)
    lines = []
    trainer.train(_cfg(data, tmp_path / "auto", cache="auto", per_class=20, epochs=1), echo=lines.append)
    assert any(line.endswith("stay validation (no refit): they were not held out of the training data")
               for line in lines), lines  # fmt: skip


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_an_auto_run_on_unreadable_data_prints_the_data_error_alone(tmp_path, capsys, folder):
    # the auto recipe announced its trials ("auto: choosing how many of the last stages ...") before the first one
    # found that the data path did not exist
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    code, out, err = run_cli(capsys, *train_argv(tmp_path / folder, tmp_path / "run", "--freeze", "auto"))
    assert code == 2 and err.startswith("freezetune: error: ") and str(tmp_path / folder) in err, err
    assert "auto:" not in out, out


def test_trials_and_sweep_rows_are_compared_by_validation_accuracy_whatever_the_monitor(data, tmp_path, monkeypatch):
    # with --monitor val_loss the trials' and rows' "val_acc" held the loss: the highest loss won
    from freezetune.sweep import sweep

    auto.run(_cfg(data, tmp_path / "auto", monitor="val_loss", epochs=1, cache="auto"), echo=lambda line: None)
    trials = json.loads((tmp_path / "auto" / "recipe.json").read_text())["trials"]
    assert trials and all(0 <= t["val_acc"] <= 1 for t in trials)
    done = sweep(_cfg(data, None, monitor="val_loss", epochs=2), "linear-probe,last-2", out=tmp_path / "s",
                 echo=lambda line: None)  # fmt: skip
    for row in done.rows:
        history = read_metrics(Path(row["run_dir"]) / "metrics.csv")
        best = next(r for r in history if int(r["epoch"]) == row["best_epoch"])
        assert row["val_acc"] == pytest.approx(float(best["val_acc"]))


def test_under_monitor_val_f1_trials_and_sweep_rows_are_compared_by_macro_f1(data, tmp_path):
    # imbalanced classes: accuracy can sit at the majority class's share while the small classes go unrecognised
    from freezetune.sweep import sweep

    lines = []
    auto.run(_cfg(data, tmp_path / "auto", monitor="val_f1", epochs=1, cache="auto"), echo=lines.append)
    decision = json.loads((tmp_path / "auto" / "recipe.json").read_text())
    trials = decision["trials"]
    assert trials and all(0 <= t["val_f1"] <= 1 and 0 <= t["val_acc"] <= 1 for t in trials)
    assert decision["compared_by"] == "val_f1" and decision["choice"]["refit"]
    assert any(line.startswith("auto: last 3 stage(s) + head at lr") and ": val macro-F1 " in line for line in lines)
    # refit leaves no validation in the run: best.pt is its last epoch, whatever --monitor asked; said, with the way out
    assert any("(refit), so best.pt is the run's last epoch, not its best by val_f1: --no-refit" in ln for ln in lines)
    assert any(ln.startswith("test accuracy ") and "%, macro-F1 " in ln for ln in lines)
    lines.clear()
    done = sweep(_cfg(data, None, monitor="val_f1", epochs=2), "linear-probe,last-2", out=tmp_path / "s",
                 echo=lines.append)  # fmt: skip
    for row in done.rows:  # best.pt is the epoch of the best macro-F1, and the row carries both scores
        history = read_metrics(Path(row["run_dir"]) / "metrics.csv")
        best = next(r for r in history if int(r["epoch"]) == row["best_epoch"])
        assert row["val_f1"] == pytest.approx(float(best["val_f1"])) == pytest.approx(max(r["val_f1"] for r in history))
        assert row["val_acc"] == pytest.approx(float(best["val_acc"]))
    best_f1 = max(r["val_f1"] for r in done.rows)
    assert next(r for r in done.rows if r["recipe"] == done.winner)["val_f1"] == best_f1
    assert (tmp_path / "s" / "sweep.csv").read_text().startswith("recipe,val_acc,val_f1,train_s,")
    assert any("val acc   val F1  train s" in line for line in lines)
    assert any(line.startswith(f"winner: {done.winner}, by val macro-F1 -> ") for line in lines)


def test_choose_and_pick_winner_compare_by_the_metric_asked():
    from freezetune.sweep import pick_winner
    from freezetune.sweep_report import pareto_front

    trials = [{"trained_stages": 2, "val_acc": 0.80, "val_f1": 0.70}, {"trained_stages": 3, "val_acc": 0.83,
              "val_f1": 0.60}, {"trained_stages": 4, "val_acc": 0.90, "val_f1": 0.50}]  # fmt: skip
    assert auto.choose(trials, n_val=5000)["trained_stages"] == 4
    assert auto.choose(trials, n_val=5000, metric="val_f1")["trained_stages"] == 2
    rows = [{"recipe": r, "val_acc": a, "val_f1": f, "train_s": t} for r, a, f, t in
            [("full", 0.90, 0.50, 30.0), ("last-2", 0.85, 0.70, 10.0), ("linear-probe", 0.80, 0.40, 5.0)]]  # fmt: skip
    assert pick_winner(rows)["recipe"] == "full" and pick_winner(rows, "val_f1")["recipe"] == "last-2"
    assert [r["recipe"] for r in pareto_front(rows, "val_f1")] == ["linear-probe", "last-2"]


def test_a_sweep_replaces_no_winner_yaml_it_did_not_write_and_an_unfinished_sweep_only_resumes(data, tmp_path):
    # a user's winner.yaml (and sweep_config.yaml) in --out were replaced silently: only sweep.csv was looked for
    from freezetune.sweep import SETTINGS_FILE, sweep

    quiet = dict(echo=lambda line: None)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "winner.yaml").write_text("mine: 1\n")
    for resume in (False, True):
        with pytest.raises(ConfigError, match="holds a winner.yaml no sweep wrote there"):
            sweep(_cfg(data, None, epochs=1, resume=resume), "linear-probe", out=tmp_path / "mine", **quiet)
    assert (tmp_path / "mine" / "winner.yaml").read_text() == "mine: 1\n"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["winner.yaml"]
    # nor beside a sweep.csv of the user's: refused "already holds a sweep (sweep.csv); pass --resume", which then
    # started a sweep afresh over both
    (tmp_path / "mine" / "sweep.csv").write_text("my,table\n")
    for resume in (False, True):
        with pytest.raises(ConfigError, match="holds a sweep.csv and a winner.yaml no sweep wrote there"):
            sweep(_cfg(data, None, epochs=1, resume=resume), "linear-probe", out=tmp_path / "mine", **quiet)
    assert (tmp_path / "mine" / "sweep.csv").read_text() == "my,table\n"
    assert (tmp_path / "mine" / "winner.yaml").read_text() == "mine: 1\n"
    # nor a sweep_config.yaml or a sweep.png of the user's (they were replaced, exit 0)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / SETTINGS_FILE).write_text("my notes\n")
    (tmp_path / "notes" / "sweep.png").write_bytes(b"\x89PNG my plot")
    with pytest.raises(ConfigError, match="holds a sweep_config.yaml and a sweep.png no sweep wrote there"):
        sweep(_cfg(data, None, epochs=1), "linear-probe", out=tmp_path / "notes", **quiet)
    assert (tmp_path / "notes" / SETTINGS_FILE).read_text() == "my notes\n"
    (tmp_path / "logs").mkdir()  # nor a sweep.log of the user's, which the sweep's lines were appended to
    (tmp_path / "logs" / "sweep.log").write_text("my log\n")
    with pytest.raises(ConfigError, match="holds a sweep.log no sweep wrote there"):
        sweep(_cfg(data, None, epochs=1), "linear-probe", out=tmp_path / "logs", **quiet)
    assert (tmp_path / "logs" / "sweep.log").read_text() == "my log\n"
    assert (tmp_path / "notes" / "sweep.png").read_bytes() == b"\x89PNG my plot"
    (tmp_path / "stopped" / "linear-probe").mkdir(parents=True)
    (tmp_path / "stopped" / SETTINGS_FILE).write_text("lr: 0.001\n")  # what a sweep stopped in its first recipe left
    (tmp_path / "stopped" / "linear-probe" / "last.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"holds a sweep that did not finish \(sweep_config.yaml\); pass --resume"):
        sweep(_cfg(data, None, epochs=1), "linear-probe", out=tmp_path / "stopped", **quiet)
    # refused before any recipe trained (no validation data, say): the same folder runs again as asked, the fix given
    (tmp_path / "refused").mkdir()
    (tmp_path / "refused" / SETTINGS_FILE).write_text("lr: 0.001\nval_split: null\n")
    assert sweep(_cfg(data, None, epochs=1), "linear-probe", out=tmp_path / "refused", **quiet).rows


def test_a_sweep_resumes_only_with_its_own_settings_and_never_into_a_training_run(data, tmp_path):
    # --resume --lr 0.05 read every row trained at 1e-3 back and wrote a winner.yaml with lr 0.05; a sweep into a
    # train run's dir put its files beside that run's checkpoints
    from freezetune.sweep import sweep

    quiet = dict(echo=lambda line: None)
    sweep(_cfg(data, None, epochs=1), "linear-probe", out=tmp_path / "s", **quiet)
    with pytest.raises(ConfigError, match=r"cannot resume the sweep in .* with lr 0.001 -> 0.05: its recipes ran"):
        sweep(_cfg(data, None, epochs=1, lr=0.05, resume=True), "linear-probe", out=tmp_path / "s", **quiet)
    # another list of recipes: the rewritten sweep.csv dropped the rows of those left out
    with pytest.raises(ConfigError, match=r"with recipes \['linear-probe'\] -> \['linear-probe', 'last-2'\]"):
        sweep(_cfg(data, None, epochs=1, resume=True), "linear-probe,last-2", out=tmp_path / "s", **quiet)
    assert sweep(_cfg(data, None, epochs=1, resume=True), "linear-probe", out=tmp_path / "s", **quiet).rows
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "classes.json").write_text('["a", "b"]')
    with pytest.raises(ConfigError, match=r"holds a training run \(classes.json\)"):
        sweep(_cfg(data, None, epochs=1), "linear-probe", out=tmp_path / "run", **quiet)


@pytest.mark.parametrize("probed", ["", " and the probe"])
def test_an_auto_run_whose_trials_spent_its_budget_says_so_and_trains_one_epoch(data, tmp_path, monkeypatch, probed):
    # it printed "for 1 epoch(s)" alone, 7x over a 30 s budget, without a word of it
    monkeypatch.setattr(auto, "PROBE_BELOW_STEPS", 10 if probed else 1)  # (the trials take 3 steps)
    monkeypatch.setattr(auto, "PROBE_MIN_RUN_STEPS", 0)  # however short the run
    lines = []
    auto.run(_cfg(data, tmp_path / "r", budget="0.01s", epochs=5, cache="auto"), echo=lines.append)
    assert any(line.startswith(f"auto: the trials{probed} took") and "of the 0.01s budget: the run trains one epoch"
               in line for line in lines), lines  # fmt: skip
    assert json.loads((tmp_path / "r" / "recipe.json").read_text())["choice"]["epochs"] == 1


def test_a_budget_plans_the_runs_epochs_at_the_pace_of_a_whole_epoch_validation_and_checkpoints_included():
    # the pace was the trial's training alone: a 45 s budget's 30 epochs took 63 s, each epoch's validation uncounted
    # a trial: half an epoch of 100 images trained in 1 s, then 2.5 s of validation and 0.5 s of checkpoints
    choice = {"epoch_s": 2.0, "epoch_images": 100.0, "loop_s": 4.0, "val_s": 2.5}
    assert auto._epoch_pace(choice, refit=False, n_val=50) == (2.0, 3.0)
    # refit: the 50 held-out images train too, and nothing validates
    assert auto._epoch_pace(choice, refit=True, n_val=50) == (3.0, 0.5)
    assert auto._epoch_pace({**choice, "fixed_epoch": True}, refit=True, n_val=50) == (2.0, 0.5)  # --epoch-images


def test_a_budget_says_what_it_affords_at_that_pace_and_the_trials_record_what_the_pace_is_made_of(data, tmp_path):
    trial = {"epoch_s": 2.0, "epoch_images": 100.0, "loop_s": 4.0, "val_s": 2.5, "n_val": 50, "refit_fits": True}
    lines = []
    epochs = auto._epochs(TrainConfig(budget="20s", refit=False), [trial], trial, 4.0, False, lines.append)
    assert epochs == 3 and lines == ["auto: the 20s budget leaves 16s after the trials: 3 epoch(s) of about 5.0s (2.0s "
                                     "training, 3.0s validation and checkpoints)"]  # fmt: skip
    lines.clear()  # an --epochs given too is replaced, and said to be (it was dropped in silence)
    auto._epochs(TrainConfig(budget="20s", refit=False, epochs=2), [trial], trial, 4.0, False, lines.append,
                 probed=True)  # fmt: skip
    assert lines[0].startswith("auto: the 20s budget leaves 16s after the trials and the probe: 3 epoch(s) (not the 2 "
                               "of epochs) ")  # fmt: skip
    lines.clear()  # less than an epoch left: the one epoch trained ends over the budget, and the plan says so
    assert auto._epochs(TrainConfig(budget="7s", refit=False), [trial], trial, 4.0, False, lines.append) == 1
    assert lines == ["auto: the 7s budget leaves 3.0s after the trials: 1 epoch(s) of about 5.0s (2.0s training, 3.0s "
                     "validation and checkpoints), about 2.0s over it"]  # fmt: skip
    auto.run(_cfg(data, tmp_path / "r", epochs=1, cache="auto"), echo=lambda _: None)
    (trial,) = json.loads((tmp_path / "r" / "recipe.json").read_text())["trials"][:1]
    assert trial["loop_s"] > trial["epoch_s"] * auto.TRIAL_FRACTION and trial["val_s"] > 0 and trial["epoch_images"]


def test_without_validation_images_a_sweep_is_refused_and_the_auto_recipe_says_why_it_compared_nothing(tmp_path,
                                                                                                      capsys):  # fmt: skip
    # one image a class: nothing to hold out. The sweep scored every recipe NaN and still named a winner; the auto
    # recipe spoke of "0 validation images" and of validation images that "stay validation"
    data = make_image_folder(tmp_path / "images", train=1, val=0, test=2)
    code, out, err = run_cli(capsys, "sweep", *train_argv(data, tmp_path / "sweep", "--epochs", "1")[1:],
                             "--recipes", "linear-probe,last-2")  # fmt: skip
    assert code == 2 and "a sweep (it compares its recipes on the validation split) needs validation data" in err
    assert "--val-data" in err and "winner" not in out and "train without" not in err  # (not a sweep's way out)
    # refused at set-up, before its first recipe trained: the fix it gives runs in the same folder (the first recipe
    # trained, then the sweep stopped, and refused the fix as a sweep that did not finish)
    assert not list((tmp_path / "sweep").rglob("last.pt"))
    code, out, err = run_cli(capsys, "sweep", *train_argv(data, tmp_path / "sweep", "--epochs", "1")[1:],
                             "--recipes", "linear-probe,last-2", "--val-data", data / "test")  # fmt: skip
    assert code == 0 and "winner: " in out, err
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--epochs", "1"))
    assert code == 0, err
    assert "there are no validation images to compare on" in out and "stay validation" not in out


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


@pytest.mark.parametrize("probed", [False, True])
def test_the_auto_recipe_scales_explicit_stage_lrs_with_the_head_keeping_the_users_ratio(data, tmp_path, capsys,
                                                                                        monkeypatch, probed):  # fmt: skip
    # the recipe's boost moved the head alone: blocks.4 asked 10 times slower than the head trained 67 times slower
    monkeypatch.setattr(auto, "PROBE_BELOW_STEPS", 10 if probed else 1)  # (the trials take 3 steps)
    monkeypatch.setattr(auto, "PROBE_MIN_RUN_STEPS", 0)  # however short the run
    asked = ("--epochs", "1", "--lr", "1e-3", "--stage-lrs", "blocks.4=1e-4")
    code, _, err = run_cli(capsys, *train_argv(data, tmp_path / "run", *asked))
    assert code == 0, err
    trial, run = (load_config(tmp_path / "run" / "auto-trials" / "last-3" / "config.yaml"),
                  load_config(tmp_path / "run" / "config.yaml"))  # fmt: skip
    assert trial.lr > 1e-3 and trial.stage_lrs["blocks.4"] / trial.lr == pytest.approx(0.1)
    assert (run.lr == pytest.approx(1e-3)) is probed and run.stage_lrs["blocks.4"] / run.lr == pytest.approx(0.1)
    if probed:  # the probe trains the head alone: the stages' LRs are not its
        probe = load_config(tmp_path / "run" / "auto-trials" / "probe" / "config.yaml")
        assert probe.lr == pytest.approx(1e-2) and not probe.stage_lrs
    # the same command with --resume resumes as asked (recipe.json keeps the request): its --lr and --stage-lrs were
    # laid over the final run's config.yaml, whose learning rates are the recipe's, and refused
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", *asked, "--resume"))
    assert code == 0 and "resuming with the earlier decision" in out, err


def test_an_auto_run_with_an_unfreeze_plan_resumes_its_request_read_back_from_json(data, tmp_path):
    # recipe.json keeps the request as JSON: a plan's epoch keys came back as strings and the resume was refused
    from freezetune import trainer

    cfg = _cfg(data, tmp_path / "run", epochs=2, unfreeze={1: "blocks.1"})
    trainer.train(cfg, echo=lambda line: None)
    lines = []
    trainer.train(dataclasses.replace(cfg, resume=True), echo=lines.append)
    assert any(line.startswith("auto: resuming with the earlier decision") for line in lines)


@pytest.mark.parametrize("recipe, stop_in", [("gradual", None), ("lp-ft", "probe")])
def test_a_named_recipe_stopped_in_any_phase_resumes_with_its_own_command_and_resume(data, tmp_path, capsys,
                                                                                      monkeypatch, recipe, stop_in):  # fmt: skip
    # "stopped ... continue with --resume": the same command with --resume was refused (recipe gradual sets freeze
    # itself, laid over its phase's config.yaml); an lp-ft stopped in its probe could not be resumed at all
    from freezetune import trainer

    argv = train_argv(data, tmp_path / "run", "--epochs", "2", "--recipe", recipe)
    real = trainer.Trainer._run_epoch

    def stop(self, epoch, unfrozen):  # Ctrl-C as the second epoch of the phase starts
        if epoch == 1 and (stop_in is None or self.run_dir.name == stop_in):
            raise KeyboardInterrupt
        return real(self, epoch, unfrozen)

    with monkeypatch.context() as patch:
        patch.setattr(trainer.Trainer, "_run_epoch", stop)
        code, _, err = run_cli(capsys, *argv)
    assert code == 130 and "--resume continues" in err, err
    code, out, err = run_cli(capsys, *argv, "--resume")
    assert code == 0 and "test accuracy" in out, err
    assert "resumed" in out and checkpoint.load(tmp_path / "run" / "last.pt")["epoch"] == 2
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["asked"]["recipe"] == recipe


def test_a_sweeps_winner_yaml_of_a_recipe_that_sets_its_own_batchnorm_is_one_train_accepts(tmp_path):
    # sweep --bn train: linear-probe and lp-ft ran with their own BatchNorm, and winner.yaml gave them bn train, which
    # `train --config winner.yaml` refused ("recipe 'lp-ft' sets bn itself")
    from freezetune import sweep

    asked = TrainConfig(data="d", bn="train", bn_stats="frozen")
    for recipe in ("lp-ft", "linear-probe"):
        values = sweep._winner_config(asked, {"recipe": recipe, "run_dir": str(tmp_path)})
        assert load_config(values).recipe == recipe  # as --config winner.yaml reads it: no conflict
    assert sweep._winner_config(asked, {"recipe": "full", "run_dir": str(tmp_path)})["bn"] == "train"


def test_a_recipe_record_of_another_freezetune_falls_back_to_the_runs_config(tmp_path):
    # a key this freezetune no longer knows raised from TrainConfig (now a ConfigError): the fallback missed it
    import json

    from freezetune.recipes import asked_config

    (tmp_path / "recipe.json").write_text(json.dumps({"recipe": "lp-ft", "asked": {"data": "d", "old_key": 1}}))
    (tmp_path / "config.yaml").write_text("freeze: none\n")
    assert asked_config(tmp_path) is None


def test_checking_the_test_split_builds_no_model_for_an_image_folder_beside_a_train_csv(tmp_path, monkeypatch):
    # Kaggle's train/, test/ and train.csv (of image ids): the model was built only to learn it is not a text model
    from freezetune import recipes

    make_image_folder(tmp_path / "kaggle")
    (tmp_path / "kaggle" / "train.csv").write_text("id,label\n1,red\n")
    monkeypatch.setattr(recipes, "structure", lambda *a: pytest.fail("the model was built"))
    recipes.check_test_data(TrainConfig(data=str(tmp_path / "kaggle"), model="timm:test_efficientnet"))


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


def test_a_named_recipe_stopped_by_an_error_after_its_first_phase_keeps_its_request_to_resume(data, tmp_path,
                                                                                             monkeypatch):  # fmt: skip
    from freezetune import recipes, trainer
    from freezetune.errors import DataError
    from freezetune.runtime import RECIPE_FILE

    calls = []

    def second_fails(cfg, **kw):
        calls.append(cfg.out)
        if len(calls) == 2:
            raise DataError("the data changed under the run")
        return trainer.train(cfg, **kw)

    with pytest.raises(DataError):
        recipes.run(_cfg(data, tmp_path / "run", recipe="lp-ft", epochs=1), echo=lambda _: None, train=second_fails)
    assert (tmp_path / "run" / RECIPE_FILE).is_file()  # phase 1's work is there: --resume continues from it


def test_a_named_recipe_stopped_in_its_first_phase_refuses_a_fresh_command_and_still_resumes(data, tmp_path, capsys,
                                                                                            monkeypatch):  # fmt: skip
    # the command again without --resume (and another --lr) rewrote recipe.json and was refused only by the probe;
    # the run's own --resume was then refused for "lr 0.01 -> 0.1", a change the user never made
    from _engine_fixtures import snapshot
    from freezetune import trainer

    argv = train_argv(data, tmp_path / "run", "--epochs", "2", "--recipe", "lp-ft")
    real = trainer.Trainer._run_epoch

    def stop(self, epoch, unfrozen):  # Ctrl-C as the probe's second epoch starts
        if epoch == 1 and self.run_dir.name == "probe":
            raise KeyboardInterrupt
        return real(self, epoch, unfrozen)

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

    def stop_tune(self, epoch, unfrozen):
        if self.run_dir.name == "again":
            raise KeyboardInterrupt
        return real(self, epoch, unfrozen)

    with monkeypatch.context() as patch:
        patch.setattr(trainer.Trainer, "_run_epoch", stop_tune)
        assert run_cli(capsys, *again)[0] == 130
    code, out, err = run_cli(capsys, *again)
    assert code == 2 and "stopped in its fine-tune phase, before that finished an epoch (its probe phase finished: " \
        in err, err  # fmt: skip


def test_an_auto_run_resumed_with_a_freeze_spec_is_refused_naming_the_recipe(data, tmp_path, capsys):
    # "cannot resume ... with init '.../auto-trials/last-3/best.pt' -> None, refit False -> None, lr 0.00333 -> 0.001,
    # cache_at 'blocks.3' -> None": the auto recipe's final run's own settings, not the change the user made
    from _engine_fixtures import snapshot

    out = tmp_path / "run"
    argv = train_argv(data, out, "--epochs", "2")
    assert run_cli(capsys, *argv)[0] == 0
    before = snapshot(out)
    code, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--epochs", "3", "--freeze", "-2")
    assert code == 2 and "with freeze -2: it holds a run of recipe 'auto'" in err, err
    assert "its own command with --resume, --freeze auto" in err and "init" not in err and snapshot(out) == before
    # another recipe: its first phase's line, then the same list of the final run's settings
    code, out_text, err = run_cli(capsys, "train", "--out", out, "--resume", "--epochs", "3", "--recipe", "full")
    assert code == 2 and "with recipe 'full': it holds a run of recipe 'auto'" in err and "init" not in err, err
    assert "phase 1/1" not in out_text and snapshot(out) == before
    code, _, err = run_cli(capsys, *argv, "--resume")  # its own command resumes it
    assert code == 0, err


@pytest.mark.parametrize(("n_val", "said"), [(2, "43.3"), (4, "30.6"), (100, "6.1")])
def test_the_reason_for_one_trial_states_the_standard_error_near_75_percent_it_names(monkeypatch, n_val, said):
    # on 5 validation images or fewer it printed the floored error (70.7 points on 2) while naming "near 75 %"
    monkeypatch.setattr(auto, "_trial", lambda *_a, **_k: {"n_val": n_val, "data_kind": "images"})
    trials, _, why = auto._measure(None, [2, 3, 4], 1.0, Path("unused"), None, lambda line: None)
    assert len(trials) == 1 and f"near 75 % is {said} points" in why, why


def test_a_user_error_in_a_recipes_set_up_is_the_one_line_printed(data, tmp_path, capsys):
    # "recipe last-2: phase 1/1 (last-2): freeze -3" came first, on stdout, before the error the set-up found
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, *train_argv(data, out, "--recipe", "last-2", "--stage-lrs", "nosuch=1e-4"))
    assert code == 2 and err.startswith("freezetune: error: stage_lrs names unknown stage(s) 'nosuch'"), err
    assert "phase 1/1" not in stdout and not out.exists()
    code, stdout, err = run_cli(capsys, *train_argv(data, out, "--recipe", "last-2", "--epochs", "1"))
    assert code == 0 and stdout.startswith("recipe last-2: phase 1/1 (last-2): freeze -3\n"), err


def test_an_auto_run_that_unfreezes_below_its_cut_caches_at_the_new_boundary(data, tmp_path, capsys):
    # the run pins its trials' cut (cache_at): once an unfreeze opened a stage before it, "feature cache off: cannot
    # cut at 'blocks.1'" and every later epoch ran the whole network
    argv = train_argv(data, tmp_path / "run", "--epochs", "3", "--unfreeze", "epoch:1", "--cache", "auto")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "feature cache off" not in out
    assert "feature cache: a stage before 'blocks.1' trains now; cut at the first trainable stage\n" in out, out
    assert "unfroze blocks.0" in out and "cached at the input of blocks.0" in out.split("unfroze blocks.0")[1], out


def test_a_budget_that_plans_fewer_epochs_than_the_warm_up_scales_it_and_says_what_it_replaced(data, tmp_path, capsys):
    # the trials ran, then "invalid config: warmup_epochs must be in [0, epochs), got 2.0": a budget's one epoch
    # against a warm-up checked against --epochs; and that path dropped --epochs 4 without a word
    argv = train_argv(data, tmp_path / "run", "--epochs", "4", "--budget", "0.01s", "--scheduler", "cosine",
                      "--warmup-epochs", "2")  # fmt: skip
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "budget: the run trains one epoch (not the 4 of epochs), over it" in out, out
    assert "auto: --warmup-epochs 2 is as long as the 1 epoch(s) the budget plans: the run warms up for 0.5, the " \
           "share of the run it was of --epochs 4" in out, out  # fmt: skip
    run = tmp_path / "run"
    assert json.loads((run / "recipe.json").read_text())["choice"]["warmup_epochs"] == 0.5
    assert len(read_metrics(run / "metrics.csv")) == 1
