"""QuantConvTranspose2d (groups=1 and grouped): forward, GPTQ patches, GPTQ, dequantize_, save/load, the CLI."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import monoquant as mq
from monoquant import cli
from monoquant.nn import QuantConvTranspose2d


class Up(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(16, 32, 3, stride=2, padding=1, output_padding=1, groups=groups)
        self.head = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        return self.head(torch.relu(self.up(x)))


def rel_err(y, ref):
    return float((y - ref).norm() / ref.norm())


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("spec", [mq.Int8(), mq.Int4(group_size=36)], ids=lambda s: s.describe())
def test_forward_is_conv_transpose_with_the_dequantized_weight(groups, spec):
    torch.manual_seed(0)
    m = nn.ConvTranspose2d(16, 32, 3, stride=2, padding=1, output_padding=1, groups=groups)
    q = QuantConvTranspose2d.from_float(m, spec)
    assert q.weight.shape == m.weight.shape and q.weight_shape == (32, 16 // groups, 3, 3)
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        y = q(x)
        assert torch.equal(y, F.conv_transpose2d(x, q.weight, m.bias, 2, 1, 1, groups))
        assert rel_err(y, m(x)) < (0.02 if spec.bits == 8 else 0.2)
        assert torch.allclose(q(x[0]), y[0], atol=1e-6)  # unbatched input
        assert q(x, output_size=[12, 12]).shape == m(x, output_size=[12, 12]).shape == (2, 32, 12, 12)
    assert q.last_kernel == "dequant_conv_transpose" and "output_padding=(1, 1)" in repr(q)


@settings(max_examples=40, deadline=None)
@given(stride=st.integers(1, 3), padding=st.integers(0, 2), dilation=st.integers(1, 2), kernel=st.integers(1, 4),
       groups=st.sampled_from([1, 2]), extra=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_gptq_patches_times_the_stored_weight_are_the_layer_output(stride, padding, dilation, kernel, groups, extra,
                                                                    seed):
    output_padding = extra % max(stride, dilation)  # PyTorch's rule: smaller than stride or dilation
    torch.manual_seed(seed)
    m = nn.ConvTranspose2d(4, 6, kernel, stride, padding, output_padding, groups, bias=False, dilation=dilation)
    x = torch.randn(2, 4, 5, 4)
    try:
        y = m.double()(x.double())  # [B, O, H, W]
    except RuntimeError:  # padding larger than the output: not a layer PyTorch can run
        assume(False)
    q = QuantConvTranspose2d(4, 6, kernel, stride, padding, output_padding, groups, False, dilation)
    x = x.double()
    patches = q.gptq_geometry().patches(x)  # [G, rows, K]
    w2d = QuantConvTranspose2d.float_weight(m).reshape(6, -1)
    og = 6 // groups
    got = torch.stack([patches[g] @ w2d[g * og:(g + 1) * og].T for g in range(groups)])
    b, _, h, w = y.shape
    want = y.reshape(b, groups, og, h * w).permute(1, 0, 3, 2).reshape(groups, -1, og)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("groups", [1, 4])
def test_gptq_calibrates_it_and_beats_round_to_nearest_on_its_inputs(groups):
    torch.manual_seed(0)
    data = [torch.randn(8, 16, 6, 6) for _ in range(4)]
    model, rtn = Up(groups).eval(), Up(groups).eval()
    rtn.load_state_dict(model.state_dict())
    ref = Up(groups).eval()
    ref.load_state_dict(model.state_dict())
    skip = mq.SkipRules(exclude=["head"], min_params=0)
    mq.quantize_(model, mq.QuantConfig(mq.Int4(group_size=36, method="gptq"), skip=skip), calibration_data=data)
    mq.quantize_(rtn, mq.QuantConfig(mq.Int4(group_size=36), skip=skip))
    assert type(model.up) is QuantConvTranspose2d and model.up.gptq is None
    x = torch.cat(data)
    with torch.no_grad():
        want = ref.up(x)
        assert rel_err(model.up(x), want) < rel_err(rtn.up(x), want)


@pytest.mark.parametrize("groups", [1, 4])
def test_dequantize_and_save_load_round_trip(groups, tmp_path):
    torch.manual_seed(0)
    model = Up(groups).eval()
    mq.quantize_(model, mq.QuantConfig(mq.Int4(group_size=36), skip=mq.SkipRules.none()))
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad(), mq.kernels.tuning(False):  # the float path: a measured bf16 conv would round the output
        y = model(x)
    mq.save(model, tmp_path / "up.safetensors")
    loaded = mq.load(Up(groups).eval(), tmp_path / "up.safetensors")
    assert type(loaded.up) is QuantConvTranspose2d and torch.equal(loaded.up.qweight, model.up.qweight)
    weight = model.up.weight
    mq.dequantize_(model)
    assert type(model.up) is nn.ConvTranspose2d and torch.equal(model.up.weight, weight)
    with torch.no_grad(), mq.kernels.tuning(False):
        assert torch.equal(loaded(x), y)
        assert torch.allclose(model(x), y, atol=1e-5)


def test_the_cli_quantizes_it_when_a_layer_pattern_names_it(tmp_path):
    torch.manual_seed(0)
    model = Up().eval()
    src, out = tmp_path / "up.safetensors", tmp_path / "q.safetensors"
    save_file(model.state_dict(), str(src))
    assert cli.main(["quantize", str(src), str(out), "--bits", "8", "--layer", "up=QuantConvTranspose2d",
                     "--no-progress"]) == 0
    loaded = mq.load(Up().eval(), out)
    twin = Up().eval()
    twin.load_state_dict(model.state_dict())
    mq.quantize_(twin, mq.QuantConfig(mq.Int8(), skip=mq.SkipRules.none()))
    assert type(loaded.up) is QuantConvTranspose2d and torch.equal(loaded.up.qweight, twin.up.qweight)
