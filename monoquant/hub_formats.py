"""INT4 checkpoints in the Hub's GPTQ and AWQ layouts, converted to and from monoquant's :class:`~monoquant.Int4`.

Layouts read (all tensors of one linear layer ``prefix``; ``K`` input features, ``N`` outputs, ``G`` groups):

==========  ============================================  =============================================
tensor      GPTQ (AutoGPTQ / GPTQModel)                   AWQ GEMM (AutoAWQ)
==========  ============================================  =============================================
qweight     int32 ``[K/8, N]``: word ``r`` holds input    int32 ``[K, N/8]``: word ``c`` holds outputs
            rows ``8r..8r+7``, row ``8r+i`` in bits       ``8c..8c+7``, nibble ``i`` (bits ``4i..4i+3``)
            ``4i..4i+3``                                  is output ``8c + (0,2,4,6,1,3,5,7)[i]``
qzeros      int32 ``[G, N/8]``: nibble ``i`` of word      int32 ``[G, N/8]``, interleaved like qweight
            ``c`` is output ``8c+i``; v1 stores
            ``zero - 1``, v2 stores ``zero``
scales      float16 ``[G, N]``                            float16 ``[G, N]``
g_idx       int32 ``[K]``: group of each input feature    (none)
            (act-order when not ascending)
==========  ============================================  =============================================

Both dequantize as ``W[n, k] = scales[g(k), n] * (q[k, n] - zero[g(k), n])``. Converted layers are
:class:`~monoquant.nn.QuantLinear` with ``Int4(group_size=K/G)`` affine buffers holding the same codes,
zero-points and (exactly widened) scales, so the dequantized weights are bit-identical. An act-order
``g_idx`` becomes the layer's ``input_permutation``: the columns are stored sorted by group (the layout the
INT4 kernels run) and the input is permuted the same way, ``x[..., p] @ W[:, p]^T == x @ W^T``.

Which layout and zero-point version a file uses comes from its quantization config (``quant_method``,
``checkpoint_format``, ``version``, ``bits``), passed to :func:`monoquant.load` or found next to the file
(``config.json``'s ``quantization_config``, ``quantize_config.json``, ``quant_config.json``); without one,
the shapes tell GPTQ from AWQ and GPTQ zero-points are read as v1 (what the Hub's GPTQ files use).

:func:`gptq_tensors` writes the other way: the INT4 layers of a model in the GPTQ layout, v1 by default.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import safetensors_io as stio
from .errors import SerializationError
from .formats import Int4, spec_to_dict
from .nn import QuantLinear, QuantModule, quant_class_for
from .packing import pack_int4, unpack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AWQ GEMM packing: nibble ``i`` of a word holds output column ``AWQ_ORDER[i]`` of its eight."""
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
HUB_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")
"""The tensors of one GPTQ/AWQ layer in a checkpoint (``g_idx``: GPTQ only; ``bias``: when the layer has one)."""
CONFIG_FILES = ("config.json", "quantize_config.json", "quant_config.json")
"""Files next to a checkpoint that may hold its quantization config, in the order they are looked for."""
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 2}
"""``format=`` names :func:`monoquant.save` accepts for GPTQ files, and the zero-point version each writes."""


@dataclass(frozen=True)
class HubLayout:
    """How a checkpoint's INT4 tensors are laid out: ``method`` ``"gptq"`` or ``"awq"``, and for GPTQ the
    zero-point ``version`` (1: stored as ``zero - 1``; 2: stored as is)."""

    method: str | None = None
    version: int = 1


# ---- recognising ----------------------------------------------------------------------------------------
def hub_layers(tensors: Mapping[str, Any]) -> list[str]:
    """The names (prefixes) of the GPTQ/AWQ layers in ``tensors`` (name -> anything with a ``dtype``): those with
    an int32 ``{prefix}.qweight``. Sorted."""
    return sorted(name[: -len(".qweight")] for name, t in tensors.items()
                  if isinstance(name, str) and name.endswith(".qweight") and getattr(t, "dtype", None) == torch.int32)


def is_hub_checkpoint(tensors: Mapping[str, Any]) -> bool:
    """Whether ``tensors`` (name -> anything with a ``dtype``) hold GPTQ/AWQ layers: an int32 ``*.qweight``
    with its ``*.scales`` beside it."""
    return any(isinstance(name, str) and name.endswith(".qweight") and getattr(t, "dtype", None) == torch.int32
               and f"{name[:-len('qweight')]}scales" in tensors for name, t in tensors.items())


def config_dict(config: Any) -> dict[str, Any]:
    """A quantization config as a plain dict: a mapping, or an object with ``to_dict()`` (transformers'
    ``GPTQConfig``/``AwqConfig``); a whole model config's ``quantization_config`` is taken from it."""
    if config is None:
        return {}
    if hasattr(config, "to_dict") and not isinstance(config, Mapping):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise SerializationError(f"quantization_config must be a dict or a transformers GPTQConfig/AwqConfig, "
                                 f"got {type(config).__name__}")
    inner = config.get("quantization_config")
    return config_dict(inner) if inner is not None else dict(config)


def config_near(path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The quantization config of the checkpoint at ``path``: from a file in :data:`CONFIG_FILES` next to it
    (the first that has one), else from its safetensors metadata (``quantization_config``, as
    :func:`gptq_tensors`' writer stores it); ``{}`` when there is none."""
    return _config_and_source(path, metadata)[0]


def _config_and_source(path: str | os.PathLike, metadata: Mapping[str, str] | None = None
                       ) -> tuple[dict[str, Any], str | None]:
    """:func:`config_near`, and where the config was found (a file's path, ``"the file's metadata"``, ``None``)."""
    folder = Path(path).parent
    for name in CONFIG_FILES:
        file = folder / name
        if file.is_file():
            try:
                config = config_dict(json.loads(file.read_text()))
            except (OSError, json.JSONDecodeError) as e:
                raise SerializationError(f"{file} is not readable JSON ({e}); fix or remove it, or pass "
                                         "quantization_config= to mq.load") from e
            if config.get("quant_method") or "bits" in config or "w_bit" in config:
                return config, str(file)
    text = (metadata or {}).get("quantization_config")
    if text:
        try:
            return config_dict(json.loads(text)), "the file's metadata"
        except json.JSONDecodeError as e:
            raise SerializationError(f"{path}: corrupt quantization_config metadata ({e})") from e
    return {}, None


def _name(value: Any) -> str:
    """A config value as a lower-case string (transformers' configs hold enums such as ``QuantizationMethod.AWQ``)."""
    return str(getattr(value, "value", value)).lower()


def layout_of(config: Mapping[str, Any], where: str) -> HubLayout:
    """The :class:`HubLayout` a quantization config describes (empty config: worked out per layer from shapes)."""
    if not config:
        return HubLayout()
    method = config.get("quant_method")
    if method is None:  # AutoAWQ's quant_config.json names no method; its fields do
        method = "awq" if {"w_bit", "q_group_size", "zero_point", "version"} & set(config) else "gptq"
    method = _name(method)
    bits = config.get("bits", config.get("w_bit", 4))
    if bits != 4:
        raise SerializationError(f"{where} holds {bits}-bit {method.upper()} weights; monoquant reads 4-bit GPTQ "
                                 "and AWQ checkpoints only (quantize the float model with mq.Int8() instead)")
    if method == "gptq":
        fmt = _name(config.get("checkpoint_format", "gptq"))
        if fmt not in GPTQ_FORMATS:
            raise SerializationError(f"{where}: unknown GPTQ checkpoint_format {fmt!r}; monoquant reads "
                                     f"{sorted(GPTQ_FORMATS)}")
        return HubLayout("gptq", GPTQ_FORMATS[fmt])
    if method == "awq":
        version = _name(config.get("version", "gemm"))
        if version != "gemm" or config.get("zero_point", True) is False:
            raise SerializationError(f"{where}: AWQ version {version!r} (zero_point={config.get('zero_point')}) "
                                     "is not supported; monoquant reads AWQ GEMM checkpoints with zero-points")
        return HubLayout("awq")
    raise SerializationError(f"{where}: quant_method {method!r} is neither 'gptq' nor 'awq'; monoquant reads "
                             "those two Hub INT4 layouts (and its own files)")


# ---- unpacking --------------------------------------------------------------------------------------------
def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """``words`` (int32 ``[..., M]``) -> its eight 4-bit fields, low bits first, as uint8 ``[..., M, 8]``."""
    return ((words.to(torch.int32).unsqueeze(-1) >> _SHIFTS.to(words.device)) & 0xF).to(torch.uint8)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_nibbles`: ``[..., M, 8]`` values 0..15 -> int32 ``[..., M]`` (two's complement)."""
    words = (codes.to(torch.int64) << _SHIFTS.to(torch.int64).to(codes.device)).sum(-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)


@dataclass
class Int4Layer:
    """One INT4 layer in monoquant's terms: codes ``[N, K]`` in stored column order, zero-points and scales
    ``[N, G]`` and the input permutation (``None``: columns in the float layer's order)."""

    codes: torch.Tensor
    zero_point: torch.Tensor
    scale: torch.Tensor
    permutation: torch.Tensor | None

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scale.shape[1]


def _check_shape(where: str, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise SerializationError(f"{where}: {name} is {list(t.shape)}, expected {list(shape)} for this layer's "
                                 "shape; the checkpoint is from another architecture or another packing")


def unpack_gptq(where: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor | None, n: int, k: int, version: int = 1) -> Int4Layer:
    """A GPTQ-packed layer of ``n`` outputs and ``k`` inputs as an :class:`Int4Layer` (see the module docstring).

    Groups must hold ``k / G`` features each (GPTQ's layout; only a last, shorter group could break this).
    """
    groups = scales.shape[0]
    _check_shape(where, "qweight", qweight, (k // 8, n))
    _check_shape(where, "qzeros", qzeros, (groups, n // 8))
    _check_shape(where, "scales", scales, (groups, n))
    if k % 8 or n % 8 or not groups or k % groups:
        raise SerializationError(f"{where}: {groups} groups cannot split {k} inputs evenly (or {n}x{k} is not a "
                                 "multiple of 8): monoquant's INT4 layers need groups of one size")
    group_size = k // groups
    codes = _nibbles(qweight).permute(0, 2, 1).reshape(k, n).t()
    zeros = _nibbles(qzeros).reshape(groups, n).t() + (1 if version == 1 else 0)
    permutation = None
    if g_idx is not None:
        _check_shape(where, "g_idx", g_idx, (k,))
        g_idx = g_idx.to(torch.int64)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups or bool(
                (torch.bincount(g_idx, minlength=groups) != group_size).any()):
            raise SerializationError(f"{where}: g_idx does not give each of the {groups} groups {group_size} "
                                     "input features; the checkpoint is corrupt")
        order = torch.argsort(g_idx, stable=True)
        if not bool((order == torch.arange(k)).all()):
            permutation, codes = order, codes[:, order]
    return Int4Layer(codes.contiguous(), zeros.contiguous(), scales.float().t().contiguous(), permutation)


def unpack_awq(where: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               n: int, k: int) -> Int4Layer:
    """An AWQ-GEMM-packed layer of ``n`` outputs and ``k`` inputs as an :class:`Int4Layer`."""
    groups = scales.shape[0]
    _check_shape(where, "qweight", qweight, (k, n // 8))
    _check_shape(where, "qzeros", qzeros, (groups, n // 8))
    _check_shape(where, "scales", scales, (groups, n))
    if n % 8 or not groups or k % groups:
        raise SerializationError(f"{where}: {groups} groups cannot split {k} inputs evenly (or {n} outputs are "
                                 "not a multiple of 8): monoquant's INT4 layers need groups of one size")
    order = torch.argsort(torch.tensor(AWQ_ORDER))  # position of output column j among a word's nibbles
    codes = _nibbles(qweight)[..., order].reshape(k, n).t()
    zeros = _nibbles(qzeros)[..., order].reshape(groups, n).t()
    return Int4Layer(codes.contiguous(), zeros.contiguous(), scales.float().t().contiguous(), None)


# ---- reading a checkpoint into monoquant's layers ------------------------------------------------------------
def float_linear(model: nn.Module, prefix: str, where: str) -> nn.Module:
    """The ``nn.Linear`` (or its ``QuantLinear``) at ``prefix`` in ``model`` that a Hub layer is read into;
    ``SerializationError`` naming ``where`` when the model has no such layer or it is of another class."""
    try:
        current = model.get_submodule(prefix)
    except AttributeError:
        raise SerializationError(f"{where} has a quantized layer {prefix!r} that the model lacks: it was saved "
                                 "from another architecture") from None
    if (type(current) if isinstance(current, QuantModule) else quant_class_for(current)) is not QuantLinear:
        raise SerializationError(f"{where}: {prefix!r} is a {type(current).__name__} in the model; Hub GPTQ/AWQ "
                                 "tensors are read into nn.Linear layers only")
    return current


def _layout_for(layout: HubLayout, qweight: torch.Tensor, has_g_idx: bool, n: int, k: int) -> HubLayout:
    """The config's layout, or (without a config) the one ``qweight``'s shape shows."""
    if layout.method is not None:
        return layout
    if tuple(qweight.shape) == (k // 8, n) or has_g_idx:
        return HubLayout("gptq", 1)
    return HubLayout("awq")


def from_hub(tensors: Mapping[str, torch.Tensor], model: nn.Module, config: Any = None,
             where: str = "the checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Convert a GPTQ/AWQ state dict into monoquant's: ``(state, modules)`` where ``state`` holds each INT4
    layer's monoquant buffers (``qweight``, ``scale``, ``zero_point``, ``input_permutation`` for act-order,
    ``bias`` in the model's dtype) and every other tensor unchanged, and ``modules`` the header entry of each
    converted layer (as :func:`monoquant.serialization.module_entry` writes them)."""
    layout = layout_of(config_dict(config), where)
    state = dict(tensors)
    modules: dict[str, dict[str, Any]] = {}
    for prefix in hub_layers(tensors):
        here = f"{where}: layer {prefix!r}"
        current = float_linear(model, prefix, where)
        n, k = current.out_features, current.in_features
        parts = {name: state.pop(f"{prefix}.{name}", None) for name in HUB_TENSORS}
        if parts["qzeros"] is None or parts["scales"] is None:
            raise SerializationError(f"{here} has a qweight without qzeros and scales; the checkpoint is "
                                     "incomplete (monoquant reads GPTQ/AWQ layers with zero-points)")
        layer_layout = _layout_for(layout, parts["qweight"], parts["g_idx"] is not None, n, k)
        if layer_layout.method == "gptq":
            layer = unpack_gptq(here, parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], n, k,
                                layer_layout.version)
        else:
            layer = unpack_awq(here, parts["qweight"], parts["qzeros"], parts["scales"], n, k)
        float_dtype = current.float_dtype if isinstance(current, QuantModule) else current.weight.dtype
        state[f"{prefix}.qweight"] = pack_int4(layer.codes)
        state[f"{prefix}.scale"] = layer.scale
        state[f"{prefix}.zero_point"] = layer.zero_point.to(torch.uint8)
        if layer.permutation is not None:
            state[f"{prefix}.input_permutation"] = layer.permutation
        if parts["bias"] is not None:
            state[f"{prefix}.bias"] = parts["bias"].to(float_dtype)
        spec = Int4(group_size=layer.group_size)
        modules[prefix] = {
            "class": QuantLinear.__name__, "spec": spec_to_dict(spec), "scheme": spec.describe(layer.group_size),
            "group_size": layer.group_size, "weight_shape": [n, k], "bias": parts["bias"] is not None,
            "float_dtype": str(float_dtype).removeprefix("torch."), "compute_dtype": None, "layout": spec.layout,
            "input_permutation": layer.permutation is not None,
        }
    return state, modules


# ---- writing the GPTQ layout --------------------------------------------------------------------------------
def pack_gptq(layer: Int4Layer, version: int = 1) -> dict[str, torch.Tensor]:
    """``layer`` in the GPTQ layout: ``qweight``, ``qzeros``, ``scales`` (float16) and ``g_idx``."""
    n, k = layer.codes.shape
    groups = layer.scale.shape[1]
    zeros = layer.zero_point.to(torch.int64) - (1 if version == 1 else 0)
    if int(zeros.min()) < 0 or int(zeros.max()) > 15:
        bad = int(zeros.min() if int(zeros.min()) < 0 else zeros.max()) + (version == 1)
        other = "gptq_v2" if version == 1 else "gptq"
        raise SerializationError(f"a zero-point of {bad} cannot be stored in GPTQ v{version} (it holds "
                                 f"zero{' - 1' if version == 1 else ''} in 4 bits); save with format={other!r}, "
                                 "or quantize with mq.Int4(symmetric=True)")
    scales = layer.scale.t().to(torch.float16)
    if not bool(torch.isfinite(scales).all()) or bool(((scales == 0) & (layer.scale.t() != 0)).any()):
        raise SerializationError("a scale is out of float16's range, which GPTQ files store scales in; this "
                                 "model's weights cannot be written as GPTQ (keep monoquant's own format)")
    codes, g_idx = layer.codes, torch.arange(k) // layer.group_size
    if layer.permutation is not None:
        inverse = torch.argsort(layer.permutation)
        codes, g_idx = codes[:, inverse], g_idx[inverse]
    return {"qweight": _pack_nibbles(codes.t().reshape(k // 8, 8, n).permute(0, 2, 1)),
            "qzeros": _pack_nibbles(zeros.t().reshape(groups, n // 8, 8)),
            "scales": scales.contiguous(), "g_idx": g_idx.to(torch.int32)}


def _int4_layer(name: str, q: QuantModule) -> Int4Layer:
    """The INT4 content of quantized layer ``q`` (``SerializationError`` if GPTQ files cannot hold it)."""
    if type(q) is not QuantLinear or q.spec.layout != Int4.layout or getattr(q, "input_quantizer", None) is not None:
        raise SerializationError(f"layer {name!r} is {type(q).__name__} {q.scheme()}; format='gptq' holds "
                                 "weight-only INT4 nn.Linear layers only: save with mq.save(model, path) instead, "
                                 "or skip that layer when quantizing")
    n, k = q.weight2d_shape
    if n % 8 or k % 8:
        raise SerializationError(f"layer {name!r} is {n}x{k}; GPTQ packs 8 codes per int32 along both "
                                 "dimensions, so both must be multiples of 8: skip that layer when quantizing")
    codes = unpack_int4(q.qweight.cpu(), k)
    zero = q.zero_point.cpu() if q.zero_point is not None else torch.full_like(q.scale, q.spec.symmetric_offset,
                                                                                dtype=torch.uint8, device="cpu")
    perm = q.input_permutation.cpu() if q.input_permutation is not None else None
    return Int4Layer(codes, zero, q.scale.float().cpu(), perm)


def gptq_tensors(model: nn.Module, version: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of ``model`` in the GPTQ layout, and the quantization config to write with them.

    Every quantized layer must be a weight-only INT4 ``QuantLinear`` of one group size; other tensors are kept
    as they are (a tensor shared under several names once, under its first name). Scales are stored in
    float16, as the format does: a scale that float16 does not hold exactly is rounded (relative change at
    most 2^-11), so the written weights can differ from the model's by that much; files read from GPTQ
    checkpoints hold float16 scales already and are written back bit-exactly.
    """
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantModule)}
    if not quantized:
        raise SerializationError("format='gptq' writes INT4 layers, and this model has no quantized layer: "
                                 "mq.quantize_(model, mq.QuantConfig(weights=mq.Int4())) first")
    layers = {name: _int4_layer(name, m) for name, m in quantized.items()}
    sizes = {layer.group_size for layer in layers.values()}
    if len(sizes) > 1:
        raise SerializationError(f"the INT4 layers use group sizes {sorted(sizes)}; a GPTQ file has one: quantize "
                                 "with a group size that divides every layer's input size")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, t in model.state_dict().items():
        prefix = name.rpartition(".")[0]
        if prefix in layers:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().cpu().contiguous()
    for name, layer in layers.items():
        prefix = f"{name}." if name else ""
        tensors.update({prefix + k: v for k, v in pack_gptq(layer, version).items()})
        bias = quantized[name].bias
        if bias is not None:
            tensors[prefix + "bias"] = bias.detach().cpu()
    config = {"quant_method": "gptq", "bits": 4, "group_size": sizes.pop(),
              "desc_act": any(layer.permutation is not None for layer in layers.values()),
              "sym": all(getattr(m.spec, "symmetric", False) for m in quantized.values()),
              "static_groups": False, "true_sequential": True,
              "checkpoint_format": next(f for f, v in GPTQ_FORMATS.items() if v == version)}
    return tensors, config


# ---- describing a checkpoint (monoquant inspect) ----------------------------------------------------------
@dataclass(frozen=True)
class HubLayerInfo:
    """One GPTQ/AWQ layer as its tensors' shapes describe it (``shape``: ``(outputs, inputs)``)."""

    name: str
    layout: HubLayout
    shape: tuple[int, int]
    group_size: int
    act_order: bool
    nbytes: int


@dataclass(frozen=True)
class HubSummary:
    """What :func:`describe` found: the files read, the quantization config and where it came from, the layers,
    and the bytes of all tensors."""

    path: Path
    files: list[Path]
    config: dict[str, Any]
    config_source: str
    layers: list[HubLayerInfo]
    total_bytes: int

    def lines(self) -> list[str]:
        """A human-readable report: a summary line per setting, then one row per layer, then totals."""
        def mib(n: int) -> str:
            return f"{n / 2**20:.2f} MiB"

        methods = sorted({_layout_name(layer.layout) for layer in self.layers})
        groups = sorted({layer.group_size for layer in self.layers})
        ordered = sum(layer.act_order for layer in self.layers)
        out = [f"{self.path}: Hub INT4 checkpoint ({', '.join(methods)}), {len(self.files)} file(s), "
               f"{mib(self.total_bytes)}",
               f"quantization_config: {self.config_source}",
               f"bits 4, group size {', '.join(map(str, groups))}, act-order: " + (
                   "yes" if ordered == len(self.layers) else f"{ordered} of {len(self.layers)} layers" if ordered
                   else "no")]
        head = ("layer", "layout", "weight shape", "group size", "act-order", "bytes")
        body = [(layer.name, _layout_name(layer.layout), f"{layer.shape[0]}x{layer.shape[1]}", str(layer.group_size),
                 "yes" if layer.act_order else "no", mib(layer.nbytes)) for layer in self.layers]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        out += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                for r in [head, *body]]
        quant = sum(layer.nbytes for layer in self.layers)
        out.append(f"{len(self.layers)} INT4 layers: {mib(quant)}; other tensors: {mib(self.total_bytes - quant)}")
        out.append("load with: import monoquant.hf, then AutoModel*.from_pretrained(folder); or mq.load(model, file)")
        return out


def _layout_name(layout: HubLayout) -> str:
    return "AWQ GEMM" if layout.method == "awq" else f"GPTQ v{layout.version}"


def _checkpoint_files(path: Path) -> list[Path] | None:
    """The safetensors files of a checkpoint given as a file, an index or a folder (``None``: none there)."""
    if path.is_dir():
        index, single = path / "model.safetensors.index.json", path / "model.safetensors"
        if index.is_file():
            return stio.index_shards(index)
        return [single] if single.is_file() else None
    if path.name.endswith(".safetensors.index.json"):
        return stio.index_shards(path)
    return [path] if path.suffix == ".safetensors" and path.is_file() else None


def describe(path: str | os.PathLike) -> HubSummary | None:
    """A summary of the GPTQ/AWQ checkpoint at ``path`` (a ``.safetensors`` file, a ``*.safetensors.index.json``
    or a folder holding one of them), read from the files' headers, the ``g_idx`` tensors and the quantization
    config next to them; ``None`` when ``path`` holds no GPTQ/AWQ layer (a monoquant file, a float checkpoint).

    Raises ``SerializationError`` for unreadable files and for configs monoquant cannot read (8-bit, AWQ GEMV)."""
    path = Path(path)
    files = _checkpoint_files(path)
    if files is None:
        return None
    headers = [stio.read_header(f) for f in files]
    tensors = {name: (h, info) for h in headers for name, info in h.tensors.items()}
    if not is_hub_checkpoint({name: info for name, (_, info) in tensors.items()}):
        return None
    config, found = _config_and_source(files[0], headers[0].metadata)
    source = "none found (layout worked out from the tensor shapes; GPTQ zero-points read as v1)"
    if found is not None:
        source = f"{found}: " + ", ".join(f"{k}={config[k]}" for k in (
            "quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format", "version", "w_bit",
            "q_group_size", "zero_point") if k in config)
    layout = layout_of(config, str(path))
    layers = []
    for prefix in hub_layers({name: info for name, (_, info) in tensors.items()}):
        parts = {n: tensors[f"{prefix}.{n}"] for n in HUB_TENSORS if f"{prefix}.{n}" in tensors}
        if "scales" not in parts:
            raise SerializationError(f"{path}: layer {prefix!r} has a qweight without scales; the checkpoint is "
                                     "incomplete")
        qweight, (groups, n) = parts["qweight"][1].shape, parts["scales"][1].shape
        layer_layout = layout if layout.method else HubLayout("gptq" if qweight[1] == n or "g_idx" in parts
                                                              else "awq")
        # GPTQ packs along the inputs, AWQ along the outputs
        k = 8 * qweight[0] if layer_layout.method == "gptq" else qweight[0]
        act_order = False
        if "g_idx" in parts:
            header, _ = parts["g_idx"]
            g_idx = stio.read_tensors(header, [f"{prefix}.g_idx"])[f"{prefix}.g_idx"]
            act_order = bool((g_idx[1:] < g_idx[:-1]).any())
        layers.append(HubLayerInfo(prefix, layer_layout, (n, k), k // max(groups, 1), act_order,
                                   sum(info.nbytes for _, info in parts.values())))
    return HubSummary(path, files, config, source, layers, sum(info.nbytes for _, info in tensors.values()))
