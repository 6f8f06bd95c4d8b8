"""The trainer on a CUDA device: mixed precision, channels_last, the GPU-resident feature cache, device loaders.

Skipped without a GPU (CI has none); ``benchmarks/gpu.sh`` runs them first on a lent GPU machine. Each trains a
100k-parameter model for an epoch or two: seconds on any GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _engine_fixtures import make_image_folder
from freezetune.cache.path import FeaturePath
from freezetune.config.train_config import TrainConfig
from freezetune.data.gpu import DeviceJpegLoader
from freezetune.run import checkpoint
from freezetune.training.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("cuda-data"))


def _config(data, tmp_path, name: str, **kw) -> TrainConfig:
    base = dict(
        model="timm:test_efficientnet", weights="none", data=str(data), img_size=32, epochs=2, batch_size=8,
        device="cuda", progress=False, tensorboard=False, out=str(tmp_path / name), seed=0,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cached_head_training_on_the_gpu(data, tmp_path, amp):
    lines: list[str] = []
    trainer = Trainer(_config(data, tmp_path, amp, amp=amp, freeze="backbone", cache="auto"), echo=lines.append)
    assert trainer.channels_last
    assert trainer.precision.amp_dtype is {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert trainer.features.cached and trainer.features.train_store.features.is_cuda  # small: the GPU budget holds it
    assert isinstance(trainer.loaders.eval(trainer.data.val), DeviceJpegLoader)
    result = trainer.fit()
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    assert result.test is not None and 0.0 <= result.test["acc"] <= 1.0
    # checkpoints written from the GPU load anywhere
    state = checkpoint.load(trainer.run_dir / checkpoint.BEST)["state_dict"]
    assert all(t.device.type == "cpu" for t in state.values())


def test_full_finetune_with_fp16_grad_scaler_and_unfreeze(data, tmp_path):
    trainer = Trainer(
        _config(data, tmp_path, "fp16", amp="fp16", freeze="backbone", unfreeze="epoch:1", cache="auto"),
        echo=lambda *_: None,
    )
    assert trainer.state.scaler.is_enabled()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.fit()
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    assert [r["unfrozen"] for r in result.history] == ["", "blocks.4"]  # unfrozen after epoch 1
    last = checkpoint.load(trainer.run_dir / checkpoint.LAST)["state_dict"]  # the model itself now holds best.pt
    moved = [n for n, p in before.items() if not torch.equal(last[n], p.cpu())]
    assert any(n.startswith("classifier") for n in moved) and any(n.startswith("blocks") for n in moved)


@pytest.mark.parametrize(("cache", "place"), [("auto", "gpu"), ("memory", "pinned")])
def test_cached_matches_uncached_in_fp32_on_the_gpu(data, tmp_path, cache, place):
    # the same check as tests/cache/test_cache.py, through the CUDA device loader, with the store on the GPU (auto)
    # and in pinned RAM (memory)
    kw = dict(amp="off", aug="none", freeze="backbone", channels_last=False)
    said: list[str] = []
    cached = Trainer(_config(data, tmp_path, "c", cache=cache, **kw), echo=said.append)
    plain = Trainer(_config(data, tmp_path, "p", cache="off", **kw), echo=lambda *_: None)
    got = [(r["train_loss"], r["val_loss"]) for r in cached.fit().history]
    assert any(line.startswith("feature cache: ") and f" MiB on {place} (budget" in line for line in said), said
    want = [(r["train_loss"], r["val_loss"]) for r in plain.fit().history]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)  # cuDNN picks kernels per shape: not bit-equal


@pytest.mark.parametrize("cache", ["auto", "memory"])  # the store on the GPU, and in pinned RAM
def test_cached_steps_replayed_from_a_cuda_graph_train_as_eager_steps(data, tmp_path, cache):
    # fp32 and no augmentation: the graph's replays must give the eager steps' losses; 36 training images in batches
    # of 8 are 4 replays an epoch and an eager last batch of 4
    kw = dict(amp="off", aug="none", freeze="backbone", cache=cache, channels_last=False)
    said: list[str] = []
    graphed = Trainer(_config(data, tmp_path, "g", **kw), echo=said.append)
    eager = Trainer(_config(data, tmp_path, "e", cuda_graph=False, **kw), echo=lambda *_: None)
    got = [(r["train_loss"], r["train_acc"], r["val_loss"]) for r in graphed.fit().history]
    assert any("cached steps replayed as a CUDA graph" in line for line in said)
    want = [(r["train_loss"], r["train_acc"], r["val_loss"]) for r in eager.fit().history]
    assert eager.step.graphs is None
    assert (graphed.step.graphs.captures, graphed.step.graphs.replays, graphed.step.graphs.off) == (1, 8, None)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_streamed_steps_with_the_cache_off_are_replayed_and_train_as_the_whole_model(data, tmp_path, monkeypatch):
    # the cache off: each batch's frozen prefix forward only, the head's step a replay; as the whole model's step
    kw = dict(amp="off", aug="none", freeze="backbone", cache="off", channels_last=False)
    said: list[str] = []
    streamed = Trainer(_config(data, tmp_path, "s", **kw), echo=said.append)
    got = [(r["train_loss"], r["train_acc"], r["val_loss"]) for r in streamed.fit().history]
    assert streamed.features.streamed and any("streamed steps replayed as a CUDA graph" in line for line in said)
    assert (streamed.step.graphs.captures, streamed.step.graphs.replays, streamed.step.graphs.off) == (1, 8, None)
    monkeypatch.setattr(FeaturePath, "_stream", lambda self: None)  # the whole model on images, eagerly
    whole = Trainer(_config(data, tmp_path, "w", cuda_graph=False, **kw), echo=lambda *_: None)
    want = [(r["train_loss"], r["train_acc"], r["val_loss"]) for r in whole.fit().history]
    assert not whole.features.cached
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)  # cuDNN picks kernels per shape: not bit-equal


def test_an_unfrozen_stage_is_captured_anew_in_bf16(data, tmp_path):
    trainer = Trainer(
        _config(data, tmp_path, "u", amp="bf16", freeze="backbone", unfreeze="epoch:1", cache="auto"),
        echo=lambda *_: None,
    )
    result = trainer.fit()
    assert [r["unfrozen"] for r in result.history] == ["", "blocks.4"]
    assert trainer.features.cached  # cut again before blocks.4: the second epoch replays a graph of a new suffix
    assert (trainer.step.graphs.captures, trainer.step.graphs.replays, trainer.step.graphs.off) == (2, 8, None)
    assert all(np.isfinite(r["train_loss"]) for r in result.history)


def test_fp16_cached_steps_run_eagerly(data, tmp_path):
    # GradScaler reads every step's gradients for overflow on the host: no graph, and the run still trains
    trainer = Trainer(_config(data, tmp_path, "h", amp="fp16", freeze="backbone", cache="memory"), echo=lambda *_: None)
    assert trainer.step.graphs is None
    assert all(np.isfinite(r["train_loss"]) for r in trainer.fit().history)


def test_inspect_batch_size_auto_measures_on_the_device():
    from freezetune.model.describe import describe_model

    text = describe_model("timm:test_efficientnet", img_size=32, batch_size="auto")
    assert "--batch-size auto -> 1024: the largest power of two whose forward and backward fit on cuda" in text
