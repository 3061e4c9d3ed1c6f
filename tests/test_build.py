"""The compiled kernels' build: one visible line while it runs, one folder per installation (two checkouts never
evict each other), a finished build imported without compiling again, and ``monoquant doctor``."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from monoquant import cli, fused, hardware

ROOT = Path(__file__).resolve().parents[1]


def _build_folder_of(copy: Path, cache: Path) -> str:
    """``fused.build_directory()`` as a fresh interpreter importing the package from ``copy`` computes it."""
    env = dict(os.environ, PYTHONPATH=str(copy), MONOQUANT_EXT_DIR=str(cache))
    code = f"import monoquant.fused as f; assert f.__file__.startswith({str(copy)!r}); print(f.build_directory())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=copy, check=True)
    return out.stdout.strip()


def test_two_copies_of_the_package_build_into_two_folders(tmp_path):
    """The cache key holds the package's location: two checkouts sharing one cache keep one build each (before,
    they shared one folder and each import rebuilt over the other's build: 28.7 s per switch)."""
    copies = [tmp_path / "a", tmp_path / "b"]
    for copy in copies:
        shutil.copytree(ROOT / "monoquant", copy / "monoquant", ignore=shutil.ignore_patterns("__pycache__"))
    cache = tmp_path / "cache"
    folders = [_build_folder_of(copy, cache) for copy in copies]
    assert folders[0] != folders[1]
    assert all(Path(f).parent == cache for f in folders)
    assert _build_folder_of(copies[0], cache) == folders[0]  # stable: the same copy finds its build again


def test_the_key_holds_package_and_torch_locations(monkeypatch):
    name = fused.extension_name()
    assert fused.installation() == f"{Path(fused.__file__).resolve().parent}|{Path(torch.__file__).resolve().parent}"
    monkeypatch.setattr(fused, "installation", lambda: "/elsewhere/monoquant|/elsewhere/torch")
    assert fused.extension_name() != name and fused.extension_name().startswith("monoquant_fused_")


def test_a_build_prints_one_line_with_its_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MONOQUANT_EXT_DIR", str(tmp_path))
    calls = []

    def fake_load(name, sources, **kwargs):
        calls.append((name, kwargs["build_directory"]))
        return "the module"

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    assert fused._compile() == "the module"
    err = capsys.readouterr().err
    assert calls == [(fused.extension_name(), str(tmp_path / fused.extension_name()))]
    assert err.count("\n") == 1 and err.startswith("monoquant: building the compiled CPU kernels")
    assert str(tmp_path / fused.extension_name()) in err and " done in " in err and err.endswith(" s\n")


@pytest.mark.skipif(not fused.available(), reason=f"no compiled kernel here: {fused.load_error()}")
def test_a_finished_build_is_imported_without_compiling(monkeypatch):
    assert fused.built_library().exists()
    monkeypatch.delitem(fused._STATE, "module")
    monkeypatch.delitem(fused._STATE, "error")

    def no_compile():
        raise AssertionError("a finished build was compiled again")

    monkeypatch.setattr(fused, "_compile", no_compile)
    module = fused.load()
    assert module is not None and fused.load_error() is None and module.simd() in ("avx512", "avx2", "scalar")


def test_doctor_prints_features_kernels_build_state_and_cache(capsys):
    assert cli.main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"CPU: {fused.cpu_identity()}"
    assert lines[2].startswith("CPU features (torch.cpu): AVX2 ")
    assert lines[4] == f"compiled kernels: {fused.build_state()}"
    assert lines[5].startswith(f"  cache: {fused.cache_root()} (")
    assert lines[6] == f"  this installation's build folder: {fused.build_directory()}"
    table = lines[lines.index("kernels:") + 1:]
    names = [line.split()[0] for line in table]
    expected = ["int4pack_cpu", "int8pack_cpu", "fused_cpu", "fused_bf16", "fused_bf16_gemm", "w8a8_int_mm",
                "w8a8_onednn", "w8a8_vnni", "w8a8_fused", "dequant_bf16", "dequant"]
    assert names == (["int4pack_cuda"] if torch.cuda.is_available() else []) + expected
    built = "yes" if fused.available() else "no"
    assert table[names.index("fused_cpu")].split()[1] == built and table[-1].split()[1] == "yes"
    bf16_built = "yes" if fused.available() and hardware.cpu_has_avx512_bf16() else "no"
    assert table[names.index("fused_bf16_gemm")].split()[1] == bf16_built
