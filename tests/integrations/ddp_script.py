"""Run by test_lightning_ddp.py: fit + quantize under Trainer(accelerator="cpu", devices=2, strategy="ddp").

Usage: python ddp_script.py OUT_DIR. Lightning re-launches this script for rank 1. Each rank writes
OUT_DIR/rank<r>.pt with its quantized buffers and the sample ids it calibrated/compared on.
"""

from __future__ import annotations

import copy
import itertools
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from monoquant_lightning import PostTrainingQuantization
from ptq_models import MLP, MemoryLogger, classification_data, loader
from torch.utils.data import TensorDataset

import monoquant as mq


class Recording(MLP):
    def on_before_batch_transfer(self, batch, dataloader_idx):
        if self.transfers is not None:
            self.transfers.extend(batch[0][:, -1].long().tolist())  # the last feature holds the sample id
        return batch


class StartRecording(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        pl_module.transfers = []
        self.float_model = copy.deepcopy(pl_module)


def local_statistics(float_model, config, batches) -> dict[str, torch.Tensor]:
    """What this rank's activation observers see on its own batches, without any all-reduce."""
    mq.quantize_(float_model, config)
    with mq.calibrate(float_model):
        for x, _ in batches:
            float_model(x)
    return {name: torch.stack([q.input_quantizer.observer.min_val, q.input_quantizer.observer.max_val])
            for name, q in float_model.named_modules() if getattr(q, "input_quantizer", None) is not None}


def main(out: Path) -> None:
    torch.manual_seed(0)
    val = classification_data(32, seed=1)
    x = val.tensors[0].clone()
    x[:, -1] = torch.arange(len(x), dtype=x.dtype)
    model = Recording()
    # static activations: every rank calibrates observers on its own shard, then they are all-reduced
    config = mq.QuantConfig(mq.Int8(), activations=mq.Int8(observer=mq.MinMaxObserver()))  # min/max: checkable
    cb = PostTrainingQuantization(config, compare_batches=2, calibration_batches=2, monitor="val_acc", tolerance=0.1)
    start, logger = StartRecording(), MemoryLogger()
    best = ModelCheckpoint(dirpath=out / "ckpt", monitor="val_acc", mode="max")  # weights="best" on every rank
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=2,
                         logger=logger, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[start, cb, best])
    val_loader = loader(TensorDataset(x, val.tensors[1]), batch_size=4)
    trainer.fit(model, loader(classification_data(32)), val_loader)
    transfers = model.transfers
    model.transfers = None
    model.val_offset = -0.5  # the quantized model "scores" 0.5 lower: the accuracy check must fire
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(model, val_loader, verbose=False)
    accuracy_warnings = [str(w.message) for w in caught if issubclass(w.category, mq.AccuracyWarning)]
    shard = list(itertools.islice(trainer.val_dataloaders, 2))  # this rank's calibration batches
    local = local_statistics(start.float_model, config, shard)
    result = {"buffers": dict(model.state_dict()), "seen": transfers, "end_to_end": cb.report.end_to_end,
              "layers": cb.quantized_layers, "local": local, "accuracy_warnings": accuracy_warnings,
              "logged": logger.logged, "failed": cb.accuracy_check["failed"],
              "output_sqnr": {r.name: r.output_sqnr_db for r in cb.report.quantized}, "source": cb.source}
    torch.save(result, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
