import copy
import json
import sys
from xml.etree import ElementTree

import pytest
import torch
from _accuracy_models import Net, batches
from torch import nn

import monoquant as mq
from monoquant.errors import MissingExtraError
from monoquant.report import LayerReport, QuantReport, plot_sensitivity


def _table_lines(text):
    lines = text.splitlines()
    return lines[: lines.index(next(line for line in lines if " quantized, " in line))]


def test_str_is_an_aligned_table():
    report = mq.quantize_(Net().eval(), mq.QuantConfig(mq.Int4(), skip=mq.SkipRules.defaults(skip_head=True)),
                          calibration_data=batches())
    lines = _table_lines(str(report))
    sep = lines[1]
    assert set(sep) <= {"-", " "}
    starts = [i for i in range(len(sep)) if sep[i] == "-" and (i == 0 or sep[i - 1] == " ")]
    ends = [i for i in range(len(sep)) if sep[i] == "-" and (i + 1 == len(sep) or sep[i + 1] == " ")]
    assert len(starts) == 9
    for line in [lines[0], *lines[2:]]:
        for c in range(1, 9):
            assert line[ends[c - 1] + 1: starts[c]].strip() == ""  # only spaces between columns
        for c in range(4):  # text left-aligned, numbers right-aligned, each column at one offset
            assert line[starts[c]] != " "
        for c in range(4, 8):
            assert line[ends[c]] != " "
    assert lines[0].split()[:3] == ["layer", "type", "scheme"]
    assert "model output vs float: SQNR" in str(report)


def test_totals_are_actual_buffer_bytes():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.Linear(256, 4))
    float_bytes = [sum(p.numel() * p.element_size() for p in m.parameters()) for m in (model[0], model[2], model[3])]
    report = mq.quantize_(model, mq.QuantConfig(mq.Int4(group_size=128), skip=mq.SkipRules(exclude=["3"])))
    q0, q2 = model[0], model[2]
    assert [r.bytes_before for r in report.layers] == float_bytes
    assert [r.bytes_after for r in report.quantized] == [q0.storage_bytes(), q2.storage_bytes()]
    # int4 g128: packed codes + float32 scales + uint8 zeros + float32 bias
    assert q0.storage_bytes() == 512 * 128 + 512 * 2 * 4 + 512 * 2 + 512 * 4
    assert report.bytes_before == sum(float_bytes)
    assert report.bytes_after == q0.storage_bytes() + q2.storage_bytes() + float_bytes[2]
    assert report.size_ratio == report.bytes_after / report.bytes_before


def test_bytes_after_of_layers_waiting_for_calibration_count_what_stays_after_freeze():
    int4_bytes = 256 * 128 + 256 * 2 * 4 + 256 * 2 + 256 * 4  # codes, float32 scales, uint8 zeros, float32 bias
    act_qparams = 4 + 4 + 1  # float32 scale, int32 zero-point, bool frozen flag
    for cfg, extra in [(mq.QuantConfig(mq.Int4(method="gptq"), skip=mq.SkipRules.none()), 0),
                       (mq.QuantConfig(mq.Int4(), activations=mq.Int8(observer=mq.HistogramObserver()),
                                       skip=mq.SkipRules.none()), act_qparams)]:
        model = nn.Sequential(nn.Linear(256, 256))
        report = mq.quantize_(model, cfg)
        assert mq.needs_calibration(model)
        assert report.quantized[0].bytes_after == model[0].storage_bytes() == int4_bytes + extra
        mq.calibrate_with(model, [torch.randn(8, 256) for _ in range(2)])
        mq.freeze(model)
        assert model[0].storage_bytes() == int4_bytes + extra


def test_to_dict_is_strict_json():
    report = mq.quantize_(Net().eval(), mq.QuantConfig(mq.Int8(), skip=mq.SkipRules.defaults(skip_head=True)),
                          calibration_data=batches())
    report.layers.append(LayerReport("exact", "Linear", "int8", weight_sqnr_db=float("inf")))
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert [row["name"] for row in d["layers"]] == ["fc1", "fc2", "fc3", "head", "exact"]
    assert d["layers"][-1]["weight_sqnr_db"] == "inf" and d["layers"][3]["output_sqnr_db"] is None
    assert d["layers"][3]["reason"] == "output head (skip_head=True)"
    assert d["bytes_before"] == report.bytes_before and d["quantized"] == 4 and d["kept_float"] == 1
    assert d["end_to_end"]["sqnr_db"] == report.end_to_end["sqnr_db"] and d["calibration_samples"] == 64
    assert d["size_ratio"] == report.size_ratio


def test_empty_report_prints():
    text = str(QuantReport())
    assert "0 quantized, 0 kept float" in text
    assert QuantReport().to_dict()["layers"] == []


# ---- Markdown and charts ---------------------------------------------------------------------------------------
def _int4_report():
    cfg = mq.QuantConfig(mq.Int4(), skip=mq.SkipRules.defaults(skip_head=True))
    return mq.quantize_(Net().eval(), cfg, calibration_data=batches())


def test_to_markdown_is_a_table_of_every_layer():
    report = _int4_report()
    report.row("fc2").note = "a | b"  # a pipe in a cell must not split it
    text = report.to_markdown()
    lines = text.splitlines()
    assert lines[0] == ("| layer | type | scheme | kernel | weight SQNR dB | output SQNR dB | bytes before | "
                        "bytes after | skipped because / note |")
    assert lines[1] == "|---|---|---|---|---:|---:|---:|---:|---|"
    rows = [line for line in lines[2:] if line.startswith("|")]
    assert len(rows) == 4
    assert all(line.replace("\\|", "").count("|") == 10 for line in rows)
    cells = [[c.strip() for c in line.replace("\\|", "\x00").split("|")[1:-1]] for line in rows]
    assert [c[0] for c in cells] == ["`fc1`", "`fc2`", "`fc3`", "`head`"]
    for c, r in zip(cells, report.layers):
        assert c[1] == "Linear"
        assert c[6] == str(r.bytes_before)
    fc1 = report.row("fc1")
    assert cells[0][2:6] == [fc1.scheme, fc1.kernel, f"{fc1.weight_sqnr_db:.1f}", f"{fc1.output_sqnr_db:.1f}"]
    assert cells[0][7:] == [str(fc1.bytes_after), "rtn"]
    assert cells[1][8] == "rtn; a \x00 b"
    assert cells[3][2:] == ["float", "-", "-", "-", "10280", "10280", "output head (skip_head=True)"]
    assert text.endswith("\n")
    assert lines[-1] == f"model output vs float: SQNR {report.end_to_end['sqnr_db']:.1f} dB"
    assert lines[-2].startswith("3 quantized, 1 kept float; ")


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_writes_png_and_svg_sized_by_the_layer_count(tmp_path):
    pytest.importorskip("matplotlib")
    report = _int4_report()
    assert report.plot(tmp_path / "r.png", title="Net") == tmp_path / "r.png"
    from monoquant.plotting import ROW_INCHES

    # 10 inches wide at 100 dpi; 1.6 inches of title/axis plus one row per layer
    assert _png_size(tmp_path / "r.png") == (1000, round(100 * (1.6 + ROW_INCHES * 4)))
    report.plot(tmp_path / "r.svg")
    root = ElementTree.parse(tmp_path / "r.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.get("width") == "720pt"  # 10 inches


def test_plot_sensitivity_writes_one_row_per_layer(tmp_path):
    pytest.importorskip("matplotlib")
    rows = mq.sensitivity(Net().eval(), mq.Int4(), batches(2))
    assert [r.name for r in rows] and len(rows) == 4
    path = plot_sensitivity(rows, tmp_path / "s.png")
    from monoquant.plotting import ROW_INCHES

    assert _png_size(path) == (1000, round(100 * (1.6 + ROW_INCHES * 4)))
    with pytest.raises(mq.ConfigError, match="no rows"):
        plot_sensitivity([], tmp_path / "e.png")


def test_plot_refuses_unknown_extensions_and_names_the_extra_when_matplotlib_is_missing(tmp_path, monkeypatch):
    report = _int4_report()
    with pytest.raises(mq.ConfigError, match=r"\.png, \.svg, \.pdf"):
        report.plot(tmp_path / "r.jpg")
    assert not (tmp_path / "r.jpg").exists()
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install monoquant\[plot\]") as info:
        report.plot(tmp_path / "r.png")
    assert isinstance(info.value, ImportError) and isinstance(info.value.__cause__, ImportError)
    assert not (tmp_path / "r.png").exists()


def test_kernel_column_shows_the_static_guess_until_the_model_runs_then_what_ran(monkeypatch):
    import copy
    import gc
    import pickle

    from monoquant import kernels

    monkeypatch.setenv("MONOQUANT_TUNE", "0")

    kernels.reload_environment()
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    report = mq.quantize_(model, mq.QuantConfig(mq.Int8(), skip=mq.SkipRules.none()))
    cpu = torch.device("cpu")
    guesses = []
    for layer in (model[0], model[2]):
        small, large = (kernels.choose_linear_kernel(layer, cpu, rows, False) for rows in (1, 4096))
        guesses.append((small if small == large else f"{small}/{large}") + " (static guess, not run yet)")
    assert [r.kernel for r in report.quantized] == guesses
    with torch.no_grad():
        model(torch.randn(3, 64))
    ran = [f"r4 {kernels.choose_linear_kernel(layer, cpu, 4, False)}" for layer in (model[0], model[2])]
    assert [row["kernel"] for row in report.to_dict()["layers"]] == ran  # shown as it is now
    assert [r.kernel for r in report.quantized] == ran and f" {ran[0]} " in str(report)
    copied = pickle.loads(pickle.dumps(report))  # the text travels, the link to the layers does not
    assert [r.kernel for r in copy.deepcopy(copied).quantized] == ran
    del model, layer
    gc.collect()
    assert [r.kernel for r in report.quantized] == ran and f" {ran[0]} " in str(report)  # layers gone: last text


def test_the_reported_accuracy_of_w8a8_layers_is_the_w8a8_arithmetic_even_where_float_activations_time_faster(
        monkeypatch):
    """Small W8A8 layers whose INT8 kernels time slower run ``float_acts`` (dequantized weights on float inputs);
    the report's SQNR must still describe W8A8 (the static table), not that more accurate shortcut."""
    from _fake_timing import timing_by_name

    from monoquant import tuner
    tuner.clear()
    timing_by_name(monkeypatch, {"float_acts": 1.0}, [])  # every INT8 candidate "times" 10x slower
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    data = [torch.randn(32, 64) * 3 for _ in range(4)]
    float_model = copy.deepcopy(model)
    cfg = mq.QuantConfig(mq.Int8(), activations=mq.Int8(dynamic=True), skip=mq.SkipRules.none())
    try:
        report = mq.quantize_(model, cfg, calibration_data=data)
        with torch.no_grad():  # as it runs with tuning on: float activations
            as_run = mq.functional.sqnr(torch.cat([float_model(x) for x in data]), torch.cat([model(x) for x in data]))
        ran = {name for layer in model if isinstance(layer, mq.QuantLinear) for name in layer.quant_weight.ran.values()}
        assert ran == {"float_acts"}
        compared = mq.compare(float_model, model, data, progress=False)
        with mq.kernels.tuning(False), torch.no_grad():
            w8a8 = mq.functional.sqnr(torch.cat([float_model(x) for x in data]), torch.cat([model(x) for x in data]))
    finally:
        tuner.clear()
    assert report.end_to_end["sqnr_db"] == pytest.approx(w8a8, abs=1e-6)
    assert compared.sqnr_db == pytest.approx(w8a8, abs=1e-6)  # mq.compare agrees with the report
    assert as_run > w8a8 + 1.0  # the shortcut is measurably more accurate: what must not be reported
