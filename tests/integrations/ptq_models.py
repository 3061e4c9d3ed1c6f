"""Small LightningModules and data for the integration tests (also imported by the DDP script)."""

from __future__ import annotations

import copy
import tempfile

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


def classification_data(n: int = 64, dim: int = 64, classes: int = 10, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = (x[:, :classes].argmax(dim=1)).long()
    return TensorDataset(x, y)


def loader(ds: Dataset, batch_size: int = 8) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


class MLP(pl.LightningModule):
    """64 -> 64 -> 64 -> 10 classifier. fc1/fc2 (4096 weights) are quantized by default, head (640) is not."""

    def __init__(self, dim: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, classes)
        self.val_offset = 0.0  # added to the logged val_acc (to simulate an accuracy drop in tests)
        self.transfers: list[int] | None = None  # dataloader_idx of each transferred batch, when recording

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        acc = (self(x).argmax(-1) == y).float().mean()
        self.log("val_acc", acc + self.val_offset)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def on_before_batch_transfer(self, batch, dataloader_idx):
        if self.transfers is not None:
            self.transfers.append(dataloader_idx)
        return batch

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class DictBatches(Dataset):
    """Batches are dicts {"features", "scale", "label"}; the model's forward takes keyword arguments."""

    def __init__(self, n: int = 32, dim: int = 64, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x[:, :10].argmax(1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"features": self.x[i], "scale": torch.tensor(2.0), "label": self.y[i]}


class KwargsModel(MLP):
    """forward(features=..., scale=...): fed with ``model(**batch)`` after the transfer hook drops the label."""

    def forward(self, features: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": super().forward(features * scale[:, None])}

    def on_after_batch_transfer(self, batch, dataloader_idx):
        # the Trainer's transfer hooks must apply to calibration batches too: only the label is removed here
        self.labels = batch.pop("label")
        return batch

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(**batch)["logits"], self.labels)

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(**batch)["logits"].argmax(-1) == self.labels).float().mean())


class DataModule(pl.LightningDataModule):
    def train_dataloader(self):
        return loader(classification_data(32, seed=0))

    def val_dataloader(self):
        return loader(classification_data(32, seed=1))


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append(dict(metrics))

    def merged(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in self.logged:
            out.update(m)
        return out


class Snapshot(pl.Callback):
    """Placed before the PTQ callback: keeps a float copy and the training flags at on_train_end."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.flags = {n: m.training for n, m in pl_module.named_modules()}
        pl_module.transfers = []
        self.float_model = copy.deepcopy(pl_module)


def trainer(callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(max_epochs=1, limit_train_batches=2, accelerator="cpu", devices=1, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    num_sanity_val_steps=0,
                    default_root_dir=tempfile.mkdtemp(prefix="mq-trainer-"))  # the report file lands here, not in cwd
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def fit(model, callback, *, train=None, val=None, datamodule=None, after=(), **kwargs):
    """Fit ``model`` with ``[Snapshot(), callback, *after]``; returns (trainer, snapshot)."""
    snap = Snapshot()
    tr = trainer([snap, callback, *after], **kwargs)
    if datamodule is not None:
        tr.fit(model, datamodule=datamodule)
    else:
        tr.fit(model, train or loader(classification_data(32)), val)
    return tr, snap
