"""The auto recipe (``freeze: auto``, the default): decide which stages to freeze by measurement, then fine-tune.

Which block should train depends on the data (surgical fine-tuning, Lee et al. 2023): a small shift is best served
by tuning the last stages over frozen features, a larger one by tuning deeper. The frozen-prefix cache makes it
cheap to ask the data. The procedure, every step printed and written to ``recipe.json`` in the run directory:

1. Candidates: the last ``k`` stages and the head train, for ``k = 1 .. MAX_TRAINED_STAGES`` (fewer on a model with
   fewer stages); everything before is frozen (BatchNorm frozen). All candidates share one feature cache, cut before
   the deepest candidate's first trainable stage: the prefix runs once per image for all of them.
2. Trials: each candidate trains its first epoch of the run (the run's settings and LR schedule) and is scored on
   the validation split. The test split is never looked at.
3. Choice: the cheapest candidate (fewest trainable stages) whose validation accuracy is within ``TOLERANCE`` of the
   best trial: more trainable stages must earn their extra time.
4. The run: the chosen candidate goes on from its trial epoch to the last epoch (no work is thrown away); with
   ``budget`` it stops once the budget cannot pay for another epoch at its measured epoch time. Its files end up
   in the run directory; the trials' metrics stay in ``auto-trials/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from freezetune._io import atomic_write_text
from freezetune.config import TrainConfig
from freezetune.options import parse_duration

MAX_TRAINED_STAGES = 3  # candidates train the last 1, 2 or 3 stages (and the head)
TOLERANCE = 0.005  # validation accuracy within half a point of the best counts as as good
RECIPE_FILE = "recipe.json"
TRIALS_DIR = "auto-trials"


def run(cfg: TrainConfig, *, echo: Callable[[str], None] = print, train: Callable | None = None):
    """Measure, choose, train (see the module docstring); returns the run's ``RunResult`` (in ``cfg.out``)."""
    from freezetune import runtime
    from freezetune.trainer import Trainer

    out = Path(cfg.out) if cfg.out else runtime.default_run_dir(cfg.model)
    saved = out / RECIPE_FILE
    if cfg.resume and saved.is_file():  # the decision was made before the interruption: keep it
        decision = json.loads(saved.read_text())
        echo(f"auto: resuming with the earlier decision: freeze {decision['choice']['freeze']!r}")
        done = (out / "last.pt").is_file()  # the chosen run already moved into out
        base = _base(cfg, out, decision["cut"])
        path = out if done else out / TRIALS_DIR / f"last-{decision['choice']['trained_stages']}"
        winner = Trainer(dataclasses.replace(base, freeze=decision["choice"]["freeze"], out=str(path), resume=True),
                         echo=echo)  # fmt: skip
        return _finish(winner, out, echo) if not done else winner.fit()
    # a run dir in use is refused (or, resuming, one without last.pt) before any trial writes below it
    runtime.prepare_run_dir(str(out), cfg.model, resume=cfg.resume)
    ks, cut = _candidates(cfg)
    base = _base(cfg, out, cut)
    start, trials, trainers = time.perf_counter(), [], {}
    echo(f"auto: choosing how many of the last stages to train ({', '.join(map(str, ks))}) from one trial epoch "
         f"each, scored on the validation split (features cached once, before {cut})")  # fmt: skip
    for k in ks:
        trial_cfg = dataclasses.replace(base, freeze=-(k + 1), out=str(out / TRIALS_DIR / f"last-{k}"))
        trainer = trainers[k] = Trainer(trial_cfg, echo=_indented(echo))
        result = trainer.fit(stop=1)
        trials.append(_trial(k, result))
        echo(f"auto: last {k} stage(s) + head: val acc {_pct(result.best_metric)} after its first epoch "
             f"({trials[-1]['seconds']:.1f}s)")  # fmt: skip
    choice = choose(trials)
    why = (f"the fewest trained stages within {100 * TOLERANCE:.1f} points of the best trial "
           f"({_pct(max((t['val_acc'] or 0) for t in trials))})")  # fmt: skip
    stop = _affordable(cfg, choice, time.perf_counter() - start)
    echo(f"auto: chose to train the last {choice['trained_stages']} stage(s) + head (freeze {choice['freeze']}) for "
         f"{stop} epoch(s): {why}")  # fmt: skip
    decision = {"procedure": __doc__.split("\n\n", 2)[2].strip(), "cut": cut, "trials": trials,
                "tolerance": TOLERANCE, "budget_s": parse_duration(cfg.budget),
                "choice": {**choice, "epochs": stop, "why": why}}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, json.dumps(decision, indent=1))
    for k, trainer in trainers.items():  # the others' weights are not needed; their metrics stay as evidence
        if k != choice["trained_stages"]:
            for name in ("best.pt", "last.pt"):
                (trainer.run_dir / name).unlink(missing_ok=True)
    winner = trainers[choice["trained_stages"]]
    others = [t for k, t in trainers.items() if k != choice["trained_stages"]]
    return _finish(winner, out, echo, stop=stop, others=others)


def _finish(winner, out: Path, echo: Callable[[str], None], stop: int | None = None, others: tuple = ()):
    """The chosen candidate trains on to the end; its files then move into the run directory.

    The result's seconds count every trial (the measurement is part of the training cost); only the validation
    after the decision, which selects the best epoch as in any run, is reported apart as ``val``.
    """
    val_before = winner.seconds["val"]
    result = winner.fit(stop=stop)
    seconds = {key: result.seconds[key] + sum(t.seconds[key] for t in others) for key in ("cache", "epochs")}
    seconds["val"] = result.seconds["val"] - val_before
    if int(os.environ.get("RANK", "0")) == 0:
        for f in winner.run_dir.iterdir():
            if f.is_file():
                os.replace(f, out / f.name)
        winner.cfg.save(out / "config.yaml", out=str(out))
    echo(f"auto: run -> {out}")
    return dataclasses.replace(result, run_dir=out, seconds=seconds)


def _base(cfg: TrainConfig, out: Path, cut: str) -> TrainConfig:
    return dataclasses.replace(cfg, recipe=None, budget=None, resume=False, cache_at=cut,
                               cache_dir=cfg.cache_dir or str(out / "features"))  # fmt: skip


def _candidates(cfg: TrainConfig) -> tuple[list[int], str]:
    """How many last stages each candidate trains, and the stage the shared cache cuts before."""
    from freezetune.models import create_model
    from freezetune.stages import stages

    model, _ = create_model(cfg.model, "none", img_size=cfg.img_size)
    names = [s.name for s in stages(model)]  # the head is last
    ks = list(range(1, min(MAX_TRAINED_STAGES, len(names) - 2) + 1)) or [1]
    return ks, names[-(max(ks) + 1)]


def _trial(k: int, result) -> dict:
    spent = result.seconds
    row = result.history[-1] if result.history else {}
    return {"trained_stages": k, "freeze": -(k + 1), "val_acc": result.best_metric,
            "seconds": spent.get("cache", 0.0) + spent.get("epochs", 0.0),
            "epoch_s": row.get("epoch_time_s", 0.0), "trainable_params": row.get("trainable_params")}  # fmt: skip


def _affordable(cfg: TrainConfig, choice: dict, spent: float) -> int:
    """The epoch the chosen run stops after: the last one, or the last one the budget still pays for."""
    budget = parse_duration(cfg.budget)
    if budget is None:
        return cfg.epochs
    more = math.floor((budget - spent) / max(choice["epoch_s"], 1e-6))
    return max(1, min(cfg.epochs, 1 + more))


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


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _indented(echo: Callable[[str], None]) -> Callable[[str], None]:
    return lambda line: echo("  " + line.replace("\n", "\n  "))
