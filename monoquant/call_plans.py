"""What a quantized layer's ``forward`` decided, remembered per exact input so that the next call like it is one
lookup and the kernel.

A full call of a quantized layer checks its input, prepares it, asks whether a pin, ``tuning(False)``,
calibration or a gradient applies, looks the measured kernel up and runs it: about twenty Python calls, 4-5 us
per layer on a 2-core AMD EPYC (Zen 4). The digits CNN's float layers take 7-45 us each at batch 1, so that
dispatch alone made the quantized model 7-14% slower than float, though every kernel was as fast or faster.

Once a layer has run a *measured* choice on an input (not pinned, tuning on, no gradient, not calibrating),
:func:`remember` keeps a :class:`CallPlan` under the input's ``(shape, dtype)`` in the layer's
``quant_weight.cache`` (and as ``quant_weight.plan``, the one compared first), with a ``run(layer, x)``
function that has everything per shape decided already (a kept float weight bound, the geometry read, a
format's compiled call bound). :func:`lookup` is what every later call asks first; it returns the plan's
function only while the same conditions hold (checked on each call, they are cheap reads), and records
the kernel as the full path would (``last_kernel``, ``ran``), once per plan (``quant_weight.recorded``).
Because the plans live in the weight's cache, whatever drops derived state (new weights, ``load_state_dict``,
``.to()``, an input scale) drops them too; copies and pickles of a layer leave them out
(:meth:`QuantWeight.__getstate__`).

A layer whose input preparation changes the input (an input scale or permutation) keeps a plan for the prepared
input only (``raw_ok=False``): its ``forward`` prepares first, then asks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from . import tuner

KEY = "call_plans"
"""The key of the plans in ``quant_weight.cache`` (a dict ``(shape, dtype) -> CallPlan``)."""

MAX_PLANS = 64
"""Plans kept per layer: inputs of ever new shapes restart the dict (the per-bucket choices stay)."""


class CallPlan(NamedTuple):
    """One remembered call: the input's shape and dtype, the kernel's name, the row or batch bucket it records
    under, the function that runs it (``run(layer, x)``), the device the input was on, and whether ``run`` may
    take the layer's raw input (its input preparation returned the input itself)."""

    shape: torch.Size
    dtype: torch.dtype
    name: str
    bucket: int
    run: Callable[[Any, torch.Tensor], torch.Tensor]
    device: torch.device | None
    """``None`` for the CPU (``x.is_cpu`` is a cheaper check than building ``x.device``)."""
    raw_ok: bool
    inference: bool
    """Made under ``torch.inference_mode``: it may hold inference tensors, which autograd cannot save, so it never
    runs where autograd records."""
    act: Any
    """The layer's activation quantizer when the plan was made (``None``: none; setting another one, or a GPTQ
    state, drops the layer's plans: :func:`forget`)."""
    act_ready: bool
    """``act`` is ``None`` or dynamic, so it cannot wait for calibration (a static one is asked on each call)."""


def lookup(module, x: Any, raw: bool = False) -> Callable[[Any, torch.Tensor], torch.Tensor] | None:
    """The remembered ``run(module, x)`` for input ``x``, or ``None`` when the full path must decide: no plan for
    its shape and dtype (or, with ``raw=True``, a plan for the prepared input only), another device, traced code,
    a gradient wanted, a pin or ``tuning(False)`` active, or a static activation quantizer not frozen (setting a
    calibration tap, a GPTQ state or another quantizer on the layer drops its plans: its ``__setattr__``; none
    are made while a tap is set).
    Records the kernel it returns in ``quant_weight`` (``last_kernel`` and ``ran``) on the plan's first run after
    any other record.

    The plan the layer ran last is compared first (``quant_weight.plan``: a model called with one input shape
    never hashes a key); every read here is on the per-call path of every layer."""
    if _is_compiling():  # first: traced code never reads the plans
        return None
    w = module.quant_weight
    plan = w.plan
    if plan is None or type(x) is not torch.Tensor:
        return None
    if x.shape != plan.shape or x.dtype is not plan.dtype:
        plan = w.cache.get(KEY, {}).get((x.shape, x.dtype))
        if plan is None:
            return None
        w.plan = plan
    if ((raw and not plan.raw_ok) or ((x.requires_grad or plan.inference) and _grad_enabled())
            or (not x.is_cpu if plan.device is None else x.device != plan.device)
            or not (tuner.measured_everywhere or tuner.measured())
            or not (plan.act_ready or plan.act.ready)):  # the layer's computes_in_float, as far as it can change
        return None
    if w.recorded is not plan:  # what ran is written once per plan, not per call (a layer's memory is cold here)
        w.record_run(plan.name, plan.bucket)
        w.recorded = plan
    return plan.run


# bound once: on a layer's per-call path each module attribute read is a dictionary lookup, in a model whose other
# layers evicted it from the caches (Dynamo recognises torch.compiler.is_compiling by identity, bound or not)
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled


def forget(module) -> None:
    """Drop ``module``'s plans (what its calibration state decided has changed)."""
    w = module.quant_weight
    w.plan = None
    w.cache.pop(KEY, None)


def allowed(module, x: torch.Tensor) -> bool:
    """Whether a plan may be made for input ``x`` now: measured choices apply here (no pin, no ``tuning(False)``),
    no gradient is wanted and no calibration tap is set (what :func:`lookup` relies on having held)."""
    return (tuner.measured() and module.calibration_tap is None
            and not (x.requires_grad and torch.is_grad_enabled()))


def remember(module, x: torch.Tensor, name: str, bucket: int, run: Callable[[Any, torch.Tensor], torch.Tensor],
             *, raw_ok: bool) -> None:
    """Keep ``run`` as the plan for inputs like ``x`` (same shape, dtype, device). Call it only after a measured
    choice ran for ``x``, where :func:`allowed`."""
    w = module.quant_weight
    plans = w.cache.setdefault(KEY, {})
    if len(plans) >= MAX_PLANS:
        plans.clear()
    device = None if x.is_cpu else x.device
    act = module._modules.get("input_quantizer")
    w.plan = plans[(x.shape, x.dtype)] = CallPlan(x.shape, x.dtype, name, bucket, run, device, raw_ok,
                                                  torch.is_inference_mode_enabled(), act, act is None or act.dynamic)
