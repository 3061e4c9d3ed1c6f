"""Quantized layers refuse what their float twins refuse, before any kernel can truncate or misread it."""

import pytest
import torch
from torch import nn

import monoquant as mq

SPECS = [mq.Int8(), mq.Int8(symmetric=False), mq.Int4(group_size=32), mq.Float16()]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_integer_inputs_are_refused_by_linear(spec, dtype, rows):
    q = mq.QuantLinear.from_float(nn.Linear(64, 32), spec)
    x = torch.ones(rows, 64, dtype=dtype)
    with pytest.raises(mq.InputError, match=f"QuantLinear .* got a {dtype} input"):
        q(x)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("shape", [(4, 63), (4, 65), (63,), (2, 3, 32)])
def test_wrong_feature_size_names_both_sizes(spec, shape):
    q = mq.QuantLinear.from_float(nn.Linear(64, 32), spec)
    with pytest.raises(mq.InputError, match=rf"expects inputs with 64 features .* got shape \({shape[0]}"):
        q(torch.randn(*shape))


def test_scalar_input_is_refused():
    q = mq.QuantLinear.from_float(nn.Linear(64, 32), mq.Int8())
    with pytest.raises(mq.InputError, match="64 features"):
        q(torch.tensor(1.0))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_refuses_integer_inputs_and_wrong_channels(dims):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](8, 16, 3)
    layer = mq.QuantConv1d if dims == 1 else (mq.QuantConv2d if dims == 2 else mq.QuantConv3d)
    q = layer.from_float(conv, mq.Int8())
    spatial = (6,) * dims
    with pytest.raises(mq.InputError, match=r"got a torch\.int64 input"):
        q(torch.ones(2, 8, *spatial, dtype=torch.int64))
    with pytest.raises(mq.InputError, match="expects inputs with 8 features"):
        q(torch.randn(2, 7, *spatial))
    assert q(torch.randn(8, *spatial)).shape[0] == 16  # unbatched input still works


def test_input_error_is_a_type_error_like_torch_raises():
    assert issubclass(mq.InputError, TypeError) and issubclass(mq.InputError, mq.MonoQuantError)
