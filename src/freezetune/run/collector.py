"""Python's garbage collector during a run: the objects that existed before it are left out of its full passes.

A full pass of the cyclic collector walks every tracked object of the process; after importing torch, torchvision and
timm that is about 400,000 of them, 0.2 s a pass on 2 CPU cores, for objects that the run neither makes nor frees.
The run's own allocations (a figure's artists, a checkpoint's dicts, the batches' Python objects) trigger such passes:
one or two in a run, up to a twentieth of the default command's time on a few hundred images. Production training
loops manage the collector for the same reason (Megatron-LM's ``--manual-gc``: collector pauses stalled the steps).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def older_objects_frozen(*, collect_first: bool = False) -> Iterator[None]:
    """Within the block, the collector's passes skip the objects that existed before it (``gc.freeze``); at its end
    they are collected again as before (``gc.unfreeze``). The run's own objects are collected throughout.

    At its end, before the unfreeze, one pass over the objects the block made frees the garbage it left: a run's model
    and optimizer state sit in reference cycles (torch.fx's tracer leaves some around the model), which held 37 MiB
    (EfficientNet-Lite0) to 178 MiB (ResNet-50) until a full pass, often during a notebook's next run, where frozen
    they would have stayed through it. The pass walks what the block made alone (tens of thousands of objects).

    Left as it is where something froze objects already (the caller's own ``gc.freeze``, an outer run: the auto
    recipe's trials within its run): unfreezing at the end would undo theirs.

    ``collect_first``: one full pass before freezing, for garbage that holds memory the run needs (a notebook's
    dropped model in a reference cycle, on a GPU): frozen, it would stay held until the block ends.

    >>> with older_objects_frozen():
    ...     gc.get_freeze_count() > 0
    True
    >>> gc.get_freeze_count()
    0
    """
    if gc.get_freeze_count():
        yield
        return
    if collect_first:
        gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.collect()
        gc.unfreeze()
