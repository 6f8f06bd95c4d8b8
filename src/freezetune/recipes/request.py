"""What a named recipe's run was asked (its ``recipe.json``) and the resumes and restarts that would break it: a
resume with another recipe or freeze, or with settings changed since the request, and a fresh start over a run
stopped in an earlier phase, each refused before anything in the run dir changes. ``recipes.named.run`` keeps the
request and checks it; ``trainer.train`` refuses a plain run's resume of a recipe's run.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from freezetune._io import atomic_write_text
from freezetune.config.train_config import TrainConfig, changed_on_resume, stretchable
from freezetune.config.values import coerce
from freezetune.errors import ConfigError, FreezetuneError, setting
from freezetune.recipes.named import Phase, recipe_of, sets
from freezetune.run import checkpoint
from freezetune.run.directory import CONFIG_FILE, RECIPE_FILE, read_json, stopped_phase
from freezetune.run.log import LOG_FILE
from freezetune.run.reporting import REPORT_PNG


def refuse_a_plain_resume_of_a_recipe(cfg: TrainConfig) -> None:
    """A resume with a freeze spec or another recipe of a run a recipe made (its ``recipe.json``) is refused naming
    the recipe: it listed the final run's own settings (init, refit, the chosen lr, cache_at) as the changes instead.
    The final run's own freeze (a Python caller resuming with the run's ``config.yaml``) resumes as before."""

    saved = Path(cfg.out) / RECIPE_FILE if cfg.out else None
    record = read_json(saved) if saved is not None else None
    if not isinstance(record, dict):
        return
    recipe, wanted = "auto" if "choice" in record else record.get("recipe"), recipe_of(cfg)
    if not recipe or wanted == recipe or (wanted is None and _final_freeze(Path(cfg.out)) == cfg.freeze):
        return  # its own recipe, or the final run's own config (its config.yaml)
    # another recipe listed the final run's settings as changes ("init '.../auto-trials/last-3/best.pt' -> None")
    given = f"freeze {cfg.freeze!r}" if wanted is None else f"recipe {wanted!r}"
    asked = setting("freeze", "auto") if recipe == "auto" else setting("recipe", recipe)
    raise ConfigError(f"cannot resume {cfg.out} with {given}: it holds a run of recipe {recipe!r} ({saved}); give "
                      f"its own command with --resume, {asked}, or start a new run with another "
                      f"{setting('out')}")  # fmt: skip


def _final_freeze(out: Path) -> object:

    try:
        return coerce("freeze", (yaml.safe_load((out / CONFIG_FILE).read_text()) or {}).get("freeze"))
    except (OSError, yaml.YAMLError, FreezetuneError):
        return None


def refuse_another_recipes_run(cfg: TrainConfig, recipe: str) -> None:
    """A run of another named recipe, stopped in an earlier phase, is refused before anything changes: ``--recipe
    full --resume`` in an lp-ft stopped in its probe trained a fresh full run there, after which the lp-ft's own
    ``--resume`` was refused (without ``--resume`` the run dir's own check refuses it:
    ``run.directory.stopped_phase``)."""

    stopped = stopped_phase(Path(cfg.out))
    if cfg.resume and stopped is not None and stopped[0] != recipe:
        raise ConfigError(f"cannot resume {cfg.out!r} with recipe {recipe!r}: it holds a run of recipe {stopped[0]}, "
                          f"stopped in an earlier phase ({stopped[1]}); resume it with its own command "
                          f"({setting('recipe', stopped[0])} {setting('resume', True)}), or choose another "
                          f"{setting('out')}")  # fmt: skip


def refuse_a_changed_request(cfg: TrainConfig, recipe: str, steps: list[Phase]) -> None:
    """A resume that changes what the recipe was asked (its ``recipe.json``) is refused, as a phase's ``last.pt``
    refuses one: a phase not started yet trained the new settings after the finished ones had trained the old (an
    lp-ft resumed between its phases with another --lr fine-tuned at it, and its next plain resume was refused)."""

    record = read_json(Path(cfg.out) / RECIPE_FILE)
    asked = record.get("asked") if isinstance(record, dict) else None
    if not isinstance(asked, dict):  # an older freezetune's record: each phase's last.pt checks its own
        return
    # a phase's last.pt checks moved data against its digest when that phase resumes (a finished one, not resumed,
    # does not; nor does one not yet started)
    moved = any((Path(p.cfg.out) / checkpoint.LAST).is_file() for p in steps)
    # the options the recipe sets itself train alike whatever the request holds (a value given for one is refused:
    # conflict_problems); an earlier freezetune's default there (bn_stats "update") refused its run's every resume
    own = sets(recipe)
    asked = {k: v for k, v in asked.items() if k not in own}
    changed = changed_on_resume(asked, json.loads(json.dumps(cfg.recorded())), moved=moved)
    if changed:
        raise ConfigError(f"cannot resume {cfg.out} with {', '.join(changed)}: a run of recipe {recipe} continues as "
                          f"it was asked; resume with the run's values, or start a new run with another "
                          f"{setting('out')}")  # fmt: skip


def record_longer_request(cfg: TrainConfig) -> None:
    """A resume that trains more epochs (or another warm-up) of a run without an LR schedule, which
    ``refuse_a_changed_request`` lets through, records them in the request: the next plain ``--resume`` reads its
    settings there (``asked_config``), and the epochs first asked were refused below the epochs since trained."""

    saved = Path(cfg.out) / RECIPE_FILE
    record = read_json(saved)
    asked = record.get("asked") if isinstance(record, dict) else None
    if not isinstance(asked, dict):
        return
    now = json.loads(json.dumps(cfg.recorded()))
    longer = {k: now[k] for k in stretchable(asked, now) if k in asked and k in now and asked[k] != now[k]}
    if longer:
        atomic_write_text(saved, json.dumps({**record, "asked": {**asked, **longer}}, indent=1))


def refuse_a_started_phase(cfg: TrainConfig, recipe: str, steps: list[Phase]) -> None:
    """A run of the recipe stopped in an earlier phase (its ``last.pt`` below the run dir) is refused without
    ``resume``, before anything changes: the run dir itself holds no ``last.pt`` yet, so it was taken for a run to
    start afresh, its ``recipe.json`` rewritten with this command's request, and the phase then refused; the
    run's own ``--resume`` was then refused for settings it never changed."""

    if (Path(cfg.out) / checkpoint.LAST).is_file():  # in its last phase or finished: the run dir's own refusal says so
        return

    for i in reversed(range(len(steps) - 1)):  # the latest phase that started
        phase, last = steps[i], Path(steps[i].cfg.out) / checkpoint.LAST
        if last.is_file():  # a phase that finished has plotted its report: the next one stopped in its first epoch
            where = f"in its {phase.name} phase ({last})" if not (last.parent / REPORT_PNG).is_file() else (
                f"in its {steps[i + 1].name} phase, before that finished an epoch (its {phase.name} phase finished: "
                f"{last})")  # fmt: skip
            raise ConfigError(f"run dir {cfg.out!r} already holds a run of recipe {recipe}, stopped {where}; pass "
                              f"{setting('resume', True)} to continue it or choose another {setting('out')}")  # fmt: skip


def drop_request(out: Path, existed: bool, before: set[str]) -> None:
    """A user error before any phase was set up (a run makes its dir only then) leaves no run dir behind: only the
    request is there, with nothing to resume. Once a phase has files, the request stays for ``--resume``. What the
    dir held ``before`` the request stays: a ``train.log`` the user's shell was writing the command's output to was
    deleted, and the error with it."""

    made = {p.name for p in out.iterdir()} - before
    if RECIPE_FILE not in made or not made <= {RECIPE_FILE, LOG_FILE}:
        return
    for name in made:
        (out / name).unlink()
    if not existed and not any(out.iterdir()):
        out.rmdir()


def keep_request(out: Path, recipe: str, cfg: TrainConfig, steps: list[Phase]) -> None:
    """What was asked (``recipe.json``: the recipe, its phases, the config), which a ``--resume`` with the same
    command continues (``recipes.named.asked_config``)."""

    out.mkdir(parents=True, exist_ok=True)
    record = {"recipe": recipe, "phases": [p.name for p in steps], "asked": cfg.recorded()}
    atomic_write_text(out / RECIPE_FILE, json.dumps(record, indent=1))
