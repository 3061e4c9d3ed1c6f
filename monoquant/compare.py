"""Comparing a quantized model with its float twin on the caller's data: end-to-end output SQNR and top-1
agreement (:func:`compare`), and per-layer output SQNR measured in the same pass (:func:`measure`).

Model outputs are compared with the float model's outputs on the same batches, and each quantized layer's output
with its float twin run on the *same* inputs (captured with forward hooks). Formulas live in
:mod:`monoquant.functional`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from . import functional as F
from . import tuner
from .data import ForwardFn, iter_batches, run_batch
from .errors import ConfigError, InputError, ModelError, MonoQuantError


def _output_tensors(out: Any, path: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every floating-point tensor inside a model output, with a path (``""``, ``"logits"``, ``"0"``...)."""
    if isinstance(out, torch.Tensor):
        return [(path, out)] if out.is_floating_point() or out.is_complex() else []
    if isinstance(out, Mapping):
        items: Iterable[tuple[Any, Any]] = out.items()
    elif isinstance(out, (list, tuple)):
        items = enumerate(out)
    else:
        return []
    found: list[tuple[str, torch.Tensor]] = []
    for key, value in items:
        found.extend(_output_tensors(value, f"{path}.{key}" if path else str(key)))
    return found


def _logits(tensors: list[tuple[str, torch.Tensor]]) -> torch.Tensor | None:
    """The classification-like tensor of an output: a ``logits`` entry, or a lone ``[batch, classes]`` tensor."""
    for path, t in tensors:
        if path.rsplit(".", 1)[-1] == "logits" and t.dim() >= 2 and t.shape[-1] >= 2:
            return t
    if tensors and tensors[0][1].dim() == 2 and tensors[0][1].shape[-1] >= 2:
        return tensors[0][1]
    return None


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (list, tuple)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def batch_size(batch: Any) -> int:
    """Samples in a batch: the leading dim of its first tensor (1 when it holds none, or a 0-d one)."""
    t = _first_tensor(batch)
    return int(t.shape[0]) if t is not None and t.dim() else 1


def describe_batch(batch: Any) -> str:
    """A short description of a batch for messages: its tensors' shapes and dtypes."""
    if isinstance(batch, torch.Tensor):
        return f"{batch.dtype} {list(batch.shape)}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe_batch(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (list, tuple)):
        return "(" + ", ".join(describe_batch(v) for v in batch) + ")"
    return type(batch).__name__


@dataclass
class Comparison:
    """End-to-end comparison of a quantized model with its float reference on the same batches.

    ``sqnr_db`` pools every floating-point tensor of the outputs; ``top1_agreement`` is ``None`` when the
    output is not classification-like. ``comparison["sqnr_db"]`` works too.
    """

    sqnr_db: float
    top1_agreement: float | None
    batches: int
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class OutputStats:
    """Accumulates signal/noise powers and top-1 matches over batches."""

    def __init__(self) -> None:
        self.signal = self.noise = 0.0
        self.agree = self.total = self.batches = self.samples = 0
        self.classify = True

    def add(self, reference: Any, approximation: Any, samples: int) -> None:
        ref, approx = _output_tensors(reference), _output_tensors(approximation)
        if [(p, t.shape) for p, t in ref] != [(p, t.shape) for p, t in approx] or not ref:
            raise ModelError("the float and quantized models returned outputs of different structure or shape "
                             "(or no floating-point tensor); pass forward_fn=lambda model, batch: ... returning "
                             "the output tensor to compare")
        for (_, r), (_, a) in zip(ref, approx):
            s, n = F.signal_noise_powers(r, a)
            self.signal += s
            self.noise += n
        lr, la = _logits(ref), _logits(approx)
        if lr is None or la is None:
            self.classify = False
        else:
            agree, total = F.top1_matches(lr, la)
            self.agree += agree
            self.total += total
        self.batches += 1
        self.samples += samples

    def result(self) -> Comparison:
        top1 = self.agree / self.total if self.classify and self.total else None
        return Comparison(F.sqnr_from_powers(self.signal, self.noise), top1, self.batches, self.samples)


@contextlib.contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode (dropout off) under ``no_grad``, restoring every module's flag afterwards."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in flags:
            m.training = training


def _check_data(data: Any) -> None:
    if data is None:
        raise ConfigError("no data to measure on: pass an iterable of batches (a DataLoader, a list of tensors...)")


def compare(
    float_model: nn.Module,
    quant_model: nn.Module,
    data: Iterable[Any],
    *,
    forward_fn: ForwardFn | None = None,
    max_batches: int | None = None,
    progress: bool | None = None,
) -> Comparison:
    """Run both models on the same batches (in eval mode, no grad) and compare their outputs.

    Quantized layers run on the static kernel table (``mq.kernels.tuning(False)``; a pin still applies), as in
    every accuracy figure monoquant gives (``quantize_``'s report, :func:`~monoquant.sensitivity`): the format's
    own arithmetic, the same in every process, so this agrees with the report. With tuning on, a model may run
    measured kernels that round differently, or (W8A8 layers whose INT8 kernels time slower) float activations.

    Args:
        float_model: the reference model (keep a ``copy.deepcopy`` before ``quantize_`` to have one).
        quant_model: the quantized model.
        data: iterable of batches, fed as described in :mod:`monoquant.data`.
        forward_fn: ``(model, batch) -> output`` for batches ``model(batch)`` cannot take.
        max_batches: compare on at most this many batches (``None``: all).
        progress: progress bar (``None``: only on a terminal).

    Returns:
        :class:`Comparison` with the output SQNR in dB, top-1 agreement (classification-like outputs) and the
        number of batches and samples used.
    """
    _check_data(data)
    stats = OutputStats()
    with evaluating(float_model, quant_model), tuner.tuning(False):
        for batch in iter_batches(data, max_batches, desc="comparing", progress=progress):
            stats.add(run_batch(float_model, batch, forward_fn), run_batch(quant_model, batch, forward_fn),
                      batch_size(batch))
    if not stats.batches:
        raise ConfigError("data gave no batch to compare on")
    return stats.result()


@dataclass
class Reference:
    """The batches a measurement uses and the float model's outputs on them.

    The batches themselves are kept (not re-read from the data), so a shuffling loader or random
    augmentation cannot make the float and quantized passes see different inputs."""

    batches: list[Any]
    outputs: list[Any]
    samples: list[int]

    def __len__(self) -> int:
        return len(self.batches)


def record_outputs(model: nn.Module, data: Iterable[Any], forward_fn: ForwardFn | None,
                   max_batches: int | None) -> Reference:
    """The first ``max_batches`` batches of ``data`` and the float model's outputs on them."""
    ref = Reference([], [], [])
    with evaluating(model):
        for i, batch in enumerate(iter_batches(data, max_batches, desc="float reference", progress=False)):
            ref.batches.append(batch)
            try:
                ref.outputs.append(run_batch(model, batch, forward_fn))
            except MonoQuantError:
                raise
            except (RuntimeError, TypeError, ValueError, IndexError) as e:
                raise InputError(f"calibration batch {i} ({describe_batch(batch)}) does not run through the float "
                                 f"{type(model).__name__}: {type(e).__name__}: {e}. Nothing was changed; pass "
                                 "batches that the model itself accepts (model(batch), model(**batch) for a dict), or "
                                 "forward_fn=lambda model, batch: ...") from e
            ref.samples.append(batch_size(batch))
    return ref


def measure(
    model: nn.Module,
    references: Reference,
    forward_fn: ForwardFn | None,
    layers: Mapping[str, tuple[nn.Module, nn.Module]] | None = None,
) -> tuple[Comparison, dict[str, float]]:
    """End-to-end comparison against ``references`` and, for each of ``layers``, its output SQNR: the
    quantized layer's output vs its float twin run on the very inputs the quantized model fed it; ``layers`` maps
    each layer's name to ``(float twin, quantized layer in the model)``.

    The quantized model runs on the static kernel table (``tuning(False)``), as in :func:`compare`: the figures
    describe the format's own arithmetic, the same in every process, never a measured shortcut such as
    ``float_acts`` (a W8A8 layer on float activations where its INT8 kernels time slower), which would report a
    better accuracy than W8A8 gives where the INT8 kernels run."""
    powers = {name: [0.0, 0.0] for name in layers or {}}
    handles = []

    def hook_for(name: str, float_module: nn.Module):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            expected = float_module.forward(*args, **kwargs)  # .forward: the user's hooks run once, on the twin
            s, n = F.signal_noise_powers(expected, output)
            powers[name][0] += s
            powers[name][1] += n
        return hook

    for name, (float_module, quant_module) in (layers or {}).items():
        handles.append(quant_module.register_forward_hook(hook_for(name, float_module), with_kwargs=True,
                                                          prepend=True))
    stats = OutputStats()
    try:
        with evaluating(model), tuner.tuning(False):
            for batch, ref, samples in zip(references.batches, references.outputs, references.samples):
                stats.add(ref, run_batch(model, batch, forward_fn), samples)
    finally:
        for h in handles:
            h.remove()
    return stats.result(), {n: F.sqnr_from_powers(*p) for n, p in powers.items() if p != [0.0, 0.0]}
