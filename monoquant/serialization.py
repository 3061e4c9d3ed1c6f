"""``save(model, path)`` / ``load(model, path)``: quantized models in one self-describing safetensors file.

File layout (format version 1):

* tensors: every entry of ``model.state_dict()`` under its usual name, stored exactly (INT4 codes packed as in
  :mod:`monoquant.packing`, float32 scales, uint8 zero-points, biases, activation qparams, observer buffers,
  float layers). A tensor that is the same tensor as an earlier one (tied weights, a module used twice) is
  stored once and listed in the ``aliases`` map.
* string metadata: ``format`` = ``"monoquant"``, ``format_version``, ``monoquant_version``, ``torch_version``,
  ``aliases`` (JSON ``{name: stored name}``) and ``modules``: JSON ``{layer name: entry}`` describing each
  quantized layer: ``class`` (``QuantLinear``, ``QuantConv2d``...), ``spec`` (kind and fields of the weight
  spec), ``scheme``, ``group_size``, ``weight_shape``, ``bias``, ``float_dtype``, ``compute_dtype``, ``layout``
  ``activations`` (the input quantizer's spec, for layers that quantize their inputs) and, when written by
  :func:`save`, ``geometry`` (the constructor arguments, checked against the model).

:func:`load` takes the float model (built normally, or under ``torch.device("meta")`` so that no float weight
is ever allocated), validates the whole file against it, and only then swaps in the quantized layers and
loads the tensors. Files written by ``monoquant quantize`` (the CLI) have the same layout, without
``geometry``: the layer geometry (stride, padding...) then comes from the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import safetensors_io as stio
from .config import BFloat16, Float16, Int4, Int8, WeightSpec
from .data import model_device
from .errors import SerializationError
from .nn import QuantConv1d, QuantConv2d, QuantConv3d, QuantHFConv1D, QuantLinear, QuantModule, quant_class_for
from .quantize import _check_model, _move_hooks, _parents, route_encoder_layers_through_kernels

FORMAT = "monoquant"
FORMAT_VERSION = 1
"""Bumped whenever a file written by this version could be misread by an older one."""

QUANT_CLASSES: dict[str, type[QuantModule]] = {c.__name__: c for c in (QuantLinear, QuantConv1d, QuantConv2d,
                                                                          QuantConv3d, QuantHFConv1D)}
SPEC_CLASSES: dict[str, type[WeightSpec]] = {"int8": Int8, "int4": Int4, "float16": Float16, "bfloat16": BFloat16}
LAYOUTS = {"int8": "int8-rowmajor", "int4": "int4-packed-low-nibble-even-column", "float16": "float16-rowmajor",
           "bfloat16": "bfloat16-rowmajor"}
"""Stored weight layout per spec kind (see :mod:`monoquant.schemes` and :mod:`monoquant.packing`)."""

# ---- header pieces (shared with the CLI) ------------------------------------------------------------------
def spec_to_dict(spec: WeightSpec) -> dict[str, Any]:
    """The storage-relevant fields of a weight spec (observers are not stored: they only matter when quantizing)."""
    fields = {f: getattr(spec, f) for f in getattr(spec, "__dataclass_fields__", {})
              if spec.__dataclass_fields__[f].compare}
    return {"kind": spec.kind, **fields}


def spec_from_dict(d: Mapping[str, Any]) -> WeightSpec:
    """Inverse of :func:`spec_to_dict`."""
    fields = dict(d)
    kind = fields.pop("kind", None)
    if kind not in SPEC_CLASSES:
        raise SerializationError(f"unknown weight spec kind {kind!r} (known: {sorted(SPEC_CLASSES)}); "
                                 "was the file written by a newer monoquant?")
    try:
        return SPEC_CLASSES[kind](**fields)
    except (TypeError, ValueError) as e:
        raise SerializationError(f"invalid {kind} spec {dict(d)}: {e}") from e


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _dtype_from(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise SerializationError(f"unknown dtype {name!r} in file header")
    return dtype


def _geometry(module: nn.Module) -> dict[str, Any]:
    cls = type(module) if isinstance(module, QuantModule) else quant_class_for(module)
    return {n: list(v) if isinstance(v, tuple) else v for n, v in cls.geometry_of(module).items()}


def module_entry(q: QuantModule, *, geometry: bool = True) -> dict[str, Any]:
    """The header entry that describes quantized layer ``q`` (``geometry=False`` when it is unknown)."""
    entry: dict[str, Any] = {
        "class": type(q).__name__, "spec": spec_to_dict(q.spec), "scheme": q.scheme(), "group_size": q.group_size,
        "weight_shape": list(q.weight_shape), "bias": q.bias is not None,
        "float_dtype": _dtype_name(q.float_dtype), "compute_dtype": _dtype_name(q.compute_dtype),
        "layout": LAYOUTS[q.spec.kind],
    }
    if geometry:
        entry["geometry"] = _geometry(q)
    act = getattr(q, "input_quantizer", None)
    if act is not None:
        entry["activations"] = spec_to_dict(act.spec)
    return entry


def _check_saveable(name: str, q: QuantModule) -> None:
    """Calibration state in progress cannot be saved faithfully: ask for ``mq.freeze`` first."""
    act = getattr(q, "input_quantizer", None)
    if getattr(q, "gptq", None) is not None or (act is not None and not act.ready):
        raise SerializationError(f"layer {name!r} is still being calibrated (its activation qparams or GPTQ "
                                 "weights are not fixed yet); run calibration batches, then mq.freeze(model), "
                                 "then save")


def _attach_activations(name: str, q: QuantModule, entry: Mapping[str, Any]) -> None:
    """Give a rebuilt layer the (empty, meta-device) input quantizer its header entry describes."""
    if entry.get("activations") is None:
        return
    try:
        from .nn.activation import ActivationQuantizer
    except ImportError:
        raise SerializationError(f"layer {name!r} quantizes its inputs, which this monoquant version cannot load; "
                                 "upgrade monoquant") from None
    with torch.device("meta"):
        q.input_quantizer = ActivationQuantizer(spec_from_dict(entry["activations"]), name)
    q.input_quantizer.observer = None  # files hold frozen (or dynamic) quantizers only: see _check_saveable


def file_metadata(modules: Mapping[str, Any], aliases: Mapping[str, str]) -> dict[str, str]:
    """The string metadata of a monoquant file."""
    from . import __version__

    return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "monoquant_version": __version__,
            "torch_version": torch.__version__, "modules": json.dumps(modules, sort_keys=True),
            "aliases": json.dumps(aliases, sort_keys=True)}


def parse_metadata(header: stio.Header) -> tuple[dict[str, Any], dict[str, str]]:
    """``(modules, aliases)`` from a monoquant file's metadata, after checking its format and version."""
    meta, path = header.metadata, header.path
    if meta.get("format") != FORMAT:
        raise SerializationError(f"{path} is a safetensors file but not a monoquant file (no monoquant header); "
                                 "load plain safetensors with safetensors.torch.load_file + model.load_state_dict")
    version = meta.get("format_version", "")
    if not version.isdigit() or not 1 <= int(version) <= FORMAT_VERSION:
        raise SerializationError(f"{path} has format version {version!r}, this monoquant reads 1..{FORMAT_VERSION}; "
                                 "upgrade monoquant to read it")
    try:
        modules, aliases = json.loads(meta.get("modules", "{}")), json.loads(meta.get("aliases", "{}"))
    except json.JSONDecodeError as e:
        raise SerializationError(f"{path} has a corrupt monoquant header: {e}") from e
    if not isinstance(modules, dict) or not isinstance(aliases, dict):
        raise SerializationError(f"{path} has a corrupt monoquant header (modules/aliases are not maps)")
    for alias, target in aliases.items():
        if target not in header.tensors:
            raise SerializationError(f"{path}: alias {alias!r} points to missing tensor {target!r}")
    return modules, aliases


# ---- save -------------------------------------------------------------------------------------------------
def _identity(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (quantized or not) to one safetensors file at ``path``, readable by :func:`load`.

    Every tensor of ``model.state_dict()`` is stored bit-exactly; tensors shared between several names are
    stored once. The file is written to a temporary name and renamed, so ``path`` is never left half-written.

    Raises:
        ModelError: ``model`` is not an ``nn.Module``.
        SerializationError: a tensor is on the meta device, a layer is still being calibrated (call
            ``mq.freeze(model)`` first), or ``path`` cannot be written.
    """
    model = _check_model(model)
    state = model.state_dict()
    quantized = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantModule)]
    for name, m in quantized:
        _check_saveable(name, m)
    modules = {name: module_entry(m) for name, m in quantized}
    stored: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    table: list[tuple[str, torch.Tensor]] = []
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise SerializationError(f"state_dict entry {name!r} is a {type(t).__name__}, not a tensor; "
                                     "safetensors files hold tensors only")
        if t.device.type == "meta":
            raise SerializationError(f"tensor {name!r} is on the meta device (no data); load or compute the "
                                     "model's weights before saving")
        key = _identity(t) if t.numel() else (name,)
        if key in stored:
            aliases[name] = stored[key]
        else:
            stored[key] = name
            table.append((name, t))
    with stio.StreamWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in table],
                           file_metadata(modules, aliases)) as writer:
        for name, t in table:
            writer.write(name, t)


# ---- load -------------------------------------------------------------------------------------------------
def _build(name: str, entry: Mapping[str, Any], current: nn.Module) -> QuantModule:
    """An empty (meta-device) quantized layer for ``entry``, shaped like the model's layer ``current``."""
    cls = QUANT_CLASSES.get(entry.get("class"))
    if cls is None:
        raise SerializationError(f"layer {name!r}: unknown class {entry.get('class')!r} in file "
                                 f"(known: {sorted(QUANT_CLASSES)})")
    if not isinstance(current, (cls, cls.float_module_type)):
        rerun = "--conv1d" if isinstance(current, QuantHFConv1D.float_module_type) else "--skip"
        raise SerializationError(f"layer {name!r} is {type(current).__name__} in the model but {cls.__name__} in "
                                 "the file: the file was saved from another architecture (if it was written by "
                                 f"`monoquant quantize`, rerun that with {rerun} '{name}')")
    spec = spec_from_dict(entry.get("spec", {}))
    if entry.get("layout") != LAYOUTS[spec.kind]:
        raise SerializationError(f"layer {name!r}: unknown weight layout {entry.get('layout')!r} for {spec.kind}; "
                                 "was the file written by a newer monoquant?")
    geometry = entry.get("geometry")
    if geometry is not None and geometry != _geometry(current):
        raise SerializationError(f"layer {name!r}: the file's layer is {geometry} but the model's is "
                                 f"{_geometry(current)}: the file was saved from another architecture")
    common = dict(group_size=entry.get("group_size"), compute_dtype=_dtype_from(entry.get("compute_dtype")),
                  device="meta", dtype=_dtype_from(entry.get("float_dtype")))
    bias = bool(entry.get("bias"))
    try:
        q = cls(**cls.geometry_of(current), bias=bias, spec=spec, **common)
    except (ValueError, TypeError) as e:
        raise SerializationError(f"layer {name!r}: cannot rebuild {cls.__name__} from the file: {e}") from e
    if list(q.weight_shape) != list(entry.get("weight_shape", [])):
        raise SerializationError(f"layer {name!r}: weight shape {entry.get('weight_shape')} in the file, "
                                 f"{list(q.weight_shape)} in the model: the file was saved from another architecture")
    _attach_activations(name, q, entry)
    q.train(current.training)
    return q


def _expected_state(module: nn.Module, swaps: Mapping[int, nn.Module], prefix: str = "",
                    out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """What ``module.state_dict()`` would hold (keys -> tensors, meta ones included) once ``swaps`` are applied."""
    out = {} if out is None else out
    module = swaps.get(id(module), module)
    for name, p in module._parameters.items():
        if p is not None:
            out[prefix + name] = p
    for name, b in module._buffers.items():
        if b is not None and name not in module._non_persistent_buffers_set:
            out[prefix + name] = b
    for name, child in module._modules.items():
        if child is not None:
            _expected_state(child, swaps, f"{prefix}{name}.", out)
    return out


def _first(names: set[str]) -> str:
    s = sorted(names)
    return f"{s[0]!r}" + (f" and {len(s) - 1} more" if len(s) > 1 else "")


def _check_tensors(source: _Source, expected: Mapping[str, torch.Tensor]) -> None:
    in_file = set(source.tensors) | set(source.aliases)
    missing, unexpected = set(expected) - in_file, in_file - set(expected)
    where = source.where
    if missing:
        raise SerializationError(f"{where} lacks {len(missing)} tensor(s) the model needs: {_first(missing)}; "
                                 "is it from another architecture, or was it written from part of the model?")
    if unexpected:
        raise SerializationError(f"{where} has {len(unexpected)} tensor(s) the model has no place for: "
                                 f"{_first(unexpected)}; build the same architecture the file was saved from")
    for name in sorted(expected):
        info, want = source.tensors[source.aliases.get(name, name)], expected[name]
        if tuple(info.shape) != tuple(want.shape) or info.dtype != want.dtype:
            raise SerializationError(
                f"{where}: tensor {name!r} is {info.dtype} {list(info.shape)} there but the model expects "
                f"{want.dtype} {list(want.shape)}; build the same architecture (and dtype, e.g. model.to(dtype)) "
                "it was saved from")


@dataclass
class _Source:
    """What :func:`load` reads from: a monoquant file, or a state dict in memory."""

    where: str
    tensors: Mapping[str, Any]  # name -> anything with .dtype and .shape
    aliases: dict[str, str]
    modules: dict[str, Any]
    read: Callable[[torch.device], dict[str, torch.Tensor]]


def _file_source(path: str | os.PathLike) -> _Source:
    header = stio.read_header(path)
    modules, aliases = parse_metadata(header)
    return _Source(str(header.path), header.tensors, aliases, modules,
                   lambda device: stio.read_tensors(header, device=device))


def _infer_entry(prefix: str, state: Mapping[str, torch.Tensor], current: nn.Module,
                 cls: type[QuantModule]) -> dict[str, Any]:
    """The header entry of a quantized layer, worked out from its tensors and the model's layer."""
    shape = current.weight_shape if isinstance(current, QuantModule) else cls.float_weight(current).shape
    cols = int(torch.Size(shape[1:]).numel())
    qweight, scale = state[prefix + "qweight"], state.get(prefix + "scale")
    zero, bias = state.get(prefix + "zero_point"), state.get(prefix + "bias")
    group_size = None
    if qweight.dtype in (torch.float16, torch.bfloat16):
        spec: WeightSpec = Float16() if qweight.dtype == torch.float16 else BFloat16()
    elif qweight.dtype not in (torch.int8, torch.uint8) or scale is None:
        raise SerializationError(f"{prefix}qweight is {qweight.dtype}{'' if scale is not None else ' without a scale'}"
                                 ": not a monoquant quantized weight")
    elif qweight.dtype == torch.uint8 and scale.dim() == 2:
        if not scale.shape[1] or cols % scale.shape[1]:
            raise SerializationError(f"{prefix}scale has shape {list(scale.shape)}, which does not split {cols} "
                                     "input columns into equal INT4 groups")
        group_size = cols // scale.shape[1]
        spec = Int4(group_size=group_size, symmetric=zero is None)
    else:
        spec = Int8(symmetric=qweight.dtype == torch.int8, granularity="channel" if scale.dim() else "tensor")
    float_dtype = bias.dtype if bias is not None else (
        current.float_dtype if isinstance(current, QuantModule) else current.weight.dtype)
    compute_dtype = current.compute_dtype if isinstance(current, QuantModule) else None
    return {"class": cls.__name__, "spec": spec_to_dict(spec), "group_size": group_size, "weight_shape": list(shape),
            "bias": bias is not None, "float_dtype": _dtype_name(float_dtype),
            "compute_dtype": _dtype_name(compute_dtype), "layout": LAYOUTS[spec.kind]}


def _state_dict_source(state: Mapping[str, torch.Tensor], model: nn.Module) -> _Source:
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise SerializationError(f"state dict entry {bad!r} is a {type(state[bad]).__name__}, not a tensor")
    modules = {}
    for name, current in model.named_modules():
        prefix = f"{name}." if name else ""
        cls = type(current) if isinstance(current, QuantModule) else quant_class_for(current)
        if cls is not None and prefix + "qweight" in state:
            modules[name] = _infer_entry(prefix, state, current, cls)
    return _Source("the state dict", state, {}, modules,
                   lambda device: {k: v.to(device) for k, v in state.items()})


def load(model: nn.Module, path: str | os.PathLike | Mapping[str, torch.Tensor], *,
         device: torch.device | str | None = None) -> nn.Module:
    """Load a file written by :func:`save` (or ``monoquant quantize``) into ``model`` and return it.

    ``model`` is the float architecture the file was saved from, built normally or on the meta device
    (``with torch.device("meta"): model = MyNet()``): quantized layers are built directly from the file's
    header, so their float weights are never allocated. Its layers are swapped for the file's quantized ones
    (in every place a layer is registered; hooks and train/eval mode are kept) and every tensor is loaded
    exactly, so outputs are bit-identical to the saved model's. ``model`` may also already be quantized
    (a twin of the saved model).

    All or nothing: the file is checked against the model (format version, every key, shape and dtype, layer
    types) before anything is changed; on error ``model`` is left untouched.

    ``path`` may also be a quantized model's ``state_dict()`` (e.g. from ``torch.load(f, weights_only=True)``):
    each layer's scheme is then worked out from its tensors (``qweight`` dtype, ``scale`` and ``zero_point``
    shapes); ``compute_dtype`` is not part of a state dict and is left to the kernel table. This is how to
    load a quantized state dict into a *float* model, which ``model.load_state_dict`` cannot do (PyTorch
    reports the ``qweight``/``scale`` keys as unexpected). Loaded tensors are used as they are (not copied)
    when already on ``device``.

    Args:
        device: where loaded tensors go; default: the device of the model's first real tensor, else CPU.

    Raises:
        SerializationError: the file is missing, truncated, not a monoquant file, of an unknown format
            version, or does not match the model (its message names the first problem).

    Non-persistent buffers (absent from ``state_dict``) are not in the file: a meta-device model keeps them
    on the meta device, so recreate them after loading if the model has any.
    """
    model = _check_model(model)
    source = _state_dict_source(path, model) if isinstance(path, Mapping) else _file_source(path)
    modules = source.modules

    swaps: dict[int, QuantModule] = {}
    currents: dict[int, nn.Module] = {}
    for name in sorted(modules):
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise SerializationError(f"{source.where} has a quantized layer {name!r} that the model lacks: it "
                                     "was saved from another architecture") from None
        q = _build(name, modules[name], current)
        if name == "":  # the model itself is the layer: it cannot be replaced in place, only filled
            if type(current) is not type(q):
                raise SerializationError(f"{source.where} holds a single {type(q).__name__}; the model must be one "
                                         f"too (it is {type(current).__name__}), or wrap the layer in a container")
            continue
        swaps[id(current)], currents[id(current)] = q, current
    expected = _expected_state(model, swaps)
    # float parameters tied in the model (same Parameter under several names) are tied again after loading
    ties: dict[int, list[str]] = {}
    for key, t in expected.items():
        if isinstance(t, nn.Parameter):
            ties.setdefault(id(t), []).append(key)
    _alias_tied_names(source, ties.values())
    _check_tensors(source, expected)

    target = torch.device(device) if device is not None else model_device(model)
    state = source.read(target)
    state.update({alias: state[stored] for alias, stored in source.aliases.items()})

    parents = _parents(model)
    for key, q in swaps.items():
        current = currents[key]
        _move_hooks(current, q)
        for parent, attr in parents[id(current)]:
            setattr(parent, attr, q)
    model.load_state_dict(state, strict=True, assign=True)
    route_encoder_layers_through_kernels(model)
    for keys in ties.values():
        first_mod, first_attr = _owner(model, keys[0])
        for key in keys[1:]:
            mod, attr = _owner(model, key)
            mod._parameters[attr] = first_mod._parameters[first_attr]
    return model


def _alias_tied_names(source: _Source, ties: Iterable[list[str]]) -> None:
    """Names of one tied parameter that the source lacks are read from the name it has: checkpoints written by
    ``save_pretrained`` or ``safetensors.torch.save_model`` (and so ``monoquant quantize`` outputs of them) keep
    one name per shared tensor, e.g. GPT-2's ``transformer.wte.weight`` without ``lm_head.weight``."""
    present = set(source.tensors) | set(source.aliases)
    for names in ties:
        have = next((n for n in names if n in present), None)
        for name in names:
            if have is not None and name not in present:
                source.aliases[name] = source.aliases.get(have, have)


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    prefix, _, attr = key.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), attr
