"""``monoquant quantize`` against hostile or mistaken inputs: one-line errors, nothing overwritten or left behind."""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from pathlib import Path

import pytest
import torch
from _robust import (
    Small,
    assert_no_leftovers,
    assert_one_line_error,
    cli,
    files_in,
    inject_write_fault,
    run_cli_jailed,
)
from safetensors.torch import load_file, save_file

import monoquant as mq
import monoquant.cli

OLD_OUT = b"a previous output that must survive"


def _checkpoint(folder: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    save_file(state if state is not None else Small().state_dict(), str(path))
    return path


def _sharded(folder: Path) -> Path:
    """fc1.* in shard 1, the rest in shard 2, and their index."""
    state = Small().state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    shards = {"s1.safetensors": [k for k in state if k.startswith("fc1.")],
              "s2.safetensors": [k for k in state if not k.startswith("fc1.")]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / shard))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: s for s, keys in shards.items() for k in keys}}))
    return index


# ---- OUT is one of the inputs ---------------------------------------------------------------------------------
def _same_file_case(tmp_path: Path, case: str) -> tuple[Path, Path, str]:
    """(IN, OUT, the name the message must give) where OUT is, by inode, a file that IN reads."""
    if case in ("IN itself", "IN spelt differently", "hard link to IN", "symlink to IN"):
        src = _checkpoint(tmp_path / "ck")
        out = {"IN itself": src, "IN spelt differently": tmp_path / "ck" / ".." / "ck" / "model.safetensors",
               "hard link to IN": tmp_path / "link.safetensors", "symlink to IN": tmp_path / "sym.safetensors"}[case]
        if case == "hard link to IN":
            os.link(src, out)
        elif case == "symlink to IN":
            out.symlink_to(src)
        return src, out, str(src)
    index = _sharded(tmp_path / "ck")
    shard = index.parent / ("s1.safetensors" if case == "shard 1 of the index" else "s2.safetensors")
    if case == "hard link to a shard":
        out = tmp_path / "link.safetensors"
        os.link(shard, out)
        return index, out, shard.name
    return index, shard, shard.name


SAME_FILE = ["IN itself", "IN spelt differently", "hard link to IN", "symlink to IN", "shard 1 of the index",
             "shard 2 of the index", "hard link to a shard"]


@pytest.mark.parametrize("case", SAME_FILE)
@pytest.mark.parametrize("bits", ["8", "4"])
def test_out_that_is_an_input_is_refused_and_untouched(tmp_path, capsys, case, bits):
    src, out, culprit = _same_file_case(tmp_path, case)
    before = files_in(tmp_path)
    code, err = cli(capsys, "quantize", src, out, "--bits", bits, "--no-progress")
    assert code == 1 and "OUT must differ from IN" in err and culprit in err
    assert_no_leftovers(before, tmp_path)


def test_out_is_a_directory(tmp_path, capsys):
    src = _checkpoint(tmp_path)
    (tmp_path / "o.safetensors").mkdir()
    before = files_in(tmp_path)
    code, err = cli(capsys, "quantize", src, tmp_path / "o.safetensors", "--bits", "8", "--no-progress")
    assert code == 1 and "is a directory" in err and "o.safetensors" in err
    assert_no_leftovers(before, tmp_path)


# ---- shard paths escaping the index's folder, malformed indexes ------------------------------------------------
def _escaping_index(tmp_path: Path, case: str) -> tuple[Path, str]:
    outside = _checkpoint(tmp_path / "outside")
    folder = tmp_path / "ck"
    folder.mkdir()
    value = {"parent": "../outside/model.safetensors", "absolute": str(outside),
             "nested parent": "sub/../../outside/model.safetensors", "the folder itself": "."}[case]
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"fc1.weight": value}}))
    return index, value


@pytest.mark.parametrize("case", ["parent", "absolute", "nested parent", "the folder itself"])
def test_shard_outside_the_index_folder_is_refused(tmp_path, capsys, case):
    index, value = _escaping_index(tmp_path, case)
    out = tmp_path / "out.safetensors"
    out.write_bytes(OLD_OUT)
    before = files_in(tmp_path)
    code, err = cli(capsys, "quantize", index, out, "--bits", "8", "--no-progress")
    assert code == 1 and "not a file inside the index's folder" in err and repr(value) in err
    assert_no_leftovers(before, tmp_path)


def test_symlinked_shards_as_in_a_hugging_face_cache_are_read(tmp_path, capsys):
    """Only the names in the index are confined: snapshots/REV/shard -> ../../blobs/SHA is the usual layout."""
    index = _sharded(tmp_path / "blobs")
    snapshot = tmp_path / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    for f in ("s1.safetensors", "s2.safetensors", index.name):
        (snapshot / f).symlink_to(Path("../../blobs") / f)
    code, _ = cli(capsys, "quantize", snapshot / index.name, tmp_path / "o.safetensors", "--bits", "8",
                  "--no-progress")
    assert code == 0 and "fc1.qweight" in load_file(str(tmp_path / "o.safetensors"))


MALFORMED_INDEXES = {
    "not json": (b"{weight_map", "not a safetensors index"),
    "not utf-8": (b"\xff\xfe\x00garbage", "not a safetensors index"),
    "a list": (b"[1, 2]", "not a safetensors index"),
    "no weight_map": (b'{"metadata": {}}', "not a safetensors index"),
    "weight_map a list": (b'{"weight_map": ["a"]}', "not a safetensors index"),
    "weight_map a string": (b'{"weight_map": "s1.safetensors"}', "not a safetensors index"),
    "shard an int": (b'{"weight_map": {"w": 5}}', "must be shard file names, got 5"),
    "shard null": (b'{"weight_map": {"w": null}}', "must be shard file names, got None"),
    "shard a list": (b'{"weight_map": {"w": ["s1.safetensors"]}}', "not a safetensors index"),
    "shard an object": (b'{"weight_map": {"w": {"f": 1}}}', "not a safetensors index"),
    "shard empty": (b'{"weight_map": {"w": ""}}', "must be shard file names, got ''"),
    "shard missing": (b'{"weight_map": {"w": "gone.safetensors"}}', "gone.safetensors: no such file"),
    "shard a directory": (b'{"weight_map": {"w": "d"}}', "is a directory"),
    "shard the index": (b'{"weight_map": {"w": "model.safetensors.index.json"}}', "not a readable safetensors"),
}


@pytest.mark.parametrize("case", list(MALFORMED_INDEXES))
def test_malformed_index_is_one_line_naming_the_file(tmp_path, capsys, case):
    content, message = MALFORMED_INDEXES[case]
    (tmp_path / "d").mkdir()
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(content)
    out = tmp_path / "out.safetensors"
    out.write_bytes(OLD_OUT)
    before = files_in(tmp_path)
    code, err = cli(capsys, "quantize", index, out, "--bits", "4", "--no-progress")
    assert code == 1 and message in err and str(tmp_path) in err
    assert_no_leftovers(before, tmp_path)


def test_index_directory_as_input(tmp_path, capsys):
    (tmp_path / "x.index.json").mkdir()
    code, err = cli(capsys, "quantize", tmp_path / "x.index.json", tmp_path / "o.safetensors", "--bits", "8")
    assert code == 1 and "x.index.json is a directory" in err


# ---- tensor names the output would use twice ------------------------------------------------------------------
COLLISIONS = [("fc1.scale", "8"), ("fc1.qweight", "8"), ("fc1.scale", "4"), ("fc1.qweight", "4"),
              ("fc1.zero_point", "4"), ("fc1.zero_point", "8 --affine")]


@pytest.mark.parametrize(("extra", "bits"), COLLISIONS)
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_input_tensor_named_like_an_output_buffer_is_refused(tmp_path, capsys, extra, bits, fmt):
    state = {**Small().state_dict(), extra: torch.ones(64)}
    if fmt == "safetensors":
        src = _checkpoint(tmp_path / "ck", state)
    else:
        (tmp_path / "ck").mkdir()
        src = tmp_path / "ck" / "model.pt"
        torch.save(state, src)
    out = tmp_path / "out.safetensors"
    out.write_bytes(OLD_OUT)
    before = files_in(tmp_path)
    code, err = cli(capsys, "quantize", src, out, "--bits", *bits.split(), "--no-progress")
    assert code == 1
    assert f"input tensors 'fc1.weight' and '{extra}' would both be written as '{extra}'" in err
    assert "--skip 'fc1'" in err
    assert_no_leftovers(before, tmp_path)


def test_a_zero_point_next_to_a_symmetric_layer_is_no_collision(tmp_path, capsys):
    state = {**Small().state_dict(), "fc1.zero_point": torch.ones(64)}
    src = _checkpoint(tmp_path, state)
    code, _ = cli(capsys, "quantize", src, tmp_path / "o.safetensors", "--bits", "8", "--no-progress")
    assert code == 0
    assert torch.equal(load_file(str(tmp_path / "o.safetensors"))["fc1.zero_point"], torch.ones(64))


def test_skipping_the_layer_resolves_the_collision(tmp_path, capsys):
    state = {**Small().state_dict(), "fc1.scale": torch.ones(64)}
    src = _checkpoint(tmp_path, state)
    code, _ = cli(capsys, "quantize", src, tmp_path / "o.safetensors", "--bits", "8", "--skip", "fc1",
                  "--no-progress")
    assert code == 0


# ---- NaN / Inf weights -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("layer", ["fc1", "fc2"])
def test_non_finite_weights_are_refused_as_quantize_does(tmp_path, capsys, value, fmt, layer):
    model = Small()
    with torch.no_grad():
        getattr(model, layer).weight[-1, -1] = value  # the last row: found in the last chunk
    (tmp_path / "ck").mkdir()
    src = tmp_path / "ck" / f"model.{fmt}"
    if fmt == "pt":
        torch.save(model.state_dict(), src)
    else:
        save_file(model.state_dict(), str(src))
    out = tmp_path / "out.safetensors"
    out.write_bytes(OLD_OUT)
    before = files_in(tmp_path)
    code, err = cli(capsys, "quantize", src, out, "--bits", "8", "--no-progress")
    assert code == 1 and f"layer '{layer}' has NaN or Inf in its weight" in err and f"--skip '{layer}'" in err
    assert_no_leftovers(before, tmp_path)
    with pytest.raises(mq.NonFiniteWeightError, match=f"layer '{layer}' has NaN or Inf in its weight"):
        mq.quantize_(model, mq.QuantConfig(mq.Int8(), skip=mq.SkipRules.none()))


def test_non_finite_weight_in_a_skipped_layer_is_copied(tmp_path, capsys):
    state = Small().state_dict()
    state["fc1.weight"][0, 0] = math.inf
    src = _checkpoint(tmp_path, state)
    code, _ = cli(capsys, "quantize", src, tmp_path / "o.safetensors", "--bits", "8", "--skip", "fc1",
                  "--no-progress")
    assert code == 0 and load_file(str(tmp_path / "o.safetensors"))["fc1.weight"][0, 0] == math.inf


# ---- tensors that claim more data than their storage holds -------------------------------------------------------
EXPANDED = {
    "scalar expanded to 65536x65536": "torch.zeros(()).expand(65536, 65536)",
    "row expanded to 65536x65536": "torch.randn(1, 65536).expand(65536, 65536)",
    "column expanded": "torch.randn(65536, 1).expand(65536, 65536)",
    "overlapping strides": "torch.randn(140000).as_strided((65536, 65536), (1, 1))",
    "expanded conv kernel": "torch.randn(1, 1, 1, 1).expand(4096, 4096, 3, 3)",
}


@pytest.mark.parametrize("case", list(EXPANDED))
def test_expanded_views_in_a_torch_file_are_refused_quickly_within_a_memory_limit(tmp_path, case):
    src = tmp_path / "model.pt"
    torch.save({"fc.weight": eval(EXPANDED[case]), "fc.bias": torch.zeros(4)}, src)
    assert src.stat().st_size < 2_000_000
    out = tmp_path / "out.safetensors"
    out.write_bytes(OLD_OUT)
    before = files_in(tmp_path)
    r = run_cli_jailed("quantize", src, out, "--bits", "8", "--no-progress", timeout=120)
    assert_one_line_error(r, "tensor 'fc.weight'", "view repeating", str(src))
    assert_no_leftovers(before, tmp_path)


def test_a_transposed_view_is_read_normally(tmp_path, capsys):
    w = torch.randn(64, 48)
    torch.save({"fc.weight": w.t()}, tmp_path / "model.pt")
    code, _ = cli(capsys, "quantize", tmp_path / "model.pt", tmp_path / "o.safetensors", "--bits", "8",
                  "--no-progress")
    assert code == 0
    ref = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        ref.weight.copy_(w.t())
    q = mq.QuantLinear.from_float(ref, mq.Int8())
    assert torch.equal(load_file(str(tmp_path / "o.safetensors"))["fc.qweight"], q.qweight)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("case", ["sparse_coo", "sparse_csr"])
def test_sparse_tensors_in_a_torch_file_are_refused(tmp_path, capsys, case):
    t = torch.eye(64).to_sparse() if case == "sparse_coo" else torch.eye(64).to_sparse_csr()
    torch.save({"fc.weight": t}, tmp_path / "model.pt")
    code, err = cli(capsys, "quantize", tmp_path / "model.pt", tmp_path / "o.safetensors", "--bits", "8")
    assert code == 1 and "tensor 'fc.weight' is torch.sparse" in err
    assert not (tmp_path / "o.safetensors").exists()


def _raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


HOSTILE_SAFETENSORS = {
    "overlapping offsets": ({"a": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 16384]},
                             "b": {"dtype": "F32", "shape": [64, 64], "data_offsets": [8192, 24576]}}, 24576),
    "offsets past the end": ({"a": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 16384]}}, 100),
    "size disagrees with shape": ({"a": {"dtype": "F32", "shape": [65536, 65536], "data_offsets": [0, 16]}}, 16),
    "unknown dtype": ({"a": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 4]}}, 4),
    "negative shape": ({"a": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, 16),
}


@pytest.mark.parametrize("case", list(HOSTILE_SAFETENSORS))
def test_hostile_safetensors_headers_are_refused(tmp_path, case):
    header, size = HOSTILE_SAFETENSORS[case]
    src = tmp_path / "model.safetensors"
    _raw_safetensors(src, header, b"\0" * size)
    out = tmp_path / "out.safetensors"
    out.write_bytes(OLD_OUT)
    before = files_in(tmp_path)
    r = run_cli_jailed("quantize", src, out, "--bits", "8", "--no-progress", timeout=120)
    assert_one_line_error(r, str(src))
    assert_no_leftovers(before, tmp_path)


def test_huge_header_length_is_refused_without_allocating_it(tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    r = run_cli_jailed("inspect", src, timeout=120)
    assert_one_line_error(r, str(src))


# ---- OS errors name the file ----------------------------------------------------------------------------------
def test_file_size_limit_names_the_output_and_leaves_nothing(tmp_path):
    src = _checkpoint(tmp_path)
    out = tmp_path / "out.safetensors"
    out.write_bytes(OLD_OUT)
    before = files_in(tmp_path)
    r = run_cli_jailed("quantize", src, out, "--bits", "8", "--no-progress", timeout=120,
                       extra_limits="resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))")
    line = assert_one_line_error(r, f"cannot write {out}", "File too large")
    assert not line.startswith("monoquant: error: :")
    assert_no_leftovers(before, tmp_path)


CLI_FAULTS = {
    "disk full on a tensor": ("tensor", OSError(errno.ENOSPC, "No space left on device"), 1, "No space left"),
    "disk full on the header": ("header", OSError(errno.ENOSPC, "No space left on device"), 1, "No space left"),
    "fsync fails": ("os.fsync", OSError(errno.EIO, "Input/output error"), 1, "Input/output error"),
    "rename refused": ("os.replace", OSError(errno.EACCES, "Permission denied"), 1, "Permission denied"),
    "Ctrl-C while writing": ("tensor", KeyboardInterrupt(), 130, "interrupted; no output was written"),
}


@pytest.mark.parametrize("case", list(CLI_FAULTS))
def test_a_failing_write_names_out_and_leaves_the_old_file(tmp_path, capsys, monkeypatch, case):
    where, exc, status, message = CLI_FAULTS[case]
    src = _checkpoint(tmp_path / "ck")
    out = tmp_path / "out.safetensors"
    out.write_bytes(OLD_OUT)
    before = files_in(tmp_path)
    inject_write_fault(monkeypatch, where, exc)
    capsys.readouterr()
    code = mq.cli.main(["quantize", str(src), str(out), "--bits", "8", "--no-progress"])
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert code == status and message in err and len(err.strip().splitlines()) == 1
    if status == 1:
        assert f"cannot write {out}" in err
    assert_no_leftovers(before, tmp_path)
