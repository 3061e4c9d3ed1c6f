"""The custom ops ``monoquant::linear`` and ``monoquant::conv``: a quantized linear or conv layer's whole
forward (kernel choice and kernel) as one :mod:`torch.library` op, so that
``torch.compile(model, fullgraph=True)`` and :func:`torch.export.export` see one opaque node per layer instead
of tracing the dispatch (timing, caches, CPU-feature checks) in Python.

The op takes the input, the layer's stored buffers and bias (so that a graph depends on them) and a handle
naming the live layer; its implementation runs :func:`monoquant.kernels.linear` on that layer, exactly as eager
``forward`` does, so a compiled model computes the same numbers, keeps the tuner's measured choice per row bucket
and records the kernel it ran (:func:`monoquant.kernels.kernels_run`, what the report shows). Its fake
implementation only gives the output shape (``[..., out_features]`` in the input's dtype). The compiled (C++)
kernels are custom ops of their own (:mod:`monoquant.fused`), for the code that torch.compile does trace
(embeddings). ``monoquant::conv`` does the same for convolutions (:func:`monoquant.conv_kernels.conv`).

The handle is the layer's identity in this process: a graph or an exported program runs the quantized layers of
the process that traced it, not copies loaded elsewhere (export again after :func:`monoquant.load`).
"""

from __future__ import annotations

import weakref

import torch

from . import conv_kernels, kernels
from .errors import ModelError

_LAYERS: dict[int, weakref.ReferenceType] = {}
"""Handle -> the layer it names (weakly: a layer that is freed leaves the table)."""


@torch.compiler.assume_constant_result
def layer_handle(module: torch.nn.Module) -> int:
    """The integer that names ``module`` in :func:`linear`'s op (registered on first call, outside traced code:
    torch.compile takes the result as a constant)."""
    handle = id(module)
    ref = _LAYERS.get(handle)
    if ref is None or ref() is not module:
        _LAYERS[handle] = weakref.ref(module, lambda _ref, h=handle: _forget(h, _ref))
    return handle


def _forget(handle: int, ref: weakref.ReferenceType) -> None:
    if _LAYERS.get(handle) is ref:
        del _LAYERS[handle]


def _layer(handle: int) -> torch.nn.Module:
    module = _LAYERS[handle]() if handle in _LAYERS else None
    if module is None:
        raise ModelError("a compiled or exported graph refers to a quantized layer that no longer exists in this "
                          "process; compile or export the model again after loading it")
    return module


def _buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    """The layer's stored buffers and bias: the op's tensor arguments, so that a graph depends on them."""
    return [b for b in (*(getattr(module, n) for n in module.spec.buffer_names()), module.bias) if b is not None]


@torch.library.custom_op("monoquant::linear", mutates_args=())
def _linear_op(x: torch.Tensor, buffers: list[torch.Tensor], out_features: int, handle: int) -> torch.Tensor:
    return kernels.linear(_layer(handle), x)


@_linear_op.register_fake
def _(x, buffers, out_features, handle):
    return x.new_empty((*x.shape[:-1], out_features))


def linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module``'s output for ``x`` through the op ``monoquant::linear`` (what ``QuantLinear.forward`` calls
    while torch.compile or torch.export trace it)."""
    return _linear_op(x, _buffers(module), module.weight2d_shape[0], layer_handle(module))


@torch.library.custom_op("monoquant::conv", mutates_args=())
def _conv_op(x: torch.Tensor, buffers: list[torch.Tensor], handle: int) -> torch.Tensor:
    return conv_kernels.conv(_layer(handle), x)


@_conv_op.register_fake
def _(x, buffers, handle):
    module = _layer(handle)
    geometry = module.gptq_geometry()
    unbatched = x.dim() == geometry.dims + 1
    spatial = x.shape[1:] if unbatched else x.shape[2:]
    out = (module.out_channels, *geometry.output_size(spatial))
    return x.new_empty(out if unbatched else (x.shape[0], *out))


def conv(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module``'s output for its prepared input ``x`` through the op ``monoquant::conv`` (what a quantized
    conv's ``forward`` calls while torch.compile or torch.export trace it)."""
    return _conv_op(x, _buffers(module), layer_handle(module))
