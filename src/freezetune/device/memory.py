"""Training memory: an estimate of a training step's peak (weights, gradients, optimizer state, activations), full
vs as frozen now; the batch size that fits a CUDA device, measured (``--batch-size auto``); and memory running out, a
user's error that names what to try (``out_of_memory_hint``). The RAM a process may still take: ``device/hardware.py``.

The step is measured, not guessed: a forward and backward at batches of 2 and 4 under a tracker of the tensor memory
alive after each operation, extrapolated operation by operation to the batch size. That counts what autograd saves
for the backward pass (which freezing removes) and also the forward's own working set (the feature maps alive at
once, which freezing keeps and which is most of a frozen network's peak).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from freezetune.config.options import BATCH_AUTO
from freezetune.config.train_config import TrainConfig
from freezetune.errors import ResourceError
from freezetune.training.eval_loop import logits_of, run_model

_OPT_STATE = {"adamw": 2, "adam": 2, "sgd": 1}  # fp32 tensors of state per trainable parameter
_PROBE_BATCHES = (2, 4)  # two sizes give each moment of the step its per-image slope
_AMP_NAMES = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}


def estimate_memory(
    model: nn.Module, input_size: int | None, batch_size: int, *, optimizer: str = TrainConfig.optimizer,
    amp_dtype: torch.dtype | None = None, tokens: int | None = None, averaged: bool = False,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """MiB at the peak of a training step, for full fine-tuning and for the current freeze.

    ``weights``, ``grads`` (of the trainable parameters) and ``optimizer`` (its state) are counted from the
    parameters; ``activations`` is what grows with the batch at the step's measured peak: the batch, the tensors
    saved for the backward pass and the forward's working set. ``total`` is the peak, as
    ``torch.cuda.max_memory_allocated`` reads it over a step after the first: weights, optimizer state and all the
    step holds at its peak. At a large batch that peak ends the forward pass, the previous step's gradients still
    alive (the trainer frees them just before backward), and is the sum of the columns; at a small batch it can
    come at the end of backward instead, the activations gone, and is less.

    ``amp_dtype`` measures the step under that autocast, as a run with ``--amp`` trains. The batch is ``input_size``
    px images, or, with ``tokens``, texts of that many tokens (a Hugging Face text model; its tokenizer pads a batch
    to its longest text, so this is the estimate for texts that long). The model is measured where it is (a CPU copy
    is fine: tensor bytes do not depend on the device) and left as it was: modes, BatchNorm statistics,
    ``requires_grad`` flags and gradients.

    ``averaged``: a run with the current freeze keeps a moving average of its trainable weights
    (``average_weights``, as the auto recipe's run of an image model does): one more copy of them, counted with the
    optimizer's state in the ``frozen`` row (the ``full`` row is a plain full fine-tune's, which keeps none).

    >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    >>> _ = m(torch.zeros(1, 3, 8, 8))
    >>> sorted(estimate_memory(m, 8, 4))
    ['frozen', 'full']
    """
    params = list(model.parameters())
    trainable_now = [p.requires_grad for p in params]
    sample = _sampler(model, input_size, tokens)
    out = {}
    try:
        for mode in ("full", "frozen"):
            for p, flag in zip(params, trainable_now, strict=True):
                p.requires_grad_(mode == "full" or flag)
            out[mode] = _breakdown(model, params, sample, batch_size, optimizer, amp_dtype,
                                   averaged=averaged and mode == "frozen")  # fmt: skip
    finally:
        for p, flag in zip(params, trainable_now, strict=True):
            p.requires_grad_(flag)
    return out


def format_memory(estimate: dict[str, dict[str, float]], batch_size: int, amp_dtype: torch.dtype | None = None, *,
                  tokens: int | None = None, averaged: bool = False) -> str:  # fmt: skip
    """A small table of the estimate, MiB per component (``averaged``: as ``estimate_memory`` took it, said)."""
    cols = ("weights", "grads", "optimizer", "activations", "total")
    batch = f"{batch_size} x {tokens} tokens" if tokens else f"{batch_size}"
    lines = [f"training memory estimate at batch {batch}, {_AMP_NAMES[amp_dtype]}: the peak of a step (MiB; "
             "measured at batches of 2 and 4, scaled)",
             f"{'':<8}" + "".join(f"{c:>13}" for c in cols)]  # fmt: skip
    for mode, row in estimate.items():
        lines.append(f"{mode:<8}" + "".join(f"{row[c]:>13,.1f}" for c in cols))
    if averaged:
        lines.append("(frozen's optimizer column holds the run's weight average too: one more copy of what trains)")
    return "\n".join(lines)


def measured_peak(step: Callable[[], object]) -> int:
    """Bytes of the tensors ``step()`` creates and holds at once at its peak, on any device.

    What ``torch.cuda.max_memory_allocated`` reads over the call less what was allocated before it (allocator
    rounding and kernel workspaces aside), and also on a CPU, which keeps no such count.

    >>> measured_peak(lambda: torch.zeros(256) + 1)  # the zeros and the sum are alive at once
    2048
    """
    tracker = _LiveTensors()
    with tracker:
        step()
    return max(tracker.trace, default=0)


def _sampler(model: nn.Module, input_size: int | None, tokens: int | None) -> Callable[[int], torch.Tensor | dict]:
    """What makes a probe batch of ``b``: images, or a tokenized text batch (the dict a text model is called with)."""
    device = next(model.parameters()).device
    if tokens is None:
        return lambda b: torch.randn(b, 3, input_size, input_size, device=device)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    return lambda b: {"input_ids": torch.randint(vocab, (b, tokens), device=device),
                      "attention_mask": torch.ones(b, tokens, dtype=torch.long, device=device)}  # fmt: skip


def _breakdown(model, params, sample, batch_size, optimizer, amp_dtype, *, averaged: bool = False
               ) -> dict[str, float]:  # fmt: skip
    mib = 2**20
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    step, per_batch = _step_peak(model, sample, batch_size, amp_dtype, grads)
    # lives from the first step on, beside all the step holds; a weight average is one more copy of what trains
    state = grads * (_OPT_STATE.get(optimizer, 2) + averaged)
    return {"weights": weights / mib, "grads": grads / mib, "optimizer": state / mib, "activations": per_batch / mib,
            "total": (weights + state + step) / mib}  # fmt: skip


def _step_peak(model: nn.Module, sample: Callable, batch_size: int, amp_dtype: torch.dtype | None, grads: int
               ) -> tuple[float, float]:  # fmt: skip
    """Bytes a forward and backward at ``batch_size`` holds at its peak, above the parameters themselves, and the
    share of them that grows with the batch.

    Each moment of the step (the live bytes after each operation) is a constant plus a per-image slope: two probe
    batches give both, so the peak is found at the batch asked for even when it moves (at a small batch the
    gradients at the end of the backward pass can outweigh the activations that dominate at a large one).
    """
    (small, backward), (large, _) = (_live_after_each_op(model, sample, b, amp_dtype) for b in _PROBE_BATCHES)
    # the trainer (as most loops) sets the gradients to None after the forward pass, just before backward: the
    # previous step's ``grads`` bytes are alive through every moment of the forward
    if len(small) != len(large):  # the operations depend on the batch: scale the peaks alone
        small, large, backward = [max(small)], [max(large)], 0
    b1, b2 = _PROBE_BATCHES
    slopes = [(g - s) / (b2 - b1) for s, g in zip(small, large, strict=True)]
    moments = [
        s + k * (batch_size - b1) + (grads if i < backward else 0)
        for i, (s, k) in enumerate(zip(small, slopes, strict=True))
    ]
    peak = max(range(len(moments)), key=moments.__getitem__)
    return moments[peak], max(slopes[peak] * batch_size, 0.0)


def _live_after_each_op(model: nn.Module, sample: Callable, batch: int, amp_dtype: torch.dtype | None
                        ) -> tuple[list[int], int]:  # fmt: skip
    """The live bytes after each operation of a forward, loss and backward, and where the backward pass starts."""
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    tracker = _LiveTensors()
    with _left_as_it_was(model), tracker:
        x = sample(batch)
        with autocast:
            logits = logits_of(run_model(model, x))
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=device)
        loss = F.cross_entropy(logits.float(), target)  # as the trainer: the loss in fp32
        backward = len(tracker.trace)
        if loss.requires_grad:
            loss.backward()
    return tracker.trace, backward


@contextlib.contextmanager
def _left_as_it_was(model: nn.Module) -> Iterator[None]:
    """Train mode, no gradients, inside; modes, BatchNorm statistics and the caller's gradients put back after.

    A train-mode forward updates BatchNorm running statistics, and model.train() flips every submodule's mode.
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    for p, _ in grads:
        p.grad = None  # a step starts without them (zero_grad(set_to_none=True)); accumulating would count a copy
    model.train()
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, mode in modes:
            m.training = mode
        for p, grad in grads:
            p.grad = grad


class _LiveTensors(TorchDispatchMode):
    """Records, after each operation, the bytes of the tensor storages created inside the block and alive then.

    A storage is counted when an operation first returns it and uncounted when it is freed (a weak reference's
    callback). Storages that existed before (parameters) are never counted, views of them included: an output that
    shares an input's storage is a view or an in-place result, not new memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.trace: list[int] = []
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t.untyped_storage(), inputs)
        self.trace.append(self.live)
        return out

    def _count(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        key = id(storage)
        if key in self._refs or storage.data_ptr() in inputs:
            return
        size = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))
        self.live += size

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        del self._refs[key]


def find_batch_size(fits: Callable[[int], bool], cap: int, start: int = 2) -> int | None:
    """The largest batch ``fits`` accepts among ``start, 2*start, 4*start, ...`` and ``cap``; None if none does.

    Sizes grow by doubling until one does not fit (the last that did is kept) or the cap is reached.

    >>> find_batch_size(lambda b: b <= 100, cap=1000)
    64
    >>> find_batch_size(lambda b: True, cap=300), find_batch_size(lambda b: False, cap=300)
    (300, None)
    """
    best, size = None, max(1, min(start, cap))
    while fits(size):
        best = size
        if size >= cap:
            break
        size = min(2 * size, cap)
    return best


def auto_batch_size(model: nn.Module, input_size: int | None, *, device: torch.device, cap: int, default: int,
                    autocast: Callable = contextlib.nullcontext, averaged: bool = False) -> tuple[int, str]:  # fmt: skip
    """The batch size ``--batch-size auto`` trains with, and why, in words.

    On CUDA: the largest power of two (at most ``cap``, the training set size) whose forward and backward through
    ``model`` fit, with room held for the optimizer state. Elsewhere nothing can be measured without risking the
    machine's RAM, so ``default`` (capped) is kept; so it is for a text model (``input_size`` None: no image input
    to measure with).

    >>> auto_batch_size(nn.Linear(4, 2), 4, device=torch.device("cpu"), cap=10, default=32)
    (10, 'the default 32 (no CUDA device to measure on cpu), capped at 10 training images')
    """
    if input_size is None:
        return min(default, cap), "the default (a text model is not measured)"
    if device.type != "cuda":
        size = min(default, cap)
        capped = f", capped at {cap} training images" if size < default else ""
        return size, f"the default {default} (no CUDA device to measure on {device.type}){capped}"
    copies = 2 + averaged  # AdamW's two moments, and the average's copy, of each trainable parameter
    size = find_batch_size(lambda b: _fits(model, input_size, b, device, autocast, copies), cap)
    if size is None:
        raise ResourceError(f"not even a batch of 2 images of {input_size} px fits on {device}; try a smaller "
                            f"--img-size or model")  # fmt: skip
    return size, f"the largest power of two whose forward and backward fit on {device} (at most {cap})"


def _fits(model: nn.Module, input_size: int, batch: int, device: torch.device, autocast: Callable, copies: int = 2
          ) -> bool:  # fmt: skip
    """One forward and backward at ``batch`` in eval mode (BatchNorm statistics untouched), gradients dropped after,
    with ``copies`` of the trainable parameters reserved (AdamW's state, a weight average): the first real step
    allocates them."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    try:
        _step_at(model, input_size, batch, device, autocast, trainable, copies)
        return True
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
        if not _out_of_memory(exc):
            raise
        return False
    finally:
        model.train(was_training)
        for p in trainable:
            p.grad = None
        # the step's tensors (its input, its activations that an error's traceback kept) are gone with its frame:
        # their blocks go back to the device here, not reserved for the rest of the run, whose free-memory checks
        # (the feature cache's place, the device loader's) would find them taken
        torch.cuda.empty_cache()


def _step_at(model: nn.Module, input_size: int, batch: int, device: torch.device, autocast: Callable,
             trainable: list[nn.Parameter], copies: int = 2) -> None:  # fmt: skip
    nbytes = copies * sum(p.numel() * p.element_size() for p in trainable)
    reserve = torch.empty(nbytes, dtype=torch.uint8, device=device)
    x = torch.randn(batch, 3, input_size, input_size, device=device)
    with autocast():
        out = logits_of(model.eval()(x))
    if out.requires_grad:
        out.float().sum().backward()
    del reserve


# what a CUDA library says instead of "out of memory" at a batch too large for it (a workspace it cannot allocate, a
# tensor past 32-bit indexing): on a large card the doubling reaches such batches before memory runs out
_TOO_LARGE = ("out of memory", "CUDNN_STATUS_NOT_SUPPORTED", "CUDNN_STATUS_EXECUTION_FAILED",
              "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "canUse32BitIndexMath")  # fmt: skip


def _out_of_memory(exc: RuntimeError) -> bool:
    """Whether a probe's error says the batch does not fit.

    >>> _out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED")), _out_of_memory(RuntimeError("bug"))
    (True, False)
    """
    return isinstance(exc, torch.cuda.OutOfMemoryError) or any(word in str(exc) for word in _TOO_LARGE)


def ran_out_of_ram(exc: BaseException) -> bool:
    """Whether ``exc`` says the machine's memory ran out: torch's CPU allocator (Linux's "can't allocate memory",
    Windows' "not enough memory"), or Python's MemoryError.

    >>> ran_out_of_ram(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 3623878656 "
    ...                             "bytes. Error code 12 (Cannot allocate memory)"))
    True
    >>> ran_out_of_ram(RuntimeError("bug")), ran_out_of_ram(MemoryError())
    (False, True)
    """
    said = ("can't allocate memory", "DefaultCPUAllocator: not enough memory")
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and any(w in str(exc) for w in said))


# an Apple GPU's memory running out: a plain RuntimeError, torch has no OutOfMemoryError of MPS's
_MPS_OUT_OF_MEMORY = "MPS backend out of memory"


@contextlib.contextmanager
def out_of_memory_hint(batch_size: int | str, *, training: bool = True) -> Iterator[None]:
    """Memory running out, the device's (CUDA's, an Apple GPU's) or the machine's RAM (``ran_out_of_ram``), is the
    run's size, not a bug: one line naming the batch size to try instead (for ``train``, ``eval`` and ``predict``;
    ``training`` adds the hints only ``train`` has a flag for: ``--amp``, ``--img-size``).

    Checkpoints are written whole or not at all, so a run dir keeps the last finished epoch (``--resume``).

    >>> with out_of_memory_hint(64):
    ...     raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    Traceback (most recent call last):
    freezetune.errors.ResourceError: the device ran out of memory at batch size 64; try --batch-size 32 ...
    """
    try:
        yield
    except (RuntimeError, MemoryError, OSError, EOFError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
        _raise_worker_failure(e)  # (OSError, EOFError: a worker gone with the batch it was sending)
        if not isinstance(e, (RuntimeError, MemoryError)):
            raise
        ram, mps = ran_out_of_ram(e), _MPS_OUT_OF_MEMORY in str(e)
        if not (ram or mps or isinstance(e, torch.cuda.OutOfMemoryError)):
            raise
        if batch_size == BATCH_AUTO:  # what auto measured did not leave room for the rest of the run
            fix = "try a fixed --batch-size below the one auto printed"
        else:
            fix = f"try --batch-size {batch_size // 2}" if batch_size > 1 else "try a smaller --img-size or model"
        # the CPU's: a traceback through the cache build ended "DefaultCPUAllocator: can't allocate memory"
        # train's own flags (eval and predict have neither); at batch size 1 the fix names --img-size already
        smaller = " or a smaller --img-size" if training and "--img-size" not in fix else ""
        device = "the device (mps)" if mps else "the device"
        what, extra = ("the machine ran out of memory (RAM)", smaller) if ram else \
            (f"{device} ran out of memory", " (or --amp bf16)" if training else "")  # fmt: skip
        raise ResourceError(f"{what} at batch size {batch_size}; {fix}{extra}; files written before are "
                            "intact") from e  # fmt: skip


def _raise_worker_failure(exc: BaseException) -> None:
    """A loader worker that ran out of shared memory or was killed is the run's size too (``data.workers``), unless a
    stop signal killed it (the stop is what the command reports)."""
    from freezetune.data.workers import worker_death
    from freezetune.run.interrupt import raised_stop

    said = worker_death(exc)
    if said is not None and raised_stop() is None:
        raise ResourceError(f"{said}; files written before are intact") from exc
