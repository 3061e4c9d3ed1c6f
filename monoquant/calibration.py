"""Calibration: feed data to the observers of a quantized model, then freeze what they learned.

Flow::

    mq.quantize_(model, cfg)                  # layers that need data get observers (see prepare())
    with mq.calibrate(model):                 # eval mode, no_grad; training flags restored on exit
        for x, _ in loader:
            model(x)
    mq.sync_observers(model)                  # distributed only: all-reduce every observer (no-op otherwise)
    mq.freeze(model)                          # fix activation qparams, run GPTQ, drop observers

or in one call: ``mq.quantize_(model, cfg, calibration_data=loader)`` or ``mq.calibrate_and_freeze(model, loader)``
(both calibrate ``sequential=True`` GPTQ layers in stages, see :func:`calibrate_and_freeze`), or
``mq.calibrate_with(model, loader)`` then ``mq.freeze(model)`` (always one pass).

Which layers need data: those whose config quantizes activations statically (``activations=mq.Int8()``) and
those whose weight method is ``"gptq"`` or ``"awq+gptq"`` (Linear and convolution layers; a convolution's Hessian is
built from its input patches, see :mod:`monoquant.im2col`). Until :func:`freeze`, a GPTQ layer computes with its
float weight and a static activation layer refuses to run outside :func:`calibrate`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from . import data as data_mod
from . import functional as F
from . import tuner
from .config import QuantConfig
from .errors import CalibrationError, ConfigError
from .formats import method_of
from .gptq import GPTQOptions, GPTQState, working_bytes
from .memory import release_freed_memory
from .nn.activation import ActivationQuantizer
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
    method = method_of(spec)
    if config.activations is not None and q.quantizes_inputs:
        q.input_quantizer = ActivationQuantizer(config.activations, name)
    if method.is_gptq:
        if not q.supports_gptq:
            raise ConfigError(f"layer {name}: {type(q).__name__} cannot be calibrated by GPTQ; quantize it with "
                              "another method (a rule such as SkipRules(exclude=[...]) or a per-layer config)")
        q.gptq = GPTQState(float_weight, name, GPTQOptions.of(spec), conv=q.gptq_geometry())
    return method.name


def _pending(module: nn.Module) -> bool:
    act = module.input_quantizer
    return module.gptq is not None or (act is not None and act.needs_calibration)


def pending_layers(model: nn.Module) -> list[tuple[str, QuantModule]]:
    """``(name, layer)`` of every quantized layer in ``model`` that waits for calibration data and :func:`freeze`
    (GPTQ weights, static activations): until then it computes in float."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule) and _pending(m)]


def needs_calibration(model: nn.Module) -> bool:
    """True when some layer of ``model`` waits for calibration data and :func:`freeze`."""
    return bool(pending_layers(model))


def _observe(module: QuantModule, x: torch.Tensor) -> None:
    """The calibration tap (:attr:`QuantModule.calibration_tap`): feed the prepared input to the observers."""
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
    layers = [q for _, q in pending_layers(model)]
    if not layers:
        warnings.warn(f"mq.calibrate: nothing in {type(model).__name__} needs calibration (no static activation "
                      "quantization, no method='gptq' layer waiting for freeze)", UserWarning, stacklevel=3)
    with _calibration_mode(model, layers, layers):
        yield model


class _StageDone(BaseException):
    """Ends a forward pass of sequential calibration once the stage's last layer has seen its input (a
    ``BaseException``, so a model's own ``except Exception`` cannot swallow it)."""


def _stop_forward(module: QuantModule, x: torch.Tensor) -> None:
    raise _StageDone


def _observe_then_stop(module: QuantModule, x: torch.Tensor) -> None:
    _observe(module, x)
    raise _StageDone


@contextlib.contextmanager
def _calibration_mode(model: nn.Module, pending: list[QuantModule], observed: list[QuantModule],
                      stop_after: QuantModule | None = None) -> Iterator[None]:
    """Eval + no_grad + fast path off; ``pending`` layers pass float inputs on, ``observed`` ones feed their
    observers (through their :attr:`~QuantModule.calibration_tap`, called by ``prepare_input`` with the prepared
    input); the forward pass ends (:class:`_StageDone`) once ``stop_after`` has seen its input.

    Layers already quantized run the static kernel table (:func:`monoquant.tuner.tuning` off): statistics that
    decide stored weights must not depend on which kernel a timing happened to favour (the kernels round
    differently, and a W8A8 layer may be measured faster on float activations), so the same data give the same
    file in every process and on every run."""
    flags = [(m, m.training) for m in model.modules()]
    tapped = [*observed, *([] if stop_after is None else [stop_after])]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        for q in observed:  # each layer's prepare_input hands its prepared input to the tap
            q.calibration_tap = _observe
        if stop_after is not None:  # after the layer's own observers have seen the input
            stop_after.calibration_tap = _observe_then_stop if any(q is stop_after for q in observed) else _stop_forward
        for q in pending:
            if q.input_quantizer is not None:
                q.input_quantizer.calibrating = True
        model.eval()
        with torch.no_grad(), tuner.tuning(False):
            yield
    finally:
        for q in tapped:
            q.__dict__.pop("calibration_tap", None)
        for q in pending:
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
    results = _compute_frozen(pending_layers(model))
    _apply_frozen(results)
    return [row for row, _, _ in results]


_Result = tuple[FrozenLayer, Any, Any]  # (row, GPTQ stored weight or None, activation qparams or None)


def _compute_frozen(layers: list[tuple[str, QuantModule]]) -> list[_Result]:
    """What freezing ``layers`` gives, changing nothing; raises naming every layer that saw no data."""
    unseen = [name for name, q in layers
              if (q.gptq is not None and not q.gptq.hessian.has_seen_data)
              or (q.input_quantizer is not None and q.input_quantizer.needs_calibration
                  and not q.input_quantizer.observer.has_seen_data)]
    if unseen:
        raise CalibrationError(f"cannot freeze: no calibration data reached {unseen}; run batches that go "
                               "through these layers under `with mq.calibrate(model):` (nothing was changed)")
    results = []
    for name, q in layers:
        row = FrozenLayer(name, q, method_of(q.spec).name)
        stored = act_qparams = None
        if q.gptq is not None:
            stored, row.output_sqnr_db = q.gptq.quantize(q.spec, q.group_size)
            with torch.no_grad():
                deq = q.spec.dequantize(stored, q.weight2d_shape[1], q.group_size, torch.float32)
                row.weight_sqnr_db = F.sqnr(q.gptq.weight.reshape(deq.shape), deq)
            del deq
            release_freed_memory()  # GPTQ's temporaries (inverse factor, transposed weight): one layer's at a time
        act = q.input_quantizer
        if act is not None and not act.ready:
            act_qparams = act.observed_qparams()
        results.append((row, stored, act_qparams))
    return results


def _apply_frozen(results: list[_Result]) -> Callable[[], None]:
    """Apply computed results (plain copies); returns a function that puts every layer back as it was."""
    saved = []
    for row, stored, act_qparams in results:
        q = row.module
        old_stored = None if stored is None else type(stored)(*(None if t is None else t.clone() for t in q.stored))
        saved.append((q, q.gptq, old_stored, None if act_qparams is None else q.input_quantizer.observer))
        if stored is not None:
            q.set_stored(stored)
            q.gptq = None
        if act_qparams is not None:
            q.input_quantizer.freeze(act_qparams)

    def undo() -> None:
        for q, gptq, old_stored, observer in reversed(saved):
            if old_stored is not None:
                q.set_stored(old_stored)
                q.gptq = gptq
            if observer is not None:
                q.input_quantizer.thaw(observer)

    return undo


@dataclass
class _Stage:
    """Layers calibrated and frozen together in sequential calibration, and where their forward pass may end."""

    layers: list[tuple[str, QuantModule]]
    stop_after: QuantModule | None


def _sequential(q: QuantModule) -> bool:
    return q.gptq is not None and q.gptq.options.sequential


def _call_order(model: nn.Module, layers: list[tuple[str, QuantModule]], first_batch: Any,
                forward_fn: data_mod.ForwardFn | None) -> tuple[dict[int, tuple[int, Any]], dict[int, int]]:
    """One forward pass of ``first_batch`` (pending layers passing float inputs on): ``id(layer) -> (position of
    its first call, the number of its first input)`` and ``id(layer) -> calls``, for the ``layers`` the pass
    reached. Layers called one after another on the very same tensor (q/k/v projections) get the same input
    number; only the last input is held, not every layer's (64 layers' inputs were a 126 MB transient)."""
    first_call: dict[int, tuple[int, int]] = {}
    calls: dict[int, int] = {}
    last_input: list[Any] = [None, -1]  # the last layer input seen and its number

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        calls[id(module)] = calls.get(id(module), 0) + 1
        x = args[0] if args else None
        if x is None or x is not last_input[0]:
            last_input[:] = [x, last_input[1] + 1]
        first_call.setdefault(id(module), (len(first_call), last_input[1]))

    modules = [q for _, q in layers]
    handles = [q.register_forward_pre_hook(record) for q in modules]
    try:
        with _calibration_mode(model, modules, []):
            data_mod.run_batch(model, first_batch, forward_fn)
    finally:
        for h in handles:
            h.remove()
        last_input.clear()
    return first_call, calls


def _stages_of(groups: list[list[tuple[str, QuantModule]]], others: list[tuple[str, QuantModule]],
               calls: dict[int, int]) -> list[_Stage]:
    """Stages from groups of layers in call order, the ``others`` joining the first; a stage's forward pass ends
    after its last layer when each of its layers runs once per forward (and no other joined it)."""
    if not groups:
        return [_Stage(others, None)]
    stages = []
    for i, group in enumerate(groups):
        members = group + (others if i == 0 else [])
        once = not (i == 0 and others) and all(calls[id(q)] == 1 for _, q in group)
        stages.append(_Stage(members, group[-1][1] if once else None))
    return stages


def hessian_budget(layers: list[tuple[str, QuantModule]]) -> int:
    """Bytes of GPTQ Hessians that :func:`calibrate_and_freeze` collects in one pass over the data by default:
    twice the largest layer's Hessian plus half its freezing temporaries (:func:`monoquant.gptq.working_bytes`).

    Freezing a pass's layers one by one then holds at most that pass's Hessians plus one layer's temporaries
    (``2 H + 1.5 W``), within what issue 21 bounds ``quantize_``'s peak by: the quantized bytes + the temporaries
    and Hessians of the two largest layers (``2 H + 2 W``); the last half ``W`` is the margin for what the estimate
    does not see (allocator slack, the model's own activations during a pass). With a whole ``W`` instead, 64
    ``Linear(1024, 1024)`` layers peaked 3% over that bound. (For ``Linear(2048, 2048)`` layers: 8 Hessians per
    pass.)"""
    sizes = [(q.gptq.hessian.statistic_bytes, working_bytes(*q.weight2d_shape)) for _, q in layers
             if q.gptq is not None]
    if not sizes:
        return 0
    largest = max(h for h, _ in sizes)
    return 2 * largest + max(w for _, w in sizes) // 2


def _plan_hessian_passes(model: nn.Module, layers: list[tuple[str, QuantModule]], first_batch: Any,
                         forward_fn: data_mod.ForwardFn | None, budget: int) -> list[_Stage]:
    """One-pass calibration split into passes that each collect at most ``budget`` bytes of GPTQ Hessians (at least
    one layer per pass): GPTQ layers in the order the model first calls them; every other pending layer (static
    activations, layers the first batch did not reach) with the first pass. A pass ends after its last layer
    when every GPTQ layer it holds runs once per forward."""
    first_call, calls = _call_order(model, layers, first_batch, forward_fn)
    ordered = sorted((item for item in layers if item[1].gptq is not None and id(item[1]) in first_call),
                     key=lambda item: first_call[id(item[1])][0])
    others = [item for item in layers if item not in ordered]
    groups: list[list[tuple[str, QuantModule]]] = []
    held = 0
    for item in ordered:
        size = item[1].gptq.hessian.statistic_bytes
        if not groups or held + size > budget:
            groups.append([])
            held = 0
        groups[-1].append(item)
        held += size
    return _stages_of(groups, others, calls)


def _plan_stages(model: nn.Module, layers: list[tuple[str, QuantModule]], first_batch: Any,
                 forward_fn: data_mod.ForwardFn | None) -> list[_Stage]:
    """Sequential-calibration stages from one forward pass of ``first_batch``.

    Sequential GPTQ layers go in the order the forward pass first calls them; consecutive ones that read the very
    same input tensor (q/k/v projections) share a stage. Every other pending layer (static activations only,
    ``sequential=False``, or never called) is calibrated with the first stage, on float inputs as in a one-pass
    calibration. A stage's forward pass ends after its last layer when each of its layers runs once per pass.
    """
    first_call, calls = _call_order(model, layers, first_batch, forward_fn)
    ordered = sorted((item for item in layers if _sequential(item[1]) and id(item[1]) in first_call),
                     key=lambda item: first_call[id(item[1])][0])
    others = [item for item in layers if item not in ordered]
    groups: list[list[tuple[str, QuantModule]]] = []
    for item in ordered:
        if groups and first_call[id(item[1])][1] == first_call[id(groups[-1][-1][1])][1]:
            groups[-1].append(item)
        else:
            groups.append([item])
    return _stages_of(groups, others, calls)


def calibrate_and_freeze(
    model: nn.Module,
    data: Iterable[Any],
    *,
    max_batches: int | None = data_mod.DEFAULT_MAX_BATCHES,
    forward_fn: data_mod.ForwardFn | None = None,
    progress: bool | None = None,
    hessian_bytes: int | None = None,
) -> list[FrozenLayer]:
    """Calibrate every pending layer of ``model`` on ``data`` and freeze it; what ``quantize_`` does with data.

    Without sequential GPTQ layers this is :func:`calibrate_with`, :func:`sync_observers` and :func:`freeze`
    when the GPTQ layers' Hessians (``in x in`` float32 each) fit in ``hessian_bytes`` (default
    :func:`hessian_budget`: twice the largest Hessian plus one layer's GPTQ temporaries). Else the same
    calibration runs as several passes over ``data``, each collecting the Hessians of the next GPTQ layers (in the
    order the model calls them) up to that budget; each pass's results are computed and its Hessians handed
    back before the next pass, and all results are applied after the last one, so the results are those of
    one pass (every layer computes in float until then) while memory holds one pass's Hessians, not every
    layer's. A pass ends after its last layer when each of its layers runs once per forward; the whole model
    is run once more per pass otherwise. If a pass fails, the statistics this call gathered are dropped and
    every layer is left calibrating, as before the call.
    With them (``method="gptq", sequential=True``; off by default) it calibrates in stages: the GPTQ layers in the
    order the model runs them (layers reading the same input, such as q/k/v, together), each stage's Hessians
    collected with every earlier stage already quantized and frozen, so each layer compensates the error of
    the layers before it as the deployed model will see it (GPTQ's own procedure). That costs one pass over
    ``data`` per stage (a pass ends right after the stage's layers when they run once per forward), so
    ``max_batches`` matters more.

    ``data``, ``max_batches``, ``forward_fn``, ``progress``: as for :func:`calibrate_with` (a one-shot iterator is
    read once into a list of its first ``max_batches`` batches). Each stage's layers start from empty statistics
    (whatever they saw before the call is not used), and they are all-reduced over ranks before the stage freezes
    when ``torch.distributed`` is initialised. All or nothing: if any stage fails, every layer is put back as it
    was before the call (still calibrating; the statistics this call gathered are dropped) and the error is
    re-raised.
    """
    layers = pending_layers(model)
    if not any(_sequential(q) for _, q in layers):
        budget = hessian_budget(layers) if hessian_bytes is None else hessian_bytes
        if sum(q.gptq.hessian.statistic_bytes for _, q in layers if q.gptq is not None) <= budget:
            calibrate_with(model, data, max_batches=max_batches, forward_fn=forward_fn, progress=progress)
            sync_observers(model)
            return freeze(model)
        data = data_mod.reiterable(data, max_batches)
        return _calibrate_in_passes(model, layers, data, _first_batch(data, max_batches), budget,
                                    max_batches=max_batches, forward_fn=forward_fn, progress=progress)
    data = data_mod.reiterable(data, max_batches)
    stages = _plan_stages(model, layers, _first_batch(data, max_batches), forward_fn)
    frozen: list[FrozenLayer] = []
    undo: list[Callable[[], None]] = []
    started: list[_Stage] = []
    try:
        bar = tqdm(stages, desc="calibrating (sequential)", unit="stage", leave=False,
                   disable=data_mod.tqdm_disable(progress))
        for stage in bar:
            pending = [q for _, q in pending_layers(model)]
            started.append(stage)
            _reset_observers(stage)
            _observe_stage(model, pending, stage, data, max_batches, forward_fn)
            results = _compute_frozen(stage.layers)
            _release_hessians(stage)
            undo.append(_apply_frozen(results))
            frozen += [row for row, _, _ in results]
    except BaseException:
        for step in reversed(undo):
            step()
        for stage in started:
            _reset_observers(stage)
        raise
    return frozen


def _first_batch(data: Iterable[Any], max_batches: int | None) -> Any:
    no_batch = object()
    first = next(data_mod.iter_batches(data, max_batches, progress=False), no_batch)
    if first is no_batch:
        raise CalibrationError("calibration data yielded no batch; pass a non-empty DataLoader or list of batches")
    return first


def _observe_stage(model: nn.Module, pending: list[QuantModule], stage: _Stage, data: Iterable[Any],
                   max_batches: int | None, forward_fn: Callable | None) -> None:
    """One pass over ``data`` in which ``stage``'s layers feed their observers (the pass ends early after the
    stage's last layer when it can), then their statistics are all-reduced across ranks."""
    with _calibration_mode(model, pending, [q for _, q in stage.layers], stage.stop_after):
        for batch in data_mod.iter_batches(data, max_batches, progress=False):
            with contextlib.suppress(_StageDone):
                data_mod.run_batch(model, batch, forward_fn)
    for _, q in stage.layers:
        sync_observers(q)  # no-op unless torch.distributed is initialised


def _release_hessians(stage: _Stage) -> None:
    """Hand back the Hessians of a stage whose results are computed (a rollback drops its statistics anyway)."""
    for _, q in stage.layers:
        if q.gptq is not None:
            q.gptq.hessian.reset()
    release_freed_memory()


def _calibrate_in_passes(model: nn.Module, layers: list[tuple[str, QuantModule]], data: Iterable[Any],
                         first: Any, budget: int, *, max_batches: int | None,
                         forward_fn: data_mod.ForwardFn | None, progress: bool | None) -> list[FrozenLayer]:
    """One-pass calibration with at most ``budget`` bytes of Hessians at a time: a pass over ``data`` per group
    of GPTQ layers (:func:`_plan_hessian_passes`), each group's results computed and its Hessians handed back
    before the next pass, and every result applied only after the last pass. Every layer runs in float until
    then, so each Hessian is collected on the inputs the one pass gives it and the results are the same.

    Each computed GPTQ weight goes straight into its layer's stored buffers (unused while the layer is pending),
    so the quantized weights are held once, not also as results waiting to be applied and as copies for an undo.
    If a pass fails, the layers stay pending (computing with their float weights) with their statistics
    dropped; buffers already written hold computed weights until a later freeze overwrites them."""
    stages = _plan_hessian_passes(model, layers, first, forward_fn, budget)
    modules = [q for _, q in layers]
    results: list[tuple[FrozenLayer, Any]] = []  # (row, activation qparams or None)
    started: list[_Stage] = []
    try:
        bar = tqdm(stages, desc="calibrating (Hessians in passes)", unit="pass", leave=False,
                   disable=data_mod.tqdm_disable(progress))
        for stage in bar:
            started.append(stage)
            _observe_stage(model, modules, stage, data, max_batches, forward_fn)
            for item in stage.layers:  # one layer's result at a time, straight into its stored buffers
                (row, stored, act_qparams), = _compute_frozen([item])
                if stored is not None:
                    row.module.set_stored(stored)  # still pending: it computes with its float weight until the end
                results.append((row, act_qparams))
                del stored
            _release_hessians(stage)
    except BaseException:
        for stage in started:
            _reset_observers(stage)
        raise
    for row, act_qparams in results:  # plain assignments: the layers stop computing with their float weights
        row.module.gptq = None
        if act_qparams is not None:
            row.module.input_quantizer.freeze(act_qparams)
    position = {id(q): i for i, q in enumerate(modules)}
    return sorted((row for row, _ in results), key=lambda row: position[id(row.module)])


def _reset_observers(stage: _Stage) -> None:
    for _, q in stage.layers:
        for obs in q.modules():
            if isinstance(obs, Observer):
                obs.reset()
