"""torchrun DDP on CPU (Gloo): two processes train one run; rank 0 alone writes the run directory."""

import os
import subprocess
import sys

import pytest
import torch

from _engine_fixtures import make_image_folder
from freezetune.distributed import DistInfo, init_from_env, wrap
from freezetune.reporting import read_metrics, unfreeze_events


def test_single_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_from_env()
    assert not info.enabled and info.is_main
    model = torch.nn.Linear(2, 2)
    assert wrap(model, info, torch.device("cpu")) is model


@pytest.mark.multiprocess
def test_torchrun_two_processes_train_with_unfreeze(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "freezetune", "train", "--model", "timm:test_efficientnet", "--weights", "none", "--data", str(data),
        "--img-size", "32", "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--workers", "0",
        "--no-progress", "--freeze", "backbone", "--unfreeze", "epoch:1", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # one log for the job, not one per process
    assert proc.stdout.count("test accuracy") == 1
    assert proc.stdout.count("epoch 2/2") == 1
    rows = read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert unfreeze_events(rows) == [(2, "blocks.4")]
    assert {"best.pt", "last.pt", "report.png", "config.yaml"} <= {p.name for p in out.iterdir()}


@pytest.mark.multiprocess
def test_torchrun_feature_cache_matches_uncached_ddp(tmp_path):
    # each rank caches its block of images and the ranks exchange them; every rank then samples its shard of each
    # epoch exactly as uncached DDP does, so the two runs compute the same losses. --decode gpu runs the device
    # pipeline on the CPU: the cache builds through it and the uncached run trains from its DDP-sharded batches.
    data = make_image_folder(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows, logs = {}, {}
    for cache in ("auto", "off"):
        out = tmp_path / cache
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "freezetune", "train", "--model", "timm:test_efficientnet", "--weights", "none", "--data", str(data),
            "--img-size", "32", "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--workers", "0",
            "--no-progress", "--freeze", "backbone", "--aug", "none", "--cache", cache, "--decode", "gpu",
            "--out", str(out),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows[cache], logs[cache] = read_metrics(out / "metrics.csv"), proc.stdout
    assert "feature cache:" in logs["auto"] and "feature cache:" not in logs["off"]
    for key in ("train_loss", "val_loss", "train_acc"):
        got, want = [r[key] for r in rows["auto"]], [r[key] for r in rows["off"]]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), key


def test_dist_info_properties():
    info = DistInfo(rank=1, world=4, local_rank=1)
    assert info.enabled and not info.is_main
