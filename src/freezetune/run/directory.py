"""The run directory: where a run goes, what in it is a run's (started, finished, another's), what a fresh start
clears and a resume needs, and the folders a run may write in. (Compilation, memory layout and memory readings:
``device/hardware.py``.)"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path

from freezetune.data.layout import class_roots
from freezetune.device.distributed import DistInfo, broadcast
from freezetune.errors import CheckpointError, ConfigError, FreezetuneError, setting
from freezetune.run import checkpoint
from freezetune.run import lock as run_lock
from freezetune.run.log import LOG_FILE, RUN_MARK, SWEEP_SETTINGS
from freezetune.run.reporting import METRICS_CSV, REPORT_PNG
from freezetune.run.traces import not_a_runs

CONFUSION_PNG, TEST_METRICS = "confusion.png", "test_metrics.json"  # the final test's
RUN_FILES = (checkpoint.LAST, checkpoint.BEST, METRICS_CSV)
# What a run writes before its first ``last.pt``: cleared when a run that never finished an epoch starts again.
# config.yaml and classes.json stay (the new run rewrites them; a --resume reads config.yaml for its settings).
STARTED_FILES = (checkpoint.BEST, METRICS_CSV, REPORT_PNG, CONFUSION_PNG, TEST_METRICS, "cache")
# What a run writes once its epochs are done: a run stopped before its first last.pt has none of them.
END_FILES = (REPORT_PNG, CONFUSION_PNG, TEST_METRICS)
TENSORBOARD_EVENTS = "events.out.tfevents.*"
SKIPPED = "skipped.txt"  # the image files --skip-bad left out, one path a line
# files a run writes into (replaces, or appends to) and no sign of a run's: where no run was started, they are the user's
NAMED_LIKE_A_RUNS = (LOG_FILE, SKIPPED)
# a recipe's request (and the auto recipe's decision), which its --resume continues; the auto recipe's trials' runs
RECIPE_FILE, TRIALS_DIR = "recipe.json", "auto-trials"
# Signs that a run was started here (a recipe's files included): ``--resume`` of such a dir restarts it.
CONFIG_FILE, CLASSES_FILE = "config.yaml", "classes.json"  # the run's resolved config and class names
# RUN_MARK (run.log) is the first file a run writes in its dir, before classes.json: what marks the dir as a run's,
# where a stop left no config.yaml yet (that is written once the cache is built). A classes.json of class names alone
# is a file many projects keep: taken for a stopped run's, the user's cache/, TensorBoard files and auto-trials/ were
# cleared.
RUN_TRACES = (*STARTED_FILES, CONFIG_FILE, CLASSES_FILE, RECIPE_FILE, TRIALS_DIR)
RUNS_DIR = "runs"  # where a run goes without --out, in the current folder
RESUME_NEEDS = f"{setting('resume', True)} needs the run dir of an existing run, given with {setting('out')}"


def prepare_run_dir(out: str | None, model: str, *, resume: bool, clean: bool = True, recipe_run: bool = False,
                    echo=print) -> Path:  # fmt: skip
    """The run directory: ``out``, or ``runs/MODEL-TIMESTAMP``, always resumable or cleanly restartable.

    A run that finished an epoch (it has ``last.pt``) is refused unless ``resume``. One stopped before that is
    started afresh, with or without ``resume``: what it left (a partial ``metrics.csv``, a ``best.pt`` not yet
    followed by ``last.pt``, a disk cache, an auto recipe's ``recipe.json`` and ``auto-trials/``) is cleared, said in
    one line; ``recipe_run``: a recipe's own run (the auto recipe's final run, whose recipe made those two beside it,
    keeps them; a named recipe's last phase, whose earlier phase's ``last.pt`` is its own, not one to refuse).
    A directory without ``last.pt`` whose files show finished epochs (``finished_work``: its ``last.pt`` deleted) is
    refused, with or without ``resume``: a fresh start would delete them; so is one holding a ``config.yaml`` no run
    wrote (the user's own), which the run's would replace, and an ``out`` that is (or lies below) a file. ``resume``
    without ``out``, or of a directory that does not exist or holds only other files, is refused. Temporary files
    that killed writers left are removed. ``clean``: do the clearing (rank 0 alone under DDP; the other ranks only
    check).

    Not created here: a set-up error (unknown model, bad data path) must not leave an empty run dir behind;
    ``MetricsLogger`` creates it once the model and data are ready.
    """
    from freezetune._io import remove_stale_temps

    check_resume_target(out, resume)
    run_dir = Path(out) if out else new_run_dir(model, claim=clean)
    if clean:  # a second process on this dir is refused before it checks or clears anything (run.lock)
        run_lock.claim(run_dir)
    traces = _check_run_dir(run_dir, resume=resume, recipe_run=recipe_run)
    finished = (run_dir / checkpoint.LAST).is_file()
    if clean and run_dir.is_dir():
        recipe_files = () if recipe_run else (RECIPE_FILE, TRIALS_DIR)  # an earlier auto run's, or a stale decision
        cleared = _clear(run_dir, (*STARTED_FILES, *recipe_files)) if traces else []
        # without --resume, a dir holding only config.yaml and classes.json is no news
        if cleared or (resume and not finished):
            what = f" (cleared {', '.join(cleared)})" if cleared else ""
            echo(f"{run_dir}: the run there stopped before it finished an epoch (no {checkpoint.LAST}): starting it "
                 f"afresh{what}")  # fmt: skip
        remove_stale_temps(run_dir)
    return run_dir


def shared_run_dir(out: str | None, model: str, info: DistInfo, **kwargs) -> Path:
    """``prepare_run_dir`` for every rank of a torchrun job: rank 0 checks and clears, then each rank takes its
    answer, the run dir or the refusal it raised. Ranks that checked beside it read files it was deleting: a re-run of
    an auto run stopped in a trial ended in a gloo traceback in 3 of 5 tries (rank 1 refused, rank 0 waited)."""
    if not info.enabled:
        return prepare_run_dir(out, model, **kwargs)
    answer: object = None
    if info.is_main:
        try:
            answer = prepare_run_dir(out, model, clean=True, **kwargs)
        except BaseException as exc:  # a stop too: the other ranks must not wait in the broadcast
            # what each rank's CLI ends on in one line: the error, a stop (RunInterrupted does not pickle: its
            # arguments are not its message's), else rank 0's failure
            sent = exc if isinstance(exc, (FreezetuneError, OSError)) else KeyboardInterrupt(str(exc)) \
                if isinstance(exc, KeyboardInterrupt) else RuntimeError(f"rank 0: {exc!r}")  # fmt: skip
            broadcast(sent, info)
            raise
    answer = broadcast(answer, info)
    if isinstance(answer, Exception):
        raise answer
    return answer


def check_resume_target(out: str | None, resume: bool) -> None:
    """Refuse ``resume`` without ``out``: the default dir is a new timestamped one, never a run to continue."""
    if resume and not out:
        raise ConfigError(f"nothing to resume: no run dir given; {RESUME_NEEDS}")


def check_folders(out: str | None, cache_dir: str | None, data: tuple[str | None, ...] = ()) -> None:
    """Refuse an ``out`` or ``cache_dir`` that cannot be made a folder, before anything is computed: a cache dir
    that was a file failed with FileExistsError once the feature cache was built. (An existing cache dir that is
    only readable is read: ``read_only_folder``.) Refuse one inside an image folder
    of ``data`` (the training and validation data) that is read for classes: the next run read ``auto-trials/``,
    ``features/`` or ``runs/`` as a class (``data.layout.class_roots``); so is the default ``runs/`` there."""
    given = (("--out", out), ("--cache-dir", cache_dir if not read_only_folder(cache_dir) else None))
    problems = [f"{flag} {path!r}: {problem}" for flag, path in given if path and (problem := folder_problem(path))]
    roots = [root.resolve() for d in data for root in class_roots(d)]
    default = f"the default run dir ({RUNS_DIR}/ in the current folder, as no --out is given)"
    places = [("--out", out or RUNS_DIR, f"--out {out!r}" if out else default)]
    places += [("--cache-dir", cache_dir, f"--cache-dir {cache_dir!r}")] if cache_dir else []
    for flag, path, what in places:
        inside = next((r for r in roots if Path(path).resolve().is_relative_to(r)), None)
        if inside is not None:
            problems.append(f"{what} lies inside the data folder '{inside}', whose folders are read as classes: the "
                            f"run's files would join the data; give {flag} outside it")  # fmt: skip
    if problems:
        raise ConfigError("; ".join(problems))


def read_only_folder(path: str | Path | None) -> bool:
    """Whether ``path`` is an existing folder this process may read but not write: a cache dir shared read-only (a
    team's features on a read-only mount) is read, and the stores a run builds are not kept (``cache.disk.save``).

    >>> read_only_folder(None), read_only_folder("/nonexistent/features")
    (False, False)
    """
    return path is not None and Path(path).is_dir() and os.access(path, os.R_OK | os.X_OK) \
        and not os.access(path, os.W_OK)  # fmt: skip


def folder_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be (made) a folder to write in: it, or a folder above it, is a file, or the nearest one
    that exists is not writable.

    >>> import tempfile; note = Path(tempfile.mkdtemp()) / "note.txt"; _ = note.write_text("mine")
    >>> folder_problem(note / "run") == f"{str(note)!r} is a file, not a directory"
    True
    """
    path = Path(path).absolute()
    there = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())  # a dangling link is in the way
    if not there.is_dir():
        return f"{str(there)!r} is {'a broken link' if not there.exists() else 'a file'}, not a directory"
    if not os.access(there, os.W_OK | os.X_OK):
        return f"{str(there)!r} is not writable" + ("" if there == path else " (where it would be made)")
    return None


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be written as a file (its folders made as needed): it is a folder, or its folder cannot be.

    >>> import tempfile; file_problem(tempfile.mkdtemp()).endswith("is a directory: name a file in it")
    True
    """
    if Path(path).is_dir():
        return f"{str(path)!r} is a directory: name a file in it"
    return folder_problem(Path(path).absolute().parent)


def _check_run_dir(run_dir: Path, *, resume: bool, recipe_run: bool = False) -> list[str]:
    """Refuse what ``prepare_run_dir`` refuses; the traces of a run stopped before its first ``last.pt`` (to clear)."""
    problem = folder_problem(run_dir)
    if problem is not None:
        raise ConfigError(f"--out {str(run_dir)!r} cannot be a run dir: {problem}")
    if (run_dir / SWEEP_SETTINGS).is_file():  # a run's files beside the sweep's: its --resume was refused from then on
        raise ConfigError(f"--out {str(run_dir)!r} holds a sweep ({SWEEP_SETTINGS}), whose recipes each run in a folder "
                          f"of their own below it: choose another {setting('out')}")  # fmt: skip
    if (run_dir / checkpoint.LAST).is_file():
        if not resume:
            existing = [f for f in RUN_FILES if (run_dir / f).exists()]
            raise ConfigError(f"run dir {str(run_dir)!r} already holds a run ({', '.join(existing)}); pass "
                              f"{setting('resume', True)} to continue it or choose another "
                              f"{setting('out')}")  # fmt: skip
        return []
    if not recipe_run and (stopped := stopped_phase(run_dir)):  # its request was cleared, its phase orphaned
        raise ConfigError(f"run dir {str(run_dir)!r} holds a run of recipe {stopped[0]}, stopped in an earlier phase "
                          f"({stopped[1]}): continue it with its own command and {setting('resume', True)}, or "
                          f"choose another {setting('out')}")  # fmt: skip
    if work := finished_work(run_dir):
        raise ConfigError(f"run dir {str(run_dir)!r} holds a run that finished epochs ({work}) but no "
                          f"{checkpoint.LAST} to {'resume' if resume else 'continue'} it from: choose another "
                          f"{setting('out')}, or move those files out of it to start the run there afresh")  # fmt: skip
    traces = [f for f in RUN_TRACES if (run_dir / f).exists()]
    # a run writes classes.json before its config.yaml: alone, this one is the user's; so is one a run cannot have
    # written, beside a classes.json of class names (which a user may keep there too)
    if traces == [CONFIG_FILE] or (CONFIG_FILE in traces and not _config_of_a_run(run_dir / CONFIG_FILE)):
        raise ConfigError(f"--out {str(run_dir)!r} holds a {CONFIG_FILE} that no run wrote (no run was started "
                          f"there), and a run writes its resolved config as {CONFIG_FILE} in its dir: keep your "
                          f"config outside the run dir, or choose another {setting('out')}")  # fmt: skip
    # a run writes its RUN_MARK before anything else in its dir (a recipe, its recipe.json or auto-trials/): files of
    # a run's names without them (a cache/ folder, a metrics.csv, TensorBoard events) are the user's, never cleared
    foreign = [f for f in traces if f != CONFIG_FILE] + [p.name for p in sorted(run_dir.glob(TENSORBOARD_EVENTS))]
    foreign += [f for f in NAMED_LIKE_A_RUNS if (run_dir / f).exists()]
    if foreign and not _started_by_a_run(run_dir):
        listed = _classes_of_a_run(run_dir / CLASSES_FILE)  # the user's own, not taken for a run's
        trial = any(_classes_of_a_run(t / CLASSES_FILE) for t in (run_dir / TRIALS_DIR).glob("*"))
        why = (f"its {CLASSES_FILE} is not a run's, a JSON list of class names" if listed is False else
               f"no {CLASSES_FILE}" if not (listed or trial) else
               f"no {RUN_MARK}, nor a run's {CONFIG_FILE} beside its {CLASSES_FILE}: a run of an earlier freezetune "
               f"stopped before its {CONFIG_FILE} is not told from your own files; delete the folder if it is "
               "one")  # fmt: skip
        raise ConfigError(f"--out {str(run_dir)!r} holds {', '.join(foreign)}, which no run wrote there ({why}), "
                          f"and a run writes files of those names: choose another {setting('out')}, or move them "
                          "out of it")  # fmt: skip
    if foreign := not_a_runs(run_dir, read_json(run_dir / CLASSES_FILE)):  # a user's model beside its class names
        raise ConfigError(f"--out {str(run_dir)!r} holds {', '.join(foreign)}, which no run of its {CLASSES_FILE} "
                          f"wrote, and a run writes files of those names (a restart clears them): choose another "
                          f"{setting('out')}, or move them out of it")  # fmt: skip
    # a run stopped during its set-up leaves its dir empty; a dir that does not exist is more likely a typo
    started = traces or (run_dir / RUN_MARK).is_file() or (run_dir.is_dir() and not any(run_dir.iterdir()))
    if resume and not started:
        what = "does not exist" if not run_dir.exists() else f"holds no run (no {checkpoint.LAST})"
        raise CheckpointError(f"cannot resume: {str(run_dir)!r} {what}; {RESUME_NEEDS}")
    return traces


def _started_by_a_run(run_dir: Path) -> bool:
    """Whether a run was started in ``run_dir``: it holds what a run writes first (``RUN_MARK``; a run of an earlier
    freezetune, which wrote none, its ``classes.json`` of class names with its ``config.yaml``; a recipe's
    ``recipe.json``), or a trial of the auto recipe's does. A file's name alone is not enough: a user's own
    ``classes.json``, a list of class names as a run's, made a run clear their ``cache/``, ``metrics.csv`` and
    TensorBoard files as a stopped run's.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "classes.json").write_text('["cat", "dog"]')
    >>> _started_by_a_run(d)
    False
    >>> _ = (d / RUN_MARK).write_text(""); _started_by_a_run(d)
    True
    """
    if _run_files_in(run_dir):
        return True
    recipe = read_json(run_dir / RECIPE_FILE)
    if isinstance(recipe, dict) and ("recipe" in recipe or "choice" in recipe):  # a named recipe's, the auto one's
        return True
    return any(_run_files_in(trial) for trial in (run_dir / TRIALS_DIR).glob("*"))


def _run_files_in(folder: Path) -> bool:
    """Whether ``folder`` holds a run's mark, or (a run of an earlier freezetune) its class names and config."""
    if (folder / RUN_MARK).is_file():
        return True
    return bool(_classes_of_a_run(folder / CLASSES_FILE)) and _config_of_a_run(folder / CONFIG_FILE)


def stopped_phase(run_dir: Path) -> tuple[str, Path] | None:
    """The named recipe whose run ``run_dir`` holds (its ``recipe.json``), and the ``last.pt`` of an earlier phase of
    it (``lp-ft``'s ``probe/``), when that run stopped before its last phase finished an epoch; else None. The auto
    recipe's trials (``auto-trials/``) are redone, not resumed: they do not count."""
    recipe = read_json(run_dir / RECIPE_FILE)
    if not (isinstance(recipe, dict) and isinstance(recipe.get("recipe"), str)) or (run_dir / checkpoint.LAST).exists():
        return None
    phases = sorted(p / checkpoint.LAST for p in run_dir.iterdir() if p.is_dir() and p.name != TRIALS_DIR)
    last = next((p for p in phases if p.is_file()), None)
    return (recipe["recipe"], last) if last is not None else None


def _config_of_a_run(path: Path) -> bool:
    """Whether ``path`` holds what a run writes there: its resolved config, a mapping of config keys with a model."""
    import yaml

    from freezetune.config.train_config import field_names

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and "model" in config and set(config) <= set(field_names())


def _classes_of_a_run(path: Path) -> bool | None:
    """None without ``path``; whether it holds what a run writes there: a JSON list of class names."""
    if not path.is_file():
        return None
    classes = read_json(path)
    return isinstance(classes, list) and all(isinstance(c, str) for c in classes)


def read_json(path: Path) -> object:
    """What the JSON file ``path`` holds; None when it is missing, unreadable or not JSON (a run's own files, read back:
    ``classes.json``, ``recipe.json``)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not JSON (UnicodeDecodeError is a ValueError)
        return None


def finished_work(run_dir: Path) -> str | None:
    """What in ``run_dir`` (which has no ``last.pt``) shows finished epochs, or None if it may be a run stopped in its
    first epoch, which the same command restarts.

    A run logs an epoch's ``metrics.csv`` row, then writes its ``best.pt``, then its ``last.pt``; it logs no second
    row before its first ``last.pt`` is on disk (``Trainer._run_epoch``). A run stopped before its first ``last.pt``
    thus holds at most one row, no ``best.pt`` without a row, and none of the files a run writes at its end.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "metrics.csv").write_text("epoch,val_acc\\n1,0.5\\n")
    >>> finished_work(d) is None
    True
    >>> _ = (d / "report.png").write_bytes(b"png")
    >>> finished_work(d)
    'metrics.csv: 1 epoch, report.png'
    """
    rows = _metrics_rows(run_dir / METRICS_CSV)
    ended = [f for f in END_FILES if (run_dir / f).exists()]
    orphan_best = rows == 0 and (run_dir / checkpoint.BEST).exists()
    if rows < 2 and not ended and not orphan_best:
        return None
    held = [f"{METRICS_CSV}: {rows} epoch{'s' if rows != 1 else ''}"] if rows else []
    return ", ".join(held + [checkpoint.BEST] * orphan_best + ended)


def _metrics_rows(path: Path) -> int:
    """The epochs ``metrics.csv`` records (a line cut short by a crash counts: its epoch's row had begun)."""
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return max(len(lines) - 1, 0)


def _clear(run_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Delete ``names`` and TensorBoard event files in ``run_dir``; the names of those deleted."""
    left = [run_dir / f for f in names if (run_dir / f).exists()] + sorted(run_dir.glob(TENSORBOARD_EVENTS))
    for path in left:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return [p.name for p in left]


def default_run_dir(model: str) -> Path:
    """``runs/MODEL-YYYYmmdd-HHMMSS``: where a run goes without ``--out``.

    MODEL is the model's name, or the last two parts of an ``hf:`` hub id or folder (``hf:./models/bert/`` made the
    hidden ``runs/._models_bert_-...``, an installed model's folder a name of its whole path).

    >>> str(default_run_dir("timm:resnet50")).startswith("runs/resnet50-")
    True
    >>> str(default_run_dir("hf:./models/bert/")).startswith("runs/models_bert-")
    True
    >>> str(default_run_dir("timm:hf-hub:timm/vit_small_patch16_224")).startswith("runs/timm_vit_small_patch16_224-")
    True
    """
    # ':' too: timm:hf-hub:org/name would name a folder "hf-hub:org_name" (rsync and scp read host:path)
    parts = [p for p in re.split(r"[/\\:]", model.split(":", 1)[-1]) if p not in ("", ".", "..")]
    name = "_".join(parts[-2:]).lstrip(".") or "model"
    return Path(RUNS_DIR) / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def new_run_dir(model: str, *, claim: bool = True) -> Path:
    """A run dir without ``--out`` that no other run has: ``default_run_dir``, or it with ``-2``, ``-3``... when that
    one exists or another process has claimed it (two runs started in one second shared one, both exiting 0).
    ``claim``: hold it for this process (``run.lock.claim``); the other ranks under DDP take rank 0's.

    >>> new_run_dir("timm:resnet50", claim=False).parent
    PosixPath('runs')
    """
    base = default_run_dir(model)
    for n in itertools.count(1):
        run_dir = base.with_name(f"{base.name}-{n}") if n > 1 else base
        if run_dir.exists() or run_dir.is_symlink():
            continue
        try:
            if claim:
                run_lock.claim(run_dir)
        except run_lock.RunDirInUse:
            continue
        return run_dir
    raise AssertionError("unreachable")
