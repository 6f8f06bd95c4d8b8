"""Random number generators: a run's seeds, and the state a checkpoint carries so a resumed run draws what the
uninterrupted one would have drawn (dropout, and whatever else this process draws)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from freezetune.data.loaders import epoch_seed
from freezetune.device.precision import mps_available


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    # Each epoch's dropout (what the training process itself draws) depends only on (seed, epoch, DDP rank): a resumed
    # run repeats it exactly. The rank term keeps ranks from drawing the same masks for their different images. The
    # loaders seed their own order and each image's augmentation (``Loaders``, ``set_epoch``, ``data/seeded.py``).
    torch.manual_seed(epoch_seed(seed, epoch, rank))


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if mps_available():  # an Apple GPU's own generator: its dropout masks, drawn there
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        # one state per device the saving process saw: a resume that sees fewer (CUDA_VISIBLE_DEVICES=0 after two)
        # restores theirs, where set_rng_state_all raised IndexError; a device it did not see keeps its own
        for i, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, i)
    if "mps" in state and mps_available():  # (a last.pt from before it was saved has none: MPS draws anew)
        torch.mps.set_rng_state(state["mps"])


def _numpy_state_to_plain(state: tuple) -> list:
    # numpy arrays are not allowed by weights_only loading; a list of ints is
    kind, keys, pos, has_gauss, cached = state
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_plain(plain: list) -> tuple:
    kind, keys, pos, has_gauss, cached = plain
    return kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value
