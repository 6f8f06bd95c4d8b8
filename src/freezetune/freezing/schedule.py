"""The forms of an unfreezing schedule, parsed and checked (no torch: a config is checked before it loads).

- ``"epoch:N"``: every N epochs unfreeze the next frozen stage counted from the head (ULMFiT's gradual unfreezing).
- ``"plateau:patience=P,min_delta=D,mode=max"``: unfreeze the next stage when the metric given to ``step`` has not
  improved by more than D for P consecutive calls; without ``mode``, the ``Unfreezer``'s (a run's follows its
  ``monitor``: ``val_loss`` improves as it falls). Once a stage opens, the count starts again from the epochs after
  it, against their own best.
- ``{epoch: spec}``: an explicit plan; what ``spec`` (any freeze spec) names trains from that (0-based) epoch on,
  exactly what ``unfreeze(model, spec)`` opens: a glob of part of a stage (``"*.bias"``, ``"layer4.1*"``) opens that
  part, not the stages it touches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from freezetune.config.options import FRACTIONS, MONITOR_MODES, UNFREEZE_FORMS
from freezetune.errors import SpecError, choices

if TYPE_CHECKING:
    from freezetune.freezing.freeze import Spec
    from freezetune.freezing.unfreezing import Unfreezer

MODES = tuple(dict.fromkeys(MONITOR_MODES.values()))  # a metric improves as it rises (accuracy) or falls (a loss)


@dataclass
class Schedule:
    """A parsed unfreezing schedule (see the module docstring for the forms)."""

    kind: str  # "epoch" | "plateau" | "plan"
    every: int = 0
    patience: int = 2
    min_delta: float = 0.0
    mode: str | None = None  # a plateau's direction when given ("max"/"min"); else the Unfreezer's ``mode``
    plan: dict[int, Spec] = field(default_factory=dict)


def parse_schedule(schedule: str | Mapping[int, Spec] | Schedule) -> Schedule:
    """Parse ``"epoch:N"``, ``"plateau:patience=P,min_delta=D,mode=max"`` or a ``{epoch: spec}`` plan.

    >>> parse_schedule("plateau:patience=3").patience
    3
    """
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, Mapping):
        bad = [k for k in schedule if not str(k).strip().isdigit()]
        if bad:  # a negative epoch never comes: its stages would never open
            # YAML reads "{1:layer4}" as the one key "1:layer4": its value needs a space after the colon
            space = "; write a space after each colon ({1: layer4})" if any(":" in str(k) for k in bad) else ""
            raise SpecError(f"an unfreeze plan maps epochs (ints) to freeze specs, e.g. {{2: 'layer4'}}, epochs from 0;"
                            f" got key(s) {choices(bad)}{space}")  # fmt: skip
        empty = [k for k, v in schedule.items() if v is None or v == "" or v == []]
        if empty:  # "{1: }" is {1: None}: it failed once the model was built, as "got NoneType"
            raise SpecError(f"the unfreeze plan's epoch {empty[0]} opens nothing; give it a freeze spec (a stage name, "
                            "a glob, a number of stages) or leave the epoch out")  # fmt: skip
        return Schedule("plan", plan={int(k): v for k, v in schedule.items()})
    kind, _, args = str(schedule).strip().partition(":")
    why = ""
    try:
        if kind == "epoch":
            return Schedule("epoch", every=_number(args, "N", int, 1))
        if kind == "plateau":
            return _parse_plateau(args)
    except ValueError as exc:  # the form is right, a value is not: say which, and what it takes
        why = f": {exc}" if str(exc) else ""
    raise SpecError(f"bad unfreeze schedule {schedule!r}{why}; the forms are: {choices(UNFREEZE_FORMS)}")


def _number(text: str, name: str, kind: type, low: float):
    """``text`` as a ``kind`` at least ``low``, else a ValueError naming ``name`` and what it takes."""
    noun = "an integer" if kind is int else "a number"
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name} takes {noun} >= {low:g}, got {text!r}") from None
    if not value >= low:  # (nan too)
        raise ValueError(f"{name} takes {noun} >= {low:g}, got {text!r}")
    return value


def _parse_plateau(args: str) -> Schedule:
    out = Schedule("plateau")
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, _, value = item.partition("=")
        if key == "patience":
            out.patience = _number(value, "patience", int, 1)
        elif key == "min_delta":  # a negative min_delta counts small drops as improvements
            out.min_delta = _number(value, "min_delta", float, 0)
        elif key == "mode":
            if value not in MODES:
                raise ValueError(f"mode takes {choices(MODES)}, got {value!r}")
            out.mode = value
        else:
            raise ValueError(f"{item!r} is none of patience=, min_delta=, mode=")
    return out


def plateau_units_note(schedule: Schedule | None, monitor: str) -> str | None:
    """A note when a plateau's ``min_delta`` on ``val_acc`` or ``val_f1`` reads like points: both are fractions,
    and ``min_delta=0.5`` (50 points) unfroze a stage after every epoch, as ``epoch:1`` would.

    >>> plateau_units_note(parse_schedule("plateau:patience=1,min_delta=0.5"), "val_acc")[:47]
    'note: plateau min_delta 0.5 is in val_acc units'
    """
    if schedule is None or schedule.kind != "plateau" or monitor not in FRACTIONS or schedule.min_delta < 0.1:
        return None
    delta = schedule.min_delta
    what = "accuracy" if monitor == "val_acc" else "macro-F1"
    return (f"note: plateau min_delta {delta:g} is in {monitor} units, a fraction: {delta:g} is {100 * delta:g} points "
            f"of {what} (half a point is 0.005), so nearly every epoch counts as a stall")  # fmt: skip


def idle_schedule_note(unfreezer: Unfreezer | None, epochs: int, early_stop: int | None = None) -> str | None:
    """A note when an unfreeze schedule cannot open anything the run trains: nothing is frozen, every epoch it
    opens at is the run's last or later (``--epochs 3 --unfreeze epoch:5`` trained 3 frozen epochs without a word), or
    a plateau's patience outlasts ``early_stop``'s (which ended the run first, no stage opened, without a word).

    >>> import torch, torchvision, freezetune as ft
    >>> m = torchvision.models.resnet18(); ft.freeze(m, "backbone")
    >>> opt = torch.optim.SGD(m.fc.parameters(), lr=0.1)
    >>> idle_schedule_note(ft.Unfreezer(m, opt, "epoch:5", lr=0.1), 3)[:44]
    "note: unfreeze 'epoch:5' opens nothing the 3"
    """
    if unfreezer is None or unfreezer.events:  # a resumed run whose schedule has opened stages: it did its work
        return None
    schedule = unfreezer.schedule
    told = {"epoch": f"'epoch:{schedule.every}'", "plan": "plan", "plateau": "plateau"}[schedule.kind]
    if not unfreezer.frozen_stages():
        return f"note: unfreeze {told} has nothing to open: every stage trains already"
    if schedule.kind == "plateau":  # when it opens depends on the metric; not after the run has stopped early
        if early_stop is not None and early_stop < schedule.patience:
            return (f"note: unfreeze plateau opens a stage after {schedule.patience} epochs without improvement, and "
                    f"--early-stop {early_stop} ends the run after {early_stop}: it stops before any stage opens, but "
                    f"where gains under the plateau's min_delta keep it going; give --early-stop {schedule.patience} "
                    "or more")  # fmt: skip
        return None
    first = _next_opening(schedule, 0)  # (a plan's 0: at the start)
    if first is None or first < epochs:
        return None
    return (f"note: unfreeze {told} opens nothing the {epochs}-epoch run trains: its first opening comes after epoch "
            f"{first}; give more epochs or an earlier one")  # fmt: skip


def epochs_on_cut(unfreezer: Unfreezer | None, epoch: int, epochs: int) -> int:
    """The epochs from ``epoch`` (0-based) of a run of ``epochs`` whose frozen prefix stays as it is: to the run's
    end, or through the epoch at whose end the schedule next opens stages (a feature store built now serves those
    alone; when a plateau opens depends on the metric).

    >>> import torch, torchvision, freezetune as ft
    >>> m = torchvision.models.resnet18(); ft.freeze(m, "backbone")
    >>> epochs_on_cut(ft.Unfreezer(m, torch.optim.SGD(m.fc.parameters(), lr=0.1), "epoch:3", lr=0.1), 4, 10)
    2
    """
    left = epochs - epoch
    if unfreezer is None or not unfreezer.frozen_stages():
        return left
    opens = _next_opening(unfreezer.schedule, epoch)
    return left if opens is None else min(left, opens - epoch)


def _next_opening(schedule: Schedule, done: int) -> int | None:
    """After how many epochs, past the first ``done``, the schedule next opens stages (at that epoch's end); None for a
    plateau (when it opens depends on the metric) or a plan with nothing left.

    >>> _next_opening(Schedule("epoch", every=3), 4), _next_opening(Schedule("plan", plan={2: "layer4"}), 2)
    (6, None)
    """
    if schedule.kind == "epoch":  # after every every-th epoch
        return done + schedule.every - done % schedule.every
    if schedule.kind == "plan":  # after the epoch of each key
        return min((at for at in schedule.plan if at > done), default=None)
    return None
