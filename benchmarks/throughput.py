"""Throughput benchmark: what a frozen backbone and freezetune's feature cache buy, per model.

Per model, on random data already on the device (random weights: speed does not depend on them):

- inference img/s (eval, ``inference_mode``, bf16 autocast on CUDA);
- frozen-backbone training img/s: ``freezetune.freeze(model, "backbone")`` (BatchNorm frozen), a full training
  step on the whole model, no cache;
- full fine-tune training img/s;
- a head-only run over ``--n-images`` through freezetune's cache (``split_model`` + ``build_store`` +
  ``store_loader``, freezetune's training ``Step`` on ``suffix_train``): first epoch (cache build + one epoch) vs a
  cached epoch (on CUDA a replayed CUDA graph of the step; "eager cached s": the same epoch without), and the whole
  10-epoch run vs one inference pass over the same images.

    python benchmarks/throughput.py                                   # CPU: 64 px, batch 32, 512 images
    python benchmarks/throughput.py --device cuda                     # GPU: 224 px, batch 128, 8192 images
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback

import timm
import torch
from torch import nn
from torch.nn import functional as F

from _common import autocast, pick_device, sync, table
from freezetune import freeze
from freezetune.cache import build_store, store_loader
from freezetune.cache.model_split import split_model
from freezetune.cache.store import prefix_features
from freezetune.device.precision import resolve_precision
from freezetune.run.checkpoint import TrainingState
from freezetune.training.epoch_log import TrainProgress
from freezetune.training.step import Step

DEFAULT_MODELS = "tf_efficientnet_lite0,resnet50,vit_base_patch16_224"  # timm's ViT-B/16
NUM_CLASSES = 10
EPOCHS = 10


def make_model(name: str, res: int, device: torch.device) -> nn.Module:
    # ViTs have a fixed token grid: build them for ``res`` (timm resizes the position embedding at creation).
    extra = {"img_size": res} if "vit" in name or "deit" in name else {}
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **extra)
    return model.to(device, memory_format=_memory_format(model, device))


def _memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    # What freezetune's trainer does: NHWC for convnets on CUDA (tensor-core convolutions under AMP).
    conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return torch.channels_last if device.type == "cuda" and conv else torch.contiguous_format


def interleaved(steps: dict, device: torch.device, iters: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each step, timed in turns (a, b, c, a, b, c, ...) after ``warmup`` calls each.

    Taking turns exposes every step to the same drift of a shared machine; the median shrugs off the outliers.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def inference_step(model: nn.Module, x: torch.Tensor, device: torch.device):
    model.eval()

    def step() -> None:
        with torch.inference_mode(), autocast(device):
            model(x)

    return step


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, *, eval_mode: bool = False):
    """One optimisation step on whatever is trainable (AdamW, as freezetune's default); in train mode unless
    ``eval_mode``."""
    model.train(not eval_mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)  # as freezetune's build_optimizer

    def step() -> None:
        with autocast(device):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def speeds(name: str, args, device: torch.device) -> dict:
    """Inference, frozen-backbone training and full fine-tune img/s, each on its own model, timed in turns; and
    where a frozen step's time goes beyond inference's (``breakdown``, seconds a batch)."""
    infer, frozen, full, plain, streamed = (make_model(name, args.res, device) for _ in range(5))
    freeze(frozen, "backbone", bn="frozen")
    # the same frozen backbone without freeze's BatchNorm hooks (policy "train" keeps none), the whole model in eval
    # mode (the head is one linear layer: eval changes nothing it computes)
    freeze(plain, "backbone", bn="train")
    plain.eval()
    x = torch.randn(args.batch_size, 3, args.res, args.res, device=device)
    x = x.contiguous(memory_format=_memory_format(infer, device))
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    steps = {"infer": inference_step(infer, x, device), "frozen": train_step(frozen, x, y, device),
             "full": train_step(full, x, y, device), "plain eval step": train_step(plain, x, y, device, eval_mode=True),
             "plain eval forward": lambda: _autocast_forward(plain, x, device)}  # fmt: skip
    streamed_step = streamed_frozen_step(streamed, x, y, device)
    if streamed_step is not None:
        steps["streamed"] = streamed_step
    seconds = interleaved(steps, device, args.iters, args.warmup)
    out = {k: args.batch_size / seconds[k] for k in ("infer", "frozen", "full", "streamed") if k in seconds}
    out["breakdown"] = {k: seconds[k] for k in ("infer", "plain eval forward", "plain eval step", "frozen")}
    return out


def streamed_frozen_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """A frozen-backbone step as freezetune's trainer runs it with the cache off: the frozen prefix forward only
    (``prefix_features``), then its training ``Step`` on the suffix (on CUDA a CUDA graph's replay) and the epoch
    meter; None when the model does not split."""
    freeze(model, "backbone", bn="frozen")
    split, _ = split_model(model)
    if split is None:
        return None
    precision = resolve_precision(device, "auto")
    channels_last = _memory_format(model, device) == torch.channels_last
    suffix = split.suffix_train
    step = suffix_step(suffix, precision, graph_batch=len(y), channels_last=channels_last)
    meter = TrainProgress(1, "", enabled=False, device=device)

    def run() -> None:
        step(suffix, prefix_features(split, x, precision, channels_last).clone(), y, meter, cached=True)

    return run


def suffix_step(suffix: nn.Module, precision, *, graph_batch: int | None, channels_last: bool = False) -> Step:
    """freezetune's training ``Step`` for a split's trainable suffix (put in train mode), with the fused AdamW of
    freezetune's ``build_optimizer``; ``graph_batch``: the batch size its CUDA graph captures (None: eager)."""
    suffix.train()
    optimizer = torch.optim.AdamW([p for p in suffix.parameters() if p.requires_grad], lr=1e-3, fused=True)
    state = TrainingState(suffix, optimizer, None, precision.scaler(), None)
    return Step(state, nn.CrossEntropyLoss(), precision, channels_last=channels_last, graph_batch=graph_batch)


def _autocast_forward(model: nn.Module, x: torch.Tensor, device: torch.device) -> None:
    with autocast(device):
        model(x)


def cached_run(name: str, args, device: torch.device) -> dict:
    """A head-only run over ``n_images``: one inference pass, then cache build + 10 epochs from the cache.

    The images sit on the device already, in batches of 2 x batch size (what build_store reads), so both passes
    measure the model and the cache, not an input pipeline (``loader.py`` measures that).
    """
    model = make_model(name, args.res, device)
    freeze(model, "backbone", bn="frozen")
    split, why = split_model(model)
    if split is None:
        return {"why": why}
    precision = resolve_precision(device, "auto")
    fmt = _memory_format(model, device)
    images = torch.randn(args.n_images, 3, args.res, args.res, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, NUM_CLASSES, (args.n_images,), device=device)
    batches = list(zip(images.split(2 * args.batch_size), labels.split(2 * args.batch_size), strict=True))
    _timed_pass(model, batches[:1], device)  # warm-up
    out: dict = {"infer_pass": [], "build": []}
    with tempfile.TemporaryDirectory() as spill:
        for _ in range(args.passes):  # in turns, keeping the fastest of each: noise only ever adds time
            out["infer_pass"].append(_timed_pass(model, batches, device))
            sync(device)
            start = time.perf_counter()
            store, info = build_store(split, args.n_images, lambda view: batches, precision, views=1, seed=0,
                                      spill_dir=spill, channels_last=fmt == torch.channels_last)  # fmt: skip
            sync(device)
            out["build"].append(time.perf_counter() - start)
        out["eager"] = _cached_epochs(split.suffix_train, store, args.batch_size, precision, device, graph=False)
        out["epochs"] = _cached_epochs(split.suffix_train, store, args.batch_size, precision, device, graph=True)
    out.update(infer_pass=min(out["infer_pass"]), build=min(out["build"]), place=info.place)
    return out


def _timed_pass(model: nn.Module, batches: list, device: torch.device) -> float:
    model.eval()
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode(), autocast(device):
        for x, _ in batches:
            model(x)
    sync(device)
    return time.perf_counter() - start


def _cached_epochs(suffix: nn.Module, store, batch_size: int, precision, device: torch.device, *,
                   graph: bool) -> list[float]:  # fmt: skip
    """Seconds of each of 10 epochs on the cached features through freezetune's training ``Step`` and epoch meter,
    as the trainer runs them: on CUDA a replayed graph of the step (``graph_step``), or eager steps (``graph=False``)."""
    step = suffix_step(suffix, precision, graph_batch=batch_size if graph else None)
    loader = store_loader(store, batch_size=batch_size, train=True, seed=0)
    times = []
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        sync(device)
        start = time.perf_counter()
        meter = TrainProgress(len(loader), "", enabled=False, device=device)
        for feats, targets in loader:
            step(suffix, feats, targets, meter, cached=True)
        meter.close()  # reads the epoch's loss and accuracy: the host waits for the last step, as in a run
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def report(results: dict[str, dict], device: torch.device) -> str:
    rows, checks = [], []
    frozen_target, first_target = (0.95, None) if device.type == "cuda" else (0.9, 0.05)
    for name, r in results.items():
        s, c = r["speeds"], r["cache"]
        ratio = s["frozen"] / s["infer"]
        streamed = s.get("streamed")
        row = [name, f"{s['infer']:.0f}", f"{s['frozen']:.0f}", f"{s['full']:.0f}", f"{ratio:.2f}",
               f"{streamed / s['infer']:.2f}" if streamed else "-"]  # fmt: skip
        checks.append(f"{name}: frozen training / inference = {ratio:.2f} (target >= {frozen_target})")
        if streamed:
            checks.append(f"{name}: freezetune's frozen step, cache off (streamed) / inference = "
                          f"{streamed / s['infer']:.2f} (target >= {frozen_target})")  # fmt: skip
        if "why" in c:
            rows.append([*row, "-", "-", "-", "-", "-", f"no cache: {c['why']}"])
            continue
        first, cached = c["build"] + c["epochs"][0], statistics.median(c["epochs"][1:])
        run = c["build"] + sum(c["epochs"])
        eager = statistics.median(c["eager"][1:])
        rows.append([*row, f"{first:.2f}", f"{cached:.3f}", f"{eager:.3f}", f"{cached / first:.3f}",
                     f"{run / c['infer_pass']:.2f}", f"cache on {c['place']}"])  # fmt: skip
        if first_target is not None:
            checks.append(f"{name}: cached epoch / first epoch = {cached / first:.3f} (target <= {first_target})")
        if device.type == "cuda":
            checks.append(f"{name}: 10-epoch head-only run / one inference pass = {run / c['infer_pass']:.2f} "
                          "(target <= 1.2)")  # fmt: skip
    header = ["model", "infer img/s", "frozen img/s", "full img/s", "frozen/infer", "streamed/infer", "1st epoch s",
              "cached epoch s", "eager cached s", "cached/1st", "10ep/infer", "note"]  # fmt: skip
    return table(rows, header) + "\n\n" + "\n".join(checks) + "\n\n" + breakdown(results)


def breakdown(results: dict[str, dict]) -> str:
    """Where a frozen step's time goes beyond inference's, ms a batch: the forward in grad mode (no
    ``inference_mode``), then the loss, the head's backward and the optimizer, then freeze's BatchNorm hooks and train
    mode (the ``frozen`` column above)."""
    rows = []
    for name, r in results.items():
        b = {k: 1000 * v for k, v in r["speeds"]["breakdown"].items()}
        rows.append([name, f"{b['infer']:.2f}", f"{b['plain eval forward']:.2f}", f"{b['plain eval step']:.2f}",
                     f"{b['frozen']:.2f}"])  # fmt: skip
    header = ["model", "inference ms", "+ grad mode: forward ms", "+ loss, backward, AdamW: step ms",
              "+ freeze's BN hooks, train(): frozen ms"]  # fmt: skip
    return "frozen step breakdown (ms a batch, the same batch):\n" + table(rows, header)


def model_parser(description: str) -> argparse.ArgumentParser:
    """The options of a per-model benchmark (this one, ``memory.py``): device, models, batch size, resolution."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated timm names (default {DEFAULT_MODELS})")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 on CPU, 128 on CUDA")
    p.add_argument("--res", type=int, default=None, help="default 64 on CPU, 224 on CUDA")
    return p


def sized(args: argparse.Namespace) -> bool:
    """Fill in the CPU or CUDA defaults of batch size and resolution; whether the device is CUDA."""
    cuda = pick_device(args.device).type == "cuda"
    args.batch_size = args.batch_size or (128 if cuda else 32)
    args.res = args.res or (224 if cuda else 64)
    return cuda


def each_model(args: argparse.Namespace, measure, report) -> dict[str, dict]:
    """``measure(name)`` for each of ``--models``, in order, saying how long each took and printing its rows
    (``report`` of it alone) at once: a step cut by its time limit keeps the models it measured. A model that fails
    is said with its traceback and left out; the others still run."""
    torch.manual_seed(0)
    results = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        start = time.perf_counter()
        try:
            results[name] = measure(name)
        except Exception:  # noqa: BLE001 - any failure of one model, said in full; the others are measured
            traceback.print_exc(file=sys.stdout)
            print(f"  {name}: FAILED after {time.perf_counter() - start:.0f}s (above)", flush=True)
            continue
        print(f"  {name}: measured in {time.perf_counter() - start:.0f}s", flush=True)
        print(report({name: results[name]}), flush=True)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = model_parser(__doc__.splitlines()[0])
    p.add_argument("--n-images", type=int, default=None, help="images of the cached run (512 CPU, 8192 CUDA)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per measurement (default 9 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--passes", type=int, default=2, help="inference passes / cache builds, the fastest counts")
    args = p.parse_args(argv)
    cuda = sized(args)
    args.n_images = args.n_images or (8192 if cuda else 512)
    args.iters = args.iters or (20 if cuda else 9)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    results = each_model(args, lambda name: {"speeds": speeds(name, args, device),
                                             "cache": cached_run(name, args, device)},
                         lambda one: report(one, device))  # fmt: skip
    print(f"\nthroughput on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads): {args.res} px, batch {args.batch_size}, "
          f"cached run over {args.n_images} images x {EPOCHS} epochs")  # fmt: skip
    print(report(results, device))
    if not results:  # every model failed (above): a failed step, for gpu.sh's summary
        raise SystemExit(1)


if __name__ == "__main__":
    main()
