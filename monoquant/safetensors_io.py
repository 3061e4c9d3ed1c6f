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

import contextlib
import errno
import json
import os
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator
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
        raise SerializationError(f"{path}: {'is a directory, not a file' if path.is_dir() else 'no such file'}")
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


def index_shards(index: Path) -> list[Path]:
    """The shard files a ``*.safetensors.index.json`` lists, each confined to the index's directory."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SerializationError(f"{index} is not a safetensors index (JSON with a 'weight_map'): {e}") from e
    # confined by name, not by following links: a Hugging Face cache's shards are symlinks to ../../blobs
    folder = Path(os.path.normpath(index.parent.absolute()))
    paths = []
    for shard in shards:
        if not isinstance(shard, str) or not shard:
            raise SerializationError(f"{index}: weight_map values must be shard file names, got {shard!r}")
        resolved = Path(os.path.normpath(folder / shard))
        if resolved == folder or not resolved.is_relative_to(folder):
            raise SerializationError(f"{index} lists shard {shard!r}, which is not a file inside the index's folder "
                                     f"{folder}; shards must sit next to their index (refusing to read it)")
        paths.append(resolved)
    return paths


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


TEMP_SUFFIX = ".mqtmp"
"""Suffix of the hidden temporary files :class:`StreamWriter` writes next to their destination
(``.{name}.{random}.mqtmp``)."""

STALE_TEMP_AGE_S = 24 * 3600
"""Temporary files of ours not written to for this long are left over from a killed process and removed."""


def _temp_pattern(path: Path) -> str:
    return f".{path.name}.*{TEMP_SUFFIX}"


def remove_stale_temps(path: str | os.PathLike, older_than_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Delete the temporary files a killed :class:`StreamWriter` for ``path`` left behind; return their paths.

    Only files named like ours for this destination (``.{name}.*.mqtmp`` in its directory) whose last write
    is older than ``older_than_s`` seconds are removed: a writer still running updates its file's mtime with
    every tensor, so it is not touched unless it has been stalled for that long.
    """
    path = Path(path)
    removed = []
    now = time.time()
    for tmp in path.parent.glob(_temp_pattern(path)):
        try:
            if now - tmp.lstat().st_mtime > older_than_s and tmp.is_file():
                tmp.unlink()
                removed.append(tmp)
        except OSError:  # vanished meanwhile, or not ours to delete: leave it
            continue
    return removed


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide, so set-and-restore races threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StreamWriter:
    """Write a safetensors file whose tensor table is known before any data is produced.

    >>> w = StreamWriter(path, [("a", torch.float32, (2, 3))], {"k": "v"})   # doctest: +SKIP
    >>> w.write("a", torch.zeros(2, 3)); w.close()                         # doctest: +SKIP

    Tensors must be written in the order given. The bytes go to a temporary file of its own (unique per
    writer, made with :func:`tempfile.mkstemp` in ``path``'s directory and named ``.{name}.{random}.mqtmp``).
    ``close`` checks that all tensors were written, flushes and fsyncs the file, renames it onto ``path`` in
    one atomic step and fsyncs the directory, so ``path`` holds either its old content or the complete new
    file, even after a crash or power loss. Several writers (threads or processes) saving to the same
    ``path`` each write their own file; the last rename wins and the result is one complete file.

    ``abort`` (or any exception inside a ``with`` block, ``KeyboardInterrupt`` included) removes the
    temporary file. Only a process killed outright (SIGKILL, power loss) can leave one behind: it is removed
    by the next writer to the same ``path`` once it is :data:`STALE_TEMP_AGE_S` old (see
    :func:`remove_stale_temps`), or may be deleted by hand (``rm DIR/.NAME.*.mqtmp``) when no save is running.

    Raises:
        SerializationError: ``path`` is a directory, its directory is missing or not writable, or a write
            fails (disk full, file size limit...); the message names ``path`` and no partial file remains.
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
        if self.path.is_dir():
            raise SerializationError(f"cannot write {self.path}: it is a directory; give a file path such as "
                                     f"{self.path / 'model.safetensors'}")
        remove_stale_temps(self.path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=TEMP_SUFFIX, dir=self.path.parent)
        except OSError as e:
            raise self._error(e) from e
        self._tmp = Path(tmp)
        self._fh: BinaryIO = os.fdopen(fd, "wb")
        self._next = 0
        with self._or_abort():
            # mkstemp makes the file owner-only; give it the mode a plain open() would (or the old file's)
            mode = self.path.stat().st_mode & 0o7777 if self.path.exists() else 0o666 & ~_umask()
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
            self._fh.write(struct.pack("<Q", len(blob)) + blob)

    @contextlib.contextmanager
    def _or_abort(self) -> Iterator[None]:
        """One step of the write: on any failure the temporary file is removed (OS errors name ``path``)."""
        try:
            yield
        except OSError as e:
            self.abort()
            raise self._error(e) from e
        except BaseException:
            self.abort()
            raise

    def _error(self, e: OSError) -> SerializationError:
        what = e.strerror or str(e) or type(e).__name__
        hint = {errno.ENOSPC: "free some disk space and save again", errno.EDQUOT: "free some disk quota",
                errno.EFBIG: "the file system or a ulimit caps the file size; write to another file system",
                errno.EACCES: "check the permissions of its directory", errno.ENOENT: "create its directory first",
                errno.EROFS: "the file system is read-only; write elsewhere"}.get(e.errno, "check the path")
        return SerializationError(f"cannot write {self.path}: {what}; {hint} (no file was written)")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must match the table's name, dtype and shape."""
        exp_name, dtype, shape, _ = self._expected[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (exp_name, dtype, shape):
            self.abort()
            raise SerializationError(f"internal error: expected tensor {exp_name} {dtype} {list(shape)}, got "
                                     f"{name} {tensor.dtype} {list(tensor.shape)}")
        with self._or_abort():
            self._fh.write(tensor_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        """Finish the file: fsync it, rename it onto ``path`` and fsync the directory."""
        if self._next != len(self._expected):
            self.abort()
            raise SerializationError(f"internal error: {len(self._expected) - self._next} tensors were not written")
        with self._or_abort():
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self._tmp, self.path)
        _fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Close and delete the temporary file; ``path`` is left as it was."""
        with contextlib.suppress(OSError):  # a failed flush of a file about to be deleted
            self._fh.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
