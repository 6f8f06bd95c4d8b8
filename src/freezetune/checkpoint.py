"""Checkpoints: ``best.pt`` (weights + all that ``predict`` needs) and ``last.pt`` (full resume state).

Both carry the model name, classes, preprocessing and the resolved config, so a checkpoint alone rebuilds the model.
Writes are atomic (temp file + rename): a crash mid-save never leaves a half-written checkpoint over a good one.
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from freezetune import __version__
from freezetune._io import atomic_save
from freezetune.errors import CheckpointError, ConfigError
from freezetune.preprocess import Preprocess

BEST = "best.pt"
LAST = "last.pt"


def model_record(model: nn.Module, cfg_dict: dict, classes: list[str], preprocess: Preprocess) -> dict[str, Any]:
    """What rebuilds and uses a model: weights, architecture name, classes, preprocessing, config."""
    return {
        "freezetune_version": __version__,
        "model": cfg_dict["model"],
        "classes": list(classes),
        "preprocess": preprocess.to_dict(),
        "config": dict(cfg_dict),
        "state_dict": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
    }


def save(record: dict[str, Any], path: str | Path) -> Path:
    return atomic_save(record, path)


def load(path: str | Path) -> dict[str, Any]:
    """Load a freezetune checkpoint (tensors and plain data only: ``weights_only=True``)."""
    path = Path(path)
    if path.is_dir():
        hint = f"; did you mean {str(path / BEST)!r}?" if (path / BEST).is_file() else ""
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: say which, not a pickle traceback
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {_load_failure(path, exc)}") from None
    if not isinstance(record, dict) or "state_dict" not in record or "classes" not in record:
        raise CheckpointError(f"{str(path)!r} is not a freezetune checkpoint (no state_dict/classes)")
    return record


def _load_failure(path: Path, exc: Exception) -> str:
    # torch's own messages mislead here ("KeyError: '101'" for a text file; "re-run with weights_only=False",
    # which would execute arbitrary pickled code): say what the file is instead.
    if not zipfile.is_zipfile(path):
        return f"not a PyTorch checkpoint file ({type(exc).__name__})"
    return f"a PyTorch file holding more than tensors and plain data, not a checkpoint ({type(exc).__name__})"


def build_model(record: dict[str, Any]) -> tuple[nn.Module, Preprocess]:
    """Rebuild the architecture named in a checkpoint, with its head, and load its weights."""
    from freezetune.models import create_model
    from freezetune.stages import replace_head

    model, _ = create_model(record["model"], None)
    replace_head(model, len(record["classes"]))
    missing, unexpected = model.load_state_dict(record["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not fit {record['model']}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model, Preprocess.from_dict(record["preprocess"])


# --- the trainer's checkpoints (the trainer is duck-typed to keep this module import-light) --------------


def _record(trainer) -> dict:
    return model_record(trainer.model, trainer.cfg.to_dict(), trainer.classes, trainer.preprocess)


def save_best(trainer, epoch: int, row: dict) -> None:
    """Write ``best.pt``: the weights and everything ``predict`` needs, with the epoch's metrics."""
    record = _record(trainer)
    record.update(epoch=epoch + 1, metrics={k: v for k, v in row.items() if isinstance(v, (int, float))})
    save(record, trainer.run_dir / BEST)


def save_last(trainer, epoch: int) -> None:
    """Write ``last.pt``: the full resume state after ``epoch`` (0-based)."""
    record = _record(trainer)
    record.update(
        epoch=epoch + 1,
        steps_per_epoch=trainer.steps_per_epoch,
        optimizer=trainer.optimizer.state_dict(),
        scheduler=trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        scaler=trainer.scaler.state_dict(),
        unfreezer=trainer.unfreezer.state_dict() if trainer.unfreezer is not None else None,
        best={"epoch": trainer.best_epoch, "metric": trainer.best_metric, "bad_epochs": trainer.bad_epochs},
        rng=rng_state(),
    )
    save(record, trainer.run_dir / LAST)


def restore(trainer) -> None:
    """Continue a run from its ``last.pt``: call after the trainer is set up as at the start of that run."""
    record = load(trainer.run_dir / LAST)
    _check_resumable(trainer, record)
    trainer.model.load_state_dict(record["state_dict"])
    if trainer.unfreezer is not None and record.get("unfreezer"):
        trainer.unfreezer.load_state_dict(record["unfreezer"])  # before the optimizer: re-creates its groups
    try:
        trainer.optimizer.load_state_dict(record["optimizer"])
    except ValueError as exc:  # torch's group-size mismatch: the trainable set differs from the run's
        raise CheckpointError(
            f"the optimizer state in {trainer.run_dir / LAST} does not fit this config's trainable "
            f"parameters (changed --freeze, --unfreeze or --bn?): {str(exc).splitlines()[0]}"
        ) from None
    if trainer.scheduler is not None and record.get("scheduler"):
        trainer.scheduler.load_state_dict(record["scheduler"])
    trainer.scaler.load_state_dict(record["scaler"])
    set_rng_state(record["rng"])
    best = record["best"]
    trainer.best_epoch, trainer.best_metric, trainer.bad_epochs = best["epoch"], best["metric"], best["bad_epochs"]
    trainer.start_epoch = int(record["epoch"])
    trainer.metrics.truncate(trainer.start_epoch)
    trainer.echo(f"resumed {trainer.run_dir} after epoch {trainer.start_epoch}")


def _check_resumable(trainer, record: dict) -> None:
    path, cfg = trainer.run_dir / LAST, trainer.cfg
    if record.get("model") != cfg.model or record.get("classes") != trainer.classes:
        raise CheckpointError(
            f"{path} is a run of {record.get('model')} on {len(record['classes'])} classes; this config is "
            f"{cfg.model} on {len(trainer.classes)}: resume with the run's own config"
        )
    old = dict(record.get("config") or {}, steps_per_epoch=record.get("steps_per_epoch"))
    new = {"epochs": cfg.epochs, "scheduler": cfg.scheduler, "warmup_epochs": cfg.warmup_epochs,
           "steps_per_epoch": trainer.steps_per_epoch}  # fmt: skip
    changed = [f"{k} {old[k]!r} -> {v!r}" for k, v in new.items() if old.get(k) is not None and old[k] != v]
    # A per-step LR schedule cannot be stretched mid-run (OneCycleLR raises once past its total_steps).
    if changed and not (cfg.scheduler == "none" and old.get("scheduler") == "none"):
        raise ConfigError(
            f"cannot resume {path} with {', '.join(changed)}: its {old.get('scheduler')} LR schedule spans the "
            "run's original length; resume with the run's values, or start a new run"
        )


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_plain(state: tuple) -> list:
    # numpy arrays are not allowed by weights_only loading; a list of ints is
    kind, keys, pos, has_gauss, cached = state
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_plain(plain: list) -> tuple:
    kind, keys, pos, has_gauss, cached = plain
    return kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers, so checkpoint keys never carry their prefixes."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
