"""Tensor-at-a-time reading and writing of the safetensors format.

The ``safetensors`` package reads and writes whole files: ``save_file`` builds every tensor's bytes in memory
before writing, and ``safe_open`` maps the file, so each tensor read leaves its file pages resident next to
the copy. Converting a checkpoint larger than memory, or loading a quantized model with memory close to its
size, needs one tensor at a time instead:

* :func:`read_header` validates a file with ``safetensors.safe_open`` (the reference parser: truncated or
  corrupt files are rejected there) and returns the tensor table and the string metadata;
* :func:`read_tensor` reads one tensor with ``readinto`` into a fresh tensor (no mapping, one copy);
* :class:`StreamWriter` writes the header first (shapes and dtypes are known up front) and then each
  tensor's bytes as it is produced, to a temporary file renamed into place when complete.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON
header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` padded with
spaces to a multiple of 8 bytes, then the tensors' bytes back to back (offsets relative to the data start).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from .errors import SerializationError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    nbytes: int


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: tensors in file order, and the string metadata."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str | os.PathLike) -> Header:
    """Validate ``path`` as a safetensors file and return its header.

    Raises:
        SerializationError: the file is missing, not a safetensors file, truncated or uses an unknown dtype.
    """
    path = Path(path)
    if not path.is_file():
        raise SerializationError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:  # the reference parser validates offsets and size
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise SerializationError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        raw = json.loads(fh.read(n))
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, info in sorted(((k, v) for k, v in raw.items() if k != "__metadata__"),
                             key=lambda kv: kv[1]["data_offsets"][0]):
        if info["dtype"] not in DTYPES:
            raise SerializationError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which monoquant cannot read")
        begin, end = info["data_offsets"]
        tensors[name] = TensorInfo(DTYPES[info["dtype"]], tuple(info["shape"]), data_start + begin, end - begin)
    return Header(path, tensors, metadata)


def _readinto(fh: BinaryIO, view: memoryview) -> None:
    while len(view):
        got = fh.readinto(view)
        if not got:
            raise SerializationError(f"{fh.name}: file ended early (truncated while reading?)")
        view = view[got:]


def read_tensor(fh: BinaryIO, info: TensorInfo, device: torch.device | str = "cpu") -> torch.Tensor:
    """Read one tensor from an open (unbuffered, binary) file into a new CPU tensor, then move it to ``device``."""
    raw = torch.empty(info.nbytes, dtype=torch.uint8)
    fh.seek(info.begin)
    _readinto(fh, memoryview(raw.numpy()))
    t = raw.view(info.dtype).reshape(info.shape)
    return t if torch.device(device).type == "cpu" else t.to(device)


def read_tensors(header: Header, names: Iterable[str] | None = None,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Read ``names`` (default: all tensors) from the file described by ``header``."""
    wanted = header.tensors if names is None else {n: header.tensors[n] for n in names}
    with open(header.path, "rb", buffering=0) as fh:
        return {name: read_tensor(fh, info, device) for name, info in wanted.items()}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (little-endian, C order), without copying when it is a contiguous CPU tensor."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


class StreamWriter:
    """Write a safetensors file whose tensor table is known before any data is produced.

    >>> w = StreamWriter(path, [("a", torch.float32, (2, 3))], {"k": "v"})   # doctest: +SKIP
    >>> w.write("a", torch.zeros(2, 3)); w.close()                         # doctest: +SKIP

    Tensors must be written in the order given. ``close`` checks that all were written and renames the
    temporary file onto ``path``; ``abort`` (or an exception inside a ``with`` block) removes it, so a
    failed write never leaves a partial file at ``path``.
    """

    def __init__(self, path: str | os.PathLike, table: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str]) -> None:
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": metadata}
        self._expected: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        offset = 0
        for name, dtype, shape in table:
            if dtype not in DTYPE_NAMES:
                raise SerializationError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, dtype, tuple(shape), nbytes))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            self._fh = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        except OSError as e:
            raise SerializationError(f"cannot write {self.path}: {e.strerror}") from e
        self._fh.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must match the table's name, dtype and shape."""
        exp_name, dtype, shape, _ = self._expected[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (exp_name, dtype, shape):
            raise SerializationError(f"internal error: expected tensor {exp_name} {dtype} {list(shape)}, got "
                                     f"{name} {tensor.dtype} {list(tensor.shape)}")
        self._fh.write(tensor_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            self.abort()
            raise SerializationError(f"internal error: {len(self._expected) - self._next} tensors were not written")
        self._fh.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
