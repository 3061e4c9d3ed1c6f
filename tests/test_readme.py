"""Every Python block of the README runs as written, offline, on small stand-ins for the names it leaves to the
reader (``model``, ``loader``, ``dm``...): a README statement that stops being true fails here.

A block that cannot run offline says so in the README itself, on the line before its fence:
``<!-- readme-test: skip (why) -->``. Shell blocks are commands for a terminal and are not run.
"""

from __future__ import annotations

import copy
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import monoquant as mq

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!-- readme-test: skip \((.+)\) -->\s*$")


def readme_blocks() -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` of every Python block."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        blocks.append((line, m.group(1), skip.group(1) if skip else None))
    return blocks


class MLP(nn.Module):
    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(64), MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class MyNet(nn.Module):
    """The reader's model: ``layers.N.mlp.up`` as the README names it, and a classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[Block() for _ in range(4)])
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))


def _plain_names() -> dict[str, object]:
    torch.manual_seed(0)
    model = MyNet().eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 64),
                                                                        torch.randint(0, 10, (64,))), batch_size=16)
    return {"torch": torch, "nn": nn, "mq": mq, "MyNet": MyNet, "model": model, "float_model": copy.deepcopy(model),
            "other_model": MyNet(), "loader": loader, "cfg": mq.QuantConfig(mq.Int8()),
            "batches": [torch.randn(16, 64) for _ in range(4)]}


def _lightning_names() -> dict[str, object]:
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = torch.utils.data.TensorDataset(torch.randn(64, 64), torch.randint(0, 10, (64,)))

    class DataModule(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(data, batch_size=16)

        val_dataloader = train_dataloader

    class LitNet(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = MyNet()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class QuietL:  # L.Trainer with this test's quiet, short defaults; everything else is lightning.pytorch's
        def __getattr__(self, name):
            return getattr(L, name)

        @staticmethod
        def Trainer(**kwargs):
            defaults = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=2, accelerator="cpu", devices=1,
                            enable_progress_bar=False, enable_model_summary=False, logger=False,
                            num_sanity_val_steps=0)
            return L.Trainer(**{**defaults, **kwargs})

    from monoquant_lightning import PostTrainingQuantization  # imported by the section's first block

    return {"torch": torch, "mq": mq, "L": QuietL(), "ModelCheckpoint": ModelCheckpoint, "model": LitNet(),
            "dm": DataModule(), "PostTrainingQuantization": PostTrainingQuantization}


def _transformers_names() -> dict[str, object]:
    """A tiny Llama-style causal LM (also saved as a float folder), token batches, the names the section imports."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained("float-model")  # in the test's working folder
    model.save_pretrained("llama-7b")  # the folder the "larger than memory" block names (a tiny stand-in)
    return {"torch": torch, "mq": mq, "model": model, "AutoModelForCausalLM": transformers.AutoModelForCausalLM,
            "AutoConfig": transformers.AutoConfig, "batches": [torch.randint(0, 128, (2, 16)) for _ in range(4)],
            "float_folder": "float-model"}


def names_for(code: str) -> dict[str, object]:
    if "L.Trainer" in code:
        return _lightning_names()
    if "AutoModel" in code:
        return _transformers_names()
    return _plain_names()


BLOCKS = readme_blocks()


def test_the_readme_has_python_blocks_and_every_skip_gives_a_reason():
    assert len(BLOCKS) >= 10
    assert all(reason.strip() for _, _, reason in BLOCKS if reason is not None)


@pytest.mark.parametrize("line, code, skip", BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_block_runs(line, code, skip, tmp_path, monkeypatch):
    if skip is not None:
        pytest.skip(f"README.md:{line}: {skip}")
    monkeypatch.chdir(tmp_path)  # files the block writes land here
    module = types.ModuleType(f"readme_block_{line}")  # a real module: dataclasses look their module up
    module.__dict__.update(names_for(code))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # accuracy warnings on tiny random models are expected
        exec(compile(code, f"README.md:{line}", "exec"), module.__dict__)
