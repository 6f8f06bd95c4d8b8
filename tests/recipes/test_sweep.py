"""Sweeps end to end on a tiny model (``recipes/sweep.py``, ``recipes/sweep_report.py``): the table, plot and winner
config, the feature cache shared across recipes, budgets, and resuming a sweep."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from _engine_fixtures import make_image_folder, recipe_cfg, run_cli, train_argv
from freezetune.auto import recipe as auto
from freezetune.auto import rule as auto_rule
from freezetune.config.file import load_config
from freezetune.config.train_config import TrainConfig
from freezetune.errors import ConfigError
from freezetune.recipes import named as recipes
from freezetune.run.reporting import read_metrics


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # no val/ folder: the validation split is held out of train, and test/ is scored only at the end
    return make_image_folder(tmp_path_factory.mktemp("images"), train=14, val=0, test=4)


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
    # ...reading the features the recipes shared (cache_dir null: the winner's run computed them all again)
    assert Path(winner["cache_dir"]) == features.resolve()
    code, _, err = run_cli(capsys, "train", "--config", tmp_path / "sweep" / "winner.yaml", "--out", tmp_path / "w")
    assert code == 0, err
    again = max(r["val_acc"] for r in read_metrics(tmp_path / "w" / "metrics.csv"))
    assert again == pytest.approx(best["val_acc"], abs=1e-9)
    assert len(prefix_calls) == first  # (full caches nothing; the others' prefixes were read back)


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


def test_the_sweep_plot_rings_each_point_of_the_pareto_front_even_a_front_of_one():
    # the front was a dashed line through its points: a recipe both fastest and most accurate drew nothing
    from freezetune.recipes.sweep_report import _figure

    def row(name, acc, seconds):
        return {"recipe": name, "val_acc": acc, "train_s": seconds}

    for rows, front in [([row("linear-probe", 0.9, 1.0), row("full", 0.8, 9.0)], [(1.0, 90.0)]),
                        ([row("linear-probe", 0.7, 1.0), row("full", 0.8, 9.0)], [(1.0, 70.0), (9.0, 80.0)])]:  # fmt: skip
        ax = _figure(rows, "linear-probe").axes[0]
        handles, labels = ax.get_legend_handles_labels()
        ringed = handles[labels.index("Pareto front")].get_offsets().tolist()
        assert sorted(map(tuple, ringed)) == front


def test_sweep_reads_a_comma_separated_string_as_recipe_names(tmp_path):
    from freezetune.recipes.sweep import sweep

    with pytest.raises(ConfigError, match="unknown recipe 'lastk'"):  # it read 'l', the first letter
        sweep(TrainConfig(data="images"), "linear-probe, lastk", out=tmp_path / "s")


def test_a_resumed_sweep_keeps_the_measured_seconds_of_the_recipes_finished_before(data, tmp_path, monkeypatch):
    from freezetune.recipes import named as recipes
    from freezetune.recipes.sweep import sweep

    real, measured, stopped = recipes.run, {}, []

    def interrupted_at_last_2(cfg, echo, **kwargs):
        if cfg.recipe == "last-2" and not stopped:
            stopped.append(cfg.recipe)
            raise KeyboardInterrupt  # Ctrl-C while the second recipe trains
        result = real(cfg, echo=echo, **kwargs)
        measured.setdefault(cfg.recipe, result.train_seconds)
        return result

    monkeypatch.setattr(recipes, "run", interrupted_at_last_2)
    cfg = recipe_cfg(data, None, epochs=1, cache="off")
    with pytest.raises(KeyboardInterrupt):
        sweep(cfg, "linear-probe,last-2", out=tmp_path / "sweep", echo=lambda _: None)
    resumed = sweep(TrainConfig(**{**cfg.to_dict(), "resume": True}), "linear-probe,last-2", out=tmp_path / "sweep",
                    echo=lambda _: None)  # fmt: skip
    rows = {r["recipe"]: r for r in read_metrics(tmp_path / "sweep" / "sweep.csv")}
    assert rows["linear-probe"]["train_s"] == pytest.approx(measured["linear-probe"], rel=1e-6)
    assert [r["train_s"] for r in resumed.rows] == [measured["linear-probe"], measured["last-2"]]


def test_a_sweep_resumes_from_its_out_alone_with_its_own_settings_and_recipes(data, tmp_path, capsys, monkeypatch,
                                                                              caplog):  # fmt: skip
    # "sweep --out S --resume" said "data is required": unlike train's, a sweep's resume needed its whole command
    real, stopped = recipes.run, []

    def interrupted_at_last_2(cfg, echo, **kwargs):
        if cfg.recipe == "last-2" and not stopped:
            stopped.append(cfg.recipe)
            raise KeyboardInterrupt  # Ctrl-C while the second recipe trains
        return real(cfg, echo=echo, **kwargs)

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
    (tmp_path / "none").mkdir()
    code, _, err = run_cli(capsys, "sweep", "--out", tmp_path / "none", "--resume")
    assert code == 2 and err.strip() == (f"freezetune: error: cannot resume: '{tmp_path / 'none'}' holds no sweep "
                                         "(sweep_config.yaml); give the sweep's --out (out=...) or its whole command")  # fmt: skip
    # its whole command into a mistyped --out started a new sweep there
    typo = train_argv(data, tmp_path / "typo", "--epochs", "1")[1:]
    code, _, err = run_cli(capsys, "sweep", *typo, "--recipes", "linear-probe", "--resume")
    assert (
        code == 2 and f"cannot resume: '{tmp_path / 'typo'}' does not exist" in err and not (tmp_path / "typo").exists()
    )
    assert err.strip().endswith("or start it without --resume (resume=False)"), err  # it said resume=True
    # a budget given with a resume is the one it runs with: recorded for the next (the file kept saying 1h)
    code, _, err = run_cli(capsys, "sweep", "--out", out, "--resume", "--budget", "2h")
    assert code == 0, err
    settings = yaml.safe_load((out / "sweep_config.yaml").read_text())
    assert settings["budget"] == "2h" and settings["label_smoothing"] == 0.2
    # a winner.yaml the user edited (refit: true, as the docs suggest) was written over by the next resume, unsaid
    written = (out / "winner.yaml").read_text()
    (out / "winner.yaml").write_text(written.replace("refit: false", "refit: true"))
    with caplog.at_level("WARNING", logger="freezetune"):
        code, said, err = run_cli(capsys, "sweep", "--out", out, "--resume", "--budget", "2h")
    assert code == 0 and (out / "winner.yaml").read_text() == written, err
    assert "refit: true" in (out / "winner.earlier-1.yaml").read_text()
    assert (
        "winner.yaml differed from the winner's config this sweep writes (edited, or an earlier winner's): kept "
        "as winner.earlier-1.yaml" in caplog.text
    ), caplog.text
    code, _, err = run_cli(capsys, "sweep", "--out", out, "--resume", "--budget", "2h")  # the same: nothing kept
    assert code == 0 and not (out / "winner.earlier-2.yaml").exists(), err


def test_a_sweep_refuses_cache_at_in_one_line_and_a_stop_before_it_recorded_anything_promises_no_resume(
    tmp_path, capsys
):
    # --cache-at was checked as an auto run's ("needs a freeze spec"), and a freeze spec given then was refused too
    import argparse

    from freezetune.cli import main as cli

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

    from freezetune.recipes.sweep import sweep
    from freezetune.run.interrupt import RunInterrupted
    from freezetune.training import trainer

    real = trainer.train

    def stopped_in_a_trial(cfg, **kw):
        if "auto-trials" in cfg.out:
            raise RunInterrupted.by(signal.SIGINT, "at once (nothing saved); the same command restarts it")
        return real(cfg, **kw)

    cfg = recipe_cfg(data, None, epochs=1, cache="off")
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
    from freezetune.recipes.sweep import ROW_FILE, sweep

    cfg = recipe_cfg(data, None, epochs=1, cache="off")
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
    from freezetune.recipes import named as recipes
    from freezetune.recipes.sweep import sweep

    real, stopped = recipes.run, []

    def stopped_before_auto(cfg, echo, **kwargs):
        if cfg.recipe == "auto" and not stopped:
            stopped.append(cfg.recipe)
            raise KeyboardInterrupt  # Ctrl-C between two recipes
        return real(cfg, echo=echo, **kwargs)

    monkeypatch.setattr(recipes, "run", stopped_before_auto)
    cfg = recipe_cfg(data, None, epochs=1, cache="off")
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


def test_a_sweeps_recipes_given_as_key_value_are_its_recipes_and_refused_beside_recipes(data, tmp_path, capsys):
    # recipes=... was refused as an unknown key, "did you mean 'recipe'", which a sweep refuses too
    code, out, err = run_cli(capsys, "sweep", *train_argv(data, tmp_path / "sweep")[1:], "recipes=[full, last-2]",
                             "--print-config")  # fmt: skip
    assert code == 0 and yaml.safe_load(out)["recipes"] == "full,last-2", err
    code, out, err = run_cli(capsys, "sweep", *train_argv(data, tmp_path / "sweep")[1:], "recipes=full",
                             "--recipes", "linear-probe")  # fmt: skip
    assert code == 2 and "the recipes are given twice (--recipes linear-probe, recipes=full)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "sweep").exists()
    code, out, err = run_cli(capsys, "sweep", *train_argv(data, tmp_path / "sweep")[1:], "recipes=null")
    assert code == 2 and "no recipe to sweep" in err and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("flag", ["--data", "--val-data"])
def test_a_sweep_on_data_that_does_not_exist_is_one_line_and_leaves_no_folder(data, tmp_path, capsys, flag):
    # it said "sweep: recipe linear-probe" and the recipe's phase before the error, and left sweep.log and its config
    code, out, err = run_cli(capsys, "sweep", *train_argv(data, tmp_path / "sweep")[1:], flag, tmp_path / "nope",
                             "--recipes", "linear-probe")  # fmt: skip
    assert code == 2 and f"path '{tmp_path / 'nope'}' does not exist" in err and len(err.strip().splitlines()) == 1
    assert not out.strip() and not (tmp_path / "sweep").exists()


def test_a_sweep_into_its_data_or_onto_a_file_is_refused_before_it_writes_anything(tmp_path, capsys):
    # refused by its first recipe's run, it had written sweep.log and its settings inside data/train: every later run
    # on the data read the sweep's folder as a class with no images
    images = make_image_folder(tmp_path / "images", train=4, val=0, test=0)
    before = sorted(p.relative_to(images) for p in images.rglob("*"))
    code, out, err = run_cli(capsys, "sweep", *train_argv(images, images / "train" / "s")[1:], "--recipes", "full")
    assert code == 2 and "lies inside the data folder" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.relative_to(images) for p in images.rglob("*")) == before
    (tmp_path / "afile.txt").write_text("mine")  # said as train says it, not as the OS's "File exists"
    code, out, err = run_cli(capsys, "sweep", *train_argv(images, tmp_path / "afile.txt")[1:], "--recipes", "full")
    assert code == 2 and "is a file, not a directory" in err and (tmp_path / "afile.txt").read_text() == "mine", err
    # a file of a recipe's name in --out: refused once linear-probe had trained, and the sweep left unfinished
    (tmp_path / "su").mkdir()
    (tmp_path / "su" / "full").write_text("mine")
    code, out, err = run_cli(
        capsys, "sweep", *train_argv(images, tmp_path / "su")[1:], "--recipes", "linear-probe,full"
    )
    assert code == 2 and "cannot hold the folder of recipe(s) full (" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "su").iterdir()) == ["full"], err
    # a file where the recipes' shared features go: refused after sweep.log and sweep_config.yaml were written
    (tmp_path / "sf").mkdir()
    (tmp_path / "sf" / "features").write_text("mine")
    code, out, err = run_cli(capsys, "sweep", *train_argv(images, tmp_path / "sf")[1:], "--recipes", "linear-probe")
    assert code == 2 and "cannot hold the features the recipes share, " in err and "give --cache-dir" in err, err
    assert sorted(p.name for p in (tmp_path / "sf").iterdir()) == ["features"] and len(err.strip().splitlines()) == 1


def test_sweep_refuses_an_option_one_of_its_recipes_sets_itself(data, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sweep", *train_argv(data, tmp_path / "sweep", "--unfreeze", "epoch:2")[1:],
                           "--recipes", "linear-probe,gradual")  # fmt: skip
    assert code == 2 and "recipe 'gradual' sets unfreeze itself" in err and "recipe 'linear-probe'" in err
    assert not (tmp_path / "sweep").exists()


def test_a_sweeps_budget_counts_each_second_once_and_its_winner_names_absolute_paths(tmp_path, monkeypatch):
    from freezetune.recipes import sweep as sweep_mod
    from freezetune.recipes import sweep_report

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
    from freezetune.recipes import sweep as sweep_mod

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
    from freezetune.recipes import sweep as sweep_mod

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
    from freezetune.recipes import sweep as sweep_mod

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
    from freezetune.recipes import sweep as sweep_mod
    from freezetune.training.progress import RunResult

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
    from freezetune.recipes import sweep as sweep_mod

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
    from freezetune.recipes import sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "_run_recipe", lambda *a: pytest.fail("a recipe trained"))
    with pytest.raises(ConfigError, match=r"recipe 'last-99': k is out of range .* choose last-1 to last-"):
        sweep_mod.sweep(TrainConfig(data="images", model="timm:test_efficientnet"), "full,last-99", out=tmp_path / "s")


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


def test_a_sweep_given_a_freeze_spec_names_only_what_was_given(tmp_path):
    from freezetune.recipes.sweep import sweep

    with pytest.raises(ConfigError, match=r"drop freeze -2 \(recipe=null freeze=auto\)$"):  # it said "recipe None"
        sweep(TrainConfig(data="images", freeze=-2), "full", out=tmp_path / "s")


def test_trials_and_sweep_rows_are_compared_by_validation_accuracy_whatever_the_monitor(data, tmp_path, monkeypatch):
    # with --monitor val_loss the trials' and rows' "val_acc" held the loss: the highest loss won
    from freezetune.recipes.sweep import sweep

    auto.run(recipe_cfg(data, tmp_path / "auto", monitor="val_loss", epochs=1, cache="auto"), echo=lambda line: None)
    trials = json.loads((tmp_path / "auto" / "recipe.json").read_text())["trials"]
    assert trials and all(0 <= t["val_acc"] <= 1 for t in trials)
    done = sweep(recipe_cfg(data, None, monitor="val_loss", epochs=2), "linear-probe,last-2", out=tmp_path / "s",
                 echo=lambda line: None)  # fmt: skip
    for row in done.rows:
        history = read_metrics(Path(row["run_dir"]) / "metrics.csv")
        best = next(r for r in history if int(r["epoch"]) == row["best_epoch"])
        assert row["val_acc"] == pytest.approx(float(best["val_acc"]))


def test_under_monitor_val_f1_trials_and_sweep_rows_are_compared_by_macro_f1(data, tmp_path):
    # imbalanced classes: accuracy can sit at the majority class's share while the small classes go unrecognised
    from freezetune.recipes.sweep import sweep

    lines = []
    auto.run(recipe_cfg(data, tmp_path / "auto", monitor="val_f1", epochs=1, cache="auto"), echo=lines.append)
    decision = json.loads((tmp_path / "auto" / "recipe.json").read_text())
    trials = decision["trials"]
    assert trials and all(0 <= t["val_f1"] <= 1 and 0 <= t["val_acc"] <= 1 for t in trials)
    assert decision["compared_by"] == "val_f1" and decision["choice"]["refit"]
    assert any(line.startswith("auto: last 3 stage(s) + head at lr") and ": val macro-F1 " in line for line in lines)
    # refit leaves no validation in the run: best.pt is its last epoch, whatever --monitor asked; said, with the way out
    assert any("(refit), so best.pt is the run's last epoch, not its best by val_f1: --no-refit" in ln for ln in lines)
    assert any(ln.startswith("test accuracy ") and "%, macro-F1 " in ln for ln in lines)
    lines.clear()
    done = sweep(recipe_cfg(data, None, monitor="val_f1", epochs=2), "linear-probe,last-2", out=tmp_path / "s",
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
    from freezetune.recipes.sweep import pick_winner
    from freezetune.recipes.sweep_report import pareto_front

    trials = [{"trained_stages": 2, "val_acc": 0.80, "val_f1": 0.70}, {"trained_stages": 3, "val_acc": 0.83,
              "val_f1": 0.60}, {"trained_stages": 4, "val_acc": 0.90, "val_f1": 0.50}]  # fmt: skip
    assert auto_rule.choose(trials, n_val=5000)["trained_stages"] == 4
    assert auto_rule.choose(trials, n_val=5000, metric="val_f1")["trained_stages"] == 2
    rows = [{"recipe": r, "val_acc": a, "val_f1": f, "train_s": t} for r, a, f, t in
            [("full", 0.90, 0.50, 30.0), ("last-2", 0.85, 0.70, 10.0), ("linear-probe", 0.80, 0.40, 5.0)]]  # fmt: skip
    assert pick_winner(rows)["recipe"] == "full" and pick_winner(rows, "val_f1")["recipe"] == "last-2"
    assert [r["recipe"] for r in pareto_front(rows, "val_f1")] == ["linear-probe", "last-2"]


def test_a_sweep_replaces_no_winner_yaml_it_did_not_write_and_an_unfinished_sweep_only_resumes(data, tmp_path):
    # a user's winner.yaml (and sweep_config.yaml) in --out were replaced silently: only sweep.csv was looked for
    from freezetune.recipes.sweep import SETTINGS_FILE, sweep

    quiet = dict(echo=lambda line: None)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "winner.yaml").write_text("mine: 1\n")
    for resume in (False, True):
        with pytest.raises(ConfigError, match="holds a winner.yaml no sweep wrote there"):
            sweep(recipe_cfg(data, None, epochs=1, resume=resume), "linear-probe", out=tmp_path / "mine", **quiet)
    assert (tmp_path / "mine" / "winner.yaml").read_text() == "mine: 1\n"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["winner.yaml"]
    # nor beside a sweep.csv of the user's: refused "already holds a sweep (sweep.csv); pass --resume", which then
    # started a sweep afresh over both
    (tmp_path / "mine" / "sweep.csv").write_text("my,table\n")
    for resume in (False, True):
        with pytest.raises(ConfigError, match="holds a sweep.csv and a winner.yaml no sweep wrote there"):
            sweep(recipe_cfg(data, None, epochs=1, resume=resume), "linear-probe", out=tmp_path / "mine", **quiet)
    assert (tmp_path / "mine" / "sweep.csv").read_text() == "my,table\n"
    assert (tmp_path / "mine" / "winner.yaml").read_text() == "mine: 1\n"
    # nor a sweep_config.yaml or a sweep.png of the user's (they were replaced, exit 0)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / SETTINGS_FILE).write_text("my notes\n")
    (tmp_path / "notes" / "sweep.png").write_bytes(b"\x89PNG my plot")
    with pytest.raises(ConfigError, match="holds a sweep_config.yaml and a sweep.png no sweep wrote there"):
        sweep(recipe_cfg(data, None, epochs=1), "linear-probe", out=tmp_path / "notes", **quiet)
    assert (tmp_path / "notes" / SETTINGS_FILE).read_text() == "my notes\n"
    (tmp_path / "logs").mkdir()  # nor a sweep.log of the user's, which the sweep's lines were appended to
    (tmp_path / "logs" / "sweep.log").write_text("my log\n")
    with pytest.raises(ConfigError, match="holds a sweep.log no sweep wrote there"):
        sweep(recipe_cfg(data, None, epochs=1), "linear-probe", out=tmp_path / "logs", **quiet)
    assert (tmp_path / "logs" / "sweep.log").read_text() == "my log\n"
    assert (tmp_path / "notes" / "sweep.png").read_bytes() == b"\x89PNG my plot"
    (tmp_path / "stopped" / "linear-probe").mkdir(parents=True)
    (tmp_path / "stopped" / SETTINGS_FILE).write_text("lr: 0.001\n")  # what a sweep stopped in its first recipe left
    (tmp_path / "stopped" / "linear-probe" / "last.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"holds a sweep that did not finish \(sweep_config.yaml\); pass --resume"):
        sweep(recipe_cfg(data, None, epochs=1), "linear-probe", out=tmp_path / "stopped", **quiet)
    # refused before any recipe trained (no validation data, say): the same folder runs again as asked, the fix given
    (tmp_path / "refused").mkdir()
    (tmp_path / "refused" / SETTINGS_FILE).write_text("lr: 0.001\nval_split: null\n")
    assert sweep(recipe_cfg(data, None, epochs=1), "linear-probe", out=tmp_path / "refused", **quiet).rows


def test_a_sweep_resumes_only_with_its_own_settings_and_never_into_a_training_run(data, tmp_path):
    # --resume --lr 0.05 read every row trained at 1e-3 back and wrote a winner.yaml with lr 0.05; a sweep into a
    # train run's dir put its files beside that run's checkpoints
    from freezetune.recipes.sweep import sweep

    quiet = dict(echo=lambda line: None)
    sweep(recipe_cfg(data, None, epochs=1), "linear-probe", out=tmp_path / "s", **quiet)
    with pytest.raises(ConfigError, match=r"cannot resume the sweep in .* with lr 0.001 -> 0.05: its recipes ran"):
        sweep(recipe_cfg(data, None, epochs=1, lr=0.05, resume=True), "linear-probe", out=tmp_path / "s", **quiet)
    # another list of recipes: the rewritten sweep.csv dropped the rows of those left out
    with pytest.raises(ConfigError, match=r"with recipes \['linear-probe'\] -> \['linear-probe', 'last-2'\]"):
        sweep(recipe_cfg(data, None, epochs=1, resume=True), "linear-probe,last-2", out=tmp_path / "s", **quiet)
    assert sweep(recipe_cfg(data, None, epochs=1, resume=True), "linear-probe", out=tmp_path / "s", **quiet).rows
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "classes.json").write_text('["a", "b"]')
    with pytest.raises(ConfigError, match=r"holds a training run \(classes.json\)"):
        sweep(recipe_cfg(data, None, epochs=1), "linear-probe", out=tmp_path / "run", **quiet)


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
    val = make_image_folder(tmp_path / "other", train=2, val=0, test=0) / "train"  # (its test split is refused)
    code, out, err = run_cli(capsys, "sweep", *train_argv(data, tmp_path / "sweep", "--epochs", "1")[1:],
                             "--recipes", "linear-probe,last-2", "--val-data", val)  # fmt: skip
    assert code == 0 and "winner: " in out, err
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--epochs", "1"))
    assert code == 0, err
    assert "there are no validation images to compare on" in out and "stay validation" not in out


def _as_3f213e7_wrote(settings: Path) -> None:
    """Rewrite a sweep's ``sweep_config.yaml`` as freezetune 3f213e7 (2026-12-03) wrote it: without the settings a
    resume may change, nor the budget, nor the settings added since (``frozen_dropout``, ``cuda_graph``)."""
    from freezetune.config.train_config import RESUME_MAY_CHANGE

    left_out = (*RESUME_MAY_CHANGE, "budget", "frozen_dropout", "cuda_graph")
    values = {k: v for k, v in yaml.safe_load(settings.read_text()).items() if k not in left_out}
    settings.write_text(yaml.safe_dump(values, sort_keys=False))


def test_a_refused_sweep_resume_leaves_the_sweep_as_it_was_and_an_earlier_freezetunes_settings_are_not_rewritten(
    data, tmp_path, capsys, monkeypatch
):
    # a resume refused by its recipe rewrote sweep_config.yaml first, with every setting this freezetune knows: the
    # freezetune that started the sweep then refused it ("holds a sweep_config.yaml no sweep wrote there")
    from _engine_fixtures import snapshot, stopping_at
    from freezetune.training import trainer

    out = tmp_path / "sweep"
    argv = [*train_argv(data, out, "--epochs", "2")[1:], "--recipes", "last-2"]
    with monkeypatch.context() as patch:  # Ctrl-C as the recipe's second epoch starts
        patch.setattr(trainer.Trainer, "_run_epoch", stopping_at(lambda run, epoch: epoch == 1))
        assert run_cli(capsys, "sweep", *argv)[0] == 130
    _as_3f213e7_wrote(out / "sweep_config.yaml")
    before, old = snapshot(out), (out / "sweep_config.yaml").read_bytes()
    flags = ("--device", "cpu", "--workers", "0", "--no-progress")  # (settings the earlier file does not hold)
    code, _, err = run_cli(capsys, "sweep", "--out", out, "--resume", *flags, "--frozen-dropout", "off")
    assert code == 2 and "frozen_dropout 'keep' -> 'off'" in err and snapshot(out) == before, err
    # a resume that changes nothing the file holds leaves it as it was, keys and all
    code, said, err = run_cli(capsys, "sweep", "--out", out, "--resume", *flags, "--budget", "1h")
    assert code == 0 and "winner: last-2" in said, err
    assert (out / "sweep_config.yaml").read_bytes() == old
