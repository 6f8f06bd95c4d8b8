"""How the command line's words become a command's arguments, beyond argparse: its usage errors in one line,
``key=value`` overrides anywhere among the flags, and a switch given a value named as such."""

from __future__ import annotations

import argparse
import re
import sys

from freezetune.config.train_config import field_names
from freezetune.config.values import BOOL_WORDS


def overrides_anywhere(args: argparse.Namespace, extra: list[str], argv: list[str]) -> None:
    """``key=value`` overrides after a flag (``epochs=2 --lr 0.5 seed=3``): argparse takes the positionals of one run
    only and leaves the rest unrecognized. Anything else unrecognized is reported under the command's own usage."""
    overrides = [e for e in extra if "=" in e and not e.startswith("-")] if hasattr(args, "overrides") else []
    rest = [e for e in extra if e not in overrides]
    if rest:
        args.command_parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = [*getattr(args, "overrides", []), *overrides]
    for item in args.overrides:
        if "=" not in item:
            _switch_value(args.command_parser, item, argv)


def _switch_value(parser: argparse.ArgumentParser, item: str, argv: list[str]) -> None:
    """A word where a ``key=value`` belongs, right after a switch: ``--progress false`` was refused as "override
    'false' is not key=value" and some forty keys, which never said the switch takes no value."""
    for at in (i for i, word in enumerate(argv) if word == item and i > 0):
        action = _flag_action(parser, argv[at - 1])
        if action is not None and action.nargs == 0:
            flags = " or ".join(action.option_strings)
            override = (f", or the override {action.dest}={item}"
                        if action.dest in field_names() and item.lower() in BOOL_WORDS else "")  # fmt: skip
            parser.error(f"{argv[at - 1]} is a switch and takes no value ({item!r} follows it): give {flags} "
                         f"alone{override}")  # fmt: skip


def _flag_action(parser: argparse.ArgumentParser, word: str) -> argparse.Action | None:
    """The flag ``word`` names, as argparse reads it: whole, or a prefix of one flag alone (``--prog``)."""
    if not word.startswith("-"):
        return None
    actions = parser._option_string_actions  # argparse's own index of its flags
    if word in actions:
        return actions[word]
    matches = {id(a): a for flag, a in actions.items() if flag.startswith("--") and flag.startswith(word)}
    return next(iter(matches.values())) if len(matches) == 1 else None


def path(value: str) -> str:
    """A flag's file or folder: an empty one (``--data "$DATA"`` with ``DATA`` unset) was read as the current
    directory, and recorded as '' for a resume to look for.

    >>> path("runs/a")
    'runs/a'
    """
    if not value.strip():
        raise argparse.ArgumentTypeError(f"empty path {value!r} (an unset shell variable?): give a file or folder")
    return value


class Once(argparse.Action):
    """A flag that reads a file and may be given once: ``--config base.yaml --config over.yaml`` trained with the second
    alone, the first's keys back at their defaults (another model, 10 epochs) without a word."""

    def __call__(self, parser, namespace, values, option_string=None):
        earlier = getattr(namespace, self.dest, None)
        if earlier is not None:
            parser.error(f"{option_string} is given twice ({earlier}, {values}): one file is read; put the keys of "
                         "both in one file, or give the second's as key=value overrides")  # fmt: skip
        setattr(namespace, self.dest, values)


class Parser(argparse.ArgumentParser):
    """argparse's own usage errors (``--epochs 2.5``, a stray argument) in one line, as freezetune's others: the
    usage block it printed first (some 30 lines for ``train``) buried the line that says what is wrong."""

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)  # (error() names a value read as an option)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        # "--budget -1m": argparse reads a value that starts with '-' (and is no plain number) as an option, and said
        # "expected one argument" where the value's own check has a clear line to give (not after a flag whose value
        # is missing: "--out --epochs 2")
        flag = re.fullmatch(r"argument (--[\w-]+)(?:/[\w-]+)*: expected one argument", message)
        argv = getattr(self, "_argv", [])
        if flag and flag.group(1) in argv and (i := argv.index(flag.group(1)) + 1) < len(argv) \
                and argv[i][:1] == "-" and argv[i][1:2] not in ("-", "h", ""):  # fmt: skip
            message += f" ({argv[i]!r} was read as an option: give {flag.group(1)}={argv[i]})"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
