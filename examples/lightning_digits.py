"""Train a small CNN on scikit-learn's bundled digits with Lightning, then quantize it with the callback.

For INT4 (groups of 32) and INT8: train (same seed, so the same float model) with a
``ModelCheckpoint(monitor="val_acc")``; when training ends ``PostTrainingQuantization(weights="best",
save_to=...)`` loads the best epoch's weights, quantizes them (report printed) and writes the deployable
``.safetensors`` file. Then validate the quantized model (the callback compares val_acc with the best
epoch's float value), load the file into a fresh model with plain ``mq.load`` (no Lightning) and check the
outputs are identical. No downloads: the digits ship with scikit-learn.

Run: python examples/lightning_digits.py [OUT_DIR]   (needs: pip install -e integrations/lightning scikit-learn)
The files are written to OUT_DIR (default: <tmp>/monoquant_lightning_digits).
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from monoquant_lightning import PostTrainingQuantization
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import monoquant as mq


class Digits(pl.LightningDataModule):
    """8x8 grey images of the digits 0-9 (1,797 of them); 80% train, 20% validation, fixed split."""

    def setup(self, stage: str) -> None:
        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(data.target)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        split = int(0.8 * len(x))
        self.train_set = TensorDataset(x[order[:split]], y[order[:split]])
        self.val_set = TensorDataset(x[order[split:]], y[order[split:]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=120)


class DigitsCNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.features(x).flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def run(name: str, spec: mq.WeightSpec, data: Digits, out_dir: Path) -> dict[str, float]:
    pl.seed_everything(0, verbose=False)
    model = DigitsCNN()
    float_bytes = state_bytes(model)
    config = mq.QuantConfig(spec, skip=mq.SkipRules.defaults(skip_head=True))
    checkpoints = out_dir / f"checkpoints-{name}"
    shutil.rmtree(checkpoints, ignore_errors=True)  # a previous run's "best" must not count
    best = ModelCheckpoint(dirpath=checkpoints, monitor="val_acc", mode="max")
    ptq = PostTrainingQuantization(config, weights="best", save_to=out_dir / f"digits-{name}.safetensors",
                                   monitor="val_acc", tolerance=0.02)
    logs = out_dir / f"logs-{name}"
    shutil.rmtree(logs, ignore_errors=True)
    trainer = pl.Trainer(max_epochs=6, accelerator="cpu", devices=1, callbacks=[best, ptq],
                         logger=CSVLogger(out_dir, name=f"logs-{name}", version=0),  # metrics.csv + the report
                         enable_progress_bar=False, enable_model_summary=False)
    print(f"\n== {name}: training, then quantizing the best epoch's weights when training ends ==")
    trainer.fit(model, datamodule=data)  # the callback prints the per-layer report and the file it wrote

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", mq.AccuracyWarning)
        (metrics,) = trainer.validate(model, datamodule=data, verbose=False)
    for w in caught:
        if issubclass(w.category, mq.AccuracyWarning):
            print(f"AccuracyWarning: {w.message}")

    print(f"report and metrics: {sorted(p.name for p in Path(trainer.log_dir).iterdir())} in {trainer.log_dir}")
    path = ptq.saved_path
    reloaded = mq.load(DigitsCNN(), path)  # inference without Lightning
    x = torch.stack([data.val_set[i][0] for i in range(64)])
    with torch.inference_mode():
        same = torch.equal(model.eval()(x), reloaded.eval()(x))
    if not same:
        raise SystemExit(f"{name}: the reloaded model's outputs differ from the quantized model's")
    return {"best_epoch": ptq.source["epoch"], "path": path,
            "float_acc": ptq.float_metric, "quant_acc": metrics["val_acc"], "float_bytes": float_bytes,
            "quant_bytes": state_bytes(model), "file_bytes": path.stat().st_size,
            "sqnr": ptq.report.end_to_end["sqnr_db"], "agree": ptq.report.end_to_end["top1_agreement"]}


def main() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available: False" banners
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    data = Digits()
    data.setup("fit")
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.gettempdir()) / "monoquant_lightning_digits"
    results = {}
    for name, spec in (("INT4-g32", mq.Int4(group_size=32)), ("INT8", mq.Int8())):
        results[name] = run(name, spec, data, out_dir)

    print("\n== summary (validation set: 360 digits; float = the best epoch's weights) ==")
    print(f"{'scheme':<10} {'best ep':>7} {'acc float':>9} {'acc quant':>9} {'out SQNR dB':>11} {'top-1 agree':>11} "
          f"{'size float':>10} {'size quant':>10} {'file':>9}  reload")
    for name, r in results.items():
        print(f"{name:<10} {r['best_epoch']:>7} {r['float_acc']:>9.4f} {r['quant_acc']:>9.4f} {r['sqnr']:>11.1f} "
              f"{r['agree']:>11.4f} {r['float_bytes'] / 1024:>7.1f} KiB {r['quant_bytes'] / 1024:>6.1f} KiB "
              f"{r['file_bytes'] / 1024:>5.1f} KiB  identical outputs")
    print("\nwrote (load with mq.load(DigitsCNN(), path), no Lightning needed):")
    for r in results.values():
        print(f"  {r['path']}")


if __name__ == "__main__":
    main()
