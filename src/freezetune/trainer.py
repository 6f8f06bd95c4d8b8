"""The training engine: pretrained model -> freeze -> new head -> train (progressive unfreezing) -> best checkpoint.

``train(cfg)`` is the whole run; ``Trainer`` exposes its parts for notebooks. Per epoch: train on the trainable
stages, evaluate, step the Unfreezer with the monitored metric, log a row, save ``last.pt`` and maybe ``best.pt``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from freezetune import checkpoint
from freezetune._io import atomic_write_text
from freezetune.cache import FeatureStore, build_store, store_loader
from freezetune.config import TrainConfig, parse_freeze_spec, validate
from freezetune.data import DataBundle, build_datasets, build_loader
from freezetune.data.gpu import build_device_loader, should_use_device_loader
from freezetune.distributed import (
    all_reduce_sum,
    barrier,
    broadcast,
    device_for,
    init_from_env,
    shard_rows,
    shard_sampler,
    sharded_loader,
    shutdown,
    wrap,
)
from freezetune.errors import ConfigError
from freezetune.evaluate import evaluate, logits_of, to_device
from freezetune.freeze import count_parameters, freeze, summary
from freezetune.metrics import format_report, plot_confusion
from freezetune.models import create_model
from freezetune.optim import build_optimizer, build_scheduler
from freezetune.precision import resolve_device, resolve_precision
from freezetune.reporting import MetricsLogger, NullMetricsLogger, format_epoch_line, plot_report
from freezetune.runtime import (
    peak_memory_mb,
    prepare_run_dir,
    recompile,
    seed_epoch,
    seed_everything,
    use_channels_last,
)
from freezetune.split import Split, split_model
from freezetune.stages import replace_head
from freezetune.unfreezing import Unfreezer

log = logging.getLogger(__name__)


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
    trainer = Trainer(cfg, echo=echo)
    try:
        return trainer.fit()
    finally:
        shutdown(trainer.dist)


class Trainer:
    """One training run, set up from a validated config (model, data, optimizer, schedules, run directory)."""

    def __init__(self, cfg: TrainConfig, *, echo=print) -> None:
        validate(cfg)
        self.dist = init_from_env(cfg.device)
        self.cfg, self.echo = cfg, echo if self.dist.is_main else _quiet
        self.device = resolve_device(device_for(self.dist, cfg.device))
        self.precision = resolve_precision(self.device, cfg.amp)
        self.run_dir = prepare_run_dir(cfg)
        barrier(self.dist)  # every rank checked the run dir before rank 0 writes into it
        seed_everything(cfg.seed)
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
        self.channels_last = use_channels_last(cfg, self.model, self.device)
        self.model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.train_loader = self._loader(self.data.train, train=True)
        self._val_loader = None  # built on first use, then kept
        self.optimizer = build_optimizer(self.model, cfg)
        self.steps_per_epoch = len(self.train_loader)  # what the LR schedule was sized for (a cache keeps it)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.unfreezer = self._unfreezer()
        self.scaler = self.precision.scaler()
        self.forward = self.model
        self.start_epoch, self.best_epoch, self.best_metric, self.bad_epochs = 0, 0, None, 0
        self.metrics = (
            MetricsLogger(self.run_dir, tensorboard=cfg.tensorboard) if self.dist.is_main else NullMetricsLogger()
        )
        if cfg.resume:
            checkpoint.restore(self)
        self.cache: _Cache | None = None
        self._setup_cache()
        if self.dist.is_main:
            cfg.save(self.run_dir / "config.yaml")
            atomic_write_text(self.run_dir / "classes.json", json.dumps(self.classes, indent=1))

    # --- set-up helpers -------------------------------------------------------------------------------------

    def _loader(self, dataset, *, train: bool):
        """Images to batches: on the device (uint8 arrays / nvJPEG + batched augmentation) when it applies."""
        shard = self.dist.enabled and train  # DDP: each rank trains on its 1/world of every epoch
        if should_use_device_loader(dataset, self.device, self.cfg.decode):
            loader = build_device_loader(
                dataset, batch_size=self.cfg.batch_size, train=train, device=self.device, seed=self.cfg.seed,
                preprocess=self.preprocess, aug=self.cfg.aug if train else "none",
                sampler=shard_sampler(len(dataset), self.dist, self.cfg.seed) if shard else None,
            )  # fmt: skip
            if loader is not None:
                return loader
        if shard:
            workers = self.cfg.workers if self.cfg.workers is not None else (4 if self.device.type == "cuda" else 0)
            return sharded_loader(dataset, batch_size=self.cfg.batch_size, info=self.dist, seed=self.cfg.seed,
                                  workers=workers, device=self.device)  # fmt: skip
        return build_loader(
            dataset, batch_size=self.cfg.batch_size, train=train, workers=self.cfg.workers,
            device=str(self.device), seed=self.cfg.seed,
        )  # fmt: skip

    def _setup_cache(self) -> None:
        """Cache the frozen prefix's features when the config allows and the model splits (else say why not), then
        set what each step runs: the suffix on cached features, else the model; DDP-wrapped (DDP fixes its parameter
        set when it wraps, so this runs again after every unfreeze) and compiled when asked."""
        if self.cache is not None:  # an unfreeze invalidated the cache: back to images unless a new one is built
            self.train_loader = self._loader(self.data.train, train=True)
        self.cache = self._build_cache() if self.cfg.cache != "off" else None
        module = self.cache.split.suffix_train if self.cache is not None else self.model
        self.forward = self._compiled(wrap(module, self.dist, self.device))

    def _build_cache(self) -> _Cache | None:
        cfg = self.cfg
        split, why = split_model(self.model)
        if split is None:
            self.echo(f"feature cache off: {why}")
            return None
        views = 1 if cfg.aug == "none" else cfg.cache_views
        start = time.perf_counter()
        spill = self.run_dir / "cache" / (f"rank{self.dist.rank}" if self.dist.enabled else "")
        build = dict(views=views, batch_size=cfg.batch_size, seed=cfg.seed, spill_dir=spill, dist=self.dist,
                     channels_last=self.channels_last, place="auto" if cfg.cache == "auto" else cfg.cache,
                     workers=cfg.workers)  # fmt: skip
        train_store, info = build_store(split, self.data.train, self.precision, **build,
                                        batches=self._cache_batches(self.data.train, train=True))  # fmt: skip
        val_store = None
        if self.data.val is not None:
            val_store, _ = build_store(split, self.data.val, self.precision, **{**build, "views": 1},
                                       batches=self._cache_batches(self.data.val, train=False))  # fmt: skip
        self.train_loader = store_loader(train_store, batch_size=cfg.batch_size, train=True, seed=cfg.seed,
                                         dist=self.dist, pin=self.device.type == "cuda")  # fmt: skip
        self.echo(f"feature cache: {why}; {info.describe()}; built in {time.perf_counter() - start:.1f}s")
        if views == 1 and cfg.aug != "none":
            self.echo(f"note: one cached view with aug {cfg.aug!r}: every epoch sees the same augmentation of an "
                      "image (raise --cache-views for more)")  # fmt: skip
        return _Cache(split, train_store, val_store)

    def _cache_batches(self, dataset, *, train: bool):
        """Images for the cache build read like training reads them: through the device pipeline when it applies.

        Returns ``view -> batches`` of this rank's rows in dataset order (see ``build_store``), or None for the
        CPU ``DataLoader`` over the dataset's own transform.
        """
        if not should_use_device_loader(dataset, self.device, self.cfg.decode):
            return None
        loader = build_device_loader(
            dataset, batch_size=2 * self.cfg.batch_size, train=train, device=self.device, seed=self.cfg.seed,
            preprocess=self.preprocess, aug=self.cfg.aug if train else "none", shuffle=False,
            rows=shard_rows(len(dataset), self.dist),
        )  # fmt: skip
        if loader is None:
            return None

        def view(v: int):
            loader.generator.manual_seed(self.cfg.seed * 104_729 + v)  # each view's augmentation is reproducible
            return loader

        return view

    def _unfreezer(self) -> Unfreezer | None:
        cfg = self.cfg
        if not cfg.unfreeze or cfg.unfreeze == "none":
            return None
        return Unfreezer(
            self.model, self.optimizer, cfg.unfreeze, lr=cfg.lr, stage_lrs=cfg.stage_lrs, decay=cfg.decay,
            bn=cfg.bn, weight_decay=cfg.weight_decay, scheduler=self.scheduler,
        )  # fmt: skip

    def _compiled(self, module: nn.Module):
        return recompile(module) if self.cfg.compile else module

    # --- the loop -------------------------------------------------------------------------------------------

    def fit(self) -> RunResult:
        cfg = self.cfg
        trainable, total = count_parameters(self.model)
        self.echo(f"{cfg.model} on {self.precision.describe()}: {len(self.data.train)} train images, "
                  f"{len(self.classes)} classes, {trainable:,}/{total:,} parameters trainable")  # fmt: skip
        self.echo(summary(self.model))
        try:
            self._epochs()
        finally:  # Ctrl-C too: flush TensorBoard; metrics.csv and last.pt already hold every finished epoch
            self.metrics.close()
        test = None
        if self.dist.is_main:
            plot_report(self.run_dir / "metrics.csv", self.run_dir / "report.png")
            test = self._final_test()
        barrier(self.dist)
        return RunResult(self.run_dir, self.best_epoch, self.best_metric, test, list(self.metrics.rows))

    def _epochs(self) -> None:
        cfg = self.cfg
        unfrozen_now = self._unfrozen_before(self.start_epoch)
        for epoch in range(self.start_epoch, cfg.epochs):
            row = self._run_epoch(epoch, unfrozen_now)
            last = epoch + 1 == cfg.epochs  # nothing trains after the last epoch: no unfreeze, no cache rebuild
            unfrozen_now = "" if last else self._step_unfreezer(epoch, row)
            improved = self._track_best(epoch, row)
            if self.dist.is_main:
                checkpoint.save_last(self, epoch)
                if improved:
                    checkpoint.save_best(self, epoch, row)
            if cfg.early_stop and self.bad_epochs >= cfg.early_stop:
                self.echo(f"early stop: {cfg.monitor} did not improve for {cfg.early_stop} epochs")
                break

    def _run_epoch(self, epoch: int, unfrozen: str) -> dict:
        seed_epoch(self.cfg.seed, epoch, self.train_loader, rank=self.dist.rank)
        if self.cache is not None:
            self.cache.train.set_epoch(epoch)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        train_stats = self._train_epoch(epoch)
        seconds = time.perf_counter() - start
        samples = train_stats.pop("samples")  # feeds img/s; not a column of its own
        row = {"epoch": epoch + 1, "epochs": self.cfg.epochs, **train_stats}
        val = self._evaluate_val() if self.data.val is not None else None
        val = broadcast(val, self.dist)  # rank 0's numbers drive every rank's unfreeze and early-stop decisions
        if val is not None:
            row.update(val_loss=val["loss"], val_acc=val["acc"], val_top5=val["top5"], val_f1=val["macro_f1"])
        trainable, total = count_parameters(self.model)
        row.update({f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)})
        row.update(trainable_params=trainable, total_params=total, epoch_time_s=seconds)
        row.update(img_per_s=samples / max(seconds, 1e-9), peak_mem_mb=peak_memory_mb(self.device))
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
        seen, n = 0, len(self.train_loader)
        start = time.perf_counter()
        # Driven by hand: given the loader, tqdm.auto calls iter() on it up front and again to loop, so a DataLoader
        # would start twice an epoch (a wasted worker prefetch, a second shuffle-seed draw).
        with tqdm(total=n, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False, disable=not self.cfg.progress,
                  dynamic_ncols=True) as bar:  # fmt: skip
            for step, (inputs, targets) in enumerate(self.train_loader):
                inputs = to_device(inputs, self.device, self.channels_last)
                targets = targets.to(self.device, non_blocking=True)
                with self.precision.autocast():
                    logits = logits_of(self.forward(inputs))
                    loss = loss_fn(logits.float(), targets)
                self._optimize(loss, params)
                loss_sum += loss.detach() * len(targets)
                correct += (logits.detach().argmax(-1) == targets).sum()
                seen += len(targets)
                bar.update()
                if not bar.disable and (step % 10 == 0 or step == n - 1):  # .item() syncs: not every step
                    bar.set_postfix(self._postfix(loss_sum, correct, seen, start), refresh=False)
        totals = all_reduce_sum(torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=self.device)]),
                                self.dist).tolist()  # fmt: skip
        loss_total, correct_total, seen_total = totals
        return {"train_loss": loss_total / max(seen_total, 1), "train_acc": correct_total / max(seen_total, 1),
                "samples": int(seen_total)}  # fmt: skip

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

    def _evaluate_val(self) -> dict:
        if self.cache is not None and self.cache.val is not None:
            loader = store_loader(self.cache.val, batch_size=self.cfg.batch_size * 2, train=False, seed=self.cfg.seed,
                                  pin=self.device.type == "cuda")  # fmt: skip
            return evaluate(self.cache.split.suffix_eval, loader, self.precision, num_classes=len(self.classes),
                            channels_last=self.channels_last)  # fmt: skip
        return self._evaluate(self.data.val, self.forward)

    def _evaluate(self, dataset, model: nn.Module) -> dict:
        if dataset is self.data.val:
            # built once: a device loader copies the whole set to the GPU, a worker pool takes time to start
            if self._val_loader is None:
                self._val_loader = self._loader(dataset, train=False)
            loader = self._val_loader
        else:
            loader = self._loader(dataset, train=False)
        return evaluate(model, loader, self.precision, num_classes=len(self.classes),
                        channels_last=self.channels_last)  # fmt: skip

    # --- unfreezing, best tracking, checkpoints -------------------------------------------------------------

    def _step_unfreezer(self, epoch: int, row: dict) -> str:
        if self.unfreezer is None:
            return ""
        names = self.unfreezer.step(epoch, row.get(self.cfg.monitor))
        if names:
            self.echo(f"unfroze {', '.join(names)} (trainable {count_parameters(self.model)[0]:,} parameters)")
            self.bad_epochs = 0  # new capacity: give it the full early-stop patience
            self._setup_cache()  # the frozen prefix got shorter: rebuild at the new boundary, or drop the cache
        return ";".join(names)

    def _unfrozen_before(self, epoch: int) -> str:
        """Stages unfrozen at the end of the previous epoch (non-empty only when resuming right after one)."""
        events = self.unfreezer.events if self.unfreezer is not None else []
        return ";".join(n for e, names in events if e == epoch - 1 for n in names)

    def _track_best(self, epoch: int, row: dict) -> bool:
        metric = row.get(self.cfg.monitor)
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

    def _final_test(self) -> dict | None:
        test = self.data.test
        best_path = self.run_dir / checkpoint.BEST
        if test is None or not best_path.exists():
            return None
        self.model.load_state_dict(checkpoint.load(best_path)["state_dict"])
        result = self._evaluate(test, self.model)
        plot_confusion(result, self.classes, self.run_dir / "confusion.png")
        atomic_write_text(self.run_dir / "test_metrics.json", json.dumps(result, indent=1))
        self.echo(format_report(result, self.classes))
        self.echo(f"test accuracy {100 * result['acc']:.2f}% (best.pt, epoch {self.best_epoch}) -> {self.run_dir}")
        return result


@dataclass
class _Cache:
    split: Split
    train: FeatureStore
    val: FeatureStore | None


def _quiet(*_: object) -> None:
    """Ranks other than 0 print nothing: one log per job, not one per GPU."""
