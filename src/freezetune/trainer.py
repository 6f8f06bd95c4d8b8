"""The training engine: pretrained model -> freeze -> new head -> train (progressive unfreezing) -> best checkpoint.

``train(cfg)`` is the whole run; ``Trainer`` exposes its parts for notebooks. Per epoch: train on the trainable
stages, evaluate, step the Unfreezer with the monitored metric, log a row, save ``last.pt`` and maybe ``best.pt``.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from freezetune import checkpoint
from freezetune._io import atomic_write_text
from freezetune.config import TrainConfig, validate
from freezetune.data import DataBundle, build_datasets, build_loader
from freezetune.errors import CheckpointError, ConfigError
from freezetune.evaluate import evaluate, logits_of, to_device
from freezetune.freeze import count_parameters, freeze, summary
from freezetune.metrics import format_report, plot_confusion
from freezetune.models import create_model
from freezetune.optim import build_optimizer, build_scheduler
from freezetune.precision import resolve_device, resolve_precision
from freezetune.reporting import MetricsLogger, format_epoch_line, plot_report
from freezetune.stages import replace_head
from freezetune.unfreeze import Unfreezer

log = logging.getLogger(__name__)
_RUN_FILES = ("last.pt", "best.pt", "metrics.csv")


@dataclass
class RunResult:
    """What a finished run produced: where, the best validation metric, and the test metrics of ``best.pt``."""

    run_dir: Path
    best_epoch: int
    best_metric: float | None
    test: dict | None = None
    history: list[dict] = field(default_factory=list)


def train(cfg: TrainConfig, *, echo=print) -> RunResult:
    """Run a whole fine-tuning job as configured; ``echo`` receives the human-readable log lines.

    >>> from freezetune.config import TrainConfig
    >>> train(TrainConfig(data="DIR_OF_IMAGES", epochs=3))  # doctest: +SKIP
    """
    return Trainer(cfg, echo=echo).fit()


def parse_freeze_spec(text: str | int | list) -> str | int | list:
    """CLI/YAML freeze spec: ``"3"`` -> 3, ``"stem,layer1"`` -> ``["stem", "layer1"]``, else the string.

    >>> parse_freeze_spec("-2"), parse_freeze_spec("stem,layer1"), parse_freeze_spec("backbone")
    (-2, ['stem', 'layer1'], 'backbone')
    """
    if isinstance(text, (int, list)):
        return text
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    items = [int(p) if p.lstrip("-").isdigit() else p for p in parts]
    return items[0] if len(items) == 1 else items


class Trainer:
    """One training run, set up from a validated config (model, data, optimizer, schedules, run directory)."""

    def __init__(self, cfg: TrainConfig, *, echo=print) -> None:
        validate(cfg)
        self.cfg, self.echo = cfg, echo
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(self.device, cfg.amp)
        self.run_dir = _prepare_run_dir(cfg)
        _seed_everything(cfg.seed)
        self.model, self.preprocess = create_model(cfg.model, cfg.weights, img_size=cfg.img_size)
        if self.preprocess is None:
            raise ConfigError(f"{cfg.model} is not an image model; the trainer fine-tunes image classifiers")
        self.data: DataBundle = build_datasets(
            cfg.data, val_data=cfg.val_data, val_split=cfg.val_split, per_class=cfg.per_class,
            seed=cfg.seed, preprocess=self.preprocess, aug=cfg.aug,
        )  # fmt: skip
        self.classes = self.data.classes
        replace_head(self.model, len(self.classes))
        freeze(self.model, parse_freeze_spec(cfg.freeze), bn=cfg.bn)
        self.channels_last = _use_channels_last(cfg, self.model, self.device)
        self.model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.train_loader = self._loader(self.data.train, train=True)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, len(self.train_loader))
        self.unfreezer = self._unfreezer()
        self.scaler = self.precision.scaler()
        self.forward = self._compiled()
        self.start_epoch, self.best_epoch, self.best_metric, self.bad_epochs = 0, 0, None, 0
        self.metrics = MetricsLogger(self.run_dir, tensorboard=cfg.tensorboard)
        if cfg.resume:
            self._resume()
        cfg.save(self.run_dir / "config.yaml")
        atomic_write_text(self.run_dir / "classes.json", json.dumps(self.classes, indent=1))

    # --- set-up helpers -------------------------------------------------------------------------------------

    def _loader(self, dataset, *, train: bool):
        return build_loader(
            dataset, batch_size=self.cfg.batch_size, train=train, workers=self.cfg.workers,
            device=str(self.device), seed=self.cfg.seed,
        )  # fmt: skip

    def _unfreezer(self) -> Unfreezer | None:
        cfg = self.cfg
        if not cfg.unfreeze or cfg.unfreeze == "none":
            return None
        return Unfreezer(
            self.model, self.optimizer, cfg.unfreeze, lr=cfg.lr, stage_lrs=cfg.stage_lrs, decay=cfg.decay,
            bn=cfg.bn, weight_decay=cfg.weight_decay, scheduler=self.scheduler,
        )  # fmt: skip

    def _compiled(self):
        if not self.cfg.compile:
            return self.model
        # Dynamo guards do not cover requires_grad flips (pytorch#139476): after an unfreeze the stale graph would
        # keep the newly trainable weights out of autograd, so _after_unfreeze resets and compiles again.
        return torch.compile(self.model)

    # --- the loop -------------------------------------------------------------------------------------------

    def fit(self) -> RunResult:
        cfg = self.cfg
        trainable, total = count_parameters(self.model)
        self.echo(f"{cfg.model} on {self.precision.describe()}: {len(self.data.train)} train images, "
                  f"{len(self.classes)} classes, {trainable:,}/{total:,} parameters trainable")  # fmt: skip
        self.echo(summary(self.model))
        unfrozen_now = self._unfrozen_before(self.start_epoch)
        for epoch in range(self.start_epoch, cfg.epochs):
            row = self._run_epoch(epoch, unfrozen_now)
            unfrozen_now = self._step_unfreezer(epoch, row)
            improved = self._track_best(epoch, row)
            self._save_last(epoch)
            if improved:
                self._save_best(epoch, row)
            if cfg.early_stop and self.bad_epochs >= cfg.early_stop:
                self.echo(f"early stop: {cfg.monitor} did not improve for {cfg.early_stop} epochs")
                break
        self.metrics.close()
        plot_report(self.run_dir / "metrics.csv", self.run_dir / "report.png")
        test = self._final_test()
        return RunResult(self.run_dir, self.best_epoch, self.best_metric, test, list(self.metrics.rows))

    def _run_epoch(self, epoch: int, unfrozen: str) -> dict:
        _seed_epoch(self.cfg.seed, epoch, self.train_loader)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        train_stats = self._train_epoch(epoch)
        seconds = time.perf_counter() - start
        row = {"epoch": epoch + 1, "epochs": self.cfg.epochs, **train_stats}
        val = self._evaluate(self.data.val) if self.data.val is not None else None
        if val is not None:
            row.update(val_loss=val["loss"], val_acc=val["acc"], val_top5=val["top5"], val_f1=val["macro_f1"])
        trainable, total = count_parameters(self.model)
        row.update({f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)})
        row.update(trainable_params=trainable, total_params=total, epoch_time_s=seconds)
        row.update(img_per_s=train_stats.pop("samples") / max(seconds, 1e-9), peak_mem_mb=_peak_memory_mb(self.device))
        row["unfrozen"] = unfrozen
        self.metrics.log_epoch(row)
        self.echo(format_epoch_line(row))
        return row

    def _train_epoch(self, epoch: int) -> dict:
        self.model.train()
        loss_fn = nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # Running sums stay on the device: reading them every step would sync the GPU each batch.
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False,
                   disable=not self.cfg.progress, dynamic_ncols=True)  # fmt: skip
        start = time.perf_counter()
        for step, (inputs, targets) in enumerate(bar):
            inputs = to_device(inputs, self.device, self.channels_last)
            targets = targets.to(self.device, non_blocking=True)
            with self.precision.autocast():
                logits = logits_of(self.forward(inputs))
                loss = loss_fn(logits.float(), targets)
            self._optimize(loss, params)
            loss_sum += loss.detach() * len(targets)
            correct += (logits.detach().argmax(-1) == targets).sum()
            seen += len(targets)
            if step % 10 == 0 or step == len(self.train_loader) - 1:
                bar.set_postfix(self._postfix(loss_sum, correct, seen, start), refresh=False)
        return {"train_loss": (loss_sum / max(seen, 1)).item(), "train_acc": (correct.float() / max(seen, 1)).item(),
                "samples": seen}  # fmt: skip

    def _optimize(self, loss: torch.Tensor, params: list[nn.Parameter]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()

    def _postfix(self, loss_sum, correct, seen, start) -> dict:
        out = {"loss": f"{loss_sum.item() / max(seen, 1):.3f}", "acc": f"{100 * correct.item() / max(seen, 1):.1f}%",
               "img/s": f"{seen / max(time.perf_counter() - start, 1e-9):.0f}"}  # fmt: skip
        if self.device.type == "cuda":
            out["mem"] = f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.1f}G"
        return out

    def _evaluate(self, dataset) -> dict:
        loader = self._loader(dataset, train=False)
        return evaluate(self.forward, loader, self.precision, num_classes=len(self.classes),
                        channels_last=self.channels_last)  # fmt: skip

    # --- unfreezing, best tracking, checkpoints -------------------------------------------------------------

    def _step_unfreezer(self, epoch: int, row: dict) -> str:
        if self.unfreezer is None:
            return ""
        names = self.unfreezer.step(epoch, _monitored(row, self.cfg.monitor))
        if names:
            self.echo(f"unfroze {', '.join(names)} (trainable {count_parameters(self.model)[0]:,} parameters)")
            self.bad_epochs = 0  # new capacity: give it the full early-stop patience
            if self.cfg.compile:
                torch._dynamo.reset()
                self.forward = torch.compile(self.model)
        return ";".join(names)

    def _unfrozen_before(self, epoch: int) -> str:
        """Stages unfrozen at the end of the previous epoch (non-empty only when resuming right after one)."""
        events = self.unfreezer.events if self.unfreezer is not None else []
        return ";".join(n for e, names in events if e == epoch - 1 for n in names)

    def _track_best(self, epoch: int, row: dict) -> bool:
        metric = _monitored(row, self.cfg.monitor)
        if metric is None:  # no validation data: the latest epoch is the best we know
            self.best_epoch = epoch + 1
            return True
        better = self.best_metric is None or (
            metric > self.best_metric if self.cfg.monitor == "val_acc" else metric < self.best_metric
        )
        if better:
            self.best_metric, self.best_epoch, self.bad_epochs = metric, epoch + 1, 0
        else:
            self.bad_epochs += 1
        return better

    def _record(self) -> dict:
        return checkpoint.model_record(self.model, self.cfg.to_dict(), self.classes, self.preprocess)

    def _save_best(self, epoch: int, row: dict) -> None:
        record = self._record()
        record.update(epoch=epoch + 1, metrics={k: v for k, v in row.items() if isinstance(v, (int, float))})
        checkpoint.save(record, self.run_dir / checkpoint.BEST)

    def _save_last(self, epoch: int) -> None:
        record = self._record()
        record.update(
            epoch=epoch + 1,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            scaler=self.scaler.state_dict(),
            unfreezer=self.unfreezer.state_dict() if self.unfreezer is not None else None,
            best={"epoch": self.best_epoch, "metric": self.best_metric, "bad_epochs": self.bad_epochs},
            rng=checkpoint.rng_state(),
        )
        checkpoint.save(record, self.run_dir / checkpoint.LAST)

    def _resume(self) -> None:
        record = checkpoint.load(self.run_dir / checkpoint.LAST)
        if record.get("model") != self.cfg.model or record.get("classes") != self.classes:
            raise CheckpointError(
                f"{self.run_dir / checkpoint.LAST} is a run of {record.get('model')} on {len(record['classes'])} "
                f"classes; this config is {self.cfg.model} on {len(self.classes)}: resume with the run's own config"
            )
        self.model.load_state_dict(record["state_dict"])
        if self.unfreezer is not None and record.get("unfreezer"):
            self.unfreezer.load_state_dict(record["unfreezer"])  # before the optimizer: re-creates its groups
        self.optimizer.load_state_dict(record["optimizer"])
        if self.scheduler is not None and record.get("scheduler"):
            self.scheduler.load_state_dict(record["scheduler"])
        self.scaler.load_state_dict(record["scaler"])
        checkpoint.set_rng_state(record["rng"])
        best = record["best"]
        self.best_epoch, self.best_metric, self.bad_epochs = best["epoch"], best["metric"], best["bad_epochs"]
        self.start_epoch = int(record["epoch"])
        self.metrics.truncate(self.start_epoch)
        self.forward = self._compiled()
        self.echo(f"resumed {self.run_dir} after epoch {self.start_epoch}")

    def _final_test(self) -> dict | None:
        test = self.data.test
        best_path = self.run_dir / checkpoint.BEST
        if test is None or not best_path.exists():
            return None
        self.model.load_state_dict(checkpoint.load(best_path)["state_dict"])
        result = self._evaluate(test)
        plot_confusion(result, self.classes, self.run_dir / "confusion.png")
        atomic_write_text(self.run_dir / "test_metrics.json", json.dumps(result, indent=1))
        self.echo(format_report(result, self.classes))
        self.echo(f"test accuracy {100 * result['acc']:.2f}% (best.pt, epoch {self.best_epoch}) -> {self.run_dir}")
        return result


def _prepare_run_dir(cfg: TrainConfig) -> Path:
    if cfg.out:
        run_dir = Path(cfg.out)
    else:
        short = cfg.model.split(":")[-1].replace("/", "_")
        run_dir = Path("runs") / f"{short}-{datetime.now():%Y%m%d-%H%M%S}"
    existing = [f for f in _RUN_FILES if (run_dir / f).exists()]
    if cfg.resume and not (run_dir / checkpoint.LAST).exists():
        raise CheckpointError(f"cannot resume: {run_dir / checkpoint.LAST} does not exist")
    if existing and not cfg.resume:
        raise ConfigError(
            f"run dir {str(run_dir)!r} already holds a run ({', '.join(existing)}); "
            "pass --resume to continue it or choose another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _use_channels_last(cfg: TrainConfig, model: nn.Module, device: torch.device) -> bool:
    if cfg.channels_last is not None:
        return cfg.channels_last
    # NHWC lets cuDNN use tensor-core convolutions under AMP; on CPU it brings nothing reliable
    return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def _monitored(row: dict, monitor: str) -> float | None:
    return row.get(monitor)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_epoch(seed: int, epoch: int, loader) -> None:
    # Each epoch's shuffle, augmentation and dropout depend only on (seed, epoch): a resumed run repeats them exactly.
    torch.manual_seed(seed * 100_003 + epoch)
    if getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(seed * 100_003 + epoch)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB; process-wide peak
