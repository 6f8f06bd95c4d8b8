"""FreezetuneFinetuning with Lightning's real Trainer on CPU: unfreeze-and-train, DDP across two ranks, resume."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.optim.lr_scheduler import LambdaLR

import freezetune as ft
from _lightning_fixtures import FAST, LitTiny, loaders
from conftest import TinyCNN, clone_params
from freezetune.errors import ConfigError, FreezetuneError
from freezetune.integrations import lightning as lightning_mod
from freezetune.integrations.lightning import FreezetuneFinetuning

pytestmark = pytest.mark.usefixtures("single_thread_module")
TESTS = Path(__file__).resolve().parent


class Probe(Callback):
    """Records, at the start of each epoch and of training, what trains and which optimizer groups exist."""

    def __init__(self) -> None:
        self.seen: dict[str, dict] = {}

    def _record(self, key: str, trainer: L.Trainer, lit: LitTiny) -> None:
        opt = trainer.optimizers[0]
        self.seen[key] = {
            "trainable": [n for n, m in lit.model.named_children() if any(p.requires_grad for p in m.parameters())],
            "groups": {g["name"]: g["lr"] for g in opt.param_groups},
            "block3_steps": [int(opt.state[p]["step"]) for p in lit.model.block3.parameters() if p in opt.state],
        }

    def on_train_start(self, trainer, lit) -> None:
        self._record("train_start", trainer, lit)

    def on_train_epoch_start(self, trainer, lit) -> None:
        self._record(f"epoch{trainer.current_epoch}", trainer, lit)


def test_a_stage_unfrozen_after_epoch_0_trains_with_its_lr_while_frozen_batchnorm_stays_put():
    lit, probe = LitTiny(), Probe()
    before = clone_params(lit.model)
    bn1 = lit.model.block1[1].running_mean.clone()
    callback = FreezetuneFinetuning("backbone", "epoch:1", stage_lrs={"block3": 1e-3})
    trainer = L.Trainer(max_epochs=2, enable_checkpointing=False, callbacks=[callback, probe], **FAST)
    trainer.fit(lit, *loaders())
    assert probe.seen["epoch0"]["trainable"] == ["head"] and list(probe.seen["epoch0"]["groups"]) == ["head"]
    assert probe.seen["epoch1"]["trainable"] == ["block3", "head"]
    assert probe.seen["epoch1"]["groups"] == {"head": 1e-2, "block3": 1e-3}
    after = clone_params(lit.model)
    assert not torch.equal(after["block3.0.weight"], before["block3.0.weight"])  # trained during epoch 1
    assert torch.equal(after["block2.0.weight"], before["block2.0.weight"])
    # Lightning calls model.train() every epoch: the frozen BatchNorm still never updated its statistics
    assert torch.equal(lit.model.block1[1].running_mean, bn1) and not lit.model.block1[1].training


class LitTwoOptimizers(LitTiny):
    """Manual optimization: one optimizer for the head, another for the rest of the network."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        body = [p for n, p in self.model.named_parameters() if not n.startswith("head")]
        return [torch.optim.AdamW(self.model.head.parameters(), lr=1e-2), torch.optim.SGD(body, lr=1e-2)]


def test_a_stage_another_optimizer_holds_is_opened_but_not_added_to_the_first():
    # the callback added block3 to optimizer 0 although optimizer 1 held it: each step updated it twice, unsaid
    lit = LitTwoOptimizers()
    callback = FreezetuneFinetuning("backbone", "epoch:1")
    trainer = L.Trainer(max_epochs=2, enable_checkpointing=False, callbacks=[callback], **FAST)
    with pytest.warns(UserWarning, match=r"stage\(s\) 'block3' are in another optimizer: they train there"):
        trainer.fit(lit, *loaders())
    first, second = ({id(p) for g in opt.param_groups for p in g["params"]} for opt in trainer.optimizers)
    assert not first & second
    assert all(p.requires_grad and id(p) in second for p in lit.model.block3.parameters())


class LitTwoSchedulers(LitTwoOptimizers):
    """The head's optimizer first, its LambdaLR listed second: the first scheduler Lightning holds is the body's."""

    def configure_optimizers(self):
        head = torch.optim.AdamW(ft.param_groups(self.model, 1e-2, weight_decay=0))
        body = torch.optim.SGD(self.model.stem.parameters(), lr=1e-2)
        return [head, body], [LambdaLR(body, lambda epoch: 1.0), LambdaLR(head, lambda epoch: 0.5**epoch)]

    def on_train_epoch_end(self) -> None:
        for scheduler in self.lr_schedulers():  # manual optimization: the module steps them
            scheduler.step()


def test_a_stage_added_to_the_first_optimizer_follows_that_optimizers_scheduler_not_the_first_listed():
    # the first listed was extended: the body's LambdaLR grew a lambda for a group it lacks, the head's none for
    # block3, and the next scheduler step failed in zip()
    lit = LitTwoSchedulers()
    trainer = L.Trainer(max_epochs=3, enable_checkpointing=False, callbacks=[FreezetuneFinetuning("backbone", "epoch:1",
                        stage_lrs={"block3": 1e-3})], **FAST)  # fmt: skip
    trainer.fit(lit, *loaders())
    lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    assert lrs["head"] == pytest.approx(1e-2 * 0.5**3) and lrs["block3"] == pytest.approx(1e-3 * 0.5**3)
    assert [g["lr"] for g in trainer.optimizers[1].param_groups] == [1e-2]


class LitTimmOptimizer(LitTiny):
    """``configure_optimizers`` by timm's ``create_optimizer_v2``: its no-decay group (biases, norms), unnamed, first."""

    def configure_optimizers(self):
        from timm.optim import create_optimizer_v2

        return create_optimizer_v2(self.model, "adamw", lr=self.lr, weight_decay=0.05)


def test_a_stage_opened_under_timms_optimizer_takes_its_weight_decay_not_its_no_decay_groups():
    # the callback's weight_decay None took the first group's: timm's no-decay one, and block3 trained without decay
    trainer = L.Trainer(max_epochs=2, enable_checkpointing=False, callbacks=[FreezetuneFinetuning("backbone", "epoch:1")],
                        **FAST)  # fmt: skip
    trainer.fit(LitTimmOptimizer(), *loaders())
    decays = {g.get("name"): g["weight_decay"] for g in trainer.optimizers[0].param_groups}
    assert decays["block3"] == 0.05 and decays["block3/no_decay"] == 0.0


def test_frozen_batchnorm_in_eval_mode_does_not_raise_lightnings_warning_but_another_module_does():
    # Lightning warns at fit start about every module in eval mode ("if this is intentional, you can ignore this
    # warning"): the frozen BatchNorm layers are, by design; a module the user left in eval mode is not
    def eval_mode_warnings(lit: LitTiny, **kw) -> list[str]:
        trainer = L.Trainer(max_epochs=1, enable_checkpointing=False,
                            callbacks=[FreezetuneFinetuning("backbone", **kw)], **FAST)  # fmt: skip
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            trainer.fit(lit, *loaders())
        return [str(w.message) for w in seen if "in eval mode" in str(w.message)]

    assert eval_mode_warnings(LitTiny()) == []
    lit = LitTiny()
    lit.model.block3[0].eval()  # a convolution: not the freezing's doing
    said = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lightning_mod, "rank_zero_info", said.append)
        assert len(eval_mode_warnings(lit)) == 1
    # Lightning's count holds the frozen BatchNorm layers too: which module is the user's to look at is said, and the
    # BatchNorm note stays (it was dropped, the count left unexplained)
    assert said[0].endswith("; 4 frozen BatchNorm layer(s) keep their statistics (eval mode); Lightning's count of "
                            "modules in eval mode holds them and 1 not of freezetune's doing: model.block3.0 "
                            "(Conv2d)"), said  # fmt: skip
    lit = LitTiny()  # a frozen stage's dropout held as at inference (dropout="off"): the freezing's doing too
    lit.model.block1.append(torch.nn.Dropout(0.2))
    assert eval_mode_warnings(lit, dropout="off") == [] and not lit.model.block1[3].training


def test_the_eval_mode_warning_is_silenced_for_that_fit_alone():
    # the filter stayed in the process: a later fit of the user's own, same count of modules in eval mode, was silent
    def ours() -> list:
        return [f for f in warnings.filters if f[1] is not None and "eval\\ mode" in f[1].pattern]  # re.escape'd

    trainer = L.Trainer(max_epochs=1, enable_checkpointing=False, callbacks=[FreezetuneFinetuning("backbone")], **FAST)
    trainer.fit(LitTiny(), *loaders())
    assert ours() == []

    class Boom(Callback):  # after ours: a fit stopped before training starts
        def on_fit_start(self, trainer, pl_module):
            raise RuntimeError("boom")

    trainer = L.Trainer(max_epochs=1, callbacks=[FreezetuneFinetuning("backbone"), Boom()], **FAST)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(LitTiny(), *loaders())
    assert ours() == []


def test_resume_after_an_unfreeze_keeps_the_stage_and_its_optimizer_state(tmp_path):
    cb1 = FreezetuneFinetuning("backbone", "epoch:1", stage_lrs={"block3": 1e-3})
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)  # saves at validation end, after epoch 1's unfreeze
    L.Trainer(max_epochs=2, callbacks=[cb1, saver], **FAST).fit(LitTiny(), *loaders())

    lit, probe = LitTiny(), Probe()
    cb2 = FreezetuneFinetuning("backbone", "epoch:1", stage_lrs={"block3": 1e-3})
    trainer = L.Trainer(max_epochs=3, enable_checkpointing=False, callbacks=[cb2, probe], **FAST)
    trainer.fit(lit, *loaders(), ckpt_path=tmp_path / "last.ckpt")
    # after Lightning restored the optimizer: block3 trains, has its group and its Adam state from epoch 1 (4 steps)
    assert probe.seen["train_start"]["trainable"] == ["block3", "head"]
    assert probe.seen["train_start"]["groups"] == {"head": 1e-2, "block3": 1e-3}
    assert probe.seen["train_start"]["block3_steps"] == [4, 4, 4]
    # and the schedule goes on from where it was: block2 opens after epoch 1, exactly once
    assert probe.seen["epoch2"]["trainable"] == ["block2", "block3", "head"]
    assert [g["name"] for g in trainer.optimizers[0].param_groups] == ["head", "block3", "block2"]


@pytest.mark.parametrize("spec", [1, "block*"])
def test_a_resume_with_another_freeze_spec_is_refused_naming_the_one_the_checkpoint_was_saved_with(tmp_path, spec):
    # Lightning dropped the callback's state (its key names the spec) and torch refused the optimizer's groups
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    L.Trainer(max_epochs=2, callbacks=[FreezetuneFinetuning("backbone", "epoch:1"), saver], **FAST).fit(
        LitTiny(), *loaders()
    )
    trainer = L.Trainer(max_epochs=3, enable_checkpointing=False, callbacks=[FreezetuneFinetuning(spec, "epoch:1")],
                        **FAST)  # fmt: skip
    with pytest.raises(ConfigError) as err:
        trainer.fit(LitTiny(), *loaders(), ckpt_path=tmp_path / "last.ckpt")
    assert str(err.value).startswith("the checkpoint was saved by FreezetuneFinetuning with freeze='backbone', "
                                     f"module='model', and this one has freeze={spec!r}, module='model': ")  # fmt: skip
    # the same spec resumes (validate with another spec too: the weights are all it needs)
    L.Trainer(max_epochs=3, enable_checkpointing=False, callbacks=[FreezetuneFinetuning("backbone", "epoch:1")],
              **FAST).fit(LitTiny(), *loaders(), ckpt_path=tmp_path / "last.ckpt")  # fmt: skip
    L.Trainer(callbacks=[FreezetuneFinetuning(spec)], enable_checkpointing=False, default_root_dir=tmp_path,
              **FAST).validate(LitTiny(), loaders()[1], ckpt_path=tmp_path / "last.ckpt", verbose=False)  # fmt: skip


@pytest.mark.parametrize("schedule", ["epoch:1", "plateau:patience=1"])
def test_a_resume_from_a_checkpoint_saved_on_an_epochs_last_batch_takes_that_epochs_step(tmp_path, schedule):
    # Lightning resumes it into the next epoch without on_train_epoch_start: the step for the epoch the checkpoint
    # was saved in was never taken (block2 did not open after epoch 1, and the schedule ran an epoch late)
    def fit(epochs: int, **kw) -> FreezetuneFinetuning:
        callback = FreezetuneFinetuning("backbone", schedule)
        saver = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_last=True)] if epochs == 2 else []
        L.Trainer(max_epochs=epochs, callbacks=[callback, *saver], enable_checkpointing=bool(saver),
                  **FAST).fit(LitTiny(rank_metric=True), *loaders(), **kw)  # fmt: skip
        return callback

    whole = fit(4).unfreezer.events
    fit(2)  # 4 batches an epoch: the last checkpoint is epoch 1's last batch, before its validation
    resumed = fit(4, ckpt_path=tmp_path / "last.ckpt").unfreezer
    if schedule == "epoch:1":
        assert resumed.events == whole == [(0, ["block3"]), (1, ["block2"]), (2, ["block1"])]
    else:  # a constant val_acc: a stall from epoch 1 on (an opened stage's first epoch sets its own best); Lightning
        # skips epoch 1's validation on this resume, so its stall is not counted (no error for its missing value), and
        # the next one opens block3
        assert whole == [(1, ["block3"])] and resumed.events == [(2, ["block3"])]  # (the last epoch is not stepped)


def test_a_second_fit_on_the_same_trainer_goes_on_with_the_schedule():
    # the second fit froze the network again and started the schedule over at Lightning's epoch 3: the stage the
    # first had opened was closed, the plateau's count and values lost, and nothing opened again
    lit = LitTiny(rank_metric=True)  # a constant val_acc: a stall from epoch 1 on, and each opened stage's second epoch
    callback = FreezetuneFinetuning("backbone", "plateau:patience=1", stage_lrs={"block3": 1e-3})
    trainer = L.Trainer(max_epochs=3, enable_checkpointing=False, callbacks=[callback], **FAST)
    trainer.fit(lit, *loaders())
    trainer.fit_loop.max_epochs = 5
    trainer.fit(lit, *loaders())
    assert callback.unfreezer.events == [(1, ["block3"]), (3, ["block2"])]  # as one fit of 5
    groups = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}  # the second fit's optimizer
    assert groups == {"head": 1e-2, "block3": 1e-3, "block2": 1e-2}  # stage_lrs, else lr
    L.Trainer(max_epochs=1, enable_checkpointing=False, callbacks=[callback], **FAST).fit(lit, *loaders())
    assert callback.unfreezer.unfrozen == []  # a new Trainer is a new run: from epoch 0, frozen as at the start


def test_a_second_fit_of_another_network_on_a_trainer_starts_its_schedule_at_that_epoch():
    # the schedule caught up on epochs 0-2, another network's, before the new one trained: three stages opened at once
    trainer = L.Trainer(max_epochs=3, enable_checkpointing=False, callbacks=[FreezetuneFinetuning("backbone")], **FAST)
    trainer.fit(LitTiny(), *loaders())
    callback = FreezetuneFinetuning("backbone", "epoch:1")
    trainer.callbacks = [callback]
    trainer.fit_loop.max_epochs = 5
    trainer.fit(LitTiny(), *loaders())
    assert callback.unfreezer.events == [(3, ["block3"])]  # after its first epoch, as a fit of its own


@pytest.mark.parametrize("monitor", ["val_acc", "train_loss"])
def test_a_checkpoint_of_the_callbacks_earlier_state_resumes(tmp_path, monitor):
    # a state saved before the epoch records: its last-batch checkpoint (saved before the epoch's validation) was
    # taken for one whose epoch had ended, and a training metric's from_validation (the earlier code set it whenever a
    # validation loop ran) was trusted: both resumes failed in "not logged"
    lit = LitTiny(rank_metric=True) if monitor == "val_acc" else LitTrainMetric()
    callback = FreezetuneFinetuning("backbone", "plateau:patience=1", monitor=monitor)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_last=True)
    L.Trainer(max_epochs=2, callbacks=[callback, saver], **FAST).fit(lit, *loaders())
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    (key,) = [k for k in ckpt["callbacks"] if "FreezetuneFinetuning" in k]
    state = ckpt["callbacks"][key]
    ckpt["callbacks"][key] = {k: v for k, v in state.items() if k not in ("validated_epoch", "ended_epoch")}
    ckpt["callbacks"][key]["from_validation"] = True  # as the earlier code left it beside a validation loop
    torch.save(ckpt, tmp_path / "earlier.ckpt")
    resumed = FreezetuneFinetuning("backbone", "plateau:patience=1", monitor=monitor)
    L.Trainer(max_epochs=4, callbacks=[resumed], enable_checkpointing=False, **FAST).fit(
        LitTiny(rank_metric=True) if monitor == "val_acc" else LitTrainMetric(), *loaders(),
        ckpt_path=tmp_path / "earlier.ckpt")  # fmt: skip
    # val_acc: a stall from epoch 1 on, epoch 1's not counted (as a resume of this version's state); train_loss falls
    assert resumed.unfreezer.events == ([(2, ["block3"])] if monitor == "val_acc" else [])


def test_validating_a_checkpoint_saved_before_an_unfreeze_after_the_fit_loads_it(tmp_path):
    # Lightning restores callback state for validate/test/predict too: the fit's unfreezer (block3 and block2 open)
    # refused the epoch-0 checkpoint's state (no stage open) and ckpt_path="best" failed after most fits
    cb = FreezetuneFinetuning("backbone", "epoch:1")
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    trainer = L.Trainer(max_epochs=3, callbacks=[cb, saver], **FAST)
    lit = LitTiny()
    trainer.fit(lit, *loaders())
    (scores,) = trainer.validate(lit, loaders()[1], ckpt_path=tmp_path / "epoch=0.ckpt", verbose=False)
    assert 0 <= scores["val_acc"] <= 1
    assert [g["name"] for g in trainer.optimizers[0].param_groups] == ["head", "block3", "block2"]  # the fit's own


def test_a_plateau_schedule_without_its_metric_names_the_logged_ones():
    callback = FreezetuneFinetuning("backbone", "plateau:patience=1", monitor="val_f1")
    trainer = L.Trainer(max_epochs=2, enable_checkpointing=False, callbacks=[callback], **FAST)
    with pytest.raises(ConfigError, match=r"monitors 'val_f1', not logged in epoch 0; logged metrics: 'val_acc'"):
        trainer.fit(LitTiny(), *loaders())


def test_a_plateau_counts_only_the_epochs_lightning_validated():
    # with check_val_every_n_epoch=2 the callback raised "not logged in epoch 0"; an epoch without validation holds
    # the last validation's value, no evidence of a stall
    callback = FreezetuneFinetuning("backbone", "plateau:patience=1")
    trainer = L.Trainer(max_epochs=6, check_val_every_n_epoch=2, enable_checkpointing=False, callbacks=[callback],
                        **FAST)  # fmt: skip
    trainer.fit(LitTiny(rank_metric=True), *loaders())  # rank 0 logs a constant val_acc: every validation stalls
    assert callback.unfreezer.events == [(3, ["block3"])]  # validated after epochs 1, 3 and 5; the first sets best


class LitTrainMetric(LitTiny):
    """Logs ``train_loss`` per epoch, falling every epoch (1, 1/2, 1/3...): a plateau on it never stalls."""

    def training_step(self, batch, batch_idx):
        self.log("train_loss", 1.0 / (1 + self.current_epoch), on_step=False, on_epoch=True)
        return super().training_step(batch, batch_idx)


def test_a_plateau_on_a_training_metric_judges_each_epochs_own_value_with_a_validation_loop_too():
    # at validation end callback_metrics still held the previous epoch's train_loss: epoch 1 was judged by epoch 0's
    # value (no improvement) and block3 opened after it
    callback = FreezetuneFinetuning("backbone", "plateau:patience=1", monitor="train_loss")
    trainer = L.Trainer(max_epochs=3, enable_checkpointing=False, callbacks=[callback], **FAST)
    trainer.fit(LitTrainMetric(), *loaders())
    assert callback.unfreezer.events == []
    assert callback.unfreezer.best == pytest.approx(1 / 2)  # epoch 1's (epoch 2's end is never stepped)


def test_a_plateau_counts_only_the_epochs_a_validation_by_steps_ended_in():
    # check_val_every_n_epoch=None was read as a validation after every epoch: "not logged in epoch 0"
    callback = FreezetuneFinetuning("backbone", "plateau:patience=1")
    trainer = L.Trainer(max_epochs=4, check_val_every_n_epoch=None, val_check_interval=6, enable_checkpointing=False,
                        callbacks=[callback], **FAST)  # fmt: skip
    trainer.fit(LitTiny(rank_metric=True), *loaders())  # 4 batches an epoch: validated at steps 6 and 12, every stall
    assert callback.unfreezer.events == [(2, ["block3"])]  # in epochs 1 and 2; epoch 1's value sets best


def test_a_monitor_is_a_metric_name_and_none_is_refused_for_a_plateau_alone():
    # None failed at fit start in an AttributeError, whatever the schedule; a plateau needs a name, checked when built
    for monitor in (None, "", 3):
        with pytest.raises(ConfigError, match=rf"monitor= names the logged metric .*; got {monitor!r}$"):
            FreezetuneFinetuning("backbone", "plateau:patience=1", monitor=monitor)
    with pytest.raises(ConfigError, match="got 3$"):
        FreezetuneFinetuning("backbone", "epoch:1", monitor=3)
    callback = FreezetuneFinetuning("backbone", "epoch:1", monitor=None)
    L.Trainer(max_epochs=2, enable_checkpointing=False, callbacks=[callback], **FAST).fit(LitTiny(), *loaders())
    assert callback.unfreezer.events == [(0, ["block3"])]


def test_an_unknown_module_attribute_lists_the_children():
    callback = FreezetuneFinetuning(module="backbone")
    trainer = L.Trainer(max_epochs=1, enable_checkpointing=False, callbacks=[callback], **FAST)
    with pytest.raises(ConfigError, match=r"no submodule 'backbone'; pass module= one of 'model'"):
        trainer.fit(LitTiny(), *loaders())


@pytest.mark.multiprocess
def test_ddp_ranks_unfreeze_together_and_stay_identical(tmp_path):
    # rank 0 logs a plateau, rank 1 an improving metric: only rank 0's decision, broadcast, unfreezes both
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS.parents[1] / "src"), str(TESTS), str(TESTS.parent)]),
    }
    proc = subprocess.run(
        [sys.executable, str(TESTS / "_lightning_ddp_worker.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["unfrozen"] for r in ranks] == [["block3"], ["block3"]]
    assert [r["groups"] for r in ranks] == [["head", "block3"], ["head", "block3"]]
    end0, end1 = ranks[0]["end"], ranks[1]["end"]
    assert not torch.equal(end0["block3.0.weight"], ranks[0]["start"]["block3.0.weight"])  # it trained...
    diverged = [k for k in end0 if not torch.equal(end0[k], end1[k])]
    assert diverged == []  # ...on gradients averaged over both ranks' shards
    assert torch.equal(end0["block2.0.weight"], ranks[0]["start"]["block2.0.weight"])


def test_the_head_lr_under_onecycle_is_its_peak_not_its_start():
    # initial_lr under OneCycleLR is max_lr / div_factor: stage_lrs were scaled from it, 25x too high
    import freezetune as ft
    from conftest import TinyCNN

    model = TinyCNN()
    ft.freeze(model, "backbone")
    opt = torch.optim.AdamW(ft.param_groups(model, 1e-2))
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=10)
    assert FreezetuneFinetuning("backbone", "epoch:1", stage_lrs={"block3": 1e-3})._head_lr(model, opt) == 1e-2


def test_with_stage_lrs_naming_the_head_the_rules_lr_is_read_from_another_stages_group_not_the_heads():
    # the head's group held stage_lrs' 1e-1, taken as the rule's lr: block3 unfroze at 1e-2, not 1e-3, in silence
    import freezetune as ft
    from conftest import TinyCNN

    rule = dict(stage_lrs={"head": 1e-1}, decay=10)
    model = TinyCNN()
    ft.freeze(model, "block3")  # block2 and head train
    opt = torch.optim.AdamW(ft.param_groups(model, 1e-2, **rule))
    assert FreezetuneFinetuning("block3", "epoch:1", **rule)._head_lr(model, opt) == pytest.approx(1e-2)
    ft.freeze(model, "backbone")  # the head alone: no group shows the rule's lr
    opt = torch.optim.AdamW(ft.param_groups(model, 1e-2, **rule))
    with pytest.raises(ConfigError, match=r"needs lr= here: stage_lrs sets the head's LR \(head=0.1\)"):
        FreezetuneFinetuning("backbone", "epoch:1", **rule)._head_lr(model, opt)
    every = {"stem": 1e-5, "block1": 1e-4, "block2": 1e-3, "block3": 1e-2, "head": 1e-1}  # no stage reads the rule's lr
    assert FreezetuneFinetuning("backbone", "epoch:1", stage_lrs=every)._head_lr(model, opt) == 1e-1


class LitBuiltLate(LitTiny):
    """The network built in ``configure_model``, Lightning's hook for it, which runs after the callbacks' setup."""

    def __init__(self) -> None:
        super().__init__()
        self.model = None

    def configure_model(self) -> None:
        if self.model is None:
            torch.manual_seed(0)
            self.model = TinyCNN(num_classes=3)


def test_a_network_built_in_configure_model_is_frozen_at_fit_start():
    # the callback froze in its setup, before the module built the network: "no submodule 'model'; pass module= one
    # of  or None"
    lit, probe = LitBuiltLate(), Probe()
    callback = FreezetuneFinetuning("backbone", "epoch:1")
    L.Trainer(max_epochs=2, enable_checkpointing=False, callbacks=[callback, probe], **FAST).fit(lit, *loaders())
    assert probe.seen["epoch0"]["trainable"] == ["head"] and probe.seen["epoch1"]["trainable"] == ["block3", "head"]
    with pytest.raises(
        ConfigError,
        match=r"no submodule 'model'; pass module= None \(the whole LightningModule: it has no submodule\)$",
    ):
        callback._network(L.LightningModule())  # never built: said without an empty list of choices


def test_the_callback_takes_stage_lrs_as_param_groups_does_and_refuses_bad_lrs_when_built():
    # "layer4=1e-4" raised a bare ValueError from dict(); a negative LR or decay failed only inside fit
    assert FreezetuneFinetuning(stage_lrs="block3=1e-3,block2=5e-4").stage_lrs == {"block3": 1e-3, "block2": 5e-4}
    for kwargs, match in (({"stage_lrs": {"block3": -1}}, "learning rates must be finite numbers >= 0"),
                          ({"decay": -1}, "decay must be >= 1"), ({"stage_lrs": "block3"}, "block3")):  # fmt: skip
        with pytest.raises(FreezetuneError, match=match):
            FreezetuneFinetuning(**kwargs)


def test_the_callback_gives_the_frozen_stages_dropout_its_policy():
    from torch import nn

    from freezetune.freezing.dropout import held_layers

    lit = nn.Module()  # the callback reads the network from the module's .model
    lit.model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)), nn.Linear(4, 2))
    FreezetuneFinetuning("backbone", None, dropout="off").setup(None, lit, "fit")
    assert held_layers(lit.model) == ["0.1"]  # as at inference
    FreezetuneFinetuning("backbone", None).setup(None, lit, "fit")
    assert held_layers(lit.model) == []  # drawn, as built: ft.freeze's default
    with pytest.raises(FreezetuneError, match="unknown dropout policy 'bogus'"):
        FreezetuneFinetuning(dropout="bogus")


def test_under_ddp_a_network_built_after_the_callbacks_setup_is_refused_by_name():
    # frozen after DDP registered every parameter, the frozen ones' gradients would never come
    from types import SimpleNamespace

    from torch import nn

    callback = FreezetuneFinetuning("backbone", "epoch:1")
    lit = LitBuiltLate()
    callback.setup(SimpleNamespace(), lit, "fit")  # the network does not exist yet: not frozen, noted
    lit.configure_model()
    wrapped = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)  # (no process group)
    for world in (2, 1):  # strategy="ddp" on one device wraps the model too: DDP's "unused parameters" error
        trainer = SimpleNamespace(world_size=world, strategy=SimpleNamespace(model=wrapped))
        with pytest.raises(ConfigError, match=r"its submodule 'model' did not exist then .* under DDP, build it in"):
            callback.on_fit_start(trainer, lit)
