"""``quantize_pretrained``: a Hugging Face model folder quantized block by block, for models larger than memory.

The model is built from its ``config.json`` with every parameter on the meta device (buffers such as rotary
tables are computed as usual). Its repeated blocks (the largest ``nn.ModuleList``, e.g. ``model.layers``) are
taken out and replaced by :class:`_Slot` placeholders; the rest (embeddings, final norm, head) is read from the
checkpoint. Then, one block at a time: its float tensors are read from the shards (one tensor at a time, no
mapping), the calibration activations entering it are run through it, it is quantized with
:func:`~monoquant.quantize_` (so GPTQ with ``sequential=True`` sees the outputs of the blocks already quantized,
exactly as in ``quantize_`` on the whole model), its tensors are written to a part file and it is freed. The
head is quantized last, on the activations leaving the last block, and the parts are streamed into one
monoquant file. Peak memory is one block's float weights + the carried activations + one block's Hessians +
the non-block parts, not the model.

Everything written before the final file lives in ``DST/.monoquant-parts/``: a rerun after a kill resumes after
the last block whose part and carried activations were both written. With ``torch.distributed`` initialised,
every rank runs its share of the calibration batches (``batches[rank::world_size]``), statistics are
all-reduced by ``quantize_`` as usual, and rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from . import safetensors_io as stio
from . import tuner
from .calibration import needs_calibration
from .config import QuantConfig, WeightSpec, as_config
from .data import DEFAULT_MAX_BATCHES, ForwardFn, iter_batches, run_batch, tqdm_disable
from .errors import ConfigError, MissingExtraError, SerializationError
from .formats import method_of
from .model_keys import materialize_buffers
from .quantize import candidate_class, quantize_
from .report import QuantReport
from .rules import SkipRules, exact_pattern
from .serialization import file_metadata, parse_metadata, save

PARTS_DIR = ".monoquant-parts"
"""The folder under ``dst`` that holds finished blocks and carried activations until the final file is written."""

__all__ = ["PARTS_DIR", "quantize_pretrained"]


class _Captured(BaseException):
    """Ends a forward pass once the first block's inputs are recorded (a ``BaseException``, so a model's own
    ``except Exception`` cannot swallow it)."""


class _Slot(nn.Module):
    """Stands in for a block that is not in memory: records the first block's inputs, or replays the hidden
    states the last block produced for the batch being run."""

    def __init__(self) -> None:
        super().__init__()
        self.capture: list[tuple[tuple[Any, ...], dict[str, Any]]] | None = None
        self.replay: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.capture is not None:
            self.capture.append((args, kwargs))
            raise _Captured
        if self.replay is None:
            raise ConfigError("internal error: a block placeholder ran with nothing to replay")
        return self.replay


@dataclass
class _Checkpoint:
    """Where each tensor of a (sharded) safetensors checkpoint lives."""

    tensors: dict[str, tuple[stio.Header, stio.TensorInfo]] = field(default_factory=dict)

    @classmethod
    def open(cls, src: Path) -> _Checkpoint:
        index = src / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (src / "model.safetensors").is_file():
            shards = ["model.safetensors"]
        else:
            raise SerializationError(f"{src} holds neither model.safetensors nor model.safetensors.index.json; "
                                     "save the model with save_pretrained(..., safe_serialization=True)")
        ckpt = cls()
        for shard in shards:
            header = stio.read_header(src / shard)
            for name, info in header.tensors.items():
                ckpt.tensors[name] = (header, info)
        return ckpt

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, read one at a time (shards opened once each, never mapped)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name][0].path, []).append(name)
        out = {}
        for path, group in by_file.items():
            with open(path, "rb", buffering=0) as fh:
                for name in group:
                    out[name] = stio.read_tensor(fh, self.tensors[name][1])
        return out


def meta_model(config: Path) -> nn.Module:
    """The transformers model of ``config`` (a folder with ``config.json``, or that JSON file) with every parameter
    on the meta device: its ``architectures`` class when transformers has it, else ``AutoModel``'s."""
    try:
        import transformers
    except ImportError:
        raise MissingExtraError("building a model from its config.json needs transformers, which is not "
                                "installed: pip install monoquant[transformers]") from None
    cfg = transformers.AutoConfig.from_pretrained(config)
    architectures = getattr(cfg, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)), None)
    with torch.device("meta"):  # nothing is allocated: not even one layer's weight at a time
        return cls(cfg) if cls is not None else transformers.AutoModel.from_config(cfg)


def _skeleton(src: Path) -> nn.Module:
    """The model of ``src/config.json`` with its parameters on the meta device, in eval mode, without a cache."""
    try:
        import transformers  # noqa: F401  (checked here for this message)
    except ImportError:
        raise MissingExtraError("quantize_pretrained builds the model from its config.json with transformers, "
                                "which is not installed: pip install monoquant[transformers]") from None
    if not (src / "config.json").is_file():
        raise ConfigError(f"{src} has no config.json: pass a Hugging Face model folder (save_pretrained output)")
    model = meta_model(src)
    _, left = materialize_buffers(model, torch.device("cpu"))  # rotary tables etc., as from_pretrained makes them
    if left:
        raise ConfigError(f"{type(model).__name__} has non-persistent buffers {left} that only its own code can "
                          "compute; load it whole and use mq.quantize_ instead")
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a cache would carry keys and values from batch to batch
    return model.eval()


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks: the ``nn.ModuleList`` of same-type modules holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1:
            size = sum(p.numel() for p in m.parameters())
            if best is None or size > best[0]:
                best = (size, name, m)
    if best is None:
        raise ConfigError(f"{type(model).__name__} has no nn.ModuleList of repeated blocks to quantize one at a "
                          "time; load it whole and use mq.quantize_ instead")
    return best[1], best[2]


def _state_names(module: nn.Module) -> list[str]:
    """Persistent tensors of ``module`` (parameters under every name they are registered, persistent buffers)."""
    return list(module.state_dict(keep_vars=True).keys())


def _materialise(module: nn.Module, prefix: str, ckpt: _Checkpoint, ties: dict[str, str]) -> None:
    """Read ``module``'s tensors (named ``prefix`` + their name in the checkpoint) and put them in; parameters
    tied in the model (a head sharing the embedding's weight, stored once) share one ``Parameter`` again."""
    source = {}
    for name in module.state_dict(keep_vars=True):
        key = prefix + name
        if key not in ckpt.tensors:
            key = next((a for a, b in ties.items() if b == key and a in ckpt.tensors), ties.get(key, key))
        if key not in ckpt.tensors:
            raise SerializationError(f"the checkpoint has no tensor {prefix + name!r}: it does not match its "
                                     "config.json")
        source[name] = key
    loaded = ckpt.read(sorted(set(source.values())))
    module.load_state_dict({n: loaded[k] for n, k in source.items()}, strict=True, assign=True)
    for later, first in ties.items():
        if later.startswith(prefix) and first.startswith(prefix):
            later, first = later[len(prefix):], first[len(prefix):]
            if later in source and first in source:
                owner, _, attr = later.rpartition(".")
                first_owner, _, first_attr = first.rpartition(".")
                module.get_submodule(owner)._parameters[attr] = \
                    module.get_submodule(first_owner)._parameters[first_attr]


def _ties(model: nn.Module) -> dict[str, str]:
    """``{name: first name}`` for parameters registered under several names (a head tied to the embedding)."""
    first: dict[int, str] = {}
    ties = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties[name] = first[id(p)]
        else:
            first[id(p)] = name
    return ties


def _rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank()[1] > 1:
        dist.barrier()


def _agree_min(value: int) -> int:
    if _rank()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class _Parts:
    """The resumable state under ``dst/.monoquant-parts``."""

    root: Path
    rank: int

    def block(self, i: int) -> Path:
        return self.root / f"block-{i:05d}.safetensors"

    @property
    def head(self) -> Path:
        return self.root / "head.safetensors"

    @property
    def carry(self) -> Path:
        return self.root / f"carry-rank{self.rank}.pt"

    def start(self, job: dict[str, Any]) -> None:
        """Create the folder, or check that the one found belongs to the same job."""
        path = self.root / "job.json"
        found = json.loads(path.read_text()) if path.is_file() else None
        _barrier()  # every rank has looked before rank 0 writes
        if found is not None and found != job:
            raise ConfigError(f"{self.root} holds the parts of another quantization (other source, config or "
                              "calibration); delete that folder or choose another destination")
        if found is None and self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(".job.json.tmp")
            tmp.write_text(json.dumps(job, sort_keys=True))
            os.replace(tmp, path)
        _barrier()

    def first_unfinished(self, blocks: int, carrying: bool) -> int:
        """The first block to quantize: every earlier one has its part written (and, when activations are
        carried, this rank's activations after it)."""
        done = 0
        while done < blocks and self.block(done).is_file():
            done += 1
        if carrying:  # the activations saved are those after one block: resume right after it, or from the start
            carried = torch.load(self.carry, weights_only=True)["after"] + 1 if self.carry.is_file() else 0
            done = carried if carried <= done else 0
        return _agree_min(done)


def _job(src: Path, cfg: QuantConfig, batches: int, world: int) -> dict[str, Any]:
    return {"source": str(src.resolve()), "config": repr(cfg), "batches": batches, "world_size": world}


def _outputs_hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _carries_float(cfg: QuantConfig) -> bool:
    """Whether ``quantize_`` on the whole model would calibrate on float activations (one pass) rather than
    stage by stage on the outputs of quantized layers (``method="gptq", sequential=True``)."""
    return not method_of(cfg.weights).sequential


def _restrict(cfg: QuantConfig, keep: set[str], candidates: list[str]) -> QuantConfig:
    """``cfg`` with every candidate outside ``keep`` excluded (the user's own rules still apply)."""
    rules = cfg.skip if cfg.skip is not None else SkipRules.defaults()
    excluded = [exact_pattern(n) for n in candidates if n not in keep]
    return dataclasses.replace(cfg, skip=dataclasses.replace(rules, exclude=(*rules.exclude, *excluded)))


def quantize_pretrained(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    config: QuantConfig | WeightSpec,
    calibration_data: Iterable[Any] | None = None,
    *,
    forward_fn: ForwardFn | None = None,
    max_batches: int | None = DEFAULT_MAX_BATCHES,
    progress: bool | None = None,
) -> QuantReport:
    """Quantize the Hugging Face model folder ``src`` into ``dst`` one block at a time, never holding the model.

    Args:
        src: a folder written by ``save_pretrained(..., safe_serialization=True)``: ``config.json`` and
            ``model.safetensors`` or sharded ``model-*.safetensors`` with ``model.safetensors.index.json``.
        dst: the output folder: ``dst/model.safetensors`` (a monoquant file: ``mq.load(model, that file)`` with
            the model built from ``dst/config.json``) and copies of ``src``'s other files (config, tokenizer).
        config: as for :func:`~monoquant.quantize_`. ``method="gptq", sequential=True`` quantizes each block on
            the outputs of the blocks before it as already quantized; other configs that need data calibrate on
            float activations, as ``quantize_`` does. Either way the result equals ``quantize_`` on the whole
            model with the same data.
        calibration_data: batches the whole model takes (token ids, or dicts such as a tokenizer's output);
            needed when ``config`` needs data (GPTQ, static activations). With ``torch.distributed``
            initialised every rank passes the same data and runs ``batches[rank::world_size]`` of it.
        forward_fn: ``(model, batch) -> output`` for batches ``model(batch)`` cannot take.
        max_batches: use at most this many batches of ``calibration_data`` (``None``: all).
        progress: a progress bar per block, with its ETA; ``None`` shows it only when stderr is a terminal.

    Resumable: a rerun with the same arguments after a kill skips every block already finished (the parts in
    ``dst/.monoquant-parts``, deleted once ``dst/model.safetensors`` is written).

    Memory: one block's float weights and their quantized twin, the calibration activations entering and
    leaving the block, one block's GPTQ Hessians, and the non-block parts (embeddings, final norm, head).

    Returns:
        One :class:`QuantReport` for the whole model (layer names as in the full model).

    Raises:
        MissingExtraError: transformers is not installed.
        ConfigError: no ``config.json``, no repeated blocks, a config that needs data without
            ``calibration_data``, or ``dst`` holding the parts of another job.
        SerializationError: a checkpoint that does not match its config, or an unwritable ``dst``.
    """
    src, dst = Path(src), Path(dst)
    cfg = as_config(config)
    rank, world = _rank()
    batches = [] if calibration_data is None else list(iter_batches(calibration_data, max_batches, progress=False))
    if calibration_data is not None and len(batches) < world:
        raise ConfigError(f"{len(batches)} calibration batches cannot be split over {world} ranks; pass at least "
                          "one batch per rank")
    mine = batches[rank::world]
    model = _skeleton(src)
    ckpt = _Checkpoint.open(src)
    blocks_name, blocks = _find_blocks(model)
    ties = _ties(model)
    originals = list(blocks)
    slots = [_Slot() for _ in originals]
    for i, slot in enumerate(slots):
        blocks[i] = slot
    _materialise(model, "", ckpt, ties)

    parts = _Parts(dst / PARTS_DIR, rank)
    if rank == 0:
        dst.mkdir(parents=True, exist_ok=True)
    _barrier()
    parts.start(_job(src, cfg, len(batches), world))
    report = QuantReport()

    # the non-block layers that run before the first block (an embedding) are quantized first, as in quantize_
    candidates = [n for n, m in model.named_modules() if candidate_class(m, cfg) is not None]
    before = _run_before_first_block(model, slots[0], mine[:1], forward_fn, set(candidates))
    if before:
        _extend(report, _quantize_part(model, _restrict(cfg, before, candidates), None, forward_fn, "", progress))

    data = bool(mine)
    carry_float = _carries_float(cfg)
    start = parts.first_unfinished(len(originals), data)
    args = _capture(model, slots[0], mine, forward_fn) if data else []
    hidden = [a[0][0] if a[0] else a[1].pop("hidden_states") for a in args]
    for a in args:
        a[0] = a[0][1:] if a[0] else a[0]
    outputs_tuple = False
    if data and start > 0:
        carried = torch.load(parts.carry, weights_only=True)
        hidden, outputs_tuple = carried["hidden"], carried["tuple"]

    bar = tqdm(range(len(originals)), desc="quantizing blocks", unit="block", initial=start,
               disable=tqdm_disable(progress))
    for i in range(start, len(originals)):
        block = originals[i]
        prefix = f"{blocks_name}.{i}."
        _materialise(block, prefix, ckpt, ties)

        def run(b: nn.Module, j: int, inputs: list[torch.Tensor] = hidden) -> Any:
            return b(inputs[j], *args[j][0], **args[j][1])

        with torch.no_grad():
            floats = [_outputs_hidden(run(block, j)) for j in range(len(hidden))] if data and carry_float else None
        block_report = _quantize_part(block, cfg, list(range(len(hidden))) if data else None, run, prefix,
                                      progress=False)
        if i == 0 and needs_calibration(block):
            raise ConfigError("this config needs calibration data (GPTQ or static activation quantization): pass "
                              "calibration_data=... (a few batches of token ids)")
        _extend(report, block_report)
        if data:
            # the static kernel table, as in calibration: the activations carried on must not depend on timings
            with torch.no_grad(), tuner.tuning(False):
                outs = [run(block, j) for j in range(len(hidden))] if floats is None else None
            outputs_tuple = isinstance(outs[0], (tuple, list)) if outs else outputs_tuple
            hidden = floats if floats is not None else [_outputs_hidden(o) for o in outs]
        if rank == 0:
            save(block, parts.block(i))
        if data:
            _atomic_torch_save({"after": i, "hidden": hidden, "tuple": outputs_tuple}, parts.carry)
        originals[i] = None  # type: ignore[call-overload]
        del block
        gc.collect()
        bar.update(1)
    bar.close()

    # the rest (final norm, head) on the activations leaving the last block
    def replay(m: nn.Module, j: int) -> Any:
        slots[-1].replay = (hidden[j],) if outputs_tuple else hidden[j]
        for s in slots[:-1]:
            s.replay = slots[-1].replay
        return run_batch(m, mine[j], forward_fn)

    rest = [n for n in candidates if n not in before]
    if rest:
        _extend(report, _quantize_part(model, _restrict(cfg, set(rest), candidates),
                                       list(range(len(mine))) if data else None, replay, "", progress))
    if rank == 0:
        save(model, parts.head)
        _write_final(dst / "model.safetensors", parts.head, [(f"{blocks_name}.{i}.", parts.block(i))
                                                             for i in range(len(originals))])
        _copy_side_files(src, dst)
    _barrier()
    if rank == 0:
        shutil.rmtree(parts.root)
    return report


def _quantize_part(module: nn.Module, cfg: QuantConfig, data: list[int] | None, forward_fn: Any, prefix: str,
                   progress: bool | None) -> QuantReport:
    import warnings

    from .report import NothingQuantizedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingQuantizedWarning)
        part = quantize_(module, cfg, calibration_data=data, forward_fn=forward_fn, max_batches=None,
                         progress=progress)
    for row in part.layers:
        row.name = prefix + row.name
    return part


def _extend(report: QuantReport, part: QuantReport) -> None:
    report.layers += [r for r in part.layers if not r.reason.startswith("already quantized")]
    report.warnings += part.warnings
    report.notes += [n for n in part.notes if n not in report.notes]


def _run_before_first_block(model: nn.Module, first: _Slot, batches: list[Any], forward_fn: ForwardFn | None,
                            candidates: set[str]) -> set[str]:
    """The candidate layers that run before the first block, found on one batch. Without data there is none:
    no activation is carried, so every layer outside the blocks is quantized at the end, with the same result."""
    if not batches:
        return set()
    seen: set[str] = set()
    names = {id(m): n for n, m in model.named_modules() if n in candidates}
    handles = [m.register_forward_pre_hook(lambda mod, a: seen.add(names[id(mod)]))
               for n, m in model.named_modules() if n in candidates]
    try:
        _capture(model, first, batches, forward_fn)
    finally:
        for h in handles:
            h.remove()
    return seen


def _capture(model: nn.Module, first: _Slot, batches: list[Any], forward_fn: ForwardFn | None) -> list[list[Any]]:
    """The first block's positional and keyword inputs for each batch, as ``[args, kwargs]``."""
    first.capture = []
    try:
        with torch.no_grad():
            for batch in batches:
                with contextlib.suppress(_Captured):
                    run_batch(model, batch, forward_fn)
        return [[list(a), dict(k)] for a, k in first.capture]
    finally:
        first.capture = None


def _write_final(path: Path, head: Path, blocks: list[tuple[str, Path]]) -> None:
    """Stream the head part and every block part (names prefixed) into one monoquant file at ``path``."""
    sources = [("", stio.read_header(head))] + [(p, stio.read_header(f)) for p, f in blocks]
    modules: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    table = []
    for prefix, header in sources:
        mods, als = parse_metadata(header)
        modules.update({prefix + k: v for k, v in mods.items()})
        aliases.update({prefix + k: prefix + v for k, v in als.items()})
        table += [(prefix + n, info.dtype, info.shape) for n, info in header.tensors.items()]
    with stio.StreamWriter(path, table, file_metadata(modules, aliases)) as writer:
        for prefix, header in sources:
            with open(header.path, "rb", buffering=0) as fh:
                for name, info in header.tensors.items():
                    writer.write(prefix + name, stio.read_tensor(fh, info))


def _copy_side_files(src: Path, dst: Path) -> None:
    """Every file of ``src`` but the float weights (config, generation config, tokenizer) goes to ``dst``."""
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt")):
            shutil.copy2(f, dst / f.name)

