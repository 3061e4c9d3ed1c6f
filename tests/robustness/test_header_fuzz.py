"""Random JSON in every metadata field of a valid file: mq.load and `monoquant inspect` either refuse it with a
SerializationError (the CLI: one line, status 1, no traceback) or load it correctly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _robust import Small, cli, rewrite_metadata
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import monoquant as mq


class Tied(Small):
    """Small with its LayerNorm registered twice (so the file has aliases) and dynamic INT8 activations on fc1."""

    def __init__(self) -> None:
        super().__init__()
        self.again = self.norm


def _model(spec) -> Tied:
    model = Tied().eval()
    cfg = mq.QuantConfig(spec, activations=mq.Int8(dynamic=True), skip=mq.SkipRules.none())
    mq.quantize_(model, cfg)
    return model


SPECS = {"int8": mq.Int8(), "int4": mq.Int4(group_size=32), "fp16": mq.Float16()}


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, tuple[Path, nn.Module, dict]]:
    folder = tmp_path_factory.mktemp("fuzz")
    out = {}
    for kind, spec in SPECS.items():
        torch.manual_seed(0)
        model = _model(spec)
        path = folder / f"{kind}.safetensors"
        mq.save(model, path)
        out[kind] = (path, model, {k: v.clone() for k, v in model.state_dict().items()})
    return out


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
                    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
                    | st.sampled_from(["float32", "int8", "float16", "int4", "QuantLinear", "QuantConv2d", "fc1",
                                       "fc2.qweight", "norm.weight", "int8-rowmajor", "channel"]),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=8)

ENTRY_FIELDS = ["class", "spec", "scheme", "group_size", "weight_shape", "bias", "float_dtype", "compute_dtype",
                "layout", "geometry", "activations"]
SPEC_FIELDS = ["kind", "symmetric", "group_size", "granularity", "method", "act_order", "damping", "dynamic"]
TARGETS = ([("modules",), ("aliases",), ("modules", "fc1"), ("modules", "fc2"), ("modules", "new layer"),
            ("aliases", "again.weight"), ("aliases", "again.bias"), ("aliases", "fc1.qweight")]
           + [("modules", layer, f) for layer in ("fc1", "fc2") for f in ENTRY_FIELDS]
           + [("modules", "fc1", sub, f) for sub in ("spec", "activations") for f in SPEC_FIELDS]
           + [("modules", "fc1", "geometry", f) for f in ("in_features", "out_features", "extra")])
RAW_KEYS = ["format", "format_version", "modules", "aliases", "monoquant_version", "torch_version"]


def _mutate(target: tuple[str, ...], value):
    def mutate(meta):
        if len(target) == 1:
            meta[target[0]] = json.dumps(value)
            return
        root = json.loads(meta[target[0]])
        node = root
        for key in target[1:-1]:
            node = node[key] if isinstance(node.get(key), dict) else node.setdefault(key, {})
        node[target[-1]] = value
        meta[target[0]] = json.dumps(root)
    return mutate


def _check_load(path: Path, original: dict[str, torch.Tensor]) -> None:
    model = Tied().eval()
    try:
        mq.load(model, path)
    except mq.SerializationError:
        return
    state = model.state_dict()  # a load that succeeds must be exact
    assert set(state) == set(original)
    for k, v in original.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    with torch.no_grad():
        y = model(torch.randn(3, 64))
    assert y.shape == (3, 32) and bool(torch.isfinite(y).all())


def _check_inspect(capsys, path: Path) -> None:
    code, err = cli(capsys, "inspect", path)  # cli() asserts one line and no traceback when code != 0
    assert code in (0, 1)
    if code:
        assert str(path) in err


FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("target", TARGETS, ids=".".join)
@FUZZ
@given(kind=st.sampled_from(list(SPECS)), value=JSON)
def test_random_json_in_a_header_field(originals, tmp_path_factory, capsys, kind, target, value):
    source, _, original = originals[kind]
    path = tmp_path_factory.mktemp("case") / "m.safetensors"
    shutil.copy(source, path)
    rewrite_metadata(path, _mutate(target, value))
    _check_load(path, original)
    _check_inspect(capsys, path)


@pytest.mark.parametrize("key", RAW_KEYS)
@FUZZ
@given(kind=st.sampled_from(list(SPECS)), value=st.text(max_size=20) | JSON.map(json.dumps))
def test_random_text_as_a_raw_metadata_value(originals, tmp_path_factory, capsys, kind, key, value):
    source, _, original = originals[kind]
    path = tmp_path_factory.mktemp("case") / "m.safetensors"
    shutil.copy(source, path)
    rewrite_metadata(path, lambda meta: meta.__setitem__(key, value))
    _check_load(path, original)
    _check_inspect(capsys, path)


@pytest.mark.parametrize("kind", list(SPECS))
def test_the_unmodified_files_load_exactly(originals, capsys, kind):
    path, _, original = originals[kind]
    _check_load(path, original)
    code, _ = cli(capsys, "inspect", path)
    assert code == 0
