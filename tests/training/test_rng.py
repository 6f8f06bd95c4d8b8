"""Seeds and the random generators' state a checkpoint carries (``training/rng.py``)."""

from __future__ import annotations

import random

import numpy as np
import torch

from freezetune.run import checkpoint
from freezetune.training import rng


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    checkpoint.save({"rng": rng.rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    rng.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(again[0], expected[0]) and again[1:] == expected[1:]


def test_a_resume_that_sees_fewer_gpus_than_the_run_saved_restores_theirs(monkeypatch):
    # last.pt kept one CUDA RNG state per visible device: resumed under CUDA_VISIBLE_DEVICES=0 after two, IndexError
    restored, state = [], {**rng.rng_state(), "cuda": ["state of cuda:0", "state of cuda:1"]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    rng.set_rng_state(state)
    assert restored == [("state of cuda:0", 0)]


def test_an_apple_gpus_generator_is_saved_and_restored_and_a_state_without_it_still_loads(tmp_path, monkeypatch):
    # a run resumed on mps drew other dropout masks there than the uninterrupted run: its generator was not saved
    restored = []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: torch.tensor([7, 8], dtype=torch.uint8))
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    checkpoint.save({"rng": rng.rng_state()}, tmp_path / "rng.pt")
    saved = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    rng.set_rng_state(saved)
    assert len(restored) == 1 and restored[0].tolist() == [7, 8]
    rng.set_rng_state({key: value for key, value in saved.items() if key != "mps"})  # an earlier freezetune's
    assert len(restored) == 1
