"""GPU utilisation and memory over an epoch, sampled through NVML (``nvidia-ml-py``, extra ``[monitor]``).

``GpuMonitor`` polls the GPU in a background thread between ``start()`` and ``stop()`` and returns the averages,
e.g. ``{"gpu_util_pct": 87.5, "gpu_mem_mb": 10240.0, "gpu_mem_peak_mb": 11008.0}``. Memory is what the whole GPU
has in use (every process, as ``nvidia-smi`` shows), not only PyTorch's allocations. On a CPU, without ``pynvml``,
or when NVML fails, the result is ``{}``: monitoring never stops a training run.
"""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger(__name__)

_MIB = 2**20


class GpuMonitor:
    """Sample one CUDA device every ``interval_s`` seconds in a background thread; ``stop()`` returns the averages.

    Args:
        device: The device training runs on (``"cuda"``, ``"cuda:1"``, a ``torch.device``); anything but CUDA
            makes the monitor a no-op.
        interval_s: Seconds between samples (one more is taken at ``start`` and one at ``stop``).

    >>> monitor = GpuMonitor("cpu").start()
    >>> monitor.stop()  # on a CPU: nothing to report, and no error
    {}
    """

    def __init__(self, device: torch.device | str | int | None = "cuda", interval_s: float = 0.5) -> None:
        self.device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cpu")
        self.interval_s = float(interval_s)
        self._nvml = None
        self._handle = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._util: list[float] = []
        self._mem: list[float] = []
        self.result: dict[str, float] = {}  # what stop() returned when used as a context manager
        self.missing_extra = False  # on CUDA without nvidia-ml-py (``pip install 'freezetune[monitor]'``)

    def start(self) -> GpuMonitor:
        """Begin sampling (a no-op on a CPU or without NVML); returns ``self``."""
        self._util, self._mem = [], []
        if self.device.type != "cuda" or not torch.cuda.is_available() or not self._open():
            return self
        self._sample()
        self._stop.clear()
        # a daemon thread: a run that crashes or exits without stop() is never kept alive by its monitor
        self._thread = threading.Thread(target=self._poll, name="freezetune-gpu-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        """Stop sampling; ``{"gpu_util_pct", "gpu_mem_mb", "gpu_mem_peak_mb"}`` averaged over the samples, or ``{}``."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._sample()
        self._close()
        if not self._util:
            return {}
        return {
            "gpu_util_pct": sum(self._util) / len(self._util),
            "gpu_mem_mb": sum(self._mem) / len(self._mem),
            "gpu_mem_peak_mb": max(self._mem),
        }

    def __enter__(self) -> GpuMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.result = self.stop()

    # --- internals ------------------------------------------------------------------------------------------

    def _open(self) -> bool:
        try:
            import pynvml
        except ImportError:
            self.missing_extra = True  # a run says so once (epoch_log); a user's own loop decides for itself
            log.debug("GPU monitor off: nvidia-ml-py is not installed (pip install 'freezetune[monitor]')")
            return False
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound and friends: no driver library in this container
            log.debug("GPU monitor off: %s", exc)
            return False
        self._nvml = pynvml
        try:
            self._handle = _device_handle(pynvml, self.device.index or 0)
        except Exception as exc:
            log.debug("GPU monitor off: no NVML handle for %s: %s", self.device, exc)
            self._close()
            return False
        return True

    def _close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down a monitor must not fail a run
                pass
        self._nvml, self._handle = None, None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        try:
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
            used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
        except Exception as exc:  # a GPU that falls off the bus or a driver reset: lose samples, not the run
            log.debug("GPU monitor sample failed: %s", exc)
            return
        # both read before either is stored: the two lists always hold the same samples
        self._util.append(float(util))
        self._mem.append(used / _MIB)


def _device_handle(nvml, index: int):
    """The NVML handle of CUDA device ``index``.

    By UUID, because CUDA numbers only the visible devices (``CUDA_VISIBLE_DEVICES=2,3`` makes GPU 2 ``cuda:0``)
    while NVML numbers every GPU in the machine; by index when the UUID is not available.
    """
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        text = str(uuid)
        try:
            return nvml.nvmlDeviceGetHandleByUUID(text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}")
        except Exception as exc:
            log.debug("NVML does not know UUID %s (%s); using index %d", text, exc, index)
    return nvml.nvmlDeviceGetHandleByIndex(index)
