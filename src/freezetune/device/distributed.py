"""Several GPUs with ``torchrun``: process group from the environment, DDP wrapping, rank-0-only side effects.

``torchrun --nproc_per_node=4 -m freezetune train ...`` runs one process per GPU. Every rank trains on its shard of
each epoch and evaluates (a DDP forward is a collective: all ranks must run it); rank 0 alone logs and writes
checkpoints, and broadcasts its monitored metric so every rank unfreezes and stops at the same epoch. The final
test is sharded: each rank scores its block of whole batches and the counts are merged (``batch_block``,
``all_gather``). A single process (no ``WORLD_SIZE``) takes none of these paths.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_spec: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (NCCL on CUDA where torch has it, else Gloo).

    >>> init_from_env().enabled  # not under torchrun
    False
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = torch.cuda.is_available() and device_spec != "cpu"
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        # Windows' torch has no NCCL (init_process_group raised "Distributed package doesn't have NCCL built in");
        # Gloo reduces CUDA tensors too, slower
        dist.init_process_group("nccl" if use_cuda and dist.is_nccl_available() else "gloo")
    return info


def main_echo(echo: Callable[[str], None], info: DistInfo) -> Callable[[str], None]:
    """``echo`` on rank 0; on the other ranks, nothing: one log per job, not one per process.

    >>> main_echo(print, DistInfo(rank=1, world=2))("not shown")
    """
    return echo if info.is_main else _silent


def _silent(*_: object) -> None:
    pass


def device_for(info: DistInfo, spec: str) -> str:
    """Each rank owns one GPU: ``auto``, ``cuda`` or any ``cuda:N`` becomes ``cuda:LOCAL_RANK``.

    Several ranks on one GPU is a configuration NCCL refuses; ``CUDA_VISIBLE_DEVICES`` picks the GPUs instead.

    >>> device_for(DistInfo(rank=1, world=2, local_rank=1), "cpu")
    'cpu'
    """
    if info.enabled and (spec == "auto" or spec.startswith("cuda")) and torch.cuda.is_available():
        return f"cuda:{info.local_rank}"
    return spec


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP over the parameters that train *now*; call again after an unfreeze (DDP fixes its set at construction)."""
    if not info.enabled or not any(p.requires_grad for p in model.parameters()):
        return model
    ids = [device.index] if device.type == "cuda" else None
    from freezetune.model.heads import aux_modules
    from freezetune.model.tree import unwrap

    # auxiliary classifiers (a GoogLeNet built with them: create_model leaves them out) run in training, but no loss
    # reads them: DDP waited for their gradients and ended the second step in "Expected to have finished reduction in
    # the prior iteration"
    unused = bool(aux_modules(unwrap(model)))
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def average_grads(params: list[nn.Parameter]) -> None:
    """Average ``params``' gradients over the default process group's ranks, in one collective, as DDP does for the
    parameters it wrapped (every rank passes the same list; a missing gradient counts as zeros). Outside a process
    group, nothing.

    >>> p = nn.Parameter(torch.ones(2)); p.grad = torch.full((2,), 3.0); average_grads([p]); p.grad.tolist()
    [3.0, 3.0]
    """
    if not params or not dist.is_available() or not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, averaged in zip(params, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        if p.grad is None:
            p.grad = averaged
        else:
            p.grad.copy_(averaged)


def broadcast(value: object, info: DistInfo) -> object:
    """Rank 0's value on every rank (the monitored metric, the stop decision)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value: object, info: DistInfo) -> list:
    """Every rank's ``value``, in rank order (``[value]`` when not distributed).

    >>> all_gather("only", DistInfo())
    ['only']
    """
    if not info.enabled:
        return [value]
    box: list = [None] * info.world
    dist.all_gather_object(box, value)
    return box


def broadcast_tensors(tensors: Iterable[torch.Tensor], info: DistInfo) -> None:
    """Overwrite each tensor in place with rank 0's (every rank passes the same tensors in the same order): a
    module's ``state_dict().values()`` after rank 0 alone read a checkpoint, or its ``buffers()`` after an epoch."""
    if info.enabled:
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def shard_rows(n: int, info: DistInfo) -> range:
    """This rank's contiguous block of ``n`` rows (all of them when not distributed); blocks differ by at most one.

    >>> shard_rows(10, DistInfo(rank=1, world=3))
    range(3, 6)
    """
    return range(n * info.rank // info.world, n * (info.rank + 1) // info.world)


def batch_block(n: int, batch_size: int, info: DistInfo) -> range:
    """This rank's rows of an in-order evaluation of ``n`` rows: a contiguous block of whole batches (possibly none).

    Each batch then holds the rows it holds in one process, and the ranks' blocks follow each other in rank order:
    metrics merged in that order are exactly one process's.

    >>> [batch_block(10, 4, DistInfo(rank=r, world=2)) for r in (0, 1)]
    [range(0, 4), range(4, 10)]
    """
    batches = shard_rows(-(-n // batch_size), info)
    return range(batches.start * batch_size, min(batches.stop * batch_size, n))


def sum_across_ranks(t: torch.Tensor, info: DistInfo, chunk_bytes: int = 64 * 2**20) -> torch.Tensor:
    """Sum ``t`` over all ranks in place, wherever it lives (GPU, pinned RAM, a disk memmap), chunk by chunk.

    Each chunk travels through the backend's device (NCCL only reduces CUDA tensors) and, on Gloo, as float32
    (Gloo has no bfloat16 reduction). Ranks that fill disjoint rows of a zeroed tensor share them this way.
    """
    if not info.enabled:
        return t
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    wire = t.dtype if nccl or not t.is_floating_point() else torch.float32
    flat = t.view(-1)
    step = max(1, chunk_bytes // max(1, t.element_size()))
    for start in range(0, flat.numel(), step):
        part = flat[start : start + step]
        chunk = part.to(device, wire)
        dist.all_reduce(chunk, op=dist.ReduceOp.SUM)
        part.copy_(chunk)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def in_group() -> bool:
    """Whether this process has joined a torchrun process group (``init_from_env``) and not left it."""
    return dist.is_available() and dist.is_initialized()


def leave_group() -> None:
    """Leave the process group this process joined, if any."""
    if in_group():
        dist.destroy_process_group()
