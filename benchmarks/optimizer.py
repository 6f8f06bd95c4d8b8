"""Optimizer benchmark: the AdamW update alone, per-tensor loop vs ``foreach`` vs ``fused``, over the parameters
each auto-recipe candidate trains (the last 1, 2 or 3 stages and the head of EfficientNet-Lite0) and the whole
network. The update runs once per training step whatever the batch, so on a cached 64 px CPU step it is a large
share of the step; ``freezetune.training.optim.build_optimizer`` picks ``fused`` on CPU and CUDA from this table.

    python benchmarks/optimizer.py                 # CPU, 1 thread
    python benchmarks/optimizer.py --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import MODEL, pick_device, sync, table
from freezetune.model.create import create_model
from freezetune.model.stages import stages

VARIANTS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def step_ms(params: list[torch.Tensor], device: torch.device, repeats: int, **kw) -> float:
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, **kw)
    for _ in range(3):  # state allocated, kernels warm
        optimizer.step()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        optimizer.step()
    sync(device)
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    model, _ = create_model(MODEL, "none", img_size=64)
    model.to(device)
    st = stages(model)
    sets = {f"last {k} stage(s) + head": st[-(k + 1) :] for k in (1, 2, 3)} | {"whole network": st}
    rows = []
    for name, chosen in sets.items():
        params = [p for s in chosen for p in s.params]
        for p_ in params:
            p_.grad = torch.randn_like(p_)
        ms = {v: step_ms(params, device, args.repeats, **kw) for v, kw in VARIANTS.items()}
        n = sum(p_.numel() for p_ in params)
        rows.append([name, f"{n / 1e6:.2f}M", *(f"{ms[v]:.1f}" for v in VARIANTS), f"{ms['loop'] / ms['fused']:.1f}x"])
    print(f"AdamW update per step, {MODEL} on {device}, {args.threads} thread(s), ms (lower is better)")
    print(table(rows, ["parameters", "count", *VARIANTS, "loop/fused"]))


if __name__ == "__main__":
    main()
