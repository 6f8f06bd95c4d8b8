"""Cold-start benchmark: what a fresh process pays the first time each shape runs, against the same call warm.

On the H200 the transfer benchmark's full fine-tune of 1 000 images (10 epochs at 224 px, batch 32: 320 steps)
took 26.9 s, where its throughput (4 500 img/s) says about 3 s of compute. A short fine-tune may spend most of its
time on first calls: each new convolution shape (the batch size, and forward, input gradient and weight gradient)
makes cuDNN choose and build an execution plan, and some cuDNN versions compile depthwise kernels at run time (about
1.5 s a process in NVIDIA/cudnn-frontend#1066). This script measures that cost, per model and per setting, each in a
fresh process (a warm one would hide it):

- ``channels_last``: bf16 autocast, NHWC (what freezetune and the full fine-tune peer run on CUDA): cuDNN takes
  every depthwise convolution;
- ``nchw``: bf16 autocast, NCHW: PyTorch's own depthwise kernels where cuDNN is not chosen for them;
- ``benchmark``: ``channels_last`` with ``torch.backends.cudnn.benchmark`` (every algorithm tried per shape).

Per process: a whole-network training step at ``--batch-size`` (the 1st, 2nd and a warm one, the median of
``--iters``), the same at the last partial batch's size, and an eval forward at 256 (as the cache build and the
evaluation run). "cold s" sums each shape's first calls less its warm call. ResNet-50 (no depthwise layers) is
the control. Random weights: the cost does not depend on them.

    python benchmarks/coldstart.py --device cuda
    python benchmarks/coldstart.py --device cpu --runs test_efficientnet --res 32        # a quick check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from _common import autocast, emit, pick_device, run_worker, sync, table, timed

SETTINGS = ("channels_last", "nchw", "benchmark")
DEFAULT_RUNS = "tf_efficientnet_lite0:channels_last,tf_efficientnet_lite0:nchw,resnet50:channels_last,tf_efficientnet_lite0:benchmark"  # noqa: E501
EVAL_BATCH = 256


def timed_ms(device: torch.device, fn) -> float:
    seconds: dict = {}
    with timed(device, seconds, "call"):
        fn()
    return 1000 * seconds["call"]


def worker(args) -> None:
    import timm

    device = pick_device(args.device)
    setting = args.setting
    torch.backends.cudnn.benchmark = setting == "benchmark"
    memory_format = torch.contiguous_format if setting == "nchw" else torch.channels_last
    # the process's first device call pays CUDA's start-up: timed from before it (``timed`` syncs first, which is
    # itself the first call, and measured a tensor's allocation alone)
    start = time.perf_counter()
    torch.zeros(1, device=device)
    sync(device)
    result: dict = {"cuda_init_ms": 1000 * (time.perf_counter() - start)}
    start = time.perf_counter()
    model = timm.create_model(args.model, pretrained=False, num_classes=10).to(device, memory_format=memory_format)
    result["model_ms"] = 1000 * (time.perf_counter() - start)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    loss_fn = nn.CrossEntropyLoss()

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 3, args.res, args.res, device=device).contiguous(memory_format=memory_format)
        return x, torch.randint(0, 10, (n,), device=device)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        model.train()
        with autocast(device):
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward(x: torch.Tensor) -> None:
        model.eval()
        with torch.no_grad(), autocast(device):
            model(x)

    full, partial, big = batch(args.batch_size), batch(args.partial), batch(EVAL_BATCH)
    calls = {
        "train": (lambda: train_step(*full), args.iters),
        "partial": (lambda: train_step(*partial), 3),
        "eval": (lambda: forward(big[0]), 3),
    }
    for name, (fn, n) in calls.items():
        times = [timed_ms(device, fn) for _ in range(max(n, 3))]
        warm = statistics.median(times[2:])
        result[name] = {"first": times[0], "second": times[1], "warm": warm}
    result["cold_s"] = sum(r["first"] + r["second"] - 2 * r["warm"] for r in result.values() if isinstance(r, dict))
    result["cold_s"] /= 1000
    if device.type == "cuda":
        result["cudnn"] = torch.backends.cudnn.version()
    emit(result)


def row(model: str, setting: str, r: dict) -> list[str]:
    if "error" in r:
        return [model, setting, *["-"] * 9, r["error"][-80:]]

    def ms(x: float) -> str:
        return f"{x:.0f}" if x >= 10 else f"{x:.1f}"

    t, p, e = r["train"], r["partial"], r["eval"]
    return [model, setting, ms(r["cuda_init_ms"]), ms(t["first"]), ms(t["second"]), ms(t["warm"]), ms(p["first"]),
            ms(p["warm"]), ms(e["first"]), ms(e["warm"]), f"{r['cold_s']:.2f}", str(r.get("cudnn", "-"))]  # fmt: skip


HEADER = ["model", "setting", "init ms", "train 1st", "2nd", "warm", "partial 1st", "warm", "eval 1st", "warm",
          "cold s", "cudnn"]  # fmt: skip


def parse_runs(text: str) -> list[tuple[str, str]]:
    runs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        model, _, setting = item.partition(":")
        setting = setting or "channels_last"
        if setting not in SETTINGS:
            raise SystemExit(f"--runs {item!r}: unknown setting {setting!r}; choose from: {', '.join(SETTINGS)}")
        runs.append((model, setting))
    return runs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma-separated MODEL[:SETTING] (settings: "
                   f"{', '.join(SETTINGS)}; default channels_last), each in its own process, in this order")  # fmt: skip
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--partial", type=int, default=8, help="the last partial batch (1 000 images at 32: 8)")
    p.add_argument("--iters", type=int, default=10, help="calls of the full training step (the warm one: median)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    device = pick_device(args.device)
    forwarded = ["--device", str(device), "--res", str(args.res), "--batch-size", str(args.batch_size),
                 "--partial", str(args.partial), "--iters", str(args.iters)]  # fmt: skip
    print(f"coldstart: fresh process per row, {args.res} px, training batch {args.batch_size} (partial "
          f"{args.partial}), eval batch {EVAL_BATCH}, bf16 autocast on CUDA; times in ms", flush=True)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="ft-coldstart-") as work:
        for model, setting in parse_runs(args.runs):
            argv = [__file__, "--worker", "--model", model, "--setting", setting, *forwarded]
            r = run_worker(argv, Path(work) / f"{model}-{setting}.log")
            rows.append(row(model, setting, r))
            print("  " + "  ".join(rows[-1]), flush=True)  # a row as soon as its process ends
    print()
    print(table(rows, HEADER))
    print("cold s: each shape's 1st and 2nd calls less twice its warm call, summed (train, partial, eval)")


if __name__ == "__main__":
    sys.exit(main())
