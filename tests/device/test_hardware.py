"""The run's use of its device (``device/hardware.py``) where it meets the platform: peak-memory readings where Windows
and macOS lack or report otherwise, channels_last, compilation, the RAM a container's limit leaves; and every command
importing without POSIX's resource."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from freezetune.device import hardware


def test_every_command_imports_without_the_posix_resource_module():
    # Windows has no `resource`: imported at the top of the module of memory readings, it stopped train, eval,
    # predict, sweep and ft.train
    code = ("import sys; sys.modules['resource'] = None\n"
            "import freezetune.cli.main, freezetune.training.trainer, freezetune.recipes.named, freezetune.recipes.sweep, freezetune.inference.evaluation\n"
            "print('imported')")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-2000:]


def test_peak_memory_without_proc_reads_the_platforms_unit(monkeypatch):
    class NoProc:
        def __init__(self, *_):
            pass

        def read_text(self):
            raise OSError("no /proc here")

    usage = types.SimpleNamespace(getrusage=lambda _: types.SimpleNamespace(ru_maxrss=2**30), RUSAGE_SELF=0)
    monkeypatch.setattr(hardware, "Path", NoProc)
    monkeypatch.setitem(sys.modules, "resource", usage)
    cpu = torch.device("cpu")
    monkeypatch.setattr(sys, "platform", "darwin")  # bytes: 1 GiB is 1024 MiB (it read as 1 048 576)
    assert hardware.peak_memory_mb(cpu) == 1024
    monkeypatch.setattr(sys, "platform", "freebsd14")  # KiB
    assert hardware.peak_memory_mb(cpu) == 2**20
    monkeypatch.setitem(sys.modules, "resource", None)  # Windows: nothing to read it from
    assert hardware.peak_memory_mb(cpu) != hardware.peak_memory_mb(cpu)  # NaN


def test_channels_last_asked_of_a_model_without_convolutions_is_said_to_have_no_effect(caplog):
    # a text model's run said "on cpu fp32, channels_last" and saved it, though nothing was laid out so
    import logging

    from torch import nn

    from freezetune.device.hardware import use_channels_last

    mlp, cnn = nn.Sequential(nn.Linear(4, 2)), nn.Sequential(nn.Conv2d(3, 4, 3))
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        assert use_channels_last(True, mlp) is False
    assert "--channels-last lays out convolutions, and this model has none: it has no effect" in caplog.text
    assert (use_channels_last(None, mlp), use_channels_last(None, cnn)) == (False, True)
    assert (use_channels_last(True, cnn), use_channels_last(False, cnn)) == (True, False)


def test_compiling_drops_torchs_no_cuda_runtime_line_and_nothing_else(caplog):
    # --compile on a CPU machine with a CUDA toolkit: "W... cpp_extension.py:183] No CUDA runtime is found, using
    # CUDA_HOME='/usr/local'" among the run's lines
    import logging

    from freezetune.device.hardware import recompile

    recompile(torch.nn.Linear(2, 2), backend="eager")
    logger = logging.getLogger("torch.utils.cpp_extension")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("Error checking compiler version for %s", "c++")
    assert "No CUDA runtime" not in caplog.text and "Error checking compiler version for c++" in caplog.text


@pytest.mark.parametrize("version", [1, 2])
def test_a_containers_memory_limit_bounds_the_ram_a_cache_may_take(tmp_path, monkeypatch, version):
    # /proc/meminfo is the host's: under docker --memory the cache went to RAM by the host's figure and the
    # container was killed

    v1 = ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file")
    limit, usage, stat, inactive = (
        ("memory.max", "memory.current", "memory.stat", "inactive_file") if version == 2 else v1
    )
    (tmp_path / "memory").mkdir()
    (tmp_path / limit).write_text(f"{8 << 30}\n")
    (tmp_path / usage).write_text(f"{6 << 30}\n")
    (tmp_path / stat).write_text(f"anon {4 << 30}\n{inactive} {1 << 30}\n")
    room = hardware.cgroup_room(tmp_path)
    assert room == 3 << 30  # 8 GiB less the 6 used, of which 1 is page cache the kernel gives back
    monkeypatch.setattr(hardware, "cgroup_room", lambda: room)
    monkeypatch.setattr(hardware, "_machine_ram", lambda: 60 << 30)
    assert hardware.available_ram() == 3 << 30
    (tmp_path / limit).write_text("max\n" if version == 2 else "9223372036854771712\n")  # no limit
    monkeypatch.undo()
    assert hardware.cgroup_room(tmp_path) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's peak-RSS mark is Linux's")
def test_a_cpu_epoch_leaves_the_processs_peak_memory_reading_whole():
    # each epoch wrote /proc/self/clear_refs, resetting the kernel's mark for everyone: /usr/bin/time reported 943 MiB
    # for a process that peaked at 1709, and a notebook's reading before ft.train lost its peak
    block = bytearray(300 * 2**20)  # touched: resident
    del block  # a large block goes back to the kernel: the RSS drops, the peak stays
    before = hardware.peak_memory_mb(torch.device("cpu"))
    hardware.reset_peak_memory(torch.device("cpu"))
    assert hardware.peak_memory_mb(torch.device("cpu")) == before


def test_a_devices_available_memory_is_the_drivers_free_and_what_torch_holds_unused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 << 20, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 7 << 20)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4 << 20)
    assert hardware.available_device_memory(torch.device("cuda")) == 8 << 20


_VM_STAT = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               10000.
Pages active:                            500000.
Pages inactive:                           30000.
Pages speculative:                         2000.
"""


def _without_proc(monkeypatch):
    def no_proc(path, *args, **kwargs):
        raise FileNotFoundError(path)

    monkeypatch.setattr(hardware, "open", no_proc, raising=False)  # the module's open: /proc/meminfo is Linux's


def test_the_ram_left_on_windows_is_read_from_the_windows_api_without_os_sysconf(monkeypatch):
    # every feature cache's placement raised AttributeError there: os.sysconf is POSIX's
    import ctypes

    def global_memory_status(ref):
        ref._obj.ullAvailPhys = 7 << 30
        return 1

    _without_proc(monkeypatch)
    monkeypatch.delattr(hardware.os, "sysconf")
    monkeypatch.setattr(sys, "platform", "win32")
    kernel32 = types.SimpleNamespace(GlobalMemoryStatusEx=global_memory_status)
    monkeypatch.setattr(ctypes, "windll", types.SimpleNamespace(kernel32=kernel32), raising=False)
    monkeypatch.setattr(hardware, "cgroup_room", lambda: None)  # no container's limit: the machine's figure
    assert hardware.available_ram() == 7 << 30
    monkeypatch.delattr(ctypes, "windll")  # the API unreadable: the fixed guess, not a crash
    assert hardware._machine_ram() == 4 << 30


def test_the_ram_left_on_macos_is_its_free_and_inactive_pages(monkeypatch):
    # macOS has no SC_AVPHYS_PAGES: every Mac planned its feature cache for a fixed 4 GiB
    def sysconf(name):
        if name == "SC_AVPHYS_PAGES":
            raise ValueError("unrecognized configuration name")
        return 16384

    _without_proc(monkeypatch)
    monkeypatch.setattr(hardware.os, "sysconf", sysconf)
    monkeypatch.setattr(sys, "platform", "darwin")
    done = subprocess.CompletedProcess(["vm_stat"], 0, stdout=_VM_STAT)
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: done)
    assert hardware._machine_ram() == (10000 + 30000) * 16384

    def missing(*args, **kwargs):
        raise FileNotFoundError("vm_stat")

    monkeypatch.setattr(subprocess, "run", missing)
    assert hardware._machine_ram() == 4 << 30
