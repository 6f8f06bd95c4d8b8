"""Weight averaging (``TrainConfig.average_weights``): an exponential moving average of the weights that train, kept
beside them step by step, which becomes the model's weights after the run's last epoch (Polyak averaging, as timm's
model EMA keeps one; here of the trainable parameters alone: the frozen ones do not move).

The BatchNorm statistics of the averaged weights are not any step's: the run recomputes them on its training data
after the swap (``Trainer._refresh_bn``), before validation scores the averaged model and ``last.pt`` keeps it.
"""

from __future__ import annotations

import torch
from torch import nn


def decay_of(share: float, total_steps: int) -> float:
    """The decay of an average over the last ``share`` of a run's ``total_steps``: its horizon, 1 / (1 - decay), is
    that many steps (at least one: a decay of 0 holds the last step's weights), so a short run and a long one average
    alike.

    >>> decay_of(0.5, 96), decay_of(0.5, 2), decay_of(1.0, 10)
    (0.9791666666666666, 0.0, 0.9)
    """
    return 1 - 1 / max(share * total_steps, 1.0)


class WeightAverage:
    """The moving average of ``model``'s trainable parameters with ``decay`` (0 <= decay < 1): each ``update`` moves
    it ``1 - decay`` of the way to the weights of that step. A parameter that starts training later (an unfreeze)
    joins at its weights of the first update after (one step in).

    >>> model = nn.Linear(1, 1, bias=False)
    >>> with torch.no_grad(): _ = model.weight.fill_(0.0)
    >>> average = WeightAverage(model, decay=0.5)
    >>> with torch.no_grad(): _ = model.weight.fill_(1.0)
    >>> average.update(); average.apply(); model.weight.item()
    0.5
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = dict(model.named_parameters())  # the same tensors all run long: an unfreeze flips requires_grad
        self.averages: dict[str, torch.Tensor] = {}
        self._join()

    def _join(self) -> list[str]:
        """Start the average of each parameter that trains and has none (at its weights of now); the names of those
        that train, in the model's order."""
        names = [name for name, p in self.params.items() if p.requires_grad]
        for name in names:
            if name not in self.averages:
                self.averages[name] = self.params[name].detach().clone()
        return names

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: move the average towards the weights it left."""
        names = self._join()
        torch._foreach_lerp_([self.averages[n] for n in names], [self.params[n] for n in names], 1 - self.decay)

    @torch.no_grad()
    def apply(self) -> None:
        """Make the averages the model's weights."""
        for name, average in self.averages.items():
            self.params[name].copy_(average)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "averages": dict(self.averages)}

    def load_state_dict(self, state: dict) -> None:
        """Continue the averages ``state_dict`` saved (a resume's ``last.pt``). The decay stays this one's, of the run
        as it is configured now: a resume that adds epochs (``--scheduler none``) averages over the last share of
        them all, not of the epochs the run first had."""
        self.averages = {n: t.to(self.params[n].device, self.params[n].dtype).clone()
                         for n, t in state["averages"].items()}  # fmt: skip
