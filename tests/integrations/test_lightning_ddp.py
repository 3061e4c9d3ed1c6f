"""PostTrainingQuantization under 2-process CPU DDP (gloo): a real Trainer launched as a script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

import torch

import monoquant as mq

HERE = Path(__file__).parent


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_two_cpu_processes_identical_quantized_weights_and_rank_zero_output(tmp_path):
    env = dict(os.environ)
    root = HERE.parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(root), str(root / "integrations" / "lightning"),
                                         env.get("PYTHONPATH", "")])
    env.pop("LOCAL_RANK", None)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(HERE / "ddp_script.py"), str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    # both ranks loaded the same best checkpoint (rank zero's path) before quantizing
    assert r0["source"]["weights"] == "best" and r0["source"]["checkpoint"] == r1["source"]["checkpoint"]
    assert Path(r0["source"]["checkpoint"]).parent == tmp_path / "ckpt"
    # every rank holds bit-identical quantized buffers, activation qparams and float parameters
    assert r0["layers"] == r1["layers"] and set(r0["layers"]) == {"fc1", "fc2"}
    assert r0["buffers"].keys() == r1["buffers"].keys()
    assert {"fc1.qweight", "fc1.scale"} <= r0["buffers"].keys()
    for key in r0["buffers"]:
        assert torch.equal(r0["buffers"][key], r1["buffers"][key]), key
    # each rank compared and calibrated on its own shard (DistributedSampler): disjoint samples, batches of 4
    seen0, seen1 = set(r0["seen"]), set(r1["seen"])
    assert len(seen0) == len(seen1) == 8 and not seen0 & seen1
    # observers were all-reduced: the frozen activation qparams are those of the union of both shards' statistics
    assert set(r0["local"]) == {"fc1", "fc2"}
    for layer, (mn0, mx0) in r0["local"].items():
        mn1, mx1 = r1["local"][layer]
        assert not (torch.equal(mn0, mn1) and torch.equal(mx0, mx1))  # the shards really differ
        union = mq.MinMaxObserver().configure(mq.Int8().activation_qtype())
        union(torch.stack([torch.minimum(mn0, mn1), torch.maximum(mx0, mx1)]))
        scale, zero = union.calculate_qparams()
        assert r0["buffers"][f"{layer}.input_quantizer.scale"] == pytest.approx(float(scale), rel=1e-6)
        assert int(r0["buffers"][f"{layer}.input_quantizer.zero_point"]) == int(zero)
    # the comparison is summed over both ranks (one all-reduce): the same numbers everywhere
    assert r0["end_to_end"] == r1["end_to_end"] and r0["end_to_end"]["sqnr_db"] > 10
    assert (r0["end_to_end"]["batches"], r0["end_to_end"]["samples"]) == (4, 16)  # 2 batches of 4 per rank
    # per-layer output SQNR, measured after the observers' all-reduce and summed over ranks: the same everywhere
    assert r0["output_sqnr"] == r1["output_sqnr"] and set(r0["output_sqnr"]) == {"fc1", "fc2"}
    assert all(20 < v < 80 for v in r0["output_sqnr"].values())
    # the report table is printed once; loggers and accuracy warnings act on rank zero only, but both ranks agree
    # that the check failed
    assert proc.stdout.count("2 quantized, ") == 1
    assert r0["failed"] and r1["failed"]
    assert len(r0["accuracy_warnings"]) == 1 and "val_acc got worse" in r0["accuracy_warnings"][0]
    assert r1["accuracy_warnings"] == []
    logged0 = {k for m in r0["logged"] for k in m}
    assert {"quant/sqnr_db", "quant/val_acc_float", "quant/val_acc_quantized"} <= logged0
    assert not any(k.startswith("quant/") for m in r1["logged"] for k in m)
