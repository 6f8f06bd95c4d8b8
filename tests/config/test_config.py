"""Run configuration: defaults, YAML files, ``key=value`` overrides, CLI flags, validation and ``--print-config``."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
import yaml

from _engine_fixtures import run_cli
from freezetune.cli.main import main
from freezetune.config.check import validate
from freezetune.config.file import load_config, parse_override
from freezetune.config.train_config import (
    TrainConfig,
    coerce,
    field_names,
    parse_freeze_spec,
    parse_stage_lrs,
    scalar_type,
)
from freezetune.errors import ConfigError


def _print_config(capsys, *argv: str) -> dict:
    code, out, err = run_cli(capsys, "train", "--print-config", *argv)
    assert code == 0, err
    return yaml.safe_load(out)


def test_print_config_shows_every_resolved_value(capsys):
    printed = _print_config(capsys, "--data", "imgs", "--lr", "3e-4", "--freeze", "backbone", "--no-progress")
    assert list(printed) == field_names()  # every key, in declaration order
    # its paths absolute, as config.yaml's: `--config run.yaml` from another directory read "imgs" there
    assert printed["data"] == os.path.abspath("imgs") and printed["lr"] == 3e-4 and printed["freeze"] == "backbone"
    assert printed["progress"] is False
    assert printed["epochs"] == TrainConfig().epochs and printed["model"] == TrainConfig().model  # defaults
    assert load_config(overrides=printed) == TrainConfig(data=os.path.abspath("imgs"), lr=3e-4, freeze="backbone",
                                                         progress=False)  # fmt: skip


def test_yaml_file_then_key_value_then_flags(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("data: imgs\nepochs: 7\nlr: 0.01\nbatch-size: 16\nstage_lrs: {blocks.4: 1.0e-4}\n")
    printed = _print_config(capsys, "--config", str(config), "epochs=5", "label_smoothing=0.2", "--epochs", "3")
    assert printed["epochs"] == 3  # a flag beats key=value, which beats the file
    assert printed["label_smoothing"] == 0.2 and printed["lr"] == 0.01 and printed["batch_size"] == 16
    assert printed["stage_lrs"] == {"blocks.4": 1e-4}


@pytest.mark.parametrize("null", ["null", "~"])  # not "key=": an unset shell variable's (refused, below)
def test_key_null_unsets_what_the_yaml_file_set(tmp_path, capsys, null):
    config = tmp_path / "run.yaml"
    config.write_text("data: imgs\ngrad_clip: 1.0\nval_split: 0.2\nrecipe: last-3\n")
    printed = _print_config(capsys, "--config", str(config), f"grad_clip={null}", f"val_split={null}")
    assert printed["grad_clip"] is None and printed["val_split"] is None
    # a sweep's winner.yaml names a recipe: unset it to give a freeze spec instead
    printed = _print_config(capsys, "--config", str(config), f"recipe={null}", "freeze=-2")
    assert printed["recipe"] is None and printed["freeze"] == -2
    assert _print_config(capsys, "--config", str(config))["grad_clip"] == 1.0  # flags not given override nothing


def test_null_for_a_field_that_cannot_be_unset_is_reported_with_its_default(capsys):
    code, out, err = run_cli(capsys, "train", "--data", "imgs", "--print-config", "lr=null", "freeze=~")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "lr cannot be null (unset); give float (default: 0.001)" in err and "freeze cannot be null" in err


def test_epoch_fraction_error_names_the_range_its_default_lies_in(capsys):
    assert _print_config(capsys, "--data", "x", "--epoch-fraction", "1.0")["epoch_fraction"] == 1.0
    code, _, err = run_cli(capsys, "train", "--data", "x", "--print-config", "--epoch-fraction", "1.5")
    assert code == 2 and "epoch_fraction must be in (0, 1], got 1.5" in err


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_print_config_under_torchrun_is_printed_by_the_first_process_alone(capsys, monkeypatch, command):
    # `torchrun ... --print-config > run.yaml` held one copy a rank: --config then refused its keys given twice
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main([command, "--data", "imgs", "--print-config"]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main([command, "--data", "imgs", "--print-config"]) == 0
    assert f"data: {os.path.abspath('imgs')}" in capsys.readouterr().out


def test_print_config_without_data_prints_a_template_that_a_run_still_refuses(capsys):
    printed = _print_config(capsys, "--epochs", "3")
    assert printed["data"] is None and printed["epochs"] == 3
    with pytest.raises(ConfigError, match="data is required"):
        load_config(overrides=printed)
    code, out, err = run_cli(capsys, "train", "--print-config", "--epochs", "0")  # other problems still count
    assert code == 2 and out == "" and "epochs must be >= 1" in err


@pytest.mark.parametrize(
    ("item", "key", "value"),
    [
        ("lr=3e-4", "lr", 3e-4),
        ("batch-size=64", "batch_size", 64),
        ("compile=true", "compile", True),
        ("img_size=null", "img_size", None),
        ("freeze=stem,blocks.0", "freeze", ["stem", "blocks.0"]),  # parsed once, here, into its final form
        ("freeze=-3", "freeze", -3),
        ("unfreeze=plateau:patience=2", "unfreeze", "plateau:patience=2"),
        ("stage_lrs=layer4=1e-4,layer3=5e-5", "stage_lrs", {"layer4": 1e-4, "layer3": 5e-5}),
    ],
)
def test_key_value_overrides_are_typed(item, key, value):
    assert parse_override(item) == (key, value)


def test_a_value_its_field_cannot_hold_as_given_is_refused_not_rounded():
    # epochs=2.5 trained 2 epochs and compile=maybe ran uncompiled, both without a word
    for item, needle in (
        ("epochs=2.5", "epochs expects int | None, got 2.5"),
        ("compile=maybe", "compile expects bool"),
    ):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config(overrides=dict([parse_override(item), ("data", "x")]))
    assert parse_override("epochs=3.0") == ("epochs", 3)
    words = {"off": False, "no": False, "0": False, "false": False, "on": True, "yes": True, "1": True}
    assert {w: parse_override(f"compile={w}")[1] for w in words} == words


def test_unknown_key_suggests_the_closest(capsys):
    code, out, err = run_cli(capsys, "train", "--data", "imgs", "--print-config", "epoch=3")
    assert code == 2 and out == ""
    assert err.startswith("freezetune: error: ") and len(err.strip().splitlines()) == 1
    assert "'epoch' (did you mean 'epochs'?)" in err
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_config(overrides={"batchsize": 4, "data": "x"})


def test_every_problem_of_a_config_is_reported_at_once_type_value_and_unknown_key(tmp_path, capsys):
    # one kind at a time: the type error alone, then the unknown key, then the value out of range
    (tmp_path / "c.yaml").write_text("data: x\nepoch: 3\nlr: fast\nbatch_size: 16.5\nbn: frozn\nimg_size: [32]\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml", {"epochs": 0})
    message = str(info.value)
    assert message.startswith("invalid config: ") and message.count("invalid config") == 1
    for needle in ("lr expects float, got 'fast'", "img_size expects int | None, got [32]", "unknown bn 'frozn'",
                   "epochs must be >= 1, got 0", "batch_size must be an integer, got 16.5",
                   "unknown config key(s) 'epoch' (did you mean 'epochs'?)"):  # fmt: skip
        assert needle in message, (needle, message)
    code, out, err = run_cli(capsys, "sweep", "--data", "x", "--recipes", "foo,full", "lrr=1", "epochs=x")
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out, err
    for needle in ("unknown recipe 'foo'", "epochs expects int | None, got 'x'", "'lrr' (did you mean 'lr'?)"):
        assert needle in err, (needle, err)


def test_a_negative_batch_size_from_the_command_line_is_out_of_range_not_a_non_integer(capsys):
    code, _, err = run_cli(capsys, "train", "--data", "d", "--batch-size", "-1", "--print-config")
    assert code == 2 and "batch_size must be >= 1, got -1 (or 'auto')" in err, err  # "must be an integer, got '-1'"


def test_val_data_and_val_split_together_are_refused_with_the_config(capsys):
    # --print-config accepted them and train refused them only when it read the data, after a recipe had started
    with pytest.raises(ConfigError, match=r"give either val_data \('v'\) or val_split \(0.2\), not both"):
        load_config(overrides={"data": "d", "val_data": "v", "val_split": 0.2})
    code, out, err = run_cli(capsys, "train", "--data", "d", "--val-data", "v", "--val-split", "0.2", "--print-config")
    assert code == 2 and "not both" in err and not out


def test_a_typo_in_python_names_the_key_it_meant():
    # the notebook user's TrainConfig(epoch=3) got Python's TypeError, which lists nothing; the same typo in YAML or
    # on the command line named "epochs"
    with pytest.raises(ConfigError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        TrainConfig(data="x", epoch=3)
    cfg = dataclasses.replace(TrainConfig(data="x", epochs=2), lr=0.5)  # the keys it knows still build it
    assert (cfg.epochs, cfg.lr) == (2, 0.5)


def test_bad_yaml_files_are_user_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "indented.yaml").write_text("data: x\n  lr: 1\n")  # where: it said "while parsing a block mapping"
    with pytest.raises(ConfigError, match=r"not valid YAML \(line 2, column 5\): mapping values are not allowed"):
        load_config(tmp_path / "indented.yaml")
    (tmp_path / "typed.yaml").write_text("data: x\nepochs: many\n")
    with pytest.raises(ConfigError, match=re.escape("epochs expects int | None, got 'many'")):
        load_config(tmp_path / "typed.yaml")
    # read as UTF-8 whatever the locale (a Windows code page turned C:\Users\José into mojibake); a file in another
    # encoding is one line, not a UnicodeDecodeError traceback
    (tmp_path / "utf8.yaml").write_bytes("data: /home/José/images\n".encode())
    assert load_config(tmp_path / "utf8.yaml").data == "/home/José/images"
    (tmp_path / "latin1.yaml").write_bytes("data: /home/José/images\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text .* save it as UTF-8"):
        load_config(tmp_path / "latin1.yaml")


def test_validation_reports_every_problem_at_once():
    cfg = TrainConfig(data=None, epochs=0, lr=-1.0, bn="melt", optimizer="lion", early_stop=0, unfreeze="weekly")
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    for needle in ("epochs must be >= 1", "lr must be > 0", "bn 'melt'", "'frozen'", "optimizer 'lion'",
                   "early_stop", "unfreeze schedule 'weekly'", "data is required"):  # fmt: skip
        assert needle in message, needle
    assert "\n" not in message and "warmup_epochs" not in message  # epochs 0 is said once, not as a warm-up too
    with pytest.raises(ConfigError, match="warmup_epochs must be in"):  # a negative warm-up is still its own problem
        validate(TrainConfig(data="x", epochs=0, warmup_epochs=-1.0))


@pytest.mark.parametrize(
    "kw, needle",
    [
        # each would train, wrongly, rather than fail: a negative clip flips every gradient's sign, a negative decay grows
        # the weights, momentum >= 1 never forgets; a negative worker count fails deep in the DataLoader
        ({"grad_clip": -1.0}, "grad_clip must be >= 0 (0 or unset: no clipping), got -1.0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0 and finite, got -0.1"),
        ({"momentum": 1.0}, "momentum must be in [0, 1), got 1.0"),
        ({"workers": -1}, "workers must be >= 0, got -1"),
        # an infinite lr or decay passed; decay <= 0 and a negative stage lr were refused only once the model was
        # built and the data scanned; an empty freeze (--freeze "$UNSET") froze nothing: a full fine-tune unasked
        ({"lr": float("inf")}, "lr must be > 0 and finite, got inf"),
        ({"weight_decay": float("inf")}, "weight_decay must be >= 0 and finite, got inf"),
        ({"decay": 0.0}, "decay must be >= 1 and finite"),
        (
            {"decay": 0.75},
            "decay must be >= 1 and finite, got 0.75: a stage at depth i below the head trains at lr / decay**i",
        ),
        ({"stage_lrs": {"layer4": -1e-4}}, "stage_lrs must be numbers >= 0 and finite, got layer4=-0.0001"),
        ({"freeze": []}, "freeze is empty; give auto (the default), backbone, all, none, bitfit, a number of stages"),
    ],
)
def test_values_that_would_train_wrong_are_refused(kw, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate(TrainConfig(data="imgs", **kw))
    ok = {"grad_clip": 0.0, "weight_decay": 0.0, "momentum": 0.0, "workers": 0, "lr": 10.0, "decay": 1.0,
          "stage_lrs": {"layer4": 0.0}, "freeze": "none"}  # fmt: skip
    validate(TrainConfig(data="imgs", **{k: ok[k] for k in kw}))  # the edge of each range is fine


def test_momentum_given_to_an_optimizer_without_it_is_noted_and_still_resumes():
    # --momentum 0.5 with the default adamw was ignored without a word; refused, an earlier run holding it in its
    # config.yaml could never resume
    from freezetune.training.optim import momentum_note

    assert "momentum 0.5 is SGD's (optimizer sgd); with optimizer 'adamw' it has no effect" in momentum_note(
        "adamw", 0.5, TrainConfig.momentum
    )
    assert momentum_note("sgd", 0.5, TrainConfig.momentum) is None
    assert momentum_note("adam", TrainConfig.momentum, TrainConfig.momentum) is None  # the default is no request
    validate(TrainConfig(data="imgs", momentum=0.5))


@pytest.mark.parametrize("kw, needle", [
    ({"val_split": 0.2}, "val_data and val_split keep theirs"),
    ({"val_data": "v"}, "val_data and val_split keep theirs"),
    ({"early_stop": 2}, "early_stop and a plateau unfreeze need"),
    ({"unfreeze": "plateau:patience=1"}, "early_stop and a plateau unfreeze need"),
    ({"unfreeze": " plateau:patience=1"}, "early_stop and a plateau unfreeze need"),  # as a YAML quote may keep it
])  # fmt: skip
def test_refit_is_refused_where_a_validation_set_is_kept_or_needed(kw, needle):
    validate(TrainConfig(data="x", refit=True))
    validate(TrainConfig(data="x", refit=False, **kw))
    with pytest.raises(ConfigError, match=needle):
        validate(TrainConfig(data="x", refit=True, **kw))


def test_valid_unfreeze_schedules_pass_validation():
    for schedule in ("epoch:2", "plateau:patience=2,min_delta=0.01,mode=min", {3: "blocks.4"}, "none", None):
        # mode=min: a loss's direction (with val_acc's, mode=min is refused: test_unfreezing)
        validate(TrainConfig(data="x", unfreeze=schedule, monitor="val_loss"))


def test_unfreeze_flag_takes_the_mapping_form_its_error_lists(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("data: x\nunfreeze: {1: blocks.6}\n")
    from_flag = _print_config(capsys, "--data", "x", "--unfreeze", "{1: blocks.6}")
    assert from_flag["unfreeze"] == {1: "blocks.6"} == load_config(tmp_path / "c.yaml").unfreeze
    assert _print_config(capsys, "--data", "x", "unfreeze={1: blocks.6}")["unfreeze"] == {1: "blocks.6"}
    code, _, err = run_cli(capsys, "train", "--data", "x", "--print-config", "--unfreeze", "{1: blocks.6")
    assert code == 2 and "bad unfreeze schedule '{1: blocks.6'; the forms are:" in err
    # and from Python, as every field is the flag of the same name (it was refused, its error listing that form)
    from_python = TrainConfig(data="x", unfreeze="{1: blocks.6}")
    validate(from_python)
    assert from_python.unfreeze == {1: "blocks.6"} and from_python == load_config(tmp_path / "c.yaml")


def test_freeze_list_in_yaml_stays_a_list_and_equals_the_cli_form(tmp_path):
    (tmp_path / "c.yaml").write_text("data: x\nfreeze: [stem, blocks.0, 2]\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.freeze == ["stem", "blocks.0", 2]
    assert load_config(overrides={"data": "x", "freeze": "stem,blocks.0,2"}) == cfg


def test_saved_config_round_trips(tmp_path):
    cfg = TrainConfig(data="imgs", model="timm:test_vit", img_size=32, freeze="stem,blocks.0", unfreeze={2: "blocks.4"},
                      stage_lrs={"blocks.4": 1e-4}, decay=2.5, grad_clip=1.0, channels_last=False, early_stop=3,
                      val_split=0.2, per_class=5, out=str(tmp_path / "run"))  # fmt: skip
    cfg.save(tmp_path / "config.yaml")
    # the one change: a path is saved absolute, so the file names the same data from any directory
    assert load_config(tmp_path / "config.yaml") == dataclasses.replace(cfg, data=os.path.abspath("imgs"))
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["stage_lrs"] == {"blocks.4": 1e-4}


def test_saved_config_of_a_resumed_run_starts_a_fresh_run_when_reused(tmp_path):
    # a resumed run rewrites config.yaml; passing that file as --config for a new --out must not try to resume
    TrainConfig(data="d", epochs=7, resume=True).save(tmp_path / "config.yaml")
    cfg = load_config(tmp_path / "config.yaml")
    assert cfg.resume is False and cfg.epochs == 7


def test_stage_lrs_parsing_rejects_bad_entries():
    assert parse_stage_lrs({"a": "1e-3"}) == {"a": 1e-3}
    with pytest.raises(ConfigError, match="layer4='fast'"):
        parse_stage_lrs("layer4=fast")
    with pytest.raises(ConfigError, match="layer4=True"):  # YAML's true was an LR of 1.0
        parse_stage_lrs({"layer4": True})
    # another separator: the entry was shown as "blocks.6:1e-4=''"
    with pytest.raises(ConfigError, match=r"^stage_lrs entry 'blocks.6:1e-4' has no '=': give STAGE=LR"):
        parse_stage_lrs("layer4=1e-3, blocks.6:1e-4")


def test_yaml_words_off_and_yes_stay_words_and_numbers_read_as_written(tmp_path):
    # PyYAML's YAML 1.1 read "amp: off" as False, refused as "amp expects str, got False"; 010 as 8; 1:30 as 90
    (tmp_path / "c.yaml").write_text("data: d\namp: off\ncache: off\nfrozen_dropout: off\nseed: 010\n"
                                     "channels_last: yes\nprogress: no\nlr: 1e-3\n")  # fmt: skip
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.amp, cfg.cache, cfg.frozen_dropout, cfg.seed) == ("off", "off", "off", 10)
    assert (cfg.channels_last, cfg.progress, cfg.lr) == (True, False, 1e-3)
    assert load_config(overrides=dict([parse_override("amp=off"), ("data", "d")])).amp == "off"
    with pytest.raises(ConfigError, match=re.escape("budget '1:30' is not a duration")):
        load_config(overrides=dict([parse_override("budget=1:30"), ("data", "d")]))
    # a boolean is no freeze spec: false froze as stage index 0, at the run's start, with no forms listed
    with pytest.raises(ConfigError, match="freeze False is not a freeze spec: .* 'backbone'"):
        load_config(overrides=dict([parse_override("freeze=false"), ("data", "d")]))


def test_an_override_without_a_value_is_refused_not_read_as_the_default():
    # epochs=$EPOCHS out=$OUT with both unset: 10 epochs into runs/ of the current folder, without a word
    with pytest.raises(ConfigError, match=r"^override 'epochs=' has no value \(an unset shell variable\?\): give "
                                          r"epochs=VALUE \(epochs=null for the setting's default\)$"):  # fmt: skip
        parse_override("epochs=")
    assert parse_override("epochs=null") == ("epochs", None)


def test_override_without_equals_sign_lists_the_keys():
    with pytest.raises(ConfigError, match="not key=value; keys are: 'model'"):
        parse_override("lr")


@pytest.mark.parametrize("item", ["lr=[", "freeze={a", "epochs=: x"])
def test_an_override_that_is_not_valid_yaml_is_a_config_error_naming_it(item):
    # yaml's scanner error went up as a traceback, exit 1
    with pytest.raises(ConfigError, match=rf"override '{re.escape(item)}': its value is not valid YAML"):
        parse_override(item)


def test_a_config_file_naming_a_key_twice_or_a_folder_is_refused(tmp_path):
    # the last of the two won, silently; a folder was said not to exist
    (tmp_path / "twice.yaml").write_text("epochs: 1\nlr: 0.1\nepochs: 2\ndata: d\n")
    with pytest.raises(ConfigError, match=r"key 'epochs' is given twice \(lines 1 and 3\)"):
        load_config(tmp_path / "twice.yaml")
    with pytest.raises(ConfigError, match="is a folder: give a YAML file"):
        load_config(tmp_path)
    (tmp_path / "nested.yaml").write_text("stage_lrs:\n  layer4: 1.0e-4\n  layer3: 5.0e-5\ndata: d\n")
    assert load_config(tmp_path / "nested.yaml").stage_lrs == {"layer4": 1e-4, "layer3": 5e-5}
    # YAML's merge key brings keys the mapping may override: not a key given twice
    (tmp_path / "merged.yaml").write_text("stage_lrs: {<<: {layer4: 1.0e-3, layer2: 1.0e-5}, layer4: 2.0e-3}\n"
                                          "<<: {epochs: 1}\ndata: d\n")  # fmt: skip
    merged = load_config(tmp_path / "merged.yaml")
    assert merged.stage_lrs == {"layer4": 2e-3, "layer2": 1e-5} and merged.epochs == 1
    (tmp_path / "unhashable.yaml").write_text("? [a, b]\n: 1\ndata: d\n")
    with pytest.raises(ConfigError, match="found an unhashable key"):
        load_config(tmp_path / "unhashable.yaml")


def test_print_config_read_back_with_config_gives_the_same_config(tmp_path, capsys):
    argv = ("--data", "imgs", "--freeze", "stem,blocks.0,-1", "--stage-lrs", "blocks.4=1e-4", "--no-tensorboard",
            "--img-size", "48", "val_split=0.25", "unfreeze={3: blocks.4}")  # fmt: skip
    code, first, err = run_cli(capsys, "train", "--print-config", *argv)
    assert code == 0, err
    (tmp_path / "printed.yaml").write_text(first)
    code, second, err = run_cli(capsys, "train", "--print-config", "--config", tmp_path / "printed.yaml")
    assert code == 0, err
    assert second == first
    cfg = load_config(tmp_path / "printed.yaml")
    assert cfg == load_config(overrides=yaml.safe_load(first))
    assert (cfg.freeze, cfg.stage_lrs, cfg.unfreeze) == (["stem", "blocks.0", -1], {"blocks.4": 1e-4}, {3: "blocks.4"})
    assert (cfg.img_size, cfg.val_split, cfg.tensorboard) == (48, 0.25, False)


@pytest.mark.parametrize("name", field_names())
def test_every_field_converts_from_text_to_its_declared_type(name):
    default = getattr(TrainConfig(), name)
    kind = scalar_type(name)
    if kind is None:  # structured: parsed, and a parsed value parses to itself
        assert coerce(name, default) == default
    elif default is not None:
        assert coerce(name, str(default)) == default and type(coerce(name, str(default))) is kind
    assert coerce(name, None) == ({} if name == "stage_lrs" else None)


def test_type_hints_drive_conversion_and_cli_flag_types():
    assert [n for n in field_names() if scalar_type(n) is bool] == [
        "skip_bad", "refit", "channels_last", "compile", "cuda_graph", "resume", "tensorboard", "progress", "final_test"]  # fmt: skip
    assert (scalar_type("val_split"), scalar_type("out"), scalar_type("freeze"), scalar_type("unfreeze")) == (
        float, str, None, None)  # fmt: skip
    assert coerce("compile", "yes") is True and coerce("img_size", "64") == 64
    with pytest.raises(ConfigError, match=r"img_size expects int \| None, got 'big'"):
        coerce("img_size", "big")
    assert coerce("epoch", "3") == "3"  # an unknown key passes through: load_config reports it with suggestions


def test_freeze_spec_is_parsed_once_and_parsing_again_changes_nothing():
    for raw, parsed in [("-3", -3), ("stem, layer1", ["stem", "layer1"]), (["stem", "2"], ["stem", 2]),
                        (["layer4"], "layer4"), ("layer[1-3]*", "layer[1-3]*"), (2, 2)]:  # fmt: skip
        assert parse_freeze_spec(raw) == parsed
        assert parse_freeze_spec(parsed) == parsed
        assert TrainConfig(freeze=raw).freeze == parsed


def test_a_python_caller_gets_every_mistyped_field_named_and_paths_as_paths(tmp_path):
    from pathlib import Path

    from torch.utils.data import TensorDataset

    cfg = TrainConfig(data=Path("images"), out=tmp_path / "run", val_data=None, stage_lrs="layer4=1e-4")
    assert (cfg.data, cfg.out, cfg.stage_lrs) == ("images", str(tmp_path / "run"), {"layer4": 1e-4})
    cfg.save(tmp_path / "config.yaml")  # a Path used to reach YAML and fail there, after the model and data loaded
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"] == os.path.abspath("images")
    with pytest.raises(ConfigError) as info:
        validate(TrainConfig(data="images", epochs="1", lr="1e-3", channels_last="yes"))
    assert str(info.value) == ("invalid config: epochs expects int | None, got '1' (str); lr expects float, got '1e-3' "
                               "(str); channels_last expects bool | None, got 'yes' (str)")  # fmt: skip
    with pytest.raises(ConfigError, match="data must be a path .* got a TensorDataset; a Dataset of your own"):
        validate(TrainConfig(data=TensorDataset()))
    validate(TrainConfig(data="images", lr=1, warmup_epochs=0))  # an int is a fine float


def test_train_reports_a_mistyped_recipe_with_the_choices():
    from freezetune.training.trainer import train

    with pytest.raises(ConfigError, match=r"unknown recipe 'lastk' \(did you mean 'last-k'\?\); choose one of: 'auto', "
                                          r"'linear-probe', 'last-k'"):  # fmt: skip
        train(TrainConfig(data="images", recipe="lastk"))
    with pytest.raises(ConfigError, match=r"unknown recipe 'linear_probe' \(did you mean 'linear-probe'\?\)"):
        train(TrainConfig(data="images", recipe="linear_probe"))
    with pytest.raises(ConfigError, match=r"recipe 'last-0': last-K trains the last K stages, K a whole number >= 1"):
        train(TrainConfig(data="images", recipe="last-0"))
    with pytest.raises(ConfigError, match=r"unknown bn 'frozn' \(did you mean 'frozen'\?\)"):
        train(TrainConfig(data="images", bn="frozn"))


def test_cache_views_without_the_cache_is_named():
    with pytest.raises(ConfigError, match="cache_views 3 sets how many augmented views the feature cache stores"):
        validate(TrainConfig(data="images", cache="off", cache_views=3))  # accepted, and did nothing
    validate(TrainConfig(data="images", cache="auto", cache_views=3))


def test_a_stage_named_twice_in_stage_lrs_is_refused_not_won_by_the_last():
    with pytest.raises(ConfigError, match="names 'layer4' twice"):
        parse_stage_lrs("layer4=1e-4,layer4=1e-2")


def test_a_freeze_glob_with_a_comma_in_its_character_set_stays_one_name():
    # --freeze "layer[1,2]*" was split on its comma: "'layer[1' matches no stage"
    assert parse_freeze_spec("layer[1,2]*") == "layer[1,2]*"
    assert load_config(overrides={"data": "d", "freeze": "layer[1,2]*,stem"}).freeze == ["layer[1,2]*", "stem"]


def test_values_that_failed_only_once_the_run_had_started_are_refused_with_the_config():
    # seed -1 passed --print-config and ended in numpy's traceback after the data was read; cache_at beside cache off
    # did nothing; "{1: }" failed as "got NoneType" once the model was built; "=1e-4" named a stage ''
    for cfg, said in (
        (TrainConfig(data="d", seed=-1), "seed must be in [0, 2**32 - 1], got -1"),
        (TrainConfig(data="d", seed=2**32), "seed must be in [0, 2**32 - 1]"),
        (TrainConfig(data="d", cache="off", cache_at="layer3"), "cache_at 'layer3' sets where"),
        (TrainConfig(data="d", unfreeze={1: None}), "the unfreeze plan's epoch 1 opens nothing"),
        (TrainConfig(data="d", stage_lrs=coerce("stage_lrs", "=1e-4")), "stage_lrs names a stage ''"),
    ):
        with pytest.raises(ConfigError, match=re.escape(said)):
            validate(cfg)
    validate(TrainConfig(data="d", seed=2**32 - 1, freeze=-2, cache_at="layer3"))
    assert coerce("stage_lrs", "none") == {}  # what --help shows as its default


def test_a_key_given_twice_on_the_command_line_is_refused_as_in_a_file(tmp_path, capsys):
    # the last one won in silence ({1: layer3}; epochs 8), where a config file refuses a key given twice
    for argv, said in (
        (["--unfreeze", "{1: layer4, 1: layer3}"], "key 1 is given twice"),
        (["stage_lrs={layer4: 1e-4, layer4: 1e-3}"], "key 'layer4' is given twice"),
        (["epochs=7", "epochs=8"], "epochs is given twice as key=value (epochs=7, epochs=8); keep one"),
    ):
        code, _, err = run_cli(capsys, "train", "--data", tmp_path, *argv, "--print-config")
        assert code == 2 and said in err, err


def test_paths_expand_home_and_variables_as_a_shell_would(tmp_path, monkeypatch):
    # a config file's "data: ~/fm" was read as a folder "~" in the current directory
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DATASETS", "/srv/data")
    (tmp_path / "run.yaml").write_text("data: ~/fm\nval_data: $DATASETS/val\nmodel: hf:~/bert\nout: ~/runs/a\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.data, cfg.val_data, cfg.model, cfg.out) == (f"{tmp_path}/fm", "/srv/data/val", f"hf:{tmp_path}/bert",
                                                            f"{tmp_path}/runs/a")  # fmt: skip
    assert load_config(overrides={"data": "d", "model": "timm:resnet18", "weights": "imagenet"}).weights == "imagenet"


def test_a_cut_beside_cache_off_in_a_users_own_config_file_is_refused(tmp_path):
    # dropped in silence from any file, where a run's own config.yaml of an earlier freezetune alone needs it
    (tmp_path / "my.yaml").write_text("data: d\ncache: 'off'\ncache_at: blocks.1\nfreeze: -2\n")
    with pytest.raises(ConfigError, match="cache_at 'blocks.1' sets where the feature cache cuts the model"):
        load_config(tmp_path / "my.yaml")
    (tmp_path / "classes.json").write_text('["a", "b"]')  # a run's folder: its recorded cut is no setting
    assert load_config(tmp_path / "my.yaml").cache_at is None


@pytest.mark.parametrize("given", [{"data": "imgs"}, None, "config.yaml"])
def test_a_run_given_other_than_a_train_config_names_what_it_takes(given):
    # ft.train({"data": ...}) ended in "AttributeError: 'dict' object has no attribute ..."
    import freezetune as ft
    from freezetune.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^a run takes a freezetune.TrainConfig, not {type(given).__name__}: "
                       r"TrainConfig\(\*\*settings\), or freezetune.config.file.load_config\(PATH\)"):  # fmt: skip
        ft.train(given)


def test_a_run_given_its_settings_as_keywords_names_the_config_they_belong_in():
    # ft.train(data="DIR") was a TypeError, "unexpected keyword argument 'data'"
    import freezetune as ft
    from freezetune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^train\(\) takes a freezetune.TrainConfig, not settings \(data='imgs', "
                       r"epochs=2\): train\(TrainConfig\(data='imgs', epochs=2\)\)$"):  # fmt: skip
        ft.train(data="imgs", epochs=2)


def test_a_device_weights_or_model_name_of_no_form_is_reported_with_the_configs_other_problems():
    # each was found only once the data was read or the model built, after the other problems had been fixed
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"data": "x", "device": "tpu", "weights": "imagnet", "model": "resnet50", "lr": -1})
    message = str(info.value)
    for needle in ("unsupported device 'tpu'; devices are: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'",
                   "unknown weights 'imagnet'; use one of: 'imagenet'", "did you mean 'timm:resnet50'",
                   "lr must be > 0"):  # fmt: skip
        assert needle in message, message
    # whether CUDA is there is the run's machine's to say: a config for a GPU machine prints on a CPU one
    assert load_config(overrides={"data": "x", "device": "cuda:1", "weights": "my.safetensors"}).device == "cuda:1"
    # a Lightning .ckpt not there yet is a file's path, found missing where it is read (it was "unknown weights")
    assert load_config(overrides={"data": "x", "weights": "lit.ckpt"}).weights == "lit.ckpt"
    assert load_config(overrides={"data": "x", "device": "cpu:0"}).device == "cpu:0"  # as torch names it


def test_a_printed_config_starts_a_run_afresh_and_a_sweep_refuses_a_freeze_before_printing(capsys, tmp_path):
    # --print-config of a resume printed resume: true, and the file given to a run for another --out tried to resume
    # that one; a sweep printed a --freeze it then refused at its start
    assert yaml.safe_load(TrainConfig(data="d", resume=True).dump())["resume"] is False
    code, out, err = run_cli(capsys, "sweep", "--data", "x", "--freeze", "backbone", "--print-config")
    assert code == 2 and out == "" and "a sweep runs each of --recipes with its own freeze" in err, err
    # a config that is no regular file (/dev/null, a shell's <(...)): read, not "does not exist"
    code, out, err = run_cli(capsys, "train", "--config", "/dev/null", "--data", "imgs", "--print-config")
    assert code == 0 and "data: " in out, err
    code, _, err = run_cli(capsys, "train", "--config", str(tmp_path / "none.yaml"), "--print-config")
    assert code == 2 and "does not exist" in err


def test_a_saved_config_reads_back_its_strings_that_look_like_numbers(tmp_path):
    # PyYAML wrote text_column: 1e3 unquoted (a string to YAML 1.1), which the config's YAML 1.2 reading took as 1000.0
    TrainConfig(data="d", text_column="1e3", label_column="0o10", freeze=-2, cache_at="010").save(tmp_path / "c.yaml")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.text_column, cfg.label_column, cfg.cache_at) == ("1e3", "0o10", "010")
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["text_column"] == "1e3"  # and to YAML 1.1 readers


def test_a_yaml_value_of_nested_aliases_is_quoted_short_and_refused_at_once(tmp_path):
    # 600 bytes of aliases, ten to a level, make 10**7 strings: the type error's repr of them took 14 s and printed a
    # line of 52 MB
    levels = ["a: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 7)]
    (tmp_path / "bomb.yaml").write_text("\n".join(["nested:", *(f"  {line}" for line in levels), "lr: *l6", ""]))
    with pytest.raises(ConfigError) as said:
        load_config(tmp_path / "bomb.yaml", {"data": "x"})
    assert len(str(said.value)) < 5000  # (it lists the valid keys beside "nested")
    assert "lr expects float, got [[[[...], [...], [...], [...], [...], [...], ...], [[...], " in str(said.value)


def test_scalar_values_yaml_or_python_gives_are_read_as_before():
    # the check that refused a YAML list at once refused a date (out=2024-06-01), a Path and a numpy int too
    import datetime
    from pathlib import Path

    import numpy as np

    cfg = load_config(overrides={"data": Path("images"), "out": datetime.date(2024, 6, 1), "epochs": np.int64(3)})
    assert (cfg.out, cfg.epochs, cfg.data) == ("2024-06-01", 3, "images")


def _earlier_lp_ft_file(**changes) -> dict:
    """An lp-ft's config as a freezetune before 2026-12-05 wrote it (``--print-config``, winner.yaml, recipe.json's
    request): every key of its day (none of frozen_dropout, added later), bn_stats at its default of then, update."""
    values = {**TrainConfig(data="/data", recipe="lp-ft").recorded(), "bn_stats": "update", **changes}
    values.pop("frozen_dropout")
    return values


def test_an_earlier_freezetunes_lp_ft_file_is_read_with_bn_stats_at_its_default(tmp_path, capsys):
    # its bn_stats "update" was the default then, which lp-ft replaced: "recipe 'lp-ft' sets bn_stats itself: give
    # the recipe or bn_stats 'update', not both" refused the winner.yaml and --print-config output it wrote
    winner = tmp_path / "winner.yaml"
    winner.write_text(yaml.safe_dump(_earlier_lp_ft_file()))
    assert load_config(winner).bn_stats == load_config(_earlier_lp_ft_file()).bn_stats == "auto"
    assert _print_config(capsys, "--config", str(winner))["bn_stats"] == "auto"
    # asked for: typed, in a file this freezetune wrote (every key), or in one a user wrote (none of the recipe's)
    with pytest.raises(ConfigError, match="recipe 'lp-ft' sets bn_stats itself"):
        load_config(winner, {"bn_stats": "update"})
    for hand in ({**_earlier_lp_ft_file(), "frozen_dropout": "keep"}, {"data": "d", "recipe": "lp-ft",
                                                                      "bn_stats": "update"}):  # fmt: skip
        with pytest.raises(ConfigError, match="recipe 'lp-ft' sets bn_stats itself"):
            load_config(hand)
    with pytest.raises(ConfigError, match="recipe 'lp-ft' sets bn itself"):  # another value than then's default
        load_config(_earlier_lp_ft_file(bn="train"))
