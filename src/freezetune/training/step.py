"""One training step: a batch through the module under autocast, the loss, backward through the loss scaler, gradient
clipping, the optimizer and LR-schedule steps; or, with ``skip_nonfinite``, a batch whose loss is not finite skipped.

The ``Trainer`` decides which batches an epoch runs, when to save and when to stop; ``Step`` only trains on a batch.
On a CUDA device a full batch of cached features is trained by replaying a captured step (``graph_step``).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from freezetune.device.distributed import DistInfo, all_reduce_sum
from freezetune.device.precision import Precision
from freezetune.errors import TrainingError
from freezetune.model.download import first_line
from freezetune.run.checkpoint import TrainingState
from freezetune.training.epoch_log import TrainProgress
from freezetune.training.eval_loop import logits_of, run_model, to_device
from freezetune.training.graph_step import StepGraphs, graph_unsupported

log = logging.getLogger(__name__)


class Step:
    """Trains on one batch a call; ``lrs`` are the learning rates the last optimizer step used (a metrics row's LR).

    >>> import torch
    >>> from torch import nn
    >>> from freezetune.run.checkpoint import TrainingState
    >>> from freezetune.training.epoch_log import TrainProgress
    >>> from freezetune.device.precision import resolve_precision
    >>> model = nn.Linear(4, 2)
    >>> state = TrainingState(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
    ...                       resolve_precision(torch.device("cpu"), "off").scaler(), None)
    >>> step = Step(state, nn.CrossEntropyLoss(), resolve_precision(torch.device("cpu"), "off"))
    >>> meter = TrainProgress(1, "epoch 1/1", enabled=False, device=torch.device("cpu"))
    >>> step(model, torch.randn(8, 4), torch.zeros(8, dtype=torch.long), meter)
    True
    >>> step.lrs
    [0.1]
    """

    def __init__(self, state: TrainingState, loss_fn: nn.Module, precision: Precision, *, channels_last: bool = False,
                 grad_clip: float | None = None, skip_nonfinite: int | None = None,
                 dist: DistInfo | None = None, graph_batch: int | None = None) -> None:  # fmt: skip
        self.state, self.loss_fn, self.precision, self.dist = state, loss_fn, precision, dist or DistInfo()
        self.channels_last, self.grad_clip, self.skip_nonfinite = channels_last, grad_clip, skip_nonfinite
        self.lrs: list[float] | None = None
        self.graphs = self._graphs(graph_batch) if graph_batch else None

    def start_epoch(self, lrs: list[float] | None = None) -> None:
        """An epoch starts: no step of it has run (``lrs`` None), or, resumed mid-epoch, its last saved step ran at
        ``lrs`` (the row of an epoch saved after its last step still names them)."""
        self.lrs = lrs

    def _graphs(self, batch_size: int) -> StepGraphs | None:
        """The CUDA graphs of cached steps (``graph_step``), when nothing in this run's step needs the host."""
        why = graph_unsupported(self.state.optimizer, self.precision.device, needs_scaler=self.precision.needs_scaler,
                                grad_clip=self.grad_clip, skip_nonfinite=self.skip_nonfinite,
                                distributed=self.dist.enabled)  # fmt: skip
        if why is not None:
            log.debug("cached training steps run eagerly: %s", why)
            return None
        return StepGraphs(lambda: self.state.optimizer, self.loss_fn, lambda: self.precision.autocast(cache=False),
                          batch_size)  # fmt: skip

    def __call__(self, module: nn.Module, inputs, targets: torch.Tensor, meter: TrainProgress, *,
                 cached: bool = False) -> bool:  # fmt: skip
        """Train ``module`` on one batch and count it in ``meter``; False when the batch was skipped as non-finite
        (``meter.skipped`` counts those; the caller decides when too many end the run). ``cached``: the batch is
        cached features on the device (a full one may then be a CUDA graph's replay)."""
        device = self.precision.device
        inputs = to_device(inputs, device, self.channels_last)
        targets = targets.to(device, non_blocking=True)
        if cached and self.graphs is not None and isinstance(inputs, torch.Tensor):
            replayed = self.graphs.run(module, inputs, targets)
            if replayed is not None:
                self._scheduled()
                loss, logits, correct = replayed
                meter.update(loss, logits, targets, correct)
                return True
        with self.precision.autocast():
            logits = logits_of(run_model(module, inputs))
            loss = self.loss_fn(logits.float(), targets)
        if self.skip_nonfinite and self._not_finite(loss):
            meter.skip()  # a step of the epoch (a mid-epoch save counts it) that trains nothing
            if self.state.scheduler is not None:  # the schedule keeps its length, as AMP's skipped steps do
                with warnings.catch_warnings():  # torch's "scheduler before optimizer" warning: meant, when skipping
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                    self.state.scheduler.step()
            return False
        self._optimize(loss)
        meter.update(loss, logits, targets)
        return True

    def forward(self, module: nn.Module, inputs) -> object:
        """``module``'s output for a batch as a step computes it (its device, memory format and autocast), training
        nothing: what a pass that only reads the batches runs (``bn_refresh``)."""
        with self.precision.autocast():
            return run_model(module, to_device(inputs, self.precision.device, self.channels_last))

    def _not_finite(self, loss: torch.Tensor) -> bool:
        """Whether any rank's loss is not finite (every rank then skips the batch: DDP's backward is collective).

        One host sync a step, paid only with ``skip_nonfinite`` on: without it the check stays on the device and is
        read once an epoch (``TrainProgress``), where stopping needs no per-step decision.
        """
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        return bool(all_reduce_sum(bad, self.dist).item())

    def _optimize(self, loss: torch.Tensor) -> None:
        optimizer, scaler = self.state.optimizer, self.state.scaler
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if self.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], self.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        self._scheduled()

    def _scheduled(self) -> None:
        """After the optimizer's step: note the rates it used and move the LR schedule on."""
        self.lrs = [g["lr"] for g in self.state.optimizer.param_groups]
        if self.state.scheduler is not None:
            self.state.scheduler.step()


def one_value_batch(exc: ValueError, n: int, batch_size: int, epoch_images: int | None = None) -> TrainingError:
    """A training batch too small for a BatchNorm layer that trains (torch's "Expected more than 1 value per channel
    when training": one image, and a layer that sees one value a channel), as the one line of what to change: a
    larger ``batch_size`` only where it is the cause (with 32, ``--epoch-images 2`` on 2 ranks gave each one image);
    more ``--epoch-images`` only where they were given."""
    if batch_size < 2:
        fix = "give --batch-size 2 or more"
    elif epoch_images is not None:
        fix = "give more --epoch-images (under torchrun each rank takes its share of them)"
    else:
        fix = "give more training images (under torchrun each rank takes its share of them)"
    return TrainingError(f"a training batch of {n} image(s) cannot train the model's BatchNorm layers (torch: "
                         f"{first_line(exc)}); {fix}, or hold the statistics: --bn-stats frozen")  # fmt: skip
