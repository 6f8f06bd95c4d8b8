"""The run's use of its device beyond precision (``device/precision.py``): compilation, the convolutions' memory layout
(channels_last), peak-memory readings, and the memory a run may still take: the RAM (``available_ram``: where a feature
cache may go, a container's limit counted) and a CUDA device's (``available_device_memory``)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn


def recompile(module: nn.Module, backend: str | None = None) -> nn.Module:
    """Compile ``module`` afresh after resetting dynamo: call it again after every freeze/unfreeze.

    Dynamo guards did not cover ``requires_grad`` flips (pytorch#139476): a graph traced while a stage was frozen
    could keep that stage out of autograd after it was unfrozen. Resetting drops every cached graph of the process.

    >>> fast = recompile(nn.Linear(2, 2), backend="eager")
    >>> fast(torch.zeros(1, 2)).shape
    torch.Size([1, 2])
    """
    torch._dynamo.reset()
    # inductor's first compile imports torch.utils.cpp_extension, which warns, on a machine with a CUDA toolkit and no
    # GPU, that it found no CUDA runtime: a line among the run's that says nothing the run's "on cpu" does not
    logging.getLogger("torch.utils.cpp_extension").addFilter(_no_cuda_runtime_line)
    return torch.compile(module, backend=backend or "inductor")


def _no_cuda_runtime_line(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("No CUDA runtime is found")


def use_channels_last(setting: bool | None, model: nn.Module) -> bool:
    """``setting`` when given, else NHWC for a convnet, on any device.

    On CUDA NHWC lets cuDNN use tensor-core convolutions under AMP; on the CPU oneDNN's NHWC kernels trained
    EfficientNet-Lite0's last stages 1.3x faster and built its cache faster too (1 thread, 64 px, 2026-11-30).
    """
    convnet = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if setting is None:
        return convnet
    if setting and not convnet:  # a text model or a pure transformer: the log claimed channels_last, to no effect
        from freezetune.run.log import warn_once

        warn_once(logging.getLogger(__name__), "--channels-last lays out convolutions, and this model has none: "
                  "it has no effect")  # fmt: skip
    return setting and convnet


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory reading on CUDA (its allocator's counter). A CPU's reading stays the process's peak
    RSS: resetting the kernel's mark (VmHWM, through ``/proc/self/clear_refs``) reset it for everyone, so
    ``/usr/bin/time`` reported 943 MiB for a process that peaked at 1709, and a notebook's own reading lost its
    peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: allocated CUDA memory since ``reset_peak_memory``, or the process's peak RSS on the CPU (NaN on
    Windows, which has no ``resource`` module to read it from)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource  # POSIX only: imported at the top, it stopped every command on Windows
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # process-wide
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS reports bytes, Linux and BSD KiB


def available_ram() -> int:
    """The RAM this process may still take: the machine's, and within a container's memory limit what it leaves."""
    ram, room = _machine_ram(), cgroup_room()
    return ram if room is None else min(ram, room)


def available_device_memory(device: torch.device) -> int:
    """Bytes a CUDA device can still give new tensors: the driver's free memory and what PyTorch's allocator holds
    unused (blocks freed by an earlier store, graph or run stay reserved, and the driver counts them as taken)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _machine_ram() -> int:
    # MemAvailable counts the page cache the kernel would give back; free pages alone understate it badly
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    reader = {"win32": _windows_ram, "darwin": _macos_ram}.get(sys.platform)
    ram = reader() if reader is not None else None
    if ram is not None:
        return ram
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # Windows has no os.sysconf, macOS no SC_AVPHYS_PAGES
        return 4 * 2**30


def _windows_ram() -> int | None:
    import ctypes  # the Windows API's struct, read only there

    class MemoryStatusEx(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong)] + [
            (name, ctypes.c_ulonglong)
            for name in ("ullTotalPhys", "ullAvailPhys", "ullTotalPageFile", "ullAvailPageFile", "ullTotalVirtual",
                         "ullAvailVirtual", "ullAvailExtendedVirtual")
        ]  # fmt: skip

    status = MemoryStatusEx()
    status.dwLength = ctypes.sizeof(status)
    try:
        if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return None
    except (AttributeError, OSError):
        return None
    return int(status.ullAvailPhys)


def _macos_ram() -> int | None:
    # free and inactive pages, what macOS gives a process that asks (Activity Monitor's and psutil's count): free
    # pages alone understate it as badly as Linux's MemFree. vm_stat ships with every macOS and answers in a few ms
    try:
        out = subprocess.run(["/usr/bin/vm_stat"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    page = re.search(r"page size of (\d+) bytes", out)
    pages = dict(re.findall(r"^Pages (free|inactive):\s+(\d+)", out, re.MULTILINE))
    if page is None or len(pages) < 2:
        return None
    return (int(pages["free"]) + int(pages["inactive"])) * int(page.group(1))


# cgroup v2's files, then v1's: the limit, the usage, and the usage statistics (the page cache it may give back)
_CGROUP_FILES = (("memory.max", "memory.current", "memory.stat", "inactive_file"),
                 ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
                  "total_inactive_file"))  # fmt: skip


def cgroup_room(root: str | Path = "/sys/fs/cgroup") -> int | None:
    """What a container's memory limit leaves this process's cgroup (limit, less what it uses but the page cache the
    kernel would give back), or None without a limit. /proc/meminfo is the host's: under ``docker run --memory 8g``
    on a 64 GiB host a cache sized by it alone went to RAM and the container was killed.

    >>> cgroup_room("/nonexistent") is None
    True
    """
    for limit_name, usage_name, stat_name, inactive in _CGROUP_FILES:
        try:
            limit = (Path(root) / limit_name).read_text().strip()
            usage = int((Path(root) / usage_name).read_text())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # v2's "max", v1's page-rounded LONG_MAX: no limit
            return None
        try:
            stat = dict(line.split() for line in (Path(root) / stat_name).read_text().splitlines() if " " in line)
            usage -= int(stat.get(inactive, 0))
        except (OSError, ValueError):
            pass
        return max(0, int(limit) - usage)
    return None
