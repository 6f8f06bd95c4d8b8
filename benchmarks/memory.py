"""Memory benchmark: a frozen backbone's training peak against inference, and ``inspect``'s estimate against the
measured training peaks, per model.

Per model (random weights, a random batch already on the device; bf16 autocast on CUDA, fp32 on CPU):

- *infer*: eval mode, ``inference_mode``, one forward of the batch;
- *frozen*: ``freezetune.freeze(model, "backbone")`` (BatchNorm frozen), one training step (forward, loss, backward,
  fused AdamW) after a first one, so the optimizer state exists as in every step after the first;
- *full*: the same step with everything trainable;
- *estimate*: ``freezetune.device.memory.estimate_memory`` on a CPU copy of the model, as ``freezetune inspect`` runs
it.

Each peak counts everything the call holds: weights, the batch, optimizer state and the step's own tensors. On CUDA
it is ``torch.cuda.max_memory_allocated`` over the call; on a CPU, which keeps no such count, it is
``freezetune.device.memory.measured_peak`` (live tensors, the tool the estimate measures with): there the run only
checks the estimate's scaling from batches of 2 and 4, while on CUDA it checks the estimate against the allocator.

    python benchmarks/memory.py                                   # CPU: 64 px, batch 32
    python benchmarks/memory.py --device cuda                     # GPU: 224 px, batch 128
"""

from __future__ import annotations

import copy
import gc
import time

import torch
from torch import nn

from _common import autocast, pick_device, sync, table
from freezetune import freeze, unfreeze
from freezetune.device.memory import estimate_memory, measured_peak
from throughput import NUM_CLASSES, each_model, make_model, model_parser, sized, train_step

MIB = 2**20
FROZEN_TARGET = 1.1  # frozen training peak / inference peak
ESTIMATE_TOLERANCE = 0.25  # |estimate / measured - 1|


def peak(fn, device: torch.device, held: int) -> float:
    """MiB at the peak of ``fn()``, ``held`` bytes (what is alive before the call) included on a CPU."""
    if device.type != "cuda":
        return (held + measured_peak(fn)) / MIB
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / MIB


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def step_peak(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """The peak of a training step after the first, in the trainer's order (forward, gradients set to None, backward,
    fused AdamW): the previous step's gradients are alive through the forward, the optimizer state throughout."""
    step = train_step(model, x, y, device)
    step()  # allocates the optimizer state and the gradients, as every later step finds them
    if device.type == "cuda":
        return peak(step, device, 0)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def again() -> None:  # on a CPU the tracker counts what the call creates: the gradients are made inside it
        for p in trainable:
            p.grad = torch.zeros_like(p)
        step()

    state = 2 * nbytes(trainable)  # AdamW's two moments
    return peak(again, device, nbytes([*model.parameters(), *model.buffers(), x, y]) + state)


def infer_peak(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    model.eval()

    def forward() -> None:
        with torch.inference_mode(), autocast(device):
            model(x)

    return peak(forward, device, nbytes([*model.parameters(), *model.buffers(), x]))


def measure(name: str, args, device: torch.device) -> dict:
    """Inference, frozen and full peaks of one model, then the estimate of both steps."""
    model = make_model(name, args.res, device)
    fmt = torch.channels_last if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()) \
        else torch.contiguous_format  # fmt: skip
    x = torch.randn(args.batch_size, 3, args.res, args.res, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    out = {"infer": infer_peak(model, x, device)}
    freeze(model, "backbone", bn="frozen")
    out["frozen"] = step_peak(model, x, y, device)
    cpu_copy = copy.deepcopy(model).cpu()  # frozen as measured: the estimate sees the same trainable set
    unfreeze(model, "all")
    out["full"] = step_peak(model, x, y, device)
    del model, x, y
    _release(device)
    amp = torch.bfloat16 if device.type == "cuda" else None  # as the steps above: _common.autocast
    start = time.perf_counter()
    estimate = estimate_memory(cpu_copy, args.res, args.batch_size, amp_dtype=amp)
    out["estimate"] = {mode: estimate[mode]["total"] for mode in ("frozen", "full")}
    out["estimate_s"] = time.perf_counter() - start
    return out


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def report(results: dict[str, dict]) -> str:
    rows, checks = [], []
    for name, r in results.items():
        est, ratio = r["estimate"], r["frozen"] / r["infer"]
        rows.append([name, f"{r['infer']:,.0f}", f"{r['frozen']:,.0f}", f"{r['full']:,.0f}", f"{ratio:.2f}",
                     f"{est['frozen']:,.0f}", f"{est['frozen'] / r['frozen']:.2f}", f"{est['full']:,.0f}",
                     f"{est['full'] / r['full']:.2f}", f"{r['estimate_s']:.1f}"])  # fmt: skip
        checks.append(f"{name}: frozen training peak / inference peak = {ratio:.2f} (target <= {FROZEN_TARGET}): "
                      f"{_verdict(ratio <= FROZEN_TARGET)}")  # fmt: skip
        for mode in ("frozen", "full"):
            off = est[mode] / r[mode] - 1
            checks.append(f"{name}: inspect's {mode} estimate is {100 * off:+.0f}% of the measured peak (target "
                          f"within {100 * ESTIMATE_TOLERANCE:.0f}%): {_verdict(abs(off) <= ESTIMATE_TOLERANCE)}")  # fmt: skip
    header = ["model", "infer MiB", "frozen MiB", "full MiB", "frozen/infer", "est frozen", "est/meas", "est full",
              "est/meas", "estimate s"]  # fmt: skip
    return table(rows, header) + "\n\n" + "\n".join(checks)


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(argv: list[str] | None = None) -> None:
    parser = model_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    sized(args)
    device = pick_device(args.device)
    results = each_model(args, lambda name: measure(name, args, device), report)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, peaks of live tensors"
    amp = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"\nmemory on {device} ({where}): {args.res} px, batch {args.batch_size}, {amp}, peak MiB")
    print(report(results))
    if not results:  # every model failed (above): a failed step, for gpu.sh's summary
        raise SystemExit(1)


if __name__ == "__main__":
    main()
