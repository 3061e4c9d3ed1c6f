import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import monoquant as mq
from monoquant import schemes
from monoquant.gptq import (
    DEFAULT_OPTIONS,
    GPTQOptions,
    GPTQState,
    gptq_quantize,
    output_sqnr,
)

SPECS = [
    (mq.Int4(group_size=32), 32),
    (mq.Int4(group_size=128), 128),
    (mq.Int4(group_size=64, symmetric=True), 64),
    (mq.Int8(), None),
    (mq.Int8(granularity="tensor"), None),
]


def _correlated_inputs(rows=2048, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scales = torch.linspace(0.2, 3.0, k)
    return (torch.randn(rows, k, generator=g) @ mix) * scales  # full rank, correlated, uneven columns


def _output_err(spec, g, stored, w, x):
    deq = schemes.dequantize_weight(spec, stored, w.shape[1], g, torch.float64)
    return float((x.double() @ (w.double() - deq).T).pow(2).mean())


@pytest.mark.parametrize(("spec", "g"), SPECS)
def test_identity_hessian_equals_round_to_nearest_exactly(spec, g):
    w = torch.randn(48, 256)
    rtn = schemes.quantize_weight(spec, w, g)
    for act_order in (False, True):
        got = gptq_quantize(spec, w, torch.eye(256), g, act_order=act_order)
        for a, b in zip(got, rtn):
            assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize(("spec", "g"), SPECS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reduces_layer_output_error_on_full_rank_inputs(spec, g, act_order):
    w = torch.randn(64, 256)
    x = _correlated_inputs()
    h = x.T @ x / x.shape[0]
    gptq = gptq_quantize(spec, w, h, g, act_order=act_order)
    rtn = schemes.quantize_weight(spec, w, g)
    # stored layout unchanged: same shapes and dtypes as round-to-nearest
    assert [(t.shape, t.dtype) for t in gptq if t is not None] == [(t.shape, t.dtype) for t in rtn if t is not None]
    err_gptq, err_rtn = _output_err(spec, g, gptq, w, x), _output_err(spec, g, rtn, w, x)
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_dead_inputs_are_rounded_to_nearest_and_spread_no_error():
    w = torch.randn(32, 128)
    x = _correlated_inputs(512, 128)
    x[:, [5, 77]] = 0.0
    h = x.T @ x
    spec = mq.Int4(group_size=32)
    got = gptq_quantize(spec, w, h, 32, act_order=True, static_groups=True)  # qparams comparable to RTN
    rtn = schemes.quantize_weight(spec, w, 32)
    deq = schemes.dequantize_weight(spec, got, 128, 32)
    deq_rtn = schemes.dequantize_weight(spec, rtn, 128, 32)
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[:, [5, 77]], deq_rtn[:, [5, 77]])


def test_hessian_observer_averages_and_float64_agrees():
    x1, x2 = torch.randn(10, 16), torch.randn(3, 4, 16)
    obs = mq.HessianObserver(16)
    obs(x1)
    obs(x2)
    flat = torch.cat([x1, x2.reshape(-1, 16)])
    torch.testing.assert_close(obs.hessian(), flat.T @ flat / 22)
    obs64 = mq.HessianObserver(16, torch.float64)
    obs64(x1)
    obs64(x2)
    torch.testing.assert_close(obs64.hessian().float(), obs.hessian(), rtol=1e-5, atol=1e-6)
    with pytest.raises(mq.ConfigError, match="not qparams"):
        obs.calculate_qparams()


def test_output_sqnr_from_hessian_equals_measured():
    w, x = torch.randn(24, 64), torch.randn(300, 64)
    spec = mq.Int4(group_size=32)
    stored = gptq_quantize(spec, w, x.T @ x / 300, 32)
    deq = schemes.dequantize_weight(spec, stored, 64, 32, torch.float64)
    measured = mq.functional.sqnr(x.double() @ w.double().T, x.double() @ deq.T)
    assert output_sqnr(w, deq, x.T @ x / 300) == pytest.approx(measured, abs=1e-3)


def test_quantize_with_gptq_end_to_end_and_pending_forward_uses_float_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32))
    w0 = model[0].weight.detach().clone()
    x = torch.randn(8, 128)
    ref = model(x)
    cfg = mq.QuantConfig(mq.Int4(group_size=32, method="gptq"), skip=mq.SkipRules.none())
    report = mq.quantize_(model, cfg)
    assert mq.needs_calibration(model) and isinstance(model[0].gptq, GPTQState)
    out = model(x)
    assert model[0].last_kernel == "gptq_pending"
    torch.testing.assert_close(out, ref)  # float weights until freeze
    assert [r.method for r in report.quantized] == ["gptq", "gptq"]
    with pytest.raises(mq.CalibrationError, match="'0'"):
        mq.freeze(model)
    mq.calibrate_with(model, [torch.randn(16, 128) for _ in range(8)])
    done = mq.freeze(model)
    assert [d.name for d in done] == ["0", "2"] and all(d.output_sqnr_db > 15 for d in done)
    assert model[0].gptq is None and not mq.needs_calibration(model)
    assert "gptq.weight" not in " ".join(model.state_dict())
    assert float((model[0].dequantize_weight() - w0).abs().max()) < 0.2


def test_dequantize_before_freeze_gives_back_the_float_weight_the_layer_computes_with():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    weights = [m.weight.detach().clone() for m in model]
    x = torch.randn(4, 64)
    mq.quantize_(model, mq.QuantConfig(mq.Int8(method="gptq"), skip=mq.SkipRules.none()))
    pending = model(x)
    mq.dequantize_(model)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]
    assert all(torch.equal(m.weight, w) for m, w in zip(model, weights))
    assert torch.equal(model(x), pending)


def test_gptq_report_covers_convolutions():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 16))
    data = [torch.randn(4, 3, 6, 6) for _ in range(4)]
    report = mq.quantize_(model, mq.QuantConfig(mq.Int4(group_size=32, method="gptq"), skip=mq.SkipRules.none()),
                          calibration_data=data, on_failure="ignore")
    rows = {r.name: r for r in report.layers}
    assert [rows[n].method for n in ("0", "2")] == ["gptq", "gptq"]
    assert all(rows[n].output_sqnr_db is not None for n in ("0", "2"))
    assert rows["0"].kernel == "dequant_conv (static guess, not run yet)" and rows["2"].kernel != "gptq_pending"
    assert rows["0"].bytes_after == model[0].storage_bytes()


def test_static_groups_keep_the_round_to_nearest_qparams_and_layout():
    w, x = torch.randn(32, 256), _correlated_inputs(1024, 256)
    h = x.T @ x / x.shape[0]
    spec = mq.Int4(group_size=32, method="gptq", observer=mq.MinMaxObserver())
    rtn = schemes.quantize_weight(spec, w, 32)
    for act_order in (False, True):
        got = gptq_quantize(spec, w, h, 32, act_order=act_order, static_groups=True)
        # group g's qparams are those of the original weight's columns g*32..g*32+31, before any permutation
        assert torch.equal(got.scale, rtn.scale) and torch.equal(got.zero_point, rtn.zero_point)
        assert got.qweight.shape == rtn.qweight.shape and got.qweight.dtype == rtn.qweight.dtype
        assert _output_err(spec, 32, got, w, x) < 0.8 * _output_err(spec, 32, rtn, w, x)


def test_static_groups_with_act_order_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32))
    spec = mq.Int4(group_size=32, method="gptq", act_order=True, static_groups=True)
    mq.quantize_(model, mq.QuantConfig(spec, skip=mq.SkipRules.none()),
                 calibration_data=[torch.randn(16, 128) for _ in range(4)])
    assert model[0].gptq is None
    mq.save(model, tmp_path / "m.safetensors")
    fresh = mq.load(nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32)), tmp_path / "m.safetensors")
    x = torch.randn(5, 128)
    assert torch.equal(fresh(x), model(x))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_gptq_defaults_are_act_order_static_groups_mse_ranges_refit_one_pass_and_explicit_fields_win():
    assert GPTQOptions(act_order=True, damping=0.01, static_groups=True, refit_scales=True,
                       sequential=False, output_aware=True) == DEFAULT_OPTIONS
    assert GPTQOptions.of(mq.Int4(method="gptq")) == DEFAULT_OPTIONS
    assert GPTQOptions.of(mq.Int4(method="gptq", act_order=False, static_groups=True, damping=0.05,
                                  refit_scales=False, sequential=True, output_aware=False)) == GPTQOptions(
        act_order=False, damping=0.05, static_groups=True, refit_scales=False, sequential=True, output_aware=False)
    assert not GPTQOptions.of(mq.Int8(method="gptq", act_order=False)).act_order
    assert isinstance(mq.Int4(method="gptq").make_observer(), mq.MSEObserver)
    assert type(mq.Int4(method="gptq", observer=mq.MinMaxObserver()).make_observer()) is mq.MinMaxObserver
    assert type(mq.Int4().make_observer()) is mq.MinMaxObserver  # round-to-nearest keeps min/max


def test_grouped_hessian_runs_each_row_block_with_its_own_hessian():
    w = torch.randn(8, 64)
    xa, xb = _correlated_inputs(512, 64, seed=1), _correlated_inputs(512, 64, seed=2) * 3
    ha, hb = xa.T @ xa / 512, xb.T @ xb / 512
    for spec, g in ((mq.Int4(group_size=32), 32), (mq.Int8(), None)):
        both = gptq_quantize(spec, w, torch.stack([ha, hb]), g, act_order=True)
        top = gptq_quantize(spec, w[:4], ha, g, act_order=True)
        bottom = gptq_quantize(spec, w[4:], hb, g, act_order=True)
        for t, a, b in zip(both, top, bottom):
            assert (t is None and a is None) or torch.equal(t, torch.cat([a, b]))
    # per-tensor INT8: one scale for the whole weight, not one per block
    both = gptq_quantize(mq.Int8(granularity="tensor"), w, torch.stack([ha, hb]), None)
    assert both.scale.shape == () and torch.equal(both.scale, schemes.quantize_weight(mq.Int8(granularity="tensor"),
                                                                                      w).scale)
    deq = schemes.dequantize_weight(mq.Int8(), gptq_quantize(mq.Int8(), w, torch.stack([ha, hb]), None), 64, None,
                                    torch.float64)
    measured = mq.functional.sqnr(torch.cat([xa.double() @ w[:4].double().T, xb.double() @ w[4:].double().T], 1),
                                  torch.cat([xa.double() @ deq[:4].T, xb.double() @ deq[4:].T], 1))
    assert output_sqnr(w, deq, torch.stack([ha, hb])) == pytest.approx(measured, abs=1e-3)


def test_config_validation():
    with pytest.raises(mq.ConfigError, match="act_order"):
        mq.Int4(act_order=True)
    with pytest.raises(mq.ConfigError, match="damping"):
        mq.Int4(method="gptq", damping=0.0)
    with pytest.raises(mq.ConfigError, match="static_groups"):
        mq.Int4(static_groups=True)
    w = torch.randn(4, 8)
    with pytest.raises(mq.ConfigError, match="does not match"):
        gptq_quantize(mq.Int8(), w, torch.eye(7), None)
    with pytest.raises(mq.ConfigError, match="does not match"):
        gptq_quantize(mq.Int8(), w, torch.eye(8).expand(3, 8, 8), None)  # 3 blocks do not divide 4 rows
    with pytest.raises(mq.ConfigError, match=r"method='gptq' is for weights"):
        mq.QuantConfig(mq.Int8(), activations=mq.Int8(method="gptq"))
    with pytest.raises(mq.ConfigError, match=r"activations=mq\.Int8\(dynamic=True\)"):
        mq.QuantConfig(mq.Int8(dynamic=True))


def test_linear_output_matches_stored_weights_after_gptq():
    lin = nn.Linear(64, 16)
    model = nn.Sequential(lin)
    data = [torch.randn(8, 64) for _ in range(4)]
    mq.quantize_(model, mq.QuantConfig(mq.Int8(method="gptq"), skip=mq.SkipRules.none()), calibration_data=data)
    q = model[0]
    x = torch.randn(3, 64)
    torch.testing.assert_close(q(x), TF.linear(x, q.dequantize_weight(), q.bias), rtol=2e-2, atol=2e-2)


def test_transformer_encoder_layers_are_calibrated_despite_the_fused_fast_path():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2,
                                enable_nested_tensor=False).eval()
    x = torch.randn(4, 10, 64)
    with torch.no_grad():
        ref = enc(x)
    report = mq.quantize_(enc, mq.QuantConfig(mq.Int4(group_size=32, method="gptq"), skip=mq.SkipRules.none()))
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref)  # pending layers compute with float weights on every path
    mq.calibrate_with(enc, [x])
    assert torch.backends.mha.get_fastpath_enabled()
    done = mq.freeze(enc)
    assert sorted(d.name for d in done) == sorted(r.name for r in report.quantized)
    assert {r.name.rsplit(".", 1)[1] for r in report.quantized} == {"linear1", "linear2"}
