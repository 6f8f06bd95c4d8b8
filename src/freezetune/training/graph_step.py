"""The cached training step captured in a CUDA graph and replayed.

On a fast GPU a training step on cached features (the head, or the last stages) is a few dozen small kernels, each
launched from Python through autocast, autograd's engine and the optimizer's grouping: the launches, not the maths,
set its time (``benchmarks/throughput.py`` on an H200: a cached EfficientNet-Lite0 head epoch of 64 steps took 73 ms,
1.1 ms a step, against an inference pass over the same 8192 images of about 0.4 s). Captured once, a step is a copy of
the batch into the graph's input and one replay.

A graph fixes what it read at capture: the batch's shape, the module, the trainable parameters and the optimizer's
state tensors. ``StepGraphs`` keys its graph on them: a batch of another size (an epoch's last) runs eagerly beside it,
a changed model (a stage unfrozen, the cache rebuilt, a resumed optimizer) is captured anew. The learning rates are
device tensors the graph reads, refilled from the optimizer's groups before a replay, so the LR schedule and the
checkpoints see the same float rates as an eager run.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from freezetune.run.log import warn_once
from freezetune.training.eval_loop import logits_of

log = logging.getLogger(__name__)

# torch's advice for capture: a few steps first on a side stream (cuBLAS workspaces, autograd's and the optimizer's
# lazily made state); their effect on the weights is then undone, so the run trains on each batch exactly once
WARMUP_STEPS = 3


def graph_unsupported(optimizer: torch.optim.Optimizer, device: torch.device, *, needs_scaler: bool,
                      grad_clip: float | None, skip_nonfinite: int | None, distributed: bool) -> str | None:  # fmt: skip
    """Why a run's steps cannot be captured (None: they can). Each reason is a host read or a host decision that a
    step makes, which a replay would skip.

    >>> graph_unsupported(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), torch.device("cpu"),
    ...                   needs_scaler=False, grad_clip=None, skip_nonfinite=0, distributed=False)
    'not a CUDA device'
    """
    reasons = {
        "not a CUDA device": device.type != "cuda",
        "fp16's loss scaler checks every step for overflow on the host": needs_scaler,
        "gradient clipping (--grad-clip)": bool(grad_clip),
        "skipping non-finite batches (--skip-nonfinite) reads every loss": bool(skip_nonfinite),
        "torchrun's DDP": distributed,
        "the optimizer is not fused Adam/AdamW": not all(g.get("fused") for g in optimizer.param_groups),
    }
    return next((why for why, applies in reasons.items() if applies), None)


class CudaCapture:
    """The CUDA side of one capture: the warm-up's side stream, the RNG state around it, the capture and the replay.
    Kept apart so the rest of a graphed step (what is keyed, undone, refilled and counted) runs the same code under a
    stand-in on a CPU (``tests/training/test_graph_step.py``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.stream: torch.cuda.Stream | None = None

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        try:
            with torch.cuda.stream(side):
                yield
        finally:  # what follows waits for the side stream's steps, whether they all ran or one failed
            main.wait_stream(side)

    def rng_state(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device)

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.cuda.set_rng_state(state, self.device)

    def capture(self, body: Callable[[], tuple]) -> tuple:
        """Record ``body``'s kernels (nothing runs); its outputs are the graph's, overwritten by each replay."""
        self.graph = torch.cuda.CUDAGraph()
        # a capture stream of the batch's device: torch.cuda.graph's own is made once, on the device current then
        # (cuda:0), and a step on cuda:1 launched its kernels on that device's stream, outside the capture: the graph
        # was empty, its replays trained nothing, and torch only warned. thread-local: a thread of the run's own (the
        # GPU monitor, a loader's readers pinning memory) may call CUDA meanwhile without spoiling the capture
        self.stream = torch.cuda.Stream(self.device)  # kept with the graph whose memory pool it captured into
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            with torch.cuda.device(self.device), torch.cuda.graph(self.graph, stream=self.stream,
                                                                  capture_error_mode="thread_local"):  # fmt: skip
                outputs = body()
        for w in said:
            if "graph is empty" in str(w.message).lower():  # the step captured nothing: it runs eagerly instead
                raise RuntimeError(f"the captured graph is empty ({str(w.message).strip().splitlines()[0]})")
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return outputs

    def replay(self) -> None:
        self.graph.replay()


class StepGraphs:
    """Trains a batch of ``batch_size`` by replaying a captured step; ``None`` from ``run`` asks for an eager step.

    Args:
        optimizer: a function returning the run's optimizer (a resume may have replaced its state).
        loss_fn: the training loss.
        autocast: a function returning the step's autocast context, with its weight cache off (one graph may not
            reuse casts made outside it).
        batch_size: the size of the batches captured; others run eagerly.
    """

    def __init__(self, optimizer: Callable[[], torch.optim.Optimizer], loss_fn: nn.Module,
                 autocast: Callable[[], object], batch_size: int) -> None:  # fmt: skip
        self.optimizer, self.loss_fn, self.autocast, self.batch_size = optimizer, loss_fn, autocast, batch_size
        self.graph: _Graph | None = None
        self.off: str | None = None  # why capture failed: every later step runs eagerly
        self.captures = self.replays = 0

    def run(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
        """The step's ``(loss, logits, correct)`` after training on the batch (``correct``: how many of its
        predictions were right), or None when it must run eagerly."""
        if self.off or len(targets) != self.batch_size:
            return None
        optimizer = self.optimizer()
        key = _key(module, optimizer, inputs, targets)
        if self.graph is None or self.graph.key != key:
            self.graph = None  # the old graph's memory goes back before the new one is captured
            try:
                self.graph = _Graph(module, optimizer, self.loss_fn, self.autocast, inputs, targets,
                                    CudaCapture(inputs.device))  # fmt: skip
            except (RuntimeError, TypeError, ValueError) as exc:
                self.off = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                warn_once(log, "the training step could not be captured in a CUDA graph (%s): it runs eagerly",
                          self.off)  # fmt: skip
                return None
            self.captures += 1
        self.replays += 1
        return self.graph(inputs, targets)


def _key(module: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor) -> tuple:
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    state = tuple(id(optimizer.state.get(p)) for p in params)  # load_state_dict makes new state tensors
    return (id(module), id(optimizer), tuple(map(id, params)), state, len(optimizer.param_groups),
            inputs.shape, inputs.dtype, inputs.stride(), targets.shape, targets.dtype)  # fmt: skip


class _Graph:
    """One captured step: static input buffers, the graph, its loss, logits and correct count (overwritten by each
    replay: read them before the next)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                 autocast: Callable[[], object], inputs: torch.Tensor, targets: torch.Tensor,
                 cuda: CudaCapture) -> None:  # fmt: skip
        self.module, self.optimizer, self.loss_fn, self.autocast, self.cuda = module, optimizer, loss_fn, autocast, cuda
        self.inputs, self.targets = inputs.clone(), targets.clone()
        self.lr_values = [float(g["lr"]) for g in optimizer.param_groups]
        self.lrs = [torch.tensor(v, dtype=torch.float32, device=inputs.device) for v in self.lr_values]
        for g in optimizer.param_groups:
            g["capturable"] = True  # its step count stays on the device, and torch lets its step be captured
        saved, rng = snapshot(module, optimizer), cuda.rng_state()
        try:
            with cuda.side_stream():
                for _ in range(WARMUP_STEPS):
                    self._body()
            cuda.set_rng_state(rng)
            self.outputs = cuda.capture(self._body)
        finally:  # the warm-up's steps undone in place (a capture itself runs nothing)
            restore(saved)
        self.key = _key(module, optimizer, inputs, targets)  # after warm-up: the optimizer's state exists now

    def _body(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step as the graph holds it: the optimizer reads its learning rates from ``lrs`` (a float would be
        fixed into the graph at capture)."""
        groups = self.optimizer.param_groups
        # no grads before the backward: in a capture it then makes them in the graph's memory, where each replay
        # writes them anew (an existing grad would be added to)
        self.optimizer.zero_grad(set_to_none=True)
        floats = [g["lr"] for g in groups]
        for g, lr in zip(groups, self.lrs, strict=True):
            g["lr"] = lr
        try:
            with self.autocast():
                logits = logits_of(self.module(self.inputs))
                loss = self.loss_fn(logits.float(), self.targets)
            loss.backward()
            self.optimizer.step()
        finally:  # the schedule, the metrics row and the checkpoint see floats
            for g, lr in zip(groups, floats, strict=True):
                g["lr"] = lr
        logits = logits.detach()
        return loss.detach(), logits, (logits.argmax(-1) == self.targets).sum()  # the meter's count, in the graph

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        for i, g in enumerate(self.optimizer.param_groups):
            if g["lr"] != self.lr_values[i]:  # one fill a changed rate; a constant schedule launches none
                self.lrs[i].fill_(g["lr"])
                self.lr_values[i] = g["lr"]
        self.cuda.replay()
        return self.outputs


def snapshot(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What a step may change, to undo the warm-up steps: the module's parameters and buffers (BatchNorm's running
    statistics), the optimizer's parameters, and its state tensors (those a fresh optimizer has not made yet are made
    by the warm-up as zeros and moved: ``restore`` zeroes them, which is the state Adam starts from)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    tensors.update((id(p), p) for g in optimizer.param_groups for p in g["params"])
    state = {id(v): v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)}
    with torch.no_grad():
        copies = [(t, t.detach().clone()) for t in [*tensors.values(), *state.values()]]
    return {"copies": copies, "optimizer": optimizer, "had_state": set(optimizer.state)}


def restore(saved: dict) -> None:
    """Put back what ``snapshot`` saw, in place (the graph keeps these very tensors), and zero the optimizer state
    made since."""
    optimizer = saved["optimizer"]
    with torch.no_grad():
        for tensor, copy in saved["copies"]:
            tensor.copy_(copy)
        for p, s in optimizer.state.items():
            if p not in saved["had_state"]:
                for v in s.values():
                    if torch.is_tensor(v):
                        v.zero_()
