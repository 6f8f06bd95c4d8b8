"""The auto recipe end to end on a tiny model (``auto/recipe.py``, ``auto/rule.py``): its candidates, trials and choice
on the validation split, the probe of a few-shot run, refit, ``--budget``, and resuming it."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _engine_fixtures import make_image_folder, recipe_cfg, run_cli, train_argv
from freezetune.auto import budget as auto_budget
from freezetune.auto import plan as auto_plan
from freezetune.auto import recipe as auto
from freezetune.auto import resume as auto_resume
from freezetune.auto import rule as auto_rule
from freezetune.auto import trials as auto_trials
from freezetune.config.file import load_config
from freezetune.config.train_config import TrainConfig
from freezetune.errors import ConfigError, FreezetuneError
from freezetune.recipes import named as recipes
from freezetune.run import checkpoint, checkpoint_writer
from freezetune.run.reporting import read_metrics


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # no val/ folder: the validation split is held out of train, and test/ is scored only at the end
    return make_image_folder(tmp_path_factory.mktemp("images"), train=14, val=0, test=4)


def test_trials_too_short_to_tell_the_candidates_apart_keep_the_default_untried(data, tmp_path, monkeypatch):
    # 4-step trials on 400 validation images overturned the default on noise in 2 of 5 seeds, costing 5 and 2 points
    monkeypatch.setattr(auto_trials, "MIN_VAL_TO_COMPARE", 3)  # the split is large enough: the steps decide
    lines = []
    auto.run(recipe_cfg(data, tmp_path / "run", epochs=1), echo=lines.append)
    decision = json.loads((tmp_path / "run" / "recipe.json").read_text())
    (trial,) = decision["trials"]
    assert trial["trained_stages"] == decision["choice"]["trained_stages"] == auto.DEFAULT_TRAINED_STAGES
    assert trial["steps"] < auto_trials.MIN_TRIAL_STEPS
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
    monkeypatch.setattr(auto_plan, "PROBE_BELOW_STEPS", 10)  # the trials take 3 steps
    monkeypatch.setattr(auto_plan, "PROBE_MIN_RUN_STEPS", 0)  # however short the run
    lines = []
    result = auto.run(recipe_cfg(data, tmp_path / "run", lr=2e-3), echo=lines.append)
    decision = json.loads((tmp_path / "run" / "recipe.json").read_text())
    (trial,) = decision["trials"]
    probe, choice = decision["probe"], decision["choice"]
    assert trial["steps"] < auto_plan.PROBE_BELOW_STEPS and choice["trained_stages"] == auto.DEFAULT_TRAINED_STAGES
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
    resumed, measured = auto_resume.resumed(
        recipe_cfg(data, tmp_path / "run", lr=2e-3, resume=True), tmp_path / "run", print
    )
    assert resumed.bn_stats == "frozen" and resumed.init == str(weights) and measured == [trial, probe]


def test_a_few_shot_auto_run_keeps_batchnorm_statistics_updating_when_the_user_asks_for_it(data, tmp_path, monkeypatch):
    # "update" was also the default, so an asked --bn-stats update was held like the default in a probed run
    monkeypatch.setattr(auto_plan, "PROBE_BELOW_STEPS", 10)  # the trials take 3 steps
    monkeypatch.setattr(auto_plan, "PROBE_MIN_RUN_STEPS", 0)  # however short the run
    lines = []
    auto.run(recipe_cfg(data, tmp_path / "run", bn_stats="update"), echo=lines.append)
    choice = json.loads((tmp_path / "run" / "recipe.json").read_text())["choice"]
    final = checkpoint.load(tmp_path / "run" / "last.pt")
    assert choice["bn_stats"] == final["config"]["bn_stats"] == "update"
    assert any("from the probed head" in line and "statistics held" not in line for line in lines)
    assert not any("trainable, eval stats" in line for line in lines)  # no stage's statistics held


@pytest.mark.multiprocess
def test_an_auto_runs_loader_workers_serve_all_of_a_runs_epochs_and_end_with_its_trial(data, tmp_path, monkeypatch):
    # the training loader started fresh workers each epoch (under spawn, macOS's and Windows', seconds each); kept
    # between epochs now, a trial's must still stop as it ends, or the probe and the run would start beside them
    import multiprocessing

    from freezetune.training.trainer import Trainer

    monkeypatch.setattr(auto_plan, "PROBE_BELOW_STEPS", 10)  # the trials take 3 steps: the probe trains 2 epochs
    monkeypatch.setattr(auto_plan, "PROBE_MIN_RUN_STEPS", 0)
    alive: dict[str, list[tuple[int, set[int]]]] = {}  # each run's steps: (epoch, the loader workers alive)
    after_step = Trainer._after_step
    before = {p.pid for p in multiprocessing.active_children()}  # (an earlier test's, in this process)

    def children() -> set[int]:
        return {p.pid for p in multiprocessing.active_children()} - before

    def count(self, epoch, meter):
        alive.setdefault(self.run_dir.name, []).append((epoch, children()))
        after_step(self, epoch, meter)

    monkeypatch.setattr(Trainer, "_after_step", count)
    auto.run(recipe_cfg(data, tmp_path / "run", workers=2, cache="off", aug="light"), echo=lambda *_: None)
    assert list(alive) == ["last-3", "probe", "run"] and not children()
    earlier: set[int] = set()
    for steps in alive.values():
        first = steps[0][1]
        assert len(first) == 2 and not first & earlier  # its training loader's two, none of an earlier run's
        assert all(first <= pids for _, pids in steps)  # the same two at every step of every epoch
        earlier |= set.union(*(pids for _, pids in steps))
    assert {epoch for epoch, _ in alive["probe"]} == {epoch for epoch, _ in alive["run"]} == {0, 1}


def test_a_few_shot_auto_run_too_short_to_move_from_a_probed_head_starts_from_its_trial(data, tmp_path, monkeypatch):
    monkeypatch.setattr(auto_plan, "PROBE_BELOW_STEPS", 10)  # the trials take 3 steps: 2 epochs of 6, 12 steps
    lines = []
    auto.run(recipe_cfg(data, tmp_path / "run"), echo=lines.append)
    decision = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert decision["probe"] is None and "last-3" in decision["choice"]["init"]
    assert not (tmp_path / "run" / "auto-trials" / "probe").exists()
    assert any("a run of about 12 steps is too short to move from a probed one" in line for line in lines), lines


def test_a_text_model_a_trial_long_enough_or_a_run_too_short_is_not_probed():
    assert auto_plan.few_shot({"steps": auto_plan.PROBE_BELOW_STEPS - 1}, text=False, epochs=10)
    assert not auto_plan.few_shot({"steps": auto_plan.PROBE_BELOW_STEPS}, text=False, epochs=10)
    assert not auto_plan.few_shot({"steps": 1}, text=True, epochs=10)  # its rule was measured without one
    # 10 images a class, 64 px, 3 epochs (12 steps), 3 seeds: probed 62.07 %, from the trial 70.39 %
    lines = []
    assert not auto_plan.few_shot({"steps": 2}, text=False, epochs=3, echo=lines.append)
    assert lines == ["auto: a trial of 2 steps is short for a new head, but a run of about 12 steps is too short to "
                     "move from a probed one (under 30): it starts from its trial"]  # fmt: skip


def test_an_auto_run_resumed_counts_its_trials_seconds_as_an_uninterrupted_one_does(data, tmp_path, monkeypatch):
    # a sweep resumed inside its auto recipe listed it at the final run's seconds: the trials' time went uncounted
    from freezetune.training.progress import RunResult

    monkeypatch.setattr(auto_plan, "PROBE_BELOW_STEPS", 10)  # the trials take 3 steps: a probe too
    monkeypatch.setattr(auto_plan, "PROBE_MIN_RUN_STEPS", 0)  # however short the run

    def timed(cfg, echo, recipe_run=False, **_):
        return RunResult(Path(cfg.out), 1, 0.5, seconds={"cache": 1.0, "epochs": 10.0, "val": 3.0})

    auto.run(recipe_cfg(data, tmp_path / "run", epochs=1), echo=lambda _: None)
    decision = json.loads((tmp_path / "run" / "recipe.json").read_text())
    trials = [*decision["trials"], decision["probe"]]  # a few-shot run's probe is part of its cost too
    resumed = auto.run(recipe_cfg(data, tmp_path / "run", epochs=1, resume=True), echo=lambda _: None, train=timed)
    assert decision["probe"] and all(t["seconds"]["epochs"] > 0 for t in trials)
    assert resumed.seconds["epochs"] == pytest.approx(10.0 + sum(t["seconds"]["epochs"] for t in trials))
    assert resumed.seconds["cache"] == pytest.approx(1.0 + sum(t["seconds"]["cache"] for t in trials))


def test_an_auto_run_whose_start_weights_are_gone_before_its_first_save_says_to_redo_the_trials(data, tmp_path):
    # killed before the run saved last.pt, its trials' folder deleted: the resume failed on "checkpoint ... does not
    # exist", which named no way on
    import shutil

    auto.run(recipe_cfg(data, tmp_path / "run", epochs=1), echo=lambda _: None)
    init = json.loads((tmp_path / "run" / "recipe.json").read_text())["choice"]["init"]
    assert init and Path(init).is_file()
    (tmp_path / "run" / checkpoint.LAST).unlink()
    shutil.rmtree(tmp_path / "run" / "auto-trials")
    with pytest.raises(
        ConfigError, match="are gone and the run saved no last.pt yet; run the command without --resume"
    ):
        auto.run(recipe_cfg(data, tmp_path / "run", epochs=1, resume=True), echo=lambda _: None)


@pytest.mark.parametrize("refit", [None, False])
def test_auto_measures_on_the_validation_split_and_keeps_its_evidence(data, tmp_path, monkeypatch, refit):
    from freezetune.cache import path as feature_path
    from freezetune.training import trainer

    evaluated = []
    real = feature_path.evaluate

    def spy(module, batches, *args, **kw):  # every validation of every trial and of the final run
        result = real(module, batches, *args, **kw)
        evaluated.append(result["n"])
        return result

    monkeypatch.setattr(feature_path, "evaluate", spy)
    monkeypatch.setattr(auto_trials, "MIN_VAL_TO_COMPARE", 3)  # every candidate's trial, on the 3 held-out images
    monkeypatch.setattr(auto_trials, "MIN_TRIAL_STEPS", 1)  # (of a step or two each)
    monkeypatch.setattr(auto_plan, "PROBE_BELOW_STEPS", 1)  # the run starts from its trial (probed: tested below)
    saved_last = []
    real_submit = checkpoint_writer.Writer.submit

    def submit(writer, *, best, last):  # every save of every trial and of the final run
        if last is not None:
            saved_last.append(writer.run_dir / checkpoint.LAST)
        real_submit(writer, best=best, last=last)

    monkeypatch.setattr(checkpoint_writer.Writer, "submit", submit)
    lines = []
    result = trainer.train(recipe_cfg(data, tmp_path / "auto", cache="auto", refit=refit), echo=lines.append)
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
    # and how long it will train, at its trial's pace
    chose = r"^auto: chose to train the last .* for 2 epoch\(s\) \(about \d+s\):\n  "  # the why on its own line
    assert any(re.search(chose, line) for line in lines), lines
    # how much each trial trained is said beside its score and in the reason for the choice (a trial of one step
    # favours the highest learning rate): 20 of the 39 images in batches of 8
    steps = {t["steps"] for t in recipe["trials"]}
    assert steps == {3}
    assert sum(" after 3 steps (" in line for line in lines if line.startswith("auto: last ")) == 3
    assert "(each trial: 3 steps)" in choice["why"]
    # one cache for all candidates and the run: built by the first trial, read back by the others (the refit run
    # reads the trials' training and validation stores one after the other), said once: the same line came 4 times
    caches = [line for line in lines if "feature cache:" in line and "feature cache: building" not in line]
    # (the refit run, without a validation store, says its own)
    assert len(caches) == (2 if refit is None else 1) and "built" in caches[0], caches
    assert all("read from" in line and "validation" not in line for line in caches[1:])
    assert sum("cached without augmentation" in line for line in lines) == 1  # once a run, not once a trial
    (trial,) = read_metrics(trials / "last-2" / "metrics.csv")
    assert round(trial["img_per_s"] * trial["epoch_time_s"]) == 20  # a trial trains on half of the 39 images
    assert result.seconds["cache"] > 0 and result.seconds["epochs"] > 0


def test_an_unfreeze_plan_naming_no_stage_is_refused_before_the_auto_recipes_trials(data, tmp_path):
    # it was found by the final run, after the trials, with auto-trials/, features/ and recipe.json left behind
    with pytest.raises(FreezetuneError, match="'layer9'"):
        auto.run(recipe_cfg(data, tmp_path / "r", unfreeze="{1: layer9}"), echo=lambda _: None)
    assert not (tmp_path / "r").exists()  # refused before the run dir was made


@pytest.mark.parametrize("body, ks", [(1, [1]), (2, [1]), (3, [2]), (4, [2, 3]), (5, [2, 3, 4]), (9, [2, 3, 4])])
def test_auto_candidates_on_models_with_few_stages_train_at_least_one(monkeypatch, request, body, ks):
    # a model of one stage and a head gave k = 0 and a ZeroDivisionError in the candidate's LR
    from torch import nn

    from freezetune.model import create as models

    layers = [m for _ in range(body) for m in (nn.Linear(4, 4), nn.ReLU())] + [nn.Linear(4, 2)]
    monkeypatch.setattr(models, "create_model", lambda *a, **k: (nn.Sequential(*layers), None))
    recipes.structure.cache_clear()  # built once a process per model name: here the name stays, the model changes
    request.addfinalizer(recipes.structure.cache_clear)  # and the fake must not stay for the tests after
    got, cut, _ = auto_rule.candidates(TrainConfig(data="images"))
    assert got == ks and all(auto_rule.candidate_lr(1e-3, k) > 0 for k in got)
    assert cut == str(2 * (body - max(ks)))  # the stage the deepest candidate trains from


def test_auto_on_a_validation_split_too_small_to_compare_runs_only_the_default_trial(data, tmp_path, monkeypatch):
    monkeypatch.setattr(auto_plan, "PROBE_BELOW_STEPS", 1)  # the run starts from its trial (probed: tested below)
    lines = []
    result = auto.run(recipe_cfg(data, tmp_path / "auto", cache="auto"), echo=lines.append)
    recipe = json.loads((tmp_path / "auto" / "recipe.json").read_text())
    (trial,) = recipe["trials"]
    assert trial["trained_stages"] == recipe["choice"]["trained_stages"] == auto.DEFAULT_TRAINED_STAGES
    assert trial["n_val"] == 3 < auto_trials.MIN_VAL_TO_COMPARE
    assert "3 validation images cannot tell the candidates apart" in recipe["choice"]["why"]
    assert any("cannot tell the candidates apart" in line for line in lines)
    trials = tmp_path / "auto" / "auto-trials"
    assert sorted(p.name for p in trials.iterdir()) == ["last-3"]
    assert recipe["choice"]["init"] == str(trials / "last-3" / "best.pt")  # its trial still starts the run
    assert checkpoint.load(tmp_path / "auto" / "last.pt")["epoch"] == 2 and result.test["n"] == 12


def test_epoch_images_makes_the_runs_epochs_and_the_auto_recipes_trials_shorter(data, tmp_path):
    # a large training set: --epoch-images 10 trains 10 random images an epoch, and a trial half of one such epoch
    # (the trials took half the training set, whatever the epoch)
    lines = []
    auto.run(
        recipe_cfg(data, tmp_path / "auto", epochs=2, cache="auto", refit=False, epoch_images=10), echo=lines.append
    )
    assert "a trial each on 50% of an epoch's training images" in lines[0]
    assert any(" train images (10 an epoch), 3 classes" in line for line in lines)  # the run's header
    assert any(" train images (5 an epoch), 3 classes" in line for line in lines)  # the trial's

    def samples(run_dir: Path) -> list[int]:
        return [round(row["img_per_s"] * row["epoch_time_s"]) for row in read_metrics(run_dir / "metrics.csv")]

    assert samples(tmp_path / "auto") == [10, 10]
    assert samples(tmp_path / "auto" / "auto-trials" / "last-3") == [5]


def test_an_auto_run_whose_epochs_draw_fewer_images_than_the_set_builds_no_training_store(data, tmp_path):
    # --epoch-images 10 of 39: the trials built a store of every image, as did the run (139 s for 20 000 images on a
    # CPU, when the run drew 5 000); a trial's own draws are few, but the run's that read its store count too
    def streamed(epochs: int) -> list[str]:
        lines = []
        cfg = recipe_cfg(data, tmp_path / f"auto{epochs}", epochs=epochs, cache="auto", refit=False, epoch_images=10)
        auto.run(cfg, echo=lines.append)
        return [line.strip() for line in lines if "feature cache: no training store" in line]

    trial, run = streamed(2)  # the trial: (1 + 2 / 50 %) x 5 draws, the other trials' 2 x 5; the run: 2 x 10
    assert trial.split("\n")[1].strip().startswith("the 1 epoch(s) left (and the run that reads this one's cache) "
                                                    "draw 35 training images, no more than the 39 a store would hold")  # fmt: skip
    assert run.split("\n")[1].strip().startswith("the 2 epoch(s) left draw 20 training images")
    assert streamed(4) == []  # the trial's 5 + the run's 40: built by the trial, read by the run


def test_the_default_run_works_under_python_OO_which_strips_docstrings(data, tmp_path):
    # recipe.json's procedure is auto/recipe.py's docstring: under -OO the run crashed after its trials (None.split)
    argv = train_argv(data, tmp_path / "run", "--epochs", "1")
    done = subprocess.run([sys.executable, "-OO", "-m", "freezetune", *map(str, argv)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "docstring" in json.loads((tmp_path / "run" / "recipe.json").read_text())["procedure"]


def test_a_models_stages_are_built_once_for_all_the_last_k_checks_and_the_auto_plan(monkeypatch):
    # a sweep checks each last-k before anything trains and recipes.run checks again, and the auto recipe plans its
    # candidates from the same stages: one model build for all
    from freezetune.model import create as models

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


def test_an_auto_runs_config_names_its_start_and_cache_absolutely_and_a_resume_needs_neither(data, tmp_path,
                                                                                              monkeypatch):  # fmt: skip
    # config.yaml said init: r1/auto-trials/last-3/best.pt: a --resume or train --config from elsewhere failed
    from freezetune.training import trainer

    monkeypatch.chdir(tmp_path)
    trainer.train(recipe_cfg(data, "r1", cache="auto", epochs=2), echo=lambda line: None)
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
    from freezetune.training import trainer

    lines = []
    result = trainer.train(recipe_cfg(data, tmp_path / "auto", cache="auto", per_class=2, epochs=1), echo=lines.append)
    choice = json.loads((tmp_path / "auto" / "recipe.json").read_text())["choice"]
    assert choice["refit"] is False and load_config(tmp_path / "auto" / "config.yaml").refit is False
    assert any("stay validation (no refit): training on them too would train on more than per_class=2" in line
               for line in lines), lines  # fmt: skip
    chose = next(line for line in lines if line.startswith("auto: chose"))
    assert "per_class" not in chose, chose  # the choice keeps its own reason
    assert result.history[-1]["val_n"] > 0  # the run validated, as recorded


def test_trials_note_what_their_hold_out_lends_the_refit_not_warn_of_short_classes(data, tmp_path, caplog):
    # 14 a class and per_class 14: each trial holds 1 a class out and trains on 13, which the final run's refit gives
    # back; the trials warned that every class trained short (the run, which trains on all 14, did not)
    import logging

    from freezetune.training import trainer

    with caplog.at_level(logging.INFO, logger="freezetune"):
        trainer.train(recipe_cfg(data, tmp_path / "auto", cache="auto", per_class=14, epochs=1), echo=lambda _: None)
    assert json.loads((tmp_path / "auto" / "recipe.json").read_text())["choice"]["refit"] is True
    short = [r for r in caplog.records if r.getMessage().startswith("per_class=14")]
    assert short and all(r.levelno == logging.INFO for r in short), [(r.levelname, r.getMessage()) for r in short]
    assert "a refit (the auto recipe's final run) trains on them too" in short[0].getMessage()


def test_an_auto_run_with_a_validation_folder_says_why_it_does_not_refit(tmp_path):
    # with a val/ folder and --per-class it blamed per_class: the images were never held out of the training data
    from freezetune.training import trainer

    data = make_image_folder(tmp_path / "images", train=14, val=4, test=4)
    lines = []
    trainer.train(recipe_cfg(data, tmp_path / "auto", cache="auto", per_class=20, epochs=1), echo=lines.append)
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


@pytest.mark.parametrize("probed", ["", " and the probe"])
def test_an_auto_run_whose_trials_spent_its_budget_says_so_and_trains_one_epoch(data, tmp_path, monkeypatch, probed):
    measured = "the pilot, the trials and the probe" if probed else "the pilot and the trials"
    # it printed "for 1 epoch(s)" alone, 7x over a 30 s budget, without a word of it
    monkeypatch.setattr(auto_plan, "PROBE_BELOW_STEPS", 10 if probed else 1)  # (the trials take 3 steps)
    monkeypatch.setattr(auto_plan, "PROBE_MIN_RUN_STEPS", 0)  # however short the run
    lines = []
    auto.run(recipe_cfg(data, tmp_path / "r", budget="0.01s", epochs=5, cache="auto"), echo=lines.append)
    assert any(line.startswith(f"auto: {measured} took") and "of the 0.01s budget, and the run's set-up takes about "
               in line and ": the run trains one epoch" in line for line in lines), lines  # fmt: skip
    assert json.loads((tmp_path / "r" / "recipe.json").read_text())["choice"]["epochs"] == 1
    # the run ended 7x past its budget and its last line was the test's accuracy, as a run within it
    assert re.fullmatch(r"auto: the 0\.01s budget: the trials, the run and its final test took [\d.]+s, [\d.]+s past "
                        r"it \(its plan is in recipe\.json.*\); a loaded machine, or epochs slower than their trial's, "
                        r"end a run late", lines[-1]), lines[-1]  # fmt: skip


def test_a_trials_progress_bars_name_the_trial(data, tmp_path, monkeypatch):
    # in a log file (tmux, nohup) a trial's bar read "epoch 1/1", as the run's own: the two told apart by timestamps
    from freezetune.training import epoch_log

    labels, real = [], epoch_log.TrainProgress

    def recorded(total, desc, **kwargs):
        labels.append(desc)
        return real(total, desc, **kwargs)

    monkeypatch.setattr(epoch_log, "TrainProgress", recorded)
    auto.run(recipe_cfg(data, tmp_path / "r", epochs=1, cache="auto", progress=True), echo=lambda line: None)
    assert labels == ["last-3: epoch 1/1", "epoch 1/1"]


def test_a_budget_that_leaves_no_time_for_the_other_trials_keeps_the_defaults_untried(data, tmp_path, monkeypatch):
    # a 2m budget's third trial started 18 s before its end and took 46 s, then the run trained its epoch: 4m39s
    monkeypatch.setattr(auto_trials, "MIN_VAL_TO_COMPARE", 3)  # every candidate's trial, on the 3 held-out images...
    monkeypatch.setattr(auto_trials, "MIN_TRIAL_STEPS", 1)
    lines = []
    auto.run(recipe_cfg(data, tmp_path / "r", budget="0.01s", epochs=1, cache="auto"), echo=lines.append)
    decision = json.loads((tmp_path / "r" / "recipe.json").read_text())
    assert [t["trained_stages"] for t in decision["trials"]] == [3] and decision["choice"]["trained_stages"] == 3
    assert re.fullmatch(r"the default \(last 3 stages\): the 0\.01s budget leaves 0\.0s after its trial, less than "
                        r"the other 2 trial\(s\) \(about [\d.]+s each\) and one epoch of the run \(about [\d.]+s\) "
                        r"and its final test \(about [\d.]+s\) take, so only its trial ran",
                        why := decision["choice"]["why"]), why  # fmt: skip
    assert lines[0].endswith("if the split holds 3 or more and the 0.01s budget leaves time for them"), lines[0]
    # ...where the budget leaves time for them (the first trial's loop again for each, and one epoch), they run
    first = decision["trials"][0]
    trial_s, epoch_s = first["seconds"]["epochs"], sum(auto_plan.epoch_pace(first, refit=False, n_val=first["n_val"]))
    roomy = auto_budget.TrialBudget(10 + 2 * trial_s + epoch_s + 0.1, "enough", time.perf_counter() - 10)
    unbounded = auto_budget.TrialBudget(None, None, 0.0)
    assert roomy.too_short_for(first, 2) is None and unbounded.too_short_for(first, 2) is None
    roomy.call_s = 0.1  # a pilot measured each call's set-up: ten-step trials are mostly set-up, and it counts
    assert roomy.too_short_for(first, 2)
    short = auto_budget.TrialBudget(10 + 2 * trial_s + epoch_s - 0.5, "short", time.perf_counter() - 10)
    assert short.too_short_for(first, 2)


def test_a_budget_too_small_for_a_trial_and_an_epoch_of_the_set_shortens_every_epoch_at_a_pilots_pace(
    data, tmp_path, monkeypatch
):
    # 10 000 Fashion-MNIST images under --budget 1m took 131 s: the first trial drew half the set and the run one
    # epoch of it, whatever the budget; 60 000 would have taken several times the budget
    monkeypatch.setattr(auto_trials, "MIN_TRIAL_STEPS", 1)  # a trial of one 8-image step: 16 images an epoch
    # a pilot shorter than the default's trial (20 images, 3 steps), as on a large set: one that drew it whole is it
    monkeypatch.setattr(auto_budget, "PILOT_STEPS", 2)
    lines = []
    result = auto.run(recipe_cfg(data, tmp_path / "r", budget="0.01s", epochs=2), echo=lines.append)
    decision = json.loads((tmp_path / "r" / "recipe.json").read_text())
    pilot, choice = decision["pilot"], decision["choice"]
    assert pilot["planned"] == 16 and pilot["steps"] > 0 and pilot["image_s"] > 0 and pilot["setup_s"] > 0
    assert "auto: the 0.01s budget: a pilot of the default (last 3 stages), up to 2 steps, measures the pace first" in (
        lines
    )
    said = next(line for line in lines if re.match(r"auto: the 0\.01s budget: a pilot of \d+ steps? trained", line))
    assert re.search(r"trained \d+ images/s \([\d.]+s in all\); a trial on 50% of an epoch of 39 images and one "
                     r"epoch of the run take about [\d.]+s, more than what the budget has left \(nothing\) \(about "
                     r"[\d.]+s more kept for the final test\): the run's "
                     r"epochs draw 16 of the 39 images \(as --epoch-images 16 would; each trial 8\), past the budget: "
                     r"fewer would leave a trial under 1 step$", said), said  # fmt: skip
    assert lines.index(said) < next(i for i, line in enumerate(lines) if line.startswith("auto: last 3 stage(s)"))
    # the trial spent what was left: the run's one epoch draws no fewer images than a trial did
    assert any(line.startswith("auto: the pilot and the trials took ") and line.endswith(
        ": the run trains one epoch (not the 2 of epochs) of 8 of the 42 images, over it") for line in lines), lines  # fmt: skip
    assert any(line.startswith("auto: chose to train the last 3 stage(s)") and " 1 epoch(s) of 8 images" in line
               for line in lines)  # fmt: skip

    def samples(run_dir: Path) -> list[int]:
        return [round(row["img_per_s"] * row["epoch_time_s"]) for row in read_metrics(run_dir / "metrics.csv")]

    assert samples(tmp_path / "r") == [8] and samples(tmp_path / "r/auto-trials/last-3") == [8]
    assert choice["epochs"] == 1 and choice["epoch_images"] == 8
    # the pilot is part of the run's cost, and a resume trains the epochs it planned
    trials = [*decision["trials"], pilot]
    assert result.seconds["epochs"] > sum(t["seconds"]["epochs"] for t in trials) > pilot["seconds"]["epochs"] > 0
    resumed, measured = auto_resume.resumed(recipe_cfg(data, tmp_path / "r", budget="0.01s", epochs=2, resume=True),
                                            tmp_path / "r", lambda line: None, write=False)  # fmt: skip
    assert resumed.epoch_images == 8 and measured[-1] == pilot


def test_a_pilot_that_drew_the_default_trials_whole_epoch_says_it_is_that_trial_and_plans_no_shorter_epochs(
    data, tmp_path, monkeypatch
):
    # on a small set the pilot's 8 steps drew the trial's whole epoch, then the line planned "a trial on 50% of an
    # epoch and one epoch of the run" as if the trial were still to come, and shortened the epochs: the trial ran
    # again, on fewer images
    monkeypatch.setattr(auto_trials, "MIN_TRIAL_STEPS", 1)
    lines = []
    auto.run(recipe_cfg(data, tmp_path / "r", budget="0.01s", epochs=2), echo=lines.append)
    pilot = json.loads((tmp_path / "r" / "recipe.json").read_text())["pilot"]
    assert pilot["is_trial"] and pilot["planned"] is None
    assert any(
        re.fullmatch(
            r"auto: the 0\.01s budget: a pilot of \d+ steps? trained \d+ images/s \([\d.]+s in all\) "
            r"on the default trial's \d+ images: it is that trial",
            line,
        )
        for line in lines
    ), lines
    assert not any("a trial on 50% of an epoch" in line for line in lines), lines


def test_a_resumed_budgeted_run_ends_saying_it_trained_the_budgets_plan_and_what_this_call_took(data, tmp_path):
    # the resume trained the plan of the call before and ended without a word of its budget: whether the run kept to
    # it could not be told
    from freezetune.training import trainer

    cfg = recipe_cfg(data, tmp_path / "r", budget="2s", epochs=1)
    trainer.train(cfg, echo=lambda line: None)
    lines = []
    trainer.train(dataclasses.replace(cfg, resume=True), echo=lines.append)
    assert re.fullmatch(
        r"auto: resumed on the 2s budget's plan \(1 epoch\(s\), in recipe.json\): this call took "
        r"[\d.]+s; the budget counted the call that planned it, not its resumes",
        lines[-1],
    ), lines


def test_a_budgets_pilot_that_drew_the_default_trials_whole_epoch_is_that_trial_not_a_repeat_of_it(data, tmp_path):
    # on a small set the pilot drew the trial's images with its seed and LR, and the trial then did it all again
    lines = []
    result = auto.run(recipe_cfg(data, tmp_path / "r", budget="2s", epochs=1), echo=lines.append)
    decision = json.loads((tmp_path / "r" / "recipe.json").read_text())
    (trial,) = decision["trials"]
    assert decision["pilot"]["is_trial"] and decision["pilot"]["planned"] is None and trial["seconds"]["epochs"] > 0
    assert [line.strip().startswith("epoch 1/1") for line in lines if line.startswith("  ")].count(True) == 1, lines
    assert sum(line.startswith("auto: last 3 stage(s) + head at lr ") for line in lines) == 1
    assert (tmp_path / "r/auto-trials/last-3/metrics.csv").is_file() and Path(decision["choice"]["init"]).is_file()
    # its seconds count once, as the trial's
    assert result.seconds["cache"] + result.seconds["epochs"] > trial["seconds"]["epochs"]


def test_a_small_set_under_a_large_budget_trains_the_epochs_asked_not_all_the_budget_affords(data, tmp_path):
    # a budget and --epochs are both limits: a few images under an hour's budget trained for the whole hour (five
    # minutes here: a regression ends, failing, after it)
    lines = []
    result = auto.run(recipe_cfg(data, tmp_path / "r", budget="5m", epochs=3), echo=lines.append)
    decision = json.loads((tmp_path / "r" / "recipe.json").read_text())
    assert decision["choice"]["epochs"] == 3 and len(result.history) == 3, lines
    assert any(re.search(r"budget leaves \d+s after the pilot and the trials.*: 3 epoch\(s\) \(--epochs 3; the "
                         r"budget affords [\d,]+\) of about", line) for line in lines), lines  # fmt: skip
    took = re.fullmatch(r"auto: the 5m budget: the trials, the run and its final test took ([\d.]+)s", lines[-1])
    # recorded beside the plan: recipe.json held what the trials spent, not what the whole call came to
    recorded = json.loads((tmp_path / "r" / "recipe.json").read_text())["budget"]["took_s"]
    assert took and recorded >= decision["budget"]["spent_s"] and abs(recorded - float(took[1])) <= 0.6, (
        lines[-1],
        recorded,
    )


@pytest.mark.parametrize(
    ("budget_s", "train_items", "planned", "said"),
    [
        (200.0, 10_000, None, ", within the 200s left"),  # 2 x 2 s + 1.5 x 10 000 x 0.01 s = 154 s: fits
        (100.0, 10_000, 6400, ", more than the 100s left: the run's epochs draw 6,400 of the 10,000 images (as "
                              "--epoch-images 6400 would; each trial 3,200)"),  # (100 - 4) / (1.5 x 0.01)
        (10.0, 10_000, 640, ", more than the 10s left: the run's epochs draw 640 of the 10,000 images (as --epoch-images "
                            "640 would; each trial 320), past the budget: fewer would leave a trial under 10 steps"),
        (10.0, 500, None, ", more than the 10s left: the run will end past the budget (an epoch of the set is no longer "
                          "than the 640 images a trial of 10 steps needs)"),  # 640 images: more than an epoch
    ],
)  # fmt: skip
def test_a_budgets_pilot_plans_the_epochs_a_trial_and_one_run_epoch_fit_in(budget_s, train_items, planned, said):
    pilot = {"data_kind": "images", "steps": 8, "images": 256, "image_s": 0.01, "call_s": 2.0, "wall_s": 4.5,
             "train_items": train_items, "seconds": {"cache": 1.0, "epochs": 3.0}}  # fmt: skip
    budget = auto_budget.TrialBudget(budget_s, f"{budget_s:g}s", 0.0)
    budget.spent = lambda: 0.0
    lines = []
    assert auto_budget.plan_epoch(TrainConfig(), pilot, budget, lines.append, min_trial_steps=10) == planned
    need = 4 + 1.5 * train_items * 0.01
    assert lines == [f"auto: the {budget_s:g}s budget: a pilot of 8 steps trained 100 images/s (4.5s in all); a trial on "
                     f"50% of an epoch of {train_items:,} images and one epoch of the run take about "
                     f"{auto_plan.seconds_text(need)}{said}"]  # fmt: skip
    # an epoch the user made shorter is the one planned for
    assert auto_budget.plan_epoch(TrainConfig(epoch_images=100), pilot, budget, lines.append, min_trial_steps=1) is None


def test_under_torchrun_a_budgets_pilot_and_trials_count_a_step_as_a_batch_on_every_rank():
    # a pilot of 4 steps on 2 ranks, and trials of 5 steps where the plan promised 10: the batch is each rank's
    from freezetune.device.distributed import DistInfo

    trial = TrainConfig(batch_size=16)
    assert auto_budget.pilot_config(trial, 2).epoch_images == 2 * auto_budget.pilot_config(
        trial).epoch_images == 2 * 16 * auto_budget.PILOT_STEPS  # fmt: skip
    pilot = {"data_kind": "images", "steps": 8, "images": 256, "image_s": 0.01, "call_s": 2.0, "wall_s": 4.5,
             "train_items": 10_000, "seconds": {"cache": 1.0, "epochs": 3.0}}  # fmt: skip
    two = auto_budget.TrialBudget(10.0, "10s", 0.0, info=DistInfo(rank=0, world=2))
    two.spent = lambda: 0.0  # (no collective: the clock is given)
    assert auto_budget.plan_epoch(TrainConfig(batch_size=16), pilot, two, lambda line: None, min_trial_steps=10) == 640


def test_a_budget_plans_the_runs_epochs_at_the_pace_of_a_whole_epoch_validation_and_checkpoints_included():
    # the pace was the trial's training alone: a 45 s budget's 30 epochs took 63 s, each epoch's validation uncounted
    # a trial: half an epoch of 100 images trained in 1 s, then 2.5 s of validation and 0.5 s of checkpoints
    choice = {"epoch_s": 2.0, "epoch_images": 100.0, "loop_s": 4.0, "val_s": 2.5}
    assert auto_plan.epoch_pace(choice, refit=False, n_val=50) == (2.0, 3.0)
    # refit: the 50 held-out images train too, and nothing validates
    assert auto_plan.epoch_pace(choice, refit=True, n_val=50) == (3.0, 0.5)
    assert auto_plan.epoch_pace({**choice, "fixed_epoch": True}, refit=True, n_val=50) == (2.0, 0.5)  # --epoch-images


def test_a_budget_says_what_it_affords_at_that_pace_and_the_trials_record_what_the_pace_is_made_of(data, tmp_path):
    trial = {"epoch_s": 2.0, "epoch_images": 100.0, "loop_s": 4.0, "val_s": 2.5, "n_val": 50, "refit_fits": True}
    lines = []
    epochs = auto_plan.run_epochs(TrainConfig(budget="20s", refit=False), [trial], trial, 4.0, False, lines.append)
    assert epochs == (3, None) and lines == ["auto: the 20s budget leaves 16s after the trials: 3 epoch(s) of about 5.0s (2.0s "
                                     "training, 3.0s validation and checkpoints)"]  # fmt: skip
    # a run's pace moves by 10 % from call to call: the epochs are planned for PACE_MARGIN of the time left; where
    # whole epochs leave part of it unused (2 of 5 s in 14.25 s), one more, each shorter (3 of 87 images: 14.2 s)
    lines.clear()
    assert auto_plan.run_epochs(TrainConfig(budget="19s", refit=False), [trial], trial, 4.0, False, lines.append
                                ) == (3, 87)  # fmt: skip
    assert lines == ["auto: the 19s budget leaves 15s after the trials: 3 epochs of 87 of the 100 images; at the "
                     "trial's pace an epoch of 100 takes about 5.0s (2.0s training, 3.0s validation and checkpoints)"]  # fmt: skip
    # ... not where that one more would be less than half an epoch (15.5 s: 2 epochs, or 3 of 32 images), nor past
    # the --epochs asked
    assert auto_plan.run_epochs(TrainConfig(budget="15.5s", refit=False), [trial], trial, 4.0, False,
                                lambda line: None) == (2, None)  # fmt: skip
    assert auto_plan.run_epochs(TrainConfig(budget="19s", refit=False, epochs=2), [trial], trial, 4.0, False,
                                lambda line: None) == (2, None)  # fmt: skip
    lines.clear()  # an --epochs the budget cannot fit is said to be replaced (it was dropped in silence)
    assert auto_plan.run_epochs(TrainConfig(budget="20s", refit=False, epochs=5), [trial], trial, 4.0, False,
                                lines.append, probed=True) == (3, None)  # fmt: skip
    assert lines[0].startswith("auto: the 20s budget leaves 16s after the trials and the probe: 3 epoch(s) (not the 5 "
                               "of epochs) ")  # fmt: skip
    lines.clear()  # ... and one it can is the most it plans: both are limits, whichever ends the run first
    assert auto_plan.run_epochs(TrainConfig(budget="20s", refit=False, epochs=2), [trial], trial, 4.0, False,
                                lines.append) == (2, None)  # fmt: skip
    assert lines[0].startswith("auto: the 20s budget leaves 16s after the trials: 2 epoch(s) (--epochs 2; the budget "
                               "affords 3) of about 5.0s ")  # fmt: skip
    lines.clear()  # a plain number is seconds, said with its unit ("the 20 budget" said none)
    assert auto_plan.run_epochs(TrainConfig(budget="20", refit=False), [trial], trial, 4.0, False, lines.append) == (
        3, None) and lines[0].startswith("auto: the 20s budget leaves 16s after the trials: 3 epoch(s)")  # fmt: skip
    lines.clear()  # without --epochs, a budget plans no more than MAX_BUDGET_EPOCHS: a small set trained thousands
    assert auto_plan.run_epochs(TrainConfig(budget="1h", refit=False), [trial], trial, 4.0, False, lines.append) == (
        auto_plan.MAX_BUDGET_EPOCHS, None)  # fmt: skip
    assert lines[0].startswith(f"auto: the 1h budget leaves 3596s after the trials: {auto_plan.MAX_BUDGET_EPOCHS} "
                               "epoch(s) (at most 30 without --epochs; the budget affords 683) of about 5.0s ")  # fmt: skip
    lines.clear()  # an --epochs 10 given, the default's number, is a limit too (it read as not given, planned 30)
    assert auto_plan.run_epochs(TrainConfig(budget="1h", refit=False, epochs=10), [trial], trial, 4.0, False,
                                lines.append) == (10, None)  # fmt: skip
    assert "10 epoch(s) (--epochs 10; the budget affords 683)" in lines[0], lines
    lines.clear()  # less than an epoch left: one epoch of what the rest affords, no fewer images than a trial drew
    assert auto_plan.run_epochs(TrainConfig(budget="7s", refit=False), [trial], trial, 4.0, False, lines.append) == (
        1, 50)  # fmt: skip
    assert lines == ["auto: the 7s budget leaves 3.0s after the trials: 1 epoch of 50 of the 100 images, about 1.0s "
                     "over it; at the trial's pace an epoch of 100 takes about 5.0s (2.0s training, 3.0s validation "
                     "and checkpoints)"]  # fmt: skip
    lines.clear()  # --epochs 1 asked and trained: "1 epoch (not the 1 of epochs)" said otherwise
    auto_plan.run_epochs(TrainConfig(budget="7s", refit=False, epochs=1), [trial], trial, 4.0, False, lines.append)
    assert lines[0].startswith("auto: the 7s budget leaves 3.0s after the trials: 1 epoch of 50 of the 100 images,")
    lines.clear()  # a pilot measured the run's set-up: it comes out of what is left; 95 % of 4.5 s, less 3 s: 63 images
    assert auto_plan.run_epochs(TrainConfig(budget="9s", refit=False), [trial], trial, 4.0, False, lines.append,
                                setup_s=0.5) == (1, 63)  # fmt: skip
    assert lines == ["auto: the 9s budget leaves 4.5s after the trials and the run's set-up (about 0.5s): 1 epoch of "
                     "63 of the 100 images; at the trial's pace an epoch of 100 takes about 5.0s (2.0s training, 3.0s "
                     "validation and checkpoints)"]  # fmt: skip
    lines.clear()  # a pilot shortened the epochs to 100 of 400, and the trial's pace affords 277: one epoch of them
    assert auto_plan.run_epochs(TrainConfig(budget="9s", refit=False), [trial], trial, 0.0, False, lines.append,
                                setup_s=0.0, longest=400) == (1, 277)  # fmt: skip
    assert lines[0].startswith("auto: the 9s budget leaves 9.0s after the trials: 1 epoch of 277 of the 400 images; ")
    lines.clear()  # an unfreeze schedule opens more stages, whose epochs the trial's pace does not count: said
    auto_plan.run_epochs(TrainConfig(budget="20s", refit=False, unfreeze="epoch:1"), [trial], trial, 4.0, False,
                         lines.append)  # fmt: skip
    assert lines[0].endswith("checkpoints); the epochs after --unfreeze epoch:1 opens more stages train slower than "
                             "that, and may end the run past the budget"), lines  # fmt: skip
    auto.run(recipe_cfg(data, tmp_path / "r", epochs=1, cache="auto"), echo=lambda _: None)
    (trial,) = json.loads((tmp_path / "r" / "recipe.json").read_text())["trials"][:1]
    assert trial["loop_s"] > trial["epoch_s"] * auto.TRIAL_FRACTION and trial["val_s"] > 0 and trial["epoch_images"]
    # the pace of an evaluation of the whole model: a cached trial's validation ran the suffix on stored features, and
    # the store's build (image loading and the frozen prefix) is added to it
    assert trial["eval_item_s"] > trial["val_s"] / trial["n_val"]


def test_a_budget_keeps_time_for_the_final_test_where_its_stores_were_read_from_disk_at_their_builds_pace(data,
                                                                                                          tmp_path):  # fmt: skip
    # the stores read back (a cache dir's, or an earlier attempt's in a run stopped during its trials and run again),
    # their build unseen: no time was kept, and the resumed run ended past its budget. A store records its build's
    # pace; one of an earlier freezetune, which recorded none, keeps no time, said
    said = "budget keeps no time for the final test of 12 images: no evaluation of the whole model was timed"
    for run in ("first", "second", "older"):
        if run == "older":
            for path in (tmp_path / "f").glob("*.pt"):
                record = torch.load(path, weights_only=True)
                torch.save({k: v for k, v in record.items() if k != "item_s"}, path)
        lines = []
        auto.run(recipe_cfg(data, tmp_path / run, budget="30s", epochs=1, cache="auto", cache_dir=str(tmp_path / "f")),
                 echo=lines.append)  # fmt: skip
        kept = any("kept for the final test" in line for line in lines)
        read = any("read from" in line for line in lines)
        assert (kept, any(said in line for line in lines), read) == (
            (True, False, run != "first") if run != "older" else (False, True, True)), (run, lines)  # fmt: skip
        # recipe.json keeps what the budget spent before the run, kept for the test, and its plan's lines
        budget = json.loads((tmp_path / run / "recipe.json").read_text())["budget"]
        assert (budget["test_s"] > 0) == kept and budget["spent_s"] > 0 and budget["plan"]
        assert [line for line in lines if line in budget["plan"]] == budget["plan"]


def test_a_budget_keeps_time_for_the_final_test_at_the_measured_pace_of_an_evaluation():
    # the final test ran after the time the budget planned for, and ended the call past it
    trial = {"epoch_s": 2.0, "epoch_images": 100.0, "loop_s": 4.0, "val_s": 2.5, "n_val": 50, "eval_item_s": 0.002}
    test_s = auto_plan.final_test_seconds([None, trial], 2_000)
    assert test_s == pytest.approx(4.0) and auto_plan.final_test_seconds([trial], None) == 0.0
    lines = []
    assert auto_plan.run_epochs(
        TrainConfig(budget="20s", refit=False), [trial], trial, 4.0, False, lines.append, test_s=test_s
    ) == (2, None)  # 12 s left, not 16 s: 2 epochs of 5 s, not 3
    assert lines[0].startswith("auto: the 20s budget leaves 12s after the trials, and about 4.0s kept for the final "
                               "test: 2 epoch(s) of about 5.0s")  # fmt: skip


@pytest.mark.parametrize("probed", [False, True])
def test_the_auto_recipe_scales_explicit_stage_lrs_with_the_head_keeping_the_users_ratio(data, tmp_path, capsys,
                                                                                        monkeypatch, probed):  # fmt: skip
    # the recipe's boost moved the head alone: blocks.4 asked 10 times slower than the head trained 67 times slower
    monkeypatch.setattr(auto_plan, "PROBE_BELOW_STEPS", 10 if probed else 1)  # (the trials take 3 steps)
    monkeypatch.setattr(auto_plan, "PROBE_MIN_RUN_STEPS", 0)  # however short the run
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
    from freezetune.training import trainer

    cfg = recipe_cfg(data, tmp_path / "run", epochs=2, unfreeze={1: "blocks.1"})
    trainer.train(cfg, echo=lambda line: None)
    lines = []
    trainer.train(dataclasses.replace(cfg, resume=True), echo=lines.append)
    assert any(line.startswith("auto: resuming with the earlier decision") for line in lines)


def test_an_auto_run_without_an_lr_schedule_resumes_for_more_epochs_as_a_plain_run_does(data, tmp_path, capsys):
    # --scheduler none: a plain run's resume may train on for more --epochs; the auto run's was refused ("cannot
    # resume ... with epochs 1 -> 2: an auto run continues as it was asked")
    out = tmp_path / "run"
    argv = train_argv(data, out, "--epochs", "1", "--scheduler", "none")
    assert run_cli(capsys, *argv)[0] == 0
    code, said, err = run_cli(capsys, "train", "--out", out, "--resume", "--epochs", "2")
    assert code == 0 and "auto: the run trains 2 epoch(s), as --epochs asks now (it planned 1)" in said, err
    assert [row["epoch"] for row in read_metrics(out / "metrics.csv")] == [1, 2]
    # recorded: a plain --resume reads the request in recipe.json (its 1 epoch was refused below the 2 trained)
    decision = json.loads((out / "recipe.json").read_text())
    assert decision["asked"]["epochs"] == decision["choice"]["epochs"] == 2
    code, said, err = run_cli(capsys, "train", "--out", out, "--resume")
    assert code == 0 and "all 2 epochs were trained" in said, err
    code, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--epochs", "3", "--lr", "0.1")  # still refused
    assert code == 2 and "lr 0.001 -> 0.1" in err and "epochs" not in err, err


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
    monkeypatch.setattr(auto_trials, "trial", lambda *_a, **_k: {"n_val": n_val, "data_kind": "images"})
    trials, _, why = auto_trials.measure(None, [2, 3, 4], 1.0, Path("unused"), None, lambda line: None)
    assert len(trials) == 1 and f"near 75 % is {said} points" in why, why


def test_an_auto_run_that_unfreezes_below_its_cut_caches_at_the_new_boundary(data, tmp_path, capsys):
    # the run pins its trials' cut (cache_at): once an unfreeze opened a stage before it, "feature cache off: cannot
    # cut at 'blocks.1'" and every later epoch ran the whole network (--cache memory: under auto, blocks.0 opens with
    # one epoch left, too few draws to pay for a store)
    argv = train_argv(data, tmp_path / "run", "--epochs", "3", "--unfreeze", "epoch:1", "--cache", "memory")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "feature cache off" not in out
    assert "feature cache: a stage before 'blocks.1' trains now; cut at the first trainable stage\n" in out, out
    assert "unfroze blocks.0" in out and "cached at the input of blocks.0" in out.split("unfroze blocks.0")[1], out
    # under auto the last epoch's draws do not pay for a store: the features at the new cut are computed per batch
    argv = train_argv(data, tmp_path / "auto", "--epochs", "3", "--unfreeze", "epoch:1", "--cache", "auto")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "feature cache off" not in out
    after = out.split("unfroze blocks.0")[1]
    assert "no training store: each batch runs the frozen layers before blocks.0" in after, out
    assert "\n  the 1 epoch(s) left draw" in after, out  # the why, on an indented line of its own


def test_the_choice_among_trials_that_beat_the_default_prefers_the_cheaper_on_a_tie_and_floors_the_noise():
    # the rule's promises: of two candidates that both beat the default by more than the noise and tie, the one
    # training fewer stages (faster); a validation split scored all right (or all wrong) is not noiseless
    trials = [{"trained_stages": k, "val_acc": acc} for k, acc in ((2, 0.95), (3, 0.80), (4, 0.95))]
    assert auto_rule.choose(trials, n_val=5000)["trained_stages"] == 2
    assert auto_rule.difference_noise(1.0, 20) == pytest.approx((2 / 20 / 20) ** 0.5)
    assert auto_rule.difference_noise(1.0, 20, floored=False) == 0.0
    wrong = [{"trained_stages": 2, "val_acc": 0.05}, {"trained_stages": 3, "val_acc": 0.0}]
    assert auto_rule.choose(wrong, n_val=20)["trained_stages"] == 3  # one image of 20 more: inside the floor's noise


def test_a_warm_up_as_long_as_the_epochs_a_budget_plans_is_scaled_not_refused_after_the_trials():
    lines = []
    assert auto_plan.run_warmup(TrainConfig(epochs=4, warmup_epochs=1), 2, lines.append) == 1 and not lines
    # equal: "warmup_epochs must be in [0, epochs)" was the refusal this avoids, as for a longer warm-up
    assert auto_plan.run_warmup(TrainConfig(epochs=4, warmup_epochs=2), 2, lines.append) == 1.0
    assert lines == ["auto: --warmup-epochs 2 is as long as the 2 epoch(s) the budget plans: the run warms up for 1, "
                     "the share of the run it was of --epochs 4"]  # fmt: skip


def test_a_budget_that_plans_fewer_epochs_than_the_warm_up_scales_it_and_says_what_it_replaced(data, tmp_path, capsys):
    # the trials ran, then "invalid config: warmup_epochs must be in [0, epochs), got 2.0": a budget's one epoch
    # against a warm-up checked against --epochs; and that path dropped --epochs 4 without a word
    argv = train_argv(data, tmp_path / "run", "--epochs", "4", "--budget", "0.01s", "--scheduler", "cosine",
                      "--warmup-epochs", "2")  # fmt: skip
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    said = r"budget, and the run's set-up takes about [\d.]+s and the final test about [\d.]+s: the run trains one epoch \(not the 4 of epochs\) of \d+ of the \d+ images, over it"
    assert re.search(said, out), out
    assert "auto: --warmup-epochs 2 is as long as the 1 epoch(s) the budget plans: the run warms up for 0.5, the " \
           "share of the run it was of --epochs 4" in out, out  # fmt: skip
    run = tmp_path / "run"
    assert json.loads((run / "recipe.json").read_text())["choice"]["warmup_epochs"] == 0.5
    assert len(read_metrics(run / "metrics.csv")) == 1


def test_a_large_feature_cache_kept_in_the_run_dir_is_named_at_the_end(data, tmp_path, monkeypatch):
    # a run dir of 100 000 images at 224 px kept 12 GiB of features, unsaid; a --cache-dir the user chose is not named
    monkeypatch.setattr(auto, "KEPT_CACHE_SAID_MIB", 0)
    for run, cache_dir in (("own", None), ("given", str(tmp_path / "shared"))):
        lines = []
        auto.run(recipe_cfg(data, tmp_path / run, epochs=1, cache="auto", cache_dir=cache_dir), echo=lines.append)
        said = [line for line in lines if line.startswith("note: the feature cache (")]
        features = tmp_path / run / "features"
        assert said == ([f"note: the feature cache (0 MiB) stays in {features} for a --resume, and for later runs "
                         f"given --cache-dir {features}; delete it to reclaim the space"] if cache_dir is None else []
                        ), lines  # fmt: skip


def test_a_stop_in_a_trial_before_the_run_dir_is_made_does_not_offer_resume(tmp_path):
    # "the same command, with or without --resume, starts them again": with --resume it was refused, "does not exist"
    import signal

    from freezetune.run.interrupt import RunInterrupted

    def stopped(cfg, **kwargs):
        raise RunInterrupted.by(signal.SIGTERM, "outside a training step")

    cfg = TrainConfig(data=str(tmp_path / "d"), out=str(auto_trials.trial_dir(tmp_path / "run", 3)))
    lines = []
    for made in (False, True):
        if made:
            (tmp_path / "run").mkdir()
        with pytest.raises(RunInterrupted) as caught:
            auto_trials.measurement(cfg, stopped, print, brief=True, during="the trial", again="them again")
        lines.append(str(caught.value))
    assert lines == ["stopped by SIGTERM during the trial; the same command (without --resume: the run dir was not "
                     "made yet) starts them again",
                     "stopped by SIGTERM during the trial; the same command, with or without --resume, starts them "
                     "again"]  # fmt: skip


def test_a_trials_row_counts_the_images_of_a_run_epoch_rather_than_its_pace_times_its_seconds(tmp_path):
    # 68 of 135 images trained in the trial: its pace times its seconds, doubled, put a run's epoch at 136 (and a
    # budget's line at "146 of the 151 images" where refit made 150)
    from freezetune.training.progress import RunResult

    base = TrainConfig(data="d")
    trial_cfg = auto_trials.trial_config(base, 3, auto_rule.LR_BOOST, tmp_path)
    history = [{"epoch": 1, "epoch_time_s": 2.0, "img_per_s": 34.0, "val_acc": 0.5, "val_n": 15}]
    result = RunResult(tmp_path, 1, 0.5, history=history, train_items=135, steps_per_epoch=5)
    row = auto_trials.trial_row(base, 3, trial_cfg, result, {"epochs": 2.5}, lambda line: None)
    assert row["epoch_images"] == 135 and row["epoch_s"] == pytest.approx(2.0 * 135 / 68)
    # the rest of the trial's loop is its loop less the 2 s it trained (not less half of 135 images' pace: 1.985 s)
    assert auto_plan.epoch_pace({**row, "val_s": 0.0}, refit=False, n_val=15)[1] == pytest.approx(0.5)
    assert auto_plan._whole_epoch(row, True, 15) == 150  # a refit run's epoch: every image once
