"""The examples run as a user runs them: the plain loop as a script, the notebook on a real Jupyter kernel."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _env(**extra: str) -> dict[str, str]:
    # the checkout's src first, so the example runs against this freezetune; one thread: 2 shared cores
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def _trainable(summary_line: str) -> int:
    return int(summary_line.split()[2].replace(",", ""))


def test_plain_loop_unfreezes_two_stages_with_their_own_lrs():
    argv = ["--model", "timm:test_efficientnet", "--weights", "none", "--img-size", "32", "--per-class", "8"]
    argv += ["--val-per-class", "4", "--epochs", "3", "--batch-size", "16"]
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "plain_loop.py"), *argv],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert ("unfroze blocks.4 (trains from epoch 1); optimizer groups: classifier lr=0.001, classifier/no_decay "
            "lr=0.001, blocks.4 lr=0.0001, blocks.4/no_decay lr=0.0001\n") in out  # fmt: skip
    assert "blocks.3/no_decay lr=5e-05\n" in out and "unfroze blocks.3 (trains from epoch 2)" in out
    assert len(re.findall(r"^epoch \d: train_loss [\d.]+ val_acc [\d.]+$", out, flags=re.M)) == 3
    final = {line.split()[0]: line for line in out.split("epoch 2:")[1].splitlines() if line[:1].isalpha()}
    assert _trainable(final["blocks.3"]) > 0 and _trainable(final["blocks.4"]) > 0
    assert _trainable(final["blocks.2"]) == 0 and final["blocks.2"].endswith("frozen")  # BN policy kept


def test_quickstart_notebook_trains_plots_and_predicts_on_a_real_kernel(tmp_path, monkeypatch):
    # the kernel inherits this environment: this checkout's freezetune, a tiny random model, two short epochs
    for key, value in _env(FT_NB_MODEL="timm:test_efficientnet", FT_NB_WEIGHTS="none", FT_NB_IMG_SIZE="32").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FT_NB_PER_CLASS", "10")
    monkeypatch.setenv("FT_NB_EPOCHS", "2")
    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells), "commit the notebook without outputs"
    imports = "".join(line for cell in nb.cells for line in cell.source.splitlines(keepends=True) if "import" in line)
    assert "from freezetune." not in imports, "the notebook shows the public API (import freezetune as ft) alone"
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    def text(cell) -> str:
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    source_of = {i: cell.source for i, cell in enumerate(nb.cells)}
    groups = next(text(c) for i, c in enumerate(nb.cells) if "param_groups(" in source_of[i])
    assert re.findall(r"(\S+)  lr=(\S+)  weight_decay=(\S+)", groups) == [
        ("blocks.3", "5e-05", "0.01"),  # AdamW's own default decay
        ("blocks.3/no_decay", "5e-05", "0"),
        ("blocks.4", "0.0001", "0.01"),
        ("blocks.4/no_decay", "0.0001", "0"),
        ("classifier", "0.001", "0.01"),
        ("classifier/no_decay", "0.001", "0"),
    ]
    train = next(text(c) for i, c in enumerate(nb.cells) if "for epoch in range(EPOCHS)" in source_of[i])
    assert len(re.findall(r"^epoch \d: train_loss [\d.]+ val_loss [\d.]+ val_acc [\d.]+$", train, flags=re.M)) == 2
    plot = next(c for i, c in enumerate(nb.cells) if "ax_acc.plot" in source_of[i])
    assert any("image/png" in o.get("data", {}) for o in plot.outputs)  # the curves render inline
    predict = next(text(c) for i, c in enumerate(nb.cells) if "digit.png" in source_of[i])
    assert re.search(r"true: \d \| top-3: \[\(\d, 0\.\d+\)", predict)
    assert not (tmp_path / "digit.png").exists()  # its image goes to a temporary folder, not the one it runs in
