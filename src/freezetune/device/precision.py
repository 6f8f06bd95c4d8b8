"""Device and mixed precision: pick the device, the autocast dtype and whether a GradScaler is needed."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.torch_version import TorchVersion

from freezetune.config.options import AMP_MODES, DEVICES, check_choice
from freezetune.errors import ConfigError, choices, setting

_AMP_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# torch's GradScaler unscales an Apple GPU's gradients from 2.8 (its MPS kernel, pytorch#150255); before, its step
# failed there (no float64 on MPS, then no kernel), and an fp16 run on MPS trains unscaled as it did
_MPS_SCALES = TorchVersion(torch.__version__) >= (2, 8)


@dataclass(frozen=True)
class Precision:
    """The resolved device and autocast settings of a run."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32

    @property
    def needs_scaler(self) -> bool:
        # fp16 gradients underflow without loss scaling (on a CPU and an Apple GPU too); bf16 has fp32's exponent range
        # and needs none
        scaled = ("cuda", "cpu", "mps") if _MPS_SCALES else ("cuda", "cpu")
        return self.amp_dtype is torch.float16 and self.device.type in scaled

    def autocast(self, *, cache: bool = True) -> contextlib.AbstractContextManager:
        """Autocast to the run's AMP dtype (a no-op without AMP); ``cache=False`` recasts the weights at each use,
        as a CUDA graph's capture needs (a cast kept from outside the graph would not be replayed)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=cache)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.needs_scaler)

    def cpu_note(self) -> str | None:
        """A note for half precision asked of a CPU: unless it has native half-precision units it emulates them, and
        an epoch took 2 (bf16) to 50 (fp16) times fp32's on a 2-core AMD EPYC, without a word.

        >>> Precision(torch.device("cpu"), torch.float16).cpu_note()[:36]
        'note: --amp fp16 on cpu: a CPU witho'
        """
        if self.device.type != "cpu" or self.amp_dtype is None:
            return None
        return (f"note: --amp {_AMP_NAMES[self.amp_dtype]} on cpu: a CPU without native half-precision units emulates "
                "it, often several times slower than fp32 (an epoch took 2x for bf16 and 50x for fp16 on a 2-core AMD "
                "EPYC); compare an epoch with --amp off, the CPU default")  # fmt: skip

    def describe(self) -> str:
        return f"{self.device} {_AMP_NAMES[self.amp_dtype]}"


def mps_available() -> bool:
    """Whether an Apple GPU (MPS) is here (a torch built without MPS has no ``torch.backends.mps``)."""
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is not there is a user error.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in {d.partition(":")[0] for d in DEVICES}:  # xpu, meta: tracebacks later
        raise ConfigError(f"unsupported device {spec!r}; devices are: {choices(DEVICES)}")
    if device.type == "cpu" and device.index not in (None, 0):  # torch takes it and runs on the one CPU device
        raise ConfigError(f"device {spec!r}: the CPU device takes no number (it uses every core); use "
                          f"{setting('device', 'cpu')}")  # fmt: skip
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {spec!r} asked for, but CUDA is not available here; use {setting('device', 'cpu')}"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device 'mps' asked for, but MPS is not available here; use {setting('device', 'cpu')}")
    return device


def resolve_precision(device: torch.device, amp: str = "auto") -> Precision:
    """``auto``: bf16 on CUDA cards that support it, else fp16 (with a GradScaler); off on CPU unless asked.

    >>> resolve_precision(torch.device("cpu"), "auto").amp_dtype is None
    True
    """
    check_choice("amp mode", amp, AMP_MODES)
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return Precision(device, None)
    if amp == "bf16" or (amp == "auto" and _native_bf16(device)):
        return Precision(device, torch.bfloat16)
    return Precision(device, torch.float16)  # fp16, or auto on a card without native bf16


def _native_bf16(device: torch.device) -> bool:
    # Ampere and newer compute in bf16; older cards (T4, V100) only emulate it, slower than fp16 with a scaler.
    with torch.cuda.device(device):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.3 has no such argument and never counted emulation
            return torch.cuda.is_bf16_supported()
