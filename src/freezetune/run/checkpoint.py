"""Checkpoints: ``best.pt`` (weights + all that ``predict`` needs) and ``last.pt`` (full resume state).

Both carry the model name, classes, preprocessing and the resolved config, so a checkpoint alone rebuilds the model.
Writes are atomic (temp file + rename): a crash mid-save never leaves a half-written checkpoint over a good one.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from freezetune import __version__
from freezetune._io import atomic_save
from freezetune.config.options import BATCH_AUTO, HF_PREFIX
from freezetune.config.train_config import DATA_PATHS, RESUME_MAY_CHANGE, RESUME_MAY_CHANGE_UNSCHEDULED, absolute_paths
from freezetune.config.values import coerce
from freezetune.errors import CheckpointError, ConfigError, FreezetuneError, choices, setting
from freezetune.model import text_pooling
from freezetune.model.heads import holds_aux
from freezetune.model.hf_bundle import rebuilt_folder, refuse_foreign_names
from freezetune.model.preprocess import Preprocess
from freezetune.model.tree import unwrap
from freezetune.model.weights_file import load_failure
from freezetune.run.versions import versions
from freezetune.training.rng import rng_state, set_rng_state

if TYPE_CHECKING:
    from freezetune.run.checkpoint_writer import Writer

BEST = "best.pt"
LAST = "last.pt"
# Settings a run of an earlier freezetune recorded none of, as it ran: a resume that changes them is refused as any
# other change (--frozen-dropout off on a run whose frozen dropout drew)
_EARLIER = {"frozen_dropout": "keep"}

log = logging.getLogger(__name__)


def model_record(model: nn.Module, cfg_dict: dict, classes: list[str], preprocess: Preprocess,
                 hf_files: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """What rebuilds and uses a model: weights, architecture name, classes, preprocessing, config; for a Hugging Face
    model from a local folder, that folder's config and tokenizer files (``hf_bundle.bundle``)."""
    record = {
        "freezetune_version": __version__,
        "versions": versions(),  # (Python's and the libraries' too: what trained it)
        "model": cfg_dict["model"],
        "classes": list(classes),
        "preprocess": preprocess.to_dict(),
        "config": dict(cfg_dict),
        "state_dict": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},  # no wrapper's prefixes
    }
    pooled = text_pooling.pooling_of(model)  # how the classifier's input is made from the last hidden states
    if hf_files:  # declaring the pooling the model has, which an --init or a resume may have set (match_record)
        record["hf_files"] = text_pooling.bundled_as(hf_files, pooled)
    if pooled:
        record["text_pooling"] = pooled
    return record


def save(record: dict[str, Any], path: str | Path) -> Path:
    return atomic_save(record, path)


# an export's files, which eval, predict and export were given as checkpoints
_EXPORTS = {".onnx": "an ONNX export", ".pt2": "a torch.export program", ".safetensors": "a safetensors weights file"}
_GIVE_A_RUNS = "give a run's best.pt or last.pt"


def load(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """Load a freezetune checkpoint (tensors and plain data only: ``weights_only=True``); ``mmap``: its tensors are
    mapped from the file, not read, until used."""
    path = Path(path)
    if path.is_dir():
        hint = f"; did you mean {str(path / BEST)!r}?" if (path / BEST).is_file() else ""
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix.lower() in _EXPORTS:  # read as a pickle, it was "not a PyTorch checkpoint file (UnpicklingError)"
        raise CheckpointError(f"{str(path)!r} is {_EXPORTS[path.suffix.lower()]}, not a checkpoint: {_GIVE_A_RUNS}")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # a corrupt or foreign file: say which, not a pickle traceback
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {load_failure(path, exc)}") from None
    if isinstance(record, dict) and record and all(isinstance(v, torch.Tensor) for v in record.values()):
        # torch.save(model.state_dict()): "no state_dict/classes" of a file that is one
        raise CheckpointError(f"{str(path)!r} holds weights alone (a state_dict), not a freezetune checkpoint, which "
                              f"names the model, its classes and preprocessing: {_GIVE_A_RUNS}; a run starts from "
                              "weights alone with --weights FILE")  # fmt: skip
    if not isinstance(record, dict) or "state_dict" not in record or "classes" not in record:
        raise CheckpointError(f"{str(path)!r} is not a freezetune checkpoint (no state_dict/classes)")
    if record.get("hf_files"):
        refuse_foreign_names(record["hf_files"], repr(str(path)))
    lacking = [key for key in _REBUILDS if key not in record]  # eval, predict and export stopped at a KeyError
    if lacking:
        raise CheckpointError(f"{str(path)!r} is a freezetune checkpoint without its {'/'.join(lacking)}: it cannot "
                              "be rebuilt; use the run's best.pt or last.pt as written")  # fmt: skip
    return record


_REBUILDS = ("model", "preprocess")  # beside state_dict and classes, what build_model reads


def build_model(record: dict[str, Any]) -> tuple[nn.Module, Preprocess]:
    """Rebuild the architecture named in a checkpoint, with its head, and load its weights; a note says when they
    are a mid-epoch ``last.pt``'s (``--save-every-steps`` or a stop signal), part of the way through an epoch."""
    from freezetune.model.create import create_model
    from freezetune.model.heads import dropped_aux_keys, replace_head

    name, pre = _model_of(record), Preprocess.from_dict(record["preprocess"])
    if record.get("hf_files"):  # an hf:DIR's: its own folder, or its bundled files where that is gone or changed
        name = f"{HF_PREFIX}{rebuilt_folder(name, record['hf_files']) or name.removeprefix(HF_PREFIX)}"
        # (its tokenizer is the folder's: a run resumed from the bundled files recorded where they were written)
        pre = dataclasses.replace(pre, tokenizer=name.removeprefix(HF_PREFIX) if pre.tokenizer else None)
    # the architecture its weights were trained from (torchvision's GoogLeNet has no aux heads when pretrained)
    model, _ = create_model(name, (record.get("config") or {}).get("weights"), load=False)
    replace_head(model, len(record["classes"]))
    text_pooling.match_record(model, record)  # pooled as it trained, whatever the model folder declares now
    # (a GoogLeNet or Inception v3 an earlier freezetune trained kept its aux classifiers, untrained, in its weights)
    aux = dropped_aux_keys(model, record["state_dict"])
    state = {k: v for k, v in record["state_dict"].items() if k not in aux}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes: a classes list another length than the head (eval's traceback)
        shapes = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line][:2]
        raise CheckpointError(f"checkpoint weights do not fit {record['model']} with its {len(record['classes'])} "
                              f"classes: {'; '.join(shapes) or str(exc).splitlines()[0]}") from None  # fmt: skip
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not fit {record['model']}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if note := mid_epoch_note(record):
        log.warning(note)
    return model, pre


def mid_epoch_note(record: dict[str, Any]) -> str | None:
    """What a checkpoint saved part of the way through an epoch holds, or None for one saved at an epoch's end.

    >>> mid_epoch_note({"epoch": 2, "steps_per_epoch": 40, "progress": {"epoch": 2, "step": 12}})[:59]
    'note: this checkpoint was saved mid-epoch, 12 of 40 steps i'
    """
    progress = record.get("progress") or {}
    if not progress.get("step"):
        return None
    return (f"note: this checkpoint was saved mid-epoch, {progress['step']} of {record.get('steps_per_epoch', '?')} "
            f"steps into epoch {progress.get('epoch', 0) + 1}: its weights are part of the way through that epoch "
            f"(the run's {BEST} holds its best finished epoch)")  # fmt: skip


def _check_mid_epoch_steps(path: Path, record: dict, then: int | None, now: int | None) -> None:
    """A checkpoint saved part of the way through an epoch resumes only on batches of the epoch it was saved in:
    under ``scheduler none`` a resume may change the number of torchrun processes, but its step counts that
    epoch's batches on each process of the run that saved it (a 1-process stop at step 35 of 45, resumed on 2,
    said "step 35/23" and left the epoch's last 80 images untrained)."""
    step = (record.get("progress") or {}).get("step")
    if not step or then is None or now is None or then == now:
        return
    raise ConfigError(f"cannot resume {path} on {now} batches an epoch: it was saved mid-epoch, {step} of the {then} "
                      "batches an epoch had on each process of its run, and its place in the epoch is counted in "
                      "those; resume on as many torchrun processes (and the same data and --batch-size) as the run "
                      "had, or from a checkpoint saved at an epoch's end")  # fmt: skip


def _model_of(record: dict) -> str | None:
    """The checkpoint's model name, an ``hf:DIR`` absolute (a run of an earlier version recorded it as given)."""
    return absolute_paths({"model": record.get("model")})["model"]


def init_from(model: nn.Module, path: str | Path, classes: list[str], model_name: str | None = None) -> None:
    """Load the weights of a freezetune checkpoint, head included, into ``model`` (same architecture and classes;
    ``model_name``: the run's, to name a checkpoint of another architecture as such)."""
    record = load(path)
    if model_name is not None and _model_of(record) != absolute_paths({"model": model_name})["model"]:
        other = record.get("model")
        raise CheckpointError(f"init checkpoint {str(path)!r} is a {other} model; this run's is {model_name}: give "
                              f"--model {other}, or a checkpoint of {model_name}")  # fmt: skip
    if list(record["classes"]) != list(classes):
        raise CheckpointError(f"init checkpoint {str(path)!r} was trained on {len(record['classes'])} other classes "
                              f"({choices(record['classes'], limit=5)}); the data has {choices(classes, limit=5)}: "
                              f"to start from its weights with a new head, give it as --weights {str(path)!r}")  # fmt: skip
    text_pooling.match_record(model, record)  # before the freeze and the optimizer: a pooler put back trains too
    try:
        model.load_state_dict(record["state_dict"])
    except RuntimeError as exc:  # torch's first line only says "Error(s) in loading state_dict": the next say which
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CheckpointError(f"init checkpoint {str(path)!r} does not fit this model ({record.get('model')} "
                              f"weights): {' '.join(lines[1:3]) or lines[0]}") from None  # fmt: skip


# --- the trainer's checkpoints: each function takes what it saves and returns what it restores ----------------


@dataclass
class TrainingState:
    """The objects a resume must bring back, besides the ``Progress``: model, optimizer and its companions."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any | None  # a torch LR scheduler
    scaler: torch.amp.GradScaler
    unfreezer: Any | None  # freezetune.freezing.unfreezing.Unfreezer
    average: Any | None = None  # freezetune.training.averaging.WeightAverage (``average_weights``)


def best_record(record: dict[str, Any], progress, row: dict) -> dict[str, Any]:
    """``best.pt``'s content: ``record`` (``model_record``: the weights and all ``predict`` needs) with the epoch's
    number (``progress.epoch``, the epochs finished) and metrics."""
    return {**record, "epoch": progress.epoch, "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float))}}


def last_record(record: dict[str, Any], state: TrainingState, progress, steps_per_epoch: int, *,
                data: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """``last.pt``'s content: ``record`` plus the full resume state after ``progress.epoch`` finished epochs, and
    ``data`` (``data.fingerprint.data_record``) the run trains on."""
    return {
        **record,
        "data": data,
        "epoch": progress.epoch,
        "steps_per_epoch": steps_per_epoch,
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "scaler": state.scaler.state_dict(),
        "unfreezer": state.unfreezer.state_dict() if state.unfreezer is not None else None,
        "average": state.average.state_dict() if state.average is not None else None,
        "progress": progress.state_dict(),
        "rng": rng_state(),
    }


def save_epoch(writer: Writer, record: dict[str, Any], state: TrainingState, progress, steps_per_epoch: int, *,
               row: dict, improved: bool, last: bool = True, data: dict[str, Any] | None = None) -> None:  # fmt: skip
    """After an epoch: hand ``writer`` ``best.pt`` when the epoch improved, and ``last.pt`` (unless ``last`` is
    False: a run that is never resumed). Both are taken now; the writer puts them on disk, best first."""
    writer.submit(
        best=best_record(record, progress, row) if improved else None,
        last=last_record(record, state, progress, steps_per_epoch, data=data) if last else None,
    )


def restore(path: str | Path, state: TrainingState, progress, *, config: dict[str, Any], classes: list[str],
            steps_per_epoch: int, data: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Continue a run from its ``last.pt``: load into ``state`` (set up as at the start of that run) and ``progress``.

    ``config``, ``classes``, ``steps_per_epoch`` and ``data`` (``data.fingerprint.data_record``) are this run's: its
    data, model, classes, LR schedule and every setting but those of ``config.train_config.RESUME_MAY_CHANGE`` must be
    those of ``last.pt``; a mismatch is refused with the reason (the data's change, the changed settings, old -> new),
    before anything is loaded.
    """
    record = load(path)
    _check_data(Path(path), record.get("data"), data)
    _check_resumable(Path(path), record, {**config, "classes": classes, "steps_per_epoch": steps_per_epoch})
    _check_resume_state(Path(path), record)
    state.model.load_state_dict(record["state_dict"])
    if state.unfreezer is not None and record.get("unfreezer"):
        state.unfreezer.load_state_dict(record["unfreezer"])  # before the optimizer: re-creates its groups
    try:
        state.optimizer.load_state_dict(record["optimizer"])
    except ValueError as exc:  # torch's group-size mismatch: the trainable set differs from the run's
        raise CheckpointError(
            f"the optimizer state in {path} does not fit this config's trainable "
            f"parameters (changed --freeze, --unfreeze or --bn?): {str(exc).splitlines()[0]}"
        ) from None
    if state.scheduler is not None and record.get("scheduler"):
        state.scheduler.load_state_dict(record["scheduler"])
    if record["scaler"] or not state.scaler.is_enabled():  # a CPU fp16 run saved a disabled scaler's {} before
        state.scaler.load_state_dict(record["scaler"])  # it scaled: the scaler then starts at its initial scale
    if state.average is not None and record.get("average"):  # (a last.pt from before averaging: it starts again)
        state.average.load_state_dict(record["average"])
    set_rng_state(record["rng"])
    progress.load_state_dict({**_progress_of(record), "monitor": progress.monitor})


class Resumed(NamedTuple):
    """What a resume keeps of how its ``last.pt`` trained, beside the weights: the preprocessing (how its images were
    read), the text pooling (None: its task class's own) and an ``hf:DIR`` model's bundled files (``hf_bundle``)."""

    preprocess: Preprocess
    text_pooling: str | None
    hf_files: dict[str, str] | None
    aux: bool = False  # its model has auxiliary classifiers (GoogLeNet's, begun by a freezetune that kept them)


def check_settings(path: str | Path, config: dict[str, Any]) -> Resumed:
    """Refuse, as ``restore`` would, a resume whose settings are not those of its ``last.pt``: checked before the
    model and data are read (``restore`` checks again, with the classes and the schedule's length they give)."""
    if config.get("batch_size") == BATCH_AUTO:  # a number once measured, after the data is read
        config = {k: v for k, v in config.items() if k != "batch_size"}
    record = load(path, mmap=True)  # the weights are not read: only the config is needed
    _check_resumable(Path(path), record, {**config, "classes": record.get("classes")})
    _check_resume_state(Path(path), record)
    return Resumed(Preprocess.from_dict(record["preprocess"]), record.get("text_pooling"), record.get("hf_files"),
                   holds_aux(record["state_dict"]))  # fmt: skip


def _check_data(path: Path, saved: dict[str, Any] | None, now: dict[str, Any] | None) -> None:
    """Refuse a resume on other data than its ``last.pt`` trained on: images deleted or added went on in silence (a
    class added was said to be another config's), and a held-out validation split drawn again from them took
    images epoch 1 had trained on. A ``last.pt`` of an older freezetune kept no record: nothing to compare."""
    if not saved or now is None:
        return
    changed, none = [], {"n": 0, "digest": None}
    for split in dict.fromkeys([*saved, *now]):  # a split there once and not now (or the reverse) has 0 items
        old, new = saved.get(split, none), now.get(split, none)
        noun = new.get("noun") or old.get("noun")
        if old["n"] != new["n"]:
            changed.append(f"{old['n']} -> {new['n']} {split} {noun}")
        elif None not in (old["digest"], new["digest"]) and old["digest"] != new["digest"]:  # None: not had
            other = "other texts or labels" if noun == "texts" else "other files or contents"
            changed.append(f"{split} {noun}: {new['n']} as before, {other}")
    if changed:
        from freezetune.data.fingerprint import files_changed

        changed += filter(None, [files_changed(saved, now)])
        raise CheckpointError(
            f"cannot resume {path}: the data changed since it was saved ({'; '.join(changed)}); "
            f"resume on the data the run trained on, or start a new run with another {setting('out')}"
        )


def _few(names: list[str], shown: int = 6) -> str:
    """Class names as a message lists them: the first ``shown``, then how many more."""
    listed = ", ".join(repr(n) for n in names[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


_RESUMES = ("optimizer", "scaler", "progress", "rng")  # what last.pt holds beside best.pt's weights, and a resume reads


def _progress_of(record: dict) -> dict[str, Any] | None:
    """The ``Progress`` state ``record`` (a ``last.pt``) holds, None without one. A freezetune before 2026-11-30
    (e14081e) kept the best epoch apart (``best``: epoch, metric, bad_epochs) and saved at epochs' ends only: no
    step into an unfinished one, and no seconds of earlier processes or tie-breaking metric that it did not count."""
    if "progress" in record:
        return record["progress"]
    best = record.get("best")
    if not isinstance(best, dict) or not {"epoch", "metric", "bad_epochs"} <= set(best) or "epoch" not in record:
        return None
    return {"epoch": int(record["epoch"]), "best_epoch": int(best["epoch"]), "best_metric": best["metric"],
            "bad_epochs": int(best["bad_epochs"])}  # fmt: skip


def _check_resume_state(path: Path, record: dict) -> None:
    """Refuse a ``last.pt`` that holds no run's state to go on from (a ``best.pt`` copied over it, or one of an earlier
    freezetune that kept less): restore stopped at a KeyError once the weights were loaded."""
    lacking = [key for key in _RESUMES if key not in record and not (key == "progress" and _progress_of(record))]
    if not lacking:
        return
    if any(key in record for key in (*_RESUMES, "steps_per_epoch", "best")):  # a last.pt, of another shape
        raise CheckpointError(f"cannot resume {path}: a last.pt of an earlier freezetune "
                              f"({record.get('freezetune_version', 'version unknown')}) without the run's "
                              f"{'/'.join(lacking)} state, which this one needs to go on; start a new run from its "
                              f"weights: {setting('init', str(path))}")  # fmt: skip
    raise CheckpointError(f"cannot resume {path}: it holds a model's weights without the run's {'/'.join(lacking)}"
                          f" state (a best.pt copied over it?); start a new run from it: "
                          f"{setting('init', str(path))}")  # fmt: skip


def _alike(key: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether two values of ``key`` train alike in one run: bn_stats "auto" is "update" there (the recipes that hold
    the statistics resolve it first: ``auto.plan.run_bn_stats``, lp-ft's fine-tune, gradual), and a run an earlier freezetune
    began recorded "update", its default then (lp-ft's probe, stopped, was refused "bn_stats 'update' -> 'auto'")."""
    return key == "bn_stats" and {old[key], new[key]} == {"update", "auto"}


def _as_read_now(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a ``last.pt`` recorded as this freezetune reads a config (``config.values.coerce``), to compare
    with a resume's: an early one recorded freeze as typed ('-2'), which a config now holds parsed (-2), and its own
    settings were refused as changed ("freeze '-2' -> -2"). A value no longer read is compared as recorded."""
    read = {}
    for key, value in config.items():
        try:
            read[key] = coerce(key, value)
        except (FreezetuneError, TypeError, ValueError):
            read[key] = value
    return read


def _check_resumable(path: Path, record: dict, expect: dict[str, Any]) -> None:
    if _model_of(record) != expect["model"] or record.get("classes") != expect["classes"]:
        ran, now = record.get("classes") or [], expect["classes"]
        if len(ran) == len(now) and _model_of(record) == expect["model"]:  # the same count: the names differ
            said = f"classes {_few(ran)}; this config's data has {_few(now)}"
        else:
            said = f"{len(ran)} classes; this config is {expect['model']} on {len(now)}"
        raise CheckpointError(f"{path} is a run of {record.get('model')} on {said}: resume with the run's own config "
                              "and data")  # fmt: skip
    # a run of an earlier version recorded its paths as given: read from here, as this run's are (TrainConfig.recorded)
    old = absolute_paths(dict(_EARLIER, **_as_read_now(record.get("config") or {}),
                              steps_per_epoch=record.get("steps_per_epoch")))  # fmt: skip
    schedule = ("epochs", "scheduler", "warmup_epochs", "steps_per_epoch")
    stretched = [f"{k} {old[k]!r} -> {expect[k]!r}" for k in schedule
                 if old.get(k) is not None and k in expect and old[k] != expect[k]]  # fmt: skip
    # A per-step LR schedule cannot be stretched mid-run (OneCycleLR raises once past its total_steps).
    if expect["scheduler"] == "none" and old.get("scheduler") == "none":
        stretched = []
        _check_mid_epoch_steps(path, record, old.get("steps_per_epoch"), expect.get("steps_per_epoch"))
    # Any other change would train on with settings config.yaml then claims for the whole run (and another optimizer
    # fails at its first step on this one's state: KeyError 'momentum').
    moved = DATA_PATHS if record.get("data") else ()  # a last.pt of an older freezetune has no digest to check
    # beside cache off a cut is no setting (the auto recipe of an earlier freezetune recorded one there, this one none)
    uncut = ("cache_at",) if old.get("cache") == "off" else ()
    fixed = [k for k in old if k not in (*RESUME_MAY_CHANGE, *schedule, *moved, *uncut, "model") and k in expect]
    changed = [f"{k} {old[k]!r} -> {expect[k]!r}" for k in fixed if old[k] != expect[k] and not _alike(k, old, expect)]
    done = int(record.get("epoch") or 0)
    if not stretched and isinstance(expect.get("epochs"), int) and expect["epochs"] < done:  # config.yaml said 2
        raise ConfigError(f"cannot resume {path} with epochs {expect['epochs']}: it has trained {done} epochs; give "
                          f"{setting('epochs', done)} or more (at {done} only its end runs again)")  # fmt: skip
    if not (stretched or changed):
        return
    why = []  # every change named at once: fixing one flag must not lead to the next refusal
    if stretched:
        why.append(f"its {old.get('scheduler')} LR schedule spans the run's original length")
    if any(k.startswith("steps_per_epoch ") for k in stretched):  # no setting of the user's is called that
        why.append("steps_per_epoch is the batches of an epoch on each process: the training data, --batch-size and "
                   "the number of torchrun processes set it (resume on as many processes as the run had)")  # fmt: skip
    if changed:
        may = ", ".join(k for k in RESUME_MAY_CHANGE if k not in ("out", "resume"))  # the two that name the resume
        free = " and ".join(RESUME_MAY_CHANGE_UNSCHEDULED)
        why.append(f"a run continues with its own settings (a resume may change only {may}, and {free} under "
                   "scheduler none)")  # fmt: skip
    raise ConfigError(f"cannot resume {path} with {', '.join(stretched + changed)}: {'; '.join(why)}; resume with "
                      f"the run's values, or start a new run with another {setting('out')}")  # fmt: skip
