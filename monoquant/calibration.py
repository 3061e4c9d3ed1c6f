"""Calibration: feed data to the observers of a quantized model, then freeze what they learned.

Flow::

    mq.quantize_(model, cfg)                  # layers that need data get observers (see prepare())
    with mq.calibrate(model):                 # eval mode, no_grad; training flags restored on exit
        for x, _ in loader:
            model(x)
    mq.sync_observers(model)                  # distributed only: all-reduce every observer (no-op otherwise)
    mq.freeze(model)                          # fix activation qparams, run GPTQ, drop observers

or in one call: ``mq.quantize_(model, cfg, calibration_data=loader)``, or ``mq.calibrate_with(model, loader)``
then ``mq.freeze(model)``.

Which layers need data: those whose config quantizes activations statically (``activations=mq.Int8()``) and
those whose weight method is ``"gptq"`` (Linear and convolution layers; a convolution's Hessian is built
from its input patches, see :mod:`monoquant.im2col`). Until :func:`freeze`, a GPTQ layer computes with its
float weight and a static activation layer refuses to run outside :func:`calibrate`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import data as data_mod
from . import functional as F
from .config import QuantConfig
from .errors import CalibrationError
from .gptq import GPTQOptions, GPTQState
from .im2col import ConvGeometry
from .nn.activation import ActivationQuantizer
from .nn.linear import QuantLinear
from .nn.module import QuantModule
from .observers import Observer, distributed_ready


@dataclass
class FrozenLayer:
    """What :func:`freeze` did to one layer."""

    name: str
    module: QuantModule
    method: str
    weight_sqnr_db: float | None = None
    output_sqnr_db: float | None = None
    """GPTQ layers: SQNR of the layer output on the calibration inputs (exact, from the Hessian; bias excluded)."""


def prepare(q: QuantModule, float_weight: torch.Tensor, config: QuantConfig, name: str) -> str:
    """Attach the calibration state ``config`` asks for to a freshly swapped ``q``; returns the weight method."""
    spec = q.spec
    method = getattr(spec, "method", "")
    if config.activations is not None and q.quantizes_inputs:
        q.input_quantizer = ActivationQuantizer(config.activations, name)
    if method == "gptq":
        conv = None if isinstance(q, QuantLinear) else ConvGeometry.of(q)
        q.gptq = GPTQState(float_weight, name, GPTQOptions.of(spec), conv=conv)
    return method


def _pending(module: nn.Module) -> bool:
    act = module.input_quantizer
    return module.gptq is not None or (act is not None and act.needs_calibration)


def _pending_layers(model: nn.Module) -> list[tuple[str, QuantModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule) and _pending(m)]


def needs_calibration(model: nn.Module) -> bool:
    """True when some layer of ``model`` waits for calibration data and :func:`freeze`."""
    return bool(_pending_layers(model))


def _observe_inputs(module: QuantModule, args: tuple[Any, ...]) -> None:
    x = args[0]
    if module.gptq is not None:
        module.gptq.observe(x)
    if module.input_quantizer is not None:
        module.input_quantizer.observe(x)


@contextlib.contextmanager
def calibrate(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it, forward passes feed every pending layer's observers.

    The model runs in eval mode under ``torch.no_grad()``; every module's training flag is restored on exit.
    PyTorch's fused transformer fast path (which reads ``layer.weight`` instead of calling the layer, so no
    observer would see anything) is switched off meanwhile. Layers with static activation quantization see
    (and pass on) float inputs while calibrating. Warns when nothing in the model needs calibration.
    """
    layers = _pending_layers(model)
    if not layers:
        warnings.warn(f"mq.calibrate: nothing in {type(model).__name__} needs calibration (no static activation "
                      "quantization, no method='gptq' layer waiting for freeze)", UserWarning, stacklevel=3)
    flags = [(m, m.training) for m in model.modules()]
    handles = []
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        for _, q in layers:
            handles.append(q.register_forward_pre_hook(_observe_inputs))
            if q.input_quantizer is not None:
                q.input_quantizer.calibrating = True
        model.eval()
        with torch.no_grad():
            yield model
    finally:
        for h in handles:
            h.remove()
        for _, q in layers:
            if q.input_quantizer is not None:
                q.input_quantizer.calibrating = False
        for m, flag in flags:
            m.training = flag
        torch.backends.mha.set_fastpath_enabled(fastpath)


def calibrate_with(
    model: nn.Module,
    data: Iterable[Any],
    *,
    max_batches: int | None = data_mod.DEFAULT_MAX_BATCHES,
    forward_fn: data_mod.ForwardFn | None = None,
    progress: bool | None = None,
) -> int:
    """Run up to ``max_batches`` batches of ``data`` through ``model`` inside :func:`calibrate`.

    ``data`` is a DataLoader or any iterable of batches (tensors; tuples/lists -> first element; dicts ->
    keyword arguments; anything with ``forward_fn(model, batch)``), see :mod:`monoquant.data`. A progress bar
    shows on a terminal (``progress`` forces it on or off). Returns the number of batches run; call
    :func:`freeze` afterwards.
    """
    count = 0
    with calibrate(model):
        for batch in data_mod.iter_batches(data, max_batches, desc="calibrating", progress=progress):
            data_mod.run_batch(model, batch, forward_fn)
            count += 1
    if count == 0:
        raise CalibrationError("calibration data yielded no batch; pass a non-empty DataLoader or list of batches")
    return count


def sync_observers(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """All-reduce every observer in ``model`` over ``group`` so all ranks freeze identical qparams.

    Collective (every rank must call it, with the same model structure). Returns the number of observers
    synchronised; 0 and no communication when ``torch.distributed`` is not initialised.
    """
    if not distributed_ready():
        return 0
    observers = [m for m in model.modules() if isinstance(m, Observer)]
    for obs in observers:
        obs.sync(group)
    return len(observers)


def freeze(model: nn.Module) -> list[FrozenLayer]:
    """Turn calibration statistics into fixed qparams (activations) and integer weights (GPTQ), in place.

    All or nothing: checks every pending layer first (if any saw no data, raises
    :class:`~monoquant.CalibrationError` naming them all), then computes every layer's result (GPTQ weights,
    activation qparams) without changing anything, and only then applies them all; an error while computing
    (NaN statistics, a singular Hessian, an interrupt) leaves every layer as it was, still calibrating. The
    computed GPTQ weights are held until then (their quantized size, next to the float weights being replaced).
    Returns one :class:`FrozenLayer` per layer that changed.
    """
    layers = _pending_layers(model)
    unseen = [name for name, q in layers
              if (q.gptq is not None and not q.gptq.hessian.has_seen_data)
              or (q.input_quantizer is not None and q.input_quantizer.needs_calibration
                  and not q.input_quantizer.observer.has_seen_data)]
    if unseen:
        raise CalibrationError(f"cannot freeze: no calibration data reached {unseen}; run batches that go "
                               "through these layers under `with mq.calibrate(model):` (nothing was changed)")
    results = []
    for name, q in layers:  # compute: nothing changes yet
        row = FrozenLayer(name, q, getattr(q.spec, "method", ""))
        stored = act_qparams = None
        if q.gptq is not None:
            stored, row.output_sqnr_db = q.gptq.quantize(q.spec, q.group_size)
            with torch.no_grad():
                deq = q.spec.dequantize(stored, q.weight2d_shape[1], q.group_size, torch.float32)
                row.weight_sqnr_db = F.sqnr(q.gptq.weight.reshape(deq.shape), deq)
        act = q.input_quantizer
        if act is not None and not act.ready:
            act_qparams = act.observed_qparams()
        results.append((row, stored, act_qparams))
    for row, stored, act_qparams in results:  # apply: plain copies
        q = row.module
        if stored is not None:
            q.set_stored(stored)
            q.gptq = None
        if act_qparams is not None:
            q.input_quantizer.freeze(act_qparams)
    return [row for row, _, _ in results]
