"""Shared helpers of the robustness suite: snapshots, leftover-file checks, the CLI in-process and in a jail."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import monoquant as mq
from monoquant.cli import main

ROOT = Path(__file__).resolve().parents[2]
SUBPROCESS_MEMORY = 3 << 30
"""Address-space limit (bytes) of every subprocess the suite starts: a case that materialises gigabytes fails."""


class Small(nn.Module):
    """Two quantizable layers and a float one, 64 wide (INT4 group size 32 divides it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.norm = nn.LayerNorm(64)
        self.fc2 = nn.Linear(64, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))


def quantized_small(spec=None) -> Small:
    model = Small().eval()
    mq.quantize_(model, mq.QuantConfig(spec or mq.Int8(), skip=mq.SkipRules.none()))
    return model


@dataclass
class Snapshot:
    """A model's module objects and a copy of every state_dict tensor, to prove a failed call changed nothing."""

    modules: list[tuple[str, int]]
    tensors: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module) -> Snapshot:
        return cls([(n, id(m)) for n, m in model.named_modules()],
                   {k: v.detach().clone() for k, v in model.state_dict().items()})

    def assert_same(self, model: nn.Module) -> None:
        assert [(n, id(m)) for n, m in model.named_modules()] == self.modules
        state = model.state_dict()
        assert list(state) == list(self.tensors)
        for k, v in self.tensors.items():
            assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


def files_in(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (hidden ones included) and its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_no_leftovers(before: dict[str, bytes], directory: Path) -> None:
    """``directory`` holds exactly the files it held before, byte for byte: no temp, no partial, no overwrite."""
    after = files_in(directory)
    assert sorted(after) == sorted(before), f"files changed: {sorted(set(after) ^ set(before))}"
    for name, data in before.items():
        assert after[name] == data, f"{name} was modified"


def cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    """Run ``monoquant ARGS`` in this process; return the exit status and stderr, asserting it is one line."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    if code:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("monoquant: error: "), err
        assert "Traceback" not in err
    return code, err


def _limits() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (SUBPROCESS_MEMORY, SUBPROCESS_MEMORY))


def run_jailed(code: str, *, timeout: float = 120, extra_limits: str = "") -> subprocess.CompletedProcess:
    """Run Python ``code`` in a subprocess with an address-space limit and a timeout (it may crash or hang).

    ``extra_limits`` is Python run first in the child (e.g. a ``resource.setrlimit`` of the file size).
    """
    program = "import resource\n" + textwrap.dedent(extra_limits) + "\n" + textwrap.dedent(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env,
                          timeout=timeout, preexec_fn=_limits)


def run_cli_jailed(*args: object, timeout: float = 120, extra_limits: str = "") -> subprocess.CompletedProcess:
    """``monoquant ARGS`` in a jailed subprocess (see :func:`run_jailed`)."""
    argv = [str(a) for a in args]
    return run_jailed(f"import sys\nfrom monoquant.cli import main\nsys.exit(main({argv!r}))", timeout=timeout,
                      extra_limits=extra_limits)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("monoquant: error: "), r.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def rewrite_metadata(path: Path, mutate) -> None:
    """Rewrite a safetensors file's header with ``mutate(metadata)`` applied (tensor bytes unchanged)."""
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header["__metadata__"]
    mutate(meta)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


class _FailingFile:
    """Wraps the writer's file: the ``fail_at``-th write raises ``exc``."""

    def __init__(self, fh, fail_at: int, exc: BaseException) -> None:
        self._fh, self._n, self._fail_at, self._exc = fh, 0, fail_at, exc

    def write(self, data):
        self._n += 1
        if self._n == self._fail_at:
            raise self._exc
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)


def inject_write_fault(monkeypatch, where: str, exc: BaseException) -> None:
    """Make one step of :class:`monoquant.safetensors_io.StreamWriter` raise ``exc``: ``"header"`` (the first
    write), ``"tensor"`` (the third), or a function such as ``"os.replace"`` / ``"tempfile.mkstemp"``."""
    from monoquant import safetensors_io as stio

    if where in ("header", "tensor"):
        real = os.fdopen
        monkeypatch.setattr(stio.os, "fdopen",
                            lambda fd, mode: _FailingFile(real(fd, mode), 1 if where == "header" else 3, exc))
    else:
        module, attr = where.split(".")
        target = {"tempfile": stio.tempfile, "os": stio.os}[module]

        def fail(*a, **k):
            raise exc

        monkeypatch.setattr(target, attr, fail)
