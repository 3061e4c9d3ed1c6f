"""The safetensors writer behind mq.save and the CLI: unique temps, failures that leave nothing behind."""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
import time

import pytest
import torch
from _robust import Small, Snapshot, assert_no_leftovers, files_in, inject_write_fault, quantized_small, run_jailed
from safetensors.torch import load_file

import monoquant as mq
from monoquant import safetensors_io as stio


def _table(n: int = 3) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(f"t{i}", torch.float32, (4, 4)) for i in range(n)]


def test_two_writers_to_one_path_use_two_temp_files(tmp_path):
    path = tmp_path / "m.safetensors"
    a, b = stio.StreamWriter(path, _table(1), {}), stio.StreamWriter(path, _table(1), {})
    assert a._tmp != b._tmp and a._tmp.parent == b._tmp.parent == tmp_path
    assert a._tmp.name.startswith(".m.safetensors.") and a._tmp.name.endswith(stio.TEMP_SUFFIX)
    a.abort()
    b.abort()
    assert files_in(tmp_path) == {}


@pytest.mark.parametrize("n_threads", [2, 4])
def test_threads_saving_to_one_path_each_leave_one_whole_model(tmp_path, n_threads):
    path = tmp_path / "m.safetensors"
    models = []
    for seed in range(n_threads):
        torch.manual_seed(seed)
        models.append(quantized_small())
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def save(m):
        try:
            barrier.wait()
            for _ in range(5):
                mq.save(m, path)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=save, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp left
    got = load_file(str(path))
    matches = [i for i, s in enumerate(states) if set(s) == set(got) and all(torch.equal(s[k], got[k]) for k in s)]
    assert len(matches) == 1  # every tensor from one and the same model
    loaded = mq.load(Small(), path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in states[matches[0]].items())


class _Boom(Exception):
    pass


# Each step of a save that can fail, and how: (what to patch, the exception)
FAULTS = {
    "mkstemp ENOSPC": ("tempfile.mkstemp", OSError(errno.ENOSPC, "No space left on device")),
    "header write ENOSPC": ("header", OSError(errno.ENOSPC, "No space left on device")),
    "tensor write ENOSPC": ("tensor", OSError(errno.ENOSPC, "No space left on device")),
    "tensor write EFBIG": ("tensor", OSError(errno.EFBIG, "File too large")),
    "tensor write EDQUOT": ("tensor", OSError(errno.EDQUOT, "Disk quota exceeded")),
    "fsync EIO": ("os.fsync", OSError(errno.EIO, "Input/output error")),
    "rename EACCES": ("os.replace", OSError(errno.EACCES, "Permission denied")),
    "rename EXDEV": ("os.replace", OSError(errno.EXDEV, "Invalid cross-device link")),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_mq_save_fault_leaves_old_file_and_no_temp(tmp_path, monkeypatch, fault):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"the previous file")
    before = files_in(tmp_path)
    model = quantized_small()
    snap = Snapshot.of(model)
    inject_write_fault(monkeypatch, *FAULTS[fault])
    with pytest.raises(mq.SerializationError, match=r"cannot write .*m\.safetensors") as info:
        mq.save(model, path)
    assert isinstance(info.value.__cause__, OSError)
    assert FAULTS[fault][1].strerror in str(info.value)
    monkeypatch.undo()
    assert_no_leftovers(before, tmp_path)
    snap.assert_same(model)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, _Boom, MemoryError])
@pytest.mark.parametrize("where", ["header", "tensor"])
def test_interrupted_save_removes_its_temp(tmp_path, monkeypatch, exc, where):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    before = files_in(tmp_path)
    inject_write_fault(monkeypatch, where, exc())
    with pytest.raises(exc):
        mq.save(quantized_small(), path)
    assert_no_leftovers(before, tmp_path)


@pytest.mark.parametrize("target", ["dir", "missing parent", "parent is a file"])
def test_unwritable_paths_raise_serialization_error_naming_the_path(tmp_path, target):
    (tmp_path / "d.safetensors").mkdir()
    (tmp_path / "file").write_bytes(b"x")
    path = {"dir": tmp_path / "d.safetensors", "missing parent": tmp_path / "no" / "m.safetensors",
            "parent is a file": tmp_path / "file" / "m.safetensors"}[target]
    before = files_in(tmp_path)
    with pytest.raises(mq.SerializationError, match=re.escape(f"cannot write {path}")):
        mq.save(quantized_small(), path)
    assert_no_leftovers(before, tmp_path)


def test_saved_file_gets_the_usual_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        mq.save(quantized_small(), tmp_path / "new.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.safetensors").stat().st_mode) == 0o644
    (tmp_path / "kept.safetensors").write_bytes(b"x")
    (tmp_path / "kept.safetensors").chmod(0o640)
    mq.save(quantized_small(), tmp_path / "kept.safetensors")
    assert stat.S_IMODE((tmp_path / "kept.safetensors").stat().st_mode) == 0o640


def test_stale_temps_of_a_killed_save_are_removed_fresh_ones_and_others_kept(tmp_path):
    path = tmp_path / "m.safetensors"
    stale, fresh = tmp_path / ".m.safetensors.abc123.mqtmp", tmp_path / ".m.safetensors.def456.mqtmp"
    other = tmp_path / ".x.safetensors.abc123.mqtmp"  # another destination's temp
    for p in (stale, fresh, other):
        p.write_bytes(b"partial")
    old = time.time() - stio.STALE_TEMP_AGE_S - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    mq.save(quantized_small(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, fresh.name, other.name])


def test_sigkilled_save_leaves_only_a_named_hidden_temp_that_the_next_save_cleans(tmp_path):
    """A save killed with SIGKILL mid-write keeps the old file; its temp matches the documented pattern."""
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old file")
    r = run_jailed(f"""
        import os, signal, torch
        from monoquant import safetensors_io as stio
        w = stio.StreamWriter({str(path)!r}, [("a", torch.float32, (256, 256)), ("b", torch.float32, (4,))], {{}})
        w.write("a", torch.zeros(256, 256))
        w._fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """, timeout=120)
    assert r.returncode == -9
    temps = list(tmp_path.glob(".m.safetensors.*.mqtmp"))
    assert len(temps) == 1 and path.read_bytes() == b"old file"
    old = time.time() - stio.STALE_TEMP_AGE_S - 1
    os.utime(temps[0], (old, old))
    assert stio.remove_stale_temps(path) == temps
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
