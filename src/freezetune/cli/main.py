"""The ``freezetune`` command line: parse -> config -> library call. No logic lives only here.

User mistakes (``FreezetuneError``) print one line on stderr and exit with code 2, without a traceback. Defaults come
from ``TrainConfig`` (the one place they live) or, where a command needs another, from a named constant.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import shlex
import signal
import sys
import warnings

from freezetune.cli import exit as cli_exit
from freezetune.cli.args import overrides_anywhere
from freezetune.cli.parser import build_parser
from freezetune.config.file import load_config, parse_overrides, resume_config
from freezetune.config.options import PIL_WARNINGS
from freezetune.config.train_config import TrainConfig, field_names
from freezetune.errors import ConfigError, FreezetuneError
from freezetune.run import log as run_log
from freezetune.run.display import PrintableArgs, printable
from freezetune.run.interrupt import RunInterrupted, forget_stop, pause_point, raised_stop


def _line_buffered(stream) -> None:
    """Each line out as it is printed, where a terminal would not (``nohup ... > log``, ``| tee``): block-buffered,
    a run's log stayed empty until the process ended (``tail -f`` showed nothing; a killed run lost its last lines)."""
    if not stream.isatty() and hasattr(stream, "reconfigure"):
        stream.reconfigure(line_buffering=True)


def _names_printable(handlers: list[logging.Handler]) -> None:
    """A logged line's names (a file's path, a class's) with their control characters shown as escapes: a folder
    named with an ANSI escape recoloured the terminal, one with a newline broke the warning's line."""
    for handler in handlers:
        if not any(isinstance(f, PrintableArgs) for f in handler.filters):
            handler.addFilter(PrintableArgs())


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    first = run_log.first_on_machine()  # under torchrun: one line per machine, not one per process
    args = _parse(parser, argv, first)
    if isinstance(args, int):
        return args
    _line_buffered(sys.stdout)
    streams = cli_exit.guard_output(args.command)
    run_log.command = shlex.join(["freezetune", *argv])  # train.log's header
    level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level if first else logging.ERROR, format=run_log.WARNING_FORMAT)
    _names_printable(logging.getLogger().handlers)
    for message in PIL_WARNINGS:  # PIL's, raw: see data.scan.quiet_pil_warnings (not imported here: PIL is slow)
        warnings.filterwarnings("ignore", message=message)
    forget_stop()  # a stop belongs to the command it stopped
    try:
        if args.command not in ("train", "sweep") and cli_exit.under_torchrun():  # each rank did it all, to one file
            raise ConfigError(f"freezetune {args.command} runs in one process; torchrun is for train and sweep: run "
                              f"'freezetune {args.command} ...' without it")  # fmt: skip
        with cli_exit.stops(args.command):
            return args.func(args) or 0
    # a user error; a full disk, a read-only or vanished run dir (every write is atomic, so nothing is lost)
    except (FreezetuneError, OSError) as exc:
        if isinstance(exc, BrokenPipeError) and cli_exit.reader_gone(sys.stdout):
            return cli_exit.pipe_closed(_saved(args))
        if not first:
            return cli_exit.later_rank(run_log.ending_line(exc), 2)
        print(run_log.ending_line(exc), file=sys.stderr)
        return 2
    except RunInterrupted as exc:  # SIGTERM / SIGINT: the run saved where it stood; 143 / 130 as the shell reports
        return cli_exit.stopped(exc)
    except KeyboardInterrupt:  # Ctrl-C outside a run's own handling: what is saved depends on the command
        saved = _saved(args)
        print(f"freezetune: interrupted{f'; {saved}' if saved else ''}", file=sys.stderr)
        return 130
    except Exception as exc:
        stop = raised_stop()  # what failed after a stop signal failed because of it (workers the signal killed)
        if stop is None and cli_exit.peer_gone(exc, remote_only=first):  # another rank ended: no traceback
            if first:  # (a signal to one later rank alone: that rank's own line is held back, so none said why)
                print(run_log.ending_line(exc), file=sys.stderr)
            return 1
        if stop is None:
            raise
        return cli_exit.stopped(stop)
    finally:
        sys.stdout, sys.stderr = streams
        run_log.command = None  # a later Python-API run in this process (a notebook calling main) was not this


def _saved(args) -> str | None:
    """What a stopped command leaves to go on from (``cli.exit.SAVED``): a sweep stopped before it recorded its
    settings leaves nothing to resume ("--resume continues the sweep" was said, and the resume refused)."""
    if args.command == "sweep":
        from freezetune.recipes.sweep_config import settings_file

        if not settings_file(getattr(args, "out", None)).is_file():
            return "the sweep had recorded nothing yet: the same command starts it"
    return cli_exit.SAVED.get(args.command)


def _parse(parser: argparse.ArgumentParser, argv: list[str], first: bool) -> argparse.Namespace | int:
    """The parsed arguments, or a usage error's exit code; a later torchrun rank holds argparse's line back
    (``cli.exit.later_rank``)."""
    said = io.StringIO()
    try:
        with contextlib.nullcontext() if first else contextlib.redirect_stderr(said):
            args, extra = parser.parse_known_args(argv)
            if not getattr(args, "command", None):  # a usage error, as argparse's own: help on stderr, exit 2
                parser.print_help(sys.stderr)
                return 2 if first else cli_exit.later_rank("", 2)
            overrides_anywhere(args, extra, argv)
    except SystemExit as exc:
        if first or not exc.code:
            raise
        lines = said.getvalue().strip().splitlines()
        return cli_exit.later_rank(lines[-1] if lines else "", 2)
    return args


def run() -> None:
    """The ``freezetune`` command (the console script and ``python -m freezetune``): ``main``, then a quick exit."""
    # a character the terminal cannot encode (a class or folder named in another script on a Windows code page, a
    # Linux file name that is not UTF-8) is printed as its escape, \u9ce5; it stopped predict with a traceback
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors=run_log.ESCAPE)
    try:
        code = main()
    finally:  # also after argparse's own exits (--help, --version, a usage error)
        # The interpreter's exit-time collections walk every object torch, torchvision and timm made: about a second
        # between the last line and the prompt, for objects that die with the process anyway. Not in ``main``: a
        # notebook may call it and go on.
        gc.freeze()
    # A failed run's frames may still hold a loader's workers (a cycle through its error): the exit's multiprocessing
    # handler kills them, and torch's SIGCHLD handler, still installed, printed a traceback after the one line (an
    # image that failed to decode mid-epoch). Nothing loads data from here on; stopping them gracefully took 10 s.
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if cli_exit.under_torchrun():  # a torchrun rank: no interpreter teardown (cli.exit's why)
        cli_exit.end_torchrun_process(code)
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    return build_parser({"train": _cmd_train, "sweep": _cmd_sweep, "eval": _cmd_eval, "predict": _cmd_predict,
                         "inspect": _cmd_inspect, "export": _cmd_export})  # fmt: skip


def _train_config(args, *, run: bool = True) -> TrainConfig:
    """The config of a ``train`` (``run``) or ``sweep`` command: file, then ``key=value`` overrides, then flags."""
    overrides = _given(args)
    base = args.config
    out = overrides.get("out")
    # Resuming: the run's own config (config.file.resume_config), with the flags given now on top. Without --out there
    # is no run to read (a config.yaml in the current directory is not one).
    if base is None and overrides.get("resume") and run:  # a sweep's dir holds runs, not one
        base = resume_config(out, data_given=bool(overrides.get("data")))
    # --print-config shows a config without data too: a template that a run completes with --data
    return load_config(base, overrides, need_data=not args.print_config)


def _given(args) -> dict:
    """The config values given on the command line: ``key=value`` overrides, then flags."""
    given = parse_overrides(args.overrides)
    given.update({k: getattr(args, k) for k in field_names() if getattr(args, k, None) is not None})
    return given


def _cmd_train(args) -> int:
    pause_point("start")  # (tests: a stop before the run handles its own)
    from freezetune.training.trainer import train

    cfg = _train_config(args)
    if args.print_config:
        from freezetune.recipes.named import plan_comment

        return _print_config(cfg.dump() + plan_comment(cfg))
    train(cfg)
    return 0


def _print_config(text: str) -> int:
    """``--print-config``: under torchrun the first process alone prints it (``> run.yaml`` held one copy a rank,
    which ``--config`` then refused for its keys given twice)."""
    if run_log.first_process():
        print(text, end="")
    return 0


def _cmd_sweep(args) -> int:
    pause_point("start")  # (tests: a stop outside the sweep's runs)
    from freezetune.recipes import sweep_config
    from freezetune.recipes.sweep import sweep

    args.overrides, args.recipes = sweep_config.recipes_override(args.overrides, args.recipes)
    given = _given(args)
    sweep_config.refuse_overridden(given)
    # sweep --out S --resume without --config: its own settings and recipes, the flags given now on top
    config = args.config if args.config is not None else sweep_config.resume_settings(given)
    args.config, recipes = sweep_config.request(config, args.recipes)
    problems = []  # --recipes and the config's values, in one message
    try:
        names = sweep_config.recipe_names(recipes)
    except ConfigError as exc:
        problems.append(str(exc))
    try:
        cfg = _train_config(args, run=False)
        sweep_config.refuse_own_freeze(cfg)
    except ConfigError as exc:
        problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(problems))
    if args.print_config:  # what the sweep refuses of its recipes' configs (an option a recipe sets itself), first
        from pathlib import Path

        from freezetune.recipes.sweep import SWEEP_DEFAULT_OUT

        sweep_config.run_configs(cfg, names, Path(cfg.out or SWEEP_DEFAULT_OUT), need_data=False)
        return _print_config(sweep_config.printed(cfg, names))
    sweep(cfg, recipes)
    return 0


def _cmd_eval(args) -> int:
    from freezetune.inference.evaluation import eval_outputs, evaluate_checkpoint
    from freezetune.training.metrics import format_report

    plot = eval_outputs(args.checkpoint, args.data, plot=args.plot, metrics=args.metrics, force=args.force)
    result = evaluate_checkpoint(args.checkpoint, args.data, batch_size=args.batch_size, device=args.device,
                                 workers=args.workers, progress=True, skip_bad=args.skip_bad,
                                 text_column=args.text_column, label_column=args.label_column)  # fmt: skip
    try:  # first: a folder the files cannot go to must not cost the scores
        print(f"scored {result['n']} of {printable(result['data'])}")
        print(format_report(result, result["classes"]))
    except BrokenPipeError:  # `eval ... --metrics m.json | head -1`: the files are what the batch job reads
        if not cli_exit.reader_gone(sys.stdout):
            raise
        _write_evaluation(args, result, plot)
        return cli_exit.pipe_closed(None)
    if _write_evaluation(args, result, plot):
        print(f"confusion matrix -> {plot}" + (f", metrics -> {args.metrics}" if args.metrics else ""))
    return 0


def _write_evaluation(args, result: dict, plot) -> bool:
    """Write eval's files; whether the plot was drawn. A default plot beside a checkpoint in a folder the user cannot
    write is a warning: the scores are out (on a closed pipe too: ``eval ... | head -1``)."""
    from freezetune.inference.evaluation import write_evaluation

    try:
        write_evaluation(result, result["classes"], plot=plot, metrics=args.metrics)
    except OSError as exc:
        if args.plot or exc.filename != str(plot):  # a file asked for by name: the error says why it is not there
            raise
        print(f"freezetune: warning: the confusion matrix was not drawn: {exc.strerror or exc} ({exc.filename}); "
              "--plot PATH puts it elsewhere", file=sys.stderr)  # fmt: skip
        return False
    return True


def _cmd_predict(args) -> int:
    from freezetune.device.memory import out_of_memory_hint
    from freezetune.inference.predict import PredictionPrinter, predict_files

    say = PredictionPrinter("json" if args.json else "jsonl" if args.jsonl else "text")
    try:
        with out_of_memory_hint(args.batch_size, training=False):  # each record is printed as soon as it is scored
            records = predict_files(args.checkpoint, args.images, topk=args.topk, batch_size=args.batch_size,
                                    device=args.device, text_column=args.text_column, progress=True,
                                    on_record=say)  # fmt: skip
    except BaseException:  # Ctrl-C or an error: the records printed so far stay a valid JSON list
        say.end(complete=False)
        raise
    say.end()
    bad = [r for r in records if "error" in r]
    files = len({r["path"] for r in records})  # a text file gives a record per text
    if bad and files > 1:  # every good prediction is out; the count says how many of them were not (one: its line)
        print(f"freezetune: error: {len(bad)} of {files} file(s) could not be read", file=sys.stderr)
    return 2 if bad else 0


def _cmd_inspect(args) -> int:
    from freezetune.model.describe import describe_model

    print(describe_model(args.model, weights=args.weights, freeze=args.freeze, bn=args.bn, img_size=args.img_size,
                         batch_size=args.batch_size, num_classes=args.num_classes, amp=args.amp))  # fmt: skip
    return 0


def _cmd_export(args) -> int:
    from freezetune.inference.export import export_checkpoint

    paths = export_checkpoint(args.checkpoint, args.to, force=args.force)
    print("exported " + " and ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
