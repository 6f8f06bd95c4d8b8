"""Two-rank DDP fit on CPU (gloo) for tests/test_lightning.py: ``python tests/integrations/_lightning_ddp_worker.py OUT_DIR``.

Lightning's ``strategy="ddp"`` re-runs this script for rank 1. Each rank writes ``OUT_DIR/rank<R>.pt`` with its final
weights, the weights it started with, the stages it unfroze and its optimizer groups.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path


def main(out: Path) -> None:
    import lightning.pytorch as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from _lightning_fixtures import FAST, LitTiny, loaders
    from freezetune.integrations.lightning import FreezetuneFinetuning

    torch.set_num_threads(1)
    lit = LitTiny(rank_metric=True)
    start = {k: v.clone() for k, v in lit.model.state_dict().items()}
    callback = FreezetuneFinetuning("backbone", "plateau:patience=1", monitor="val_acc", stage_lrs={"block3": 1e-2})
    # a short collective timeout: ranks that disagree fail in seconds instead of hanging for gloo's 30 minutes
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
    trainer = L.Trainer(devices=2, strategy=strategy, max_epochs=3, enable_checkpointing=False, callbacks=[callback],
                        **FAST)  # fmt: skip
    trainer.fit(lit, *loaders())
    record = {
        "start": start,
        "end": {k: v.detach().clone() for k, v in lit.model.state_dict().items()},
        "unfrozen": list(callback.unfreezer.unfrozen),
        "groups": [g["name"] for g in trainer.optimizers[0].param_groups],
        "world_size": trainer.world_size,
    }
    torch.save(record, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
