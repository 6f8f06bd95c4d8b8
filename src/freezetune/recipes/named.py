"""Named fine-tuning procedures: what each freezes, in which phases, and the runner that carries them out.

A recipe turns one config into phases, each an ordinary training run. Most recipes are one phase with a freeze spec
and an unfreeze schedule; ``lp-ft`` is two (a probe of the head, then a full fine-tune starting from it, in a
``probe/`` run below the run directory); ``auto`` decides the freeze by measurement first (``freezetune.auto.recipe``).
The last phase's run is the run: its ``best.pt`` and metrics are in ``out``. ``options.RECIPE_HELP`` holds the
one-line description of each.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import yaml

from freezetune.auto.plan import run_bn_stats
from freezetune.config.options import HF_PREFIX, LAST_K, RECIPE_HELP, last_k, recipe_family, recipe_problem
from freezetune.config.train_config import TrainConfig
from freezetune.errors import ConfigError, FreezetuneError, choices

_SINGLE = {  # recipe -> the settings of its one phase
    # the head alone: under bn affine-only (a sweep's --bn) the backbone's BatchNorm trained too, with no cache
    "linear-probe": {"freeze": "backbone", "unfreeze": None, "bn": "frozen"},
    "full": {"freeze": "none", "unfreeze": None},
    "gradual": {"freeze": "backbone", "unfreeze": "epoch:1"},
    "plateau": {"freeze": "backbone", "unfreeze": "plateau:patience=1"},
    "bitfit": {"freeze": "bitfit", "unfreeze": None},
}
# Recipes that fit the head on frozen features first, then open stages under it: under bn_stats "auto" they hold the
# BatchNorm statistics the head was fitted on, as lp-ft's fine-tune and the auto recipe after its probe do. Measured for
# gradual (Fashion-MNIST, CLI, seeds 0 and 1): 20 a class, 64 px, 12 epochs 75.52 / 74.79 % updated, 78.14 / 78.31 %
# held; 100 a class, 6 epochs 83.29 / 82.54 % updated, 85.35 / 84.63 % held. Not plateau: it opens stages late, if at
# all, and held did no better there (73.25 / 73.72 % against 74.47 / 73.98 % at 20 a class; equal at 100)
HOLDS_STATS = ("gradual",)
# the fields each recipe sets itself besides its freeze (``_SINGLE``'s, ``phases``', ``auto.plan.shared_config``): a
# value the user gives for one of them would be replaced silently
_SETS = {**{name: tuple(settings) for name, settings in _SINGLE.items()}, LAST_K: ("freeze", "unfreeze"),
         "lp-ft": ("freeze", "unfreeze", "bn", "bn_stats"), "auto": ("freeze", "cache_at")}  # fmt: skip
PROBE_LR_FACTOR = 10  # a head alone on frozen features takes a larger step than a whole network


@dataclass
class Phase:
    """One training run of a recipe: its name and the config it runs with."""

    name: str
    cfg: TrainConfig


def recipe_of(cfg: TrainConfig) -> str | None:
    """The recipe a config asks for: ``recipe``, ``"auto"`` for ``freeze: auto``, else None (a plain run).

    >>> recipe_of(TrainConfig(data="d")), recipe_of(TrainConfig(data="d", freeze="-3"))
    ('auto', None)
    """
    if cfg.recipe is not None:
        return cfg.recipe
    return "auto" if cfg.freeze == "auto" else None


def phases(cfg: TrainConfig, recipe: str) -> list[Phase]:
    """The training runs of a named recipe other than ``auto`` (which measures first), in order.

    >>> [p.name for p in phases(TrainConfig(data="d", out="runs/x"), "lp-ft")]
    ['probe', 'fine-tune']
    >>> phases(TrainConfig(data="d"), "last-3")[0].cfg.freeze
    -4
    """
    base = dataclasses.replace(cfg, recipe=None)
    if recipe == "linear-probe":  # the step of lp-ft's probe and of the auto recipe's head (it trained 10x slower)
        return [Phase(recipe, dataclasses.replace(base, **_SINGLE[recipe], **probe_lrs(cfg)))]
    if recipe in _SINGLE:
        # (the auto recipe's rule for a run from a head fitted on frozen features: "auto" held, a value given kept)
        held = {"bn_stats": run_bn_stats(base.bn_stats, True)} if recipe in HOLDS_STATS else {}
        return [Phase(recipe, dataclasses.replace(base, **_SINGLE[recipe], **held))]
    if recipe_family(recipe) == LAST_K:
        return [Phase(recipe, dataclasses.replace(base, freeze=-(last_k(recipe) + 1), unfreeze=None))]
    if recipe == "lp-ft":
        out = Path(cfg.out) if cfg.out else None
        # the probe trains the head alone: --decay and --stage-lrs set the fine-tune's lower stages (the probe said
        # they were "not used"), and a head LR they give is the fine-tune's, which the probe's is 10x as for --lr
        probe = dataclasses.replace(base, freeze="backbone", unfreeze=None, bn="frozen", **probe_lrs(cfg),
                                    out=str(out / "probe") if out else None, final_test=False)  # fmt: skip
        # the fine-tune keeps the statistics the probe's head was fitted on (bn_policy.hold_bn_statistics)
        tune = dataclasses.replace(base, freeze="none", unfreeze=None, bn_stats="frozen")
        return [Phase("probe", probe), Phase("fine-tune", tune)]
    raise ConfigError(f"recipe {recipe!r} has no phases here; 'auto' is planned by freezetune.auto.recipe")


def probe_lrs(cfg: TrainConfig) -> dict:
    """The LR settings of a head trained alone (linear-probe, lp-ft's probe): 10x the head's LR in a run of ``cfg``,
    ``--stage-lrs`` naming the head included (it replaced the 10x step, while ``--print-config`` said 10x). The lower
    stages' LRs and ``--decay`` train nothing there."""
    return {"lr": _head_lr(cfg) * PROBE_LR_FACTOR, "stage_lrs": {}, "decay": None}


def _unused_by_the_probe(cfg: TrainConfig) -> str | None:
    """The note a linear probe owes the LR settings it drops (``probe_lrs``): a plain run with the head alone training
    names them as not used, and the recipe's run, given them no more, said nothing."""
    from freezetune.training.param_groups import resolve_stage_lrs

    names = structure_of(cfg)[0]
    lower = [n for n in resolve_stage_lrs(cfg.stage_lrs, list(names)) if n != names[-1]] if cfg.stage_lrs else []
    unused = [*([f"stage_lrs for {choices(lower)}"] if lower else []), *([f"decay {cfg.decay}"] if cfg.decay else [])]
    if not unused:
        return None
    return (f"note: recipe linear-probe trains the head alone, the stages below it frozen: {' and '.join(unused)} "
            f"{'is' if len(unused) == 1 else 'are'} not used")  # fmt: skip


def _head_lr(cfg: TrainConfig) -> float:
    """The head's LR in a run of ``cfg``: ``--lr``, unless ``--stage-lrs`` names the head (or a glob matches it)."""
    if not cfg.stage_lrs:
        return cfg.lr
    from freezetune.training.param_groups import resolve_stage_lrs

    names = structure_of(cfg)[0]
    return resolve_stage_lrs(cfg.stage_lrs, list(names)).get(names[-1], cfg.lr)


def plan_comment(cfg: TrainConfig) -> str:
    """What the recipe ``cfg`` asks for will run, as YAML comment lines ("" for a plain run).

    ``--print-config`` shows the config as given, where a recipe's own settings do not appear yet (``freeze: auto``
    under ``recipe: linear-probe``); these lines say what the recipe sets, and the config stays one that ``--config``
    reads back.

    >>> print(plan_comment(TrainConfig(data="d", recipe="gradual")), end="")
    # recipe gradual: the head first, then one more stage after each epoch (epoch:1 unfreezing)
    #   gradual: freeze 'backbone', unfreeze 'epoch:1', bn_stats 'frozen'
    """
    recipe = recipe_of(cfg)
    if recipe is None or recipe_problem(recipe):
        return ""
    if recipe == "auto":
        return ("# freeze auto: the stages to freeze are measured on the validation split when the run starts "
                "(printed, and written to recipe.json in the run dir)\n")  # fmt: skip
    lines = [f"# recipe {recipe}: {RECIPE_HELP[recipe_family(recipe)]}"]
    for phase in phases(cfg, recipe):
        lr = f", lr {phase.cfg.lr:g}" if phase.cfg.lr != cfg.lr else ""
        unfreeze = f", unfreeze {phase.cfg.unfreeze!r}" if phase.cfg.unfreeze else ""
        stats = f", bn_stats {phase.cfg.bn_stats!r}" if phase.cfg.bn_stats != cfg.bn_stats else ""
        lines.append(f"#   {phase.name}: freeze {phase.cfg.freeze!r}{unfreeze}{lr}{stats}")
    return "\n".join(lines) + "\n"


def conflict_problems(cfg: TrainConfig, typed: Collection[str] = ()) -> list[str]:
    """The options ``cfg`` gives that its recipe sets itself, and a ``budget`` no recipe plans for, each a problem.

    An option counts as given when its value is not the default, or when its name is in ``typed`` (the keys given on
    the command line): ``--recipe full --freeze auto`` asks for the auto recipe's freezing, which is also the default,
    and the recipe would train every layer in silence. A config file's keys are not ``typed``: ``--print-config``
    writes every key, the recipe's included.

    >>> conflict_problems(TrainConfig(recipe="gradual", unfreeze="epoch:2"))
    ["recipe 'gradual' sets unfreeze itself (to 'epoch:1'): give the recipe or unfreeze 'epoch:2', not both"]
    >>> conflict_problems(TrainConfig(recipe="full", freeze="auto"), typed={"recipe", "freeze"})
    ["recipe 'full' sets freeze itself (to 'none'): give the recipe or freeze 'auto', not both"]
    """
    recipe, defaults = recipe_of(cfg), TrainConfig()
    problems = []
    if cfg.budget is not None and recipe != "auto":
        problems.append(f"budget {cfg.budget!r} plans the auto recipe (freeze auto) or a sweep; with "
                        f"{f'recipe {recipe!r}' if recipe else f'freeze {cfg.freeze!r}'} it has no effect")  # fmt: skip
    if recipe is None or recipe_problem(recipe):  # a plain run, or an unknown recipe (reported on its own)
        return problems
    for name in sets(recipe):
        given = getattr(cfg, name)
        if given == getattr(defaults, name) and (name not in typed or given is None):
            continue
        if recipe == "auto" and name == "freeze" and given == "auto":  # --freeze auto asks for the recipe itself
            continue
        own = f" (to {_SINGLE[recipe][name]!r})" if recipe in _SINGLE else ""
        problems.append(f"recipe {recipe!r} sets {name} itself{own}: give the recipe or {name} {given!r}, not both"
                        if cfg.recipe else f"freeze 'auto' (the default) sets {name} itself: {name} {given!r} needs "
                        "a freeze spec or another recipe")  # fmt: skip
    return problems


def sets(recipe: str) -> tuple[str, ...]:
    """The settings ``recipe`` fixes itself, what it freezes included, which a user may not give beside it.

    >>> sets("linear-probe"), sets("last-3")
    (('freeze', 'unfreeze', 'bn'), ('freeze', 'unfreeze'))
    """
    return _SETS[recipe_family(recipe)]


def check_last_k(cfg: TrainConfig, recipe: str) -> None:
    """A ``last-k`` whose k the model's stages cannot give is the user's number, not a freeze spec's stage count."""
    body = structure_of(cfg)[0][:-1]
    if not 1 <= last_k(recipe) <= len(body):
        raise ConfigError(f"recipe {recipe!r}: k is out of range for {cfg.model}, whose {len(body)} stages before the "
                          f"head are {choices(body)}; choose last-1 to last-{len(body)}")  # fmt: skip


def structure_of(cfg: TrainConfig) -> tuple[tuple[str, ...], bool]:
    """``structure`` of ``cfg``'s model; an ``hf:DIR`` whose folder is gone is built from the files a checkpoint of
    the run carries (``carried_hf_files``), as the run's set-up builds it: the resume of a recipe, or a run from an
    ``--init`` of another machine, stopped at "cannot load 'hf:DIR'" before the run could."""
    from freezetune.model import hf_bundle

    model = cfg.model
    if model.startswith(HF_PREFIX) and not os.path.isdir(model.removeprefix(HF_PREFIX)):
        if folder := hf_bundle.rebuilt_folder(model, carried_hf_files(cfg)):
            model = f"{HF_PREFIX}{folder}"
    return structure(model, cfg.img_size)


def carried_hf_files(cfg: TrainConfig) -> dict[str, str] | None:
    """The ``hf:DIR`` files that ``cfg``'s ``--init`` checkpoint carries, else (a resume) the first checkpoint of its
    run directory or of a phase or trial below it that carries them."""
    from freezetune.run import checkpoint

    found = [Path(cfg.init)] if cfg.init else []
    if cfg.resume and cfg.out:
        out = Path(cfg.out)
        found += [out / checkpoint.LAST, out / checkpoint.BEST, *sorted(out.glob(f"*/{checkpoint.LAST}")),
                  *sorted(out.glob(f"*/*/{checkpoint.BEST}"))]  # fmt: skip
    for path in found:
        try:
            files = checkpoint.load(path, mmap=True).get("hf_files") if path.is_file() else None
        except FreezetuneError:  # not a checkpoint: the run's own checks name it
            files = None
        if files:
            return files
    return None


def structure(model_name: str, img_size: int | None) -> tuple[tuple[str, ...], bool]:
    """The stage names of ``model_name`` (the head's last) and whether it is a text model (no image preprocessing).
    Built once a process (random init: the structure only): a sweep checks each ``last-k`` before anything trains,
    ``run`` checks again for its direct callers, and the auto recipe plans its candidates from it. An ``hf:DIR``
    model is built again when its ``config.json`` changed: in a notebook, a folder saved over with a deeper model was
    planned from the first one's stages."""
    from freezetune.data.scan import file_stamp  # (what tells a file from one saved over it)

    folder = model_name.removeprefix(HF_PREFIX) if model_name.startswith(HF_PREFIX) else None
    return _structure(model_name, img_size, file_stamp(os.path.join(folder, "config.json")) if folder else None)


@functools.lru_cache(maxsize=8)
def _structure(model_name: str, img_size: int | None, _stamp: object) -> tuple[tuple[str, ...], bool]:
    from freezetune.model.create import create_model
    from freezetune.model.stages import stages

    model, pre = create_model(model_name, "none", img_size=img_size)
    return tuple(s.name for s in stages(model)), pre is None


structure.cache_clear = _structure.cache_clear  # (tests: a model faked under a name already built)


def check_test_data(cfg: TrainConfig) -> int | None:
    """Check the test split ``cfg``'s run scores at its end (a test folder's images, a text model's ``test.csv``)
    before phases or trials that do not read it: its problems would stop the run only after them. Returns how many
    images (or texts) it holds, None without one."""
    from freezetune.data.layout import check_test_split, split_files
    from freezetune.data.text_table import Columns, text_csv_header

    # a text model's split files: the model is built to tell only where a train.csv names a text column (not beside
    # image folders, as Kaggle's train/, test/ and train.csv)
    columns = Columns.given(cfg.text_column, cfg.label_column)
    splits = split_files(Path(cfg.data))
    text = splits is not None and text_csv_header(splits["train"], columns) is not None
    text_model = text and structure_of(cfg)[1]
    return check_test_split(cfg.data, skip_bad=cfg.skip_bad, text=columns if text_model else None)


def run(cfg: TrainConfig, *, echo: Callable[[str], None] = print, train: Callable | None = None):
    """Carry out the recipe ``cfg`` asks for (see ``recipe_of``) and return the last phase's ``RunResult``, with the
    seconds of every phase (what the recipe cost).

    A later phase starts from the weights of the one before (``init``); a finished phase is not run again, so a
    ``--resume`` of a recipe continues where it stopped.
    """
    from freezetune.training import trainer

    train = train or trainer.train
    recipe = recipe_of(cfg)
    if recipe is None:
        return train(cfg, echo=echo)
    if recipe == "auto":
        from freezetune.auto import recipe as auto

        return auto.run(dataclasses.replace(cfg, recipe=None, freeze="auto"), echo=echo, train=train)
    if recipe_family(recipe) == LAST_K:
        check_last_k(cfg, recipe)
    from freezetune.device.distributed import broadcast, init_from_env, main_echo
    from freezetune.recipes import request as recipe_request
    from freezetune.run import lock as run_lock
    from freezetune.run.directory import new_run_dir, shared_run_dir
    from freezetune.run.log import log_to

    info = init_from_env(cfg.device)
    echo = main_echo(echo, info)  # under torchrun rank 0 says what each phase does, once
    if not cfg.out:  # one run dir for all phases (the earlier ones below it), as --out gives, and its train.log
        cfg = dataclasses.replace(cfg, out=str(broadcast(new_run_dir(cfg.model, claim=info.is_main), info)))
    if info.is_main:  # a process running in it refuses this one before anything below it changes, resume or not
        run_lock.claim(cfg.out)
    existed, steps = Path(cfg.out).exists(), phases(cfg, recipe)
    recipe_request.refuse_another_recipes_run(cfg, recipe)
    if cfg.resume:
        recipe_request.refuse_a_changed_request(cfg, recipe, steps)
        if info.is_main:
            recipe_request.record_longer_request(cfg)
    before: set[str] = set()  # what the run dir held before the request: the user's (a shell's redirect to train.log)
    if not cfg.resume:  # refuse a run dir in use before any phase writes below it (rank 0 alone clears)
        recipe_request.refuse_a_started_phase(cfg, recipe, steps)
        shared_run_dir(cfg.out, cfg.model, info, resume=False, echo=echo)
        before = {p.name for p in Path(cfg.out).iterdir()} if Path(cfg.out).is_dir() else set()
        if info.is_main:  # what was asked, which a --resume with the same command continues (asked_config)
            recipe_request.keep_request(Path(cfg.out), recipe, cfg, steps)
    log_to(cfg.out)  # the phases' lines in the recipe's train.log too (each phase's dir keeps its own)
    try:
        if cfg.final_test:  # the phases before the last do not read the test split: its problems would wait for them
            check_test_data(cfg)
        return _run_phases(cfg, recipe, train, echo)
    except FreezetuneError:
        if info.is_main and not cfg.resume:
            recipe_request.drop_request(Path(cfg.out), existed, before)
        raise


def _run_phases(cfg: TrainConfig, recipe: str, train: Callable, echo: Callable[[str], None]):
    from freezetune.run import checkpoint
    from freezetune.run.log import introduced

    result, steps, spent = None, phases(cfg, recipe), Counter()
    if recipe == "linear-probe" and (note := _unused_by_the_probe(cfg)):
        echo(note)
    for i, phase in enumerate(steps):
        phase_cfg = phase.cfg
        if result is not None:  # start from the previous phase's best weights, head included (as shared_config)
            phase_cfg = dataclasses.replace(phase_cfg, init=os.path.abspath(result.run_dir / checkpoint.BEST))
        line = f"recipe {recipe}: phase {i + 1}/{len(steps)} ({phase.name}): freeze {phase_cfg.freeze!r}"
        # announced at its first line, once set up: a user error found in its set-up is the one line printed
        result = _run_phase(phase_cfg, train, introduced(echo, line), last=i + 1 == len(steps),
                            resolved_auto=recipe in HOLDS_STATS and cfg.bn_stats == "auto")  # fmt: skip
        spent.update(result.seconds)
    # every phase is part of the recipe's cost: the sweep listed lp-ft at its fine-tune's seconds, without the probe
    # (its cache build included) that trained first
    return dataclasses.replace(result, seconds=dict(spent))


def asked_config(run_dir: str | Path) -> dict | None:
    """The config a recipe's run in ``run_dir`` was asked for (its ``recipe.json``), None for a plain run. A run's
    ``config.yaml`` is its last phase's (the auto recipe's choice, a named recipe's freeze filled in): the same
    command with ``--resume`` laid its ``--recipe`` or ``--lr`` over that and was refused; over this, it resumes as
    asked (and an lp-ft stopped in its probe, which has no ``config.yaml`` of its own yet, resumes at all)."""
    from freezetune.run.directory import CONFIG_FILE, RECIPE_FILE

    saved, config = Path(run_dir) / RECIPE_FILE, Path(run_dir) / CONFIG_FILE
    if not saved.is_file():
        return None
    record = json.loads(saved.read_text())
    asked = record.get("asked")  # a recipe.json of an older freezetune has none
    if asked is None or not config.is_file():
        return asked
    try:
        final = record["choice"]["freeze"] if "choice" in record else \
            phases(TrainConfig(**asked), record["recipe"])[-1].cfg.freeze  # fmt: skip
    except (KeyError, TypeError, FreezetuneError):  # a record of another freezetune's making (keys it no longer
        # knows, stages of another model): the run's config.yaml is what there is
        return None
    # a recipe.json an earlier run left, which a run that started there afresh kept (an older freezetune did)
    return asked if (yaml.safe_load(config.read_text()) or {}).get("freeze") == final else None


def _run_phase(cfg: TrainConfig, train: Callable, echo: Callable[[str], None], *, last: bool,
               resolved_auto: bool = False):  # fmt: skip
    """``resolved_auto``: ``cfg.bn_stats`` is the recipe's reading of "auto" (``HOLDS_STATS``)."""
    from freezetune.run import checkpoint
    from freezetune.training.progress import RunResult

    out = Path(cfg.out) if cfg.out else None
    saved_last = out is not None and (out / checkpoint.LAST).is_file()
    done, resume = saved_last and not last, cfg.resume and saved_last
    saved = _saved(out / checkpoint.LAST) if done or (resume and resolved_auto) else None
    if done and saved.epoch >= cfg.epochs:
        echo(f"  already done: {out}")
        # its seconds, as it saved them: a resumed lp-ft's cost counted its fine-tune alone
        return RunResult(out, int(checkpoint.load(out / checkpoint.BEST).get("epoch", 0)), None, seconds=saved.spent)
    if resume and resolved_auto and saved.bn_stats == "auto":
        # a gradual run begun before 2026-12-07 recorded "auto", when it updated the statistics: it goes on as it began
        cfg = dataclasses.replace(cfg, bn_stats="auto")
    # the last phase runs in the recipe's dir: it keeps the recipe.json beside it (any other run clears one)
    return train(dataclasses.replace(cfg, resume=resume), echo=echo, recipe_run=last)


class _Saved(NamedTuple):
    """What ``_run_phase`` reads of a phase's ``last.pt``."""

    epoch: int
    spent: dict[str, float]  # its seconds, by what they were spent on
    bn_stats: object  # the setting it recorded


def _saved(path: Path) -> _Saved:
    """The epoch, the seconds and the bn_stats a phase's ``last.pt`` saved. Read here, the record goes with this frame:
    its tensors map the file, and a mapped file cannot be replaced on Windows, where the phase's resume saving
    ``last.pt`` over it failed (PermissionError)."""
    from freezetune.run import checkpoint

    record = checkpoint.load(path, mmap=True)
    return _Saved(int(record.get("epoch", 0)), dict((record.get("progress") or {}).get("spent") or {}),
                  (record.get("config") or {}).get("bn_stats"))  # fmt: skip
