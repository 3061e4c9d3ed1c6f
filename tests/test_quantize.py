"""``quantize_`` / ``dequantize_``: what is swapped, what is preserved, what is reported, what is refused."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import monoquant as mq

ALL = mq.SkipRules.none()


def sqnr(ref, y):
    return mq.functional.sqnr(ref, y)


def cfg(spec=None, **kw):
    return mq.QuantConfig(spec or mq.Int8(), skip=kw.pop("skip", ALL), **kw)


class HFBlock(nn.Module):
    """Hugging Face-style block: plain nn.Linear inside custom modules, read through attributes."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(d, d), "k_proj": nn.Linear(d, d), "v_proj": nn.Linear(d, d),
                                   "o_proj": nn.Linear(d, d)})
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = (self.attn[n](h) for n in ("q_proj", "k_proj", "v_proj"))
        a = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v
        x = x + self.attn["o_proj"](a)
        return x + self.mlp(x)


class HFModel(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 64, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([HFBlock(d) for _ in range(2)])
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def test_hf_style_model_swaps_in_place_and_tied_embedding_head_stays_float():
    model = HFModel().eval()
    ref = copy.deepcopy(model)
    report = mq.quantize_(model, cfg(mq.Int4(group_size=32)))
    assert report.skipped == {"lm_head": "weight is tied to embed (Embedding), which stays float"}
    assert len(report.quantized) == 12
    assert not any(type(m) is nn.Linear for m in model.layers.modules())
    assert isinstance(model.layers[1].attn["o_proj"], mq.QuantLinear) and isinstance(model.layers[0].mlp[2],
                                                                                        mq.QuantLinear)
    assert model.lm_head.weight is model.embed.weight
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert sqnr(ref(ids), model(ids)) > 20


def test_names_hooks_flags_device_dtype_preserved():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 32), nn.Dropout(0.5)))
    model.train()
    model[2].eval()
    calls: list[str] = []
    h_fwd = model[0].register_forward_hook(lambda m, i, o: calls.append("fwd0"))
    model[2][0].register_forward_pre_hook(lambda m, i: calls.append("pre20"))
    model[2].register_forward_hook(lambda m, i, o: calls.append("parent"))  # another module's hook
    names_before = [n for n, _ in model.named_modules()]
    mq.quantize_(model, cfg())
    assert [n for n, _ in model.named_modules()] == names_before
    assert isinstance(model[0], mq.QuantLinear) and isinstance(model[2][0], mq.QuantLinear)
    assert model[0].training and not model[2][0].training and model.training and not model[2].training
    assert model[0].bias.dtype == torch.float32 and model[0].qweight.device.type == "cpu"
    with torch.no_grad():
        model(torch.randn(2, 32))
    assert calls == ["fwd0", "pre20", "parent"]
    h_fwd.remove()
    calls.clear()
    with torch.no_grad():
        model(torch.randn(2, 32))
    assert calls == ["pre20", "parent"]


def test_module_used_twice_and_in_two_parents():
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    other = nn.Module()
    other.a, other.b = nn.Sequential(shared), shared
    holder = nn.ModuleDict({"seq": model, "other": other})
    report = mq.quantize_(holder, cfg())
    assert [r.name for r in report.layers] == ["seq.0"]
    q = holder["seq"][0]
    assert isinstance(q, mq.QuantLinear) and holder["seq"][2] is q and other.a[0] is q and other.b is q


def test_tied_linears_share_quantized_buffers():
    a, b = nn.Linear(64, 32), nn.Linear(64, 32)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    mq.quantize_(model, cfg(mq.Int4(group_size=32)))
    assert model[0].qweight is model[1].qweight and model[0].scale is model[1].scale
    assert model[0].bias is not model[1].bias
    assert torch.equal(model[0].dequantize_weight(), model[1].dequantize_weight())
    mq.dequantize_(model)
    assert type(model[1]) is nn.Linear and model[0].weight is model[1].weight  # tied again


def test_nested_containers():
    model = nn.Sequential(nn.ModuleList([nn.Linear(8, 8)]), nn.ModuleDict({"k": nn.Sequential(nn.Conv1d(8, 8, 1))}))
    report = mq.quantize_(model, cfg())
    assert [r.name for r in report.quantized] == ["0.0", "1.k.0"]
    assert isinstance(model[0][0], mq.QuantLinear) and isinstance(model[1]["k"][0], mq.QuantConv1d)


def _encoder(training: bool):
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train(training)


@pytest.mark.parametrize("training", [False, True], ids=["eval-fast-path", "training-path"])
@pytest.mark.parametrize("spec", [mq.Int8(), mq.Int4(group_size=32)], ids=["int8", "int4"])
def test_transformer_encoder_runs_after_quantize(training, spec):
    model = _encoder(training)
    ref = copy.deepcopy(model)
    report = mq.quantize_(model, cfg(spec))
    reason = mq.quantize.MHA_OUT_PROJ_REASON
    assert report.skipped == {"layers.0.self_attn.out_proj": reason, "layers.1.self_attn.out_proj": reason}
    assert [r.name for r in report.quantized] == ["layers.0.linear1", "layers.0.linear2", "layers.1.linear1",
                                                  "layers.1.linear2"]
    calls = []
    handles = [lin.register_forward_hook(lambda m, i, o: calls.append(m.last_kernel))
               for layer in model.layers for lin in (layer.linear1, layer.linear2)]
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        want = ref(x)
        got = model(x)
    with torch.inference_mode():
        got_inf = model(x)
    assert sqnr(want, got) > (35 if isinstance(spec, mq.Int8) else 20)
    assert torch.allclose(got, got_inf)
    # the fused eval fast path would read .weight and never call the layers: they must run their own kernels
    assert len(calls) == 8 and all(k in mq.kernels.KERNELS for k in calls)
    assert [layer.activation_relu_or_gelu for layer in model.layers] == [0, 0]
    for handle in handles:
        handle.remove()
    mq.dequantize_(model)
    assert [layer.activation_relu_or_gelu for layer in model.layers] == [1, 1]  # relu: the fast path is back
    with torch.no_grad():
        assert sqnr(got, model(x)) > 35


def test_multihead_attention_runs_after_quantize():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(64, 4, batch_first=True)
            self.proj = nn.Linear(64, 64)

        def forward(self, x):
            return self.proj(self.mha(x, x, x, need_weights=False)[0])

    model = Net().eval()
    ref = copy.deepcopy(model)
    report = mq.quantize_(model, cfg())
    assert report.skipped == {"mha.out_proj": mq.quantize.MHA_OUT_PROJ_REASON}
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        assert sqnr(ref(x), model(x)) > 35


def test_state_dict_into_fresh_twin_gives_identical_outputs():
    torch.manual_seed(1)
    src = nn.Sequential(nn.Linear(64, 48), nn.Identity(), nn.Linear(48, 32))
    dst = nn.Sequential(nn.Linear(64, 48), nn.Identity(), nn.Linear(48, 32))
    mq.quantize_(src, cfg(mq.Int4(group_size=32)))
    mq.quantize_(dst, cfg(mq.Int4(group_size=32)))
    x = torch.randn(3, 64)
    with torch.no_grad():
        dst(x)  # fills dst's kernel caches, which loading must drop
        dst.load_state_dict(src.state_dict())
        assert torch.equal(dst(x), src(x))
    conv_src, conv_dst = nn.Sequential(nn.Conv2d(8, 16, 3)), nn.Sequential(nn.Conv2d(8, 16, 3))
    for m in (conv_src, conv_dst):
        mq.quantize_(m, cfg(mq.Int8(symmetric=False)))
    conv_dst.load_state_dict(conv_src.state_dict())
    xc = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        assert torch.equal(conv_dst(xc), conv_src(xc))


def test_deepcopy_save_and_to_dtype_keep_float32_scales():
    model = nn.Sequential(nn.Linear(64, 32), nn.Conv2d(4, 8, 4))
    assert len(mq.quantize_(model, cfg(mq.Int4(group_size=32, symmetric=True))).quantized) == 2
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (twin, loaded):
        for (n1, b1), (n2, b2) in zip(model.named_buffers(), m.named_buffers()):
            assert n1 == n2 and torch.equal(b1, b2) and b1.dtype == b2.dtype
    model.to(torch.float16)
    assert model[0].scale.dtype == torch.float32 and model[0].qweight.dtype == torch.uint8
    assert model[0].bias.dtype == torch.float16 and model[0].float_dtype == torch.float16
    model.double()
    assert model[1].scale.dtype == torch.float32
    with torch.no_grad():
        y = model[0](torch.randn(2, 64, dtype=torch.float64))
    assert y.dtype == torch.float64
    assert model[0].dequantize_weight().dtype == torch.float64


def test_no_grad_and_inference_mode_agree_and_input_gradients_flow():
    lin = nn.Linear(64, 48)
    for spec in (mq.Int8(), mq.Int4(group_size=32), mq.BFloat16()):
        q = mq.QuantLinear.from_float(lin, spec)
        x = torch.randn(3, 64)
        with torch.no_grad():
            a = q(x)
        with torch.inference_mode():
            b = q(x)
        assert torch.equal(a, b)
        xg = x.clone().requires_grad_()
        y = q(xg)
        assert y.requires_grad and not any(t.requires_grad for t in q.buffers())
        y.sum().backward()
        want = q.dequantize_weight(torch.float64).sum(0)
        assert torch.allclose(xg.grad.double(), want.expand(3, -1), rtol=1e-2, atol=1e-2)
    conv = mq.QuantConv2d.from_float(nn.Conv2d(3, 4, 3), mq.Int8())
    xc = torch.randn(1, 3, 5, 5, requires_grad=True)
    conv(xc).sum().backward()
    assert xc.grad is not None and xc.grad.abs().sum() > 0


def test_dequantize_restores_float_modules():
    model = nn.Sequential(nn.Linear(64, 32), nn.Conv2d(4, 8, 3, padding="same", padding_mode="reflect"))
    model[0].train(False)
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    mq.quantize_(model, cfg(mq.Int4(group_size=32)))
    expected = model[0].dequantize_weight()
    assert mq.dequantize_(model) is model
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Conv2d
    assert torch.equal(model[0].weight, expected) and not model[0].training
    assert isinstance(model[0].weight, nn.Parameter) and model[0].weight.requires_grad
    assert model[1].padding_mode == "reflect"
    model[0](torch.randn(1, 64))
    assert seen == ["Linear"]  # the hook moved back with the layer
    with pytest.raises(mq.ModelError):
        mq.dequantize_([model])


def test_errors_are_clear():
    with pytest.raises(mq.ConfigError, match="bits must be an integer from 2 to 8"):
        mq.QType(9, symmetric=True)
    for g in (0, -32):
        with pytest.raises(mq.ConfigError, match="group size must be a positive integer"):
            mq.Int4(group_size=g)
    with pytest.raises(mq.ModelError, match=r"expected a torch\.nn\.Module, got dict"):
        mq.quantize_({"w": torch.zeros(2)}, mq.Int8())
    with pytest.raises(mq.ConfigError, match=r"expected mq\.QuantConfig"):
        mq.quantize_(nn.Linear(2, 2), 8)
    with pytest.raises(mq.ConfigError, match=r"no weight format is called 'int3'"):
        mq.quantize_(nn.Linear(2, 2), "int3")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_names_layer_and_changes_nothing(bad):
    model = nn.Sequential(nn.Linear(32, 32), nn.Sequential(nn.Linear(32, 32)))
    with torch.no_grad():
        model[1][0].weight[3, 4] = bad
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(mq.NonFiniteWeightError, match=r"layer '1\.0' has NaN or Inf"):
        mq.quantize_(model, cfg())
    assert type(model[0]) is nn.Linear and type(model[1][0]) is nn.Linear
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.allclose(before[k], after[k], rtol=0, atol=0, equal_nan=True)
                                                 for k in before)


def test_meta_device_model_gets_config_error_and_changes_nothing():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    with pytest.raises(mq.ConfigError, match=r"layer '0' is on the meta device .*nothing was changed.*mq\.load"):
        mq.quantize_(model, cfg())
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]


def test_quantizing_a_quantized_model_again_is_refused_and_changes_nothing():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    mq.quantize_(model, cfg(mq.Int4(group_size=32)))
    first, state = model[0], {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mq.AlreadyQuantizedError, match=r"already holds 2 quantized layer\(s\) \(e\.g\. 0: "
                       r"int4-affine-g32\); nothing was changed.*mq\.dequantize_\(model\)"):
        mq.quantize_(model, cfg(mq.Int8()))
    assert model[0] is first and model[0].scheme() == "int4-affine-g32"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_quantizing_the_float_rest_of_a_partly_quantized_model_says_what_it_left():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model[0] = mq.QuantLinear.from_float(model[0], mq.Int4(group_size=32))
    with pytest.warns(UserWarning, match=r"1 layer\(s\) were already quantized and were left as they are \(e\.g\. "
                      r"0: int4-affine-g32\); .*run mq\.dequantize_\(model\) first"):
        report = mq.quantize_(model, cfg(mq.Int8()))
    assert report.skipped == {"0": "already quantized (int4-affine-g32)"}
    assert [r.name for r in report.quantized] == ["1"] and model[1].scheme() == "int8-sym-channel"


def test_nothing_to_quantize_warns():
    with pytest.warns(mq.NothingQuantizedWarning, match="no layer to quantize in Sequential"):
        report = mq.quantize_(nn.Sequential(nn.ReLU()), mq.Int8())
    assert report.layers == []
    with pytest.warns(mq.NothingQuantizedWarning, match="1 candidates, all skipped"):
        report = mq.quantize_(nn.Sequential(nn.Linear(4, 4)), mq.Int8())  # defaults skip tiny layers
    assert report.skipped == {"0": "too small: 16 weights < min_params=1024"}


def test_report_rows_bytes_kernels_and_sqnr():
    model = nn.Sequential(nn.Linear(256, 64), nn.Conv2d(16, 16, (2, 4)))
    report = mq.quantize_(model, cfg(mq.Int4(group_size=128)))
    lin, conv = report.layers
    assert (lin.name, lin.module_type, lin.scheme) == ("0", "Linear", "int4-affine-g128")
    assert lin.bytes_before == (256 * 64 + 64) * 4
    # codes, scales, zero points, bias, and the float32 weight a layer under the tuning threshold keeps
    assert lin.bytes_after == 64 * 128 + 64 * 2 * 4 + 64 * 2 + 64 * 4 + 256 * 64 * 4
    assert lin.kernel.startswith("int4pack_cpu/")
    assert conv.scheme == "int4-affine-g128" and conv.kernel == "dequant_conv (static guess, not run yet)"
    for row in (lin, conv):
        assert 20 < row.weight_sqnr_db < 40


def test_bare_spec_means_weight_only_with_default_rules():
    model = nn.Sequential(nn.Linear(64, 64))
    report = mq.quantize_(model, mq.Int8())
    assert isinstance(model[0], mq.QuantLinear) and report.unmatched_rules == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_model_dtype_is_preserved(dtype):
    model = nn.Sequential(nn.Linear(64, 64), nn.Conv1d(64, 32, 1)).to(dtype)
    ref = copy.deepcopy(model)
    mq.quantize_(model, cfg(mq.Int4(group_size=32)))
    assert model[0].bias.dtype == dtype and model[0].float_dtype == dtype and model[0].scale.dtype == torch.float32
    assert model[0].dequantize_weight().dtype == dtype and model[0].to_float().weight.dtype == dtype
    x = torch.randn(3, 64, 64, dtype=dtype)  # Linear over the last dim, then Conv1d over 64 channels
    with torch.no_grad():
        y = model(x)
        assert y.dtype == dtype
        assert sqnr(ref(x), y) > 15


def test_quantized_under_inference_mode_still_works_outside_it():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.inference_mode():
        mq.quantize_(model, cfg(mq.Int4(group_size=32)))
    x = torch.randn(2, 64, requires_grad=True)
    y = model(x)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (2, 64)
    twin = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    mq.quantize_(twin, cfg(mq.Int4(group_size=32)))
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
