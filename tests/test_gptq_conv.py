"""GPTQ for convolutions: the im2col Hessian against an explicit float64 reference, and GPTQ vs RTN on convs."""

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import monoquant as mq
from monoquant.gptq import GPTQOptions, GPTQState
from monoquant.im2col import ConvGeometry, conv_patches

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _source_index(pos: torch.Tensor, length: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Input index read at padded-coordinate ``pos`` (may be out of range) and whether it is real data."""
    inside = (pos >= 0) & (pos < length)
    if mode == "reflect":
        pos = pos.abs()
        pos = torch.where(pos >= length, 2 * (length - 1) - pos, pos)
    elif mode == "circular":
        pos = pos % length
    else:  # zeros (masked below) and replicate
        pos = pos.clamp(0, length - 1)
    return pos, inside if mode == "zeros" else torch.ones_like(inside)


def reference_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[groups, rows, C/groups * prod(k)]`` by explicit indexing: output position o and kernel tap t of dim d
    read input coordinate ``o * stride + t * dilation - left_pad`` (then the padding mode's rule)."""
    dims = x.dim() - 2
    index, mask = [], torch.ones((), dtype=x.dtype)
    for d in range(dims):
        k, s, dil, length = conv.kernel_size[d], conv.stride[d], conv.dilation[d], x.shape[2 + d]
        if conv.padding == "same":
            left, total = dil * (k - 1) // 2, dil * (k - 1)
        elif conv.padding == "valid":
            left = total = 0
        else:
            left, total = conv.padding[d], 2 * conv.padding[d]
        out = (length + total - dil * (k - 1) - 1) // s + 1
        pos = torch.arange(out)[:, None] * s + torch.arange(k)[None, :] * dil - left
        src, inside = _source_index(pos, length, conv.padding_mode)
        shape = [1] * (2 * dims)
        shape[d], shape[dims + d] = out, k
        index.append(src.reshape(shape))
        mask = mask * inside.reshape(shape).to(x.dtype)
    patches = x[(slice(None), slice(None), *index)] * mask  # [B, C, *out, *kernel]
    b, c, g = x.shape[0], x.shape[1], conv.groups
    patches = patches.reshape(b, g, c // g, *patches.shape[2:])
    patches = patches.permute(1, 0, *range(3, 3 + dims), 2, *range(3 + dims, 3 + 2 * dims))
    return patches.reshape(g, -1, c // g * int(torch.Size(conv.kernel_size).numel()))


@st.composite
def conv_cases(draw):
    dims = draw(st.integers(1, 3))
    per_group_in = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    depthwise = draw(st.booleans())
    in_ch = per_group_in * groups if not depthwise else groups
    groups = groups if not depthwise else in_ch
    out_ch = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = draw(st.sampled_from(["int", "same", "valid"]))
    if padding == "same":
        stride = (1,) * dims  # PyTorch: padding='same' needs stride 1
    pad = tuple(draw(st.integers(0, 2)) for _ in range(dims)) if padding == "int" else padding
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    sizes = tuple(max(dl * (k - 1) + 1, 3) + draw(st.integers(0, 3)) for k, dl in zip(kernel, dilation))
    batch = draw(st.integers(1, 2))
    return dict(dims=dims, in_ch=in_ch, out_ch=out_ch, kernel=kernel, stride=stride, pad=pad, dilation=dilation,
                groups=groups, mode=mode, sizes=sizes, batch=batch)


@settings(max_examples=60, deadline=None)
@given(conv_cases(), st.integers(0, 2**16))
def test_conv_hessian_equals_explicit_im2col_reference(case, seed):
    torch.manual_seed(seed)
    conv = CONVS[case["dims"]](case["in_ch"], case["out_ch"], case["kernel"], case["stride"], case["pad"],
                               case["dilation"], case["groups"], padding_mode=case["mode"], dtype=torch.float64)
    xs = [torch.randn(case["batch"], case["in_ch"], *case["sizes"], dtype=torch.float64) for _ in range(2)]
    refs = [reference_patches(conv, x) for x in xs]
    # the reference is what the conv computes: patches @ W_g^T == conv(x) - bias, group by group
    w = conv.weight.detach().reshape(case["groups"], case["out_ch"] // case["groups"], -1)
    for x, ref in zip(xs, refs):
        out = (conv(x) - conv.bias.reshape(1, -1, *[1] * case["dims"])).detach()
        want = out.movedim(1, -1).reshape(-1, case["groups"], case["out_ch"] // case["groups"]).transpose(0, 1)
        torch.testing.assert_close(ref @ w.transpose(1, 2), want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(conv_patches(x, ConvGeometry.of(conv)), ref, rtol=0, atol=0)

    state = GPTQState(conv.weight, "conv", conv=ConvGeometry.of(conv), hessian_dtype=torch.float64)
    state.observe(xs[0])
    state.observe(xs[1][0])  # an unbatched input is one sample
    flat = torch.cat([refs[0], reference_patches(conv, xs[1][:1])], dim=1)
    expected = flat.transpose(1, 2) @ flat / flat.shape[1]
    h = state.hessian.hessian()
    torch.testing.assert_close(h, expected if case["groups"] > 1 else expected[0], rtol=1e-12, atol=1e-12)


def test_grouped_hessian_observer_checks_its_input_shape():
    obs = mq.HessianObserver(6, groups=3)
    obs(torch.randn(3, 10, 6))
    assert obs.hessian().shape == (3, 6, 6) and int(obs.rows) == 10
    with pytest.raises(mq.ConfigError, match=r"\[3, rows, 6\]"):
        obs(torch.randn(2, 10, 6))


def _smooth(batch: int, channels: int, sizes: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Spatially correlated inputs of uneven channel scales (unit noise blurred by a box filter, normalised, plus
    a little white noise): neighbouring taps see similar values, as in images and feature maps."""
    x = torch.randn(batch, channels, *[s + 4 for s in sizes], generator=generator)
    for d in range(len(sizes)):
        x = x.unfold(2 + d, 5, 1).mean(-1)
    x = x / x.std() + 0.1 * torch.randn(x.shape, generator=generator)
    return x * torch.linspace(0.3, 2.0, channels).reshape(1, -1, *[1] * len(sizes))


@pytest.mark.parametrize(("conv", "sizes"), [
    (nn.Conv1d(16, 32, 4, padding=2), (40,)),
    (nn.Conv2d(32, 32, 3, padding="same", padding_mode="reflect"), (12, 12)),
    (nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32), (16, 16)),  # depthwise
    (nn.Conv3d(8, 16, 2, padding=1, dilation=(1, 2, 1), groups=2), (6, 8, 6)),
])
@pytest.mark.parametrize("spec", [mq.Int4(group_size=32, method="gptq"), mq.Int8(method="gptq")])
def test_gptq_on_a_conv_beats_round_to_nearest_on_held_out_data(conv, sizes, spec):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    calib = [_smooth(8, conv.in_channels, sizes, g) for _ in range(4)]
    held_out = torch.cat([_smooth(8, conv.in_channels, sizes, g) for _ in range(2)])
    bias = conv.bias.detach().reshape(1, -1, *[1] * len(sizes))
    with torch.no_grad():
        ref = conv(held_out) - bias
    rtn = dataclasses.replace(spec, method="rtn")
    errors = {}
    for method, weights in (("rtn", rtn), ("gptq", spec)):
        model = nn.Sequential(copy.deepcopy(conv))
        report = mq.quantize_(model, mq.QuantConfig(weights, skip=mq.SkipRules.none()),
                              calibration_data=calib if method == "gptq" else None)
        assert [r.method for r in report.quantized] == [method]
        with torch.no_grad():
            errors[method] = float((model(held_out) - bias - ref).pow(2).mean())
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_pending_conv_computes_with_its_float_weight_and_reports_gptq():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 16))
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
    report = mq.quantize_(model, mq.QuantConfig(mq.Int4(group_size=32, method="gptq"), skip=mq.SkipRules.none()))
    assert isinstance(model[0].gptq, GPTQState) and model[0].gptq.conv == ConvGeometry.of(model[0])
    assert model[0].gptq.options == GPTQOptions.of(mq.Int4(group_size=32, method="gptq"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
    assert model[0].last_kernel == "gptq_pending"
    assert [r.method for r in report.quantized] == ["gptq", "gptq"]
    mq.calibrate_with(model, [torch.randn(4, 3, 6, 6) for _ in range(4)])
    done = {d.name: d for d in mq.freeze(model)}
    assert sorted(done) == ["0", "2"] and done["0"].output_sqnr_db > 10
    with mq.kernels.tuning(False):  # the static choice: a measured bf16 conv may win on a loaded machine
        model(x)
    assert model[0].gptq is None and model[0].last_kernel == "dequant_conv"
