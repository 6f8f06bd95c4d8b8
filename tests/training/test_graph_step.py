"""The CUDA-graph training step (``freezetune.training.graph_step``) on a CPU. CUDA's part (side stream, capture,
replay) is tested in ``tests/device/test_cuda.py``; here a stand-in for it (``EagerReplay``: a replay runs the captured step's
Python again, into the graph's outputs) runs everything else: the warm-up undone, the keys that recapture, the learning
rates refilled, the epoch's last batch eager; and when a run's steps may be captured at all."""

from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from _engine_fixtures import make_image_folder
from freezetune.cache.path import FeaturePath
from freezetune.config.train_config import TrainConfig
from freezetune.device.precision import resolve_precision
from freezetune.training import graph_step, step
from freezetune.training.graph_step import CudaCapture, StepGraphs, graph_unsupported, restore, snapshot
from freezetune.training.step import Step
from freezetune.training.trainer import Trainer


def _head(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    module = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3))  # a buffer that a step moves, and weights
    return module, torch.optim.AdamW(module.parameters(), lr=1e-2, fused=True)


def _train(module: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()


def _state(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [*module.state_dict().values()]
    return tensors + [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]


@pytest.mark.parametrize("trained_before", [0, 2])
def test_warm_up_steps_leave_no_trace(trained_before):
    # The graph's warm-up steps train on a real batch; undone, the run must go on exactly as one that never took
    # them: a fresh optimizer as fresh (Adam's zero state, made by the warm-up), a resumed one as it was
    module, optimizer = _head()
    twin, twin_optimizer = _head()
    _train(module, optimizer, trained_before, seed=1)
    _train(twin, twin_optimizer, trained_before, seed=1)
    saved = snapshot(module, optimizer)
    _train(module, optimizer, 3, seed=2)  # the warm-up
    assert not all(
        torch.equal(a, b) for a, b in zip(_state(module, optimizer), _state(twin, twin_optimizer), strict=False)
    )
    restore(saved)
    _train(module, optimizer, 2, seed=3)
    _train(twin, twin_optimizer, 2, seed=3)
    for got, want in zip(_state(module, optimizer), _state(twin, twin_optimizer), strict=True):
        assert torch.equal(got, want)


def test_restore_writes_in_place():
    # the graph holds the very tensors it captured: restoring must not swap in new ones
    module, optimizer = _head()
    _train(module, optimizer, 1, seed=0)
    before = [t.data_ptr() for t in _state(module, optimizer)]
    saved = snapshot(module, optimizer)
    _train(module, optimizer, 2, seed=1)
    restore(saved)
    assert [t.data_ptr() for t in _state(module, optimizer)] == before


def test_steps_that_need_the_host_are_not_captured():
    module, fused = _head()
    plain = torch.optim.SGD(module.parameters(), lr=0.1)
    cuda = torch.device("cuda")
    ok = dict(needs_scaler=False, grad_clip=None, skip_nonfinite=0, distributed=False)
    assert graph_unsupported(fused, cuda, **ok) is None
    assert graph_unsupported(fused, torch.device("cpu"), **ok) == "not a CUDA device"
    assert "loss scaler" in graph_unsupported(fused, cuda, **{**ok, "needs_scaler": True})
    assert "--grad-clip" in graph_unsupported(fused, cuda, **{**ok, "grad_clip": 1.0})
    assert "--skip-nonfinite" in graph_unsupported(fused, cuda, **{**ok, "skip_nonfinite": 2})
    assert "DDP" in graph_unsupported(fused, cuda, **{**ok, "distributed": True})
    assert "fused" in graph_unsupported(plain, cuda, **ok)


def test_a_cpu_run_trains_eagerly():
    from freezetune.run.checkpoint import TrainingState
    from freezetune.training.epoch_log import TrainProgress

    module, optimizer = _head()
    precision = resolve_precision(torch.device("cpu"), "off")
    step = Step(TrainingState(module, optimizer, None, precision.scaler(), None), nn.CrossEntropyLoss(), precision,
                graph_batch=8)  # fmt: skip
    assert step.graphs is None
    meter = TrainProgress(1, "epoch", enabled=False, device=torch.device("cpu"))
    assert step(module, torch.randn(8, 6), torch.zeros(8, dtype=torch.long), meter, cached=True)
    assert meter.step == 1


class _CudaStandIns:
    """torch.cuda's calls a capture makes, stood in for on a machine without CUDA: each records what it was asked."""

    def __init__(self, monkeypatch, says: str | None = None) -> None:
        self.calls: list[tuple] = []
        calls = self.calls

        class Stream:
            def __init__(self, device=None) -> None:
                self.device = device
                calls.append(("stream made on", device))

        @contextlib.contextmanager
        def device(d):
            calls.append(("device", d))
            yield

        @contextlib.contextmanager
        def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global"):
            calls.append(("capture on a stream of", getattr(stream, "device", "the default capture stream")))
            yield
            if says:  # what torch's capture_end warns, and only warns, of a capture that recorded no kernel
                warnings.warn(says, UserWarning, stacklevel=1)

        for name, value in {"CUDAGraph": object, "Stream": Stream, "device": device, "graph": graph}.items():
            monkeypatch.setattr(torch.cuda, name, value)


def test_a_step_is_captured_on_a_stream_of_its_own_device(monkeypatch):
    # torch.cuda.graph's default capture stream is made on the device current at its first use (cuda:0): a step on
    # cuda:1 launched its kernels on cuda:1's stream, outside the capture; the graph was empty and each replay a no-op
    cuda = _CudaStandIns(monkeypatch)
    assert CudaCapture(torch.device("cuda:1")).capture(lambda: ("outputs",)) == ("outputs",)
    assert cuda.calls == [("stream made on", torch.device("cuda:1")), ("device", torch.device("cuda:1")),
                          ("capture on a stream of", torch.device("cuda:1"))]  # fmt: skip


def test_an_empty_capture_fails_so_the_step_runs_eagerly(monkeypatch):
    _CudaStandIns(monkeypatch, says="The CUDA Graph is empty. This usually means that the graph was attempted to be "
                                    "captured on wrong device or stream. (Triggered internally at graph.cpp:1)")  # fmt: skip
    with pytest.raises(RuntimeError, match=r"^the captured graph is empty \(The CUDA Graph is empty\."):
        CudaCapture(torch.device("cuda")).capture(lambda: ())
    _CudaStandIns(monkeypatch, says="some other warning of the capture")  # said on, as it was
    with pytest.warns(UserWarning, match="some other warning"):
        CudaCapture(torch.device("cuda")).capture(lambda: ())


def test_only_full_batches_are_replayed():
    graphs = StepGraphs(lambda: None, nn.CrossEntropyLoss(), lambda: None, batch_size=8)
    assert graphs.run(nn.Identity(), torch.randn(5, 6), torch.zeros(5, dtype=torch.long)) is None  # an epoch's last
    assert graphs.captures == graphs.replays == 0


class EagerReplay(CudaCapture):
    """CUDA's capture stood in for on a CPU: ``capture`` runs the step once (as CUDA's runs nothing, the graphed step
    must undo it), ``replay`` runs it again and writes its outputs into the captured ones, as a replay does."""

    def side_stream(self):
        return contextlib.nullcontext()

    def rng_state(self) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.set_rng_state(state)

    def capture(self, body):
        rng = torch.get_rng_state()
        self.body, self.outputs = body, body()
        torch.set_rng_state(rng)
        return self.outputs

    def replay(self) -> None:
        for captured, new in zip(self.outputs, self.body(), strict=True):
            captured.copy_(new)


@pytest.fixture
def stand_in(monkeypatch):
    """Graphed steps on the CPU, through ``EagerReplay``."""
    monkeypatch.setattr(graph_step, "CudaCapture", EagerReplay)
    monkeypatch.setattr(step, "graph_unsupported", lambda *args, **kwargs: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("graph-data"))


def _trainer(data, tmp_path, name: str, echo=lambda *_: None, **kw) -> Trainer:
    kw = {"cache": "memory", **kw}
    cfg = TrainConfig(model="timm:test_efficientnet", weights="none", data=str(data), img_size=32, epochs=2,
                      batch_size=8, device="cpu", progress=False, tensorboard=False, out=str(tmp_path / name), seed=0,
                      aug="none", freeze="backbone", **kw)  # fmt: skip
    return Trainer(cfg, echo=echo)


def _history(trainer: Trainer) -> list[tuple]:
    return [(r["train_loss"], r["train_acc"], r["val_loss"], r["val_acc"]) for r in trainer.fit().history]


def test_replayed_steps_train_as_eager_steps(stand_in, data, tmp_path):
    # 36 training images in batches of 8: 4 replays an epoch and an eager last batch of 4; the one-cycle schedule
    # changes the rate every step, so each replay reads the rate refilled from the optimizer's group
    said: list[str] = []
    graphed = _trainer(data, tmp_path, "g", echo=said.append)
    eager = _trainer(data, tmp_path, "e", cuda_graph=False)
    got, want = _history(graphed), _history(eager)
    setup = next(line for line in said if line.startswith("timm:test_efficientnet on "))  # what trains, and how
    assert "cached steps replayed as a CUDA graph" in setup.splitlines()[0]
    graphs = graphed.step.graphs
    assert eager.step.graphs is None
    assert (graphs.captures, graphs.replays, graphs.off) == (1, 8, None)
    # the same steps: only the rate's float32 copy on the device differs from the group's float
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(graphed.model.parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_a_constant_rate_fills_nothing_and_a_new_one_is_read(stand_in):
    module, optimizer = _head()
    graphs = StepGraphs(lambda: optimizer, nn.CrossEntropyLoss(), contextlib.nullcontext, batch_size=8)
    x, y = torch.randn(8, 6), torch.zeros(8, dtype=torch.long)
    graphs.run(module, x, y)
    graph = graphs.graph
    assert graph.lrs[0].item() == pytest.approx(1e-2) and optimizer.param_groups[0]["lr"] == 1e-2  # a float again
    optimizer.param_groups[0]["lr"] = 0.0  # the schedule's next rate: a step at rate 0 moves nothing
    before = [p.detach().clone() for p in module.parameters()]
    graphs.run(module, x, y)
    assert graph.lrs[0].item() == 0.0 and graphs.captures == 1
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_an_unfrozen_stage_is_captured_anew(stand_in, data, tmp_path):
    trainer = _trainer(data, tmp_path, "u", unfreeze="epoch:1", cache="auto")
    result = trainer.fit()
    assert [r["unfrozen"] for r in result.history] == ["", "blocks.4"]
    graphs = trainer.step.graphs
    assert trainer.features.cached and (graphs.captures, graphs.replays, graphs.off) == (2, 8, None)
    eager = _trainer(data, tmp_path, "ue", unfreeze="epoch:1", cache="auto", cuda_graph=False)
    want = _history(eager)
    np.testing.assert_allclose([(r["train_loss"], r["val_loss"]) for r in result.history],
                               [(w[0], w[2]) for w in want], rtol=1e-4, atol=1e-5)  # fmt: skip


def test_a_failed_capture_is_said_once_and_the_run_trains_eagerly(stand_in, data, tmp_path, monkeypatch, caplog):
    def fail(self, body):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(EagerReplay, "capture", fail)
    trainer = _trainer(data, tmp_path, "f")
    eager = _trainer(data, tmp_path, "fe", cuda_graph=False)
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        got = _history(trainer)
    said = [r.getMessage() for r in caplog.records if "could not be captured" in r.getMessage()]
    assert said == ["the training step could not be captured in a CUDA graph (operation not permitted when stream "
                    "is capturing): it runs eagerly"]  # fmt: skip
    assert trainer.step.graphs.off and trainer.step.graphs.replays == 0
    assert got == _history(eager)  # the failed capture's warm-up left nothing behind


def test_with_the_cache_off_the_frozen_prefix_streams_and_the_suffix_step_is_replayed(stand_in, data, tmp_path,
                                                                                      monkeypatch):  # fmt: skip
    # --cache off ran the whole model every step: the frozen backbone's forward, then the head's loss, backward and
    # optimizer launched one by one (lite0's frozen training 0.87x inference on an H200). Now each batch's prefix runs
    # forward only and the head's step is the cached one: a replay on CUDA; and it trains as the eager whole model.
    said: list[str] = []
    streamed = _trainer(data, tmp_path, "s", echo=said.append, cache="off")
    got = _history(streamed)
    assert any(line.startswith("feature cache off: each batch runs the frozen layers before") for line in said)
    setup = next(line for line in said if line.startswith("timm:test_efficientnet on "))
    assert "streamed steps replayed as a CUDA graph" in setup.splitlines()[0]
    graphs = streamed.step.graphs
    assert streamed.features.streamed and (graphs.captures, graphs.replays, graphs.off) == (1, 8, None)
    monkeypatch.setattr(FeaturePath, "_stream", lambda self: None)  # the path before: the whole model on images
    whole = _trainer(data, tmp_path, "w", cache="off", cuda_graph=False)
    want = _history(whole)
    assert not whole.features.cached
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(streamed.model.parameters(), whole.model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)
