"""What a new user hits in the first hour: every message true, every mistake named, nothing silently done.

One test per case of the first-hour review: the exception type, what its message says to do, and that the model
or the files did not change.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _robust import ROOT, Small, Snapshot, cli, files_in, quantized_small, rewrite_metadata
from safetensors.torch import save_file
from torch import nn

import monoquant as mq
from monoquant.quantize import NOT_MEASURED_NOTE

ALL = mq.SkipRules.none()
DATA = [torch.randn(8, 64) for _ in range(4)]


def test_a_measured_report_does_not_say_accuracy_was_not_measured():
    measured = mq.quantize_(Small(), mq.QuantConfig(mq.Int8(), skip=ALL), calibration_data=DATA)
    assert "sqnr_db" in measured.end_to_end and NOT_MEASURED_NOTE not in measured.notes
    assert "not measured" not in str(measured) and "not measured" not in measured.to_markdown()
    unmeasured = mq.quantize_(Small(), mq.QuantConfig(mq.Int8(), skip=ALL))
    assert unmeasured.notes == [NOT_MEASURED_NOTE] and unmeasured.end_to_end == {}


def test_a_group_size_that_does_not_divide_falls_back_to_the_largest_divisor():
    model = nn.Sequential(nn.Linear(256, 64), nn.Linear(64, 256))
    report = mq.quantize_(model, mq.QuantConfig(mq.Int4(group_size=100), skip=ALL))
    assert [r.scheme for r in report.layers] == ["int4-affine-g64", "int4-affine-g64"]
    assert report.skipped == {}
    with pytest.warns(mq.NothingQuantizedWarning):
        odd = mq.quantize_(nn.Sequential(nn.Linear(262, 64)), mq.QuantConfig(mq.Int4(group_size=64), skip=ALL))
    assert odd.skipped == {"0": "input size 262 has no divisor between 32 and 64 to use as the INT4 group size (its "
                                "divisors below 32: [1, 2]); pass Int4(group_size=...) with a divisor of 262"}


def test_the_cli_refuses_to_write_a_file_with_nothing_quantized(tmp_path, capsys):
    src = tmp_path / "f.safetensors"
    save_file({"a.weight": torch.randn(64, 262), "b.weight": torch.randn(64, 262)}, src)
    before = files_in(tmp_path)
    code, err = cli(capsys, "quantize", src, tmp_path / "o.safetensors", "--bits", "4", "--group-size", "64",
                    "--no-progress")
    assert code == 1 and "no tensor of" in err and "--allow-unquantized" in err and "no output was written" in err
    assert files_in(tmp_path) == before
    code, _ = cli(capsys, "quantize", src, tmp_path / "o.safetensors", "--bits", "4", "--group-size", "64",
                  "--no-progress", "--allow-unquantized")
    assert code == 0 and (tmp_path / "o.safetensors").exists()
    wide = tmp_path / "wide.safetensors"
    save_file({"a.weight": torch.randn(64, 256)}, wide)
    capsys.readouterr()
    code, _ = cli(capsys, "quantize", wide, tmp_path / "o100.safetensors", "--bits", "4", "--group-size", "100",
                  "--no-progress")
    assert code == 0 and mq.safetensors_io.read_header(tmp_path / "o100.safetensors").tensors["a.scale"].shape[1] == 4


def test_gptq_without_data_is_reported_as_waiting_not_as_done():
    model = Small()
    with pytest.warns(mq.CalibrationPendingWarning, match=r"2 layer\(s\) wait for calibration and compute in float "
                      r"until then .*mq\.calibrate_and_freeze\(model, data\) afterwards"):
        report = mq.quantize_(model, mq.QuantConfig(mq.Int4(group_size=32, method="gptq"), skip=ALL))
    assert [r.name for r in report.pending] == ["fc1", "fc2"]
    summary = next(line for line in str(report).splitlines() if "kept float;" in line)
    assert summary.startswith("0 quantized, 2 waiting for calibration, 0 kept float"), summary
    assert "waiting for calibration: runs in float until mq.calibrate_and_freeze" in str(report)
    report.record_frozen(mq.calibrate_and_freeze(model, DATA))
    assert report.pending == [] and "\n2 quantized, 0 kept float;" in str(report)


def test_quantizing_an_already_quantized_model_is_refused():
    model = quantized_small()
    snap = Snapshot.of(model)
    with pytest.raises(mq.AlreadyQuantizedError, match=r"quantize_ needs the float model.*nothing was changed.*"
                                                       r"mq\.dequantize_\(model\)"):
        mq.quantize_(model, mq.Int8())
    snap.assert_same(model)


def test_sensitivity_on_a_quantized_model_is_refused_not_empty():
    model = quantized_small()
    snap = Snapshot.of(model)
    with pytest.raises(mq.AlreadyQuantizedError, match=r"mq\.sensitivity .*already holds 2 quantized layer\(s\).*"
                                                       r"mq\.dequantize_\(model\)"):
        mq.sensitivity(model, mq.Int8(), DATA)
    snap.assert_same(model)
    assert len(mq.sensitivity(mq.dequantize_(model), mq.QuantConfig(mq.Int8(), skip=ALL), DATA)) == 2


def _run_shell(command: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["bash", "-c", f"set -o pipefail; {command}; echo \"status=${{PIPESTATUS[0]}}\""],
                          capture_output=True, text=True, env=full_env, timeout=120)


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_inspect_into_a_closed_pipe_is_quiet(tmp_path, unbuffered):
    # an inspect table longer than a pipe buffer (64 KiB on Linux; 1500 rows are about 87 KB: 300 were 18 KB, so
    # whether inspect wrote everything before head closed the pipe was a race)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(1500)])
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), skip=ALL), progress=False)
    mq.save(model, tmp_path / "m.safetensors")
    r = _run_shell(f"{sys.executable} -m monoquant inspect {tmp_path / 'm.safetensors'} | head -n 2",
                   PYTHONUNBUFFERED=unbuffered)
    assert r.stdout.splitlines()[-1] == "status=141", r.stdout[-500:]  # what `yes | head` gives: SIGPIPE's status
    assert r.stderr == "", r.stderr[-2000:]
    assert len(r.stdout.splitlines()) == 3


def test_the_readme_does_not_claim_an_int4_first_and_last_warning_by_default():
    readme = (ROOT / "README.md").read_text()
    assert "when the first and last layers are both INT4" not in readme
    assert "mq.Thresholds(int4_first_and_last=True)" in readme
    assert mq.Thresholds().int4_first_and_last is False
    for line in readme.splitlines():  # install lines work from a checkout: nothing is on PyPI yet
        if "pip install" in line and "monoquant" in line:
            assert "-e" in line, line


def test_one_version_source_and_the_lightning_requirement():
    import tomllib

    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lightning = tomllib.loads((ROOT / "integrations/lightning/pyproject.toml").read_text())["project"]
    assert "version" not in core and core["dynamic"] == ["version"]
    assert "version" not in lightning and "monoquant>=0.2" in lightning["dependencies"]
    assert mq.__version__ == "0.2.0"
    assert (ROOT / "monoquant/py.typed").exists()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [0.2.0] - 2026-12-04" in changelog and changelog.index("## [Unreleased]") < changelog.index("## [0.2.0]")


def test_a_bare_spec_given_to_the_embedding_class_is_its_format():
    q = mq.QuantEmbedding.from_float(nn.Embedding(100, 64), mq.Int8())
    assert q.scheme() == "int8-sym-channel" and q.num_embeddings == 100


def test_calibration_batches_of_the_wrong_size_are_an_input_error():
    model = Small()
    snap = Snapshot.of(model)
    with pytest.raises(mq.InputError, match=r"calibration batch 0 \(torch\.float32 \[4, 100\]\) does not run through "
                                            r"the float Small: RuntimeError: .*Nothing was changed; pass batches"):
        mq.quantize_(model, mq.Int8(), calibration_data=[torch.randn(4, 100)])
    snap.assert_same(model)


def test_a_format_name_is_a_config():
    a, b = Small(), Small()
    b.load_state_dict(a.state_dict())
    mq.quantize_(a, "int4")
    mq.quantize_(b, mq.Int4())
    assert a.fc1.scheme() == b.fc1.scheme() == "int4-affine-g64"
    assert torch.equal(a.fc1.qweight, b.fc1.qweight)
    with pytest.raises(mq.ConfigError, match=r"no weight format is called 'int5'; the registered ones are \["):
        mq.quantize_(Small(), "int5")


def test_a_unicode_digit_format_version_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    mq.save(quantized_small(), path)
    rewrite_metadata(path, lambda meta: meta.update(format_version="²"))
    with pytest.raises(mq.SerializationError, match=r"has format version '²', this monoquant reads 1\.\.1"):
        mq.load(Small(), path)
    code, err = cli(capsys, "inspect", path)
    assert code == 1 and "format version '²'" in err


def test_a_missing_buffer_is_named():
    model = quantized_small()
    state = {k: v for k, v in model.state_dict().items() if k != "fc1.scale"}
    fresh = Small()
    snap = Snapshot.of(fresh)
    with pytest.raises(mq.SerializationError, match=r"\(missing: fc1\.scale\)"):
        mq.load(fresh, state)
    snap.assert_same(fresh)


def test_a_format_that_implements_nothing_says_what_is_missing():
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass(frozen=True)
    class Empty(mq.WeightSpec):
        kind: ClassVar[str] = "empty-test"

    with pytest.raises(mq.ConfigError, match=r"Empty \(kind 'empty-test'\) does not implement empty_buffers, "
                                             r"quantize, dequantize_into: a weight format must define"):
        Empty()


def test_plain_load_from_checkpoint_names_the_mixin(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from monoquant_lightning import PostTrainingQuantization

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

        def training_step(self, batch, batch_idx):
            return self(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self(batch[0]).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 64)), batch_size=8)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, accelerator="cpu", devices=1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path,
                         callbacks=[PostTrainingQuantization(mq.QuantConfig(mq.Int8(), skip=ALL), verbose=False)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Plain(), data, data)
    trainer.save_checkpoint(tmp_path / "q.ckpt")
    with pytest.raises(RuntimeError, match=r"monoquant: this checkpoint holds quantized layers; for "
                                           r"MyModule\.load_from_checkpoint\(path\), define the module as class "
                                           r"MyModule\(QuantizedCheckpointMixin, L\.LightningModule\)"):
        Plain.load_from_checkpoint(tmp_path / "q.ckpt")
    report = Path(trainer.log_dir) / "monoquant_report.md"  # the report sits where the logs are
    text = report.read_text()
    assert text.startswith("| layer | type | scheme |") and "`fc1`" in text and "2 quantized, 0 kept float" in text
    assert "model output vs float: SQNR" in text and "not measured" not in text  # the callback measured it
