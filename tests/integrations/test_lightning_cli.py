"""The callback configured from a LightningCLI YAML file, on the digits example's model and data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("lightning")
pytest.importorskip("jsonargparse")
pytest.importorskip("sklearn")

import torch
from lightning.pytorch.cli import LightningCLI
from monoquant_lightning import PostTrainingQuantization

import monoquant as mq

EXAMPLE = Path(__file__).parent.parent.parent / "examples" / "lightning_digits.py"
_spec = importlib.util.spec_from_file_location("lightning_digits", EXAMPLE)
digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits)

TRAINER = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  callbacks:
    - class_path: monoquant_lightning.PostTrainingQuantization
      init_args:
        calibration_batches: 2
        compare_batches: 1
        save_to: {root}/digits.safetensors
        config:
"""

CLASS_PATHS = """\
          class_path: monoquant.QuantConfig
          init_args:
            weights:
              class_path: monoquant.Int4
              init_args: {group_size: 32, method: gptq}
            skip:
              class_path: monoquant.SkipRules
              init_args: {exclude: [head], min_params: 1024}
"""

PLAIN_DICTS = """\
          weights: {kind: int4, group_size: 32, method: gptq}
          skip: {exclude: [head]}
"""


def run_cli(tmp_path: Path, config_yaml: str) -> tuple[LightningCLI, PostTrainingQuantization]:
    path = tmp_path / "config.yaml"
    path.write_text(TRAINER.format(root=tmp_path) + config_yaml)
    cli = LightningCLI(digits.DigitsCNN, digits.Digits, args=["fit", "--config", str(path)],
                       save_config_callback=None)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, PostTrainingQuantization)]
    return cli, callback


@pytest.mark.parametrize("form", [CLASS_PATHS, PLAIN_DICTS], ids=["class_path", "plain_dict"])
def test_lightning_cli_fit_from_a_yaml_file_quantizes_with_gptq_and_skip_rules(tmp_path, form):
    cli, cb = run_cli(tmp_path, form)
    cfg = cb.config
    assert cfg.weights == mq.Int4(group_size=32, method="gptq") and cfg.activations is None
    assert list(cfg.skip.exclude) == ["head"] and cfg.skip.min_params == 1024
    rows = {r.name: r for r in cb.report.layers}
    assert rows["fc"].scheme == "int4-affine-g32" and rows["fc"].method == "gptq"
    assert rows["features.2"].method == "gptq"  # convolutions get GPTQ too
    assert rows["head"].skipped and "exclude" in rows["head"].reason
    assert rows["features.0"].skipped  # 288 weights < min_params
    assert not mq.needs_calibration(cli.model) and rows["fc"].output_sqnr_db is not None
    x = torch.stack([cli.datamodule.val_set[i][0] for i in range(16)])
    reloaded = mq.load(digits.DigitsCNN(), cb.saved_path)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), cli.model.eval()(x))


def test_lightning_cli_takes_a_spec_name(tmp_path):
    _, cb = run_cli(tmp_path, "          int8\n")  # config: int8
    assert cb.config.weights == mq.Int8() and cb.quantized_layers["fc"] == "int8-sym-channel"
