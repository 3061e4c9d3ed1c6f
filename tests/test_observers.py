import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.ao.quantization import observer as ao

import monoquant as mq
from monoquant import functional as F
from monoquant.observers import _regrid

INT8_AFFINE = mq.QType(8, symmetric=False)
INT8_SYM = mq.QType(8, symmetric=True)
INT4_AFFINE = mq.QType(4, symmetric=False)


def _mse(x, scale, zero, qtype):
    return float((x.double() - F.fake_quantize(x.double(), scale, zero, qtype)).pow(2).mean())


# ---- MinMax / MovingAverage: hand computations and torch.ao ---------------------------------------------------
def test_minmax_affine_equals_hand_computation_and_torch_ao():
    batches = [torch.randn(16, 32) * 2 + 0.5, torch.randn(3, 32) * 5]
    obs = mq.MinMaxObserver().configure(INT8_AFFINE)
    ref = ao.MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    for b in batches:
        assert obs(b) is b
        ref(b)
    scale, zero = obs.calculate_qparams()
    lo, hi = min(float(b.min()) for b in batches), max(float(b.max()) for b in batches)
    assert float(scale) == pytest.approx((hi - lo) / 255, rel=1e-12)
    assert int(zero) == round(-lo / ((hi - lo) / 255))
    ref_scale, ref_zero = ref.calculate_qparams()
    assert float(scale) == pytest.approx(float(ref_scale), rel=1e-6)  # torch.ao computes in float32
    assert int(zero) == int(ref_zero)


def test_minmax_symmetric_matches_torch_ao_restricted_range():
    # deliberate difference: monoquant's symmetric scale is absmax / 127 (codes -127..127 used symmetrically);
    # torch.ao's default qint8 uses absmax / 127.5. With quant_min=-127 they agree.
    x = torch.randn(64, 8) * 3
    obs = mq.MinMaxObserver().configure(INT8_SYM)
    obs(x)
    ref = ao.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127)
    ref(x)
    scale, zero = obs.calculate_qparams()
    assert float(scale) == pytest.approx(float(x.abs().max()) / 127, rel=1e-12)
    assert float(scale) == pytest.approx(float(ref.calculate_qparams()[0]), rel=1e-6)
    assert int(zero) == 0


def test_per_channel_minmax_matches_torch_ao():
    w = torch.randn(12, 40)
    obs = mq.MinMaxObserver().configure(INT8_SYM, mq.PerChannel(0))
    obs(w)
    ref = ao.PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                      quant_min=-127, quant_max=127)
    ref(w)
    scale, _ = obs.calculate_qparams()
    torch.testing.assert_close(scale.float(), ref.calculate_qparams()[0].float(), rtol=1e-6, atol=0)


def test_moving_average_matches_torch_ao():
    batches = [torch.randn(8, 16) * (1 + i) for i in range(6)]
    obs = mq.MovingAverageMinMaxObserver(averaging_constant=0.01).configure(INT8_AFFINE)
    ref = ao.MovingAverageMinMaxObserver(averaging_constant=0.01, dtype=torch.quint8)
    for b in batches:
        obs(b)
        ref(b)
    assert float(obs.min_val) == pytest.approx(float(ref.min_val), rel=1e-6)
    assert float(obs.max_val) == pytest.approx(float(ref.max_val), rel=1e-6)
    # hand computation: the first batch initialises, then m += c * (batch - m)
    m = float(batches[0].max())
    for b in batches[1:]:
        m += 0.01 * (float(b.max()) - m)
    assert float(obs.max_val) == pytest.approx(m, rel=1e-6)
    with pytest.raises(mq.ConfigError):
        mq.MovingAverageMinMaxObserver(averaging_constant=0.0)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=5), st.integers(0, 2**31 - 1))
def test_minmax_independent_of_how_data_is_split(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), 7, generator=g) * 4
    whole = mq.MinMaxObserver().configure(INT4_AFFINE, mq.PerChannel(0))
    whole(x.T.contiguous())
    parts = mq.MinMaxObserver().configure(INT4_AFFINE, mq.PerChannel(0))
    for chunk in torch.split(x, sizes):
        parts(chunk.T.contiguous())
    for a, b in zip(whole.calculate_qparams(), parts.calculate_qparams()):
        assert torch.equal(a, b)


# ---- input handling -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [mq.MinMaxObserver, mq.HistogramObserver, mq.MovingAverageMinMaxObserver,
                                  mq.MSEObserver])
def test_inf_is_ignored_with_a_warning_and_nan_names_the_layer(make):
    obs = make().configure(INT8_AFFINE)
    obs.name = "encoder.fc1"
    x = torch.tensor([[-1.0, 2.0, float("inf"), 0.5, float("-inf")]])
    with pytest.warns(mq.NonFiniteInputWarning, match="2 \\+-inf"):
        obs(x)
    clean = make().configure(INT8_AFFINE)
    clean(torch.tensor([[-1.0, 2.0, 0.5]]))
    for a, b in zip(obs.calculate_qparams(), clean.calculate_qparams()):
        assert torch.equal(a, b)
    with pytest.raises(mq.CalibrationError, match=r"encoder\.fc1"):
        obs(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("make", [mq.MinMaxObserver, mq.HistogramObserver, mq.MSEObserver])
def test_empty_half_and_single_row_inputs(make):
    obs = make().configure(INT8_AFFINE)
    obs(torch.empty(0, 4))
    assert not obs.has_seen_data
    with pytest.raises(mq.CalibrationError, match="seen no data"):
        obs.calculate_qparams()
    x = torch.tensor([[-0.75, 0.5, 1.25, 3.0]])  # batch size 1, exactly representable in fp16 and bf16
    ref = make().configure(INT8_AFFINE)
    ref(x)
    for dtype in (torch.float16, torch.bfloat16):
        o = make().configure(INT8_AFFINE)
        o(x.to(dtype))
        for a, b in zip(o.calculate_qparams(), ref.calculate_qparams()):
            assert torch.equal(a, b)


def test_state_dict_round_trip_and_reset():
    obs = mq.MinMaxObserver().configure(INT8_SYM, mq.PerChannel(0))
    obs(torch.randn(6, 10))
    fresh = mq.MinMaxObserver().configure(INT8_SYM, mq.PerChannel(0))
    fresh.load_state_dict(obs.state_dict())
    assert fresh.has_seen_data
    for a, b in zip(obs.calculate_qparams(), fresh.calculate_qparams()):
        assert torch.equal(a, b)
    h = mq.HistogramObserver(bins=64).configure(INT8_AFFINE)
    h(torch.randn(100))
    h2 = mq.HistogramObserver(bins=64).configure(INT8_AFFINE)
    h2.load_state_dict(h.state_dict())
    assert torch.equal(h2.calculate_qparams()[0], h.calculate_qparams()[0])
    h.reset()
    assert not h.has_seen_data and float(h.histogram.sum()) == 0


def test_half_model_keeps_statistics_in_their_dtype():
    obs = mq.HistogramObserver().configure(INT8_AFFINE)
    obs(torch.randn(50))
    obs.half()
    assert obs.histogram.dtype == torch.float64 and obs.min_val.dtype == torch.float64


# ---- Histogram ------------------------------------------------------------------------------------------------
def test_histogram_regrid_merges_whole_bins_exactly():
    hist = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    # bins of width 1 starting at 3 -> width 2 starting at 2 (i.e. [2,4) [4,6) [6,8) ...): 3 | 4,5 | 6
    assert _regrid(hist, 0, 3, 1, 1).tolist() == [1.0, 5.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert _regrid(hist, 0, -5, 2, -2).tolist() == [1.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_histogram_counts_every_value_on_power_of_two_bins():
    obs = mq.HistogramObserver(bins=16).configure(INT8_AFFINE)
    obs(torch.tensor([0.0, 1.0, 2.5]))
    assert obs.bin_width == 0.25 and int(obs.origin) == 0  # 2.5 / 16 -> 0.25: bins [0, 4)
    assert obs.histogram[[0, 4, 10]].tolist() == [1.0, 1.0, 1.0]
    obs(torch.tensor([-3.0, 7.9]))  # widens: width 1, bins [-3, 13)
    assert obs.bin_width == 1.0 and int(obs.origin) == -3
    assert float(obs.histogram.sum()) == 5.0
    assert obs.histogram[[0, 3, 4, 5, 10]].tolist() == [1.0, 1.0, 1.0, 1.0, 1.0]
    assert (float(obs.min_val), float(obs.max_val)) == (-3.0, 7.900000095367432)


def test_histogram_rejects_per_channel_and_defaults_to_2048_bins():
    assert mq.HistogramObserver().bins == 2048
    with pytest.raises(mq.ConfigError, match="per-tensor"):
        mq.HistogramObserver().configure(INT8_AFFINE, mq.PerChannel(0))


def _heavy_tailed(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "outliers":
        x = torch.randn(60_000, generator=g)
        idx = torch.randperm(x.numel(), generator=g)[: x.numel() // 1000]
        x[idx] *= 50
        return x
    return torch.distributions.StudentT(3.0).sample((60_000,))


def _brute_force_best(x, qtype):
    """Lowest MSE over a grid of ranges, evaluated on the data itself (vectorised over candidates)."""
    lo, hi = float(x.min()), float(x.max())
    ratios = torch.logspace(0, -2.5, 60, dtype=torch.float64)
    x = x.double()[None, :]

    def errs(lo_c, hi_c):
        s, z = F.qparams_from_minmax(lo_c, hi_c, qtype)
        out = []
        for i in range(0, len(s), 10):
            approx = F.fake_quantize(x, s[i:i + 10, None], z[i:i + 10, None], qtype)
            out.append((x - approx).pow(2).mean(-1))
        return torch.cat(out)

    if qtype.symmetric:
        a = max(-lo, hi) * ratios
        return float(errs(-a, a).min())
    return min(float(errs(lo * r.expand(len(ratios)), hi * ratios).min()) for r in ratios[::6])


@pytest.mark.parametrize("kind", ["outliers", "student_t"])
@pytest.mark.parametrize("qtype", [INT8_SYM, INT8_AFFINE])
def test_histogram_range_beats_minmax_and_is_near_brute_force(kind, qtype):
    torch.manual_seed(2)
    x = _heavy_tailed(kind)
    hist, mm = mq.HistogramObserver().configure(qtype), mq.MinMaxObserver().configure(qtype)
    for chunk in x.split(20_000):
        hist(chunk)
        mm(chunk)
    err_hist = _mse(x, *hist.calculate_qparams(), qtype)
    err_mm = _mse(x, *mm.calculate_qparams(), qtype)
    best = _brute_force_best(x, qtype)
    assert err_hist < err_mm
    assert err_hist <= 1.05 * best, (err_hist, best)


def test_histogram_order_independent_within_one_bin():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(4000, generator=g) * s + m for s, m in [(1, 0), (5, 2), (0.5, -3), (2, 8)]]
    results = []
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        obs = mq.HistogramObserver().configure(INT8_AFFINE)
        for i in order:
            obs(batches[i])
        results.append((obs.histogram.clone(), *obs.calculate_qparams()))
    # bins sit on a fixed power-of-two grid, so the order changes nothing at all (stronger than "within a bin")
    for hist, scale, zero in results[1:]:
        assert torch.equal(hist, results[0][0])
        assert torch.equal(scale, results[0][1]) and torch.equal(zero, results[0][2])
    whole = mq.HistogramObserver().configure(INT8_AFFINE)
    whole(torch.cat(batches))
    assert torch.equal(whole.histogram, results[0][0])


# ---- MSE observer ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", [INT4_AFFINE, mq.QType(4, symmetric=True)])
def test_mse_observer_beats_minmax_on_int4_group_weights(qtype):
    w = torch.randn(64, 256) * torch.rand(64, 1)
    w[0, 0] = 8.0  # an outlier in one group
    gran = mq.PerGroup(128)
    errs = {}
    for make in (mq.MinMaxObserver, mq.MSEObserver):
        obs = make().configure(qtype, gran)
        obs(w)
        s, z = obs.calculate_qparams()
        view = F.group_view(w, gran)
        errs[make] = float((view.double() - F.fake_quantize(view.double(), s[..., None], z[..., None], qtype))
                           .pow(2).mean())
    assert errs[mq.MSEObserver] < 0.95 * errs[mq.MinMaxObserver]


def test_mse_observer_is_the_weight_observer_for_method_mse():
    w = torch.randn(32, 256)
    lin = torch.nn.Linear(256, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    errs = {}
    for spec in (mq.Int4(group_size=64), mq.Int4(group_size=64, method="mse"),
                 mq.Int4(group_size=64, observer=mq.MSEObserver())):
        q = mq.QuantLinear.from_float(lin, spec)
        errs[spec.method + str(spec.observer is None)] = float((q.dequantize_weight() - w).pow(2).mean())
    assert errs["mseTrue"] < errs["rtnTrue"]
    assert errs["mseTrue"] == errs["rtnFalse"]  # method="mse" is exactly the default MSEObserver
    with pytest.raises(mq.ConfigError, match="not both"):
        mq.Int4(method="mse", observer=mq.MinMaxObserver())


# ---- a user-written observer (the README example) --------------------------------------------------------------
class AbsMaxObserver(mq.Observer):
    """Symmetric range from the running absolute maximum."""

    def __init__(self):
        super().__init__()
        self.register_buffer("absmax", torch.tensor(0.0))

    def _observe(self, x):
        self.absmax = torch.maximum(self.absmax, x.abs().max())

    def _qparams(self, qtype):
        return F.qparams_from_minmax(-self.absmax, self.absmax, qtype)


def test_custom_observer_subclass_plugs_into_a_config():
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    data = [torch.randn(16, 32) for _ in range(3)]
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), activations=mq.Int8(observer=AbsMaxObserver()),
                                       skip=mq.SkipRules.none()), calibration_data=data, on_failure="ignore")
    expected = max(float(d.abs().max()) for d in data)
    aq = model[0].input_quantizer
    assert float(aq.scale) == pytest.approx(expected / 255 * 2, rel=1e-6)  # affine 8-bit over [-a, a]


def test_specs_take_an_observer_instance_or_factory_and_give_each_layer_its_own():
    proto = mq.HistogramObserver(bins=512)
    for spec in (mq.Int8(observer=proto), mq.Int8(observer=lambda: mq.HistogramObserver(bins=512))):
        model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))
        mq.quantize_(model, mq.QuantConfig(mq.Int8(), activations=spec, skip=mq.SkipRules.none()))
        a, b = model[0].input_quantizer.observer, model[1].input_quantizer.observer
        assert isinstance(a, mq.HistogramObserver) and a.bins == 512 and a is not b and a is not proto
        assert a.name == "0" and b.name == "1"
    with pytest.raises(mq.ConfigError, match="factory"):
        mq.Int8(observer=3).make_observer()
