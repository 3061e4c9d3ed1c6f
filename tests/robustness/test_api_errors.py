"""mq.load / mq.save / constructors: every failure a MonoQuantError naming the culprit, the model untouched."""

from __future__ import annotations

import json
import re

import pytest
import torch
from _robust import Small, Snapshot, assert_no_leftovers, cli, files_in, quantized_small, rewrite_metadata

import monoquant as mq


@pytest.fixture
def saved(tmp_path):
    """An INT4 (affine, g32) file of Small, and the quantized model it was saved from."""
    model = quantized_small(mq.Int4(group_size=32))
    path = tmp_path / "m.safetensors"
    mq.save(model, path)
    return path, model


def _set_entry(layer: str, field: str, value):
    def mutate(meta):
        modules = json.loads(meta["modules"])
        modules[layer][field] = value
        meta["modules"] = json.dumps(modules)
    return mutate


def _set_meta(key: str, value: str):
    def mutate(meta):
        meta[key] = value
    return mutate


def _drop_meta(key: str):
    return lambda meta: meta.pop(key)


# (how the header is broken, what the message must say besides the file's path)
BAD_HEADERS = {
    "modules not JSON": (_set_meta("modules", "{oops"), "corrupt monoquant header"),
    "modules a list": (_set_meta("modules", "[]"), "modules/aliases are not maps"),
    "modules a number": (_set_meta("modules", "5"), "modules/aliases are not maps"),
    "aliases a list": (_set_meta("aliases", '["fc1.bias"]'), "modules/aliases are not maps"),
    "alias target a number": (_set_meta("aliases", '{"x": 5}'), "alias 'x' points to missing tensor 5"),
    "alias target missing": (_set_meta("aliases", '{"x": "nope"}'), "alias 'x' points to missing tensor 'nope'"),
    "alias shadows a tensor": (_set_meta("aliases", '{"fc1.bias": "fc2.qweight"}'), "alias 'fc1.bias' is also"),
    "format missing": (_drop_meta("format"), "not a monoquant file"),
    "format_version text": (_set_meta("format_version", "one"), "format version 'one'"),
    "format_version future": (_set_meta("format_version", "99"), "format version '99'"),
    "entry a list": (_set_entry("fc1", "class", None), "layer 'fc1'"),
    "class a number": (_set_entry("fc1", "class", 7), "'class' must be a string, got 7"),
    "layout a list": (_set_entry("fc2", "layout", []), "'layout' must be a string"),
    "scheme a number": (_set_entry("fc2", "scheme", 1), "'scheme' must be a string"),
    "spec a string": (_set_entry("fc1", "spec", "int4"), "'spec' must be an object with a string 'kind'"),
    "spec without kind": (_set_entry("fc1", "spec", {"group_size": 32}), "'spec' must be an object"),
    "spec kind a number": (_set_entry("fc1", "spec", {"kind": 4}), "'spec' must be an object"),
    "spec kind unknown": (_set_entry("fc1", "spec", {"kind": "int3"}), "unknown weight spec kind 'int3'"),
    "spec field bad": (_set_entry("fc1", "spec", {"kind": "int4", "group_size": "x"}), "invalid int4 spec"),
    "group_size negative": (_set_entry("fc1", "group_size", -1), "'group_size' must be null or a positive"),
    "group_size zero": (_set_entry("fc1", "group_size", 0), "'group_size' must be null or a positive"),
    "group_size text": (_set_entry("fc1", "group_size", "32"), "'group_size' must be null or a positive"),
    "group_size float": (_set_entry("fc1", "group_size", 32.0), "'group_size' must be null or a positive"),
    "group_size bool": (_set_entry("fc1", "group_size", True), "'group_size' must be null or a positive"),
    "weight_shape text": (_set_entry("fc2", "weight_shape", "32x64"), "'weight_shape' must be a list"),
    "weight_shape 1-D": (_set_entry("fc2", "weight_shape", [2048]), "'weight_shape' must be a list"),
    "weight_shape negative": (_set_entry("fc2", "weight_shape", [-32, 64]), "'weight_shape' must be a list"),
    "weight_shape floats": (_set_entry("fc2", "weight_shape", [32.0, 64]), "'weight_shape' must be a list"),
    "weight_shape wrong": (_set_entry("fc2", "weight_shape", [64, 64]), "weight shape [64, 64] in the file"),
    "bias text": (_set_entry("fc1", "bias", "yes"), "'bias' must be true or false"),
    "bias a number": (_set_entry("fc1", "bias", 1), "'bias' must be true or false"),
    "float_dtype integer": (_set_entry("fc1", "float_dtype", "int32"), "'float_dtype' must be the name of a"),
    "float_dtype unknown": (_set_entry("fc1", "float_dtype", "float33"), "'float_dtype' must be the name of a"),
    "float_dtype a number": (_set_entry("fc1", "float_dtype", 32), "'float_dtype' must be the name of a"),
    "float_dtype dunder": (_set_entry("fc1", "float_dtype", "__class__"), "'float_dtype' must be the name of a"),
    "compute_dtype integer": (_set_entry("fc1", "compute_dtype", "int8"), "'compute_dtype' must be null or the"),
    "compute_dtype not a dtype": (_set_entry("fc1", "compute_dtype", "nn"), "'compute_dtype' must be null or the"),
    "geometry a list": (_set_entry("fc1", "geometry", [64, 64]), "'geometry' must be null or an object"),
    "geometry wrong": (_set_entry("fc1", "geometry", {"in_features": 32, "out_features": 64}), "another archit"),
    "activations a number": (_set_entry("fc1", "activations", 8), "'activations' must be null or an object"),
    "activations kind unknown": (_set_entry("fc1", "activations", {"kind": "x"}), "unknown weight spec kind"),
}


BUILD_CASES = {"weight_shape wrong": "layer 'fc2'", "geometry wrong": "layer 'fc1'"}


def _break(path, case):
    mutate = BAD_HEADERS[case][0]
    if case == "entry a list":
        def mutate(meta):
            modules = json.loads(meta["modules"])
            modules["fc1"] = [1, 2]
            meta["modules"] = json.dumps(modules)
    rewrite_metadata(path, mutate)


@pytest.mark.parametrize("case", list(BAD_HEADERS))
@pytest.mark.parametrize("target", ["float", "meta", "quantized twin"])
def test_load_of_a_corrupt_header_raises_naming_file_and_field_and_changes_nothing(saved, case, target):
    path, _ = saved
    _break(path, case)
    if target == "meta":
        with torch.device("meta"):
            model = Small()
    else:
        model = Small() if target == "float" else quantized_small(mq.Int4(group_size=32))
    snap = Snapshot.of(model) if target != "meta" else None
    with pytest.raises(mq.SerializationError) as info:
        mq.load(model, path)
    message = str(info.value)
    # the layer-vs-model comparisons (in serialization._build) name the layer; everything else the file too
    assert BUILD_CASES.get(case, str(path)) in message and BAD_HEADERS[case][1] in message, message
    if snap is not None:
        snap.assert_same(model)
    else:
        assert all(t.device.type == "meta" for t in model.state_dict().values())
        assert all(type(m) is not mq.QuantLinear for m in model.modules())


@pytest.mark.parametrize("case", [c for c in BAD_HEADERS if c not in BUILD_CASES])
def test_inspect_of_a_corrupt_header_is_one_line(saved, capsys, case):
    path, _ = saved
    _break(path, case)
    code, err = cli(capsys, "inspect", path)
    assert code == 1 and str(path) in err and BAD_HEADERS[case][1] in err


# ---- state dicts given to mq.load -------------------------------------------------------------------------------
def _with(state, key, value):
    return {**state, key: value}


STATE_DICT_CASES = {
    "meta qweight": (lambda s: _with(s, "fc1.qweight", s["fc1.qweight"].to("meta")), "'fc1.qweight' is on the meta"),
    "meta bias": (lambda s: _with(s, "fc1.bias", s["fc1.bias"].to("meta")), "'fc1.bias' is on the meta"),
    "sparse scale": (lambda s: _with(s, "fc2.scale", s["fc2.scale"].to_sparse()), "'fc2.scale' is a torch.sparse"),
    "sparse norm": (lambda s: _with(s, "norm.weight", s["norm.weight"].to_sparse()), "'norm.weight' is a torch.sp"),
    "a list": (lambda s: _with(s, "fc1.bias", [0.0] * 64), "'fc1.bias' is a list, not a tensor"),
    "a number": (lambda s: _with(s, "fc2.scale", 1.0), "'fc2.scale' is a float, not a tensor"),
    "a non-string key": (lambda s: {**s, 3: torch.zeros(1)}, "key 3 is a int, not a string"),
}


@pytest.mark.parametrize("case", list(STATE_DICT_CASES))
def test_load_of_a_bad_state_dict_raises_and_changes_nothing(case):
    state = quantized_small().state_dict()
    broken = STATE_DICT_CASES[case][0](state)
    model = Small()
    snap = Snapshot.of(model)
    with pytest.raises(mq.SerializationError, match=re.escape(STATE_DICT_CASES[case][1])):
        mq.load(model, broken)
    snap.assert_same(model)


@pytest.mark.parametrize("rows", [1, 5, 12, 13, 40])
@pytest.mark.parametrize("which", ["fc1.qweight", "fc1.scale", "fc2.qweight", "fc1.bias", "norm.weight"])
def test_load_of_a_state_dict_with_strided_views_is_exact(which, rows):
    source = quantized_small()
    state = dict(source.state_dict())
    t = state[which]
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype) if t.dim() else t.reshape(1)
    if t.dim():
        wide[..., ::2] = t
        state[which] = wide[..., ::2]  # same values, every other element of a bigger storage
    assert not state[which].is_contiguous() or not t.dim()
    model = mq.load(Small(), state)
    assert all(v.is_contiguous() for v in model.state_dict().values())
    x = torch.randn(rows, 64)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


# ---- mq.save --------------------------------------------------------------------------------------------------
def test_save_of_a_sparse_buffer_names_it_and_writes_nothing(tmp_path):
    model = quantized_small()
    model.register_buffer("mask", torch.eye(4).to_sparse())
    before = files_in(tmp_path)
    with pytest.raises(mq.SerializationError, match=r"tensor 'mask' is torch\.sparse_coo"):
        mq.save(model, tmp_path / "m.safetensors")
    assert_no_leftovers(before, tmp_path)


def test_save_of_a_directory_path(tmp_path):
    (tmp_path / "m.safetensors").mkdir()
    with pytest.raises(mq.SerializationError, match="it is a directory") as info:
        mq.save(quantized_small(), tmp_path / "m.safetensors")
    assert str(tmp_path / "m.safetensors") in str(info.value)


# ---- constructors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [-1, 0, -128, 1.5, "32", True])
@pytest.mark.parametrize("spec", [mq.Int4(), mq.Int8()], ids=["int4", "int8"])
@pytest.mark.parametrize("cls", ["QuantLinear", "QuantConv2d"])
def test_quant_layer_with_a_bad_group_size_raises_config_error(group_size, spec, cls):
    with pytest.raises(mq.ConfigError, match=f"{cls}: group_size must be a positive integer or None, got "
                                             f"{re.escape(repr(group_size))}"):
        if cls == "QuantLinear":
            mq.QuantLinear(64, 8, spec=spec, group_size=group_size)
        else:
            mq.QuantConv2d(8, 8, 3, spec=spec, group_size=group_size)


def test_weight_spec_base_class_cannot_be_instantiated():
    with pytest.raises(mq.ConfigError, match=r"WeightSpec is the abstract base.*use mq.Int8\(\)"):
        mq.WeightSpec()
    assert mq.Int4(group_size=32).kind == "int4"  # subclasses unaffected


@pytest.mark.parametrize(("dynamic", "match"), [
    (False, r"layer 'fc2' has static activation quantization but its qparams were never frozen"),
    (None, r"layer 'fc2': header field 'activations': invalid int8 spec: field 'dynamic' must be a bool, got None"),
    (0, r"layer 'fc2': header field 'activations': invalid int8 spec: field 'dynamic' must be a bool, got 0"),
])
def test_a_header_calling_dynamic_activations_static_is_refused(tmp_path, dynamic, match):
    """Found by the header fuzz: such a file loaded, then every forward raised CalibrationError."""
    model = Small().eval()
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), activations=mq.Int8(dynamic=True), skip=mq.SkipRules.none()))
    path = tmp_path / "m.safetensors"
    mq.save(model, path)

    def mutate(meta):
        modules = json.loads(meta["modules"])
        modules["fc2"]["activations"]["dynamic"] = dynamic
        meta["modules"] = json.dumps(modules)

    rewrite_metadata(path, mutate)
    target = Small()
    snap = Snapshot.of(target)
    with pytest.raises(mq.SerializationError, match=match):
        mq.load(target, path)
    snap.assert_same(target)


LOAD_PATHS = {
    "a directory": (lambda p: p.mkdir(), "is a directory, not a file"),
    "missing": (lambda p: None, "no such file"),
    "empty": (lambda p: p.write_bytes(b""), "not a readable safetensors file"),
    "truncated": (lambda p: (mq.save(quantized_small(), p), p.write_bytes(p.read_bytes()[:-100])),
                  "not a readable safetensors file"),
    "a torch file": (lambda p: torch.save(quantized_small().state_dict(), p), "not a readable safetensors file"),
}


@pytest.mark.parametrize("case", list(LOAD_PATHS))
def test_load_and_inspect_of_an_unusable_path(tmp_path, capsys, case):
    path = tmp_path / "m.safetensors"
    LOAD_PATHS[case][0](path)
    model = Small()
    snap = Snapshot.of(model)
    with pytest.raises(mq.SerializationError, match=re.escape(LOAD_PATHS[case][1])) as info:
        mq.load(model, path)
    assert str(path) in str(info.value)
    snap.assert_same(model)
    code, err = cli(capsys, "inspect", path)
    assert code == 1 and str(path) in err and LOAD_PATHS[case][1] in err


@pytest.mark.parametrize(("alias", "target"), [("again.bias", "norm.weight"), ("again.weight", "norm.bias"),
                                               ("fc1.bias", "norm.bias")])
@pytest.mark.parametrize("meta", [False, True])
def test_an_alias_retargeted_to_another_tensor_of_the_same_shape_is_refused(tmp_path, alias, target, meta):
    """Found by the header fuzz: the alias loaded its target's values, silently."""
    class Tied(Small):
        def __init__(self) -> None:
            super().__init__()
            self.again = self.norm

    model = Tied()
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), skip=mq.SkipRules.none()))
    path = tmp_path / "m.safetensors"
    mq.save(model, path)

    def mutate(meta_):
        aliases = json.loads(meta_["aliases"])
        assert aliases == {"again.bias": "norm.bias", "again.weight": "norm.weight"}
        aliases.pop(alias, None)
        aliases[alias] = target
        meta_["aliases"] = json.dumps(aliases)

    rewrite_metadata(path, mutate)
    if meta:
        with torch.device("meta"):
            fresh = Tied()
    else:
        fresh = Tied()
    snap = None if meta else Snapshot.of(fresh)
    with pytest.raises(mq.SerializationError, match=f"stores {alias!r} as the same tensor as {target!r}|"
                                                    f"{alias!r} is also a stored tensor"):
        mq.load(fresh, path)
    if snap is not None:
        snap.assert_same(fresh)
