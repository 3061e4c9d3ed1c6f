"""PostTrainingQuantization on CUDA (skipped without it), and the one-command GPU check script on any machine.

On a CUDA machine: ``pytest -q tests/gpu`` or ``python tests/gpu/run_gpu_check.py`` (prints what ran).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

import run_gpu_check as gpu
import torch

import monoquant as mq

HERE = Path(__file__).parent
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("name", list(gpu.CONFIGS))
def test_callback_on_one_gpu_runs_the_low_bit_kernels_and_the_file_reloads_identically(tmp_path, name):
    result = gpu.check(name, "gpu", tmp_path)
    assert result["kernels"] == dict.fromkeys(gpu.QUANTIZED, gpu.EXPECTED[name])
    assert result["reload_identical"] and result["ok"]
    assert result["sqnr_db"] > (10 if name.startswith("int4") else 25)


@cuda
def test_report_rows_have_output_sqnr_on_gpu(tmp_path):
    config, precision = gpu.CONFIGS["int4-bf16"]
    model, cb = gpu.fit(config, precision, "gpu", tmp_path / "m.safetensors")
    assert isinstance(model.fc1, mq.QuantLinear) and model.device.type == "cuda"
    assert all(r.output_sqnr_db is not None for r in cb.report.quantized)


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_on_two_gpus_gives_identical_buffers(tmp_path):
    result = gpu.check_ddp(tmp_path)
    assert result["ok"], result


def run_script(*args: str) -> subprocess.CompletedProcess:
    root = HERE.parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), str(root / "integrations" / "lightning")])}
    return subprocess.run([sys.executable, str(HERE / "run_gpu_check.py"), *args], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's behaviour without CUDA")
def test_script_without_cuda_says_nothing_ran_and_exits_zero():
    proc = run_script()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "no CUDA device: nothing ran (pass --allow-cpu to run the checks on the CPU)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run is for machines without CUDA")
def test_script_dry_run_on_cpu_passes_every_single_device_check():
    proc = run_script("--allow-cpu")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert [line.split(":")[0] for line in lines] == ["PASS int4-bf16", "PASS w8a8-static"]
    assert all("reload_identical=True" in line for line in lines)
