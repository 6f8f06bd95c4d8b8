"""Which epoch should ``best.pt`` keep? Every epoch's test accuracy of the default command, against the epoch each rule
picks from the validation split.

The default command (the auto recipe) holds its validation split out of the images outside the ``--per-class`` subset
(up to 50 a class), so its final run is validated every epoch and ``best.pt`` is one of its epochs. Each run here
scores the weights of every epoch on the test split as well (outside the run: nothing it decides sees them), then
replays the epochs' validation accuracy and loss through ``Progress.update`` under each rule:

- ``highest``: the highest validation accuracy, an exact tie to the lower loss (``Progress`` without the split's size,
  the rule before the fifty-fourth session);
- ``noise-tie`` (the rule now): an accuracy within one standard error of the difference of two accuracies on the
  split (``difference_noise``) of the highest so far ties it, and a tie goes to the lower loss;
- ``last``: the last epoch; ``oracle``: the best test accuracy of any epoch (no rule can know it).

    python benchmarks/best_epoch.py --dataset DIR --per-class 40 --epochs 6 --seeds 0,1,2   # a folder with test/
    python benchmarks/best_epoch.py --per-class 20 --epochs 6 --seeds 0,1,2                  # Fashion-MNIST

Only data with a test split of its own: ``fashion`` (its IDX directory) or a folder with ``train/`` and ``test/``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from _common import FASHION, MODEL, check_dataset, dataset_title, prepare_data, table, test_accuracy
from freezetune.config.train_config import TrainConfig
from freezetune.training import trainer as trainer_module
from freezetune.training.progress import Progress

RULES = ("highest", "noise-tie", "last", "oracle")


def epochs_of_a_run(cfg: TrainConfig, data: dict) -> list[dict]:
    """Train ``cfg``; each epoch of its final run (not the auto recipe's trials): validation accuracy and loss, the
    split's size and the test accuracy of the epoch's weights."""
    rows: list[dict] = []
    real = trainer_module.Trainer._save_and_say

    def scored(self, row: dict, improved: bool) -> None:
        if "auto-trials" not in str(self.run_dir):
            training = self.model.training
            with torch.no_grad():
                test = test_accuracy(self.model, data, torch.device("cpu"))
            self.model.train(training)
            rows.append({"epoch": row["epoch"], "val_acc": row.get("val_acc"), "val_loss": row.get("val_loss"),
                         "n_val": len(self.data.val) if self.data.val is not None else None, "test": test})  # fmt: skip
        return real(self, row, improved)

    trainer_module.Trainer._save_and_say = scored
    try:
        trainer_module.train(cfg, echo=lambda line: None)
    finally:
        trainer_module.Trainer._save_and_say = real
    return rows


def pick(rule: str, epochs: list[dict]) -> dict:
    """The epoch ``rule`` keeps."""
    if rule == "last":
        return epochs[-1]
    if rule == "oracle":
        return max(epochs, key=lambda e: e["test"])
    progress = Progress("val_acc", n_val=epochs[0]["n_val"] if rule == "noise-tie" else None)
    for e in epochs:
        progress.update(e["epoch"] - 1, e["val_acc"], e["val_loss"])
    return epochs[progress.best_epoch - 1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion", type=check_dataset, help="fashion | DIR (train/ and test/)")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args(argv)
    if args.dataset != "fashion" and not (Path(args.dataset) / "test").is_dir():
        raise SystemExit(f"--dataset {args.dataset}: give fashion or a folder with train/ and test/ (a test split of "
                         "its own: the validation split comes from the images outside the subset)")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="ft-best-epoch-"))
    data = prepare_data(work / "data.pt", dataset=args.dataset, per_class=args.per_class, seed=0, res=args.res,
                        test_n=None, model=args.model)  # fmt: skip
    raw = FASHION if args.dataset == "fashion" else args.dataset
    print(f"best_epoch: {args.model} ImageNet -> {dataset_title(args.dataset)}, {args.per_class}/class, {args.res} px, "
          f"{args.epochs} epochs, {len(data['y_test'])} test images; the default command", flush=True)  # fmt: skip
    picked: dict[str, list[float]] = {rule: [] for rule in RULES}
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = TrainConfig(model=args.model, weights="imagenet", img_size=args.res, data=raw, per_class=args.per_class,
                          epochs=args.epochs, device="cpu", out=str(work / f"run-s{seed}"), tensorboard=False,
                          progress=False, seed=seed, final_test=False)  # fmt: skip
        epochs = epochs_of_a_run(cfg, data)
        if not epochs or epochs[0]["val_acc"] is None:
            raise SystemExit("the run kept no validation split (it refit on it): nothing to pick by")
        chosen = {rule: pick(rule, epochs) for rule in RULES}
        for rule, e in chosen.items():
            picked[rule].append(e["test"])
        print(f"seed {seed}, {epochs[0]['n_val']} validation images: "
              + "  ".join(f"e{e['epoch']} val {100 * e['val_acc']:.1f}% / {e['val_loss']:.3f}, test {100 * e['test']:.2f}%"
                          for e in epochs)
              + "; picked " + ", ".join(f"{rule} e{e['epoch']}" for rule, e in chosen.items()), flush=True)  # fmt: skip
    rows = [[rule, f"{100 * statistics.mean(v):.2f}", f"{100 * min(v):.2f}-{100 * max(v):.2f}",
             f"{100 * (statistics.mean(v) - statistics.mean(picked['highest'])):+.2f}"] for rule, v in picked.items()]  # fmt: skip
    print(table(rows, ["rule", "test acc % (mean)", "min-max", "vs highest"]))
    shutil.rmtree(work, ignore_errors=True)  # its runs' folders (each epoch's checkpoints): kept only when it failed


if __name__ == "__main__":
    sys.exit(main())
