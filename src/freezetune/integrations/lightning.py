"""PyTorch Lightning: freeze by a freezetune spec, unfreeze on a schedule, stay correct under DDP and across resumes.

``FreezetuneFinetuning`` does what Lightning's ``BackboneFinetuning`` does, without its two failures:

- DDP (Lightning issue #20340): DDP fixes the set of parameters it all-reduces when it wraps the model, so a stage
  unfrozen later would train on each rank's own gradients and the ranks would drift apart. This callback
  all-reduces the gradients of those parameters itself, and every rank follows rank 0's metric, so all ranks
  unfreeze the same stages at the same epoch.
- Resume (#21901): the unfrozen stages and their optimizer groups are part of the callback's state and are re-created
  before Lightning loads the optimizer state, so a resumed run trains exactly what the interrupted one did.

Lightning's order, which the hooks below rely on: ``setup`` (we freeze) -> restore of the module and callback state
(``load_state_dict``) -> ``strategy.setup`` (DDP wraps, ``configure_optimizers`` runs) -> ``on_fit_start`` (we
re-create the unfrozen stages' groups) -> restore of the optimizer and scheduler state -> training.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from freezetune.config.options import BN_DEFAULT, DROPOUT_DEFAULT, FREEZE_DEFAULT
from freezetune.config.train_config import TrainConfig
from freezetune.device.distributed import average_grads
from freezetune.errors import ConfigError, MissingExtra, choices
from freezetune.freezing.bn_policy import check_bn_policy, keeps_stats
from freezetune.freezing.dropout import check_dropout_policy, held
from freezetune.freezing.freeze import Spec, count_parameters, freeze
from freezetune.freezing.schedule import parse_schedule
from freezetune.freezing.unfreezing import Unfreezer
from freezetune.model.stages import stages
from freezetune.training.optim import nominal_lr, scheduler_optimizer, unwrap_optimizer
from freezetune.training.param_groups import check_weight_decay, checked_lrs, group_stage, resolve_stage_lrs

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities import rank_zero_info
except ImportError:  # pragma: no cover - only without the extra
    raise MissingExtra(
        "freezetune.integrations.lightning needs lightning: pip install 'freezetune[lightning]'"
    ) from None


class FreezetuneFinetuning(Callback):
    """Freeze before fit, unfreeze stages on a schedule, keep the BatchNorm policy; DDP- and resume-safe.

    ``configure_optimizers`` builds the optimizer over the parameters that train at the start, ideally with
    ``ft.param_groups(self.model, lr, stage_lrs=..., decay=...)`` (one named group per stage); the callback adds a group
    for each stage it unfreezes, with the LR the same rule gives (``stage_lrs[name]``, else ``lr / decay**depth``),
    and extends the LR scheduler of that optimizer to drive it. With several optimizers it adds the groups to the
    first (driven by its own scheduler, wherever it is listed); a stage another one holds trains there (a warning says
    so), never in both. Lightning's warning "Found N module(s) in eval mode at the start of training" names the frozen
    BatchNorm layers, which stay in eval mode on purpose (``bn="frozen"`` or ``"affine-only"``). A second ``fit`` on
    the same Trainer (``max_epochs`` raised) goes on with the schedule, as a resume does; a new Trainer starts over.

    Args:
        freeze: What is frozen before training: ``"backbone"``, ``"all"``, an int, a stage name, a glob or a list.
        unfreeze: ``"epoch:N"``, ``"plateau:patience=P,min_delta=D,mode=max|min"``, ``{epoch: spec}`` or None.
            What a schedule opens at the end of epoch ``e`` trains from epoch ``e + 1``.
        bn: BatchNorm policy in the frozen parts: ``"frozen"``, ``"affine"``, ``"train"`` or ``"affine-only"``.
        dropout: dropout and drop path in the frozen stages before the first that trains: ``"off"`` (as at
            inference) or ``"keep"``, as in ``ft.freeze``.
        lr: The head's LR for the rule; None takes it from the optimizer group named after the head (else group 0).
        stage_lrs: Per-stage LRs, as in ``ft.param_groups``.
        decay: LR divisor per stage of depth, as in ``ft.param_groups``.
        weight_decay: Weight decay of the groups added later; None: that of the optimizer's decaying groups (biases
            and norms get a ``/no_decay`` twin with 0 unless it is 0).
        monitor: The logged metric a plateau schedule watches (rank 0's value decides for every rank; None for
            another schedule); a name with "loss" in it improves as it falls, any other as it rises, unless the
            schedule says ``mode=``. An epoch whose value no validation gave (``check_val_every_n_epoch``,
            validation by steps), or that a resume started after (a checkpoint saved before its value was logged)
            counts neither as a stall nor a gain.
        module: The LightningModule attribute holding the network; None for the LightningModule itself.

    >>> import lightning.pytorch as L  # doctest: +SKIP
    >>> cb = FreezetuneFinetuning("backbone", "plateau:patience=2", stage_lrs={"layer4": 1e-4}, monitor="val_acc")
    >>> L.Trainer(callbacks=[cb], strategy="ddp").fit(lit_module)  # doctest: +SKIP
    """

    def __init__(
        self,
        freeze: Spec = FREEZE_DEFAULT,
        unfreeze: str | Mapping[int, Spec] | None = "epoch:1",
        *,
        bn: str = BN_DEFAULT,
        dropout: str = DROPOUT_DEFAULT,
        lr: float | None = None,
        stage_lrs: Mapping[str, float] | str | None = None,
        decay: float | None = None,
        weight_decay: float | None = None,
        monitor: str | None = TrainConfig.monitor,
        module: str | None = "model",
    ) -> None:
        check_bn_policy(bn)
        check_dropout_policy(dropout)
        check_weight_decay(weight_decay)
        self.freeze_spec, self.schedule = freeze, parse_schedule(unfreeze if unfreeze is not None else {})
        if not (isinstance(monitor, str) and monitor) and (monitor is not None or self.schedule.kind == "plateau"):
            # said now: None failed at fit start whatever the schedule, another type at a plateau's first judgment
            raise ConfigError(f"monitor= names the logged metric a plateau schedule watches, as given to self.log "
                              f"('val_acc', 'val_loss'...; None without a plateau); got {monitor!r}")  # fmt: skip
        self.bn, self.lr, self.stage_lrs, self.decay = bn, lr, checked_lrs(lr, stage_lrs, decay, lr_given=False), decay
        self.weight_decay, self.monitor, self.module, self.dropout = weight_decay, monitor, module, dropout
        self.unfreezer: Unfreezer | None = None
        self._stage: str | None = None  # Lightning's stage at the last setup: "fit", "validate", "test", "predict"
        self._quiet: tuple | None = None  # the warnings filter silencing Lightning's eval-mode warning, while it is on
        self._reset()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(freeze=repr(self.freeze_spec), module=self.module)

    def _reset(self) -> None:
        self.unfreezer = None
        self._built_late = False  # the network did not exist at setup: built by the module's setup()/configure_model()
        self._pending: dict | None = None  # Unfreezer state from a checkpoint, applied once the optimizer exists
        self._stepped = -1  # the last epoch whose end the schedule has seen
        self._metric: tuple[int, float] | None = None  # (epoch, value) of the last monitored value
        self._from_validation = False  # the monitor is a validation metric: only a validation loop gives a new value
        self._before_validation: object = None  # the monitor's callback_metrics entry as the validation loop started
        self._validated = -1  # the last epoch a validation loop ended in
        self._ended = -1  # the last epoch whose on_train_epoch_end ran: every metric of it had been logged by then
        self._reduced_by_ddp: set[int] = set()

    # --- hooks, in the order Lightning calls them ------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = stage
        if stage != "fit":
            return
        # A second fit of this network on the same Trainer (max_epochs raised) goes on from Lightning's epoch: so does
        # the schedule. configure_optimizers builds a new optimizer over what trains at the start, so, as on a resume,
        # the network is frozen again and the stages opened so far get their groups back at fit start.
        carried = self.state_dict() if self._continues(trainer, pl_module) else None
        self._reset()
        if carried is not None:
            self.load_state_dict(carried)
        elif (epoch := getattr(trainer, "current_epoch", 0)) > 0:  # another network fitted on from a Trainer's
            self._stepped = self._ended = epoch - 1  # later epoch: its schedule starts there (not its epochs before)
        # Lightning calls the module's setup() and configure_model() after this: a network built there does not exist
        # yet, and is frozen at fit start (on one device; under DDP that is after the wrap: refused there)
        self._built_late = not self._exists(pl_module)
        if not self._built_late:
            # Before the strategy wraps the model: DDP then registers exactly the parameters that train from the start.
            freeze(self._network(pl_module), self.freeze_spec, bn=self.bn, dropout=self.dropout)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """A fit's ``ckpt_path`` saved by this callback with another freeze spec (or ``module``) is refused, naming
        it: Lightning matches a callback's state by its ``state_key``, dropped it with a warning about callbacks in
        general, and torch then refused the optimizer's groups ("loaded state dict contains a parameter group that
        doesn't match the size of optimizer's group")."""
        saved = [key for key in checkpoint.get("callbacks", {}) if key.startswith(type(self).__name__)]
        if self._stage != "fit" or not saved or self.state_key in saved:
            return
        made = "; ".join(_key_settings(key) for key in saved)
        raise ConfigError(f"the checkpoint was saved by {type(self).__name__} with {made}, and this one has "
                          f"{_key_settings(self.state_key)}: its optimizer holds the groups of what that freeze "
                          "trained and opened; resume with the same freeze and module (or start a new fit without "
                          "ckpt_path)")  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._stage not in (None, "fit"):
            # test/validate/predict with ckpt_path restore callbacks too: the weights are all they need, and the
            # fit's unfreezer, whose groups differ from an earlier checkpoint's, refused the load
            return
        self._stepped = int(state_dict["stepped_epoch"])
        self._metric = tuple(state_dict["metric"]) if state_dict["metric"] is not None else None
        earlier = "ended_epoch" not in state_dict  # a state saved by a freezetune before the epoch records below
        # (its from_validation was set for a training metric too whenever a validation loop ran, and it kept no
        # record of the epoch it was saved in: that epoch counts as not seen to end, as a last-batch save is)
        self._from_validation = bool(state_dict.get("from_validation", False)) and not earlier
        self._validated = int(state_dict.get("validated_epoch", -1))
        self._ended = int(state_dict.get("ended_epoch", self._stepped))
        if self.unfreezer is None:
            self._pending = state_dict["unfreezer"]  # the usual order: the optimizer does not exist yet
        else:
            self.unfreezer.load_state_dict(state_dict["unfreezer"])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self._network(pl_module)
        _check_strategy(trainer)
        if self._built_late and isinstance(trainer.strategy.model, nn.parallel.DistributedDataParallel):
            # frozen after DDP registered every parameter (on one device too: strategy="ddp" wraps it), the frozen
            # ones' gradients never came: DDP's "parameters that were not used in producing the loss"
            raise ConfigError(
                f"FreezetuneFinetuning freezes before DDP wraps the model, in its setup hook, and "
                f"{self._what()} did not exist then (Lightning builds it in setup()/configure_model() after the "
                "callbacks' setup): under DDP, build it in the LightningModule's __init__"
            )
        # Again after strategy.setup: sync_batchnorm=True swaps the BatchNorm modules, dropping their frozen policy.
        freeze(net, self.freeze_spec, bn=self.bn, dropout=self.dropout)
        # DDP has just wrapped the model: what trains now is exactly what its reducer all-reduces; gradients of
        # anything unfrozen from here on are all-reduced by on_after_backward.
        self._reduced_by_ddp = {id(p) for p in pl_module.parameters() if p.requires_grad}
        optimizer = _first_optimizer(trainer)
        self.unfreezer = Unfreezer(
            net,
            optimizer,
            self.schedule,
            lr=self._head_lr(net, optimizer),
            stage_lrs=self.stage_lrs,
            decay=self.decay,
            bn=self.bn,
            weight_decay=self.weight_decay,
            scheduler=_scheduler_of(trainer, optimizer),
            mode="min" if "loss" in (self.monitor or "").lower() else "max",  # a schedule's own mode= wins
            held_elsewhere=[p for other in trainer.optimizers[1:] for g in other.param_groups for p in g["params"]],
        )
        if self._pending is not None:
            # Before restore_training_state loads the optimizer: its groups must match the checkpoint's in number
            # and order, so the stages unfrozen before the checkpoint get their groups back here.
            self.unfreezer.load_state_dict(self._pending)
            self._pending = None
        trainable, total = count_parameters(net)
        kept, others = self._expect_frozen_norms_in_eval(pl_module)
        rank_zero_info(
            f"freezetune: {trainable:,} of {total:,} parameters train; unfrozen {self.unfreezer.unfrozen}"
            + (f"; {kept} frozen BatchNorm layer(s) keep their statistics (eval mode)" if kept else "")
            + (
                f"; Lightning's count of modules in eval mode holds them and {len(others)} not of freezetune's doing: "
                f"{_listed(others)}"
                if kept and others
                else ""
            )  # fmt: skip
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unquiet()  # Lightning warned (or not) just before this hook: the filter has done its one job

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._unquiet()  # a fit that stopped before training started (an error, Ctrl-C): teardown is not called then

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A training metric stays in callback_metrics through validation, the previous epoch's value until this epoch
        # ends: the monitor is a validation metric only where the validation loop put a new entry there.
        self._before_validation = trainer.callback_metrics.get(self.monitor)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Recorded here, before ModelCheckpoint (Lightning runs checkpoint callbacks last) saves our state with it.
        if trainer.sanity_checking:
            return
        self._validated = trainer.current_epoch
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and value is not self._before_validation:
            self._from_validation = True
            self._record_metric(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # runs without a validation loop too: a training metric can be monitored. A validation metric is not: in an
        # epoch without validation (check_val_every_n_epoch) its value is the last validation's, no new evidence
        self._ended = trainer.current_epoch
        if not self._from_validation:
            self._record_metric(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The schedule sees the end of epoch e at the start of e + 1, so a checkpoint written anywhere in between
        # (validation end, train epoch end) resumes into the same step instead of skipping it.
        self._catch_up(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # A resume from a checkpoint saved on an epoch's last batch goes on into the next epoch without calling
        # on_train_epoch_start (Lightning restarts it "mid-epoch"): that epoch's step is taken before its first batch.
        self._catch_up(trainer)

    def _catch_up(self, trainer: pl.Trainer) -> None:
        """Step the schedule through the end of every epoch before this one it has not stepped: the last one, and on
        such a resume, or a second ``fit``, each one before it too."""
        if self.unfreezer is not None:
            for epoch in range(self._stepped + 1, trainer.current_epoch):
                self._step(trainer, epoch)

    def _step(self, trainer: pl.Trainer, epoch: int) -> None:
        # Every rank must open the same stages (a rank that unfreezes alone would all-reduce gradients no other
        # rank sends), so all follow rank 0's metric, whatever each logged without sync_dist.
        metric = trainer.strategy.broadcast(self._metric[1] if self._metric and self._metric[0] == epoch else None)
        if metric is None and self.schedule.kind == "plateau":
            if self._ended >= epoch and self._validated_after(trainer, epoch):
                logged = choices(sorted(trainer.callback_metrics)) or "none"
                raise ConfigError(f"FreezetuneFinetuning monitors {self.monitor!r}, not logged in epoch {epoch}; "
                                  f"logged metrics: {logged}")  # fmt: skip
            # no validation after that epoch, or a resume from before its end (its value was never recorded):
            # nothing to judge a plateau by
            self._stepped = epoch
            return
        opened = self.unfreezer.step(epoch, metric)
        self._stepped = epoch
        if opened:
            rank_zero_info(f"freezetune: unfroze {', '.join(opened)} after epoch {epoch}")

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The gradients DDP skips, those of the stages unfrozen after it wrapped the model, averaged here in one
        # collective. Not by a new DDP wrapper (freezetune's trainer wraps again): Lightning owns it, and swapping it
        # mid-fit goes through private API. Not by registering every parameter with DDP: frozen ones would need
        # find_unused_parameters=True and all-reduce zeros for the whole backbone every step. Here rather than in
        # on_before_optimizer_step: that one runs after AMP's unscale_, whose inf/NaN check would then see each rank's
        # own gradients and could skip the step on one rank only. With gradient accumulation this averages every
        # micro-batch; the average is linear, so the accumulated sum is still the average.
        if trainer.world_size > 1:
            average_grads([p for p in pl_module.parameters() if p.requires_grad and id(p) not in self._reduced_by_ddp])

    def state_dict(self) -> dict[str, Any]:
        unfreezer = self.unfreezer.state_dict() if self.unfreezer is not None else self._pending
        return {"unfreezer": unfreezer, "stepped_epoch": self._stepped, "metric": self._metric,
                "from_validation": self._from_validation, "validated_epoch": self._validated,
                "ended_epoch": self._ended}  # fmt: skip

    # --- helpers ---------------------------------------------------------------------------------------------

    def _network(self, pl_module: pl.LightningModule) -> nn.Module:
        """The module freezetune's stages are read from: ``pl_module.<module>``, or ``pl_module`` when None."""
        if self.module is None:
            return pl_module
        net = getattr(pl_module, self.module, None)
        if not isinstance(net, nn.Module):
            children = [name for name, _ in pl_module.named_children()]
            listed = f"one of {choices(children)} or None (the whole LightningModule)" if children else \
                "None (the whole LightningModule: it has no submodule)"  # fmt: skip
            raise ConfigError(f"the LightningModule has no submodule {self.module!r}; pass module= {listed}")
        return net

    def _exists(self, pl_module: pl.LightningModule) -> bool:
        """Whether the network is there to freeze: ``module`` is a module (a typo is named at fit start), or, with
        ``module=None``, the LightningModule has parameters."""
        if self.module is None:
            return any(True for _ in pl_module.parameters())
        return isinstance(getattr(pl_module, self.module, None), nn.Module)

    def _continues(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether this fit goes on from one this callback ran: same network, and the Trainer past epoch 0."""
        net = self._network(pl_module) if self._exists(pl_module) else None
        return self.unfreezer is not None and self.unfreezer.model is net and trainer.current_epoch > 0

    def _what(self) -> str:
        return "the LightningModule's network" if self.module is None else f"its submodule {self.module!r}"

    def _expect_frozen_norms_in_eval(self, pl_module: pl.LightningModule) -> tuple[int, list[str]]:
        """How many BatchNorm layers are in eval mode, by the frozen policy; Lightning's start-of-fit warning about
        them ("found N module(s) in eval mode ... if this is intentional, you can ignore this warning") is silenced
        for that exact count, until training starts (``_unquiet``): the filter is process-wide, and a later fit of the
        user's own in the same notebook must still hear it. The frozen stages' dropout layers ``dropout="off"`` holds
        count as those layers do; any other module left in eval mode changes the count, and the warning shows: the
        names of those others (the count, and the user's line, said nothing of which they were) are returned too."""
        in_eval = [(name, m) for name, m in pl_module.named_modules() if not m.training]
        kept = sum(keeps_stats(m) for _, m in in_eval)
        others = [f"{name or '(the module itself)'} ({type(m).__name__})" for name, m in in_eval
                  if not (keeps_stats(m) or held(m))]  # (held: dropout="off"'s layers)  # fmt: skip
        if not in_eval or others:
            return kept, others
        self._unquiet()
        message = re.escape(f"Found {len(in_eval)} module(s) in eval mode at the start")
        warnings.filterwarnings("ignore", message=message)
        self._quiet = warnings.filters[0]  # filterwarnings puts it first
        return kept, []

    def _unquiet(self) -> None:
        # an "ignore" entry leaves nothing in the modules' warning registries: taking it out of the list is enough
        if self._quiet is not None and self._quiet in warnings.filters:
            warnings.filters.remove(self._quiet)
        self._quiet = None

    def _record_metric(self, trainer: pl.Trainer) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            self._metric = (trainer.current_epoch, float(value))

    def _validated_after(self, trainer: pl.Trainer, epoch: int) -> bool:
        """Whether Lightning ran the validation loop after ``epoch``: every ``check_val_every_n_epoch``-th epoch; with
        None it validates every ``val_check_interval`` steps, across epochs, so only the epochs one ended in."""
        every = trainer.check_val_every_n_epoch
        return self._validated == epoch if every is None else (epoch + 1) % every == 0

    def _head_lr(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        """The rule's ``lr``: as given, else read from the optimizer's group of the head (else group 0); where
        ``stage_lrs`` sets the head's own, from a group of a stage the rule gives ``lr / decay**depth`` (the head's
        group held the stage_lrs value, and every stage unfrozen later trained at ``decay`` times its LR)."""
        if self.lr is not None:
            return float(self.lr)
        names = [s.name for s in stages(net)]
        explicit, head = resolve_stage_lrs(self.stage_lrs, names), names[-1]
        named: dict[str, dict] = {}
        for group in optimizer.param_groups:  # each stage's first group (param_groups: before its /no_decay twin)
            named.setdefault(group_stage(group), group)
        if head not in explicit:
            # a scheduler may already have moved "lr"; OneCycleLR's initial_lr is not its LR
            return nominal_lr(named.get(head, optimizer.param_groups[0]))
        ruled = [n for n in names if n not in explicit]
        if not ruled:  # every stage has its own LR: the rule's lr gives none
            return float(explicit[head])
        for depth, name in enumerate(reversed(names)):
            if name in ruled and name in named:
                return nominal_lr(named[name]) * (self.decay or 1.0) ** depth
        raise ConfigError(
            f"FreezetuneFinetuning needs lr= here: stage_lrs sets the head's LR ({head}={explicit[head]:g}) and no "
            f"optimizer group of another stage shows the rule's lr, which {choices(ruled)} would unfreeze at; pass "
            "the lr given to ft.param_groups"
        )


def _check_strategy(trainer: pl.Trainer) -> None:
    if trainer.world_size > 1 and not isinstance(trainer.strategy.model, nn.parallel.DistributedDataParallel):
        raise ConfigError(
            f"FreezetuneFinetuning supports one device or DDP ({choices(['ddp', 'ddp_spawn', 'ddp_notebook'])}); "
            f"this trainer uses {type(trainer.strategy).__name__}"
        )


def _first_optimizer(trainer: pl.Trainer) -> torch.optim.Optimizer:
    if not trainer.optimizers:
        raise ConfigError("FreezetuneFinetuning needs an optimizer: configure_optimizers returned none")
    return trainer.optimizers[0]


def _scheduler_of(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> object | None:
    # with several optimizers the first scheduler may drive another one: extended, it grew lists for groups it never had
    configs = trainer.lr_scheduler_configs
    return next((c.scheduler for c in configs if scheduler_optimizer(c.scheduler) is unwrap_optimizer(optimizer)), None)


def _key_settings(key: str) -> str:
    """The freeze spec and module a callback ``state_key`` names, as a user writes them: ``freeze='backbone',
    module='model'`` (the key itself where it does not read so).

    >>> _key_settings("FreezetuneFinetuning" + repr({"freeze": repr("backbone"), "module": "model"}))
    "freeze='backbone', module='model'"
    """
    import ast

    try:
        settings = ast.literal_eval(key[key.index("{") :])
        return f"freeze={settings['freeze']}, module={settings['module']!r}"
    except (ValueError, SyntaxError, KeyError, TypeError):
        return key


def _listed(names: list[str], limit: int = 5) -> str:
    """The first ``limit`` of ``names``, and how many more.

    >>> _listed(["a", "b"]), _listed(list("abcdefg"), limit=2)
    ('a, b', 'a, b and 5 more')
    """
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
