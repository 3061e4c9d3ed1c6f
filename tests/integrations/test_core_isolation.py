"""The core package never imports the Lightning stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent.parent


def run_python(code: str) -> str:
    """stdout of ``code`` run by a fresh interpreter that sees only this checkout (not the integration)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""}).stdout.strip()


def test_importing_monoquant_imports_no_lightning_or_torchmetrics():
    code = ("import sys, monoquant; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning', 'lightning_fabric', 'torchmetrics', 'monoquant_lightning')); "
            "print(bad)")
    assert run_python(code) == "[]"


def test_monoquant_works_when_lightning_cannot_be_imported():
    code = ("import sys\n"
            "for m in ('lightning', 'pytorch_lightning', 'lightning_fabric', 'torchmetrics'):\n"
            "    sys.modules[m] = None  # any import of these now raises ImportError\n"
            "import torch, monoquant as mq\n"
            "m = torch.nn.Sequential(torch.nn.Linear(64, 64))\n"
            "r = mq.quantize_(m, mq.QuantConfig(mq.Int8(), skip=mq.SkipRules.none()))\n"
            "print(type(m[0]).__name__, len(r.quantized))\n")
    assert run_python(code) == "QuantLinear 1"
