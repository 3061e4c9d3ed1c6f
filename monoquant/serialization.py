"""``save(model, path)`` / ``load(model, path)``: quantized models in one self-describing safetensors file.

File layout (format version 1):

* tensors: every entry of ``model.state_dict()`` under its usual name, stored exactly (INT4 codes packed as in
  :mod:`monoquant.packing`, float32 scales, uint8 zero-points, biases, activation qparams, observer buffers,
  float layers). A tensor that is the same tensor as an earlier one (tied weights, a module used twice) is
  stored once and listed in the ``aliases`` map.
* string metadata: ``format`` = ``"monoquant"``, ``format_version``, ``monoquant_version``, ``torch_version``,
  ``aliases`` (JSON ``{name: stored name}``) and ``modules``: JSON ``{layer name: entry}`` describing each
  quantized layer: ``class`` (``QuantLinear``, ``QuantConv2d``...), ``spec`` (kind and storage fields of the
  weight format: what the bytes mean), ``method`` (provenance: how they were made, :class:`~monoquant.formats.
  method.MethodConfig`; absent for round to nearest; files before 0.3 kept these options inside ``spec``, and
  still load), ``scheme``, ``group_size``, ``weight_shape``, ``bias``, ``float_dtype``, ``compute_dtype``, ``layout``
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
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hub_formats
from . import safetensors_io as stio
from .data import model_device
from .errors import ConfigError, SerializationError
from .formats import FORMATS, WeightSpec, spec_from_dict, spec_to_dict
from .formats.method import MethodConfig
from .model_keys import ignorable_keys, materialize_buffers
from .nn import QuantModule, layer_class, quant_class_for
from .nn.registry import LAYERS
from .quantize import _check_model
from .swap import Swap

FORMAT = "monoquant"
FORMAT_VERSION = 1
"""Bumped whenever a file written by this version could be misread by an older one."""

__all__ = ["FORMAT", "FORMAT_VERSION", "QUANT_METHOD", "config_metadata", "file_metadata", "header_of",
           "install_layers", "load", "module_entry", "parse_metadata", "save", "spec_from_dict", "spec_to_dict",
           "stored_once"]

def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _dtype_from(name: str | None) -> torch.dtype | None:
    """The torch dtype a header names (validated by :func:`validate_entry`)."""
    return None if name is None else getattr(torch, name)


def _geometry(module: nn.Module) -> dict[str, Any]:
    cls = type(module) if isinstance(module, QuantModule) else quant_class_for(module)
    return {n: list(v) if isinstance(v, tuple) else v for n, v in cls.geometry_of(module).items()}


def module_entry(q: QuantModule, *, geometry: bool = True) -> dict[str, Any]:
    """The header entry that describes quantized layer ``q`` (``geometry=False`` when it is unknown)."""
    entry: dict[str, Any] = {
        "class": type(q).__name__, "spec": q.spec.storage_dict(), "scheme": q.scheme(), "group_size": q.group_size,
        "weight_shape": list(q.weight_shape), "bias": q.bias is not None,
        "float_dtype": _dtype_name(q.float_dtype), "compute_dtype": _dtype_name(q.compute_dtype),
        "layout": q.spec.layout,
    }
    method = q.spec.method_config
    if method is not None and method != MethodConfig():  # provenance: how the bytes were made (absent: RTN)
        entry["method"] = method.to_dict()
    if geometry:
        entry["geometry"] = _geometry(q)
    act = getattr(q, "input_quantizer", None)
    if act is not None:
        entry["activations"] = spec_to_dict(act.spec)
    if getattr(q, "input_permutation", None) is not None:
        entry["input_permutation"] = True
    if q.input_scale is not None:  # AWQ / SmoothQuant scales no preceding op could absorb: buffer input_scale
        entry["input_scale"] = True
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
        q.input_quantizer = ActivationQuantizer(spec_from_dict(entry["activations"], f"layer {name!r} activations"),
                                                name)
    q.input_quantizer.observer = None  # files hold frozen (or dynamic) quantizers only: see _check_saveable


def file_metadata(modules: Mapping[str, Any], aliases: Mapping[str, str]) -> dict[str, str]:
    """The string metadata of a monoquant file."""
    from ._version import __version__

    return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "monoquant_version": __version__,
            "torch_version": torch.__version__, "modules": json.dumps(modules, sort_keys=True),
            "aliases": json.dumps(aliases, sort_keys=True)}


def parse_metadata(header: stio.Header, shards: Mapping[str, stio.Header] | None = None,
                   ) -> tuple[dict[str, Any], dict[str, str]]:
    """``(modules, aliases)`` from a monoquant file's metadata, after checking its format and version.

    ``shards`` maps each tensor name to the header of the file holding it, for a checkpoint split over several
    files (``header`` then lists them all); default: ``header``'s own file.
    """
    meta, path = header.metadata, header.path
    if meta.get("format") != FORMAT:
        raise SerializationError(f"{path} is a safetensors file but not a monoquant file (no monoquant header); "
                                 "load plain safetensors with safetensors.torch.load_file + model.load_state_dict")
    version = meta.get("format_version", "")
    if not (version.isascii() and version.isdigit()) or not 1 <= int(version) <= FORMAT_VERSION:
        raise SerializationError(f"{path} has format version {version!r}, this monoquant reads 1..{FORMAT_VERSION}; "
                                 "upgrade monoquant to read it")
    try:
        modules, aliases = json.loads(meta.get("modules", "{}")), json.loads(meta.get("aliases", "{}"))
    except json.JSONDecodeError as e:
        raise SerializationError(f"{path} has a corrupt monoquant header: {e}") from e
    if not isinstance(modules, dict) or not isinstance(aliases, dict):
        raise SerializationError(f"{path} has a corrupt monoquant header (modules/aliases are not maps)")
    for alias, target in aliases.items():
        if not isinstance(target, str) or target not in header.tensors:
            raise SerializationError(f"{path}: alias {alias!r} points to missing tensor {target!r}")
        if alias in header.tensors:
            raise SerializationError(f"{path}: alias {alias!r} is also a stored tensor; the header is corrupt")
    for name, entry in modules.items():
        validate_entry(entry, f"{path}: layer {name!r}")
        _check_static_activations((shards or {}).get(_flag_name(name), header), name, entry)
    return modules, aliases


def _flag_name(layer: str) -> str:
    return f"{layer}.input_quantizer.frozen" if layer else "input_quantizer.frozen"


def _check_static_activations(header: stio.Header, name: str, entry: Mapping[str, Any]) -> None:
    """A layer with static activation quantization must hold frozen qparams: :func:`save` writes no other kind.

    Reads the layer's one-element ``input_quantizer.frozen`` flag; a header that claims static quantization
    for a dynamic quantizer's tensors (or any unfrozen one) would load, then fail or mislead at forward.
    """
    if entry.get("activations") is None or getattr(spec_from_dict(entry["activations"]), "dynamic", True):
        return
    flag = _flag_name(name)
    info = header.tensors.get(flag)
    if info is None or info.nbytes > 16:
        return  # missing or misshapen: reported with the other tensors when loading
    if not bool(stio.read_tensors(header, [flag])[flag].all()):
        raise SerializationError(f"{header.path}: layer {name!r} has static activation quantization but its "
                                 "qparams were never frozen; the file is corrupt (monoquant only saves frozen "
                                 "layers): save it again after mq.freeze(model)")


def _check_type(where: str, field: str, value: Any, ok: bool, wanted: str) -> None:
    if not ok:
        raise SerializationError(f"{where}: header field {field!r} must be {wanted}, got {value!r}; the file is "
                                 "corrupt or was written by another program")


def _is_float_dtype_name(value: Any) -> bool:
    dtype = getattr(torch, value, None) if isinstance(value, str) and not value.startswith("_") else None
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def validate_entry(entry: Any, where: str) -> None:
    """Check the JSON types of one layer's header entry, so that a corrupt header fails here, naming the field.

    Value checks that need the weight format (known kinds, layouts, group sizes dividing K) happen when the
    layer is rebuilt; this catches what would otherwise surface as a ``TypeError``/``AttributeError``.
    """
    _check_type(where, "entry", entry, isinstance(entry, dict), "an object")
    for field in ("class", "layout"):
        _check_type(where, field, entry.get(field), isinstance(entry.get(field), str), "a string")
    if "scheme" in entry:
        _check_type(where, "scheme", entry["scheme"], isinstance(entry["scheme"], str), "a string")
    spec = entry.get("spec")
    _check_type(where, "spec", spec, isinstance(spec, dict) and isinstance(spec.get("kind"), str),
                "an object with a string 'kind'")
    act = entry.get("activations")
    _check_type(where, "activations", act, act is None or (isinstance(act, dict) and isinstance(act.get("kind"), str)),
                "null or an object with a string 'kind'")
    group = entry.get("group_size")
    _check_type(where, "group_size", group, group is None or (type(group) is int and group > 0),
                "null or a positive integer")
    shape = entry.get("weight_shape")
    _check_type(where, "weight_shape", shape, isinstance(shape, list) and len(shape) >= 2
                and all(type(d) is int and d >= 0 for d in shape), "a list of at least 2 non-negative integers")
    _check_type(where, "bias", entry.get("bias"), type(entry.get("bias")) is bool, "true or false")
    for field, optional in (("float_dtype", False), ("compute_dtype", True)):
        value = entry.get(field)
        _check_type(where, field, value, (optional and value is None) or _is_float_dtype_name(value),
                    ("null or " if optional else "") + "the name of a floating-point torch dtype ('float32'...)")
    geometry = entry.get("geometry")
    _check_type(where, "geometry", geometry, geometry is None or isinstance(geometry, dict), "null or an object")
    perm = entry.get("input_permutation", False)
    _check_type(where, "input_permutation", perm, type(perm) is bool, "true or false")
    scaled = entry.get("input_scale", False)
    _check_type(where, "input_scale", scaled, type(scaled) is bool, "true or false")
    entry_spec(entry, where)
    if entry.get("activations") is not None:
        spec_from_dict(entry["activations"], f"{where}: header field 'activations'")


def entry_spec(entry: Mapping[str, Any], where: str) -> WeightSpec:
    """The weight format a layer's header entry describes: its storage fields (``spec``) made by its provenance
    (``method``, written since 0.3; files from 0.1 and 0.2 kept the method options inside ``spec``)."""
    spec = spec_from_dict(entry.get("spec"), f"{where}: header field 'spec'")
    if entry.get("method") is None:
        return spec
    method = MethodConfig.from_dict(entry["method"], f"{where}: header field 'method'")
    try:
        return spec.with_method(method)
    except ConfigError as e:
        raise SerializationError(f"{where}: header field 'method' does not fit the {spec.kind} spec: {e}") from e


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or ("meta" not in (a.device.type, b.device.type) and _identity(a) == _identity(b))


def check_aliases(where: str, aliases: Mapping[str, str], expected: Mapping[str, torch.Tensor],
                  original: Mapping[str, torch.Tensor], rebuilt: set[str]) -> None:
    """Each alias of a file must name a tensor the model shares with the alias's target, or loading would
    silently give the alias its target's values.

    Shared means: the same tensor in ``expected`` (the model's state once the file's layers are swapped in:
    tied weights, a layer registered twice), or the same buffer of two quantized layers ``rebuilt`` from the
    file whose weights are tied in ``original`` (the model's state before the swap), as ``quantize_`` ties
    the buffers of layers with tied float weights. Names the model lacks are reported elsewhere.
    """
    for alias, target in aliases.items():
        a, t = expected.get(alias), expected.get(target)
        if a is None or t is None or _same_tensor(a, t):
            continue
        (layer_a, _, attr), (layer_t, _, attr_t) = alias.rpartition("."), target.rpartition(".")
        if attr == attr_t and layer_a in rebuilt and layer_t in rebuilt:
            weight_a, weight_t = (original.get(f"{layer}.weight", original.get(f"{layer}.{attr}"))
                                  for layer in (layer_a, layer_t))
            if weight_a is not None and weight_t is not None and _same_tensor(weight_a, weight_t):
                continue
        raise SerializationError(f"{where} stores {alias!r} as the same tensor as {target!r}, but the model keeps "
                                 "them separate: the header's aliases are corrupt, or the file was saved from a "
                                 "model whose weights are tied differently")


# ---- save -------------------------------------------------------------------------------------------------
def _identity(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def save(model: nn.Module, path: str | os.PathLike, *, format: str = FORMAT) -> None:
    """Write ``model`` (quantized or not) to one safetensors file at ``path``, readable by :func:`load`.

    ``format="gptq"`` (or ``"gptq_v2"``) writes the Hub's GPTQ layout instead, for other tools to read: every
    quantized layer must be a weight-only INT4 ``nn.Linear`` of one group size; a ``quantize_config.json``
    is written next to ``path`` (see :mod:`monoquant.hub_formats`, also for the float16 scales).

    Every tensor of ``model.state_dict()`` is stored bit-exactly; tensors shared between several names are
    stored once. The file is written to a temporary file of its own next to ``path``, fsynced and renamed, so
    ``path`` is never left half-written and concurrent saves to one path each leave one whole model (see
    :class:`~monoquant.safetensors_io.StreamWriter`, also for the hidden temporary a SIGKILL can leave).

    Raises:
        ModelError: ``model`` is not an ``nn.Module``.
        SerializationError: a tensor is on the meta device or sparse, a layer is still being calibrated (call
            ``mq.freeze(model)`` first), or ``path`` cannot be written (a directory, a missing folder, a full
            disk...); the old file at ``path`` is then kept and no temporary file remains.
    """
    model = _check_model(model)
    if format != FORMAT:
        return _save_gptq(model, path, format)
    state = model.state_dict()
    modules = header_of(model)
    table, aliases = stored_once(state)
    with stio.StreamWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in table.items()],
                           file_metadata(modules, aliases)) as writer:
        for name, t in table.items():
            writer.write(name, t)


def stored_once(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, aliases)``: ``state`` with each tensor kept under its first name only, and ``{other name: first
    name}`` for tensors shared by several names (tied weights, buffers of tied quantized layers).

    Raises:
        SerializationError: an entry is not a tensor, on the meta device, or not dense.
    """
    stored: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    table: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise SerializationError(f"state_dict entry {name!r} is a {type(t).__name__}, not a tensor; "
                                     "safetensors files hold tensors only")
        if t.device.type == "meta":
            raise SerializationError(f"tensor {name!r} is on the meta device (no data); load or compute the "
                                     "model's weights before saving")
        if t.layout != torch.strided:
            raise SerializationError(f"tensor {name!r} is {t.layout}; safetensors files hold dense tensors only, "
                                     "so make it dense (.to_dense()) before saving")
        key = _identity(t) if t.numel() else (name,)
        if key in stored:
            aliases[name] = stored[key]
        else:
            stored[key] = name
            table[name] = t
    return table, aliases


def _save_gptq(model: nn.Module, path: str | os.PathLike, format: str) -> None:
    """:func:`save` with ``format="gptq"``/``"gptq_v2"``: tensors and metadata from :mod:`monoquant.hub_formats`."""
    version = hub_formats.GPTQ_FORMATS.get(format)
    if version is None:
        raise ConfigError(f"format must be {FORMAT!r} or one of {sorted(hub_formats.GPTQ_FORMATS)}, got {format!r}")
    for name, m in model.named_modules():
        if isinstance(m, QuantModule):
            _check_saveable(name, m)
    tensors, config = hub_formats.gptq_tensors(model, version)
    text = json.dumps(config, indent=2, sort_keys=True)
    with stio.StreamWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()],
                           {"format": "pt", "quantization_config": text}) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
    sidecar = os.path.join(os.path.dirname(os.path.abspath(path)), "quantize_config.json")
    try:
        with open(sidecar, "w") as fh:
            fh.write(text + "\n")
    except OSError as e:
        raise SerializationError(f"wrote {path} but not {sidecar}: {e}; the file also holds its quantization "
                                 "config in its metadata") from e


# ---- load -------------------------------------------------------------------------------------------------
def _build(name: str, entry: Mapping[str, Any], current: nn.Module, source: str) -> QuantModule:
    """An empty (meta-device) quantized layer for ``entry`` (already checked by :func:`validate_entry`), shaped like
    the model's layer ``current``: the layer class comes from the registry, the format and its stored layout are
    validated by the weight format, the rest against the model. ``source`` names the file in messages."""
    where = f"{source}: layer {name!r}"
    cls = layer_class(entry.get("class"))
    if cls is None:
        raise SerializationError(f"{where}: unknown class {entry.get('class')!r} in file (known: {sorted(LAYERS)})")
    if not isinstance(current, cls) and quant_class_for(current) is not cls:
        own = quant_class_for(current)
        rerun = "--conv1d" if own is not None and own.float_module_path else "--skip"  # a transposed weight
        raise SerializationError(f"{where} is {type(current).__name__} in the model but {cls.__name__} in "
                                 "the file: the file was saved from another architecture (if it was written by "
                                 f"`monoquant quantize`, rerun that with {rerun} '{name}')")
    spec = entry_spec(entry, where)
    if entry.get("layout") != spec.layout:
        raise SerializationError(f"{where}: unknown weight layout {entry.get('layout')!r} for {spec.kind}; "
                                 "was the file written by a newer monoquant?")
    geometry = entry.get("geometry")
    if geometry is not None and geometry != _geometry(current):
        raise SerializationError(f"{where}: the file's layer is {geometry} but the model's is "
                                 f"{_geometry(current)}: the file was saved from another architecture")
    common = dict(group_size=entry.get("group_size"), device="meta",
                  compute_dtype=_dtype_from(entry.get("compute_dtype")), dtype=_dtype_from(entry.get("float_dtype")))
    try:
        q = cls(**cls.geometry_of(current), bias=bool(entry.get("bias")), spec=spec, **common)
    except (ValueError, TypeError, ConfigError) as e:
        raise SerializationError(f"{where}: cannot rebuild {cls.__name__} from the file: {e}") from e
    if list(q.weight_shape) != list(entry.get("weight_shape", [])):
        raise SerializationError(f"{where}: weight shape {entry.get('weight_shape')} in the file, "
                                 f"{list(q.weight_shape)} in the model: the file was saved from another architecture")
    _attach_activations(name, q, entry)
    if entry.get("input_permutation"):
        if not hasattr(q, "input_permutation"):
            raise SerializationError(f"{where}: {cls.__name__} has no input permutation; the file is corrupt")
        q.input_permutation = torch.empty(q.weight2d_shape[1], dtype=torch.int64, device="meta")
    if entry.get("input_scale"):
        if not q.supports_input_scale:
            raise SerializationError(f"{where}: the file gives {cls.__name__} an input scale, which it cannot apply")
        q.set_input_scale(torch.empty(q.weight2d_shape[1], device="meta"))
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
    read: Callable[[torch.device, Iterable[str]], dict[str, torch.Tensor]]  # (device, stored names) -> tensors


def _file_source(path: str | os.PathLike, model: nn.Module, quantization_config: Any = None) -> _Source:
    if os.path.isdir(path):
        return _folder_source(path)
    header = stio.read_header(path)
    if header.metadata.get("format") != FORMAT and hub_formats.is_hub_checkpoint(header.tensors):
        config = quantization_config or hub_formats.config_near(path, header.metadata)
        return _hub_source(str(header.path), stio.read_tensors(header), model, config)
    modules, aliases = parse_metadata(header)
    return _Source(str(header.path), header.tensors, aliases, modules,
                   lambda device, names: stio.read_tensors(header, names, device=device))


def _folder_source(folder: str | os.PathLike) -> _Source:
    """A Hugging Face style folder: ``model.safetensors``, or shards listed by ``model.safetensors.index.json``.

    The monoquant header is the ``quantization_config`` of the folder's ``config.json`` (``save_pretrained`` of a
    quantized model) or, for a single file, that file's own metadata (``mq.save``, ``monoquant quantize``).
    """
    index, single = os.path.join(folder, INDEX_FILE), os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted({os.path.join(folder, v) for v in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SerializationError(f"{index} is not a safetensors index ({e}); save the model again") from e
    elif os.path.isfile(single):
        files = [single]
    else:
        raise SerializationError(f"{folder} is a directory, not a file, and has neither {WEIGHTS_FILE} nor "
                                 f"{INDEX_FILE}; pass the monoquant file itself, or a folder written by "
                                 "model.save_pretrained")
    headers = [stio.read_header(f) for f in files]
    shards = {name: h for h in headers for name in h.tensors}
    tensors = {name: info for h in headers for name, info in h.tensors.items()}
    metadata = config_metadata(folder)
    if metadata is None:
        if len(headers) > 1:
            raise SerializationError(f"{folder}: its config.json has no monoquant quantization_config, so the "
                                     "shards' layers are unknown; save the quantized model with save_pretrained")
        metadata = headers[0].metadata
    merged = stio.Header(path=headers[0].path if len(headers) == 1 else Path(folder),
                         tensors=tensors, metadata=metadata)
    modules, aliases = parse_metadata(merged, shards)

    def read(device: torch.device, names: Iterable[str]) -> dict[str, torch.Tensor]:
        by_file: dict[int, list[str]] = {}
        for n in names:
            by_file.setdefault(id(shards[n]), []).append(n)
        out: dict[str, torch.Tensor] = {}
        for h in headers:
            out.update(stio.read_tensors(h, by_file.get(id(h), []), device=device))
        return out

    return _Source(str(folder), tensors, aliases, modules, read)


WEIGHTS_FILE, INDEX_FILE, CONFIG_FILE = "model.safetensors", "model.safetensors.index.json", "config.json"
QUANT_METHOD = "monoquant"
"""``quant_method`` of the ``quantization_config`` that ``save_pretrained`` writes for a monoquant model."""


def config_metadata(folder: str | os.PathLike) -> dict[str, str] | None:
    """The monoquant header kept in ``folder/config.json``'s ``quantization_config`` (as file metadata), if any."""
    try:
        with open(os.path.join(folder, CONFIG_FILE)) as f:
            qc = json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD or "modules" not in qc:
        return None
    return {"format": FORMAT, "format_version": str(qc.get("format_version", "")),
            "modules": json.dumps(qc["modules"]), "aliases": json.dumps(qc.get("aliases", {}))}


_WEIGHT_BUFFERS = ("qweight", "scale", "zero_point")


def _infer_entry(prefix: str, state: Mapping[str, torch.Tensor], current: nn.Module,
                 cls: type[QuantModule]) -> dict[str, Any]:
    """The header entry of a quantized layer, worked out from its tensors (each format recognises its own) and the
    model's layer."""
    shape = current.weight_shape if isinstance(current, QuantModule) else cls.float_weight(current).shape
    cols = int(torch.Size(shape[1:]).numel())
    names = {n for f in FORMATS.values() for n in f.buffer_names()}
    buffers = {n: state[prefix + n] for n in names if prefix + n in state}
    found = [r for f in FORMATS.values() if (r := f.infer(buffers, cols)) is not None]
    if len(found) != 1:
        described = {n: f"{t.dtype} {list(t.shape)}" for n, t in buffers.items()}
        lacking = [set(f.buffer_names()) - set(buffers) for f in FORMATS.values()
                   if set(buffers) < set(f.buffer_names())]
        missing = sorted(set.intersection(*lacking)) if lacking else []  # what every format they could be needs
        hint = f" (missing: {', '.join(prefix + n for n in missing)})" if not found and missing else ""
        raise SerializationError(f"{prefix}qweight and its buffers {described} are "
                                 f"{'no' if not found else 'an ambiguous'} monoquant weight format for {cols} input "
                                 f"columns{hint}; load the file written by mq.save instead of a bare state dict")
    spec, group_size = found[0]
    bias = state.get(prefix + "bias")
    float_dtype = bias.dtype if bias is not None else (
        current.float_dtype if isinstance(current, QuantModule) else cls.float_weight(current).dtype)
    compute_dtype = current.compute_dtype if isinstance(current, QuantModule) else None
    return {"class": cls.__name__, "spec": spec.storage_dict(), "group_size": group_size, "weight_shape": list(shape),
            "bias": bias is not None, "float_dtype": _dtype_name(float_dtype),
            "compute_dtype": _dtype_name(compute_dtype), "layout": spec.layout,
            "input_permutation": prefix + "input_permutation" in state}


def _check_state(state: Mapping[Any, Any]) -> None:
    """Check that every entry of a state dict is a dense tensor with data, naming the first that is not.

    Kernels index the stored buffers directly, so a sparse or meta tensor accepted here would only fail at the
    first forward; strided views are made contiguous when read (:func:`_contiguous_on`).
    """
    for name, t in state.items():
        if not isinstance(name, str):
            raise SerializationError(f"state dict key {name!r} is a {type(name).__name__}, not a string")
        if not isinstance(t, torch.Tensor):
            raise SerializationError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided:
            raise SerializationError(f"state dict entry {name!r} is a {t.layout} tensor; pass dense tensors "
                                     "(.to_dense())")
        if t.device.type == "meta":
            raise SerializationError(f"state dict entry {name!r} is on the meta device (no data); pass a state "
                                     "dict with real tensors (e.g. torch.load(f, weights_only=True))")


def _contiguous_on(state: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``state``'s tensors on ``device``, each contiguous (copied only when moved or a strided view)."""
    return {k: v.to(device).contiguous() for k, v in state.items()}


def _hub_source(where: str, tensors: Mapping[str, torch.Tensor], model: nn.Module, config: Any) -> _Source:
    """A GPTQ/AWQ checkpoint, converted to monoquant's tensors and header entries by :mod:`.hub_formats`."""
    _check_state(tensors)
    state, modules = hub_formats.from_hub(tensors, model, config, where)
    return _Source(where, state, {}, modules,
                   lambda device, names: _contiguous_on({n: state[n] for n in names}, device))


def _state_dict_source(state: Mapping[str, torch.Tensor], model: nn.Module, quantization_config: Any = None) -> _Source:
    if hub_formats.is_hub_checkpoint(state):
        return _hub_source("the state dict", state, model, quantization_config)
    _check_state(state)
    modules = {}
    for name, current in model.named_modules():
        prefix = f"{name}." if name else ""
        cls = type(current) if isinstance(current, QuantModule) else quant_class_for(current)
        if cls is not None and prefix + "qweight" in state:
            modules[name] = _infer_entry(prefix, state, current, cls)
    return _Source("the state dict", state, {}, modules,
                   lambda device, names: _contiguous_on({n: state[n] for n in names}, device))


def load(model: nn.Module, path: str | os.PathLike | Mapping[str, torch.Tensor], *,
         device: torch.device | str | None = None, strict: bool = True,
         quantization_config: Any = None) -> nn.Module:
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

    ``path`` may also be a folder written by ``save_pretrained`` of a quantized transformers model (one
    ``model.safetensors`` or shards listed in ``model.safetensors.index.json``; the header is the
    ``quantization_config`` of its ``config.json``) or holding one monoquant ``model.safetensors``.

    Keys the model declares ignorable are skipped with a warning that names them: its non-persistent buffers
    (old checkpoints hold BERT's ``embeddings.position_ids``, which newer code no longer saves) and keys
    matching the model's ``_keys_to_ignore_on_load_unexpected`` patterns (a transformers convention).

    Non-persistent buffers are in no file: on a model built on the meta device, a transformers model gets
    them from its own weight init, as ``from_pretrained`` does (``position_ids``, rotary ``inv_freq``...); any
    other model's are named in a warning (recreate them before the first forward).

    ``path`` may also be a Hub INT4 checkpoint (or its state dict) in the GPTQ layout (v1 or v2 zero-points,
    with or without act-order ``g_idx``) or the AWQ GEMM layout: its layers become ``Int4`` ``QuantLinear``
    layers with bit-identical dequantized weights, running on monoquant's kernels (see
    :mod:`monoquant.hub_formats`). The model must have the checkpoint's float dtype (usually
    ``model.half()``) for its other tensors.

    Args:
        device: where loaded tensors go; default: the device of the model's first real tensor, else CPU.
        strict: ``False`` skips any other key the model has no place for, listing them in a warning, instead of
            raising. Tensors the model needs but the file lacks are always an error.
        quantization_config: for Hub checkpoints, their quantization config (a dict, a ``config.json``'s
            content or a transformers ``GPTQConfig``/``AwqConfig``); default: the one in ``config.json``,
            ``quantize_config.json`` or ``quant_config.json`` next to ``path``, else worked out from the
            tensors' shapes (GPTQ zero-points then read as v1).

    Raises:
        SerializationError: the file is missing, truncated, not a monoquant file, of an unknown format
            version, or does not match the model (its message names the first problem).
    """
    model = _check_model(model)
    source = (_state_dict_source(path, model, quantization_config) if isinstance(path, Mapping)
              else _file_source(path, model, quantization_config))
    modules = source.modules

    swaps, currents = _build_all(model, modules, source.where)
    expected = _expected_state(model, swaps)
    # float parameters tied in the model (same Parameter under several names) are tied again after loading
    ties: dict[int, list[str]] = {}
    for key, t in expected.items():
        if isinstance(t, nn.Parameter):
            ties.setdefault(id(t), []).append(key)
    _alias_tied_names(source, ties.values())
    _skip_unexpected(source, model, expected, strict)
    _check_tensors(source, expected)
    check_aliases(source.where, source.aliases, expected, _expected_state(model, {}), set(modules))

    target = torch.device(device) if device is not None else model_device(model)
    state = source.read(target, sorted(set(source.tensors) & (set(expected) | set(source.aliases.values()))))
    state.update({alias: state[stored] for alias, stored in source.aliases.items()})

    with Swap(model) as swap:  # a failure while loading tensors puts the original layers back
        for key, q in swaps.items():
            swap.replace(currents[key], q)
        originals = _loaded_state(model)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except BaseException:
            _put_back(model, originals)
            raise
        swap.route_encoder_layers()
        swap.commit()
    for keys in ties.values():
        first_mod, first_attr = _owner(model, keys[0])
        for key in keys[1:]:
            mod, attr = _owner(model, key)
            mod._parameters[attr] = first_mod._parameters[first_attr]
    _, left = materialize_buffers(model, target)
    if left:
        warnings.warn(f"{_first(set(left))} of the model are non-persistent buffers (in no file) still on the meta "
                      "device; give them their values before the first forward", stacklevel=2)
    return model


def _skip_unexpected(source: _Source, model: nn.Module, expected: Mapping[str, torch.Tensor], strict: bool) -> None:
    """Leave out of ``source`` the keys the model has no place for that it declares ignorable (with a warning
    naming them) and, when not ``strict``, all others too (listed in a warning)."""
    unexpected = (set(source.tensors) | set(source.aliases)) - set(expected)
    if not unexpected:
        return
    ignored = ignorable_keys(model, unexpected)
    others = sorted(unexpected - set(ignored))
    if others and strict:
        raise SerializationError(f"{source.where} has {len(others)} tensor(s) the model has no place for: "
                                 f"{_first(set(others))}; build the same architecture the file was saved from, or "
                                 "pass strict=False to skip them")
    if ignored:
        warnings.warn(f"{source.where}: skipping {ignored}, which {type(model).__name__} declares ignorable "
                      "(non-persistent buffers or _keys_to_ignore_on_load_unexpected)", stacklevel=3)
    if others:
        warnings.warn(f"{source.where}: skipping {len(others)} tensor(s) the model has no place for "
                      f"(strict=False): {others}", stacklevel=3)
    for name in unexpected:
        source.aliases.pop(name, None)
    kept = set(expected) | set(source.aliases.values())
    source.tensors = {n: t for n, t in source.tensors.items() if n in kept}


def _build_all(model: nn.Module, modules: Mapping[str, Any], where: str,
               ) -> tuple[dict[int, QuantModule], dict[int, nn.Module]]:
    """Empty quantized layers for a header's ``modules`` entries, keyed by ``id`` of the model's layer they replace,
    and those layers (``(swaps, currents)``)."""
    swaps: dict[int, QuantModule] = {}
    currents: dict[int, nn.Module] = {}
    for name in sorted(modules):
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise SerializationError(f"{where} has a quantized layer {name!r} that the model lacks: it "
                                     "was saved from another architecture") from None
        q = _build(name, modules[name], current, where)
        if name == "":  # the model itself is the layer: it cannot be replaced in place, only filled
            if type(current) is not type(q):
                raise SerializationError(f"{where} holds a single {type(q).__name__}; the model must be one "
                                         f"too (it is {type(current).__name__}), or wrap the layer in a container")
            continue
        swaps[id(current)], currents[id(current)] = q, current
    return swaps, currents


def install_layers(model: nn.Module, modules: Mapping[str, Any], where: str) -> None:
    """Swap ``model``'s layers for the empty (meta-device) quantized layers that ``modules`` (a header's layer
    entries, see :func:`module_entry`) describe, for a loader that fills every tensor by name afterwards
    (transformers' ``from_pretrained``). ``where`` names the checkpoint in messages."""
    swaps, currents = _build_all(_check_model(model), modules, where)
    with Swap(model) as swap:
        for key, q in swaps.items():
            swap.replace(currents[key], q)
        swap.route_encoder_layers()
        swap.commit()


def header_of(model: nn.Module) -> dict[str, Any]:
    """``{layer name: header entry}`` of every quantized layer of ``model`` (each must be frozen)."""
    quantized = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantModule)]
    for name, m in quantized:
        _check_saveable(name, m)
    return {name: module_entry(m) for name, m in quantized}


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


def _loaded_state(model: nn.Module) -> list[tuple[dict, str, Any]]:
    """Every parameter/buffer slot of ``model`` with its current value, for :func:`_put_back`."""
    return [(m._parameters if n in m._parameters else m._buffers, n, t)
            for m in model.modules() for n, t in (*m._parameters.items(), *m._buffers.items())]


def _put_back(model: nn.Module, originals: list[tuple[dict, str, Any]]) -> None:
    """Undo a partial ``load_state_dict(assign=True)``: every slot gets its original tensor object again."""
    for slots, name, tensor in originals:
        slots[name] = tensor


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    prefix, _, attr = key.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), attr
