"""The device and mixed precision (``device/precision.py``) where a CUDA or CPU run is tested elsewhere
(tests/training/test_trainer.py): an Apple GPU's loss scaling."""

from __future__ import annotations

import torch

from freezetune.device import precision
from freezetune.device.precision import Precision


def test_fp16_on_an_apple_gpu_trains_with_a_loss_scaler(monkeypatch):
    # --amp fp16 on mps trained without loss scaling: small gradients underflowed to zero in fp16
    mps = torch.device("mps")
    fp16 = Precision(mps, torch.float16)
    assert fp16.needs_scaler
    scaler = fp16.scaler()
    assert scaler.is_enabled() and scaler._device == "mps"
    assert not Precision(mps, torch.bfloat16).needs_scaler and not Precision(mps, None).scaler().is_enabled()
    monkeypatch.setattr(precision, "_MPS_SCALES", False)  # a torch before 2.8: its scaler's step fails on mps
    assert not fp16.needs_scaler and Precision(torch.device("cpu"), torch.float16).needs_scaler
