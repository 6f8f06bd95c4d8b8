"""Frozen-dropout benchmark: does running the frozen stages' drop path as at inference (``--frozen-dropout off``, which
lets the feature cache hold them) cost accuracy against drawing it as built (``keep``, the default), and what does it
save?

torchvision's EfficientNet, ConvNeXt, Swin and MaxViT ship with stochastic depth on (EfficientNet-B0: 0.2), and no
packaged weights of theirs are at hand offline; the packaged ImageNet EfficientNet-Lite0 is built here with timm's
``drop_path_rate`` (0.2 by default, as B0's), the same weights either way. Each run is the default command (the auto
recipe: its trials, then the run it picks) on Fashion-MNIST (or ``--dataset``) at ``--per-class`` images a class,
in a fresh process, one after the other, both policies per seed; scored on the full test set (``best.pt``, what
``predict`` uses). Printed per policy: the test accuracy's mean over seeds (min and max), the median training
seconds (the trials and the cache included, validation not), the stages the auto recipe trained.

    python benchmarks/frozen_dropout.py                      # 100/class, 64 px, 3 epochs, seeds 0,1,2
    python benchmarks/frozen_dropout.py --dataset digits --per-class 50
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from _common import (
    MODEL,
    check_dataset,
    dataset_title,
    emit,
    load_data,
    pick_device,
    run_worker,
    table,
    test_accuracy,
    work_and_data,
)

POLICIES = ("off", "keep")


def worker(args) -> None:
    import timm

    from freezetune.auto.recipe import RECIPE_FILE
    from freezetune.config.train_config import TrainConfig
    from freezetune.run import checkpoint
    from freezetune.training.trainer import train

    made = timm.create_model

    def with_drop_path(*a, **kw):  # this worker's process alone: every timm model it builds draws drop path
        return made(*a, **{"drop_path_rate": args.drop_path, **kw})

    timm.create_model = with_drop_path
    data = load_data(args.data_file)
    cfg = TrainConfig(model=MODEL, weights="imagenet", img_size=args.res, data=data["data_dir"],
                      per_class=args.per_class, epochs=args.epochs, device=args.device, seed=args.seed,
                      frozen_dropout=args.worker, out=str(Path(args.work_dir) / f"run-{args.worker}-{args.seed}"),
                      tensorboard=False, progress=False, final_test=False)  # fmt: skip
    result = train(cfg, echo=lambda line: print(line, file=sys.stderr))
    model, _ = checkpoint.build_model(checkpoint.load(result.run_dir / checkpoint.BEST))
    choice = json.loads((result.run_dir / RECIPE_FILE).read_text()).get("choice") or {}
    emit({"acc": test_accuracy(model, data, pick_device(args.device)), "seconds": result.train_seconds,
          "cache": result.seconds["cache"], "trained": choice.get("trained_stages")})  # fmt: skip


def report(runs: dict[str, list[dict]]) -> str:
    rows = []
    for policy, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows.append([policy, "-", "-", "-", "-", rs[0]["error"] if rs else "no run"])
            continue
        accs = [100 * r["acc"] for r in ok]
        rows.append([policy, f"{statistics.mean(accs):.2f} ({min(accs):.2f}-{max(accs):.2f})",
                     f"{statistics.median(r['seconds'] for r in ok):.1f}",
                     f"{statistics.median(r['cache'] for r in ok):.1f}",
                     ",".join(str(r["trained"]) for r in ok), f"{len(ok)} seeds"])  # fmt: skip
    return table(rows, ["--frozen-dropout", "test acc % mean (min-max)", "train s", "cache s", "stages trained", ""])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--drop-path", type=float, default=0.2, help="timm's drop_path_rate of the model (B0's: 0.2)")
    p.add_argument("--dataset", default="fashion", type=check_dataset, help="as transfer.py's --dataset")
    p.add_argument("--work-dir", default=None, help="where data, logs and run dirs go (default: a temp dir)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--data-file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    own_dir, data_file, data = work_and_data(args, "ft-dropout-")
    print(f"data: {dataset_title(args.dataset)}, {len(data['y_train'])} training images at {args.res} px, "
          f"{len(data['y_test'])} test images; {MODEL} with drop path {args.drop_path} on {args.device}, "
          f"{args.epochs} epochs", flush=True)  # fmt: skip
    forwarded = ["--device", args.device, "--res", str(args.res), "--per-class", str(args.per_class), "--epochs",
                 str(args.epochs), "--drop-path", str(args.drop_path), "--data-file", str(data_file),
                 "--work-dir", args.work_dir]  # fmt: skip
    runs: dict[str, list[dict]] = {policy: [] for policy in POLICIES}
    for seed in (int(s) for s in args.seeds.split(",")):
        for policy in POLICIES:  # both policies of a seed back to back: a neighbour's burst hits both
            log = Path(args.work_dir) / f"{policy}-{seed}.log"
            runs[policy].append(run_worker([__file__, "--worker", policy, "--seed", str(seed), *forwarded], log))
            print(f"  {policy} seed {seed}: {runs[policy][-1]}", flush=True)
    print()
    print(report(runs))
    if own_dir and not any("error" in r for rs in runs.values() for r in rs):
        shutil.rmtree(args.work_dir, ignore_errors=True)  # kept when a run failed: its log is there


if __name__ == "__main__":
    main()
