"""The layer contract every ``QuantModule`` implements (``to_float``, the shared input preparation,
``supports_gptq`` / ``gptq_geometry``), checked through what monoquant does with it, not by type."""

import pytest
import torch
from torch import nn

import monoquant as mq
from monoquant.im2col import ConvGeometry
from monoquant.nn import LAYERS, QuantLinear, quant_class_for

FLOAT_LAYERS = {
    "linear": lambda: nn.Linear(32, 24),
    "conv1d": lambda: nn.Conv1d(8, 12, 3, padding=1),
    "conv2d_grouped": lambda: nn.Conv2d(16, 12, 3, groups=4),  # K = 36
    "conv3d": lambda: nn.Conv3d(4, 8, 2, bias=False),  # K = 32
    "embedding": lambda: nn.Embedding(50, 32),
}


@pytest.mark.parametrize("make", FLOAT_LAYERS.values(), ids=FLOAT_LAYERS)
@pytest.mark.parametrize("spec", [mq.Int8(), mq.Int4(group_size=4)], ids=lambda s: s.describe())
def test_to_float_gives_the_float_type_with_the_weight_the_layer_computes_with(make, spec):
    torch.manual_seed(0)
    float_layer = make()
    q = quant_class_for(float_layer).from_float(float_layer, spec)
    back = q.to_float()
    assert type(back) is type(float_layer) and back.weight.shape == float_layer.weight.shape
    assert torch.equal(back.weight, q.weight)
    want = q.dequantize_weight(torch.float64).reshape(float_layer.weight.shape)
    assert torch.equal(back.weight.double(), want.to(back.weight.dtype).double())


def test_gptq_geometry_is_what_the_layer_says():
    lin = QuantLinear.from_float(nn.Linear(16, 8))
    conv = mq.QuantConv2d.from_float(nn.Conv2d(4, 8, 3, stride=2, groups=2))
    assert lin.gptq_geometry() is None and lin.supports_gptq
    assert conv.gptq_geometry() == ConvGeometry.of(nn.Conv2d(4, 8, 3, stride=2, groups=2))
    assert mq.QuantEmbedding.supports_gptq is False


class _KeywordCaller(nn.Module):
    """Calls its linear layer with the input as a keyword argument (a forward pre-hook sees no positional one)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 16)

    def forward(self, x):
        return self.lin(input=x)


def test_gptq_observes_a_layer_called_with_its_input_as_a_keyword():
    torch.manual_seed(0)
    model = _KeywordCaller()
    positional = nn.Sequential(nn.Linear(32, 16))
    positional[0].load_state_dict(model.lin.state_dict())
    data = [torch.randn(64, 32) for _ in range(4)]
    cfg = mq.QuantConfig(mq.Int4(group_size=16, method="gptq"), skip=mq.SkipRules.none())
    mq.quantize_(model, cfg, calibration_data=data)
    mq.quantize_(positional, cfg, calibration_data=data)
    assert model.lin.gptq is None and model.lin.calibration_tap is None
    for name in ("qweight", "scale", "zero_point"):
        assert torch.equal(getattr(model.lin, name), getattr(positional[0], name))


class _NoGPTQLinear(nn.Linear):
    pass


def test_a_layer_type_that_declines_gptq_stays_float_with_its_reason_and_the_rest_is_quantized():
    @mq.register_layer
    class QuantNoGPTQLinear(QuantLinear):
        float_module_type = _NoGPTQLinear
        supports_gptq = False

    try:
        torch.manual_seed(0)
        model = nn.Sequential(_NoGPTQLinear(32, 32), nn.ReLU(), nn.Linear(32, 16))
        cfg = mq.QuantConfig(mq.Int8(method="gptq"), skip=mq.SkipRules.none())
        report = mq.quantize_(model, cfg, calibration_data=[torch.randn(64, 32) for _ in range(2)])
        assert type(model[0]) is _NoGPTQLinear and type(model[2]) is QuantLinear
        assert "QuantNoGPTQLinear cannot be calibrated by GPTQ" in report.skipped["0"]
        assert model[2].gptq is None
    finally:
        LAYERS.pop("QuantNoGPTQLinear")


def test_calibration_sees_the_prepared_input():
    """The activation observer sees the input after the layer's own transform (here its input scale)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.warns(mq.CalibrationPendingWarning):
        mq.quantize_(model, mq.QuantConfig(mq.Int8(), activations=mq.Int8(), skip=mq.SkipRules.none()))
    q = model[0]
    q.set_input_scale(torch.full((8,), 4.0))
    x = torch.rand(16, 8)  # in [0, 1): scaled, in [0, 4)
    with mq.calibrate(model):
        model(x)
    scale, _ = q.input_quantizer.observed_qparams()
    assert float(scale) * 255 > 3.0  # the range of x * 4, not of x
