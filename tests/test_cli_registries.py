"""The command line reads the registries: any registered format is selectable (``--format``) and inspectable,
a plugin module registers more (``--plugin``), and ``--layer GLOB=CLASS`` picks any registered layer class."""

import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import monoquant as mq
from monoquant import cli
from monoquant.formats import FORMATS
from monoquant.nn import LAYERS

PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass
    from typing import ClassVar

    import torch

    import monoquant as mq
    from monoquant.formats import StoredWeight, WeightSpec


    @mq.register_format
    @dataclass(frozen=True)
    class PluginFP8(WeightSpec):
        kind: ClassVar[str] = "fp8-plugin-test"
        layout: ClassVar[str] = "fp8-e4m3-rowmajor"
        bits: ClassVar[int] = 8

        def empty_buffers(self, n, k, group_size, device=None):
            return StoredWeight(torch.empty(n, k, dtype=torch.float8_e4m3fn, device=device),
                                torch.ones(n, dtype=torch.float32, device=device))

        def quantize(self, weight2d, group_size=None, observer=None):
            w = weight2d.detach().float()
            scale = (w.abs().amax(dim=1) / 448.0).clamp_min(1e-12)
            return StoredWeight((w / scale[:, None]).to(torch.float8_e4m3fn), scale)

        def dequant_params(self, stored, dtype):
            return (stored.scale[:, None].to(dtype),)

        def dequantize_into(self, out, stored, row_start, params, group_size, scratch=None, *, scaled=True):
            rows = slice(row_start, row_start + out.shape[0])
            return out.copy_(stored.qweight[rows]).mul_(params[0][rows])
''')


def test_format_choices_are_the_registered_formats_highest_precision_first():
    choices = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["quantize"]._actions
                   if a.dest == "format").choices
    assert choices == list(cli.cli_formats())
    assert {"int8", "int4", "nf4", "float16", "bfloat16"} <= set(choices)
    assert [FORMATS[k].bits for k in choices] == sorted((FORMATS[k].bits for k in choices), reverse=True)


def test_rank_fallbacks_come_from_the_layer_registry():
    assert {r: c.__name__ for r, c in cli.rank_fallbacks().items()} == {
        2: "QuantLinear", 3: "QuantConv1d", 4: "QuantConv2d", 5: "QuantConv3d"}


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "mq_plugin_fp8.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mq_plugin_fp8"
    FORMATS.pop("fp8-plugin-test", None)
    sys.modules.pop("mq_plugin_fp8", None)


def test_a_plugin_format_is_selectable_and_inspectable(plugin, tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    src, out = tmp_path / "model.safetensors", tmp_path / "q.safetensors"
    save_file(model.state_dict(), str(src))
    assert cli.main(["--plugin", plugin, "quantize", str(src), str(out), "--format", "fp8-plugin-test",
                     "--no-progress"]) == 0
    assert cli.main(["--plugin", plugin, "inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert shown.count("fp8-plugin-test") >= 2 and "2 quantized layers" in shown
    restored = mq.load(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)), out)
    assert restored[0].spec.kind == "fp8-plugin-test"
    x = torch.randn(4, 64)
    assert mq.compare(model, restored, [x]).sqnr_db > 25


def test_without_its_plugin_a_custom_format_names_the_option_that_reads_it(plugin, tmp_path, capsys):
    src, out = tmp_path / "model.safetensors", tmp_path / "q.safetensors"
    save_file(nn.Sequential(nn.Linear(64, 64)).state_dict(), str(src))
    assert cli.main(["--plugin", plugin, "quantize", str(src), str(out), "--format", "fp8-plugin-test",
                     "--no-progress"]) == 0
    FORMATS.pop("fp8-plugin-test")
    capsys.readouterr()
    assert cli.main(["inspect", str(out)]) == 1
    err = capsys.readouterr().err
    assert "unknown weight spec kind 'fp8-plugin-test'" in err and "--plugin" in err


def test_a_plugin_that_cannot_be_imported_is_one_error_line(capsys):
    assert cli.main(["--plugin", "no_such_module_for_monoquant", "inspect", "x.safetensors"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("monoquant: error: --plugin no_such_module_for_monoquant: cannot import it")
    assert err.count("\n") == 1


def test_layer_option_names_the_registered_class_and_refuses_unknown_ones(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 64))
    src, out = tmp_path / "model.safetensors", tmp_path / "q.safetensors"
    save_file(model.state_dict(), str(src))
    assert cli.main(["quantize", str(src), str(out), "--bits", "8", "--layer", "0=QuantEmbedding",
                     "--no-progress"]) == 0
    restored = mq.load(nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 64)), out)
    assert type(restored[0]) is LAYERS["QuantEmbedding"] and type(restored[1]) is mq.QuantLinear
    ids = torch.tensor([[1, 5, 63]])
    assert torch.allclose(restored(ids), model(ids), atol=0.05)
    assert cli.main(["quantize", str(src), str(out), "--bits", "8", "--layer", "0=NoSuchLayer"]) == 1
    assert "give GLOB=CLASS with CLASS one of" in capsys.readouterr().err
    assert cli.main(["quantize", str(src), str(out), "--bits", "8", "--layer", "nothing=QuantLinear"]) == 1
    assert "matches no 2-D *.weight tensor" in capsys.readouterr().err
