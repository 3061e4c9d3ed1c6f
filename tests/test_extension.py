"""The README's custom-format example runs as written, and everything (quantize_, report, thresholds, save,
load, state-dict load) works with a format that monoquant's own code has never heard of."""

import re
from pathlib import Path

import pytest
import torch

import monoquant as mq

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## Extending monoquant"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def registry_restored():
    before = dict(mq.FORMATS)
    yield
    mq.FORMATS.clear()
    mq.FORMATS.update(before)


def test_the_readme_custom_format_works_end_to_end(tmp_path, monkeypatch, registry_restored):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), scope)
    model, restored, report = scope["model"], scope["restored"], scope["report"]
    assert [r.scheme for r in report.quantized] == ["fp8-e4m3", "fp8-e4m3"]
    assert all(r.weight_sqnr_db > 25 for r in report.quantized)
    assert model[0].qweight.dtype == torch.float8_e4m3fn
    x = torch.randn(5, 256)
    assert torch.equal(restored(x), model(x))
    with torch.no_grad():
        assert mq.functional.sqnr(model[0].weight, model[0].dequantize_weight()) == float("inf")
    fresh = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    assert torch.equal(mq.load(fresh, model.state_dict())(x), model(x))  # recognised by its own infer()
    thresholds = mq.Thresholds()
    assert thresholds.weight_sqnr_db["fp8-e4m3"] == 25.0


def test_thresholds_apply_to_a_custom_format_by_its_kind(tmp_path, monkeypatch, registry_restored):
    """Floors are looked up by the format's registered kind ("fp8-e4m3"), not by its scheme string's prefix."""
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_example(), "README.md", "exec"), {})
    fp8 = mq.FORMATS["fp8-e4m3"]
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    with pytest.warns(mq.AccuracyWarning, match=r"layer '0' \(fp8-e4m3\): weight SQNR .* below 99 dB"):
        report = mq.quantize_(model, fp8(), thresholds={"weight_sqnr_db": {"fp8-e4m3": 99.0}})
    assert {r.kind for r in report.quantized} == {"fp8-e4m3"}


def test_the_readme_format_brings_its_own_kernel_and_the_tuner_times_it(tmp_path, monkeypatch, registry_restored):
    """The FP8 example's ``fp8_bf16`` kernel: registered by the format alone, eligible by CPU feature, exact on the
    bf16-rounded input, timed against dequantize + GEMM, and its layout kept only where it wins."""
    from monoquant import hardware, kernels, tuner

    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), scope)
    assert "fp8_bf16" in kernels.kernel_names()
    q = mq.QuantLinear.from_float(torch.nn.Linear(512, 256), scope["FP8"]())
    x = torch.randn(4, 512)
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert "fp8_bf16" not in kernels._weight_candidates(q, cpu, 4, False, kernels.TUNE_MAX_ROWS)
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert kernels.choose_linear_kernel(q, cpu, 4, False) == "fp8_bf16"  # the static table: the format's first
    with torch.no_grad(), kernels.pin("fp8_bf16"):
        y = q(x)
    assert q.last_kernel == "fp8_bf16"
    ref = torch.nn.functional.linear(x.bfloat16().double(), q.dequantize_weight(torch.float64), q.bias.double())
    assert float((y.double() - ref).norm() / ref.norm()) < 2**-8  # exact bf16 products; the bf16 output rounded once
    for fastest in ("fp8_bf16", "dequant"):
        tuner.clear()
        q.quant_weight.clear_cache()
        monkeypatch.setattr(tuner, "time_call", lambda call, f=fastest: 0.5 if call.func.__name__ == f"_{f}" else 1.0)
        with torch.no_grad():
            q(x)
        assert q.last_kernel == fastest and ("fp8_bf16" in q._kernel_cache) == (fastest == "fp8_bf16")
