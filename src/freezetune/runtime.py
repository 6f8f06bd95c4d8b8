"""Run-level plumbing of the trainer: the run directory, seeding, compilation, memory readings."""

from __future__ import annotations

import random
import resource
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from freezetune import checkpoint
from freezetune.data.loaders import epoch_seed
from freezetune.errors import CheckpointError, ConfigError

RUN_FILES = ("last.pt", "best.pt", "metrics.csv")


def prepare_run_dir(out: str | None, model: str, *, resume: bool) -> Path:
    """The run directory: ``out``, or ``runs/MODEL-TIMESTAMP``; refused when it holds a run and ``resume`` is off, or
    lacks ``last.pt`` when it is on. Not created here: a set-up error (unknown model, bad data path) must not leave an
    empty run dir behind; ``MetricsLogger`` creates it once the model and data are ready."""
    run_dir = Path(out) if out else default_run_dir(model)
    existing = [f for f in RUN_FILES if (run_dir / f).exists()]
    if resume and not (run_dir / checkpoint.LAST).exists():
        raise CheckpointError(f"cannot resume: {run_dir / checkpoint.LAST} does not exist")
    if existing and not resume:
        raise ConfigError(
            f"run dir {str(run_dir)!r} already holds a run ({', '.join(existing)}); "
            "pass --resume to continue it or choose another --out"
        )
    return run_dir


def default_run_dir(model: str) -> Path:
    """``runs/MODEL-YYYYmmdd-HHMMSS``: where a run goes without ``--out``.

    >>> str(default_run_dir("timm:resnet50")).startswith("runs/resnet50-")
    True
    """
    return Path("runs") / f"{model.split(':')[-1].replace('/', '_')}-{datetime.now():%Y%m%d-%H%M%S}"


def recompile(module: nn.Module, backend: str | None = None) -> nn.Module:
    """Compile ``module`` afresh after resetting dynamo: call it again after every freeze/unfreeze.

    Dynamo guards did not cover ``requires_grad`` flips (pytorch#139476): a graph traced while a stage was frozen
    could keep that stage out of autograd after it was unfrozen. Resetting drops every cached graph of the process.

    >>> fast = recompile(nn.Linear(2, 2), backend="eager")
    >>> fast(torch.zeros(1, 2)).shape
    torch.Size([1, 2])
    """
    torch._dynamo.reset()
    return torch.compile(module, backend=backend or "inductor")


def use_channels_last(setting: bool | None, model: nn.Module, device: torch.device) -> bool:
    """``setting`` when given, else NHWC for a convnet.

    On CUDA NHWC lets cuDNN use tensor-core convolutions under AMP; on the CPU oneDNN's NHWC kernels trained
    EfficientNet-Lite0's last stages 1.3x faster and built its cache faster too (1 thread, 64 px, 2026-11-30).
    """
    if setting is not None:
        return setting
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    # Each epoch's augmentation (in-process CPU transforms) and dropout depend only on (seed, epoch, DDP rank): a
    # resumed run repeats them exactly. The rank term keeps ranks from drawing the same crops and masks for their
    # different images. The loaders seed their own order and workers (``Loaders``, ``set_epoch``).
    torch.manual_seed(epoch_seed(seed, epoch, rank))


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory reading: CUDA's allocator counter, or on Linux the kernel's peak-RSS mark (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
    except OSError:
        pass  # not Linux, or not allowed: the reading stays process-wide


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since ``reset_peak_memory``: allocated CUDA memory, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB; process-wide peak
