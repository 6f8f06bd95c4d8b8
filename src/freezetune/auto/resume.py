"""An auto run resumed: the decision its ``recipe.json`` kept is trained, untried (a stop in its final run resumes that
run). The request is checked against the one the decision was made for: a setting changed now would not show in the
settings the decision derived from it. Without an LR schedule more epochs may be asked, as a plain run's resume may.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from freezetune._io import atomic_write_text
from freezetune.auto.plan import at_lr, measured_trials, run_bn_stats, shared_config
from freezetune.config.train_config import TrainConfig, changed_on_resume, stretchable
from freezetune.errors import ConfigError, setting
from freezetune.run import checkpoint
from freezetune.run import log as run_log
from freezetune.run.directory import RECIPE_FILE

# recipe.json's layout, its "format": 2 since its choice's epoch_images is the run's setting (a budget's pilot may
# shorten the epochs, 2026-12-05); it had been the chosen trial's measured images an epoch (1)
DECISION_FORMAT = 2


def resumed(cfg: TrainConfig, out: Path, echo: Callable[[str], None], *,
             write: bool = True) -> tuple[TrainConfig, list[dict]]:  # fmt: skip
    """The final run's config from the decision ``recipe.json`` kept (a resume trains what was chosen, untried), and
    the trials it records."""
    decision = json.loads((out / RECIPE_FILE).read_text())
    if "choice" not in decision:  # a named recipe's request (recipes.named.asked_config)
        raise ConfigError(f"cannot resume {out} with freeze auto: it holds a run of recipe "
                          f"{decision.get('recipe')!r}; resume it with its own command")  # fmt: skip
    run_log.log_to(out)  # (written once the final run's resume is accepted)
    choice = decision["choice"]
    run_lr = choice.get("run_lr", choice["lr"])
    # compared as recipe.json holds them: JSON made tuples lists and a plan's epoch keys strings
    asked, now = decision.get("asked") or {}, json.loads(json.dumps(cfg.recorded()))
    # moved data is checked by the final run's last.pt, as any run's is; before it has one, the paths stay the asked
    moved = (out / checkpoint.LAST).is_file()
    # without an LR schedule a run trains on for more epochs, as a plain run's resume may (checkpoint.check_settings)
    longer = stretchable(asked, now)
    changed = changed_on_resume(asked, now, moved=moved)
    if changed:  # the final run's settings derive from the request: an --lr changed now would not show in them
        raise ConfigError(f"cannot resume {out} with {', '.join(changed)}: an auto run continues as it was asked; "
                          f"resume with the run's values, or start a new run with another {setting('out')}")  # fmt: skip
    init = choice.get("init", cfg.init)
    if init and init != cfg.init and not (out / checkpoint.LAST).is_file() and not Path(init).is_file():
        # the run had saved nothing yet, and the trial (or probe) weights it starts from are gone
        raise ConfigError(f"cannot resume {out}: the weights its run starts from, {init}, are gone and the run saved "
                          "no last.pt yet; run the command without --resume to redo the trials")  # fmt: skip
    echo(f"auto: resuming with the earlier decision: freeze {choice['freeze']!r}, lr {run_lr:.1e}")
    choice = _longer(decision, now, longer, out, echo, write=write)
    run_cfg = dataclasses.replace(at_lr(shared_config(cfg, out, decision["cut"]), run_lr), freeze=choice["freeze"],
                                  epochs=choice["epochs"], init=init, resume=True,
                                  **_as_decided(decision, choice, cfg))  # fmt: skip
    return run_cfg, measured_trials(decision.get("trials", []), decision.get("probe"), decision.get("pilot"))


def decision_format(decision: dict) -> int:
    """The layout of a ``recipe.json`` decision (``DECISION_FORMAT``): its ``format``, else 2 where it has a
    ``pilot`` (written since the same change), else 1.

    >>> decision_format({"choice": {}}), decision_format({"pilot": None, "choice": {}}), decision_format({"format": 2})
    (1, 2, 2)
    """
    return decision.get("format", 2 if "pilot" in decision else 1)


def _as_decided(decision: dict, choice: dict, cfg: TrainConfig) -> dict:
    """The final run's settings the decision fixed; each one an earlier freezetune did not record, as its run trained
    with it: no refit (recorded since 2026-11-30), BatchNorm statistics and warm-up as asked (since 2026-12-05, with
    the probe and a budget's plan), every epoch as long as asked (since format 2), no weight averaging (since
    2026-12-07)."""
    # before format 2 the choice's epoch_images was its trial's measured images an epoch (a float, taken from the
    # trial's row): read as the run's, it was refused as no int, and one that happened to be whole shortened every epoch
    epoch_images = choice.get("epoch_images", cfg.epoch_images) if decision_format(decision) >= 2 else cfg.epoch_images
    # a decision without bn_stats made no probe (both came in together): the run's statistics were the ones asked
    return {
        "refit": choice.get("refit", False),
        "bn_stats": choice.get("bn_stats", run_bn_stats(cfg.bn_stats, False)),
        "warmup_epochs": choice.get("warmup_epochs", cfg.warmup_epochs),
        "epoch_images": epoch_images,
        "average_weights": choice.get("average_weights", 0.0),
    }


def _longer(decision: dict, now: dict, longer: tuple[str, ...], out: Path, echo: Callable[[str], None], *,
            write: bool) -> dict:  # fmt: skip
    """The choice a resume trains: the decision's, with the epochs (and warm-up) asked now where the run has no LR
    schedule (``longer``) and they changed, said and recorded in ``recipe.json`` (``write``: rank 0): the next plain
    ``--resume`` reads the request there, and its old epochs were refused below the epochs trained."""
    asked, choice = decision.get("asked") or {}, decision["choice"]
    new = {k: now[k] for k in longer if k in now and asked.get(k) != now[k]}
    if not new:
        return choice
    if "epochs" in new:  # the epochs the trials' decision (or a budget) planned, replaced
        echo(f"auto: the run trains {new['epochs']} epoch(s), as --epochs asks now (it planned {choice['epochs']})")
    choice = {**choice, **new}
    if write:
        atomic_write_text(out / RECIPE_FILE, json.dumps({**decision, "asked": {**asked, **new}, "choice": choice},
                                                        indent=1))  # fmt: skip
    return choice
