"""A run's set-up, in the order its steps depend on each other: process, model and data, feature path,
optimization, resume, run files, the feature cache; and ``say_setup``, what the run says of it before it trains (the
stage table, the notes). ``Trainer`` (``training/trainer.py``) is a ``RunSetup`` that then trains; the set-up is kept
apart so that its order reads as one path, and the loop as another.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from torch import nn

from freezetune._io import atomic_write_text
from freezetune.cache import FeaturePath
from freezetune.cache.model_split import check_cut, check_cut_at_start
from freezetune.config.check import validate, validation_users
from freezetune.config.file import follow_moved_data
from freezetune.config.options import BATCH_AUTO, HF_PREFIX, MONITOR_MODES, RANDOM_WEIGHTS
from freezetune.config.train_config import DATA_PATHS, TrainConfig, parse_freeze_spec
from freezetune.data import Loaders, build_datasets
from freezetune.data.fingerprint import data_record
from freezetune.data.gpu import check_decode
from freezetune.data.text import (
    IMAGE_SETTINGS,
    TEXT_SETTINGS,
    noun,
    refuse_other_settings,
    text_preprocess,
)
from freezetune.data.upscale import upscale_note
from freezetune.device import hardware
from freezetune.device.depthwise import use_fast_depthwise
from freezetune.device.distributed import (
    broadcast,
    device_for,
    init_from_env,
    main_echo,
    wrap,
)
from freezetune.device.memory import auto_batch_size
from freezetune.device.precision import resolve_device, resolve_precision
from freezetune.errors import ConfigError, DataError, setting
from freezetune.freezing.bn_policy import hold_bn_statistics
from freezetune.freezing.freeze import count_parameters, freeze, summary
from freezetune.freezing.schedule import epochs_on_cut
from freezetune.freezing.unfreezing import Unfreezer
from freezetune.model import hf_bundle, text_pooling
from freezetune.model.create import create_model
from freezetune.model.heads import replace_head
from freezetune.model.stages import stages
from freezetune.run import checkpoint, reporting
from freezetune.run import directory as runtime
from freezetune.run import log as run_log
from freezetune.run import notes as run_notes
from freezetune.run.checkpoint_writer import Writer
from freezetune.run.interrupt import StopRequest
from freezetune.training import rng
from freezetune.training.loss import imbalance_note, training_loss
from freezetune.training.optim import build_optimizer, build_scheduler, warmup_steps
from freezetune.training.progress import Progress
from freezetune.training.step import Step


class RunSetup:
    """A training run set up from a validated config, ready to train. The set-up order is the run's contract:

    1. the process: torchrun group, device, precision, run directory (checked, created later), seeds;
    2. the model and data: pretrained model, datasets, new head, freezing, device placement;
    3. the feature path (images or cached features), which sizes the LR schedule before anything is built;
    4. optimizer, LR schedule, Unfreezer, loss scaler, the loss (class weights from the training labels), and the
       ``Step`` that trains on a batch with them;
    5. on resume, ``last.pt``: weights, unfrozen stages and their groups, optimizer state, progress — before the
       cache, which must store what the restored model computes;
    6. a resume with more epochs first opens the stage its schedule skipped after the old last epoch
       (``_open_skipped_stage``), then the feature path is built: the cache at the frozen boundary (or
       images), the DDP wrap, compilation.
    """

    def __init__(self, cfg: TrainConfig, *, echo=print, resumable: bool = True, brief: bool = False,
                 recipe_run: bool = False, validation_needed_by: tuple[str, ...] = (),
                 refit_follows: bool = False, later_epochs: float | None = None) -> None:  # fmt: skip
        validate(cfg)
        self.cfg, self.resumable, self.brief, self.recipe_run = cfg, resumable, brief, recipe_run
        self.validation_needed_by, self.refit_follows = validation_needed_by, refit_follows  # (``trainer.train``'s)
        self.later_epochs = later_epochs
        self._process(echo)
        self._model()
        self._data()
        self._head_and_freeze()
        # --batch-size auto becomes a number here, once, for every rank; config.yaml and checkpoints keep the number
        self.cfg = dataclasses.replace(cfg, batch_size=self._batch_size())
        self._training()
        if self.resuming:
            self._resume()
        self._run_files()
        self.caught_up: list[str] = []
        if not self.trained_out():  # a resume of a finished run only ends it: its cache took minutes on big data
            # the stage a resume with more epochs opens first, before the cache is built: built once, past it
            self.caught_up = self._open_skipped_stage()
            self.features.build(epochs_left=epochs_on_cut(self.state.unfreezer, self.progress.epoch, self.cfg.epochs))
        self.seconds = {"cache": self.features.build_seconds, "val": 0.0, "epochs": 0.0}  # this process's
        self.spent_before = dict(self.progress.spent)  # a resumed run's earlier processes'
        self.fit_start: float | None = None
        if self.dist.is_main:
            self.cfg.save(self.run_dir / runtime.CONFIG_FILE)
            if self.resuming:  # its data at another path now, which the recipe's request must name too
                follow_moved_data(self.run_dir, self.cfg.recorded())
            if self.data.skipped:  # what --skip-bad left out stays on record with the run
                atomic_write_text(self.run_dir / runtime.SKIPPED, "\n".join(self.data.skipped) + "\n")

    def _model(self) -> None:
        """Set-up step 2, the model: pretrained weights (not on a resume) and what its inputs need (image
        preprocessing, or a text model's tokenizer and CSV columns)."""
        cfg = self.cfg
        self.hf_files, bundled = self._bundled_files()
        built = self._bundled_folder(bundled) or cfg.model
        # a resume restores every weight from last.pt, an --init from its checkpoint (strictly: every key, the head's
        # too): the pretrained ones are not read (an offline node, a cleaned hub cache, a weights file moved since
        # stopped the resume of a preempted run; the auto recipe's run, from its trial's best.pt, read them twice)
        # (a GoogLeNet run begun with its aux classifiers, its optimizer's state too, resumes with them)
        self.model, self.preprocess = create_model(built, cfg.weights, img_size=cfg.img_size,
                                                   load=not (self.resuming or cfg.init),
                                                   keep_aux=self.resumed is not None and self.resumed.aux)  # fmt: skip
        check_cut(self.model, cfg.cache_at)  # a stage name needs the model: checked before any data is read
        # the settings only the other kind of model reads are refused; not on a resume, which takes the run's own (a
        # text run of an earlier freezetune recorded the --cache-views it ignored) and refuses a change to them
        text = self.preprocess is None
        other = IMAGE_SETTINGS if text else TEXT_SETTINGS
        given = {k: getattr(cfg, k) for k in other if getattr(cfg, k) != getattr(TrainConfig, k)}
        refuse_other_settings(cfg.model, {} if self.resuming else given, text_model=text)
        check_decode(cfg.decode, cfg.device, self.device)  # after: a text model's --decode is refused as such
        self.preprocess = self.preprocess or text_preprocess(  # a text model: its tokenizer and CSV columns
            built, cfg.max_length, text_column=cfg.text_column, label_column=cfg.label_column
        )
        if self.resumed is not None:  # a run resumed by a later freezetune reads its images as it began reading them
            self.preprocess = dataclasses.replace(self.preprocess, alpha=self.resumed.preprocess.alpha)
            # and pools its texts as it began (its model folder may declare otherwise now, or a freezetune before
            # sentence pooling trained it through its task class's pooler)
            text_pooling.match_record(self.model, {"text_pooling": self.resumed.text_pooling, "model": cfg.model})

    def _bundled_files(self) -> tuple[dict[str, str] | None, str | None]:
        """An ``hf:DIR``'s config and tokenizer files, which every checkpoint carries, and where they come from: a
        resumed run's ``last.pt`` ("last": those it began with); an ``--init`` checkpoint's where the folder is gone
        ("init": a recipe's phase resumed on another machine starts from its previous phase's ``best.pt``); else the
        folder (None)."""
        cfg, own = self.cfg, self.cfg.model.removeprefix(HF_PREFIX)
        if self.resumed is not None and self.resumed.hf_files:
            return self.resumed.hf_files, "last"
        if cfg.init and not self.resuming and cfg.model.startswith(HF_PREFIX) and not os.path.isdir(own):
            if files := checkpoint.load(cfg.init, mmap=True).get("hf_files"):
                return files, "init"
        return hf_bundle.bundle(cfg.model), None

    def _bundled_folder(self, source: str | None) -> str | None:
        """The ``hf:DIR`` the model and its tokenizer are built from when its own folder is gone, or (a resume) holds
        other files now: the bundled files (``hf_bundle.rebuilt_folder``). A resume on another machine failed as
        "cannot load"; one after a tokenizer's edit tokenized the rest of the run otherwise, in silence."""
        if source is None or not (folder := hf_bundle.rebuilt_folder(self.cfg.model, self.hf_files)):
            return None
        if not os.path.isdir(own := self.cfg.model.removeprefix(HF_PREFIX)):
            carrier = checkpoint.LAST if source == "last" else self.cfg.init
            self.echo(f"model folder {own} is not here: the model is built from the files {carrier} carries")
        return f"{HF_PREFIX}{folder}"

    def _data(self) -> None:
        """Set-up step 2, the data: the training, validation and test sets, read for the model."""
        cfg = self.cfg
        self.data = build_datasets(cfg.data, val_data=cfg.val_data, val_split=cfg.val_split, per_class=cfg.per_class,
                                   seed=cfg.seed, preprocess=self.preprocess, aug=cfg.aug,
                                   skip_bad=cfg.skip_bad, refit=bool(cfg.refit), refit_follows=self.refit_follows,
                                   final_test=cfg.final_test, say=self.echo)  # fmt: skip
        self.classes = self.data.classes
        own, outer = validation_users(cfg), self.validation_needed_by
        if self.data.val is None and (users := [*own, *outer]):  # a plateau failed after epoch 1; --early-stop was
            # ignored; a sweep trained its first recipe. The data says why there is none: "none (every class has ..."
            without = f", or train without {'it' if len(own) == 1 else 'them'}" if own and not outer else ""
            raise DataError(f"{' and '.join(users)} need{'s' if len(users) == 1 else ''} validation data, and this "
                            f"run has {self.data.val_source}: give --val-data (or more {noun(self.data.train)} a "
                            f"class){without}")  # fmt: skip
        # before any cache build or trial: the model's input size, not the images', is what a step costs (once a run:
        # the auto recipe's first trial says it, not its final run; rank 0 alone reads the headers)
        said = cfg.img_size is None and not self.brief and self.dist.is_main
        if said and (note := upscale_note(self.data.train, self.preprocess.input_size, self.device)) and \
                run_log.first_time(note):  # fmt: skip
            self.echo(note)
        # what last.pt keeps of the data (sizes, digests), for a resume to refuse other data
        self.data_print = data_record(self.data.train, self.data.val, cfg.per_class) if self.resumable else None

    def _head_and_freeze(self) -> None:
        """Set-up step 2, the model for the data: its new head, any earlier run's weights, the freeze and BatchNorm
        policy, on the device (and its memory format)."""
        cfg = self.cfg
        replace_head(self.model, len(self.classes))
        if cfg.init and not self.resuming:  # an earlier run's weights, head included (a recipe's previous phase);
            # a resume's come from last.pt (the init file may be gone, or named from another directory)
            checkpoint.init_from(self.model, cfg.init, self.classes, model_name=cfg.model)
        freeze(self.model, parse_freeze_spec(cfg.freeze), bn=cfg.bn, dropout=cfg.frozen_dropout)
        if cfg.bn_stats == "frozen":  # (the layers an unfreeze releases later are held too)
            hold_bn_statistics(self.model)
        if str(cfg.weights).lower() in RANDOM_WEIGHTS and not cfg.init and not self.resuming:
            run_notes.say_random_frozen(self.model)
        if not any(p.requires_grad for p in self.model.parameters()):  # the API's "unfreeze a stage first" misled
            # (a plan's epoch-0 stages open when the optimizer exists, after this; "epoch:"/"plateau:" after an epoch)
            later = " in the first epoch (an unfreeze schedule opens stages only after one)" if isinstance(
                cfg.unfreeze, str) and cfg.unfreeze != "none" else ""  # fmt: skip
            raise ConfigError(f"freeze {cfg.freeze!r} leaves no parameter to train{later}; freeze less: 'backbone' "
                              "trains the head")  # fmt: skip
        if not cfg.init and not self.resuming:
            run_notes.say_head_frozen(self.model)
        self.channels_last = hardware.use_channels_last(cfg.channels_last, self.model)
        self.model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        if self.device.type == "cpu" and not cfg.compile:  # the native weight gradient of a depthwise layer is slow
            use_fast_depthwise(self.model)

    def _training(self) -> None:
        """Set-up steps 3 and 4: the feature path (which sizes the LR schedule), the optimizer, schedule, Unfreezer,
        scaler and loss, and the ``Step`` that trains on a batch with them."""
        cfg = self.cfg
        self.loaders = Loaders(batch_size=cfg.batch_size, device=self.device, seed=cfg.seed, preprocess=self.preprocess,
                               aug=cfg.aug, decode=cfg.decode, workers=cfg.workers, dist=self.dist,
                               epoch_fraction=cfg.epoch_fraction, epoch_images=cfg.epoch_images)  # fmt: skip
        self.features = FeaturePath(self.model, self.data, self.loaders, self.precision, cache=cfg.cache,
                                    views=cfg.cache_views, spill_dir=self.run_dir / "cache", cache_dir=cfg.cache_dir,
                                    cache_at=cfg.cache_at,
                                    channels_last=self.channels_last, stream=not cfg.compile, prepare=self._prepare,
                                    echo=self.echo, progress=self.draws_bars,
                                    later_epochs=self.later_epochs)  # fmt: skip
        self.steps_per_epoch = self.features.steps_per_epoch
        self.state = checkpoint.TrainingState(self.model, *self._optimization())
        if cfg.cache != "off" and not self.resuming:  # after a plan's epoch-0 stages open (the Unfreezer's); a
            check_cut_at_start(self.model, cfg.cache_at)  # resume's stages may have opened past it since
        self.loss_fn = training_loss(cfg.class_weights, cfg.label_smoothing, self.data.train.targets, len(self.classes),
                                     self.device)  # fmt: skip
        self.step = Step(self.state, self.loss_fn, self.precision, channels_last=self.channels_last,
                         grad_clip=cfg.grad_clip, skip_nonfinite=cfg.skip_nonfinite, dist=self.dist,
                         graph_batch=cfg.batch_size if cfg.cuda_graph and not cfg.compile else None)  # fmt: skip
        # best.pt holds an epoch as good as the best on the validation split, by its size (Progress.update)
        self.progress = Progress(cfg.monitor, n_val=len(self.data.val) if self.data.val is not None else None)

    def _run_files(self) -> None:
        """The run's first files (rank 0's): classes.json, then the metrics log (a resume's cut back to its last.pt).
        From here on the run's lines, those said before included, are kept in its train.log too: not before, so a
        refused resume leaves the run's files as they were."""
        run_log.log_to(self.run_dir)
        run_log.opened(self.run_dir)
        if self.dist.is_main:  # the mark before anything else: it marks the dir as a run's (prepare_run_dir)
            atomic_write_text(self.run_dir / runtime.RUN_MARK, "a freezetune run's directory\n")
            atomic_write_text(self.run_dir / runtime.CLASSES_FILE, json.dumps(self.classes, indent=1))
        self.metrics = reporting.MetricsLogger(self.run_dir, tensorboard=self.cfg.tensorboard) if self.dist.is_main \
            else reporting.NullMetricsLogger()  # fmt: skip
        if self.resuming:  # the rows logged after its last.pt go
            self.metrics.truncate(self.progress.epoch)
            if self.dist.is_main and (lost := reporting.missing_epochs(self.metrics.rows, self.progress.epoch)):
                # metrics.csv deleted (or rows cut by hand) since: a new file of the later epochs alone, unsaid
                self.echo(f"note: {reporting.METRICS_CSV} lacks the row(s) of epoch(s) {lost} (deleted since they were "
                          f"logged): it and {reporting.REPORT_PNG} hold the epochs from the resume on, and those it "
                          "kept")  # fmt: skip

    def _process(self, echo) -> None:
        """Set-up step 1: the torchrun group, device, precision, run directory (checked; created later) and seeds."""
        cfg = self.cfg
        self.dist = init_from_env(cfg.device)
        self.echo = main_echo(echo, self.dist)
        self.device = resolve_device(device_for(self.dist, cfg.device))
        self.precision = resolve_precision(self.device, cfg.amp)
        if cfg.save_every_steps and self.dist.enabled:  # rank 0's running totals and RNG are not the other ranks'
            raise ConfigError("save_every_steps is not supported under torchrun (DDP): last.pt is saved per epoch")
        self.stop = StopRequest()
        # decided once, by rank 0: a timestamped default name must not differ between ranks
        self.run_dir = runtime.shared_run_dir(cfg.out, cfg.model, self.dist, resume=cfg.resume,
                                              recipe_run=self.recipe_run, echo=self.echo)  # fmt: skip
        # a --resume of a run stopped before its first last.pt starts it afresh (prepare_run_dir said so)
        self.resuming = cfg.resume and (self.run_dir / checkpoint.LAST).is_file()
        # a refusal must not wait for the model and the data (a large folder's scan)
        # (and what last.pt trained with: how its images were read, how its texts were pooled)
        self.resumed = checkpoint.check_settings(self.run_dir / checkpoint.LAST, cfg.recorded()) \
            if self.resuming else None  # fmt: skip
        for key in DATA_PATHS if self.resuming else ():  # the run's own paths: its data moved since?
            if (path := getattr(cfg, key)) is not None and not os.path.exists(path):
                raise ConfigError(f"{key} '{path}' does not exist: give {setting(key, 'PATH', placeholder=True)} "
                                  "where the run's files are now, if they moved (the resume checks they are the same "
                                  "files)")  # fmt: skip
        # best.pt and last.pt, written beside the training on an accelerator; on the CPU the writes would take the
        # training's cores (measured: no faster), so they are written in turn
        self.checkpoints = Writer(self.run_dir, background=self.device.type != "cpu")
        rng.seed_everything(cfg.seed)

    def _batch_size(self) -> int:
        if self.cfg.batch_size != BATCH_AUTO:
            return self.cfg.batch_size
        image = self.preprocess.input_size if self.preprocess.tokenizer is None else None
        size, why = auto_batch_size(self.model, image, device=self.device, cap=len(self.data.train),
                                    default=TrainConfig.batch_size, autocast=self.precision.autocast,
                                    averaged=bool(self.cfg.average_weights))  # fmt: skip
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
        average = None
        if cfg.average_weights:  # (the auto recipe's run sets it; a resume's last.pt then brings its average back)
            from freezetune.training.averaging import WeightAverage, decay_of

            average = WeightAverage(self.model, decay_of(cfg.average_weights, cfg.epochs * self.steps_per_epoch))
        return optimizer, scheduler, self.precision.scaler(), unfreezer, average

    def _resume(self) -> None:
        checkpoint.restore(self.run_dir / checkpoint.LAST, self.state, self.progress, config=self.cfg.recorded(),
                           classes=self.classes, steps_per_epoch=self.steps_per_epoch,
                           data=self.data_print)  # fmt: skip
        self.echo(run_notes.resumed_line(self.run_dir, self.cfg, self.progress, self.steps_per_epoch,
                                         trained_out=self.trained_out()))  # fmt: skip

    @property
    def draws_bars(self) -> bool:
        """Whether this process draws progress bars: ``--progress``, and under torchrun rank 0 alone."""
        return self.cfg.progress and self.dist.is_main

    def _warming(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) ends while the LR still climbs to its peak (its last step at or before it): a
        stalling metric has not plateaued then (early stop waited out its patience at the peak of a 30-epoch one-cycle,
        epoch 7, and a plateau unfroze the next stage there)."""
        return (epoch + 1) * self.steps_per_epoch <= self.warmup_steps

    def _open_skipped_stage(self) -> list[str]:
        """A resume with more ``--epochs`` than its run had: that run's last epoch ended without its schedule's step
        (nothing trained after it), so the stage due then opens now, as in a run given the epochs from the start;
        before the set-up builds the cache (built at the old cut, then again at the new one, it took twice)."""
        unfreezer, last = self.state.unfreezer, self.progress.epoch - 1
        if unfreezer is None or last < 0 or self.progress.step or not unfreezer.skipped(last):
            return []
        row = broadcast(self.metrics.rows[-1] if self.metrics.rows else {}, self.dist)  # its metric: rank 0's
        unfrozen = self._step_unfreezer(last, row, self._warming(last))
        if unfrozen:
            self.progress.reset_patience()
        return unfrozen

    def _step_unfreezer(self, epoch: int, row: dict, warming: bool) -> list[str]:
        """Open and say what the schedule opens after ``epoch`` (the cache is built by the caller)."""
        names = self._open_stages(epoch, row, warming)
        if names:
            self._say_unfrozen(epoch, names)
        return names

    def _open_stages(self, epoch: int, row: dict, warming: bool) -> list[str]:
        """The stages the schedule opens after ``epoch`` (now trainable, in the optimizer; the cache not rebuilt)."""
        if self.state.unfreezer is None:
            return []
        return self.state.unfreezer.step(epoch, row.get(self.cfg.monitor), warming_up=warming)

    def _say_unfrozen(self, epoch: int, names: list[str]) -> None:
        self.echo(self.state.unfreezer.describe_opened(epoch, names, self.cfg.monitor))

    def trained_out(self) -> bool:
        """Whether no epoch is left to train: all were trained, or early stopping ended the run."""
        p, cfg = self.progress, self.cfg
        return bool(cfg.early_stop and p.bad_epochs >= cfg.early_stop) or (p.epoch >= cfg.epochs and not p.step)

    def _prepare(self, module: nn.Module) -> nn.Module:
        """What a step runs: DDP over the parameters that train now, compiled when asked."""
        module = wrap(module, self.dist, self.device)
        return hardware.recompile(module) if self.cfg.compile else module

    def say_setup(self) -> None:
        """What trains on what (the stage table, or one line for the auto recipe's later trials) and the notes."""
        trainable, total = count_parameters(self.model)
        n, visited = len(self.data.train), self.loaders.epoch_items(len(self.data.train))
        per_epoch = f" ({visited} an epoch)" if visited < n else ""  # --epoch-images, a trial's half
        how = [self.precision.describe()] + ["channels_last"] * self.channels_last + ["compiled"] * self.cfg.compile
        if self.step.graphs is not None and self.features.cached:  # streamed: the prefix computed batch by batch
            how.append(f"{'streamed' if self.features.streamed else 'cached'} steps replayed as a CUDA graph")
        if workers := self.loaders.workers_for(self.data.train):  # (speed alone: any count draws the same)
            how.append(f"{workers} loader worker{'s' if workers > 1 else ''}")
        head = (
            f"{self.cfg.model} on {', '.join(how)}: {n} train {noun(self.data.train)}{per_epoch}, "
            f"{len(self.classes)} classes, {trainable:,}/{total:,} parameters trainable"
        )
        if self.brief:
            self.echo(f"{head}: {', '.join(s.name for s in stages(self.model) if s.num_trainable)}")
        else:
            self.echo(f"{head}\nvalidation: {self.data.val_source}\n{summary(self.model)}")
        notes = [imbalance_note(self.cfg.class_weights, self.data.train.targets, len(self.classes),
                                noun(self.data.train))]  # fmt: skip
        if not self.brief:  # the later trials of the auto recipe: their first said these
            notes += run_notes.idle_setting_notes(self.cfg, self.model, self.data.train, self.preprocess,
                                                  self.state.unfreezer) + [self.precision.cpu_note()]  # fmt: skip
        notes.append(run_notes.warmup_note(self.cfg, self.state.unfreezer, warmup_steps=self.warmup_steps,
                                           steps_per_epoch=self.steps_per_epoch))  # fmt: skip
        notes.append(run_notes.averaging_note(self.cfg, self.steps_per_epoch))
        for note in filter(None, notes):
            self.echo(note)
        if self.data.skipped:
            self.echo(f"skipped {len(self.data.skipped)} unreadable image file(s) (--skip-bad): listed in "
                      f"{self.run_dir / runtime.SKIPPED}")  # fmt: skip
