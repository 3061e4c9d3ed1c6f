"""HistogramObserver's range modes: a lone glitch must not decide the range, each mode's numbers, state contract."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.ao.quantization import observer as ao

import monoquant as mq
from monoquant import functional as F

INT8_AFFINE = mq.QType(8, symmetric=False)
INT8_SYM = mq.QType(8, symmetric=True)
MODES = ("mse", "percentile", "entropy", "exact")


def _issue_batches(glitch=400.0):
    """The issue's data: 16 batches of 64x256 N(0,1), one value (batch 7) replaced by ``glitch``."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 256, generator=g) for _ in range(16)]
    if glitch is not None:
        batches[7][3, 5] = glitch
    return batches


def _observe(make, batches, qtype=INT8_AFFINE):
    obs = make().configure(qtype)
    for b in batches:
        obs(b)
    return obs


def _test_mse(scale, zero, qtype):
    """Mean squared quantization error on fresh N(0,1) values (what inference sees after a calibration glitch)."""
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(9)).double()
    return float((x - F.fake_quantize(x, scale, zero, qtype)).pow(2).mean())


# ---- the issue's case: one value of 400 among 262144 N(0,1) values ---------------------------------------------
def test_single_outlier_scale_is_within_1_5x_of_torch_ao_and_exact_mode_keeps_the_outlier():
    batches = _issue_batches()
    ref = ao.HistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    for b in batches:
        ref(b)
    ref_scale = float(ref.calculate_qparams()[0])
    assert ref_scale == pytest.approx(0.0348, abs=5e-4)  # torch.ao clips the outlier: range about -4.3..4.6
    default = _observe(mq.HistogramObserver, batches)
    assert default.mode == "mse"
    scale, zero = default.calculate_qparams()
    assert 1 / 1.5 < float(scale) / ref_scale < 1.5
    lo, hi = -int(zero) * float(scale), (255 - int(zero)) * float(scale)
    assert -4.5 < lo < -3.5 and 3.5 < hi < 4.5  # the bulk's MSE-optimal range, not the outlier's
    exact_scale = float(_observe(lambda: mq.HistogramObserver(mode="exact"), batches).calculate_qparams()[0])
    assert exact_scale > 30 * ref_scale  # 0.1.0's objective: the one value holds the range open (scale ~1.18)


@pytest.mark.parametrize("qtype", [INT8_AFFINE, INT8_SYM])
def test_each_mode_on_the_single_outlier_case(qtype):
    batches = _issue_batches()
    clean = torch.cat([b.reshape(-1) for b in _issue_batches(glitch=None)]).double()
    best = min(_test_mse(*F.qparams_from_minmax(torch.tensor(-a), torch.tensor(a), qtype), qtype)
               for a in torch.linspace(3.0, 5.0, 81).tolist())
    result = {}
    for mode in MODES:
        obs = _observe(lambda m=mode: mq.HistogramObserver(mode=m), batches, qtype)
        scale, zero = obs.calculate_qparams()
        result[mode] = (float(scale), _test_mse(scale, zero, qtype), obs.bin_width)
    assert result["mse"][1] < 1.03 * best  # within 0.13 dB of the best symmetric clip for clean N(0,1)
    assert result["percentile"][1] < 1.1 * best
    # percentile: the 0.01% / 99.99% quantiles of the data (0.01% of |x| for symmetric), to within one bin
    if qtype.symmetric:
        top = float(torch.quantile(clean.abs().float(), 0.9999))
        assert result["percentile"][0] == pytest.approx(top / 127, abs=0.25 / 127)
    else:
        lo, hi = (float(q) for q in torch.quantile(clean.float(), torch.tensor([1e-4, 1 - 1e-4])))
        assert result["percentile"][0] == pytest.approx((hi - lo) / 255, abs=0.25 / 255)
    # entropy cannot judge a code step finer than a bin (0.25 here: the outlier stretched the histogram), so it
    # stops at about one bin per code: documented, and still 20x finer than the exact objective's range
    assert result["entropy"][2] == 0.25 and 0.25 <= result["entropy"][0] < 0.28
    assert result["exact"][0] > 1.1 and result["exact"][1] > 1000 * best


@pytest.mark.parametrize("qtype", [INT8_AFFINE, INT8_SYM])
def test_each_mode_on_clean_gaussian_data(qtype):
    batches = _issue_batches(glitch=None)
    out = {m: _observe(lambda m=m: mq.HistogramObserver(mode=m), batches, qtype).calculate_qparams() for m in MODES}
    for a, b in zip(out["mse"], out["exact"]):  # nothing isolated: mse is exactly the exact search
        assert torch.equal(a, b)
    errs = {m: _test_mse(*qp, qtype) for m, qp in out.items()}
    assert errs["mse"] == min(errs.values())
    assert errs["percentile"] < 1.1 * errs["mse"] and errs["entropy"] < 1.1 * errs["mse"]
    # step sizes: the MSE-optimal clip of N(0,1) at 8 bits is about +-3.9, entropy keeps a little more
    assert float(out["mse"][0]) == pytest.approx(7.8 / (qtype.qmax - qtype.qmin), rel=0.03)
    assert float(out["mse"][0]) < float(out["entropy"][0]) < 1.15 * float(out["mse"][0])


# ---- mse: what counts as isolated -------------------------------------------------------------------------------
def _with_extremes(values, n=20_000, seed=3):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return [x, torch.tensor(values, dtype=torch.float32)]


def _same(batches, qtype=INT8_AFFINE):
    mse = _observe(mq.HistogramObserver, batches, qtype).calculate_qparams()
    exact = _observe(lambda: mq.HistogramObserver(mode="exact"), batches, qtype).calculate_qparams()
    return all(torch.equal(a, b) for a, b in zip(mse, exact)), mse


@pytest.mark.parametrize("qtype", [INT8_AFFINE, INT8_SYM])
def test_mse_sets_aside_up_to_four_isolated_values_per_side(qtype):
    same, (scale, zero) = _same(_with_extremes([60.0, 45.0, 45.0, -80.0]), qtype)
    assert not same
    lo, hi = (qtype.qmin - int(zero)) * float(scale), (qtype.qmax - int(zero)) * float(scale)
    assert -4.7 < lo < -3.0 and 3.0 < hi < 4.7


@pytest.mark.parametrize("values", [
    [45.0] * 5,                   # five values: more than max_isolated=4, treated as a real population
    [14.0, 15.0],                 # only about 3.5x the bulk's extent (~4.1): not isolated (isolation=4)
    [45.0] * 21,                  # more than 0.1% of the values
])
def test_mse_equals_exact_when_the_extremes_are_not_isolated(values):
    assert _same(_with_extremes(values))[0]


def test_mse_on_a_tiny_calibration_set_sets_nothing_aside():
    # 0.1% of 9 values is less than one value: with so little data no extreme can be called a glitch
    same, (scale, zero) = _same([torch.tensor([0.1, -0.2, 0.3, 0.05, -0.1, 0.2, 0.0, -0.3, 9.0])])
    assert same and (255 - int(zero)) * float(scale) > 8.0


def test_mse_isolation_parameters_are_honoured_and_validated():
    batches = _with_extremes([45.0] * 5)
    wide = _observe(lambda: mq.HistogramObserver(max_isolated=5), batches).calculate_qparams()
    assert (255 - int(wide[1])) * float(wide[0]) < 4.7  # five values may now be set aside
    strict = _observe(lambda: mq.HistogramObserver(isolation=20.0), _with_extremes([45.0])).calculate_qparams()
    assert (255 - int(strict[1])) * float(strict[0]) > 40  # 45 / ~4 is under 20: kept
    for bad in (dict(mode="kl"), dict(percentile=50.0), dict(percentile=100.5), dict(max_isolated=-1),
                dict(isolation=1.0)):
        with pytest.raises(mq.ConfigError):
            mq.HistogramObserver(**bad)
    with pytest.raises(mq.ConfigError, match="'mse', 'percentile', 'entropy', 'exact'"):
        mq.HistogramObserver(mode="l2")
    assert "mode='percentile', percentile=99.9" in repr(mq.HistogramObserver(mode="percentile", percentile=99.9))


def test_percentile_100_is_the_observed_min_and_max():
    batches = _with_extremes([60.0, -7.0])
    scale, zero = _observe(lambda: mq.HistogramObserver(mode="percentile", percentile=100.0), batches) \
        .calculate_qparams()
    ref = F.qparams_from_minmax(torch.tensor(-7.0), torch.tensor(60.0), INT8_AFFINE)
    assert float(scale) == pytest.approx(float(ref[0]), rel=1e-12) and int(zero) == int(ref[1])


# ---- invariants over shapes, dtypes, modes ----------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       mode=st.sampled_from(MODES), symmetric=st.booleans(), spread=st.floats(1e-3, 1e3),
       shift=st.floats(-5.0, 5.0), split=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_qparams_are_valid_and_independent_of_batching(shape, dtype, mode, symmetric, spread, shift, split, seed):
    qtype = mq.QType(8, symmetric=symmetric)
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * spread + shift).to(dtype)
    whole = _observe(lambda: mq.HistogramObserver(bins=256, mode=mode), [x], qtype)
    parts = _observe(lambda: mq.HistogramObserver(bins=256, mode=mode), torch.chunk(x.reshape(-1), split), qtype)
    scale, zero = whole.calculate_qparams()
    for a, b in zip((scale, zero), parts.calculate_qparams()):
        assert torch.equal(a, b)  # the histogram does not depend on how the values were batched
    assert scale.dtype == torch.float64 and zero.dtype == torch.int64
    assert float(scale) > 0 and qtype.qmin <= int(zero) <= qtype.qmax
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if symmetric:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    slack = float(scale) + whole.bin_width
    assert (qtype.qmin - int(zero)) * float(scale) >= lo - slack  # never wider than the data (and 0)
    assert (qtype.qmax - int(zero)) * float(scale) <= hi + slack
    if dtype in (torch.float16, torch.bfloat16):  # observed in float32, where these values are exact
        as_float = _observe(lambda: mq.HistogramObserver(bins=256, mode=mode), [x.float()], qtype)
        for a, b in zip((scale, zero), as_float.calculate_qparams()):
            assert torch.equal(a, b)


# ---- state: state_dict, mode-independent buffers, merge across ranks ---------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trip_per_mode_and_state_is_mode_independent(mode):
    batches = _issue_batches()[:4]
    src = _observe(lambda: mq.HistogramObserver(mode=mode), batches)
    fresh = mq.HistogramObserver(mode=mode).configure(INT8_AFFINE)
    fresh.load_state_dict(src.state_dict())
    for a, b in zip(src.calculate_qparams(), fresh.calculate_qparams()):
        assert torch.equal(a, b)
    other = "exact" if mode != "exact" else "mse"  # a state saved under one mode serves any other mode
    reread = mq.HistogramObserver(mode=mode).configure(INT8_AFFINE)
    reread.load_state_dict(_observe(lambda: mq.HistogramObserver(mode=other), batches).state_dict())
    for a, b in zip(src.calculate_qparams(), reread.calculate_qparams()):
        assert torch.equal(a, b)


def _sync_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        obs = _observe(mq.HistogramObserver, _issue_batches()[rank::world])  # the glitch is in rank 1's shard
        obs.sync()
        torch.save(obs.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_synced_histograms_give_every_mode_the_single_process_qparams(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sync_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for mode in MODES:
        single = _observe(lambda m=mode: mq.HistogramObserver(mode=m), _issue_batches())
        for state in states:
            synced = mq.HistogramObserver(mode=mode).configure(INT8_AFFINE)
            synced.load_state_dict(state)
            assert torch.equal(synced.histogram, single.histogram)
            for a, b in zip(synced.calculate_qparams(), single.calculate_qparams()):
                assert torch.equal(a, b), mode
