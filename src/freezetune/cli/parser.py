"""The ``freezetune`` command line's words: each command's flags, their help (from ``flag_help``, with the choices
and the default of each ``TrainConfig`` field) and the sections ``train --help`` lists them under. What a command
does with them is ``cli.main``'s."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from freezetune import __version__
from freezetune.cli.args import Once, Parser, path
from freezetune.cli.flag_help import FIELD_HELP, SECTIONS
from freezetune.config.options import (
    AMP_MODES,
    FREEZE_DEFAULT,
    RANDOM_WEIGHTS,
    RECIPES,
    SWEEP_CACHE_AT,
    SWEEP_DEFAULT_OUT,
    SWEEP_DEFAULT_RECIPES,
    SWEEP_SETS,
    TOPK,
)
from freezetune.config.train_config import FIELD_CHOICES, TrainConfig, coerce, field_names, scalar_type
from freezetune.config.values import PATH_SETTINGS

_DEFAULTS = TrainConfig()


def build_parser(commands: dict[str, Callable[[argparse.Namespace], int | None]]) -> argparse.ArgumentParser:
    """The ``freezetune`` parser, each command's flags and help; ``commands`` runs each (``cli.main``'s)."""
    parser = Parser(prog="freezetune", description="Fine-tune pretrained models by freezing.")
    parser.add_argument("--version", action="version", version=f"freezetune {__version__}")
    sub = parser.add_subparsers(dest="command")
    _train_parser(sub, commands)
    _eval_parser(sub, commands)
    _predict_parser(sub, commands)
    _inspect_parser(sub, commands)
    p = sub.add_parser("export", help="export a checkpoint to .safetensors (weights), .onnx or .pt2 (graphs), with a "
                                      "JSON sidecar (classes, preprocessing, model)")  # fmt: skip
    p.add_argument("--checkpoint", required=True, type=path, help="a freezetune checkpoint (best.pt)")
    p.add_argument("--to", required=True, type=path,
                   help="the file to write; its suffix picks the format: .safetensors, .onnx (needs the [onnx] extra) "
                        "or .pt2 (torch.export)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=commands["export"], command_parser=p)
    return parser


def _train_parser(sub, commands: dict) -> None:
    p = sub.add_parser("train", help="fine-tune a model")
    _config_flags(p)
    p.set_defaults(func=commands["train"], command_parser=p)
    p = sub.add_parser("sweep", help="compare recipes on the validation split; write the winner as a config")
    p.add_argument("--recipes", default=None,
                   help=f"comma-separated, from {' | '.join(RECIPES)} (or last-K); a --config file's recipes key "
                        f"otherwise [default: {','.join(SWEEP_DEFAULT_RECIPES)}]")  # fmt: skip
    _config_flags(p, _SWEEP_HELP)
    p.set_defaults(func=commands["sweep"], command_parser=p)


# where a sweep's flags mean something else than train's (what it sets itself: options.SWEEP_SETS, with the reason)
_SWEEP_HELP = {
    "out": f"sweep directory, a run per recipe below it [default: {SWEEP_DEFAULT_OUT}]",
    "budget": "wall-clock budget of the sweep: a recipe starts only while it lasts (one running is not cut short; the "
    "auto recipe inside trains --epochs; default: none)",
    "monitor": "what each recipe's best.pt is chosen by; recipes are compared by validation macro-F1 under val_f1, "
    "else by validation accuracy",
    "freeze": "refused but for auto, which changes nothing: each of --recipes sets its own",
    "recipe": "refused but for auto, which changes nothing: give --recipes",
    "cache_at": f"refused: {SWEEP_CACHE_AT}",
    "resume": "continue the interrupted sweep in --out with the settings and recipes it recorded in sweep_config.yaml "
    "(a flag that changes one is refused; a new --budget, --device or --workers is taken and recorded); finished "
    "recipes are read back",
    **{key: f"refused when true: {why}" for key, (_, why) in SWEEP_SETS.items()},
}


def _config_flags(p: argparse.ArgumentParser, overrides: dict[str, str] | None = None) -> None:
    """Every ``TrainConfig`` field as a flag, a ``--config`` file and ``key=value`` overrides (train and sweep, whose
    help differs where ``overrides`` says)."""
    p.add_argument("--config", type=path, action=Once, help="YAML file with the same keys as the flags")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="also log library details (INFO level)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. lr=3e-4")
    group = p
    for name in field_names():
        group = p.add_argument_group(SECTIONS[name]) if name in SECTIONS else group
        flag, kind = "--" + name.replace("_", "-"), scalar_type(name)
        given = (overrides or {}).get(name)  # a sweep's own words; a refused flag takes no choices or default
        text = given if given and given.startswith("refused") else _field_help(name, given)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        # None when not given, so a config file's value is not overwritten by a default. Structured fields (freeze,
        # unfreeze, stage_lrs) stay text here and are parsed by load_config, as YAML and key=value values are.
        kind = path if name in PATH_SETTINGS else kind or str
        group.add_argument(flag, type=kind, default=None, help=text)


def _field_help(name: str, description: str | None = None) -> str:
    """A field's help (``description``, else train's), its choices and its default; a default of None is what the
    help says is decided for you."""
    text = description or FIELD_HELP[name]
    if name in FIELD_CHOICES:
        text += "; one of " + " | ".join(FIELD_CHOICES[name])
    default = getattr(_DEFAULTS, name)
    return text if default is None else f"{text} [default: {_shown(default)}]"


def _shown(value: object) -> str:
    """A default as the flag takes it: ``--progress``'s True is on, ``--stage-lrs``'s {} is none."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value) if value not in ({}, []) else "none"


def _eval_parser(sub, commands: dict) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: loss, top-1/5, per-class accuracy, macro-F1, confusion")
    p.add_argument("--checkpoint", required=True, type=path, help="a run's best.pt or last.pt")
    p.add_argument("--data", required=True, type=path,
                   help="labelled data in a form train's --data takes, scored whole unless split: an IDX "
                        "directory's test split, a folder's test/ (else val/); its classes among the "
                        "run's")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: the run's; predictions do not depend on it, the loss's float rounding may, so at "
                        "the run's, eval of best.pt matches its test_metrics.json to the last digit (eval runs in "
                        "fp32: a run under --amp scored its test in bf16 or fp16)")  # fmt: skip
    p.add_argument("--device", default=_DEFAULTS.device, help=FIELD_HELP["device"])
    p.add_argument("--workers", type=int, default=None, help=FIELD_HELP["workers"])
    p.add_argument("--plot", default=None,
                   help="confusion-matrix image, .png/.pdf/.svg/.jpg (default: next to the checkpoint, "
                        "eval_<data>-<digest of its path>_confusion.png; of another checkpoint than best.pt, "
                        "with its name: ..._last_confusion.png)")  # fmt: skip
    p.add_argument("--metrics", default=None, help="also write every metric as JSON to this file (for batch jobs)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out image files that cannot be read (and a CSV's missing ones), as a run's --skip-bad "
                        "did, rather than refuse the data")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="replace an existing --metrics or --plot file that no evaluation wrote (what eval wrote, it "
                        "replaces anyway)")  # fmt: skip
    p.add_argument("--text-column", help="a text model: the column of the CSV's texts (default: the one it trained on)")
    p.add_argument("--label-column",
                   help="a text model: the column of the CSV's labels (default: the one it trained on)")  # fmt: skip
    p.set_defaults(func=commands["eval"], command_parser=p)


def _predict_parser(sub, commands: dict) -> None:
    p = sub.add_parser("predict", help="top-k classes of images, or of texts for a text model")
    p.add_argument("--checkpoint", required=True, type=path, help="a run's best.pt or last.pt")
    p.add_argument("images", nargs="+", metavar="PATH", type=path,
                   help="image files or folders; for a text model, text files (one text a line), CSVs with a text "
                        "column, or folders of them; - reads standard input: image paths, or a text model's texts, "
                        "one a line")  # fmt: skip
    p.add_argument("--topk", type=int, default=TOPK,
                   help=f"classes listed per image or text, most likely first (default: {TOPK})")  # fmt: skip
    p.add_argument("--text-column", help="a text model: the column of a CSV's texts (default: the one it trained on)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--json", action="store_true", help="print one JSON list of records (path, top: class, prob)")
    how.add_argument("--jsonl", action="store_true", help="print one JSON record a line (JSON Lines)")
    p.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="images or texts per forward pass")
    p.add_argument("--device", default=_DEFAULTS.device, help=FIELD_HELP["device"])
    p.set_defaults(func=commands["predict"], command_parser=p)


def _inspect_parser(sub, commands: dict) -> None:
    p = sub.add_parser("inspect", help="stage table, parameter counts and memory estimate of a model")
    p.add_argument("--model", required=True, help=FIELD_HELP["model"])
    p.add_argument("--weights", default=RANDOM_WEIGHTS[0],
                   help="default random init: the stage table and the estimate do not depend on the "
                        "weights")  # fmt: skip
    p.add_argument("--freeze", default=FREEZE_DEFAULT,
                   help=f"freeze spec to show (default {FREEZE_DEFAULT}: all but the head, what freeze() freezes "
                        f"without a spec; a train run's default is {_DEFAULTS.freeze})")  # fmt: skip
    p.add_argument("--bn", default=_DEFAULTS.bn, help=_field_help("bn"))
    p.add_argument("--img-size", type=int, default=None, help=FIELD_HELP["img_size"])
    p.add_argument("--batch-size", type=_inspect_batch, default=_DEFAULTS.batch_size,
                   help="batch size of the memory estimate, or auto: the one train --batch-size auto picks here "
                        "(measured on a CUDA device) [default: %(default)s]")  # fmt: skip
    p.add_argument("--num-classes", type=int, default=None,
                   help="show the model with a new head of this many classes (default: the model's own "
                        "head)")  # fmt: skip
    p.add_argument("--amp", default=_DEFAULTS.amp,
                   help=f"precision of the memory estimate, {' | '.join(AMP_MODES)} (auto: what train uses on this "
                        "machine)")  # fmt: skip
    p.set_defaults(func=commands["inspect"], command_parser=p)


def _inspect_batch(text: str) -> int | str:
    """``--batch-size``'s number or ``auto``, as train reads it; anything else is named by ``describe_model``."""
    return coerce("batch_size", text)
