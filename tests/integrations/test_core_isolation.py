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


def test_the_integration_uses_only_the_cores_public_names():
    """monoquant_lightning imports from ``monoquant`` itself (or its documented ``functional`` module), never from
    private modules, so the core can reorganise without breaking it."""
    import ast

    import monoquant as mq

    package = ROOT / "integrations" / "lightning" / "monoquant_lightning"
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("monoquant"):
                assert node.module in ("monoquant", "monoquant.functional"), f"{path.name}: from {node.module}"
                if node.module == "monoquant":
                    for alias in node.names:
                        assert alias.name in mq.__all__, f"{path.name}: {alias.name} is not exported"
