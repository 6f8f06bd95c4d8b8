"""The training engine: pretrained model -> freeze -> new head -> train (progressive unfreezing) -> best checkpoint.

``train(cfg)`` is the whole run; ``Trainer`` exposes its parts for notebooks. What a step reads (images or cached
features) is the ``FeaturePath``'s business; how data becomes batches, the ``Loaders'``; how far the run is,
``Progress``'s; what a resume restores, ``checkpoint``'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from itertools import islice

import torch
from torch import nn

from freezetune import checkpoint, epoch_log, hf_bundle, recipes, reporting, run_log, runtime
from freezetune._io import atomic_write_text
from freezetune.cache import FeaturePath
from freezetune.config import TrainConfig, parse_freeze_spec, validate
from freezetune.data import Loaders, build_datasets, noun
from freezetune.data.gpu import check_decode
from freezetune.data.text import TEXT_SETTINGS, refuse_text_settings, text_preprocess, truncation_note
from freezetune.depthwise import use_fast_depthwise
from freezetune.distributed import (
    all_reduce_sum,
    barrier,
    broadcast,
    broadcast_tensors,
    device_for,
    in_group,
    init_from_env,
    leave_group,
    main_echo,
    wrap,
)
from freezetune.errors import ConfigError, TrainingError
from freezetune.freeze import count_parameters, freeze, summary
from freezetune.heads import replace_head
from freezetune.inference import evaluate_best, write_evaluation
from freezetune.interrupt import AT_ONCE_UNDER_DDP, OUTSIDE_A_STEP, StopRequest, pause_point
from freezetune.loss import imbalance_note, training_loss
from freezetune.memory import auto_batch_size, out_of_memory_hint
from freezetune.models import create_model
from freezetune.optim import build_optimizer, build_scheduler, warmup_steps
from freezetune.options import BATCH_AUTO, MONITOR_MODES
from freezetune.precision import resolve_device, resolve_precision
from freezetune.progress import Progress, RunResult
from freezetune.split import check_cut
from freezetune.stages import stages
from freezetune.step import Step
from freezetune.unfreezing import Unfreezer

SKIPPED = "skipped.txt"  # the image files --skip-bad left out, one path a line


def train(
    cfg: TrainConfig, *, echo: Callable[[str], None] = print, resumable: bool = True, brief: bool = False
) -> RunResult:
    """Run a whole fine-tuning job as configured; ``echo`` receives the human-readable log lines.

    A recipe (``recipe``, or ``freeze: auto``, the default) runs through ``freezetune.recipes``. ``resumable=False``
    writes no ``last.pt`` (only ``best.pt``): for a run nobody will resume, as the auto recipe's trials, whose resume
    state (the optimizer's moments included) is the largest file a run writes. ``brief``: one line for what trains,
    not the stage table (the auto recipe's later trials, whose table differs from the first's in a row or two).

    >>> from freezetune.config import TrainConfig
    >>> train(TrainConfig(data="DIR_OF_IMAGES", epochs=3))  # doctest: +SKIP
    """
    # SIGTERM/SIGINT end the run with RunInterrupted at once, except in the training loop (Trainer.fit), which saves
    # its place first; the handlers found are put back after the run
    validate(cfg)  # before a recipe plans anything: every problem of the config, with the choices
    runtime.check_resume_target(cfg.out, cfg.resume)  # a recipe would otherwise look in a new timestamped dir
    # under torchrun the outermost call leaves the process group, once: a recipe's runs (the auto recipe's trials and
    # run) share it; left and joined again between them, the ranks' third join never met
    owner = not in_group()
    # the log (train.log) around the rest: it records the line of whatever error or stop ends the run
    with run_log.log(echo) as echo, out_of_memory_hint(cfg.batch_size), StopRequest().listening(defer=False):
        try:
            if recipes.recipe_of(cfg) is not None:
                return recipes.run(cfg, echo=echo)
            trainer = Trainer(cfg, echo=echo, resumable=resumable, brief=brief)
            return trainer.fit()
        finally:
            if owner:
                leave_group()


class Trainer:
    """One training run, set up from a validated config. The set-up order is the run's contract:

    1. the process: torchrun group, device, precision, run directory (checked, created later), seeds;
    2. the model and data: pretrained model, datasets, new head, freezing, device placement;
    3. the feature path (images or cached features), which sizes the LR schedule before anything is built;
    4. optimizer, LR schedule, Unfreezer, loss scaler, the loss (class weights from the training labels), and the
       ``Step`` that trains on a batch with them;
    5. on resume, ``last.pt``: weights, unfrozen stages and their groups, optimizer state, progress — before the
       cache, which must store what the restored model computes;
    6. the feature path is built: the cache at the frozen boundary (or images), the DDP wrap, compilation.
    """

    def __init__(self, cfg: TrainConfig, *, echo=print, resumable: bool = True, brief: bool = False) -> None:
        validate(cfg)
        self.cfg, self.resumable, self.brief = cfg, resumable, brief
        self._process(echo)
        self._model_and_data()
        # --batch-size auto becomes a number here, once, for every rank; config.yaml and checkpoints keep the number
        self.cfg = dataclasses.replace(cfg, batch_size=self._batch_size())
        self._training()
        if self.resuming:
            self._resume()
        self._run_files()
        self.features.build()
        self.seconds = {"cache": self.features.build_seconds, "val": 0.0, "epochs": 0.0}  # this process's
        self.spent_before = dict(self.progress.spent)  # a resumed run's earlier processes'
        self.fit_start: float | None = None
        if self.dist.is_main:
            self.cfg.save(self.run_dir / runtime.CONFIG_FILE)
            if self.data.skipped:  # what --skip-bad left out stays on record with the run
                atomic_write_text(self.run_dir / SKIPPED, "\n".join(self.data.skipped) + "\n")

    def _model_and_data(self) -> None:
        """Set-up step 2: the pretrained model, the datasets, the new head, freezing, device placement."""
        cfg = self.cfg
        self.model, self.preprocess = create_model(cfg.model, cfg.weights, img_size=cfg.img_size)
        check_cut(self.model, cfg.cache_at)  # a stage name needs the model: checked before any data is read
        if self.preprocess is not None:  # an image model: the settings only a text model reads are refused
            given = {k: getattr(cfg, k) for k in TEXT_SETTINGS if getattr(cfg, k) != getattr(TrainConfig, k)}
            refuse_text_settings(cfg.model, given)
        self.preprocess = self.preprocess or text_preprocess(  # a text model: its tokenizer and CSV columns
            cfg.model, cfg.max_length, text_column=cfg.text_column, label_column=cfg.label_column
        )
        self.hf_files = hf_bundle.bundle(cfg.model)  # an hf:DIR's config and tokenizer, carried by every checkpoint
        self.data = build_datasets(cfg.data, val_data=cfg.val_data, val_split=cfg.val_split, per_class=cfg.per_class,
                                   seed=cfg.seed, preprocess=self.preprocess, aug=cfg.aug,
                                   skip_bad=cfg.skip_bad, refit=bool(cfg.refit),
                                   final_test=cfg.final_test)  # fmt: skip
        self.classes = self.data.classes
        replace_head(self.model, len(self.classes))
        if cfg.init and not self.resuming:  # an earlier run's weights, head included (a recipe's previous phase);
            # a resume's come from last.pt (the init file may be gone, or named from another directory)
            checkpoint.init_from(self.model, cfg.init, self.classes, model_name=cfg.model)
        freeze(self.model, parse_freeze_spec(cfg.freeze), bn=cfg.bn)
        self.channels_last = runtime.use_channels_last(cfg.channels_last, self.model, self.device)
        self.model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        if self.device.type == "cpu" and not cfg.compile:  # the native weight gradient of a depthwise layer is slow
            use_fast_depthwise(self.model)

    def _training(self) -> None:
        """Set-up steps 3 and 4: the feature path (which sizes the LR schedule), the optimizer, schedule, Unfreezer,
        scaler and loss, and the ``Step`` that trains on a batch with them."""
        cfg = self.cfg
        self.loaders = Loaders(batch_size=cfg.batch_size, device=self.device, seed=cfg.seed, preprocess=self.preprocess,
                               aug=cfg.aug, decode=cfg.decode, workers=cfg.workers, dist=self.dist,
                               epoch_fraction=cfg.epoch_fraction)  # fmt: skip
        self.features = FeaturePath(self.model, self.data, self.loaders, self.precision, cache=cfg.cache,
                                    views=cfg.cache_views, spill_dir=self.run_dir / "cache", cache_dir=cfg.cache_dir,
                                    cache_at=cfg.cache_at,
                                    channels_last=self.channels_last, prepare=self._prepare,
                                    echo=self.echo, progress=cfg.progress and self.dist.is_main)  # fmt: skip
        self.steps_per_epoch = self.features.steps_per_epoch
        self.state = checkpoint.TrainingState(self.model, *self._optimization())
        self.loss_fn = training_loss(cfg.class_weights, cfg.label_smoothing, self.data.train.targets, len(self.classes),
                                     self.device)  # fmt: skip
        self.step = Step(self.state, self.loss_fn, self.precision, channels_last=self.channels_last,
                         grad_clip=cfg.grad_clip, skip_nonfinite=cfg.skip_nonfinite, dist=self.dist)  # fmt: skip
        self.progress = Progress(cfg.monitor)

    def _run_files(self) -> None:
        """The run's first files (rank 0's): classes.json, then the metrics log (a resume's cut back to its last.pt).
        From here on the run's lines, those said before included, are kept in its train.log too: not before, so a
        refused resume leaves the run's files as they were."""
        run_log.log_to(self.run_dir)
        if self.dist.is_main:  # classes.json before anything else: it marks the dir as a run's (prepare_run_dir)
            atomic_write_text(self.run_dir / runtime.CLASSES_FILE, json.dumps(self.classes, indent=1))
        self.metrics = reporting.MetricsLogger(self.run_dir, tensorboard=self.cfg.tensorboard) if self.dist.is_main \
            else reporting.NullMetricsLogger()  # fmt: skip
        if self.resuming:  # the rows logged after its last.pt go
            self.metrics.truncate(self.progress.epoch)

    def _process(self, echo) -> None:
        """Set-up step 1: the torchrun group, device, precision, run directory (checked; created later) and seeds."""
        cfg = self.cfg
        self.dist = init_from_env(cfg.device)
        self.echo = main_echo(echo, self.dist)
        self.device = resolve_device(device_for(self.dist, cfg.device))
        check_decode(cfg.decode, cfg.device, self.device)
        self.precision = resolve_precision(self.device, cfg.amp)
        if cfg.save_every_steps and self.dist.enabled:  # rank 0's running totals and RNG are not the other ranks'
            raise ConfigError("save_every_steps is not supported under torchrun (DDP): last.pt is saved per epoch")
        self.stop = StopRequest()
        # decided once, by rank 0: a timestamped default name must not differ between ranks
        self.run_dir = broadcast(runtime.prepare_run_dir(cfg.out, cfg.model, resume=cfg.resume,
                                                         clean=self.dist.is_main, echo=self.echo), self.dist)  # fmt: skip
        barrier(self.dist)  # every rank checked the run dir before rank 0 writes into it
        # a --resume of a run stopped before its first last.pt starts it afresh (prepare_run_dir said so)
        self.resuming = cfg.resume and (self.run_dir / checkpoint.LAST).is_file()
        if self.resuming:  # a refusal must not wait for the model and the data (a large folder's scan)
            checkpoint.check_settings(self.run_dir / checkpoint.LAST, cfg.recorded())
        # best.pt and last.pt, written beside the training on an accelerator; on the CPU the writes would take the
        # training's cores (measured: no faster), so they are written in turn
        self.checkpoints = checkpoint.Writer(self.run_dir, background=self.device.type != "cpu")
        runtime.seed_everything(cfg.seed)

    def _batch_size(self) -> int:
        if self.cfg.batch_size != BATCH_AUTO:
            return self.cfg.batch_size
        cap, default = len(self.data.train), TrainConfig.batch_size
        if self.preprocess.tokenizer is not None:  # text: no image input to measure with
            size, why = min(default, cap), "the default (a text model is not measured)"
        else:
            size, why = auto_batch_size(self.model, self.preprocess.input_size, device=self.device, cap=cap,
                                        default=default, autocast=self.precision.autocast)  # fmt: skip
        size, why = broadcast((size, why), self.dist)  # rank 0 measured; every rank must step alike
        self.echo(f"--batch-size auto -> {size}: {why}")
        return size

    def _optimization(self) -> tuple:
        cfg = self.cfg
        optimizer = build_optimizer(self.model, cfg.optimizer, cfg.lr, stage_lrs=cfg.stage_lrs, decay=cfg.decay,
                                    weight_decay=cfg.weight_decay, momentum=cfg.momentum)  # fmt: skip
        scheduler = build_scheduler(optimizer, cfg.scheduler, epochs=cfg.epochs, steps_per_epoch=self.steps_per_epoch,
                                    warmup_epochs=cfg.warmup_epochs)  # fmt: skip
        self.warmup_steps = warmup_steps(cfg.scheduler, epochs=cfg.epochs, steps_per_epoch=self.steps_per_epoch,
                                         warmup_epochs=cfg.warmup_epochs)  # fmt: skip
        unfreezer = None
        if cfg.unfreeze and cfg.unfreeze != "none":
            unfreezer = Unfreezer(self.model, optimizer, cfg.unfreeze, lr=cfg.lr, stage_lrs=cfg.stage_lrs,
                                  decay=cfg.decay, bn=cfg.bn, weight_decay=cfg.weight_decay, scheduler=scheduler,
                                  mode=MONITOR_MODES[cfg.monitor])  # fmt: skip
        return optimizer, scheduler, self.precision.scaler(), unfreezer

    def _resume(self) -> None:
        checkpoint.restore(self.run_dir / checkpoint.LAST, self.state, self.progress, config=self.cfg.recorded(),
                           classes=self.classes, steps_per_epoch=self.steps_per_epoch)  # fmt: skip
        p = self.progress
        within = f" and step {p.step}/{self.steps_per_epoch} of epoch {p.epoch + 1}" if p.step else ""
        stopped = self.cfg.early_stop and p.bad_epochs >= self.cfg.early_stop
        done = ": the run had finished (early stop)" if stopped else ""
        if not done and p.epoch >= self.cfg.epochs and not p.step:  # a finished run: say so, not leave it to guess
            done = f": all {self.cfg.epochs} epochs were trained"
        then = "; nothing trains, only the run's end (report, test split) runs again" if done else ""
        self.echo(f"resumed {self.run_dir} after epoch {p.epoch}{within}{done}{then}")

    def _prepare(self, module: nn.Module) -> nn.Module:
        """What a step runs: DDP over the parameters that train now, compiled when asked."""
        module = wrap(module, self.dist, self.device)
        return runtime.recompile(module) if self.cfg.compile else module

    # --- the loop -------------------------------------------------------------------------------------------

    def fit(self) -> RunResult:
        """Train the remaining epochs, then plot the curves and score ``best.pt`` on the test split."""
        trainable, total = count_parameters(self.model)
        head = (
            f"{self.cfg.model} on {self.precision.describe()}: {len(self.data.train)} train "
            f"{noun(self.data.train)}, {len(self.classes)} classes, {trainable:,}/{total:,} parameters trainable"
        )
        if self.brief:
            self.echo(f"{head}: {', '.join(s.name for s in stages(self.model) if s.num_trainable)}")
        else:
            self.echo(f"{head}\nvalidation: {self.data.val_source}\n{summary(self.model)}")
        notes = [imbalance_note(self.cfg.class_weights, self.data.train.targets, len(self.classes),
                                noun(self.data.train)), None if self.brief else truncation_note(self.data.train, self.preprocess)]  # fmt: skip
        for note in filter(None, [*notes, self._warmup_note()]):
            self.echo(note)
        if self.data.skipped:
            self.echo(f"skipped {len(self.data.skipped)} unreadable image file(s) (--skip-bad): listed in "
                      f"{self.run_dir / SKIPPED}")  # fmt: skip
        self.fit_start = start = time.perf_counter()
        try:
            # one process: a signal is acted on at the next step boundary, after saving there; under DDP the ranks
            # could not agree on that step without a collective every step, so a signal stops them at once
            at_once = AT_ONCE_UNDER_DDP if self.dist.enabled else OUTSIDE_A_STEP
            with self.stop.listening(defer=not self.dist.enabled, at_once=at_once):
                self._epochs()
            self.checkpoints.wait()  # best.pt is scored next
        except BaseException:
            self._close(failing=True)
            raise
        self._close(failing=False)
        self.seconds["epochs"] = time.perf_counter() - start
        self.seconds = self._spent()
        if self.dist.is_main:
            reporting.plot_report(self.run_dir / reporting.METRICS_CSV, self.run_dir / reporting.REPORT_PNG)
        test = self._final_test()
        barrier(self.dist)
        p = self.progress
        if test is None and self.cfg.final_test:  # no test split: the run still ends on a line naming its result
            metric = f", {self.cfg.monitor} {p.best_metric:.4f}" if p.best_metric is not None else ""
            self.echo(f"best.pt: epoch {p.best_epoch}{metric} (no test split to score) -> {self.run_dir}")
        return RunResult(self.run_dir, p.best_epoch, p.best_metric, test, list(self.metrics.rows), self.seconds,
                         data_kind=noun(self.data.train), no_refit=self.data.no_refit)  # fmt: skip

    def _warmup_note(self) -> str | None:
        """When the patience of early stopping or a plateau unfreeze starts counting, if the LR warm-up delays it."""
        first = self.warmup_steps // max(self.steps_per_epoch, 1) + 1  # the first epoch that ends past the peak
        unfreezer = self.state.unfreezer
        plateau = unfreezer is not None and unfreezer.schedule.kind == "plateau"
        waits = [what for what, on in (("early stopping", bool(self.cfg.early_stop)), ("plateau unfreezing", plateau))
                 if on]  # fmt: skip
        if first <= 1 or not waits:
            return None
        return (f"note: {' and '.join(waits)} count epochs without improvement from epoch {first} on: the "
                f"{self.cfg.scheduler} schedule raises the LR until then")  # fmt: skip

    def _spent(self, *, running: bool = False) -> dict[str, float]:
        """The run's seconds so far: this process's (``running``: the epoch loop's up to now) plus its earlier ones'."""
        now = dict(self.seconds)
        if running and self.fit_start is not None:
            now["epochs"] = time.perf_counter() - self.fit_start
        return {k: self.spent_before.get(k, 0.0) + now.get(k, 0.0) for k in {*now, *self.spent_before}}

    def _close(self, *, failing: bool) -> None:
        """After the epochs, Ctrl-C and errors too: the saves already made land, TensorBoard is flushed, the loaders'
        workers stop with the run (not when the garbage collector frees them). A run already ``failing`` keeps its own
        exception: what the clean-up meets then (loader workers the same SIGTERM killed) is not raised over it."""
        steps = (lambda: self.checkpoints.wait(raise_error=not failing), self.metrics.close, self.features.close)
        for step in steps:
            try:
                step()
            except Exception:
                if not failing:
                    raise

    def _epochs(self) -> None:
        cfg, unfreezer = self.cfg, self.state.unfreezer
        # stages unfrozen after the previous epoch: non-empty only when resuming right after an unfreeze
        unfrozen = unfreezer.unfrozen_after(self.progress.epoch - 1) if unfreezer is not None else []
        if cfg.early_stop and self.progress.bad_epochs >= cfg.early_stop:  # a resume of a run that stopped early:
            return  # it is finished (the report and the test follow), as a run that trained all its epochs is
        for epoch in range(self.progress.epoch, cfg.epochs):
            row = self._run_epoch(epoch, unfrozen)
            last = epoch + 1 == cfg.epochs  # nothing trains after the last epoch: no unfreeze, no cache rebuild
            # while the LR climbs to its peak a stalling metric has not plateaued: early stop waited out its patience
            # at the peak of a 30-epoch one-cycle (epoch 7), and a plateau unfroze the next stage there
            warming = (epoch + 1) * self.steps_per_epoch <= self.warmup_steps  # its last step at or before the peak
            unfrozen = [] if last else self._step_unfreezer(epoch, row, warming)
            improved = self.progress.update(epoch, row.get(cfg.monitor))
            if warming or unfrozen:  # after the update: new stages get the full patience (they got one epoch less)
                self.progress.reset_patience()
            self.progress.spent = self._spent(running=True)
            if self.dist.is_main:
                record = checkpoint.model_record(
                    self.model, cfg.recorded(), self.classes, self.preprocess, self.hf_files
                )
                checkpoint.save_epoch(self.checkpoints, record, self.state, self.progress, self.steps_per_epoch,
                                      row=row, improved=improved, last=self.resumable)  # fmt: skip
            if self.stop.requested:  # the signal came during validation or the save
                self.checkpoints.wait()
                saved = "saved in last.pt" if self.resumable else "not saved: this run is not resumed"
                raise self.stop.interrupted(f"after epoch {epoch + 1} ({saved})")
            if cfg.early_stop and self.progress.bad_epochs >= cfg.early_stop and not last:
                self.echo(f"early stop: {cfg.monitor} did not improve for {cfg.early_stop} "
                          f"epoch{'s' if cfg.early_stop != 1 else ''}")  # fmt: skip
                break

    def _run_epoch(self, epoch: int, unfrozen: list[str]) -> dict:
        runtime.seed_epoch(self.cfg.seed, epoch, rank=self.dist.rank)
        runtime.reset_peak_memory(self.device)
        self.step.lrs = None  # the LRs the epoch's last step used, for its metrics row
        start = time.perf_counter()
        train_stats = self._train_epoch(epoch, self.features.train_batches(epoch))
        # a resumed epoch took the time its steps before the stop took too: its img/s divided the whole epoch's images
        # by the resumed part's seconds (897 img/s for 120)
        seconds = time.perf_counter() - start + train_stats.pop("seconds_before")
        if (step := train_stats.pop("first_bad_step")) >= 0:  # stop before these weights reach last.pt or best.pt
            raise self._diverged(epoch, step)
        start = time.perf_counter()
        val = self.features.evaluate_val(self.precision, num_classes=len(self.classes))
        self.seconds["val"] += time.perf_counter() - start
        val = broadcast(val, self.dist)  # rank 0's numbers drive every rank's unfreeze and early-stop decisions
        if val is not None and val.get("loss") is not None and not math.isfinite(val["loss"]):
            # non-finite logits: weights that must not become best.pt (a NaN epoch's accuracy can still look best)
            raise TrainingError(f"the validation loss was not finite after epoch {epoch + 1}: training diverged; "
                                f"{self._kept()}")  # fmt: skip
        row = epoch_log.epoch_row(epoch, self.cfg.epochs, train_stats, val, seconds=seconds, unfrozen=unfrozen,
                                  optimizer=self.state.optimizer, params=count_parameters(self.model),
                                  peak_mb=runtime.peak_memory_mb(self.device), lrs=self.step.lrs)  # fmt: skip
        if self.resumable and epoch > 0 and not (self.run_dir / checkpoint.LAST).exists():
            # a dir without last.pt but with two rows holds finished work and is never restarted over
            # (runtime.finished_work): the second row waits for the first last.pt, once a run
            self.checkpoints.wait()
        self.metrics.log_epoch(row)
        self.echo(epoch_log.format_epoch_line(row, noun(self.data.train)))
        return row

    def _train_epoch(self, epoch: int, batches) -> dict:
        self.model.train()
        meter = epoch_log.TrainProgress(len(batches), f"epoch {epoch + 1}/{self.cfg.epochs}",
                                        enabled=self.cfg.progress and self.dist.is_main, device=self.device)  # fmt: skip
        try:
            self._steps(epoch, batches, meter)
        except BaseException:  # a stop or an error: clear the bar's line, so the message that follows starts its own
            meter.abandon()
            raise
        # DDP hands rank 0's buffers to every rank before each forward, so after the last step each rank holds the
        # BatchNorm statistics of its own last batch: take rank 0's, which last.pt records and validation uses
        broadcast_tensors(self.model.buffers(), self.dist)
        stats = meter.close(lambda totals: all_reduce_sum(totals, self.dist))
        return {**stats, "skipped_batches": meter.skipped} if self.cfg.skip_nonfinite else stats

    def _steps(self, epoch: int, batches, meter: epoch_log.TrainProgress) -> None:
        """The training steps of ``epoch`` (those a mid-epoch ``last.pt`` left, on resume), each saved after when
        asked."""
        for inputs, targets in self._remaining(batches, meter):
            if not self.step(self.features.train_module, inputs, targets, meter) \
                    and meter.skipped > self.cfg.skip_nonfinite:  # fmt: skip
                raise self._diverged(epoch, meter.step - 1, skipped=meter.skipped - 1)
            self._after_step(epoch, meter)

    def _diverged(self, epoch: int, step: int, skipped: int = 0) -> TrainingError:
        skips = f" after skipping {skipped} non-finite batch(es) this epoch (--skip-nonfinite)" if skipped else ""
        return TrainingError(f"the loss was not finite at epoch {epoch + 1}, step {step + 1}{skips}: training "
                             f"diverged; {self._kept()}")  # fmt: skip

    def _kept(self) -> str:
        return (f"best.pt and last.pt keep epoch {self.progress.best_epoch} and {self.progress.epoch} (try a lower "
                "--lr or --grad-clip 1.0)")  # fmt: skip

    def _remaining(self, batches, meter: epoch_log.TrainProgress) -> Iterator:
        """The epoch's batches from where a mid-epoch ``last.pt`` left it (all of them otherwise).

        The batches already trained are drawn and dropped rather than skipped in the sampler: the loader's
        workers, the device pipeline's generator and the cached views then reach the next batch in exactly the
        state they had, whatever the loader kind; only their loading is paid again. The process's RNG (in-process
        augmentation, dropout) is then put back as it was after that step.
        """
        p = self.progress
        batches = iter(batches)
        if p.step:
            for _ in islice(batches, p.step):
                pass
            meter.load_state_dict(p.partial["meter"])
            checkpoint.set_rng_state(p.partial["rng"])
            self.step.lrs = p.partial.get("lrs")  # the row of an epoch saved after its last step still names them
        return batches

    def _after_step(self, epoch: int, meter: epoch_log.TrainProgress) -> None:
        """Save ``last.pt`` mid-epoch every ``save_every_steps`` steps and on a stop signal (then stop)."""
        pause_point("step")
        every, step = self.cfg.save_every_steps, meter.step
        if not (self.stop.requested or (every and step % every == 0 and step < meter.total)):
            return
        # never save the weights of a non-finite step (the epoch's end reports it), nor a run nobody resumes
        if self.resumable and not meter.diverged:
            self.progress.spent = self._spent(running=True)
            self.progress.at_step(step, {"meter": meter.state_dict(), "rng": checkpoint.rng_state(),
                                         "lrs": self.step.lrs})  # fmt: skip
            record = checkpoint.model_record(
                self.model, self.cfg.recorded(), self.classes, self.preprocess, self.hf_files
            )
            self.checkpoints.submit(best=None, last=checkpoint.last_record(record, self.state, self.progress,
                                                                           self.steps_per_epoch))  # fmt: skip
        if self.stop.requested:
            self.checkpoints.wait()
            saved = ("not saved: this run is not resumed" if not self.resumable
                     else "not saved: a non-finite step; last.pt holds the last save" if meter.diverged
                     else "saved in last.pt")  # fmt: skip
            raise self.stop.interrupted(f"at step {step}/{meter.total} of epoch {epoch + 1} ({saved})")

    # --- unfreezing and the final test ----------------------------------------------------------------------

    def _step_unfreezer(self, epoch: int, row: dict, warming: bool) -> list[str]:
        if self.state.unfreezer is None:
            return []
        names = self.state.unfreezer.step(epoch, row.get(self.cfg.monitor), warming_up=warming)
        if names:
            self.echo(f"unfroze {', '.join(names)} (trainable {count_parameters(self.model)[0]:,} parameters)")
            self.features.build()  # the frozen prefix got shorter: rebuild at the new boundary, or read images
        return names

    def _final_test(self) -> dict | None:
        """``best.pt`` on the test split, once, at the end: the one number no decision of the run has seen."""
        if not self.cfg.final_test or self.data.test is None:
            return None
        result = evaluate_best(self.model, self.run_dir / checkpoint.BEST, self.data.test,
                               num_classes=len(self.classes), precision=self.precision,
                               channels_last=self.channels_last, loaders=self.loaders, dist=self.dist)  # fmt: skip
        if result is None or not self.dist.is_main:
            return result
        self.echo(write_evaluation(result, self.classes, plot=self.run_dir / runtime.CONFUSION_PNG,
                                   metrics=self.run_dir / runtime.TEST_METRICS))  # fmt: skip
        self.echo(f"test accuracy {100 * result['acc']:.2f}% (best.pt, epoch {self.progress.best_epoch}) -> "
                  f"{self.run_dir}")  # fmt: skip
        return result
