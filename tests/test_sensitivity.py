import copy

import pytest
import torch
from _accuracy_models import Net, batches

import monoquant as mq
from monoquant import functional as F


def _cfg(spec=None, **kw):
    return mq.QuantConfig(spec or mq.Int4(group_size=128), skip=mq.SkipRules.defaults(skip_head=True, **kw))


def test_sensitivity_ranks_fragile_layer_first_and_leaves_model_untouched():
    model = Net(fragile=True).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    data = batches()
    results = mq.sensitivity(model, _cfg(), data, progress=False)
    assert results[0].name == "fc2"
    assert sorted(r.name for r in results) == ["fc1", "fc2", "fc3"]  # head kept float by the rules
    assert [r.sqnr_db for r in results] == sorted(r.sqnr_db for r in results)
    assert results[0].sqnr_db < 10 < 20 < results[1].sqnr_db
    assert dict(model.named_modules()) == modules
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # each figure is the end-to-end SQNR with that layer alone quantized
    one = copy.deepcopy(model)
    mq.quantize_(one, _cfg(exclude=["fc1", "fc3"]), on_failure="ignore")
    assert results[0].sqnr_db == pytest.approx(mq.compare(model, one, data).sqnr_db, abs=1e-9)
    assert results[0].scheme == "int4-affine-g128" and results[0].top1_agreement is not None


def test_skip_rules_from_sensitivity():
    model = Net(fragile=True).eval()
    results = mq.sensitivity(model, _cfg(), batches(), progress=False)
    rules = mq.SkipRules.from_sensitivity(results, top=1, base=mq.SkipRules.defaults(skip_head=True))
    report = mq.quantize_(model, mq.QuantConfig(mq.Int4(), skip=rules), calibration_data=batches())
    assert report.skipped == {"fc2": "excluded by name pattern 'fc2'", "head": "output head (skip_head=True)"}
    assert report.warnings == []
    assert mq.SkipRules.from_sensitivity(results, min_sqnr_db=100.0).exclude == ["fc2", "fc3", "fc1"]
    with pytest.raises(mq.ConfigError):
        mq.SkipRules.from_sensitivity(results)


def test_target_mode_keeps_fragile_layer_float():
    model = Net(fragile=True).eval()
    ref = copy.deepcopy(model)
    data = batches()
    report = mq.quantize_(model, _cfg(), calibration_data=data, target_sqnr=15.0)
    assert report.end_to_end["sqnr_db"] >= 15.0 and report.end_to_end["target_sqnr_db"] == 15.0
    assert report.row("fc2").skipped and report.row("fc2").reason.startswith("kept float to meet target_sqnr=15 dB")
    assert isinstance(model.fc2, torch.nn.Linear) and model.fc2 is not ref.fc2
    assert torch.equal(model.fc2.weight, ref.fc2.weight)  # the original float layer, untouched
    assert [r.scheme for r in report.quantized] == ["int4-affine-g64", "int4-affine-g128"]
    assert report.warnings == []
    assert report.end_to_end["sqnr_db"] == pytest.approx(mq.compare(ref, model, data).sqnr_db, abs=1e-9)
    assert "kept float to meet target_sqnr=15 dB" in str(report)


def test_target_mode_uses_int8_when_it_suffices():
    model = Net().eval()
    ref = copy.deepcopy(model)
    data = batches()
    report = mq.quantize_(model, _cfg(), calibration_data=data, target_sqnr=30.0)
    kept = [r for r in report.quantized if r.note.startswith("kept at int8")]
    assert kept and all(r.scheme == "int8-sym-channel" for r in kept)
    assert all(isinstance(getattr(model, r.name), mq.QuantLinear) for r in kept)
    assert report.end_to_end["sqnr_db"] >= 30.0
    assert report.end_to_end["sqnr_db"] == pytest.approx(mq.compare(ref, model, data).sqnr_db, abs=1e-9)
    for r in kept:  # rows are re-measured for the layer as it ends up
        assert r.weight_sqnr_db == pytest.approx(F.sqnr(getattr(ref, r.name).weight,
                                                        getattr(model, r.name).dequantize_weight(torch.float32)))
        assert r.bytes_after == getattr(model, r.name).storage_bytes()


def test_target_already_met_changes_nothing():
    report = mq.quantize_(Net().eval(), _cfg(), calibration_data=batches(), target_sqnr=5.0)
    assert [r.scheme for r in report.quantized] == ["int4-affine-g64", "int4-affine-g128", "int4-affine-g128"]
    assert all(r.note == "" for r in report.layers)


def test_sensitivity_with_gptq_measures_the_quantized_layer_not_the_pending_float_one():
    model = Net(fragile=False).eval()
    data = batches()
    results = mq.sensitivity(model, _cfg(mq.Int4(group_size=32, method="gptq")), data, progress=False)
    assert sorted(r.name for r in results) == ["fc1", "fc2", "fc3"]
    # a pending GPTQ layer computes with its float weight (infinite SQNR); a frozen one cannot reach 60 dB at INT4
    assert all(r.sqnr_db < 60 for r in results)
    assert all(isinstance(m, torch.nn.Linear) for m in (model.fc1, model.fc2, model.fc3))


def test_target_mode_promotes_along_the_order_the_format_declares(monkeypatch):
    """INT4 declares INT8 as its promotion; a format that declares another one gets that instead (here float16)."""
    assert mq.Int4().promotion() == mq.Int8() and mq.NF4().promotion() == mq.Int8() and mq.Int8().promotion() is None
    monkeypatch.setattr(mq.Int4, "promotion", lambda self: mq.Float16())
    model = Net().eval()
    data = batches()
    report = mq.quantize_(model, _cfg(), calibration_data=data, target_sqnr=30.0)
    kept = [r for r in report.quantized if r.note.startswith("kept at float16")]
    assert kept and all(r.scheme == "float16" for r in kept)
    assert not any(r.note.startswith("kept at int8") for r in report.quantized)
    assert report.end_to_end["sqnr_db"] >= 30.0
