"""The auto recipe (``freeze: auto``, the default): decide which stages to freeze by measurement, then fine-tune.

Which block should train depends on the data (surgical fine-tuning, Lee et al. 2023): a small shift is best served
by tuning the last stages over frozen features, a larger one by tuning deeper. The frozen-prefix cache makes it
cheap to ask the data. The procedure, every step printed and written to ``recipe.json`` in the run directory:

1. Candidates: the last ``k`` stages and the head train, for ``k = 1 .. MAX_TRAINED_STAGES`` (fewer on a model with
   fewer stages); everything before is frozen (BatchNorm frozen) and its output cached.
2. Trials: each candidate fine-tunes for one epoch (the run's settings, its LR schedule compressed into that epoch)
   and is scored on the validation split. The test split is never looked at. The caches of the trials are kept in
   the run's feature directory, so the chosen candidate's cache is read back, not recomputed.
3. Choice: the cheapest candidate (fewest trainable stages) whose validation accuracy is within ``TOLERANCE`` of the
   best trial: more trainable stages must earn their extra time.
4. The run: the chosen freeze for ``epochs`` epochs, or, with ``budget``, for as many epochs as the time left
   affords at the trial's measured epoch time (at least one).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from freezetune._io import atomic_write_text
from freezetune.config import TrainConfig
from freezetune.options import parse_duration

MAX_TRAINED_STAGES = 3  # candidates train the last 1, 2 or 3 stages (and the head)
TOLERANCE = 0.005  # validation accuracy within half a point of the best counts as as good
RECIPE_FILE = "recipe.json"


def run(cfg: TrainConfig, *, echo: Callable[[str], None] = print, train: Callable | None = None):
    """Measure, choose, train (see the module docstring); returns the final run's ``RunResult``."""
    from freezetune import runtime, trainer

    train = train or trainer.train
    out = Path(cfg.out) if cfg.out else runtime.default_run_dir(cfg.model)
    cache_dir = cfg.cache_dir or str(out / "features")
    base = dataclasses.replace(cfg, recipe=None, out=str(out), cache_dir=cache_dir, budget=None)
    saved = out / RECIPE_FILE
    if cfg.resume and saved.is_file():  # the decision was made before the interruption: keep it
        decision = json.loads(saved.read_text())
        echo(f"auto: resuming with the earlier decision: {decision['choice']['freeze']!r}")
    else:
        decision = decide(base, echo=echo, train=train, budget=parse_duration(cfg.budget))
        atomic_write_text(saved, json.dumps(decision, indent=1))
    choice = decision["choice"]
    return train(dataclasses.replace(base, freeze=choice["freeze"], epochs=choice["epochs"]), echo=echo)


def decide(cfg: TrainConfig, *, echo: Callable[[str], None], train: Callable, budget: float | None) -> dict:
    """Run the trials and choose; returns the evidence and the choice (what ``recipe.json`` holds)."""
    start = time.perf_counter()
    count = _trainable_stage_count(cfg)
    ks = list(range(1, min(MAX_TRAINED_STAGES, count) + 1))
    echo(f"auto: choosing how many of the last stages to train ({', '.join(map(str, ks))}) by one trial epoch each "
         f"on the validation split")  # fmt: skip
    trials = []
    for k in ks:
        trial_cfg = dataclasses.replace(
            cfg, freeze=-(k + 1), unfreeze=None, epochs=1, warmup_epochs=0.0, early_stop=None, final_test=False,
            tensorboard=False, resume=False, out=str(Path(cfg.out) / "auto-trials" / f"last-{k}"),
        )  # fmt: skip
        result = train(trial_cfg, echo=_indented(echo))
        seconds = result.seconds.get("cache", 0.0) + result.seconds.get("epochs", 0.0) - result.seconds.get("val", 0.0)
        epoch_s = result.history[-1].get("epoch_time_s", seconds) if result.history else seconds
        trials.append({"trained_stages": k, "freeze": -(k + 1), "val_acc": result.best_metric, "seconds": seconds,
                       "epoch_s": epoch_s})  # fmt: skip
        echo(f"auto: last {k} stage(s) + head: val acc {_pct(result.best_metric)} after one epoch ({seconds:.1f}s)")
    choice = choose(trials)
    epochs = cfg.epochs
    if budget is not None:
        left = budget - (time.perf_counter() - start)
        epochs = max(1, math.floor(left / max(choice["epoch_s"], 1e-6)))
    why = (f"the fewest trained stages within {100 * TOLERANCE:.1f} points of the best trial "
           f"({_pct(max(t['val_acc'] for t in trials))})")  # fmt: skip
    echo(f"auto: chose to train the last {choice['trained_stages']} stage(s) + head (freeze {choice['freeze']}), "
         f"{epochs} epoch(s): {why}")  # fmt: skip
    return {"procedure": __doc__.split("\n\n", 2)[2].strip(), "trials": trials, "tolerance": TOLERANCE,
            "budget_s": budget, "choice": {**choice, "epochs": epochs, "why": why}}  # fmt: skip


def choose(trials: list[dict]) -> dict:
    """The trial with the fewest trained stages whose validation accuracy is within ``TOLERANCE`` of the best.

    >>> choose([{"trained_stages": 1, "val_acc": 0.80}, {"trained_stages": 2, "val_acc": 0.83},
    ...         {"trained_stages": 3, "val_acc": 0.832}])["trained_stages"]
    2
    """
    scored = [t for t in trials if t["val_acc"] is not None and math.isfinite(t["val_acc"])]
    if not scored:  # no validation data: the middle candidate, the usual best compromise
        return trials[len(trials) // 2]
    best = max(t["val_acc"] for t in scored)
    return min((t for t in scored if t["val_acc"] >= best - TOLERANCE), key=lambda t: t["trained_stages"])


def _trainable_stage_count(cfg: TrainConfig) -> int:
    """Stages of the model before its head (the candidates cannot train more than these)."""
    from freezetune.models import create_model
    from freezetune.stages import stages

    model, _ = create_model(cfg.model, "none", img_size=cfg.img_size)
    return max(1, len(stages(model)) - 1)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _indented(echo: Callable[[str], None]) -> Callable[[str], None]:
    return lambda line: echo("  " + line.replace("\n", "\n  "))
