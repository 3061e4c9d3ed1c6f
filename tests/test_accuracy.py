import copy
import json
import warnings

import pytest
import torch
from _accuracy_models import Net, batches
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import monoquant as mq
from monoquant import functional as F
from monoquant.quantize import NOT_MEASURED_NOTE


def _cfg(spec, **kw):
    return mq.QuantConfig(spec, skip=mq.SkipRules.defaults(skip_head=True, **kw))


def _layer_warnings(messages):
    return sorted(m.split("'")[1] for m in messages if m.startswith("layer "))


# ---- formulas -----------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 20), st.integers(2, 7), st.integers(0, 2**16))
def test_top1_agreement_is_fraction_of_equal_argmax(rows, classes, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rows, classes, generator=g), torch.randn(rows, classes, generator=g)
    expected = sum(int(a[i].argmax() == b[i].argmax()) for i in range(rows)) / rows
    assert F.top1_agreement(a, b) == expected
    assert F.top1_agreement(a, a) == 1.0
    assert F.top1_matches(a, b) == (round(expected * rows), rows)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16))
def test_sqnr_from_powers_pools_batches_like_one_concatenation(seed):
    g = torch.Generator().manual_seed(seed)
    refs = [torch.randn(5, 3, generator=g) for _ in range(3)]
    noisy = [r + 0.1 * torch.randn(5, 3, generator=g) for r in refs]
    sums = [F.signal_noise_powers(r, n) for r, n in zip(refs, noisy)]
    pooled = F.sqnr_from_powers(sum(s for s, _ in sums), sum(n for _, n in sums))
    assert pooled == pytest.approx(F.sqnr(torch.cat(refs), torch.cat(noisy)), abs=1e-9)


def test_sqnr_edge_cases():
    x = torch.randn(10)
    assert F.sqnr(x, x) == float("inf")
    assert F.sqnr(torch.zeros(3), torch.ones(3)) == float("-inf")
    assert F.sqnr(torch.ones(4), torch.ones(4) * 1.1) == pytest.approx(20.0)  # noise = 0.1 amplitude -> 20 dB
    with pytest.raises(mq.ConfigError):
        F.top1_agreement(torch.zeros(2, 3), torch.zeros(3, 3))


# ---- compare ------------------------------------------------------------------------------------------------
def test_compare_identical_models_is_exact():
    model = Net().eval()
    res = mq.compare(model, copy.deepcopy(model), batches(3))
    assert res.sqnr_db == float("inf") and res.top1_agreement == 1.0
    assert (res.batches, res.samples) == (3, 48)
    assert res["sqnr_db"] == float("inf") and json.loads(json.dumps(res.to_dict(), default=str))["batches"] == 3


def test_compare_matches_formulas_on_all_batches_and_honours_max_batches():
    model = Net().train()
    quant = copy.deepcopy(model)
    mq.quantize_(quant, _cfg(mq.Int4(group_size=32)), on_failure="ignore")
    data = batches(5)
    res = mq.compare(model, quant, data)
    model.eval()
    quant.eval()
    with torch.no_grad(), mq.kernels.tuning(False):  # compare measures the static table's arithmetic
        ref = torch.cat([model(x) for x in data])
        out = torch.cat([quant(x) for x in data])
    assert res.sqnr_db == pytest.approx(F.sqnr(ref, out), abs=1e-6)
    assert res.top1_agreement == F.top1_agreement(ref, out)
    assert mq.compare(model, quant, data, max_batches=2).samples == 32
    model.train()
    mq.compare(model, quant, data)
    assert model.training and model.fc1.training  # flags restored


def test_compare_outputs_dicts_tuples_and_non_classification():
    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, x, scale=1.0):
            y = self.lin(x) * scale
            return {"logits": y, "aux": (y.sum(-1, keepdim=True), torch.ones(1, dtype=torch.long))}

    a = DictNet()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.lin.bias += 0.01
    data = [{"x": torch.randn(6, 8), "scale": 2.0} for _ in range(2)]
    res = mq.compare(a, b, data)
    with torch.no_grad():
        ra, rb = [a(**d) for d in data], [b(**d) for d in data]
    sig = sum(F.signal_noise_powers(x["logits"], y["logits"])[0] + F.signal_noise_powers(x["aux"][0], y["aux"][0])[0]
              for x, y in zip(ra, rb))
    noise = sum(F.signal_noise_powers(x["logits"], y["logits"])[1] + F.signal_noise_powers(x["aux"][0], y["aux"][0])[1]
                for x, y in zip(ra, rb))
    assert res.sqnr_db == pytest.approx(F.sqnr_from_powers(sig, noise))
    assert res.top1_agreement == F.top1_agreement(torch.cat([x["logits"] for x in ra]),
                                                  torch.cat([y["logits"] for y in rb]))
    # a [batch, 1] regression output is not classification-like
    reg = nn.Linear(8, 1)
    assert mq.compare(reg, copy.deepcopy(reg), [torch.randn(4, 8)]).top1_agreement is None
    # tuples feed their first element; forward_fn decides otherwise
    assert mq.compare(reg, reg, [(torch.randn(4, 8), torch.zeros(4))]).samples == 4
    res = mq.compare(reg, reg, [torch.randn(4, 8)], forward_fn=lambda m, b: m(b[:2]))
    assert res.samples == 4 and res.batches == 1


def test_compare_rejects_mismatched_outputs_and_empty_data():
    with pytest.raises(mq.ModelError, match="forward_fn"):
        mq.compare(nn.Linear(8, 4), nn.Linear(8, 3), [torch.randn(2, 8)])
    with pytest.raises(mq.ConfigError):
        mq.compare(nn.Linear(8, 4), nn.Linear(8, 4), [])
    with pytest.raises(mq.ConfigError, match="iterable"):
        mq.compare(nn.Linear(8, 4), nn.Linear(8, 4), torch.randn(2, 8))


# ---- measurement inside quantize_ ----------------------------------------------------------------------------
def test_quantize_measures_layer_output_sqnr_on_real_inputs_and_end_to_end():
    model = Net().eval()
    ref = copy.deepcopy(model)
    data = batches(10)
    report = mq.quantize_(model, _cfg(mq.Int4(group_size=128)), calibration_data=data)
    assert [r.name for r in report.quantized] == ["fc1", "fc2", "fc3"]
    used = data[: mq.accuracy.MEASURE_BATCHES]
    # per batch, as quantize_ ran them: on the static kernel table (the kernel, and so the rounding, depends on the
    # batch size)
    p1, p2, pe = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    with torch.no_grad(), mq.kernels.tuning(False):
        for x in used:
            h1 = torch.relu(model.fc1(x))
            for acc, (s, n) in ((p1, F.signal_noise_powers(ref.fc1(x), model.fc1(x))),
                                # float fc2 on the inputs the *quantized* model fed it
                                (p2, F.signal_noise_powers(ref.fc2(h1), model.fc2(h1))),
                                (pe, F.signal_noise_powers(ref(x), model(x)))):
                acc[0] += s
                acc[1] += n
    expected_fc1, expected_fc2, e2e = (F.sqnr_from_powers(*p) for p in (p1, p2, pe))
    assert report.row("fc1").output_sqnr_db == pytest.approx(expected_fc1, abs=1e-3)
    assert report.row("fc2").output_sqnr_db == pytest.approx(expected_fc2, abs=1e-3)
    assert report.row("head").output_sqnr_db is None
    assert report.end_to_end["sqnr_db"] == pytest.approx(e2e, abs=1e-3)
    assert report.end_to_end["batches"] == mq.accuracy.MEASURE_BATCHES and report.end_to_end["samples"] == 128
    assert report.calibration_samples == 160
    assert report.end_to_end["top1_agreement"] == mq.compare(ref, model, data, max_batches=8).top1_agreement


def test_no_measurement_without_data_and_float_layers_are_released():
    model = Net().eval()
    report = mq.quantize_(model, _cfg(mq.Int8()))
    assert report.end_to_end == {} and all(r.output_sqnr_db is None for r in report.layers)
    # a one-shot generator is read once and still measured
    gen_report = mq.quantize_(Net().eval(), _cfg(mq.Int8()), calibration_data=(b for b in batches(3)))
    assert gen_report.end_to_end["batches"] == 3 and gen_report.calibration_samples == 48


@pytest.mark.parametrize("spec", [mq.Int8(), mq.Int4(group_size=128)], ids=["int8", "int4-g128"])
def test_well_behaved_model_raises_nothing(spec):
    with warnings.catch_warnings():
        warnings.simplefilter("error", mq.AccuracyWarning)
        report = mq.quantize_(Net().eval(), _cfg(spec), calibration_data=batches())
    assert report.warnings == []
    assert all(r.output_sqnr_db > 20 for r in report.quantized)


@pytest.mark.parametrize("spec", [mq.Int8(), mq.Int4(group_size=128)], ids=["int8", "int4-g128"])
def test_fragile_layer_and_only_it_is_flagged(spec):
    with pytest.warns(mq.AccuracyWarning) as record:
        report = mq.quantize_(Net(fragile=True).eval(), _cfg(spec), calibration_data=batches())
    messages = [str(w.message) for w in record if issubclass(w.category, mq.AccuracyWarning)]
    assert _layer_warnings(messages) == ["fc2"]
    assert "output SQNR" in next(m for m in messages if m.startswith("layer 'fc2'"))
    assert any(m.startswith("model output SQNR") for m in messages)
    assert messages == report.warnings
    # the weight SQNR alone would not have caught it: the outliers carry the weight's energy
    assert report.row("fc2").weight_sqnr_db > mq.Thresholds().weight_sqnr_db[spec.kind]
    assert report.row("fc2").output_sqnr_db < 5 < 20 < report.row("fc3").output_sqnr_db
    assert record[0].filename == __file__  # points at the caller


def test_on_failure_raise_attaches_report_and_ignore_stays_silent():
    model = Net(fragile=True).eval()
    with pytest.raises(mq.AccuracyError, match="fc2") as err:
        mq.quantize_(model, _cfg(mq.Int4()), calibration_data=batches(), on_failure="raise")
    assert isinstance(err.value.report, mq.QuantReport)
    assert _layer_warnings(err.value.report.warnings) == ["fc2"]
    assert isinstance(model.fc2, mq.QuantLinear)  # the model stays quantized; the report says how badly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = mq.quantize_(Net(fragile=True).eval(), _cfg(mq.Int4()), calibration_data=batches(),
                              on_failure="ignore")
    assert _layer_warnings(report.warnings) == ["fc2"]
    with pytest.raises(mq.ConfigError, match="on_failure"):
        mq.quantize_(Net(), mq.Int8(), on_failure="explode")


def test_too_few_calibration_samples_warns():
    with pytest.warns(mq.AccuracyWarning, match="only 4 samples"):
        mq.quantize_(Net().eval(), _cfg(mq.Int8()), calibration_data=[torch.randn(4, 64)])


def test_first_and_last_int4_rule_is_opt_in():
    with pytest.warns(mq.AccuracyWarning, match=r"first \('fc1'\) and last \('head'\)"):
        mq.quantize_(Net(), mq.QuantConfig(mq.Int4(group_size=64), skip=mq.SkipRules.none()),
                     thresholds={"int4_first_and_last": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error", mq.AccuracyWarning)
        report = mq.quantize_(Net(), mq.QuantConfig(mq.Int4(group_size=64), skip=mq.SkipRules.none()))
        mq.quantize_(Net(), mq.QuantConfig(mq.Int8(), skip=mq.SkipRules.none()))
    assert report.warnings == [] and report.notes == [NOT_MEASURED_NOTE]
    assert f"NOTE: {NOT_MEASURED_NOTE}" in str(report)


@pytest.mark.parametrize("spec", [mq.Int8(), mq.Int4(group_size=128)], ids=str)
@pytest.mark.parametrize("skip", [mq.SkipRules.none(), None], ids=["all layers", "default rules"])
def test_healthy_models_raise_no_accuracy_warning_with_data(spec, skip):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mq.AccuracyWarning)
        report = mq.quantize_(Net().eval(), mq.QuantConfig(spec, skip=skip), calibration_data=batches(8))
    assert report.warnings == [] and report.notes == [] and report.end_to_end["sqnr_db"] > 15


@pytest.mark.parametrize("spec", [mq.Int8(), mq.Int4(group_size=128)], ids=str)
def test_the_damaged_layer_still_warns_by_name(spec):
    torch.manual_seed(0)
    with pytest.warns(mq.AccuracyWarning, match="layer 'fc2'"):
        report = mq.quantize_(Net(fragile=True).eval(), mq.QuantConfig(spec, skip=mq.SkipRules.none()),
                              calibration_data=batches(8))
    assert _layer_warnings(report.warnings) == ["fc2"]


def test_threshold_overrides():
    t = mq.Thresholds.coerce({"weight_sqnr_db": {"int4": 30.0}, "top1_agreement": None})
    assert t.weight_sqnr_db["int4"] == 30.0 and t.weight_sqnr_db["int8"] == mq.Thresholds().weight_sqnr_db["int8"]
    assert t.top1_agreement is None
    assert set(mq.Thresholds.coerce({"output_sqnr_db": 5}).output_sqnr_db.values()) == {5.0}
    assert set(mq.Thresholds.coerce({"output_sqnr_db": None}).output_sqnr_db.values()) == {None}
    assert mq.Thresholds(output_sqnr_db={"int4": 15.0}).output_sqnr_db["int8"] == 25.0
    with pytest.raises(mq.ConfigError, match="dict of dB floors"):
        mq.Thresholds(weight_sqnr_db="high")
    with pytest.raises(mq.ConfigError, match="unknown threshold"):
        mq.Thresholds.coerce({"weight_snr": 3})
    with pytest.warns(mq.AccuracyWarning) as record:
        report = mq.quantize_(Net(), _cfg(mq.Int4()), thresholds={"weight_sqnr_db": {"int4": 30.0}})
    assert _layer_warnings([str(w.message) for w in record]) == ["fc1", "fc2", "fc3"]
    assert all("weight SQNR" in w for w in report.warnings)


def test_target_without_data_is_an_error():
    with pytest.raises(mq.ConfigError, match="calibration_data"):
        mq.quantize_(Net(), mq.Int4(), target_sqnr=20)


def test_loaders_keyword_batches_and_convs():
    loader = DataLoader(TensorDataset(torch.randn(40, 64)), batch_size=8)
    report = mq.quantize_(Net().eval(), _cfg(mq.Int8()), calibration_data=loader, max_batches=5)
    assert report.calibration_samples == 40 and report.end_to_end["batches"] == 5
    assert report.end_to_end["samples"] == 40
    shuffled = DataLoader(TensorDataset(torch.randn(64, 64)), batch_size=8, shuffle=True)
    report = mq.quantize_(Net().eval(), _cfg(mq.Int8()), calibration_data=shuffled)
    assert report.end_to_end["sqnr_db"] > 35  # float and quantized passes saw the same (stored) batches
    assert mq.accuracy.batch_size({"input_ids": torch.zeros(5, 7, dtype=torch.long), "mask": None}) == 5
    assert mq.accuracy.batch_size([torch.tensor(3.0)]) == 1
    cnn = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.Flatten(), nn.LazyLinear(10))
    cnn(torch.randn(1, 3, 12, 12))
    report = mq.quantize_(cnn.eval(), mq.QuantConfig(mq.Int8(), skip=mq.SkipRules.none()),
                          calibration_data=[torch.randn(16, 3, 12, 12) for _ in range(2)])
    assert [r.module_type for r in report.quantized] == ["Conv2d", "Conv2d", "Linear"]
    assert all(30 < r.output_sqnr_db < 80 for r in report.quantized)
    assert report.warnings == []


def test_check_end_to_end_uses_the_lowest_precision_floor_and_on_failure():
    report = mq.QuantReport([mq.LayerReport("a", "Linear", "int8-sym-channel"),
                             mq.LayerReport("b", "Linear", "int4-affine-g128")],
                            end_to_end={"sqnr_db": 15.0, "top1_agreement": 0.99})
    mq.accuracy.check_end_to_end(report)  # INT4 floor (8 dB) applies: nothing to say
    assert report.warnings == []
    with pytest.warns(mq.AccuracyWarning, match="model output SQNR 15.0 dB is below 20 dB"):
        mq.accuracy.check_end_to_end(report, {"end_to_end_sqnr_db": 20.0})
    with pytest.raises(mq.AccuracyError, match="top-1 agreement") as err:
        mq.accuracy.check_end_to_end(report, {"top1_agreement": 0.999}, on_failure="raise")
    assert err.value.report is report
