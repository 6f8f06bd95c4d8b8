"""How a raw value (YAML, a ``key=value`` override, a CLI flag, a Python argument) becomes a ``TrainConfig`` value:
plain fields convert to their declared type, structured ones (``freeze``, ``unfreeze``, ``stage_lrs``,
``batch_size``) are parsed into their final form. ``freezetune.config.train_config`` re-exports the public names.
"""

from __future__ import annotations

import functools
import os
import re
import types
import typing
from typing import Any

import yaml

from freezetune.errors import ConfigError, shown

_OUTSIDE_BRACKETS = re.compile(r",(?![^\[]*\])")  # a comma not inside a glob's [...]: "layer[1,2]*" is one name


def parse_stage_lrs(text: str | dict | None) -> dict[str, float]:
    """``"layer4=1e-4,layer3=5e-5"`` -> ``{"layer4": 1e-4, "layer3": 5e-5}``; a name may be a glob of stage names.

    >>> parse_stage_lrs("layer4=1e-4,layer3=5e-5")
    {'layer4': 0.0001, 'layer3': 5e-05}
    >>> parse_stage_lrs("blocks.[4,5]=1e-4")
    {'blocks.[4,5]': 0.0001}
    """
    if text is None or (isinstance(text, str) and text.strip().lower() == "none"):  # --help shows the default so
        return {}
    if isinstance(text, dict):
        items = list(text.items())
    else:
        parts = [part.strip() for part in _OUTSIDE_BRACKETS.split(str(text)) if part.strip()]
        for part in parts:
            if "=" not in part:
                raise ConfigError(f"stage_lrs entry {part!r} has no '=': give STAGE=LR (e.g. 'layer4=1e-4')")
        items = [part.partition("=")[::2] for part in parts]
    out = {}
    for name, value in items:
        name = str(name).strip()
        if name in out:  # "layer4=1e-4,layer4=1e-2": the last one won in silence
            raise ConfigError(f"stage_lrs names {name!r} twice; give each stage one LR")
        try:
            if isinstance(value, bool):  # YAML's true: an LR of 1.0 taken in silence
                raise TypeError
            out[name] = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"stage_lrs entry {name}={value!r} is not STAGE=LR (e.g. 'layer4=1e-4')") from None
    return out


@functools.cache
def field_types() -> dict[str, Any]:
    """The resolved type hint of every ``TrainConfig`` field (``"int | None"`` becomes ``int | None``)."""
    from freezetune.config.train_config import TrainConfig  # the fields this module converts values for

    return typing.get_type_hints(TrainConfig)


def scalar_type(name: str) -> type | None:
    """The plain type (int, float, bool or str) a field holds, optional or not; None for structured fields.

    >>> scalar_type("img_size"), scalar_type("channels_last"), scalar_type("stage_lrs")
    (<class 'int'>, <class 'bool'>, None)
    """
    hint = field_types().get(name)
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] if _is_union(hint) else [hint]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (int, float, bool, str) else None


# The settings that name a file or folder. A run records them absolute: its config.yaml and checkpoints are read again
# by a --resume, an eval or a `train --config` that may run from another directory.
PATH_FIELDS = ("data", "val_data", "init", "cache_dir")
# the fields a file or folder goes in (a run dir, a weights file beside the keywords such as "imagenet"): an empty
# one is refused
PATH_SETTINGS = (*PATH_FIELDS, "out", "weights")
# the fields that may hold a path (an hf: folder too): ~ and $VAR are expanded, as a shell does on the command line
# (a config file's "data: ~/fm" was read as a folder "~" in the current directory)
_PATHS = (*PATH_SETTINGS, "model")


def _expanded(value: str) -> str:
    """``value`` with ``~`` and ``$VAR`` expanded; a model name's ``hf:`` folder too (a hub id is left alone).

    >>> _expanded("hf:~/models/bert").startswith("hf:~")
    False
    """
    prefix, sep, rest = value.partition(":")
    if sep and prefix in ("hf", "timm", "torchvision"):
        return f"{prefix}:{_expanded(rest)}" if prefix == "hf" else value
    return os.path.expandvars(os.path.expanduser(value))


def coerce(name: str, value: Any) -> Any:
    """Turn a raw YAML or CLI value of field ``name`` into the value the config holds.

    Plain fields convert to their type (``"3"`` -> 3 for an int); ``freeze``, ``unfreeze`` and ``stage_lrs`` are
    parsed into their final form. None (unset) and unknown keys (reported later, all together) pass through.

    >>> coerce("epochs", "3"), coerce("freeze", "stem,layer1"), coerce("stage_lrs", "layer4=1e-4")
    (3, ['stem', 'layer1'], {'layer4': 0.0001})
    """
    if name in _PARSERS:
        return _PARSERS[name](value)
    if value is None or name not in field_types():
        return value
    if isinstance(value, str) and name in _PATHS:
        return _expanded(value)
    kind = scalar_type(name)
    if kind is None or isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple, dict, set)):  # str() of one a YAML file nested by aliases ran for long
        raise ConfigError(f"{name} expects {type_name(field_types()[name])}, got {shown(value)}")
    word = str(value).strip().lower()
    try:
        if kind is bool and word in BOOL_WORDS:
            return BOOL_WORDS[word]
        if kind is bool or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError  # compile=maybe ran as False, epochs=2.5 as 2
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name} expects {type_name(field_types()[name])}, got {shown(value)}") from None


BOOL_WORDS = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}


def allows_none(hint: Any) -> bool:
    """Whether a field's type hint admits None (the field can be unset).

    >>> allows_none(int | None), allows_none(int)
    (True, False)
    """
    return _is_union(hint) and type(None) in typing.get_args(hint)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def type_name(hint: Any) -> str:
    """A type hint as a user reads it.

    >>> type_name(int | None)
    'int | None'
    """
    if _is_union(hint):
        return " | ".join(type_name(k) for k in typing.get_args(hint))
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def parse_freeze_spec(spec: str | int | list | tuple) -> str | int | list:
    """A freeze spec from the CLI or YAML in its final form; parsing it again changes nothing.

    A comma-separated string or a list becomes a list of names and ints (``"-2"`` -> -2); a single item stays
    itself.

    >>> parse_freeze_spec("-2"), parse_freeze_spec("stem,layer1"), parse_freeze_spec(["stem", "3"])
    (-2, ['stem', 'layer1'], ['stem', 3])
    >>> parse_freeze_spec(parse_freeze_spec("stem,layer1")), parse_freeze_spec("backbone")
    (['stem', 'layer1'], 'backbone')
    >>> parse_freeze_spec("layer[1,2]*,stem")  # a glob's character set keeps its commas
    ['layer[1,2]*', 'stem']
    """
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    tokens: list[str | int] = []
    for item in items:
        if isinstance(item, bool):  # an int to Python: YAML's false froze stage 0 and the rest on either side of it
            from freezetune.config.options import FREEZE_KEYWORDS

            raise ConfigError(f"freeze {spec!r} is not a freeze spec: give a stage count (-3: all but the last 3 "
                              f"stages and the head), stage names or globs, or one of: "
                              f"{', '.join(map(repr, ('auto', *FREEZE_KEYWORDS)))}")  # fmt: skip
        if isinstance(item, int):
            tokens.append(item)
            continue
        parts = [p.strip() for p in _OUTSIDE_BRACKETS.split(str(item)) if p.strip()]
        tokens += [int(p) if p.lstrip("-").isdigit() else p for p in parts]
    return tokens[0] if len(tokens) == 1 else tokens


def _parse_freeze(value: Any) -> str | int | list | None:
    return None if value is None else parse_freeze_spec(value)


def _parse_batch_size(value: Any) -> int | str | None:
    # "64" (or "-1": then "must be >= 1") from the command line is a number; "auto" stays a word; anything else is
    # left for validate to report
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return value
    return value


class UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: the last one won, silently (``epochs: 1`` then,
    further down, ``epochs: 2`` trained 2; ``--unfreeze "{1: layer4, 1: layer3}"`` opened layer3 alone).

    Plain values are read as YAML 1.2 reads them, not PyYAML's 1.1: only true and false are booleans (``amp: off``,
    ``cache: off``, ``frozen_dropout: off`` had been read as False and refused as "expects str"), ``seed: 010`` is
    10 (not octal 8), ``budget: 1:30`` is the text it looks like (not sexagesimal 90) and ``lr: 1e-3`` a number.

    >>> yaml.load("[off, yes, true, 010, 1:30, 1e-3, 0x10, .inf]", Loader=UniqueKeys)  # noqa: S506
    ['off', 'yes', True, 10, '1:30', 0.001, 16, inf]
    """

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults": the keys it brings may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line, where = key_node.start_mark.line + 1, key_node.start_mark
            try:
                hash(key)
            except TypeError:  # "? [a, b]": the loader's own one-line refusal, not a TypeError's traceback
                raise yaml.constructor.ConstructorError(None, None, "found an unhashable key", where) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice (lines {seen[key]} "
                                                        f"and {line}): keep one", where)  # fmt: skip
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    base = {"0o": 8, "0x": 16}.get(digits[:2].lower(), 10)
    return sign * int(digits[2:] if base != 10 else digits, base)


_YAML12_TYPES = {  # YAML 1.2's core schema: its regular expressions, and the characters a value of each starts with
    "tag:yaml.org,2002:bool": (r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    "tag:yaml.org,2002:int": (r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    "tag:yaml.org,2002:float": (
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+.0123456789",
    ),
}
# PyYAML's resolvers, less its YAML 1.1 booleans and numbers (a class's resolvers are shared lists: built anew here)
UniqueKeys.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _YAML12_TYPES]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
UniqueKeys.add_constructor("tag:yaml.org,2002:int", _yaml12_int)


class _Quoting(yaml.SafeDumper):
    """YAML's safe dumper, quoting a string that YAML 1.1 or 1.2 would read as another type: PyYAML's quoted by 1.1
    alone, and ``text_column: 1e3`` read back (``UniqueKeys``, 1.2) as 1000.0."""


for _tag, (_pattern, _first) in _YAML12_TYPES.items():  # what the loader reads as a type, the dumper quotes
    for _resolving in (UniqueKeys, _Quoting):
        _resolving.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def dump_yaml(values: dict[str, Any]) -> str:
    """``values`` as YAML, in their order, read back the same by ``UniqueKeys`` and by PyYAML's ``safe_load``.

    >>> dump_yaml({"text_column": "1e3", "amp": "off", "lr": 0.001})
    "text_column: '1e3'\\namp: 'off'\\nlr: 0.001\\n"
    """
    return yaml.dump(values, Dumper=_Quoting, sort_keys=False)


def _parse_unfreeze(value: Any) -> str | dict | None:
    # the --unfreeze flag's "{1: blocks.6}" is the mapping YAML and key=value read: read it the same way
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            return yaml.load(value, Loader=UniqueKeys)  # noqa: S506 - a SafeLoader
        except yaml.constructor.ConstructorError as exc:  # a key given twice
            raise ConfigError(f"unfreeze {value!r}: {exc.problem}") from None
        except yaml.YAMLError:
            return value  # validate reports it with the schedule forms
    return value if value is None or isinstance(value, dict) else str(value)


# Structured fields: parsed, not converted; each parser takes None (unset) too.
_PARSERS = {
    "batch_size": _parse_batch_size,
    "freeze": _parse_freeze,
    "unfreeze": _parse_unfreeze,
    "stage_lrs": parse_stage_lrs,
}
