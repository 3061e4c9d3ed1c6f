"""Files written by monoquant 0.1.0 and 0.2.0 (committed in tests/fixtures/v*, made by fixtures/make_fixtures.py)
still load into a float skeleton and compute what they computed then."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import monoquant as mq

FIXTURES = Path(__file__).parent / "fixtures"
VERSIONS = {"0.1.0": FIXTURES / "v0_1_0", "0.2.0": FIXTURES / "v0_2_0"}
_spec = importlib.util.spec_from_file_location("monoquant_fixtures", FIXTURES / "make_fixtures.py")
made = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(made)

EXPECTED = {  # file -> (weight spec, activation spec, the layers 0.1.0 quantized; conv's 36 inputs fit no INT4 group)
    "int8_static_acts": (mq.Int8(), mq.Int8(), ["conv", "fc1", "fc2"]),
    "int4_gptq_act_order": (mq.Int4(group_size=32, method="gptq", act_order=True, damping=0.02), None, ["fc1", "fc2"]),
    "int4_mse_sym": (mq.Int4(group_size=32, symmetric=True, method="mse"), None, ["fc1", "fc2"]),
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", EXPECTED)
def test_an_older_file_loads_and_computes_what_it_computed_then(version, name):
    path = VERSIONS[version] / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["monoquant_version"] == version
    outputs = load_file(str(VERSIONS[version] / "outputs.safetensors"))
    model = mq.load(made.Net().eval(), path)
    spec, acts, quantized = EXPECTED[name]
    assert [n for n, m in model.named_modules() if isinstance(m, mq.QuantModule)] == quantized
    for layer in map(model.get_submodule, quantized):
        assert layer.spec == spec
        assert (None if layer.input_quantizer is None else layer.input_quantizer.spec) == acts
    with torch.no_grad(), mq.kernels.pin("dequant"):
        y = model(outputs["input"])
    torch.testing.assert_close(y, outputs[name], rtol=1e-5, atol=1e-5)


def test_the_0_1_0_header_kept_the_method_inside_the_spec():
    """What these fixtures exercise: 0.1.0 and 0.2.0 wrote the method options into every spec entry."""
    with safe_open(str(VERSIONS["0.1.0"] / "int4_gptq_act_order.safetensors"), "pt") as f:
        entry = json.loads(f.metadata()["modules"])["fc1"]
    assert entry["spec"]["method"] == "gptq" and entry["spec"]["act_order"] is True and "method" not in entry
