"""The ``freezetune`` command line: parse -> config -> library call. No logic lives only here.

User mistakes (``FreezetuneError``) print one line on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from freezetune import __version__
from freezetune.config import TrainConfig, field_names, load_config, parse_override
from freezetune.errors import ConfigError, FreezetuneError

_BOOL_FLAGS = ("channels_last", "compile", "resume", "tensorboard", "progress")
_HELP = {
    "model": "timm:NAME, torchvision:NAME or hf:DIR_OR_ID",
    "weights": "imagenet|default (pretrained; packaged copy used offline), none, or a weights file",
    "data": "image folder (DIR/train/<class>/*), CSV path,label, or IDX directory (MNIST/Fashion-MNIST)",
    "per_class": "few-shot: K seeded training images per class",
    "freeze": "backbone, all, none, N (first N stages, negative ok), stage names or globs, comma-separated",
    "bn": "BatchNorm in frozen parts: frozen (eval stats) | affine | train",
    "unfreeze": "epoch:N | plateau:patience=P,min_delta=D,mode=max",
    "stage_lrs": "per-stage LRs, e.g. 'layer4=1e-4,layer3=5e-5'",
    "decay": "LR of the stage at depth i below the head is lr / decay**i",
    "amp": "auto | bf16 | fp16 | off (auto: bf16/fp16 on CUDA, off on CPU)",
    "cache": "frozen-prefix feature cache: auto | off | memory | disk",
    "out": "run directory (default runs/MODEL-TIMESTAMP)",
    "early_stop": "stop after PATIENCE epochs without improvement of --monitor",
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except FreezetuneError as exc:
        print(f"freezetune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("freezetune: interrupted; last.pt holds the last finished epoch (--resume continues)", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freezetune", description="Fine-tune pretrained models by freezing.")
    parser.add_argument("--version", action="version", version=f"freezetune {__version__}")
    sub = parser.add_subparsers(dest="command")
    _train_parser(sub)
    p = sub.add_parser("eval", help="evaluate a checkpoint: loss, top-1/5, per-class accuracy, macro-F1, confusion")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--plot", default=None, help="confusion-matrix PNG (default: next to the checkpoint)")
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("predict", help="top-k classes of images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_predict)
    p = sub.add_parser("inspect", help="stage table, parameter counts and memory estimate of a model")
    p.add_argument("--model", required=True)
    p.add_argument("--weights", default="none")
    p.add_argument("--freeze", default="backbone")
    p.add_argument("--bn", default="frozen")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=None)
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser("export", help="export a checkpoint's weights to safetensors + JSON sidecar")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--to", required=True)
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_cmd_export)
    return parser


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML file with the same keys as the flags")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. lr=3e-4")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name in _BOOL_FLAGS:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_HELP.get(f.name))
            continue
        kind = str(f.type)
        conv = int if kind.startswith("int") else float if kind.startswith("float") else str
        p.add_argument(flag, type=conv, default=None, help=(_HELP.get(f.name) or "") + f" [default: {default}]")
    p.set_defaults(func=_cmd_train)


def _train_config(args) -> TrainConfig:
    overrides = dict(parse_override(item) for item in args.overrides)
    overrides.update({k: getattr(args, k) for k in field_names() if getattr(args, k, None) is not None})
    base = args.config
    out = overrides.get("out")
    # Resuming: the run's own config, with the flags given now on top. Without --out there is no run to read
    # (a config.yaml in the current directory is not one).
    if base is None and overrides.get("resume") and out and (Path(out) / "config.yaml").is_file():
        base = Path(out) / "config.yaml"
    return load_config(base, overrides)


def _cmd_train(args) -> int:
    from freezetune.trainer import train

    cfg = _train_config(args)
    if args.print_config:
        print(cfg.dump(), end="")
        return 0
    train(cfg)
    return 0


def _cmd_eval(args) -> int:
    from freezetune import checkpoint
    from freezetune.data import build_eval_dataset, build_loader
    from freezetune.evaluate import evaluate
    from freezetune.metrics import format_report, plot_confusion
    from freezetune.precision import resolve_device, resolve_precision

    record = checkpoint.load(args.checkpoint)
    model, pre = checkpoint.build_model(record)
    precision = resolve_precision(resolve_device(args.device))
    model.to(precision.device)
    ds = build_eval_dataset(args.data, preprocess=pre, classes=record["classes"])
    loader = build_loader(ds, batch_size=args.batch_size, train=False, device=str(precision.device))
    result = evaluate(model, loader, precision, num_classes=len(record["classes"]))
    print(format_report(result, record["classes"]))
    plot = Path(args.plot) if args.plot else Path(args.checkpoint).with_name("eval_confusion.png")
    plot_confusion(result, record["classes"], plot)
    print(f"confusion matrix -> {plot}")
    return 0


def _cmd_predict(args) -> int:
    import torch

    from freezetune import checkpoint
    from freezetune.data import eval_transform, list_images, load_image
    from freezetune.evaluate import predict_probs
    from freezetune.precision import resolve_device, resolve_precision

    if args.topk < 1:
        raise ConfigError(f"--topk must be >= 1, got {args.topk}")
    record = checkpoint.load(args.checkpoint)
    model, pre = checkpoint.build_model(record)
    precision = resolve_precision(resolve_device(args.device))
    model.to(precision.device)
    transform, classes = eval_transform(pre), record["classes"]
    results = []
    paths = list_images(args.images)
    for start in range(0, len(paths), 32):
        chunk = paths[start : start + 32]
        probs = predict_probs(model, torch.stack([transform(load_image(p)) for p in chunk]), precision)
        top = probs.topk(min(args.topk, len(classes)), dim=-1)
        for path, values, indices in zip(chunk, top.values, top.indices, strict=True):
            preds = [{"class": classes[i], "prob": round(float(v), 6)} for v, i in zip(values, indices, strict=True)]
            results.append({"path": path, "top": preds})
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(r["path"] + "  " + "  ".join(f"{p['class']} {100 * p['prob']:.1f}%" for p in r["top"]))
    return 0


def _cmd_inspect(args) -> int:
    from freezetune.config import parse_freeze_spec
    from freezetune.freeze import freeze, summary
    from freezetune.memory import estimate_memory, format_memory
    from freezetune.models import create_model
    from freezetune.stages import head_name, replace_head

    model, pre = create_model(args.model, args.weights, img_size=args.img_size)
    if args.num_classes:
        replace_head(model, args.num_classes)
    freeze(model, parse_freeze_spec(args.freeze), bn=args.bn)
    print(f"{args.model}  head: {head_name(model)}  freeze: {args.freeze}  bn: {args.bn}")
    print(summary(model))
    if pre is not None:
        size = pre.input_size
        print(f"input: {size}px mean {tuple(round(m, 3) for m in pre.mean)} std {tuple(round(s, 3) for s in pre.std)}")
        print(format_memory(estimate_memory(model, size, args.batch_size), args.batch_size))
    return 0


def _cmd_export(args) -> int:
    from freezetune.export import export_checkpoint

    paths = export_checkpoint(args.checkpoint, args.to, force=args.force)
    print("exported " + " and ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
