"""Budget benchmark: does the default command's ``--budget`` hold on a training set larger than it affords?

freezetune's default command (the auto recipe) runs once without a budget (``--epochs``, the baseline of the same
run) and once per ``--budgets`` entry, each in a fresh process, one after the other, on the same data: Fashion-MNIST
(or ``--dataset``) at ``--per-class`` images a class, the full test set. Printed per run: the wall clock of the
``train`` call (what the budget governs: the run's own set-up and its final test of ``best.pt`` on the test set
included, as the user waits for them; not the process start-up), that wall over the budget, the images each epoch
drew, the epochs, the trials that ran, and the final test's accuracy.

    python benchmarks/budget.py                                  # 1000/class (10 000 images), 64 px, 30s,1m,2m
    python benchmarks/budget.py --device cpu --model timm:test_efficientnet --weights none --dataset digits \\
        --per-class 20 --res 32 --budgets 5s --epochs 1             # a quick check
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from _common import (
    MODEL,
    check_dataset,
    dataset_title,
    emit,
    load_data,
    run_worker,
    table,
    work_and_data,
)


def worker(args) -> None:
    from freezetune.auto.recipe import RECIPE_FILE
    from freezetune.config.options import parse_duration
    from freezetune.config.train_config import TrainConfig
    from freezetune.training.trainer import train

    data = load_data(args.data_file)
    budget = None if args.worker == "none" else args.worker
    cfg = TrainConfig(model=args.model, weights=args.weights, img_size=args.res, data=data["data_dir"],
                      per_class=args.per_class, epochs=args.epochs if budget is None else None, budget=budget,
                      device=args.device,
                      out=str(Path(args.work_dir) / f"run-{args.worker}"), tensorboard=False, progress=False)  # fmt: skip
    start = time.perf_counter()
    result = train(cfg, echo=lambda line: print(line, file=sys.stderr))
    wall = time.perf_counter() - start
    decision = json.loads((result.run_dir / RECIPE_FILE).read_text())
    drawn = [round(row["img_per_s"] * row["epoch_time_s"]) for row in result.history]
    emit({"wall": wall, "budget_s": parse_duration(budget), "acc": result.test["acc"],
          "epochs": len(result.history), "images": drawn[0] if drawn else 0, "trials": len(decision["trials"]),
          "planned": (decision.get("pilot") or {}).get("planned")})  # fmt: skip


def report(rows: dict[str, dict]) -> str:
    lines = []
    for name, r in rows.items():
        if "error" in r:
            lines.append([name, "-", "-", "-", "-", "-", r["error"]])
            continue
        over = f"{r['wall'] / r['budget_s']:.2f}" if r["budget_s"] else "-"
        shortened = f" (pilot: {r['planned']:,})" if r["planned"] else ""
        lines.append([name, f"{r['wall']:.1f}", over, f"{r['images']:,}{shortened}", r["epochs"], r["trials"],
                      f"{100 * r['acc']:.2f}"])  # fmt: skip
    return table(lines, ["budget", "train call s", "/ budget", "images an epoch", "epochs", "trials", "test acc %"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--per-class", type=int, default=1000)
    p.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="the epochs of the run without a budget (a budgeted run is "
        "the default command with --budget alone: at most 30 epochs)",
    )
    p.add_argument("--budgets", default="30s,1m,2m", help="comma-separated --budget values, each one run")
    p.add_argument("--no-baseline", action="store_true", help="leave out the run without a budget")
    p.add_argument("--dataset", default="fashion", type=check_dataset, help="as transfer.py's --dataset")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--work-dir", default=None, help="where data, logs and run dirs go (default: a temp dir)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--data-file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    own_dir, data_file, data = work_and_data(args, "ft-budget-")
    print(f"data: {dataset_title(args.dataset)}, {len(data['y_train'])} training images at {args.res} px, "
          f"{len(data['y_test'])} test images; {args.model} on {args.device}, "
          f"{torch.get_num_threads()} threads", flush=True)  # fmt: skip
    forwarded = ["--device", args.device, "--res", str(args.res), "--per-class", str(args.per_class), "--epochs",
                 str(args.epochs), "--model", args.model, "--weights", args.weights, "--data-file", str(data_file),
                 "--work-dir", args.work_dir]  # fmt: skip
    rows = {}
    for name in [*([] if args.no_baseline else ["none"]), *(b.strip() for b in args.budgets.split(",") if b.strip())]:
        rows[name] = run_worker([__file__, "--worker", name, *forwarded], Path(args.work_dir) / f"{name}.log")
        print(f"  {name}: {rows[name]}", flush=True)
    print()
    print(f"budget: the default command, {args.per_class}/class; 'none' trains --epochs {args.epochs}")
    print(report(rows))
    if own_dir and not any("error" in r for r in rows.values()):
        shutil.rmtree(args.work_dir, ignore_errors=True)  # kept when a run failed: its log is there


if __name__ == "__main__":
    main()
