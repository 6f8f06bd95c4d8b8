"""The CUDA-graph training step (``freezetune.graph_step``): what runs on a CPU. The capture itself needs a GPU and is
tested in ``tests/test_cuda.py``; here, that its warm-up leaves no trace and when a run's steps may be captured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from freezetune.graph_step import StepGraphs, graph_unsupported, restore, snapshot
from freezetune.precision import resolve_precision
from freezetune.step import Step


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
    from freezetune.checkpoint import TrainingState
    from freezetune.epoch_log import TrainProgress

    module, optimizer = _head()
    precision = resolve_precision(torch.device("cpu"), "off")
    step = Step(TrainingState(module, optimizer, None, precision.scaler(), None), nn.CrossEntropyLoss(), precision,
                graph_batch=8)  # fmt: skip
    assert step.graphs is None
    meter = TrainProgress(1, "epoch", enabled=False, device=torch.device("cpu"))
    assert step(module, torch.randn(8, 6), torch.zeros(8, dtype=torch.long), meter, cached=True)
    assert meter.step == 1


def test_only_full_batches_are_replayed():
    graphs = StepGraphs(lambda: None, nn.CrossEntropyLoss(), lambda: None, batch_size=8)
    assert graphs.run(nn.Identity(), torch.randn(5, 6), torch.zeros(5, dtype=torch.long)) is None  # an epoch's last
    assert graphs.captures == graphs.replays == 0
