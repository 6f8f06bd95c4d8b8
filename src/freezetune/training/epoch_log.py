"""What a training epoch reports: its running loss and accuracy with the progress bar (``TrainProgress``), its
``metrics.csv`` row (``epoch_row``) and the one log line printed after it (``format_epoch_line``).
"""

from __future__ import annotations

import logging
import numbers
import os
import sys
import time
import warnings
from typing import Any

import torch

from freezetune.config.options import DEFAULT_MONITOR
from freezetune.run.log import first_process, warn_once
from freezetune.run.reporting import LIST_SEP

log = logging.getLogger(__name__)


def progress_bar(total: int, desc: str, *, enabled: bool, unit: str = "it"):
    """A tqdm bar that clears its line when done. Redirected to a file (nohup, a batch log), a bar redrawn every step
    fills it with carriage returns: there it is written as a line once a minute at most; a terminal (tmux, SSH) and a
    notebook (its widget, or its text bar without ipywidgets) get it live.

    >>> progress_bar(3, "x", enabled=False).disable
    True
    """
    with warnings.catch_warnings():  # a notebook without ipywidgets: tqdm's "IProgress not found" read as an error,
        warnings.filterwarnings("ignore", message="IProgress not found")  # where its text bar serves (see below)
        from tqdm.auto import tqdm

    # a notebook without ipywidgets gets tqdm's text bar on its stderr, which it redraws in place as a terminal does
    in_notebook = type(getattr(sys.stderr, "wrapped", sys.stderr)).__module__.startswith("ipykernel")  # (cli.exit)
    live = tqdm.__module__.startswith("tqdm.notebook") or in_notebook or _sized_terminal(sys.stderr)
    interval = 0.1 if live else 60.0
    # a file's bar waits a minute to appear: drawn at once, every epoch shorter than that left a line of 0%; tqdm's
    # monitor thread redraws a bar silent for maxinterval (10 s by default): a file got two lines a minute. Its lines
    # take no size from the terminal: one of 0 rows gave the bar -1 rows, and tqdm hid it
    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=live, unit=unit,
                mininterval=interval, maxinterval=max(interval, 10.0), delay=0 if live else interval,
                file=None if live else _Lines(sys.stderr))  # fmt: skip


def _sized_terminal(stream) -> bool:
    """Whether ``stream`` is a terminal with a size: a pseudo-terminal that reports 0 rows or columns (``ssh -tt``
    from a script, ``docker run -t`` from a non-terminal, ``script``, ``unbuffer``) is one, yet tqdm hides a bar at or
    below the screen's height, and such a run showed no progress at all; it gets the file's lines."""
    if not stream.isatty():
        return False
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # a stream that says it is a terminal and has no descriptor: trusted
        return True
    try:
        size = os.get_terminal_size(fd)
    except (OSError, ValueError):
        return False
    return size.lines > 0 and size.columns > 0


class _Lines:
    """The bar's stream where stderr is a file: tqdm starts each redraw with a carriage return and ends none with a
    newline, so an epoch's redraws were one line that ``grep``, ``less`` and log collectors saw only when the epoch
    ended. Here each redraw is a line of its own, and the blank that clears the bar is dropped."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        for part in text.split("\r"):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):  # encoding, fileno (tqdm reads the width through it), isatty
        return getattr(self.stream, name)


class TrainProgress:
    """A training epoch's running loss and accuracy with its progress bar.

    Each step's loss and correct count are written into a buffer on the device (two small copies; reading them every
    step would sync the GPU each batch) and summed on the host when read: when the bar's numbers are refreshed, every
    tenth step, and once at the end of the epoch. A step of a head on cached features is a handful of tiny kernels, so
    the meter's own kernels count: five a step, where running sums and a running first-non-finite-step took fifteen.

    The bar is driven by hand: given the loader, tqdm.auto calls iter() on it up front and again to loop, so a
    DataLoader would start twice an epoch (a wasted worker prefetch, a second seed draw).

    >>> p = TrainProgress(2, "epoch 1/1", enabled=False, device=torch.device("cpu"))
    >>> p.update(torch.tensor(0.5), torch.tensor([[1.0, 0.0]]), torch.tensor([0])); p.close()["train_acc"]
    1.0
    """

    def __init__(self, total: int, desc: str, *, enabled: bool, device: torch.device) -> None:
        from freezetune.device.monitor import GpuMonitor

        self.gpu = GpuMonitor(device).start()  # a no-op off CUDA or without nvidia-ml-py
        if self.gpu.missing_extra and first_process():  # said once a run: the gpu_ columns would be missing unexplained
            warn_once(log, "GPU utilisation and memory are not recorded (metrics.csv's gpu_ columns): nvidia-ml-py "
                      "is not installed; pip install 'freezetune[monitor]'")  # fmt: skip
        self.total, self.step, self.seen = total, 0, 0
        self.skipped = 0  # steps whose batch was not trained on (--skip-nonfinite)
        self.device = device
        # step i's loss and correct count; a skipped step's stay 0, as its batch size does
        self.losses = torch.zeros(max(total, 1), device=device)
        self.corrects = torch.zeros(max(total, 1), device=device, dtype=torch.long)
        self.sizes = [0] * max(total, 1)
        self.carried = {"loss_sum": 0.0, "correct": 0, "first_bad": -1}  # the steps before a mid-epoch resume
        # ... and the seconds they took, in the process stopped then: the epoch's time and img/s count them too
        self.started, self.seconds_before = time.perf_counter(), 0.0
        self.bar = progress_bar(total, desc, enabled=enabled)

    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
               correct: torch.Tensor | None = None) -> None:  # fmt: skip
        """Count a trained batch: its loss, and its correct predictions (``correct``, when the step counted them
        already: a CUDA graph's replay does, saving the launches)."""
        i = self.step
        if i >= len(self.sizes):  # more batches than announced: grow rather than fail
            self._grow()
        self.losses[i] = loss.detach()
        self.corrects[i] = (logits.detach().argmax(-1) == targets).sum() if correct is None else correct
        self.sizes[i] = len(targets)
        self.seen += len(targets)
        self.step += 1
        self.bar.update()
        if not self.bar.disable and (i % 10 == 0 or i == self.total - 1):  # reading syncs
            totals = self._totals()
            loss, acc = totals["loss_sum"] / self.seen, 100 * totals["correct"] / self.seen
            self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.1f}%", refresh=False)

    def skip(self) -> None:
        """A step whose batch trained nothing (its loss was not finite and ``--skip-nonfinite`` allowed a skip)."""
        if self.step >= len(self.sizes):
            self._grow()
        self.skipped += 1
        self.bar.update()
        self.step += 1

    def _grow(self) -> None:
        self.losses = torch.cat([self.losses, torch.zeros_like(self.losses)])
        self.corrects = torch.cat([self.corrects, torch.zeros_like(self.corrects)])
        self.sizes += [0] * len(self.sizes)

    def _totals(self) -> dict[str, Any]:
        """The sums over the steps so far (reads the device): loss x batch size, correct count, first non-finite
        step (-1: none). In float64 on the host, whatever the device's dtypes."""
        n = self.step
        losses = self.losses[:n].cpu().double()
        bad = (~torch.isfinite(losses)).nonzero()
        first_bad = self.carried["first_bad"] if self.carried["first_bad"] >= 0 else int(bad[0]) if len(bad) else -1
        return {"loss_sum": self.carried["loss_sum"] + float((losses * torch.tensor(self.sizes[:n])).sum()),
                "correct": self.carried["correct"] + int(self.corrects[:n].sum()), "first_bad": first_bad}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The running totals so far (a mid-epoch checkpoint): a resumed epoch reports what an uninterrupted one
        would. Reads the device: call it at a save, not every step."""
        return {"step": self.step, "seen": self.seen, **self._totals(), "skipped": self.skipped,
                "seconds": self.seconds_before + time.perf_counter() - self.started}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.seen, self.skipped = state["step"], state["seen"], state.get("skipped", 0)
        self.seconds_before = float(state.get("seconds", 0.0))  # (a last.pt saved before it was kept: 0)
        self.carried = {"loss_sum": float(state["loss_sum"]), "correct": int(state["correct"]),
                        "first_bad": int(state["first_bad"])}  # fmt: skip
        self.bar.update(self.step)

    @property
    def diverged(self) -> bool:
        """Whether a step of this epoch had a non-finite loss (reads the device)."""
        return self._totals()["first_bad"] >= 0

    def abandon(self) -> None:
        """An epoch ended by an exception: clear the bar's line and stop the GPU monitor's thread."""
        self.bar.close()
        self.gpu.stop()

    def close(self, reduce=lambda t: t) -> dict[str, float]:
        """Close the bar; the epoch's mean loss, accuracy and sample count, summed over ranks by ``reduce``, on CUDA
        this GPU's mean utilisation and memory (``GpuMonitor``), and ``first_bad_step``: the first step (0-based) of
        this process whose loss was not finite, -1 if none, or 0 when another rank's was; ``seconds_before``: what
        the epoch's steps took before a mid-epoch resume."""
        self.bar.close()
        gpu = self.gpu.stop()
        mine = self._totals()
        dtype = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        totals = torch.tensor([mine["loss_sum"], mine["correct"], self.seen, float(mine["first_bad"] >= 0)],
                              dtype=dtype, device=self.device)  # fmt: skip
        loss, correct, seen, bad_ranks = reduce(totals).tolist()
        first_bad = mine["first_bad"] if mine["first_bad"] >= 0 else (0 if bad_ranks else -1)
        return {"train_loss": loss / max(seen, 1), "train_acc": correct / max(seen, 1), "samples": int(seen),
                "first_bad_step": first_bad, "seconds_before": self.seconds_before, **gpu}  # fmt: skip


def human(n: float) -> str:
    """A count as the epoch lines and the sweep table write it.

    >>> human(3_400_000), human(101_766), human(12_810)
    ('3.4M', '101.8K', '12.8K')
    """
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{n:g}"


def _lr_text(row: dict[str, Any]) -> str:
    lrs = [row["lr"]] if isinstance(row.get("lr"), numbers.Real) else []
    lrs = lrs or [v for k, v in row.items() if k.startswith("lr/") and isinstance(v, numbers.Real) and v > 0]
    if not lrs:
        return ""
    lo, hi = min(lrs), max(lrs)
    return f"lr {hi:.1e}" if lo == hi else f"lr {lo:.1e}..{hi:.1e}"


def epoch_row(epoch: int, epochs: int, train: dict, val: dict | None, *, seconds: float, optimizer,
              params: tuple[int, int], peak_mb: float, unfrozen: list[str],
              lrs: list[float] | None = None) -> dict[str, Any]:  # fmt: skip
    """One ``metrics.csv`` row: train and val metrics, every group's LR, trainable/total parameters, time, memory, and
    the stages unfrozen after the epoch. ``epoch`` is 0-based; ``train`` holds ``train_loss``, ``train_acc`` and
    ``samples`` (which feeds img/s). ``lrs``: the group LRs of the epoch's last step, in group order (the optimizer's
    own are the next step's, after the scheduler moved them: past the end of the schedule after the last epoch).

    >>> epoch_row(0, 3, {"train_loss": 1.0, "train_acc": 0.5, "samples": 8}, None, seconds=2.0, optimizer=None,
    ...           params=(10, 20), peak_mb=1.0, unfrozen=[])["img_per_s"]
    4.0
    """
    row = {"epoch": epoch + 1, "epochs": epochs, "train_loss": train["train_loss"], "train_acc": train["train_acc"]}
    if val is not None:
        row.update(val_loss=val["loss"], val_acc=val["acc"], val_top5=val["top5"], val_f1=val["macro_f1"],
                   val_n=val["n"])  # fmt: skip
    groups = optimizer.param_groups if optimizer is not None else []
    lrs = lrs if lrs is not None and len(lrs) == len(groups) else [g["lr"] for g in groups]
    row.update({f"lr/{g.get('name', i)}": lr for i, (g, lr) in enumerate(zip(groups, lrs, strict=True))})
    row.update(trainable_params=params[0], total_params=params[1], epoch_time_s=seconds)
    row.update(img_per_s=train["samples"] / max(seconds, 1e-9), peak_mem_mb=peak_mb)
    row.update({k: v for k, v in train.items() if k.startswith("gpu_")})  # GpuMonitor's readings, on CUDA
    if "skipped_batches" in train:  # --skip-nonfinite: batches whose loss was not finite made no step
        row["skipped_batches"] = train["skipped_batches"]
    row["unfrozen"] = unfrozen
    return row


def format_epoch_line(row: dict[str, Any], items: str = "images", monitor: str = DEFAULT_MONITOR) -> str:
    """Format the one log line printed after each epoch; missing fields are left out. ``items`` names what the
    speed counts ("images": img/s, "texts": texts/s); under ``monitor`` ``val_f1`` the validation macro-F1 follows
    its accuracy (what picks best.pt is on the line).

    With several ``lr/<group>`` columns and no ``lr``, the range of the non-zero group LRs is shown.

    >>> format_epoch_line({"epoch": 3, "epochs": 10, "train_loss": 0.512, "train_acc": 0.812, "val_loss": 0.43,
    ...     "val_acc": 0.85, "lr": 1e-3, "trainable_params": 1.2e6, "total_params": 4.7e6, "epoch_time_s": 12.3,
    ...     "img_per_s": 812, "unfrozen": "layer4"})
    'epoch  3/10  train_loss 0.512 acc 81.2%  val_loss 0.430 acc 85.0%  lr 1.0e-03  trainable 1.2M/4.7M  12.3s 812 img/s  unfrozen: layer4'
    """
    # widths that hold over a run (epoch 9/30 then 10/30, acc 9.0% then 88.0%): 50 lines read as columns
    total = row.get("epochs")
    parts = [f"epoch {row['epoch']:>{len(str(total))}}/{total}" if total is not None else f"epoch {row['epoch']}"]
    val = _split_text(row, "val")
    if monitor == "val_f1" and row.get("val_f1") is not None:
        val += f" f1 {100 * row['val_f1']:.1f}%"
    parts += [_split_text(row, "train"), val, _lr_text(row)]
    if row.get("trainable_params") is not None:
        total = f"/{human(row['total_params'])}" if row.get("total_params") is not None else ""
        parts.append(f"trainable {human(row['trainable_params'])}{total}")
    speed = []
    if row.get("epoch_time_s") is not None:
        speed.append(f"{row['epoch_time_s']:.1f}s")
    if row.get("img_per_s") is not None:
        speed.append(f"{row['img_per_s']:.0f} {'img' if items == 'images' else items}/s")
    if row.get("gpu_util_pct") is not None:
        speed.append(f"GPU {row['gpu_util_pct']:.0f}% {row.get('gpu_mem_mb', 0) / 1024:.1f} GiB")
    parts.append(" ".join(speed))
    if row.get("skipped_batches"):
        parts.append(f"skipped {row['skipped_batches']} non-finite batch(es)")
    if row.get("unfrozen"):
        names = row["unfrozen"] if isinstance(row["unfrozen"], (list, tuple)) else str(row["unfrozen"]).split(LIST_SEP)
        parts.append("unfrozen: " + ", ".join(s for s in names if s))
    return "  ".join(p for p in parts if p)


def _split_text(row: dict[str, Any], split: str) -> str:
    loss, acc = row.get(f"{split}_loss"), row.get(f"{split}_acc")
    if loss is None:
        return "" if acc is None else f"{split}_acc {100 * acc:.1f}%"
    return f"{split}_loss {loss:.3f}" + ("" if acc is None else f" acc {100 * acc:4.1f}%")
