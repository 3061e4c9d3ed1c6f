"""Storage apart from method: a format holds what its bytes mean, a MethodConfig how they were made; a file header
stores the two apart (``spec`` and ``method``), and the public spelling builds both."""

import dataclasses
import json

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

import monoquant as mq
from monoquant.errors import ConfigError, SerializationError
from monoquant.formats.method import METHODS, MethodConfig
from monoquant.serialization import entry_spec


def test_the_public_spelling_builds_the_format_and_the_method():
    spec = mq.Int4(group_size=128, method="gptq", act_order=True, damping=0.05)
    assert spec.storage() == mq.Int4(group_size=128)
    assert spec.method_config == MethodConfig("gptq", act_order=True, damping=0.05)
    assert spec.storage().with_method(spec.method_config) == spec
    assert spec.storage_dict() == {"kind": "int4", "group_size": 128, "symmetric": False}
    assert mq.Int8(method="mse").method_config == MethodConfig("mse") and mq.NF4().method_config is None
    assert mq.Int8.method_fields() == ("method", "act_order", "damping", "refit_scales", "sequential")
    with pytest.raises(ConfigError, match="static_groups"):
        mq.Int8().with_method(MethodConfig("gptq", static_groups=False))


options = st.fixed_dictionaries({}, optional={
    "act_order": st.none() | st.booleans(), "damping": st.floats(0.001, 1.0),
    "static_groups": st.none() | st.booleans(), "refit_scales": st.none() | st.booleans(),
    "sequential": st.none() | st.booleans()})


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(METHODS), opts=options, group=st.sampled_from([32, 64, 128]), sym=st.booleans())
def test_method_and_storage_round_trip_through_their_header_forms(name, opts, group, sym):
    try:
        method = MethodConfig(name, **opts)
        spec = mq.Int4(group_size=group, symmetric=sym).with_method(method)
    except ConfigError:
        assume(False)
    entry = {"spec": json.loads(json.dumps(spec.storage_dict())), "method": json.loads(json.dumps(method.to_dict()))}
    assert entry_spec(entry, "test") == spec
    assert MethodConfig.from_dict(method.to_dict()) == method


@pytest.mark.parametrize("bad, message", [
    ({"method": "gptq", "act_order": "yes"}, "wrong type"),
    ({"method": "gptq", "blocksize": 128}, "unknown method option"),
    ({"method": "rtn", "act_order": True}, "act_order=True only applies"),
    ({"act_order": True}, "string 'method'"),
])
def test_a_bad_method_entry_is_refused_naming_it(bad, message):
    with pytest.raises(SerializationError, match=message):
        entry_spec({"spec": {"kind": "int4", "group_size": 32}, "method": bad}, "layer 'x'")


def test_a_gptq_file_keeps_storage_and_provenance_apart_and_loads_the_same_spec(tmp_path):
    torch.manual_seed(0)
    spec = mq.Int4(group_size=32, method="gptq", act_order=True, sequential=True)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    mq.quantize_(model, mq.QuantConfig(spec, skip=mq.SkipRules.none()),
                 calibration_data=[torch.randn(32, 64) for _ in range(2)])
    mq.save(model, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        entry = json.loads(f.metadata()["modules"])["0"]
    assert entry["spec"] == {"kind": "int4", "group_size": 32, "symmetric": False}
    assert entry["method"] == {"method": "gptq", "act_order": True, "sequential": True}
    loaded = mq.load(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)), tmp_path / "m.safetensors")
    assert loaded[0].spec == spec and loaded[0].spec.method_config.name == "gptq"
    assert torch.equal(loaded[0].qweight, model[0].qweight)


def test_the_format_dataclasses_hold_storage_fields_and_one_method_config():
    assert [f.name for f in dataclasses.fields(mq.Int4)] == ["group_size", "symmetric", "method_config"]
    assert [f.name for f in dataclasses.fields(mq.Int8)] == ["symmetric", "granularity", "dynamic", "method_config"]
    assert mq.Int4.method_option_names == ("observer", "method", "act_order", "damping", "static_groups",
                                           "refit_scales", "sequential", "output_aware")
    observer = mq.MinMaxObserver()
    spec = mq.Int8(observer=observer, method="gptq", damping=0.05)
    assert spec.method_config == MethodConfig("gptq", damping=0.05) and spec.method_config.observer is observer
    assert (spec.method, spec.damping, spec.act_order, spec.observer) == ("gptq", 0.05, None, observer)
    assert spec == mq.Int8(method="gptq", damping=0.05)  # the observer is a prototype: not compared
    assert repr(spec) == "Int8(symmetric=None, granularity='channel', dynamic=False, observer=MinMaxObserver(), " \
                         "method='gptq', damping=0.05)"
    with pytest.raises(ValueError, match="method_config"):  # with_method is the way to set a whole MethodConfig
        dataclasses.replace(spec, method_config=MethodConfig())


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(METHODS), opts=options, group=st.sampled_from([32, 64, 128]), sym=st.booleans(),
       change=st.sampled_from([{"method": "gptq"}, {"act_order": False}, {"damping": 0.2}, {"sequential": True},
                               {"group_size": 64}, {"symmetric": True}]))
def test_the_public_spelling_replace_repr_and_hash_agree_with_the_method_config(name, opts, group, sym, change):
    try:
        spec = mq.Int4(group_size=group, symmetric=sym, method=name, **opts)
    except ConfigError:
        assume(False)
    assert spec == mq.Int4(group_size=group, symmetric=sym).with_method(MethodConfig(name, **opts))
    assert eval(repr(spec), {"Int4": mq.Int4}) == spec and {spec: 1}[type(spec).from_dict(spec.to_dict())] == 1
    try:  # a copy with one option changed keeps every other one, as the constructor would build it
        want = mq.Int4(**{k: v for k, v in {**spec.to_dict(), **change}.items() if k != "kind"})
    except ConfigError:
        with pytest.raises(ConfigError):
            dataclasses.replace(spec, **change)
        return
    assert dataclasses.replace(spec, **change) == want and repr(dataclasses.replace(spec, **change)) == repr(want)
