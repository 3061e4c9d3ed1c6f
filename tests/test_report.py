import json

import torch
from _accuracy_models import Net, batches
from torch import nn

import monoquant as mq
from monoquant.report import LayerReport, QuantReport


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
