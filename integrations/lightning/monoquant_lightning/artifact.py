"""The deployable file: the quantized module written with :func:`monoquant.save` when quantization ends.

Load it for inference without Lightning: ``model = mq.load(MyNet(), path)`` (``MyNet`` built as for
training, or under ``torch.device("meta")``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

import monoquant as mq

SUFFIX = ".safetensors"


def artifact_path(save_to: str | Path, module: nn.Module) -> Path:
    """``save_to`` itself when it names a ``.safetensors`` file, else ``<save_to>/<ModuleClass>.safetensors``."""
    path = Path(save_to)
    return path if path.suffix == SUFFIX else path / f"{type(module).__name__}{SUFFIX}"


def write_artifact(module: nn.Module, save_to: str | Path) -> Path:
    """Write ``module`` (quantized) with :func:`monoquant.save` to :func:`artifact_path`; returns the path."""
    path = artifact_path(save_to, module)
    path.parent.mkdir(parents=True, exist_ok=True)
    mq.save(module, path)
    return path
