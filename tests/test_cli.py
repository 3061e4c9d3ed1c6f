import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import monoquant as mq
from monoquant import functional as F

ROOT = Path(__file__).resolve().parents[1]


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(64, 128)
        self.fc1 = nn.Linear(128, 256)
        self.norm = nn.LayerNorm(256)
        self.conv = nn.Conv1d(256, 64, 2)
        self.fc2 = nn.Linear(64, 128, bias=False)
        self.tiny = nn.Linear(8, 8)  # < 1,024 weights: stays float

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.fc1(self.embed_tokens(ids)))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.fc2(h)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "monoquant", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def _expected_file(model: nn.Module, spec, tmp_path: Path) -> dict[str, torch.Tensor]:
    """What mq.quantize_ + mq.save produce for the same model (the CLI must write the very same tensors)."""
    twin = TinyLM().eval()
    twin.load_state_dict(model.state_dict())
    mq.quantize_(twin, mq.QuantConfig(spec, skip=mq.SkipRules.defaults(exclude=["*embed*", "*norm*"])))
    mq.save(twin, tmp_path / "expected.safetensors")
    return load_file(str(tmp_path / "expected.safetensors"))


@pytest.fixture
def checkpoint(tmp_path):
    model = TinyLM().eval()
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def test_quantize_safetensors_matches_the_library_and_loads_into_a_meta_model(checkpoint, tmp_path):
    model, path = checkpoint
    out = tmp_path / "q.safetensors"
    r = _cli("quantize", path, out, "--bits", "4", "--group-size", "64")
    assert r.returncode == 0, r.stderr
    written = load_file(str(out))
    expected = _expected_file(model, mq.Int4(group_size=64), tmp_path)
    assert written.keys() == expected.keys()
    for k in expected:
        assert torch.equal(written[k], expected[k]), k
    with torch.device("meta"):
        fresh = TinyLM().eval()
    mq.load(fresh, out)
    assert [n for n, m in fresh.named_modules() if isinstance(m, mq.QuantModule)] == ["fc1", "conv", "fc2"]
    assert fresh.conv.scheme() == "int4-affine-g64"
    ids = torch.randint(0, 64, (2, 9))
    ref = TinyLM().eval()
    ref.load_state_dict(model.state_dict())
    mq.quantize_(ref, mq.QuantConfig(mq.Int4(group_size=64), skip=mq.SkipRules.defaults(exclude=["*embed*", "*norm*"])))
    assert torch.equal(fresh(ids), ref(ids))

    # per-tensor summary: shape, scheme, SQNR (as F.sqnr computes it), bytes
    lines = {line.split()[0]: line for line in r.stdout.splitlines()[1:-1]}
    assert set(lines) == set(model.state_dict())
    assert "128x256" not in lines["fc1.weight"] and "256x128" in lines["fc1.weight"]
    assert "int4-affine-g64" in lines["fc1.weight"]
    sqnr = F.sqnr(model.fc1.weight, ref.fc1.dequantize_weight())
    assert f"{sqnr:.1f}" in lines["fc1.weight"]
    assert "float (skipped by pattern '*embed*')" in lines["embed_tokens.weight"]
    assert "float (too small" in lines["tiny.weight"]
    assert "128.0 KB" in lines["fc1.weight"] and "18.5 KB" in lines["fc1.weight"]  # codes 16 KB + scales 2 + zeros 0.5
    assert r.stdout.splitlines()[-1].startswith("3 of 10 tensors quantized")


def test_sharded_and_torch_inputs_give_the_same_file(checkpoint, tmp_path):
    model, path = checkpoint
    state = model.state_dict()
    names = list(state)
    shards = {"a.safetensors": names[:5], "b.safetensors": names[5:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / shard))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}))
    torch.save(state, tmp_path / "model.pt")
    outs = []
    for i, src in enumerate([path, index, tmp_path / "model.pt"]):
        out = tmp_path / f"o{i}.safetensors"
        r = _cli("quantize", src, out, "--bits", "8", "--skip", "fc2")
        assert r.returncode == 0, r.stderr
        outs.append(load_file(str(out)))
    assert "fc2.weight" in outs[0] and "fc1.qweight" in outs[0] and "fc1.zero_point" not in outs[0]
    for other in outs[1:]:
        assert other.keys() == outs[0].keys()
        assert all(torch.equal(other[k], outs[0][k]) for k in other)


def test_symmetric_int4_and_inspect(checkpoint, tmp_path):
    _, path = checkpoint
    out = tmp_path / "q.safetensors"
    assert _cli("quantize", path, out, "--bits", "4", "--symmetric").returncode == 0
    assert "fc1.zero_point" not in load_file(str(out))
    r = _cli("inspect", out)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"written by monoquant {mq.__version__} with torch {torch.__version__}" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines[3:-1]}
    assert rows["fc1"][:4] == ["fc1", "QuantLinear", "int4-sym-g128", "256x128"]
    assert rows["conv"][:4] == ["conv", "QuantConv1d", "int4-sym-g128", "64x256x2"]
    assert rows["fc2"][2] == "int4-sym-g64"  # 64 inputs: one group per row
    assert lines[-1].startswith("3 quantized layers")


def test_help_lists_the_commands():
    r = _cli("--help")
    assert r.returncode == 0 and "quantize" in r.stdout and "inspect" in r.stdout
    r = _cli("quantize", "--help")
    assert r.returncode == 0 and "--group-size" in r.stdout and "--skip PATTERN" in r.stdout


def test_console_script_is_the_same_command():
    script = Path(sys.executable).parent / "monoquant"
    if not script.exists():
        pytest.skip("package not installed (no console script next to the interpreter)")
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip() == f"monoquant {mq.__version__}"


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list, int, str]]:
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "text.bin").write_text("not a checkpoint")
    save_file({"w": torch.zeros(4, 4)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "bad.index.json").write_text("{}")
    ok = str(tmp_path / "plain.safetensors")
    return {
        "missing input": (["quantize", tmp_path / "nope.safetensors", tmp_path / "o.safetensors", "--bits", "4"], 1,
                          "no such file"),
        "corrupt safetensors": (["quantize", tmp_path / "junk.safetensors", tmp_path / "o.safetensors", "--bits", "8"],
                                1, "not a readable safetensors file"),
        "torch file without a state dict": (["quantize", tmp_path / "list.pt", tmp_path / "o.safetensors", "--bits",
                                             "8"], 1, "does not hold a state dict"),
        "unreadable torch file": (["quantize", tmp_path / "text.bin", tmp_path / "o.safetensors", "--bits", "8"], 1,
                                  "neither safetensors nor a torch state-dict file"),
        "bad index": (["quantize", tmp_path / "bad.index.json", tmp_path / "o.safetensors", "--bits", "8"], 1,
                      "not a safetensors index"),
        "bits": (["quantize", ok, tmp_path / "o.safetensors", "--bits", "3"], 2, "invalid choice: 3"),
        "group size": (["quantize", ok, tmp_path / "o.safetensors", "--bits", "4", "--group-size", "0"], 2,
                       "--group-size must be positive"),
        "same file": (["quantize", ok, ok, "--bits", "8"], 1, "OUT must differ from IN"),
        "inspect plain": (["inspect", ok], 1, "not a monoquant file"),
        "no command": ([], 2, "the following arguments are required"),
    }


def test_bad_arguments_and_files_exit_nonzero_with_one_line(tmp_path):
    for case, (args, code, message) in _bad_inputs(tmp_path).items():
        r = _cli(*args)
        assert r.returncode == code, (case, r.stderr)
        assert r.stdout == "", case
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and re.match(r"monoquant( quantize)?: error: ", lines[0]), (case, r.stderr)
        assert message in lines[0], (case, lines[0])
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(("args", "spec"), [
    (["--format", "nf4"], mq.NF4()),
    (["--format", "nf4", "--group-size", "32"], mq.NF4(group_size=32)),
    (["--format", "int4", "--symmetric"], mq.Int4(symmetric=True)),
    (["--format", "int8", "--affine"], mq.Int8(symmetric=False)),
    (["--format", "float16"], mq.Float16()),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_any_format_by_name_writes_what_the_library_writes(checkpoint, tmp_path, args, spec):
    model, path = checkpoint
    out = tmp_path / "q.safetensors"
    r = _cli("quantize", path, out, *args)
    assert r.returncode == 0, r.stderr
    written, expected = load_file(str(out)), _expected_file(model, spec, tmp_path)
    assert written.keys() == expected.keys()
    for k in expected:
        assert torch.equal(written[k], expected[k]), k


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "int8", "--group-size", "64"], "--group-size applies to int4 and nf4, not int8"),
    (["--format", "nf4", "--symmetric"], "--symmetric/--affine apply to int8 and int4, not nf4"),
])
def test_options_a_format_does_not_have_are_refused(checkpoint, tmp_path, args, message):
    _, path = checkpoint
    r = _cli("quantize", path, tmp_path / "q.safetensors", *args)
    assert r.returncode == 1 and r.stderr.strip() == f"monoquant: error: {message}"
    assert not (tmp_path / "q.safetensors").exists()
