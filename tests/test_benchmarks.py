"""The benchmark scripts that only a GPU run uses end to end (``benchmarks/gpu.sh``) still run: a tiny CPU pass of
each, so an API change in freezetune breaks a test here rather than a lent GPU machine's few minutes.

Numbers are not checked (benchmarks are not tests); that each script runs to its table and its check lines is.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--device", "cpu", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=BENCHMARKS.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_throughput_runs_its_frozen_and_cached_measurements():
    out = _run("throughput.py", "--models", "test_efficientnet", "--res", "32", "--batch-size", "4", "--n-images",
               "16", "--iters", "1", "--warmup", "1", "--passes", "1")  # fmt: skip
    assert "test_efficientnet: frozen training / inference =" in out
    assert "test_efficientnet: freezetune's frozen step, cache off (streamed) / inference =" in out
    assert "cache on cpu" in out
    breakdown = out[out.index("frozen step breakdown") :].splitlines()
    assert breakdown[3].split()[0] == "test_efficientnet" and len(breakdown[3].split()) == 5, breakdown


def test_memory_runs_its_peaks_and_estimates():
    out = _run("memory.py", "--models", "test_efficientnet,test_vit", "--res", "32", "--batch-size", "4")
    for model in ("test_efficientnet", "test_vit"):
        assert f"{model}: frozen training peak / inference peak =" in out
        assert f"{model}: inspect's full estimate is" in out


def test_loader_runs_both_contenders_over_every_image(tmp_path):
    out = _run("loader.py", "--n-images", "24", "--batch-size", "4", "--res", "32", "--repeat", "1", "--workers", "1",
               "--work-dir", str(tmp_path))  # fmt: skip
    assert "GPU path / CPU loader =" in out


def test_coldstart_runs_its_rows_in_processes_of_their_own():
    out = _run("coldstart.py", "--runs", "test_efficientnet:nchw", "--res", "32", "--batch-size", "4", "--partial",
               "2", "--iters", "3")  # fmt: skip
    rows = out[out.index("model ") :].splitlines()
    assert rows[0].split()[-2:] == ["s", "cudnn"] and rows[2].split()[:2] == ["test_efficientnet", "nchw"], rows
    assert len(rows[2].split()) == 12 and "error" not in out


def test_transfers_data_line_gives_an_imbalanced_folders_real_counts(monkeypatch):
    # a folder of 200 images for some classes and 10 for others was said as "200/class x 10 classes"
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import transfer

    even = {"y_train": torch.arange(3).repeat(5), "classes": ["a", "b", "c"]}
    assert transfer.per_class_text(even, 5) == "5/class x 3 classes"
    uneven = {"y_train": torch.tensor([0] * 5 + [1] * 2 + [2] * 5), "classes": ["a", "b", "c"]}
    assert transfer.per_class_text(uneven, 5) == "2-5/class (12 images, asked 5) x 3 classes"
    assert transfer.per_class_text(even, 8) == "5/class (15 images, asked 8) x 3 classes"


def test_every_transfer_peer_has_its_run_and_the_layout_variants_wait_for_only(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import transfer

    assert all(callable(getattr(transfer, f"run_{name.replace('-', '_')}", None)) for name in transfer.PEERS)
    assert {"full-nchw", "ft-default-nchw"} <= set(transfer.CONTENDERS)
    assert not {"full-nchw", "ft-default-nchw"} & set(transfer.DEFAULT_CONTENDERS)
    # a rule variant is a question asked by --only, and names constants the auto recipe reads
    from freezetune.auto import rule as auto_rule

    assert "ft-default-last5" in transfer.CONTENDERS and "ft-default-last5" not in transfer.DEFAULT_CONTENDERS
    assert "ft-default-noavg" in transfer.CONTENDERS and "ft-default-noavg" not in transfer.DEFAULT_CONTENDERS
    assert all(hasattr(auto_rule, key) for v in transfer.RULE_VARIANTS.values() for key in v)


def test_bn_fold_compares_the_folded_copy_with_the_model_as_trained():
    out = _run("bn_fold.py", "--models", "test_efficientnet", "--res", "32", "--n-images", "16", "--batch-size", "8",
               "--repeat", "1")  # fmt: skip
    row = out.splitlines()[-1].split()
    assert row[0] == "test_efficientnet" and int(row[1]) > 0 and float(row[-1]) < 1e-3, out


def test_budget_runs_the_default_command_with_and_without_a_budget_and_scores_each():
    out = _run("budget.py", "--model", "timm:test_efficientnet", "--weights", "none", "--dataset", "digits",
               "--per-class", "20", "--res", "32", "--budgets", "2s", "--epochs", "1")  # fmt: skip
    rows = out[out.index("budget  train call s") :].splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["none", "2s"], out
    assert rows[0].split()[2] == "-" and float(rows[1].split()[2]) > 0 and 0 <= float(rows[1].split()[-1]) <= 100
