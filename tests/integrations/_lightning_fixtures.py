"""A tiny LightningModule around ``conftest.TinyCNN`` for the Lightning integration tests (and their DDP worker)."""

from __future__ import annotations

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import freezetune as ft
from conftest import TinyCNN

FAST = dict(  # a Lightning Trainer with nothing but the loop: no logger, bars, summaries or sanity checks
    accelerator="cpu",
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)


class LitTiny(L.LightningModule):
    """TinyCNN (stages stem, block1..3, head) under ``self.model``; optimizer from ``ft.param_groups``.

    ``rank_metric``: rank 0 logs a constant ``val_acc`` (a plateau), every other rank an improving one, so only a
    callback that follows rank 0 unfreezes the same stages on every rank.
    """

    def __init__(self, lr: float = 1e-2, stage_lrs: dict | None = None, rank_metric: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyCNN(num_classes=3)
        self.lr, self.stage_lrs, self.rank_metric = lr, stage_lrs or {}, rank_metric

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self.model(x).argmax(1) == y).float().mean()
        if self.rank_metric:
            acc = torch.tensor(0.5 if self.global_rank == 0 else float(self.current_epoch))
        self.log("val_acc", acc)  # no sync_dist: each rank keeps its own value

    def configure_optimizers(self):
        return torch.optim.AdamW(ft.param_groups(self.model, self.lr, stage_lrs=self.stage_lrs, weight_decay=0))


def loaders(n: int = 32, batch_size: int = 8) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size), DataLoader(data, batch_size=batch_size)
