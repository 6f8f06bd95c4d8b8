"""Depthwise-convolution benchmark (CPU): PyTorch's native backward against ``freezetune.device.depthwise``'s.

Three levels, each timed native then fast in the same process: every stride-1 depthwise layer shape of
EfficientNet-Lite0 at 64 px (forward + backward, weight and input gradients); one training step of the last 3 stages
and the head from cached features (what the auto recipe's final run repeats); one step of the whole network (what a
full fine-tune repeats). ``freezetune.training.trainer`` switches the layers on the CPU.

    python benchmarks/depthwise.py                 # 1 thread
    python benchmarks/depthwise.py --threads 2
    python benchmarks/depthwise.py --grid          # kernel x stride x map x channels: where each kernel wins

The grid (native ms / folded ms = speed-up, forced through the folded gradient) is where ``faster_here``'s rule
comes from.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time

import torch
from torch import nn

from _common import MODEL, table
from freezetune.device import depthwise
from freezetune.device.depthwise import use_fast_depthwise
from freezetune.model.create import create_model


def ms_per_call(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats


def native_and_fast(module: nn.Module, run, repeats: int) -> tuple[float, float]:
    """ms per ``run(module)`` with PyTorch's kernels, then with ``module``'s depthwise layers switched (in place)."""
    native = ms_per_call(lambda: run(module), repeats)
    use_fast_depthwise(module)
    return native, ms_per_call(lambda: run(module), repeats)


def layer_rows(model: nn.Module, x: torch.Tensor, repeats: int) -> list[list[str]]:
    """Each distinct stride-1 depthwise layer shape met by ``x``'s forward, native against fast."""
    shapes: dict[tuple, nn.Conv2d] = {}

    def record(module, inputs, _output):
        shapes.setdefault((tuple(inputs[0].shape), module.kernel_size), module)

    probe = copy.deepcopy(model)
    hooks = [m.register_forward_hook(record) for m in probe.modules() if type(m) is nn.Conv2d and m.groups > 1]
    with torch.no_grad():
        probe(x)
    for h in hooks:
        h.remove()
    rows = []
    for (shape, kernel), module in shapes.items():
        if module.stride != (1, 1):
            continue
        conv = copy.deepcopy(module).requires_grad_(True)
        inp = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
        native, fast = native_and_fast(conv, lambda c, i=inp: c(i).sum().backward(), repeats)
        rows.append([f"{shape[1]}ch {shape[2]}x{shape[3]} k{kernel[0]}", f"{native:.2f}", f"{fast:.2f}",
                     f"{native / fast:.2f}x"])  # fmt: skip
    return rows


def grid(repeats: int, sizes: tuple[int, ...] = (1, 2, 4, 8, 14)) -> None:
    depthwise.faster_here = lambda *_: True  # every shape through the folded gradient, to compare
    channels = (240, 672, 1152)
    rows = []
    for stride, kernel, size in itertools.product((1, 2), (3, 5, 7), sizes):
        row = [f"stride {stride}, {kernel}x{kernel}, {size}x{size}"]
        for c in channels:
            conv = nn.Conv2d(c, c, kernel, stride, padding=kernel // 2, groups=c)
            x = torch.randn(32, c, size, size).contiguous(memory_format=torch.channels_last)
            native, fast = native_and_fast(conv, lambda c, x=x: c(x).sum().backward(), repeats)
            row.append(f"{native:.2f}/{fast:.2f} = {native / fast:.2f}x")
        rows.append(row)
    print(f"depthwise layer forward + backward, batch 32, {torch.get_num_threads()} thread(s): native ms / folded ms")
    print(table(rows, ["layer, input map", *(f"{c} channels" for c in channels)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--grid", action="store_true", help="time a grid of layer shapes instead of the model's")
    p.add_argument("--grid-sizes", default="1,2,4,8,14", help="the grid's input maps (side in pixels), comma-separated")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.grid:
        return grid(args.repeats, tuple(int(s) for s in args.grid_sizes.split(",")))
    torch.manual_seed(0)
    model, _ = create_model(MODEL, "none", img_size=args.res)
    model = model.train().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, 3, args.res, args.res).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    rows = layer_rows(model, x, args.repeats)

    # the auto recipe's last-3 candidate: blocks.4-6 and the head train over features cached before blocks.4
    with torch.no_grad():
        cached = model.blocks[:4](model.bn1(model.conv_stem(x)))
    tail = nn.Sequential(*copy.deepcopy(model.blocks[4:]), copy.deepcopy(model.conv_head), copy.deepcopy(model.bn2),
                         copy.deepcopy(model.global_pool), copy.deepcopy(model.classifier))  # fmt: skip
    for name, net, inp in (("blocks.4-6 + head from the cache", tail, cached), ("whole network", model, x)):
        step = lambda m, i=inp: nn.functional.cross_entropy(m(i), y).backward()  # noqa: E731
        native, fast = native_and_fast(net, step, max(3, args.repeats // 4))
        rows.append([f"step: {name}", f"{native:.1f}", f"{fast:.1f}", f"{native / fast:.2f}x"])
    print(f"depthwise convolution forward + backward, {MODEL}, batch {args.batch_size}, {args.res} px, "
          f"{args.threads} thread(s), ms (lower is better)")  # fmt: skip
    print(table(rows, ["layer / step", "native", "freezetune", "native/freezetune"]))


if __name__ == "__main__":
    main()
