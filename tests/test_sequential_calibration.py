"""Sequential GPTQ calibration (``sequential=True``): stages, what each layer sees, early stops, rollback."""

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import monoquant as mq
from monoquant.calibration import _plan_stages, pending_layers
from monoquant.gptq import GPTQOptions, gptq_quantize


class Chain(nn.Module):
    """``a`` -> ReLU -> ``q``, ``k``, ``v`` on the same tensor -> concatenated -> ``out``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(32, 64)
        self.q, self.k, self.v = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.out = nn.Linear(192, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = TF.relu(self.a(x))
        return self.out(torch.cat([self.q(h), self.k(h), self.v(h)], -1))


SEQ = mq.Int4(group_size=32, method="gptq", sequential=True)
BATCHES = [torch.randn(16, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]


def _swapped(spec=SEQ, model=None, activations=None):
    model = model or Chain()
    mq.quantize_(model, mq.QuantConfig(spec, activations=activations, skip=mq.SkipRules(min_params=0)), progress=False)
    return model


def _names(stages):
    return [[name for name, _ in stage.layers] for stage in stages]


def test_stages_follow_call_order_and_group_layers_reading_the_same_tensor():
    model = _swapped()
    stages = _plan_stages(model, pending_layers(model), BATCHES[0], None)
    assert _names(stages) == [["a"], ["q", "k", "v"], ["out"]]
    assert [s.stop_after for s in stages] == [model.a, model.v, model.out]


def test_each_layer_is_quantized_on_inputs_from_the_already_quantized_layers_before_it():
    model = _swapped()
    frozen = mq.calibrate_and_freeze(model, BATCHES, progress=False)
    assert [f.name for f in frozen] == ["a", "q", "k", "v", "out"] and not mq.needs_calibration(model)
    seen = []
    handle = model.out.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad(), mq.kernels.tuning(False):  # calibration runs the static kernel table, never timed ones
        for x in BATCHES:
            model(x)
    handle.remove()
    x = torch.cat(seen)
    h = x.T @ x / x.shape[0]  # out's Hessian as the quantized model feeds it
    opts = GPTQOptions.of(SEQ)
    expected = gptq_quantize(SEQ, Chain().out.weight.detach(), h, 32, act_order=opts.act_order,
                             damping=opts.damping, static_groups=opts.static_groups, refit_scales=opts.refit_scales)
    assert torch.equal(model.out.qweight, expected.qweight)
    torch.testing.assert_close(model.out.scale, expected.scale, rtol=1e-4, atol=0)  # H summed per batch vs at once
    one_pass = _swapped(mq.Int4(group_size=32, method="gptq"))
    mq.calibrate_and_freeze(one_pass, BATCHES, progress=False)
    assert torch.equal(one_pass.a.qweight, model.a.qweight)  # the first stage sees float inputs either way
    assert not torch.equal(one_pass.out.qweight, model.out.qweight)


def test_a_stage_pass_ends_after_its_last_layer():
    model = _swapped()
    calls = {"out": 0, "q": 0}
    model.out.register_forward_pre_hook(lambda m, a: calls.__setitem__("out", calls["out"] + 1))
    model.q.register_forward_pre_hook(lambda m, a: calls.__setitem__("q", calls["q"] + 1))
    mq.calibrate_and_freeze(model, BATCHES, progress=False)
    n = len(BATCHES)
    assert calls == {"q": 1 + 2 * n, "out": 1 + n}  # planning pass + the stages that reach them


def test_a_layer_called_twice_per_forward_is_not_cut_short():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.shared = nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x):
            return self.shared(self.shared(self.first(x)))

    model = _swapped(model=Twice())
    stages = _plan_stages(model, pending_layers(model), BATCHES[0], None)
    assert _names(stages) == [["first"], ["shared"]] and stages[1].stop_after is None
    mq.calibrate_and_freeze(model, BATCHES, progress=False)
    assert not mq.needs_calibration(model)


def test_a_failing_stage_puts_every_layer_back_as_it_was():
    model = _swapped()
    before = {n: copy.deepcopy(m.state_dict()) for n, m in model.named_children()}
    calls = 0

    def flaky(m, batch):
        nonlocal calls
        calls += 1
        if calls == 2 + len(BATCHES):  # second stage, after the first one froze `a`
            raise RuntimeError("loader died")
        return m(batch)

    with pytest.raises(RuntimeError, match="loader died"):
        mq.calibrate_and_freeze(model, BATCHES, forward_fn=flaky, progress=False)
    assert [n for n, _ in pending_layers(model)] == ["a", "q", "k", "v", "out"]
    for name, m in model.named_children():
        for key, t in m.state_dict().items():
            assert torch.equal(t, before[name][key]), (name, key)  # weights, and statistics back to none
        assert not m.gptq.hessian.has_seen_data
    mq.calibrate_and_freeze(model, BATCHES, progress=False)  # and it can simply run again
    assert not mq.needs_calibration(model)


def test_a_layer_no_batch_reaches_is_named_and_nothing_changes():
    class Branch(Chain):
        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Linear(32, 32)

    model = _swapped(model=Branch())
    with pytest.raises(mq.CalibrationError, match="unused"):
        mq.calibrate_and_freeze(model, BATCHES, progress=False)
    assert len(pending_layers(model)) == 6


def test_one_shot_iterators_static_activations_and_quantize_with_data():
    model = _swapped(activations=mq.Int8())
    frozen = mq.calibrate_and_freeze(model, (x for x in BATCHES), progress=False)
    assert len(frozen) == 5 and all(m.input_quantizer.ready for m in (model.a, model.q, model.out))
    model = Chain()
    reference = torch.cat([model(x) for x in BATCHES]).detach()
    report = mq.quantize_(model, mq.QuantConfig(SEQ, skip=mq.SkipRules(min_params=0)), calibration_data=BATCHES,
                          progress=False)
    assert [r.method for r in report.quantized] == ["gptq"] * 5
    with torch.no_grad():
        assert mq.functional.sqnr(reference, torch.cat([model(x) for x in BATCHES])) > 20
