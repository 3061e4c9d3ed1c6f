"""One command for a CUDA machine: PostTrainingQuantization end to end where users train, and what ran.

    python tests/gpu/run_gpu_check.py              # needs CUDA; without it, says so and exits 0
    python tests/gpu/run_gpu_check.py --allow-cpu  # the same checks on the CPU (to try the script itself)

Checks, each a real ``Trainer.fit`` (4 steps, synthetic 256-feature classification data, batches of 64):

* ``int4-bf16``: ``precision="bf16-mixed"``, INT4 weights (groups of 128): fc1/fc2 must run ``int4pack_cuda``;
* ``w8a8-static``: INT8 weights + static INT8 activations (calibrated on validation batches, frozen): fc1/fc2
  must run ``w8a8_int_mm`` (``torch._int_mm``);
* each writes its ``save_to`` file and reloads it with ``mq.load`` (no Lightning): outputs must be identical;
* ``ddp-2gpu`` (only with 2+ GPUs): the INT4 check under ``strategy="ddp"``, devices=2: quantized buffers
  must be identical on both ranks.

Prints one line per check (kernels that actually ran, per layer, from ``last_kernel``; output SQNR vs float;
reload result) and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from monoquant_lightning import PostTrainingQuantization
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import monoquant as mq

FEATURES, HIDDEN, CLASSES, BATCH = 256, 512, 16, 64
QUANTIZED = ("fc1", "fc2")
EXPECTED = {"int4-bf16": "int4pack_cuda", "w8a8-static": "w8a8_int_mm"}
"""The kernel each check must run on CUDA (on the CPU, --allow-cpu, any kernel is accepted: a dry run)."""
CONFIGS = {"int4-bf16": (mq.QuantConfig(mq.Int4(group_size=128), skip=mq.SkipRules.defaults(skip_head=True)),
                         "bf16-mixed"),
           "w8a8-static": (mq.QuantConfig(mq.Int8(), activations=mq.Int8(), skip=mq.SkipRules.defaults(skip_head=True)),
                           "32-true")}


class Net(pl.LightningModule):
    """256 -> 512 -> 512 -> 16: shapes every CUDA low-bit kernel accepts (K % 128 == 0, N % 8 == 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(FEATURES, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def data(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    return DataLoader(TensorDataset(x, x[:, :CLASSES].argmax(1)), batch_size=BATCH)


def fit(config: mq.QuantConfig, precision: str, accelerator: str, out: Path,
        **trainer_kwargs) -> tuple[Net, PostTrainingQuantization]:
    pl.seed_everything(0, verbose=False)
    model = Net()
    cb = PostTrainingQuantization(config, calibration_batches=4, compare_batches=2, save_to=out, verbose=False)
    trainer = pl.Trainer(accelerator=accelerator, devices=trainer_kwargs.pop("devices", 1), precision=precision,
                         max_epochs=1, limit_train_batches=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=out.parent,  # the report lands beside `out`
                         enable_model_summary=False, callbacks=[cb], **trainer_kwargs)
    trainer.fit(model, data(1024, 0), data(512, 1))
    return model, cb


def kernels_that_ran(model: Net, precision: str) -> dict[str, str]:
    x = next(iter(data(BATCH, 2)))[0].to(model.device)
    with torch.no_grad(), torch.autocast(model.device.type, torch.bfloat16, enabled=precision == "bf16-mixed"):
        model.eval()(x)
    return {name: getattr(model.get_submodule(name), "last_kernel", "?") for name in QUANTIZED}


def check(name: str, accelerator: str, tmp: Path) -> dict[str, object]:
    config, precision = CONFIGS[name]
    model, cb = fit(config, precision, accelerator, tmp / f"{name}.safetensors")
    ran = kernels_that_ran(model, precision)
    reloaded = mq.load(Net(), cb.saved_path).to(model.device)
    x = next(iter(data(BATCH, 3)))[0].to(model.device)
    with torch.no_grad():
        identical = torch.equal(reloaded.eval()(x), model.eval()(x))
    want = EXPECTED[name] if accelerator == "gpu" else "any (CPU dry run)"
    kernels_ok = accelerator != "gpu" or all(k == want for k in ran.values())
    ok = identical and kernels_ok and not mq.needs_calibration(model)
    return {"check": name, "precision": precision, "devices": 1, "kernels": ran, "expected": want,
            "sqnr_db": cb.report.end_to_end.get("sqnr_db"), "reload_identical": identical, "ok": ok}


def ddp_rank(out: Path) -> None:
    """Run under Lightning's DDP launcher (this script re-executed per rank): save this rank's buffers."""
    config, precision = CONFIGS["int4-bf16"]
    model, cb = fit(config, precision, "gpu", out / "ddp.safetensors", devices=2, strategy="ddp")
    torch.save({"buffers": {k: v.cpu() for k, v in model.state_dict().items()},
                "kernels": kernels_that_ran(model, precision), "sqnr_db": cb.report.end_to_end.get("sqnr_db")},
               out / f"rank{model.global_rank}.pt")


def check_ddp(tmp: Path) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, __file__, "--ddp-rank", str(tmp)], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        return {"check": "ddp-2gpu", "ok": False, "error": proc.stderr[-2000:]}
    r0, r1 = (torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    same = r0["buffers"].keys() == r1["buffers"].keys() and all(
        torch.equal(r0["buffers"][k], r1["buffers"][k]) for k in r0["buffers"])
    ok = same and all(k == "int4pack_cuda" for k in r0["kernels"].values())
    return {"check": "ddp-2gpu", "precision": "bf16-mixed", "devices": 2, "kernels": r0["kernels"],
            "expected": "int4pack_cuda", "sqnr_db": r0["sqnr_db"], "ranks_identical": same, "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--allow-cpu", action="store_true", help="run the single-device checks on the CPU")
    parser.add_argument("--ddp-rank", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    if args.ddp_rank is not None:
        ddp_rank(args.ddp_rank)
        return 0
    if torch.cuda.is_available():
        accelerator = "gpu"
        print(f"device: {torch.cuda.get_device_name(0)} (capability {torch.cuda.get_device_capability(0)}), "
              f"{torch.cuda.device_count()} GPU(s); torch {torch.__version__}, lightning {pl.__version__}")
    elif args.allow_cpu:
        accelerator = "cpu"
        print(f"no CUDA device: running the single-device checks on the CPU; torch {torch.__version__}")
    else:
        print("no CUDA device: nothing ran (pass --allow-cpu to run the checks on the CPU)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        results = [check(name, accelerator, Path(tmp)) for name in CONFIGS]
        if accelerator == "gpu" and torch.cuda.device_count() >= 2:
            results.append(check_ddp(Path(tmp)))
        elif accelerator == "gpu":
            print("ddp-2gpu: skipped (1 GPU)")
    for r in results:
        line = " ".join(f"{k}={v}" for k, v in r.items() if k not in ("check", "ok"))
        print(f"{'PASS' if r['ok'] else 'FAIL'} {r['check']}: {line}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
