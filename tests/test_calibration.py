import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import monoquant as mq
from monoquant import fused, hardware

STATIC = mq.QuantConfig(mq.Int8(), activations=mq.Int8(), skip=mq.SkipRules.none())


def _mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _observed_max(model):
    return float(model[0].input_quantizer.observer.max_val)


def test_calibrate_feeds_observers_under_no_grad_in_eval_and_restores_flags():
    model = _mlp().train()
    model[1].eval()  # a mixed state must come back exactly
    mq.quantize_(model, STATIC)
    assert mq.needs_calibration(model)
    seen = {}

    def spy(module, args):
        seen["grad"] = torch.is_grad_enabled()
        seen["training"] = module.training

    model[2].register_forward_pre_hook(spy)
    x = torch.randn(5, 16)
    with mq.calibrate(model):
        model(x)
    assert seen == {"grad": False, "training": False}
    assert [m.training for m in model] == [True, False, True]
    assert _observed_max(model) == float(x.max())
    assert not model[0]._forward_pre_hooks and list(model[2]._forward_pre_hooks.values()) == [spy]
    with pytest.raises(mq.CalibrationError, match=r"'0'.*not calibrated"):
        model(x)  # static activations outside calibrate(), before freeze
    assert _observed_max(model) == float(x.max())  # nothing observed outside the context


def test_freeze_refuses_unseen_layers_and_changes_nothing():
    model = nn.ModuleDict({"a": nn.Linear(32, 32), "b": nn.Linear(32, 32)})
    mq.quantize_(model, STATIC)
    with mq.calibrate(model):
        model["a"](torch.randn(2, 32))
    with pytest.raises(mq.CalibrationError, match=r"\['b'\]"):
        mq.freeze(model)
    assert not bool(model["a"].input_quantizer.frozen)
    with mq.calibrate(model):
        model["b"](torch.randn(2, 32))
    done = mq.freeze(model)
    assert [d.name for d in done] == ["a", "b"] and not mq.needs_calibration(model)
    assert model["a"].input_quantizer.observer is None


@pytest.mark.parametrize("kind", ["loader", "tensors", "tuples", "dicts", "forward_fn"])
def test_calibrate_with_accepts_every_batch_kind_and_caps_batches(kind):
    xs = [torch.randn(4, 16) * (i + 1) for i in range(6)]

    class KwModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, inputs):
            return self.net(inputs)

    model = KwModel()
    mq.quantize_(model, STATIC)
    forward_fn = None
    if kind == "loader":
        data = DataLoader(TensorDataset(torch.cat(xs), torch.zeros(24)), batch_size=4)
    elif kind == "tensors":
        data = xs
    elif kind == "tuples":
        data = [(x, 0) for x in xs]
    elif kind == "dicts":
        data = [{"inputs": x} for x in xs]
    else:
        data = [{"deep": [x]} for x in xs]

        def forward_fn(m, b):
            return m(b["deep"][0])
    n = mq.calibrate_with(model, data, max_batches=3, forward_fn=forward_fn, progress=False)
    assert n == 3
    assert float(model.net[0].input_quantizer.observer.max_val) == max(float(x.max()) for x in xs[:3])


def test_calibrate_with_empty_data_and_bad_data_raise():
    model = _mlp()
    mq.quantize_(model, STATIC)
    with pytest.raises(mq.CalibrationError, match="no batch"):
        mq.calibrate_with(model, [])
    with pytest.raises(mq.ConfigError, match="iterable of batches"):
        mq.calibrate_with(model, torch.randn(2, 16))


def test_quantize_with_calibration_data_equals_the_manual_flow():
    data = [torch.randn(8, 16) for _ in range(4)]
    a, b = _mlp(), None
    b = copy.deepcopy(a)
    cfg = mq.QuantConfig(mq.Int8(), activations=mq.Int8(observer=mq.HistogramObserver()), skip=mq.SkipRules.none())
    report = mq.quantize_(a, cfg, calibration_data=data)
    mq.quantize_(b, cfg)
    with mq.calibrate(b):
        for x in data:
            b(x)
    mq.freeze(b)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    # no forward since freeze: the static table's guess, marked
    vnni = hardware.cpu_has_avx512_vnni() and fused.available() and fused.has_vnni()  # the format's first choice
    guess = "w8a8_vnni" if vnni else "w8a8_int_mm"
    assert [r.kernel for r in report.quantized] == [f"{guess} (static guess, not run yet)"] * 2
    assert [r.method for r in report.quantized] == ["rtn", "rtn"]
    x = torch.randn(3, 16)
    assert torch.equal(a(x), b(x))


def test_nan_input_names_the_layer_and_calibrate_warns_when_nothing_to_do():
    model = _mlp()
    mq.quantize_(model, STATIC)
    with pytest.raises(mq.CalibrationError, match="'2'"), mq.calibrate(model):
        model[2](torch.full((1, 32), float("nan")))
    plain = _mlp()
    mq.quantize_(plain, mq.QuantConfig(mq.Int8(), skip=mq.SkipRules.none()))
    assert not mq.needs_calibration(plain)
    with pytest.warns(UserWarning, match="nothing .* needs calibration"), mq.calibrate(plain):
        plain(torch.randn(1, 16))
    assert mq.sync_observers(model) == 0  # not distributed: nothing to do


def test_dynamic_activations_need_no_calibration():
    model = _mlp()
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), activations=mq.Int8(dynamic=True), skip=mq.SkipRules.none()))
    assert not mq.needs_calibration(model)
    assert model(torch.randn(2, 16)).shape == (2, 4)


def test_calibrated_model_saves_and_loads_bit_identically(tmp_path):
    torch.manual_seed(0)
    data = [torch.randn(16, 16) for _ in range(3)]
    model = _mlp()
    cfg = mq.QuantConfig(mq.Int4(group_size=16, method="gptq"), activations=mq.Int8(observer=mq.HistogramObserver()),
                         skip=mq.SkipRules.none())
    mq.quantize_(model, cfg, calibration_data=data, on_failure="ignore")
    mq.save(model, tmp_path / "m.safetensors")
    loaded = mq.load(_mlp(), tmp_path / "m.safetensors")
    x = torch.randn(5, 16)
    assert torch.equal(model(x), loaded(x))
    assert torch.equal(loaded[0].input_quantizer.scale, model[0].input_quantizer.scale)
    pending = _mlp()
    mq.quantize_(pending, cfg)
    with pytest.raises(mq.SerializationError, match="freeze"):
        mq.save(pending, tmp_path / "p.safetensors")


def test_config_says_whether_it_needs_calibration_data():
    assert not mq.QuantConfig(mq.Int4()).needs_calibration
    assert not mq.QuantConfig(mq.Int8(), activations=mq.Int8(dynamic=True)).needs_calibration
    assert mq.QuantConfig(mq.Int8(), activations=mq.Int8()).needs_calibration
    assert mq.QuantConfig(mq.Int4(method="gptq")).needs_calibration
    assert not mq.QuantConfig(mq.Int4(method="mse")).needs_calibration
