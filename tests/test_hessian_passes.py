"""GPTQ calibration with a bounded number of Hessians (issue 21 item 2): passes over the data, each collecting the
Hessians of the next layers up to a byte budget, give exactly the results of one pass, hold at most the budget,
and roll back like one pass."""

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import monoquant as mq
from monoquant import calibration
from monoquant.calibration import _plan_hessian_passes, hessian_budget, pending_layers
from monoquant.gptq import HessianObserver, working_bytes

GPTQ = mq.Int4(group_size=16, method="gptq")


class Branchy(nn.Module):
    """A stack with a layer used twice per forward and three layers reading one tensor."""

    def __init__(self, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.stack = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.twice = nn.Linear(width, width)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.head = nn.Linear(3 * width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.stack:
            x = TF.gelu(layer(x))
        x = self.twice(TF.gelu(self.twice(x)))
        return self.head(torch.cat([self.q(x), self.k(x), self.v(x)], -1))


def _batches(n: int = 3, width: int = 32):
    return [torch.randn(24, width, generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _quantized(activations=None, depth: int = 4):
    torch.manual_seed(0)
    model = Branchy(depth=depth)
    mq.quantize_(model, mq.QuantConfig(GPTQ, activations=activations, skip=mq.SkipRules(min_params=0)),
                 progress=False)
    return model


def _stored(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_hessians_are_allocated_on_first_input_and_handed_back_by_reset():
    obs = HessianObserver(64)
    assert obs.xtx.numel() == 0 and obs.statistic_bytes == 64 * 64 * 4
    obs(torch.randn(5, 64))
    assert obs.xtx.shape == (1, 64, 64)
    obs.reset()
    assert obs.xtx.numel() == 0 and not obs.has_seen_data


@pytest.mark.parametrize("activations", [None, mq.Int8()])
@pytest.mark.parametrize("budget", [1, 2 * 32 * 32 * 4, 5 * 32 * 32 * 4])
def test_passes_give_exactly_the_one_pass_results(budget, activations):
    one = _quantized(activations)
    frozen_one = mq.calibrate_and_freeze(one, _batches(), progress=False, hessian_bytes=1 << 40)
    split = _quantized(activations)
    frozen_split = mq.calibrate_and_freeze(split, _batches(), progress=False, hessian_bytes=budget)
    a, b = _stored(one), _stored(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [f.name for f in frozen_one] == [f.name for f in frozen_split]
    assert [f.output_sqnr_db for f in frozen_one] == [f.output_sqnr_db for f in frozen_split]
    assert not mq.needs_calibration(split)


def test_passes_follow_call_order_within_the_budget_and_stop_early_only_when_they_can():
    model = _quantized()
    layers = pending_layers(model)
    h = 32 * 32 * 4
    passes = _plan_hessian_passes(model, layers, _batches()[0], None, 3 * h)
    names = [[n for n, _ in p.layers] for p in passes]
    assert names == [["stack.0", "stack.1", "stack.2"], ["stack.3", "twice", "q"], ["k", "v"], ["head"]]
    # the head reads 96 inputs: its Hessian (9 h) is over the budget, so it has a pass of its own
    assert [p.stop_after for p in passes] == [model.stack[2], None, model.v, model.head]


def test_no_more_hessians_than_the_budget_are_held_at_once(monkeypatch):
    model = _quantized(depth=8)
    live, peak = [0], [0]
    allocate, reset = HessianObserver._allocate, HessianObserver.reset

    def counting_allocate(self):
        if self.xtx.shape[-1] != self.in_features:
            live[0] += self.statistic_bytes
            peak[0] = max(peak[0], live[0])
            assert live[0] <= max(budget, self.statistic_bytes)  # a pass holds one layer over the budget alone
        allocate(self)

    def counting_reset(self):
        if self.xtx.numel():
            live[0] -= self.statistic_bytes
        reset(self)

    monkeypatch.setattr(HessianObserver, "_allocate", counting_allocate)
    monkeypatch.setattr(HessianObserver, "reset", counting_reset)
    h = 32 * 32 * 4
    budget = 4 * h
    mq.calibrate_and_freeze(model, _batches(), progress=False, hessian_bytes=budget)
    assert peak[0] == 9 * h and live[0] == 0  # passes of 4 Linear(32, 32) Hessians; the head's (9 h) alone
    model, peak[0], budget = _quantized(depth=8), 0, 1 << 40  # one pass: every Hessian at once
    mq.calibrate_and_freeze(model, _batches(), progress=False, hessian_bytes=budget)
    assert peak[0] == 12 * h + 9 * h


def test_default_budget_is_two_largest_hessians_plus_half_one_layers_temporaries():
    model = _quantized()
    h_head = 96 * 96 * 4
    assert hessian_budget(pending_layers(model)) == 2 * h_head + working_bytes(8, 96) // 2
    assert hessian_budget([]) == 0


def test_quantize_splits_many_layers_into_passes_by_default_with_the_one_pass_result(monkeypatch):
    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.layers = nn.Sequential(*[nn.Linear(32, 32) for _ in range(40)])

        def forward(self, x):
            return self.layers(x)

    data = _batches()
    cfg = mq.QuantConfig(GPTQ, skip=mq.SkipRules(min_params=0))
    one = Deep()
    monkeypatch.setattr(calibration, "hessian_budget", lambda layers: 1 << 40)
    mq.quantize_(one, cfg, calibration_data=data, progress=False)
    monkeypatch.undo()
    passes = []
    real = calibration._plan_hessian_passes
    monkeypatch.setattr(calibration, "_plan_hessian_passes", lambda *a: passes.append(real(*a)) or passes[-1])
    split = Deep()
    mq.quantize_(split, cfg, calibration_data=data, progress=False)
    # default budget for Linear(32, 32): 2 * 4 KB + working_bytes(32, 32) / 2 (24 KB) = 8 Hessians of 4 KB
    assert [len(p.layers) for p in passes[0]] == [8, 8, 8, 8, 8]
    a, b = _stored(one), _stored(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failing_pass_leaves_every_layer_calibrating_with_its_statistics_dropped():
    model = _quantized()
    before = _stored(model)
    batches = [*_batches(), torch.full((24, 32), float("nan"))]
    with pytest.raises(mq.CalibrationError, match="NaN"):
        mq.calibrate_and_freeze(model, batches, progress=False, hessian_bytes=1)
    after = _stored(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(pending_layers(model)) == 9
    assert all(not q.gptq.hessian.has_seen_data and q.gptq.hessian.xtx.numel() == 0 for _, q in pending_layers(model))
    frozen = mq.calibrate_and_freeze(model, _batches(), progress=False, hessian_bytes=1)  # and can be redone
    assert len(frozen) == 9


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=12), budget=st.integers(1, 120))
def test_greedy_passes_cover_every_layer_once_in_order_within_the_budget(sizes, budget):
    # layers of different widths in a chain: passes are consecutive runs whose Hessians fit the budget
    widths = [4 * s for s in sizes]
    chain = nn.Sequential(*[nn.Linear(a, b) for a, b in zip([8, *widths[:-1]], widths)])
    mq.quantize_(chain, mq.QuantConfig(mq.Int4(group_size=4, method="gptq"), skip=mq.SkipRules(min_params=0)),
                 progress=False)
    layers = pending_layers(chain)
    budget_bytes = budget * 1024
    passes = _plan_hessian_passes(chain, layers, torch.randn(2, 8), None, budget_bytes)
    flat = [name for p in passes for name, _ in p.layers]
    assert flat == [name for name, _ in layers]
    for p in passes:
        total = sum(q.gptq.hessian.statistic_bytes for _, q in p.layers)
        assert total <= budget_bytes or len(p.layers) == 1
        assert p.stop_after is p.layers[-1][1]


def test_call_order_numbers_the_inputs_instead_of_holding_them():
    """Working out the call order keeps no layer's input alive (64 layers' inputs were a 126 MB transient); layers
    called on the very same tensor share its number, so sequential GPTQ still groups q/k/v."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.o = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.o(self.q(x) + self.k(x))

    model = Shared()
    mq.quantize_(model, mq.QuantConfig(GPTQ, skip=mq.SkipRules(min_params=0)), progress=False)
    first_call, calls = calibration._call_order(model, pending_layers(model), torch.randn(4, 16), None)
    numbers = {name: first_call[id(getattr(model, name))] for name in ("q", "k", "o")}
    assert numbers == {"q": (0, 0), "k": (1, 0), "o": (2, 1)}
    assert set(calls.values()) == {1}
