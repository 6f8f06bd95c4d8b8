"""GpuMonitor with NVML faked: averages of what NVML reported, the right GPU, and never an error for training."""

from __future__ import annotations

import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from freezetune.device.monitor import GpuMonitor


class NVMLError(Exception):
    pass


class FakeNVML:
    """Stands in for ``pynvml``: utilisation alternates 40/80 %, used memory 1024/3072 MiB, every call recorded."""

    NVMLError = NVMLError

    def __init__(self, fail_init: bool = False, fail_samples: bool = False) -> None:
        self.fail_init, self.fail_samples = fail_init, fail_samples
        self.calls: list[str] = []
        self.util: list[int] = []
        self.mem_mib: list[int] = []
        self.open = 0

    def nvmlInit(self):
        self.calls.append("init")
        if self.fail_init:
            raise NVMLError("Driver Not Loaded")
        self.open += 1

    def nvmlShutdown(self):
        self.open -= 1

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.calls.append(uuid)
        return "handle"

    def nvmlDeviceGetHandleByIndex(self, index):
        self.calls.append(f"index {index}")
        return "handle"

    def nvmlDeviceGetUtilizationRates(self, handle):
        if self.fail_samples:
            raise NVMLError("GPU is lost")
        self.util.append(40 if len(self.util) % 2 == 0 else 80)
        return SimpleNamespace(gpu=self.util[-1], memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle):
        self.mem_mib.append(1024 if len(self.mem_mib) % 2 == 0 else 3072)
        return SimpleNamespace(used=self.mem_mib[-1] * 2**20, total=80 * 2**30, free=0)


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=f"uuid-of-{i}"))


def _install(monkeypatch, nvml: FakeNVML | None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # None makes `import pynvml` raise ImportError


def test_averages_what_nvml_reported_over_the_epoch(monkeypatch, fake_cuda):
    nvml = FakeNVML()
    _install(monkeypatch, nvml)
    monitor = GpuMonitor("cuda:1", interval_s=0.01).start()
    time.sleep(0.1)
    stats = monitor.stop()
    assert len(nvml.util) >= 3  # one at start, the polled ones, one at stop
    assert stats == {
        "gpu_util_pct": pytest.approx(sum(nvml.util) / len(nvml.util)),
        "gpu_mem_mb": pytest.approx(sum(nvml.mem_mib) / len(nvml.mem_mib)),
        "gpu_mem_peak_mb": 3072.0,
    }
    assert nvml.calls[:2] == ["init", "GPU-uuid-of-1"]  # by UUID: cuda:1 need not be NVML's GPU 1
    assert nvml.open == 0 and not any(t.name == "freezetune-gpu-monitor" for t in threading.enumerate())


def test_a_second_epoch_starts_from_fresh_samples(monkeypatch, fake_cuda):
    nvml = FakeNVML()
    _install(monkeypatch, nvml)
    monitor = GpuMonitor("cuda", interval_s=60)  # no polled samples: exactly the start and stop ones
    assert monitor.start().stop()["gpu_util_pct"] == 60.0  # 40 and 80
    with monitor:
        pass
    assert monitor.result["gpu_mem_mb"] == 2048.0 and len(nvml.util) == 4


def test_cpu_gives_an_empty_dict_without_touching_nvml(monkeypatch):
    nvml = FakeNVML()
    _install(monkeypatch, nvml)
    assert GpuMonitor(torch.device("cpu")).start().stop() == {}
    assert nvml.calls == []


@pytest.mark.parametrize(
    "nvml",
    [None, FakeNVML(fail_init=True), FakeNVML(fail_samples=True)],
    ids=["pynvml-missing", "nvml-init-fails", "every-sample-fails"],
)
def test_no_nvml_or_a_failing_one_gives_an_empty_dict_and_no_error(monkeypatch, fake_cuda, nvml):
    _install(monkeypatch, nvml)
    monitor = GpuMonitor(0, interval_s=0.01).start()
    time.sleep(0.03)
    assert monitor.stop() == {}
    assert nvml is None or nvml.open == 0


def test_a_gpu_run_without_nvidia_ml_py_is_told_once_how_to_get_its_gpu_columns(monkeypatch, fake_cuda, caplog):
    # it was a debug line: metrics.csv lacked its gpu_ columns on a GPU and nothing said why; a user's own loop
    # starting a monitor each epoch is not told (it has no such columns), nor told every epoch
    from freezetune.run.log import log
    from freezetune.training.epoch_log import TrainProgress

    _install(monkeypatch, None)
    with caplog.at_level("WARNING", logger="freezetune"):
        for _ in range(3):  # the user's own loop
            monitor = GpuMonitor(0).start()
            assert monitor.stop() == {} and monitor.missing_extra
        assert caplog.records == []
        # a run of two epochs, its monitor as on CUDA without nvidia-ml-py (the epoch's tensors stay on the CPU)
        monkeypatch.setattr(GpuMonitor, "start", lambda self: setattr(self, "missing_extra", True) or self)
        with log(lambda line: None):
            for _ in range(2):
                TrainProgress(1, "epoch", enabled=False, device=torch.device("cpu")).gpu.stop()
    said = [r.getMessage() for r in caplog.records if "nvidia-ml-py" in r.getMessage()]
    assert len(said) == 1 and "pip install 'freezetune[monitor]'" in said[0]
