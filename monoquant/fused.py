"""The compiled fused dequantize + matmul kernel and the one-pass dequantize (``csrc/fused_linear.cpp``):
building them, and calling them.

The C++ file is compiled at first use with :func:`torch.utils.cpp_extension.load` on the machine that runs
it, with ``-O3 -march=native`` so that its AVX-512 or AVX2 path matches this CPU (a portable scalar loop
otherwise; ``MONOQUANT_EXT_ARCH`` overrides ``native``, which is how the AVX2 path is tested on an AVX-512
machine). It reads the layer's stored buffers directly and accumulates in float32; see the C++ file's
header for the arithmetic. A build prints one line to stderr while it runs (``monoquant: building ... done in
28.7 s``); ``monoquant doctor --build`` does it ahead of time (nothing is built at ``pip install``).

Build cache (:func:`build_directory`): one folder per build under ``$MONOQUANT_EXT_DIR`` if set, else
``$TORCH_EXTENSIONS_DIR`` (PyTorch's own variable), else ``~/.cache/torch_extensions``. The folder's name is a
digest of the source, the CPU model and its flags, torch's version, the build flags *and the locations of this
package and of torch*, so a cache shared between machines never loads a build for another CPU, and two checkouts
or virtual environments never overwrite (and so rebuild) each other's build. A finished build is imported
directly, without running the compiler or ``ninja`` again. ``MONOQUANT_NO_EXT=1`` turns the compiled kernel
off (the PyTorch kernels remain). Without a compiler (or ``ninja``) the build fails once, :func:`load_error`
says why, and the ``fused_*`` kernels are simply not candidates: nothing else changes.

Every compiled function is also a :mod:`torch.library` custom op (``monoquant::int4_linear``, ...) with a fake
implementation, which is what torch.compile and torch.export see; eager calls go to the compiled function
directly.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("csrc") / "fused_linear.cpp"
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}
_LIB_SUFFIX = ".pyd" if sys.platform == "win32" else ".so"


def cpu_identity() -> str:
    """CPU model name and SIMD flags (from ``/proc/cpuinfo`` where present): what a build and a timing depend on."""
    model, flags = "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown":
                model = value.strip()
            elif key == "flags" and not flags:
                wanted = ("avx", "amx", "vnni", "fma", "f16c", "bf16")
                flags = " ".join(sorted(f for f in value.split() if any(w in f for w in wanted)))
    except OSError:
        import platform

        model = platform.processor() or platform.machine()
    return f"{model} [{flags}]"


def cache_root() -> Path:
    """Where builds are kept: ``$MONOQUANT_EXT_DIR``, else ``$TORCH_EXTENSIONS_DIR``, else
    ``~/.cache/torch_extensions``; each build in its own folder below (:func:`build_directory`)."""
    root = os.environ.get("MONOQUANT_EXT_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torch_extensions"


def _arch() -> str:
    """``-march`` for the build: ``MONOQUANT_EXT_ARCH`` (e.g. ``haswell`` to build and test the AVX2 path, or
    ``x86-64`` for the scalar one, on an AVX-512 machine), else ``native``."""
    return os.environ.get("MONOQUANT_EXT_ARCH", "native")


def _flags() -> list[str]:
    # -fopenmp: at::parallel_for is inlined into this file and runs serially without it
    # -ffp-contract=off: a multiply then an add stays two roundings, as in the PyTorch ops it must equal
    return ["-O3", f"-march={_arch()}", "-fopenmp", "-ffp-contract=off"]


def installation() -> str:
    """The locations of this package and of torch: part of the build's cache key, so that two checkouts or two
    virtual environments sharing one cache directory keep one build each."""
    return f"{Path(__file__).resolve().parent}|{Path(torch.__file__).resolve().parent}"


def extension_name() -> str:
    """The build's name (and folder name): ``monoquant_fused_`` and a digest of everything the build depends on."""
    key = (SOURCE.read_bytes() + cpu_identity().encode() + torch.__version__.encode()
           + " ".join(_flags()).encode() + installation().encode())
    return f"monoquant_fused_{hashlib.sha256(key).hexdigest()[:12]}"


def build_directory() -> Path:
    """The folder this installation's build lives in (:func:`cache_root` / :func:`extension_name`)."""
    return cache_root() / extension_name()


def built_library() -> Path:
    """The compiled library file; it exists once a build has finished here."""
    return build_directory() / f"{extension_name()}{_LIB_SUFFIX}"


def load() -> ModuleType | None:
    """The compiled extension, built on first call; ``None`` when disabled or when it cannot be built."""
    if "module" in _STATE:
        return _STATE["module"]  # type: ignore[return-value]
    with _LOCK:
        if "module" not in _STATE:
            _STATE["module"], _STATE["error"] = _build()
    return _STATE["module"]  # type: ignore[return-value]


def _build() -> tuple[ModuleType | None, str | None]:
    if os.environ.get("MONOQUANT_NO_EXT", "") not in ("", "0"):
        return None, "disabled by MONOQUANT_NO_EXT"
    try:
        library = built_library()
        if library.exists():  # a finished build for exactly this source, CPU, torch and installation
            try:
                return _import_library(extension_name(), library), None
            except ImportError:  # a damaged file: build it again below
                pass
        return _compile(), None
    except Exception as exc:  # no compiler, no ninja, headers missing: the PyTorch kernels remain
        return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"


def _import_library(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile() -> ModuleType:
    """Build the extension into :func:`build_directory`, saying so on one line of stderr (with the time taken)."""
    from torch.utils import cpp_extension

    folder = build_directory()
    folder.mkdir(parents=True, exist_ok=True)
    _put_ninja_on_path()
    sys.stderr.write(f"monoquant: building the compiled CPU kernels (once per installation) into {folder} ... ")
    sys.stderr.flush()
    start = time.perf_counter()
    try:
        module = cpp_extension.load(extension_name(), [str(SOURCE)], extra_cflags=_flags(),
                                    extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)
    except Exception:
        sys.stderr.write(f"failed after {time.perf_counter() - start:.1f} s; the PyTorch kernels will be used "
                         "(`monoquant doctor` says why)\n")
        raise
    sys.stderr.write(f"done in {time.perf_counter() - start:.1f} s\n")
    return module


def _put_ninja_on_path() -> None:
    """The ``ninja`` pip package installs its binary next to the interpreter, which may not be on ``PATH``."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join((ninja.BIN_DIR, path))


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the compiled kernel can run here (builds it on first call; torch.compile and torch.export take
    the answer as a constant instead of tracing the build)."""
    return load() is not None


def build_state() -> str:
    """One line on the compiled kernels here: loaded, built but not loaded yet, not built yet, disabled, or why
    they could not be built (does not build anything)."""
    if "module" in _STATE:
        module = _STATE["module"]
        return f"loaded ({module.simd()} path)" if module is not None else f"unavailable: {_STATE.get('error')}"
    if os.environ.get("MONOQUANT_NO_EXT", "") not in ("", "0"):
        return "disabled by MONOQUANT_NO_EXT"
    if built_library().exists():
        return "built (loaded at first use, without compiling)"
    return "not built yet (built at first use, or now with `monoquant doctor --build`)"


def load_error() -> str | None:
    """Why the compiled kernel is unavailable (``None`` if it loaded or was not tried yet)."""
    return _STATE.get("error")  # type: ignore[return-value]


@torch.compiler.assume_constant_result
def bf16_dot() -> bool:
    """Whether the build has the AVX512-BF16 kernels (:func:`int4_linear_bf16`, :func:`int8_linear_bf16`): it
    does where it was compiled for a CPU with ``avx512_bf16`` (builds the extension on first call)."""
    module = load()
    return module is not None and bool(module.bf16_dot())


@functools.cache
def simd() -> str:
    """The SIMD path the build compiled (``"avx512"``, ``"avx2"``, ``"scalar"``), or ``"none"`` if not built."""
    module = load()
    return module.simd() if module is not None else "none"


def compiled(name: str):
    """The compiled function ``name`` (the extension is built on first call): what the custom ops call, and what
    eager code binds once where it calls a kernel many times (:mod:`monoquant.call_plans`); never traced."""
    return getattr(load(), name)


def _op(name: str, mutates_args: tuple[str, ...] = ()):
    """Register the decorated function as the custom op ``monoquant::name`` (its CPU implementation calls the
    compiled function of that name) and return the op; ``@op.register_fake`` then gives its output shapes."""
    def register(fn):
        return torch.library.custom_op(f"monoquant::{name}", fn, mutates_args=mutates_args, device_types="cpu")
    return register


def _call(op, name: str, *args):
    """``op(*args)`` while torch.compile / torch.export trace, else the compiled function ``name`` itself: the
    same code either way, without the custom op's Python dispatch on every eager call."""
    if torch.compiler.is_compiling():
        return op(*args)
    return getattr(load(), name)(*args)


@_op("int4_linear")
def _int4_linear_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                    group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    return compiled("int4_linear")(x, qweight, scale, zero_point, group_size, bias)


@_int4_linear_op.register_fake
def _(x, qweight, scale, zero_point, group_size, bias=None):
    return x.new_empty((x.shape[0], qweight.shape[0]), dtype=torch.float32)


@_op("int8_linear")
def _int8_linear_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    zero_point: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    return compiled("int8_linear")(x, qweight, scale, zero_point, bias)


@_int8_linear_op.register_fake
def _(x, qweight, scale, zero_point, bias=None):
    return x.new_empty((x.shape[0], qweight.shape[0]), dtype=torch.float32)


def _bf16_product(x: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """The fake output of the AVX512-BF16 kernels: bf16 ``[M, N]``."""
    return x.new_empty((x.shape[0], qweight.shape[0]), dtype=torch.bfloat16)


def _int4_bf16_op(name: str):
    """The custom op ``monoquant::name`` of an INT4 AVX512-BF16 kernel (``int4_linear_bf16``, ``int4_gemm_bf16``)."""
    def impl(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
             group_size: int) -> torch.Tensor:
        return compiled(name)(x, qweight, scale, zero_point, group_size)

    op = _op(name)(impl)
    op.register_fake(lambda x, qweight, *_: _bf16_product(x, qweight))
    return op


def _int8_bf16_op(name: str):
    """The custom op of an INT8 AVX512-BF16 kernel (``int8_linear_bf16``, ``int8_gemm_bf16``)."""
    def impl(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
             zero_point: torch.Tensor | None) -> torch.Tensor:
        return compiled(name)(x, qweight, scale, zero_point)

    op = _op(name)(impl)
    op.register_fake(lambda x, qweight, *_: _bf16_product(x, qweight))
    return op


_int4_linear_bf16_op = _int4_bf16_op("int4_linear_bf16")
_int8_linear_bf16_op = _int8_bf16_op("int8_linear_bf16")


@_op("int4_gemm_bf16")
def _int4_gemm_bf16_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                       group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    return compiled("int4_gemm_bf16")(x, qweight, scale, zero_point, group_size, bias)


@_int4_gemm_bf16_op.register_fake
def _(x, qweight, scale, zero_point, group_size, bias):
    return _bf16_product(x, qweight)


@_op("int8_gemm_bf16")
def _int8_gemm_bf16_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                       bias: torch.Tensor | None) -> torch.Tensor:
    return compiled("int8_gemm_bf16")(x, qweight, scale, zero_point, bias)


@_int8_gemm_bf16_op.register_fake
def _(x, qweight, scale, zero_point, bias):
    return _bf16_product(x, qweight)


@_op("dequantize_int4", mutates_args=("out",))
def _dequantize_int4_op(out: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                        zero_point: torch.Tensor | None, group_size: int, row_start: int) -> None:
    compiled("dequantize_int4")(out, qweight, scale, zero_point, group_size, row_start)


@_dequantize_int4_op.register_fake
def _(out, qweight, scale, zero_point, group_size, row_start):
    return None


@_op("dequantize_int8", mutates_args=("out",))
def _dequantize_int8_op(out: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                        zero_point: torch.Tensor | None, row_start: int, scaled: bool) -> None:
    compiled("dequantize_int8")(out, qweight, scale, zero_point, row_start, scaled)


@_dequantize_int8_op.register_fake
def _(out, qweight, scale, zero_point, row_start, scaled):
    return None


@_op("w8a8_pack")
def _w8a8_pack_op(qweight: torch.Tensor) -> torch.Tensor:
    return compiled("w8a8_pack")(qweight)


@_w8a8_pack_op.register_fake
def _(qweight):
    n, k = qweight.shape
    return qweight.new_empty(((n + 15) // 16, (k + 1) // 2, 16, 2), dtype=torch.int8)


@_op("w8a8_gemm")
def _w8a8_gemm_op(codes: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    return compiled("w8a8_gemm")(codes, packed, n)


@_w8a8_gemm_op.register_fake
def _(codes, packed, n):
    return codes.new_empty((codes.shape[0], n), dtype=torch.int32)


@_op("direct_conv2d")
def _direct_conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pad_h: int,
                      pad_w: int) -> torch.Tensor:
    return compiled("direct_conv2d")(x, weight, bias, pad_h, pad_w)


@_direct_conv2d_op.register_fake
def _(x, weight, bias, pad_h, pad_w):
    oh, ow = x.shape[2] + 2 * pad_h - weight.shape[2] + 1, x.shape[3] + 2 * pad_w - weight.shape[3] + 1
    return x.new_empty((x.shape[0], weight.shape[0], oh, ow))


@_op("w8a8_vnni_pack")
def _w8a8_vnni_pack_op(qweight: torch.Tensor) -> torch.Tensor:
    return compiled("w8a8_vnni_pack")(qweight)


@_w8a8_vnni_pack_op.register_fake
def _(qweight):
    n, k = qweight.shape
    return qweight.new_empty(((n + 63) // 64, (k + 3) // 4, 64, 4), dtype=torch.uint8)


@_op("w8a8_vnni_linear")
def _w8a8_vnni_linear_op(x: torch.Tensor, packed: torch.Tensor, n: int, rowsum: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None, qmin: int, qmax: int, symmetric: bool, eps: float,
                         static_scale: torch.Tensor | None,
                         static_zero: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(compiled("w8a8_vnni_linear")(x, packed, n, rowsum, w_scale, bias, qmin, qmax,  # type: ignore[return-value]
                                             symmetric, eps, static_scale, static_zero))


@_w8a8_vnni_linear_op.register_fake
def _(x, packed, n, rowsum, w_scale, bias, qmin, qmax, symmetric, eps, static_scale, static_zero):
    scale = x.new_empty((x.shape[0],), dtype=torch.float32) if static_scale is None else torch.empty_like(static_scale)
    return x.new_empty((x.shape[0], n)), scale


@_op("quantize_rows")
def _quantize_rows_op(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int,
                      shift: int) -> torch.Tensor:
    return compiled("quantize_rows")(x, scale, zero_point, qmin, qmax, shift)


@_quantize_rows_op.register_fake
def _(x, scale, zero_point, qmin, qmax, shift):
    return x.new_empty(x.shape, dtype=torch.int8)


@_op("dynamic_quantize_rows")
def _dynamic_quantize_rows_op(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool,
                              eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(compiled("dynamic_quantize_rows")(x, qmin, qmax, symmetric, eps))  # type: ignore[return-value]


@_dynamic_quantize_rows_op.register_fake
def _(x, qmin, qmax, symmetric, eps):
    m = x.shape[0]
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((m,), dtype=torch.float32),
            x.new_empty((m,), dtype=torch.int32))


@_op("dynamic_fake_quantize_rows")
def _dynamic_fake_quantize_rows_op(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool, eps: float) -> torch.Tensor:
    return compiled("dynamic_fake_quantize_rows")(x, qmin, qmax, symmetric, eps)


@_dynamic_fake_quantize_rows_op.register_fake
def _(x, qmin, qmax, symmetric, eps):
    return torch.empty_like(x)


@_op("rescale_rows")
def _rescale_rows_op(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     x_zero: torch.Tensor | None, w_rowsum: torch.Tensor | None, bf16_out: bool) -> torch.Tensor:
    return compiled("rescale_rows")(acc, x_scale, w_scale, bias, x_zero, w_rowsum, bf16_out)


@_rescale_rows_op.register_fake
def _(acc, x_scale, w_scale, bias, x_zero, w_rowsum, bf16_out):
    return acc.new_empty(acc.shape, dtype=torch.bfloat16 if bf16_out else torch.float32)


@_op("mse_clip_errors")
def _mse_clip_errors_op(view: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ratios: torch.Tensor, qmin: int,
                        qmax: int, symmetric: bool, eps: float) -> torch.Tensor:
    return compiled("mse_clip_errors")(view, lo, hi, ratios, qmin, qmax, symmetric, eps)


@_mse_clip_errors_op.register_fake
def _(view, lo, hi, ratios, qmin, qmax, symmetric, eps):
    return view.new_empty((ratios.shape[0], view.shape[0]), dtype=torch.float64)


@_op("quantize_weight_rows", mutates_args=("out",))
def _quantize_weight_rows_op(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group: int,
                             qmin: int, qmax: int, out: torch.Tensor) -> None:
    compiled("quantize_weight_rows")(x, scale, zero_point, group, qmin, qmax, out)


@_quantize_weight_rows_op.register_fake
def _(x, scale, zero_point, group, qmin, qmax, out):
    return None


@_op("gptq_columns", mutates_args=("wb", "errs", "codes"))
def _gptq_columns_op(wb: torch.Tensor, hb: torch.Tensor, errs: torch.Tensor, codes: torch.Tensor,
                     scale: torch.Tensor, zero: torch.Tensor, slots: torch.Tensor, i0: int, i1: int, s1: int,
                     qmin: int, qmax: int) -> None:
    compiled("gptq_columns")(wb, hb, errs, codes, scale, zero, slots, i0, i1, s1, qmin, qmax)


@_gptq_columns_op.register_fake
def _(wb, hb, errs, codes, scale, zero, slots, i0, i1, s1, qmin, qmax):
    return None


@_op("signal_noise_sums")
def _signal_noise_sums_op(ref: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    return compiled("signal_noise_sums")(ref, approx)


@_signal_noise_sums_op.register_fake
def _(ref, approx):
    return ref.new_empty((2,), dtype=torch.float64)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for float32 ``x`` ``[M, K]`` and an INT4 weight in monoquant's stored layout; ``[M, N]``
    (custom op ``monoquant::int4_linear``). ``bias`` (float32 ``[N]``) is added to each output before it is stored,
    the same single rounding as ``y.add_(bias)``."""
    return _call(_int4_linear_op, "int4_linear", x, qweight, scale, zero_point, group_size, bias)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                zero_point: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for float32 ``x`` ``[M, K]`` and an INT8 weight in monoquant's stored layout; ``[M, N]``
    (custom op ``monoquant::int8_linear``); ``bias`` as in :func:`int4_linear`."""
    return _call(_int8_linear_op, "int8_linear", x, qweight, scale, zero_point, bias)


def int4_linear_bf16(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                     group_size: int) -> torch.Tensor:
    """``x @ W^T`` in bf16 (``[M, N]``, float32 sums rounded once) for contiguous bf16 ``x`` ``[M, K]`` and an INT4
    weight in monoquant's stored layout, with AVX512-BF16 dot products on the weight's bf16 values (each group's
    16 values ``bf16((c - z) * bf16(s))`` looked up per code: the weights :meth:`dequantize_into` writes in bf16);
    ``K`` and the group size multiples of 32, ``N`` of 4. Only where :func:`bf16_dot` (custom op
    ``monoquant::int4_linear_bf16``)."""
    return _call(_int4_linear_bf16_op, "int4_linear_bf16", x, qweight, scale, zero_point, group_size)


def int8_linear_bf16(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                     zero_point: torch.Tensor | None) -> torch.Tensor:
    """As :func:`int4_linear_bf16` for an INT8 weight: the codes minus the zero-point (exact in bf16) multiplied
    with ``x`` in float32 sums, each output scaled once by its row's float32 scale (custom op
    ``monoquant::int8_linear_bf16``)."""
    return _call(_int8_linear_bf16_op, "int8_linear_bf16", x, qweight, scale, zero_point)


def int4_gemm_bf16(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                   group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The product of :func:`int4_linear_bf16` for many rows (``N`` a multiple of 16), plus ``bias`` (float32 or
    bf16 ``[N]``, or ``None``) added in float32 before the one rounding to bf16 (as ``F.linear`` in bf16 does):
    each block of 48 weight rows is dequantized once per call (bit-identical to :meth:`dequantize_into` in bf16),
    in registers, into a panel of column pairs, which an 8 x 48 AVX512-BF16 micro-kernel multiplies with every
    input row (custom op ``monoquant::int4_gemm_bf16``)."""
    return _call(_int4_gemm_bf16_op, "int4_gemm_bf16", x, qweight, scale, zero_point, group_size, bias)


def int8_gemm_bf16(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`int4_gemm_bf16` for an INT8 weight: the panels hold the exact codes minus the zero-point, each output
    is scaled once by its row's float32 scale, then ``bias`` is added (custom op ``monoquant::int8_gemm_bf16``)."""
    return _call(_int8_gemm_bf16_op, "int8_gemm_bf16", x, qweight, scale, zero_point, bias)


def dequantize_int4_into(out: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                         zero_point: torch.Tensor | None, group_size: int | None, row_start: int,
                         scaled: bool = True) -> torch.Tensor:
    """Write output rows ``row_start : row_start + len(out)`` of an INT4 weight (stored layout) into the float32
    or bf16 ``out`` (``[rows, K]``, contiguous) in one pass; bit-identical to
    :meth:`monoquant.formats.IntegerFormat.dequantize_into` (INT4's per-group scale is always applied, so
    ``scaled`` is accepted for the shared signature and ignored). Custom op ``monoquant::dequantize_int4``
    (which writes ``out`` in place)."""
    _call(_dequantize_int4_op, "dequantize_int4", out, qweight, scale, zero_point, group_size, row_start)
    return out


def dequantize_int8_into(out: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                         zero_point: torch.Tensor | None, group_size: int | None, row_start: int,
                         scaled: bool = True) -> torch.Tensor:
    """As :func:`dequantize_int4_into` for an INT8 weight (``group_size`` unused); ``scaled=False`` leaves the
    per-row scale out. Custom op ``monoquant::dequantize_int8``."""
    _call(_dequantize_int8_op, "dequantize_int8", out, qweight, scale, zero_point, row_start, scaled)
    return out


W8A8_MAX_K = 1 << 17
"""Largest input size :func:`w8a8_gemm` accepts: int8 x int8 pair sums stay exact in int32 up to 2**17 terms."""


def w8a8_pack(qweight: torch.Tensor) -> torch.Tensor:
    """Symmetric INT8 weight codes ``[N, K]`` in the panel layout :func:`w8a8_gemm` reads (same number of bytes,
    plus padding to 16 rows and an even ``K``)."""
    return _call(_w8a8_pack_op, "w8a8_pack", qweight)


def w8a8_gemm(codes: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """Exact ``codes @ W^T`` in int32 (``[M, N]``) for int8 input codes ``[M, K]`` and a :func:`w8a8_pack`-ed
    weight of ``n`` rows: int16 pairs multiplied with ``vpmaddwd`` (AVX2), for CPUs without VNNI or AMX."""
    return _call(_w8a8_gemm_op, "w8a8_gemm", codes, packed, n)


def direct_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pad_h: int,
                  pad_w: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=1, padding=(pad_h, pad_w))`` for contiguous float32 ``x`` ``[N, C, H, W]``
    and ``weight`` ``[CO, C, kh, kw]``, computed directly (no im2col, no GEMM call): vectors of consecutive output
    positions of the zero-padded input, a tile of output channels x positions in registers. Each output's sum starts
    from the bias and adds the products in ``(ci, r, s)`` order: the float conv's value up to summation order. For
    the small convolutions of small batches (``dequant_conv_direct`` in :mod:`monoquant.conv_kernels`)."""
    return _call(_direct_conv2d_op, "direct_conv2d", x, weight, bias, pad_h, pad_w)


@torch.compiler.assume_constant_result
def has_vnni() -> bool:
    """Whether the compiled kernels include :func:`w8a8_vnni_linear` (built where the compiler targets AVX512-VNNI:
    ``-march=native`` on such a CPU); builds the extension on first call."""
    module = load()
    return module is not None and bool(module.w8a8_vnni())


def w8a8_vnni_pack(qweight: torch.Tensor) -> torch.Tensor:
    """Symmetric INT8 weight codes ``[N, K]`` in the layout :func:`w8a8_vnni_linear` reads: panels of 64 output rows,
    each row's columns in groups of 4 (``[ceil(N / 64), ceil(K / 4), 64, 4]``, zero padding)."""
    return _call(_w8a8_vnni_pack_op, "w8a8_vnni_pack", qweight)


def w8a8_vnni_linear(x: torch.Tensor, packed: torch.Tensor, n: int, rowsum: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, qmin: int, qmax: int, symmetric: bool, eps: float,
                     static_scale: torch.Tensor | None = None,
                     static_zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer with INT8 activations and INT8 weights in one call (AVX512-VNNI ``vpdpbusd``): ``(y, scale)``.

    ``x``: contiguous float32 or bf16 ``[M, K]``; each row is quantized as
    :meth:`~monoquant.nn.activation.ActivationQuantizer.int8_codes` does (per-row min/max qparams, or the static
    ``static_scale`` (float32 ``[1]``) and ``static_zero`` (int32 ``[1]``, ``None`` when ``symmetric``)), multiplied
    exactly with the :func:`w8a8_vnni_pack`-ed weight (``rowsum``: int32 ``[N]``, its code sums), and rescaled by the
    row scale, then ``w_scale`` (float32, per output or one), plus ``bias`` (float32 or bf16 ``[N]``, or ``None``);
    ``y`` is ``[M, n]`` in ``x``'s dtype, bit-identical to :func:`dynamic_quantize_rows` (:func:`quantize_rows`), an
    int32 GEMM and :func:`rescale_rows` (the codes from ``x * (1 / s)``, with the division itself wherever that product
    lies close enough to a rounding boundary to round otherwise). With dynamic qparams a row holding an inf or NaN
    comes out all NaN. ``scale``: the row scales ``[M]`` (or the static one). Custom op
    ``monoquant::w8a8_vnni_linear``; only where :func:`has_vnni`."""
    return tuple(_call(_w8a8_vnni_linear_op, "w8a8_vnni_linear", x, packed, n,  # type: ignore[return-value]
                       rowsum, w_scale, bias, qmin, qmax, symmetric, eps, static_scale, static_zero))


def quantize_rows(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int,
                  shift: int) -> torch.Tensor:
    """int8 ``clamp(round(x / scale) + zero_point, qmin, qmax) - shift`` of contiguous float32 ``x`` ``[M, K]``
    (scale and zero-point: one per row or one), in one pass; bit-identical to the float32 PyTorch ops."""
    return _call(_quantize_rows_op, "quantize_rows", x, scale, zero_point, qmin, qmax, shift)


def dynamic_quantize_rows(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero_point)`` of contiguous float32 or bf16 ``x`` ``[M, K]`` (``K > 0``) with per-row min/max
    qparams: int8 codes shifted by -128 when affine, float32 scale ``[M]``, int32 zero-point ``[M]``; one pass
    per row, bit-identical to :func:`monoquant.functional.minmax` + ``qparams_from_minmax`` + :func:`quantize_rows`."""
    return tuple(_call(_dynamic_quantize_rows_op, "dynamic_quantize_rows",  # type: ignore[return-value]
                       x, qmin, qmax, symmetric, eps))


def dynamic_fake_quantize_rows(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool, eps: float) -> torch.Tensor:
    """Contiguous float32 ``x`` ``[M, ...]`` (at least 2-D, no empty sample) quantized with min/max qparams per
    sample ``x[m]`` and dequantized again, in one call, shaped like ``x``: bit-identical to
    :func:`dynamic_quantize_rows` of ``x.view(M, -1)`` followed by ``(codes - zero_point) * scale`` in float32; a
    sample holding an inf or NaN becomes all NaN."""
    return _call(_dynamic_fake_quantize_rows_op, "dynamic_fake_quantize_rows", x, qmin, qmax, symmetric, eps)


def rescale_rows(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 x_zero: torch.Tensor | None = None, w_rowsum: torch.Tensor | None = None,
                 bf16_out: bool = False) -> torch.Tensor:
    """float32 ``((acc - x_zero * w_rowsum) * x_scale) * w_scale + bias`` for int32 sums ``[M, N]`` (or float32
    ones holding integers below 2**24 exactly, as oneDNN's int8 matmul returns them; ``x_scale``
    per row or one, ``w_scale`` per column or one; the zero-point term, int32 ``x_zero`` ``[M]`` times int32
    ``w_rowsum`` ``[N]``, only when both are given), in one pass; bit-identical to the PyTorch ops in that order
    (the zero-point term exact in int32, as ``acc.addr_(x_zero, w_rowsum, alpha=-1)``). ``bf16_out``: the result
    rounded once to bf16, as ``.to(torch.bfloat16)`` of the float32 one."""
    return _call(_rescale_rows_op, "rescale_rows", acc, x_scale, w_scale, bias, x_zero, w_rowsum, bf16_out)


def mse_clip_errors(view: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ratios: torch.Tensor, qmin: int,
                    qmax: int, symmetric: bool, eps: float) -> torch.Tensor:
    """float64 ``[C, S]``: for each of ``C`` ratios ``r`` and each row (slot) of the contiguous float64 ``view``
    ``[S, L]``, the summed squared error of fake-quantizing the row with the qparams of ``[r * lo, r * hi]``
    (``lo``/``hi``: float64 ``[S]``). The same float64 arithmetic as :func:`monoquant.functional.qparams_from_minmax`
    and :func:`~monoquant.functional.fake_quantize` (scale rounded to float32), summed in another order."""
    return _call(_mse_clip_errors_op, "mse_clip_errors", view, lo, hi, ratios, qmin, qmax, symmetric, eps)


def quantize_weight_rows(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group: int,
                         qmin: int, qmax: int, out: torch.Tensor) -> torch.Tensor:
    """Codes of a contiguous float32 weight ``[R, C]`` written into ``out`` (contiguous int8, uint8 or int16
    ``[R, C]``), with contiguous float64 ``scale`` / ``zero_point`` ``[R, C // group]`` (``zero_point`` ``None``
    for symmetric qtypes): element for element the float64 arithmetic of
    :func:`monoquant.functional.quantize_rows` (``x / scale``, round half to even, ``+ zero``, clamp to
    ``[qmin, qmax]``), in one pass over the weight. Returns ``out``."""
    _call(_quantize_weight_rows_op, "quantize_weight_rows", x, scale, zero_point, group, qmin, qmax, out)
    return out


def gptq_columns(wb: torch.Tensor, hb: torch.Tensor, errs: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor, slots: torch.Tensor, i0: int, i1: int, s1: int, qmin: int, qmax: int) -> None:
    """GPTQ's per-column loop over columns ``i0 <= i < i1`` of one block, in place: see
    :func:`monoquant.gptq._quantize_columns`, whose PyTorch ops it equals bit for bit (``wb``: the block's
    transposed float32 weight ``[B, M]``; ``hb``: float32 ``[B, B]``, any strides; ``errs`` float32 and
    ``codes`` int16 ``[B, M]``, row ``i`` written; column ``i`` uses row ``slots[i]`` of the float64 ``scale`` and
    ``zero`` ``[S, M]``; the rank-one updates reach columns up to ``s1``)."""
    _call(_gptq_columns_op, "gptq_columns", wb, hb, errs, codes, scale, zero, slots, i0, i1, s1, qmin, qmax)


def signal_noise_sums(ref: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """``(sum(ref^2), sum((ref - approx)^2))`` of two contiguous float32 tensors of the same size, in float64 and
    one pass (the terms of :func:`monoquant.functional.sqnr_from_powers`); the same sums whatever the threads."""
    sums = _call(_signal_noise_sums_op, "signal_noise_sums", ref, approx)
    return float(sums[0]), float(sums[1])
