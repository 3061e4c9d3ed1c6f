"""The ``monoquant`` command (also ``python -m monoquant``).

``monoquant [--plugin MODULE] quantize IN OUT --bits 4|8 | --format F [--group-size 128] [--skip PATTERN ...]
[--model FOLDER_OR_CONFIG_JSON] [--conv1d PATTERN ...] [--layer GLOB=CLASS ...] [--symmetric|--affine]``
    Quantizes a checkpoint without the model's code: every floating-point tensor named ``*.weight`` (or
    ``weight``) becomes the registered layer class a ``--layer GLOB=CLASS`` pattern names for it, else the one
    registered for its module's type in the model given with ``--model``, else -- the documented fallback, since
    a checkpoint alone cannot say which layer a tensor belongs to -- the class registered
    as the fallback for its rank (``rank_fallback``: ``QuantLinear`` for 2 dimensions, ``QuantConv1d/2d/3d`` for
    3, 4 or 5), unless it matches a skip pattern, has fewer than 1,024 elements, or (INT4) has no group size
    that divides its rows. ``--format`` takes any registered format (:data:`~monoquant.formats.FORMATS`);
    ``--plugin MODULE`` imports a module first, so the formats and layer classes it registers are known.
    Everything else (biases, norms, embeddings, buffers) is copied unchanged. Input: a
    ``.safetensors`` file, a sharded ``*.safetensors.index.json`` with its shards, or a torch state-dict
    file (read with ``weights_only=True``). Safetensors input is read one tensor at a time and the output
    written as it is produced, so memory stays near the largest tensor, not the checkpoint's size.
    The output is the same format :func:`monoquant.save` writes: load it with
    ``mq.load(FloatModel(), OUT)``.

    Which 2-D ``*.weight`` tensors are *not* ``nn.Linear`` weights cannot be told from a checkpoint alone.
    The default skip patterns ``*embed*`` and ``*norm*`` (globs on the layer name, i.e. the tensor name
    without ``.weight``) keep the usual embedding and normalisation tables in float; add ``--skip`` for
    others (``*wte``, ``*wpe``, ``shared``...). If one slips through, ``mq.load`` names it.

    ``--model FOLDER_OR_CONFIG_JSON`` (a transformers model folder or its ``config.json``) lets the model decide
    instead of the rank: it is built on the meta device (nothing allocated or downloaded) and each weight becomes
    the class registered for its float module's type (GPT-2's ``Conv1D``: ``QuantHFConv1D``; norms and modules
    with no registered class stay float); a ``*.weight`` the model does not have is an error. ``--layer``
    patterns still win::

        monoquant quantize gpt2.safetensors gpt2-int4.safetensors --bits 4 --model gpt2-folder \\
            --skip '*wte' --skip '*wpe'

    Without ``--model``, layers stored transposed (``[in, out]``), as transformers' ``Conv1D`` in GPT-2, are
    named with ``--conv1d`` (globs on the layer name): their weight is transposed before quantizing and they load as
    :class:`~monoquant.nn.QuantHFConv1D`. A GPT-2 checkpoint::

        monoquant quantize gpt2.safetensors gpt2-int4.safetensors --bits 4 --skip '*wte' --skip '*wpe' \\
            --conv1d '*.c_attn' --conv1d '*.c_proj' --conv1d '*.c_fc'


``monoquant quantize-pretrained SRC DST --bits 4|8 | --format F [--method rtn|mse|gptq] [--sequential]
[--calibration TOKENS.pt] [--batch-size 8]``
    Quantizes a Hugging Face model folder one block at a time with :func:`monoquant.quantize_pretrained`
    (needs transformers): DST/model.safetensors plus copies of SRC's config and tokenizer files. GPTQ needs
    ``--calibration``: a torch file holding a 2-D tensor of token ids, fed in batches of ``--batch-size`` rows.
    Rerun the same command after a kill to resume.

``monoquant [--plugin MODULE] inspect FILE``
    Prints the header of a monoquant file: versions, each quantized layer's class, scheme, weight shape and
    stored bytes, and totals (a custom format's file with the ``--plugin`` that registers it). For a Hub
    GPTQ/AWQ checkpoint (a ``.safetensors`` file, an index, or a folder holding them): its layout, bits, group
    size and act-order, per layer (:func:`monoquant.hub_formats.describe`).

``monoquant doctor [--build]``
    Prints the CPU features the kernels use, which kernels can run here, and the compiled kernels' build state,
    cache folder and this installation's build folder (:mod:`monoquant.doctor`); ``--build`` builds them now.

Errors (bad arguments, unreadable or corrupt files) print one line to stderr and exit with status 1 (2 for
usage errors); there is no traceback. ``quantize`` checks before writing anything that OUT is not one of the
files it reads (IN or a shard of its index, compared by inode, so links count), that every shard an index
lists lies inside the index's folder, that no input tensor has a name the output uses for a quantized
layer's buffers (``a.scale`` next to a quantized ``a.weight``), and that no ``.pt`` tensor is sparse or a
view claiming more data than its storage holds (a stride-0 ``expand``). A weight holding NaN or Inf stops
the run with the same error ``quantize_`` raises. On any error OUT is left as it was and no temporary
file remains (see :class:`monoquant.safetensors_io.StreamWriter`).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import importlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from . import functional as F
from . import hub_formats, schemes
from . import safetensors_io as stio
from .errors import ConfigError, MonoQuantError, SerializationError
from .formats import FORMATS, IntegerFormat, MethodConfig, WeightSpec
from .nn import LAYERS, QuantHFConv1D, QuantModule, layer_class, quant_class_for
from .pipeline import meta_model
from .rules import DEFAULT_MIN_PARAMS
from .serialization import file_metadata, module_entry, parse_metadata

DEFAULT_SKIP = ("*embed*", "*norm*")
"""Layer-name globs that ``monoquant quantize`` keeps in float unless ``--no-default-skip`` is given."""

CHUNK_ELEMENTS = 1 << 18
"""Weights are quantized this many elements (whole rows) at a time, to bound temporary memory."""



def rank_fallbacks() -> dict[int, type[QuantModule]]:
    """Weight rank -> the layer class ``quantize`` takes for it when no ``--layer`` pattern names one: the first
    registered class with ``rank_fallback`` for that rank (Linear for 2-D, ``QuantConv1d/2d/3d`` for 3-5-D)."""
    table: dict[int, type[QuantModule]] = {}
    for cls in LAYERS.values():
        if cls.rank_fallback:
            for rank in cls.float_weight_ranks:
                table.setdefault(rank, cls)
    return table


ModelLayers = dict[str, tuple[str, type[QuantModule] | None]]
"""Layer name -> (its float module's type name, the quantized class registered for that type or ``None``)."""


def model_layers(config: Path) -> ModelLayers:
    """Every module of the transformers model of ``config`` (a folder with ``config.json``, or that file), built
    on the meta device (nothing allocated), with the layer class :func:`~monoquant.nn.quant_class_for` gives it.
    Names are listed with and without the model's ``base_model_prefix`` (``transformer.h.0`` and ``h.0``), so
    checkpoints of the bare model and of its head model both match."""
    model = meta_model(config)
    prefix = getattr(model, "base_model_prefix", "") or ""
    table: ModelLayers = {}
    for name, module in model.named_modules():
        cls = quant_class_for(module)
        entry = (type(module).__name__, cls if cls is not None and cls.float_weight_ranks else None)
        table[name] = entry
    for name, entry in list(table.items()):
        if prefix and name.startswith(prefix + "."):
            table.setdefault(name[len(prefix) + 1:], entry)
        elif prefix and name and not name.startswith(prefix + "."):
            table.setdefault(f"{prefix}.{name}", entry)
    return table


# ---- reading checkpoints -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def _safetensors_tensors(headers: Sequence[stio.Header]) -> Iterator[_Tensor]:
    for header in headers:
        fh = open(header.path, "rb", buffering=0)  # noqa: SIM115 - one handle per shard, closed when exhausted
        try:
            for name, info in header.tensors.items():
                yield _Tensor(name, info.dtype, info.shape, lambda info=info, fh=fh: stio.read_tensor(fh, info))
        finally:
            fh.close()


Table = list[tuple[str, torch.dtype, tuple[int, ...]]]


@dataclass(frozen=True)
class _Checkpoint:
    files: list[Path]  # every file read: IN itself, and the shards an index lists
    table: Table
    tensors: Callable[[], Iterator[_Tensor]]


def _open_checkpoint(path: Path) -> _Checkpoint:
    """The checkpoint's files, tensor table, and a function that yields its tensors one at a time."""
    if not path.exists():
        raise SerializationError(f"{path}: no such file")
    if path.is_dir():
        raise SerializationError(f"{path} is a directory; give a .safetensors file, a *.safetensors.index.json "
                                 "or a torch state-dict file")
    if path.name.endswith(".index.json"):
        files = [path, *stio.index_shards(path)]
        headers = [stio.read_header(shard) for shard in files[1:]]
    elif path.suffix == ".safetensors":
        files, headers = [path], [stio.read_header(path)]
    else:
        state = _torch_state_dict(path)
        table = [(n, t.dtype, tuple(t.shape)) for n, t in state.items()]
        return _Checkpoint([path], table, lambda: (_Tensor(n, t.dtype, tuple(t.shape), lambda t=t: t)
                                                   for n, t in state.items()))
    seen: set[str] = set()
    for h in headers:
        dup = seen.intersection(h.tensors)
        if dup:
            raise SerializationError(f"{h.path}: tensor {sorted(dup)[0]!r} appears in more than one shard")
        seen.update(h.tensors)
    table = [(n, i.dtype, i.shape) for h in headers for n, i in h.tensors.items()]
    return _Checkpoint(files, table, lambda: _safetensors_tensors(headers))


def _check_storage(path: Path, name: str, t: torch.Tensor) -> None:
    """Refuse tensors whose data is not plainly stored: sparse, meta, or views that repeat their storage.

    A few bytes of storage viewed with stride 0 (``expand``) or overlapping strides can claim any shape:
    quantizing it would materialise the whole claimed size. A view with a stride-0 dimension, or claiming more
    bytes than its storage holds, is refused, so the memory a tensor needs is bounded by the file's size.
    """
    if t.layout != torch.strided or t.device.type != "cpu":
        raise SerializationError(f"{path}: tensor {name!r} is {t.layout} on {t.device}; only dense tensors with "
                                 "data can be quantized (save it with .to_dense() / real weights)")
    nbytes = t.numel() * t.element_size()
    storage = t.untyped_storage().nbytes()
    repeated = any(size > 1 and stride == 0 for size, stride in zip(t.shape, t.stride()))
    if t.numel() and (repeated or nbytes > storage):
        raise SerializationError(f"{path}: tensor {name!r} claims shape {list(t.shape)} ({nbytes} bytes) but is a "
                                 f"view repeating {storage} bytes of storage (expanded or overlapping strides); "
                                 "save it with .contiguous() (refusing to materialise it)")


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # old (non-zip) format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean "not a readable state dict"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SerializationError(f"{path} is neither safetensors nor a torch state-dict file readable with "
                       f"weights_only=True: {first}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning checkpoints
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise SerializationError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    for name, t in obj.items():
        _check_storage(path, name, t)
    return obj


# ---- planning ------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    name: str
    shape: tuple[int, ...]
    layer: str = ""
    quant: QuantModule | None = None  # an empty meta-device layer: buffer names, shapes, dtypes
    reason: str = ""


def _matching(patterns: Sequence[str], layer: str, name: str) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(layer, p) or fnmatch.fnmatchcase(name, p)), None)


LayerPatterns = Sequence[tuple[str, type[QuantModule]]]
"""``(glob, layer class)`` from ``--layer GLOB=CLASS`` (and ``--conv1d GLOB``), first match wins."""


def _is_weight(name: str) -> bool:
    return name == "weight" or name.endswith(".weight")


def _layer_name(weight: str) -> str:
    return weight[: -len("weight")].rstrip(".")


def _plan(name: str, dtype: torch.dtype, shape: tuple[int, ...], spec: WeightSpec, skip: Sequence[str],
          has_bias: bool, layers: LayerPatterns = (), model: ModelLayers | None = None) -> _Plan:
    plan = _Plan(name, shape)
    if not _is_weight(name):
        plan.reason = "not a weight"
        return plan
    layer = _layer_name(name)
    named = next((cls for pattern, cls in layers if _matching([pattern], layer, name)), None)
    if named is not None and len(shape) in named.float_weight_ranks:
        cls = named
    elif model is not None:  # the model says which float module holds this weight (cmd_quantize checked it has it)
        module_type, cls = model[layer]
        if cls is None or len(shape) not in cls.float_weight_ranks:
            plan.reason = f"{module_type}: no quantized layer class for it"
            return plan
    else:
        cls = rank_fallbacks().get(len(shape))
    if not dtype.is_floating_point or cls is None:
        plan.reason = f"{len(shape)}-D {str(dtype).removeprefix('torch.')}"
        return plan
    hit = _matching(skip, layer, name)
    if hit is not None:
        plan.reason = f"skipped by pattern {hit!r}"
        return plan
    numel = math.prod(shape)
    if numel < DEFAULT_MIN_PARAMS:
        plan.reason = f"too small ({numel} < {DEFAULT_MIN_PARAMS} weights)"
        return plan
    cols = math.prod(cls.stored_weight_shape(shape)[1:])
    reason = spec.unfit_reason(cols)
    if reason is not None:
        plan.reason = reason
        return plan
    q = cls.empty_for_weight(shape, has_bias, spec, group_size=spec.resolve_group_size(cols), device="meta",
                             dtype=dtype)
    plan.layer, plan.quant = layer, q
    return plan


def _outputs(plan: _Plan, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    if plan.quant is None:
        return [(plan.name, dtype, plan.shape)]
    prefix = f"{plan.layer}." if plan.layer else ""
    return [(prefix + k, t.dtype, tuple(t.shape)) for k, t in plan.quant.state_dict().items() if k != "bias"]


def _quantize(plan: _Plan, weight: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    """Stored buffers of ``weight`` (quantized a few rows at a time) and its SQNR in dB."""
    q = plan.quant
    w2d = q.float_weight(SimpleNamespace(weight=weight))  # the stored layout, as from the float layer
    w2d = w2d.reshape(w2d.shape[0], -1)
    step = max(1, CHUNK_ELEMENTS // max(1, w2d.shape[1]))
    parts, signal, noise = [], 0.0, 0.0
    for i in range(0, w2d.shape[0], step):
        chunk = w2d[i:i + step]
        F.check_finite_weight(chunk, plan.layer, f"no output was written. Fix the checkpoint, or keep the layer in "
                              f"float with --skip '{plan.layer}'")
        stored = schemes.quantize_weight(q.spec, chunk, q.group_size)
        approx = schemes.dequantize_weight(q.spec, stored, w2d.shape[1], q.group_size, torch.float64)
        s, n = F.signal_noise_powers(chunk, approx)
        signal, noise = signal + s, noise + n
        parts.append(stored)
    tensors = [getattr(parts[0], f) if f in q.spec.shared_buffers else torch.cat([getattr(p, f) for p in parts])
               for f in q.spec.buffer_names() if getattr(parts[0], f) is not None]
    return tensors, F.sqnr_from_powers(signal, noise)


# ---- commands ------------------------------------------------------------------------------------------------
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def cli_formats() -> dict[str, type[WeightSpec]]:
    """The formats ``--format`` can name: every registered one that can be built from the command line's options
    (its fields all have defaults), highest precision first."""
    usable = {}
    for kind, cls in FORMATS.items():
        try:
            cls()
        except (TypeError, ConfigError):
            continue
        usable[kind] = cls
    return dict(sorted(usable.items(), key=lambda item: -item[1].bits))


def _with_field(field: str) -> list[str]:
    return [kind for kind, cls in cli_formats().items() if field in {f.name for f in dataclasses.fields(cls)}]


def _bits_format(bits: int) -> str:
    """``--bits N``: the registered integer format with N-bit weights."""
    return next(kind for kind, cls in FORMATS.items() if issubclass(cls, IntegerFormat) and cls.bits == bits)


def _spec(args: argparse.Namespace) -> WeightSpec:
    symmetric = True if args.symmetric else (False if args.affine else None)
    kind = args.format or _bits_format(args.bits)
    options: dict = {}
    for flag, field, value in (("--group-size", "group_size", args.group_size),
                               ("--symmetric/--affine", "symmetric", symmetric)):
        if value is None:
            continue
        takes = _with_field(field)
        if kind not in takes:
            raise ConfigError(f"{flag} appl{'ies' if '/' not in flag else 'y'} to {' and '.join(takes)}, not {kind}")
        options[field] = value
    return cli_formats()[kind](**options)


def _check_output(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an OUT that is one of the files read (IN, or a shard its index lists), by inode, not by name."""
    if out.suffix != ".safetensors":
        raise ConfigError(f"OUT must end in .safetensors, got {out.name!r}")
    if out.is_dir():
        raise ConfigError(f"OUT {out} is a directory; give a file path such as {out / 'model.safetensors'}")
    if not out.exists():
        return
    for src in inputs:
        if src.exists() and os.path.samefile(src, out):
            what = "IN" if src == inputs[0] else f"shard {src.name} of IN"
            raise ConfigError(f"OUT must differ from IN and its shards: {out} is the same file as {what} ({src}); "
                              "the input is read while the output is written, so write to another path")


def _check_collisions(plans: Sequence[_Plan], table: Table) -> Table:
    """The output's tensor table, after checking that no two tensors would be written under one name."""
    out_table: Table = []
    writer_of: dict[str, _Plan] = {}
    for plan, (_, dtype, _) in zip(plans, table):
        for out in _outputs(plan, dtype):
            first = writer_of.setdefault(out[0], plan)
            if first is not plan:
                quantized, other = (first, plan) if first.quant is not None else (plan, first)
                layer = quantized.layer
                raise ConfigError(f"input tensors {quantized.name!r} and {other.name!r} would both be written as "
                                  f"{out[0]!r} (a quantized layer stores qweight/scale/zero_point next to its other "
                                  f"tensors); keep layer {layer!r} in float with --skip '{layer}', or rename the "
                                  "tensors")
            out_table.append(out)
    return out_table


def cmd_quantize(args: argparse.Namespace) -> int:
    _map_large_allocations()
    src, out = Path(args.input), Path(args.output)
    _check_output(out, [src])
    spec = _spec(args)
    skip = [*(() if args.no_default_skip else DEFAULT_SKIP), *args.skip]
    ckpt = _open_checkpoint(src)
    _check_output(out, ckpt.files)
    table, tensors = ckpt.table, ckpt.tensors
    names = {n for n, _, _ in table}
    layers = _layer_patterns(args)
    model = _checked_model_layers(args.model, table) if args.model else None
    plans = [_plan(n, d, s, spec, skip, has_bias=n.endswith("weight") and f"{n[:-6]}bias" in names,
                   layers=layers, model=model) for n, d, s in table]
    _check_conv1d_patterns(args.conv1d, table, plans)
    _check_layer_patterns(layers, table)
    out_table = _check_collisions(plans, table)
    if not args.allow_unquantized and all(p.quant is None for p in plans):
        reasons = sorted({p.reason for p in plans})
        raise ConfigError(f"no tensor of {src} would be quantized (every one stays float: {'; '.join(reasons[:3])}"
                          f"{'; ...' if len(reasons) > 3 else ''}); no output was written. Change the options, or "
                          "pass --allow-unquantized to write the file anyway")
    modules = {p.layer: module_entry(p.quant, geometry=False) for p in plans if p.quant is not None}
    total = sum(math.prod(s) * d.itemsize for _, d, s in table)
    rows: list[tuple[str, str, str, str, int, int]] = []
    with stio.StreamWriter(out, out_table, file_metadata(modules, {})) as writer, \
            tqdm(total=total, unit="B", unit_scale=True, desc="quantizing", file=sys.stderr,
                 disable=True if args.no_progress else None) as bar:
        for plan, t in zip(plans, tensors()):
            value = t.load()
            before = value.numel() * value.element_size()
            if plan.quant is None:
                writer.write(plan.name, value)
                rows.append((plan.name, "x".join(map(str, t.shape)), "float (" + plan.reason + ")", "", before, before))
            else:
                stored, sqnr = _quantize(plan, value)
                after = 0
                for (name, _, _), s in zip(_outputs(plan, t.dtype), stored):
                    writer.write(name, s)
                    after += s.numel() * s.element_size()
                rows.append((plan.name, "x".join(map(str, t.shape)), plan.quant.scheme(), f"{sqnr:.1f}", before, after))
                del stored
            del value
            bar.update(before)
    _print_summary(rows, out)
    return 0


def _pretrained_spec(args: argparse.Namespace) -> WeightSpec:
    spec = _spec(args)
    if args.method == "rtn" and not args.sequential:
        return spec
    if args.method == "rtn" or spec.method_config is None:
        raise ConfigError(f"--method {args.method} and --sequential apply to int8 and int4 (--sequential to gptq)")
    return spec.with_method(MethodConfig(args.method, sequential=True if args.sequential else None))


def _token_batches(path: str | None, batch_size: int) -> list[torch.Tensor] | None:
    """Batches of ``batch_size`` rows from a torch file holding one 2-D integer tensor of token ids."""
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    if path is None:
        return None
    tokens = torch.load(path, weights_only=True)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        raise ConfigError(f"--calibration {path} must hold one 2-D integer tensor of token ids [samples, tokens] "
                          "(torch.save(ids, path)); it holds a " + (f"{tokens.dim()}-D {tokens.dtype} tensor"
                                                                    if isinstance(tokens, torch.Tensor)
                                                                    else type(tokens).__name__))
    return list(tokens.split(batch_size))


def cmd_quantize_pretrained(args: argparse.Namespace) -> int:
    from .pipeline import quantize_pretrained

    spec = _pretrained_spec(args)
    batches = _token_batches(args.calibration, args.batch_size)
    report = quantize_pretrained(args.input, args.output, spec, batches, max_batches=args.max_batches,
                                 progress=False if args.no_progress else None)
    print(f"{len(report.quantized)} layers quantized ({report.size_ratio:.3f}x the float size) -> "
          f"{Path(args.output) / 'model.safetensors'}")
    return 0


def _checked_model_layers(config: str, table: Table) -> ModelLayers:
    """:func:`model_layers` of ``--model``, after checking that the model has a module for every ``*.weight``."""
    model = model_layers(Path(config))
    missing = [n for n, _, _ in table if _is_weight(n) and _layer_name(n) not in model]
    if missing:
        raise ConfigError(f"{len(missing)} weight(s) of the checkpoint are not in the model of --model {config}: "
                          f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; pass the config of the "
                          "model this checkpoint was saved from, or leave --model out to pick layers by rank")
    return model


def _check_conv1d_patterns(patterns: Sequence[str], table: Table, plans: Sequence[_Plan]) -> None:
    """A ``--conv1d`` pattern that names no 2-D weight is a typo: without it those layers would be quantized
    as ``[out, in]`` Linear weights, which ``mq.load`` then rejects."""
    for pattern in patterns:
        hits = [p for (_, _, shape), p in zip(table, plans) if p.name.endswith("weight") and len(shape) == 2
                and _matching([pattern], p.name[: -len("weight")].rstrip("."), p.name)]
        if not hits:
            raise ConfigError(f"--conv1d {pattern!r} matches no 2-D *.weight tensor of the checkpoint; give the "
                              "layer names as globs, e.g. '*.c_attn' for GPT-2's h.0.attn.c_attn")


def _layer_patterns(args: argparse.Namespace) -> list[tuple[str, type[QuantModule]]]:
    """``--conv1d GLOB`` (as ``--layer GLOB=QuantHFConv1D``) and ``--layer GLOB=CLASS``, checked against LAYERS."""
    pairs: list[tuple[str, type[QuantModule]]] = [(p, QuantHFConv1D) for p in args.conv1d]
    for item in args.layer:
        pattern, _, name = item.rpartition("=")
        cls = layer_class(name)
        if not pattern or cls is None or not cls.float_weight_ranks:
            known = sorted(n for n, c in LAYERS.items() if c.float_weight_ranks)
            raise ConfigError(f"--layer {item!r}: give GLOB=CLASS with CLASS one of {', '.join(known)} (a layer class "
                              "registered by an imported module counts too: --plugin MODULE)")
        pairs.append((pattern, cls))
    return pairs


def _check_layer_patterns(layers: LayerPatterns, table: Table) -> None:
    """A ``--layer`` pattern that names no weight of a rank its class takes is a typo."""
    for pattern, cls in layers:
        if cls is QuantHFConv1D:
            continue  # --conv1d, checked with its own message
        if not any(n.endswith("weight") and len(shape) in cls.float_weight_ranks
                   and _matching([pattern], n[: -len("weight")].rstrip("."), n) for n, _, shape in table):
            ranks = "/".join(map(str, cls.float_weight_ranks))
            raise ConfigError(f"--layer {pattern}={cls.__name__} matches no {ranks}-D *.weight tensor of the "
                              "checkpoint; give the layer names as globs, e.g. '*.up'")


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_MMAP_THRESHOLD_BYTES = 1 << 20


def _map_large_allocations() -> None:
    """In this process, serve allocations of 1 MiB and more with their own pages, returned on free (glibc only).

    glibc otherwise raises its mmap threshold as large blocks are freed and then serves the per-chunk
    temporaries of quantization from its heaps, which fragment: converting 12 x 64 MiB tensors peaked at
    120-360 MB resident depending on the run, against a steady ~120 MB (under 2x the largest tensor) with a
    fixed threshold. Called by ``monoquant quantize`` only; importing monoquant changes nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def _print_summary(rows: list[tuple[str, str, str, str, int, int]], out: Path) -> None:
    head = ("tensor", "shape", "scheme", "SQNR dB", "bytes before", "bytes after")
    body = [(n, s, sc, q, _fmt_bytes(b), _fmt_bytes(a)) for n, s, sc, q, b, a in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    for r in [head, *body]:
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    before, after = sum(r[4] for r in rows), sum(r[5] for r in rows)
    n_quant = sum(1 for r in rows if r[3])
    print(f"{n_quant} of {len(rows)} tensors quantized; {_fmt_bytes(before)} -> {_fmt_bytes(after)} "
          f"({after / max(before, 1):.3f}x); wrote {out}")


def cmd_inspect(args: argparse.Namespace) -> int:
    hub = hub_formats.describe(args.file)  # a Hub GPTQ/AWQ file or folder: its own summary
    if hub is not None:
        print("\n".join(hub.lines()))
        return 0
    header = stio.read_header(args.file)
    modules, aliases = parse_metadata(header)
    meta = header.metadata
    size = header.path.stat().st_size
    print(f"{header.path}: {_fmt_bytes(size)}, {len(header.tensors)} tensors ({len(aliases)} aliases)")
    print(f"format {meta['format']} v{meta['format_version']}, written by monoquant {meta.get('monoquant_version')} "
          f"with torch {meta.get('torch_version')}")
    layer_bytes = {}
    for name in modules:
        prefix = f"{name}." if name else ""
        layer_bytes[name] = sum(i.nbytes for k, i in header.tensors.items()
                                if k.startswith(prefix) and "." not in k[len(prefix):])
    head = ("layer", "class", "scheme", "weight shape", "bytes")
    body = [(n or "<model>", e.get("class", "?"), e.get("scheme", "?"), "x".join(map(str, e.get("weight_shape", []))),
             _fmt_bytes(layer_bytes[n])) for n, e in sorted(modules.items())]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    for r in [head, *body]:
        print("  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    quant = sum(layer_bytes.values())
    other = sum(i.nbytes for i in header.tensors.values()) - quant
    print(f"{len(modules)} quantized layers: {_fmt_bytes(quant)}; other tensors: {_fmt_bytes(other)}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    for line in doctor.report(build=args.build):
        print(line)
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = _Parser(prog="monoquant", description="Quantize checkpoints and inspect monoquant files.")
    parser.add_argument("--version", action="version", version=f"monoquant {__version__}")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first, so the formats and layer classes it registers can be selected "
                             "and inspected; repeatable")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    q = sub.add_parser("quantize", help="quantize the weight matrices and conv kernels of a checkpoint",
                       description="Quantize every 2-D weight matrix and 3-5-D conv kernel (*.weight) of a "
                                   "checkpoint without model code. Load the result with mq.load(FloatModel(), OUT).")
    q.add_argument("input", metavar="IN", help="a .safetensors file, a *.safetensors.index.json (sharded), or a "
                                               "torch state-dict file")
    q.add_argument("output", metavar="OUT", help="the .safetensors file to write")
    fmt = q.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--bits", type=int, choices=(4, 8), help="4: INT4 group-wise; 8: INT8 per channel")
    fmt.add_argument("--format", choices=list(cli_formats()),
                     help=f"a registered weight format by name ({', '.join(cli_formats())}; --plugin adds others)")
    q.add_argument("--group-size", type=int, default=None, help="group size along the input dimension for int4 "
                                                               "(default 128) and nf4 (default 64)")
    q.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="keep layers whose name (or tensor name) matches this glob in float; repeatable")
    q.add_argument("--no-default-skip", action="store_true",
                   help=f"do not add the default skip patterns {' '.join(DEFAULT_SKIP)}")
    q.add_argument("--conv1d", action="append", default=[], metavar="PATTERN",
                   help="layers whose 2-D weight is stored [in, out] as in transformers' Conv1D (GPT-2: '*.c_attn' "
                        "'*.c_proj' '*.c_fc'); they load as QuantHFConv1D; repeatable")
    q.add_argument("--layer", action="append", default=[], metavar="GLOB=CLASS",
                   help="quantize layers matching GLOB as the registered layer class CLASS (e.g. "
                        "'*.up=QuantConvTranspose2d'); without one, a weight's rank picks the class (2-D: QuantLinear, "
                        "3-5-D: QuantConv1d/2d/3d); repeatable")
    q.add_argument("--model", metavar="FOLDER_OR_CONFIG_JSON",
                   help="a transformers model folder or its config.json: each weight becomes the layer class "
                        "registered for its module's type (GPT-2's Conv1D: QuantHFConv1D) instead of one picked by "
                        "rank; the model is built on the meta device, nothing is downloaded or allocated")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", action="store_true", help="symmetric scales, no zero-points "
                                                              "(default for --bits 8)")
    sym.add_argument("--affine", action="store_true", help="scales and zero-points (default for --bits 4)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.add_argument("--allow-unquantized", action="store_true",
                   help="write the output even when no tensor gets quantized (by default that is an error, exit 1)")
    q.set_defaults(func=cmd_quantize)
    p = sub.add_parser("quantize-pretrained", help="quantize a Hugging Face model folder block by block",
                       description="Quantize a Hugging Face model folder (config.json + safetensors shards) one "
                                   "block at a time, so models larger than memory fit; resumable after a kill. "
                                   "Writes DST/model.safetensors (load with mq.load) and copies the other files.")
    p.add_argument("input", metavar="SRC", help="the model folder (save_pretrained output)")
    p.add_argument("output", metavar="DST", help="the output folder")
    fmt = p.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--bits", type=int, choices=(4, 8), help="4: INT4 group-wise; 8: INT8 per channel")
    fmt.add_argument("--format", choices=list(cli_formats()), help="a registered weight format by name")
    p.add_argument("--group-size", type=int, default=None, help="group size for int4 (default 128) and nf4 (64)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", action="store_true", help="symmetric scales, no zero-points")
    sym.add_argument("--affine", action="store_true", help="scales and zero-points")
    p.add_argument("--method", choices=("rtn", "mse", "gptq"), default="rtn", help="how weights are rounded "
                   "(gptq needs --calibration)")
    p.add_argument("--sequential", action="store_true", help="gptq: each block on the outputs of the blocks "
                                                             "before it as quantized")
    p.add_argument("--calibration", metavar="FILE", help="a torch file holding a 2-D tensor of token ids "
                                                          "[samples, tokens]")
    p.add_argument("--batch-size", type=int, default=8, help="calibration rows per batch (default 8)")
    p.add_argument("--max-batches", type=int, default=None, help="use at most this many batches (default all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_quantize_pretrained)
    i = sub.add_parser("inspect", help="print the header of a monoquant file",
                       description="Print versions, each quantized layer's scheme and size, and totals.")
    i.add_argument("file", metavar="FILE")
    i.set_defaults(func=cmd_inspect)
    d = sub.add_parser("doctor", help="print CPU features, which kernels can run here and the build state",
                       description="Print the CPU features monoquant's kernels use, which kernels can run here, "
                                   "and the compiled kernels' build state and cache folder.")
    d.add_argument("--build", action="store_true", help="build the compiled kernels now if they are not built "
                                                        "(otherwise they are built at first use)")
    d.set_defaults(func=cmd_doctor)
    return parser


def _os_error_message(e: OSError, args: argparse.Namespace) -> str:
    """``FILE: reason`` for an OS error; when the error names no file, the command's files are named instead."""
    files = [e.filename] if e.filename else [p for p in (getattr(args, "input", None), getattr(args, "output", None),
                                                          getattr(args, "file", None)) if p]
    reason = e.strerror or str(e) or type(e).__name__
    return f"{' -> '.join(map(str, files))}: {reason}"


SIGPIPE = 13
"""The signal number a Unix tool dies of when its reader closes the pipe (exit status 141 in a shell)."""


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. captured in tests)
        pass


def _import_plugins(argv: Sequence[str]) -> str | None:
    """Import the ``--plugin`` modules named before the command (they register formats and layer classes, which
    the parser's choices list); an error line, or ``None``."""
    for i, arg in enumerate(argv):
        if arg in ("quantize", "quantize-pretrained", "inspect"):
            break
        module = arg.partition("=")[2] if arg.startswith("--plugin=") else (
            argv[i + 1] if arg == "--plugin" and i + 1 < len(argv) else None)
        if module:
            try:
                importlib.import_module(module)
            except Exception as e:  # any import failure of a user module: one line, no traceback
                return f"--plugin {module}: cannot import it ({type(e).__name__}: {e})"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``monoquant`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    error = _import_plugins(argv)
    if error is not None:
        print(f"monoquant: error: {error}", file=sys.stderr)
        return 1
    args = build_parser().parse_args(argv)
    group_size = getattr(args, "group_size", None)
    if group_size is not None and group_size <= 0:
        print(f"monoquant: error: --group-size must be positive, got {args.group_size}", file=sys.stderr)
        return 2
    try:
        status = args.func(args)
        sys.stdout.flush()  # a reader that left shows up here, not in the interpreter's final flush
        return status
    except BrokenPipeError:  # `monoquant inspect f | head`: the reader left; say nothing, like other Unix tools
        _stdout_to_devnull()
        return 128 + SIGPIPE
    except (MonoQuantError, OSError) as e:
        msg = str(e) if isinstance(e, MonoQuantError) else _os_error_message(e, args)
        print(f"monoquant: error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("monoquant: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["DEFAULT_SKIP", "build_parser", "main"]
