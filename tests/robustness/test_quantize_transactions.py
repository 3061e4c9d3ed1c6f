"""quantize_, freeze, dequantize_ and load are all or nothing: a failure at any step leaves the model exactly as it
was (same module objects under the same names, same tensors, hooks and flags)."""

import pytest
import torch
from torch import nn

import monoquant as mq
from monoquant import calibration, measure, swap
from monoquant.nn.module import QuantModule


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(64, 128)
        self.shared = nn.Linear(128, 128)
        self.encoder = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.tied_a = nn.Linear(128, 128)
        self.tied_b = nn.Linear(128, 128)
        self.tied_b.weight = self.tied_a.weight
        self.head = nn.Linear(128, 10)
        self.calls = 0
        self.fc1.register_forward_hook(self._count)

    def _count(self, *args) -> None:
        self.calls += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        h = self.shared(self.shared(h))
        h = self.encoder(h.unsqueeze(1)).squeeze(1)
        c = self.conv(h.reshape(h.shape[0], 8, 16)).mean(1)
        h = self.tied_b(self.tied_a(h)) + c.repeat(1, 8)
        return self.head(h)


def snapshot(model: nn.Module) -> dict:
    return {
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "tensors": {k: (id(v), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()},
        "hooks": [(n, id(m._forward_hooks), list(m._forward_hooks), id(m._forward_pre_hooks),
                   list(m._forward_pre_hooks)) for n, m in model.named_modules()],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "encoder_flag": model.encoder.activation_relu_or_gelu,
        "attrs": sorted(vars(model.encoder)),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key in ("modules", "hooks", "training", "encoder_flag", "attrs"):
        assert after[key] == before[key], key
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (ident, value) in before["tensors"].items():
        got_id, got = after["tensors"][name]
        assert got_id == ident and torch.equal(got, value), name
    assert not any(isinstance(m, QuantModule) for m in model.modules())


def data() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(16, 64) for _ in range(4)]


class Injected(Exception):
    pass


def fail_on_call(n: int):
    calls = {"n": 0}

    def hook(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= n:
            raise Injected(f"injected failure at call {calls['n']}")
        return hook.original(*args, **kwargs)

    return hook


STEPS = [
    (QuantModule, "from_float", 3, {}),
    (calibration, "prepare", 2, {}),
    (measure, "record_reference", 1, {}),
    (swap.Swap, "replace", 3, {}),
    (swap.Swap, "route_encoder_layers", 1, {}),
    (calibration, "calibrate_with", 1, {}),
    (calibration, "sync_observers", 1, {}),
    (calibration, "freeze", 1, {}),
    (measure, "measure_into", 1, {}),
    (measure, "meet_target", 1, {"target_sqnr": 80.0}),
    (measure, "measure", 1, {}),
    (mq.QuantReport, "record_frozen", 1, {}),
]


@pytest.mark.parametrize(("owner", "attr", "nth", "extra"), STEPS, ids=[f"{s[1]}#{s[2]}" for s in STEPS])
def test_each_step_of_quantize_failing_restores_the_model(monkeypatch, owner, attr, nth, extra):
    model = Net().eval()
    x = data()[0]
    with torch.no_grad():
        expected = model(x)
    before = snapshot(model)
    hook = fail_on_call(nth)
    hook.original = getattr(owner, attr)
    if isinstance(owner, type) and isinstance(owner.__dict__.get(attr), classmethod):
        original = owner.__dict__[attr].__func__
        hook.original = lambda *a, **k: original(*a, **k)
        monkeypatch.setattr(owner, attr, classmethod(hook))
    else:
        monkeypatch.setattr(owner, attr, hook)
    config = mq.QuantConfig(mq.Int8(method="gptq"), activations=mq.Int8(), skip=mq.SkipRules.none())
    with pytest.raises(Injected):
        mq.quantize_(model, config, calibration_data=data(), on_failure="ignore", **extra)
    assert_unchanged(model, before)
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert mq.quantize_(model, config, calibration_data=data(), on_failure="ignore").quantized  # still usable


def test_a_data_iterable_that_fails_on_its_second_pass_restores_the_model():
    class Flaky:
        def __init__(self) -> None:
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            if self.passes > 1:
                raise OSError("the data server went away")
            return iter(data())

    model = Net().eval()
    before = snapshot(model)
    with pytest.raises(OSError, match="went away"):
        mq.quantize_(model, mq.QuantConfig(mq.Int8(), activations=mq.Int8()), calibration_data=Flaky())
    assert_unchanged(model, before)


def test_a_layer_that_never_sees_data_restores_the_model():
    class Branchy(Net):
        def forward(self, x):
            return self.head(torch.relu(self.fc1(x)).repeat(1, 1)[:, :128])

    model = Branchy().eval()
    before = snapshot(model)
    with pytest.raises(mq.CalibrationError, match="no calibration data reached"):
        mq.quantize_(model, mq.QuantConfig(mq.Int8(), activations=mq.Int8(), skip=mq.SkipRules.none()),
                     calibration_data=data())
    assert_unchanged(model, before)


def test_nan_activations_restore_the_model():
    model = Net().eval()
    before = snapshot(model)
    bad = [torch.full((16, 64), float("nan"))]
    with pytest.raises(mq.CalibrationError, match="received NaN values"):
        mq.quantize_(model, mq.QuantConfig(mq.Int8(), activations=mq.Int8(), skip=mq.SkipRules.none()),
                     calibration_data=bad)
    assert_unchanged(model, before)


def test_empty_layers_stay_float_with_the_reason():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 0), nn.Linear(0, 8))
    report = mq.quantize_(model, mq.QuantConfig(mq.Int8(), skip=mq.SkipRules.none()))
    assert report.skipped == {"1": "empty weight [0, 64]: nothing to quantize",
                              "2": "empty weight [8, 0]: nothing to quantize"}
    assert isinstance(model[0], mq.QuantLinear) and type(model[1]) is type(model[2]) is nn.Linear


def test_a_layer_that_cannot_be_built_changes_nothing(monkeypatch):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 8))
    before = [id(m) for m in model]

    def refuse(module, name=""):
        if name == "2":
            raise mq.ConfigError("this layer cannot be built")

    monkeypatch.setattr(mq.QuantLinear, "_check_float", classmethod(lambda cls, m, n: refuse(m, n)))
    with pytest.raises(mq.ConfigError, match=r"layer '2' cannot be quantized.*nothing was changed"):
        mq.quantize_(model, mq.QuantConfig(mq.Int8(), skip=mq.SkipRules.none()))
    assert [id(m) for m in model] == before and all(type(m) is nn.Linear for m in model)


def test_freeze_failing_midway_changes_no_layer(monkeypatch):
    model = Net().eval()
    mq.quantize_(model, mq.QuantConfig(mq.Int8(method="gptq"), activations=mq.Int8(), skip=mq.SkipRules.none()))
    mq.calibrate_with(model, data())
    pending = [m for m in model.modules() if isinstance(m, QuantModule)]
    had_gptq = {id(m): m.gptq is not None for m in pending}
    assert sum(had_gptq.values()) >= 4
    stored = {id(m): [t.clone() for t in m.stored if t is not None] for m in pending}
    from monoquant.nn.activation import ActivationQuantizer

    hook = fail_on_call(4)
    hook.original = ActivationQuantizer.observed_qparams
    monkeypatch.setattr(ActivationQuantizer, "observed_qparams", hook)
    with pytest.raises(Injected):
        mq.freeze(model)
    for m in pending:
        assert (m.gptq is not None) == had_gptq[id(m)] and not m.input_quantizer.ready
        assert all(torch.equal(a, b) for a, b in zip([t for t in m.stored if t is not None], stored[id(m)]))
    monkeypatch.undo()
    assert len(mq.freeze(model)) == len(pending)


def test_load_failing_while_assigning_tensors_restores_the_model(tmp_path, monkeypatch):
    source = Net().eval()
    mq.quantize_(source, mq.Int8())
    path = tmp_path / "net.safetensors"
    mq.save(source, path)
    model = Net().eval()
    before = snapshot(model)

    def broken(*args, **kwargs):
        raise Injected("disk read failed")

    monkeypatch.setattr(nn.Module, "load_state_dict", broken)
    with pytest.raises(Injected):
        mq.load(model, path)
    assert_unchanged(model, before)


def test_dequantize_failing_midway_keeps_the_quantized_model(monkeypatch):
    model = Net().eval()
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), skip=mq.SkipRules.none()))
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]
    hook = fail_on_call(3)
    hook.original = QuantModule.to_float
    monkeypatch.setattr(QuantModule, "to_float", hook)
    with pytest.raises(Injected):
        mq.dequantize_(model)
    assert [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)] == layers
