"""Hugging Face transformers models out of the box: GPT-2 (``Conv1D`` layers) and Llama (``nn.Linear``), tiny
sizes built from their configs (nothing downloaded) and briefly trained on the example's synthetic language."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import monoquant as mq
from monoquant import functional as F
from monoquant.cli import main as cli_main
from monoquant.nn import QuantHFConv1D, QuantLinear, quant_class_for
from monoquant.rules import LAST_LINEAR_HEAD_REASON

pytestmark = pytest.mark.transformers
pytest.importorskip("transformers")
from transformers import GPT2Model  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import transformers_causal_lm as lm  # noqa: E402

TRAIN_STEPS = 80
GPT2_LAYERS = [f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj")]
LLAMA_LAYERS = [f"model.layers.{i}.{n}" for i in range(2)
                for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
ARCHS = {
    "gpt2": (lm.tiny_gpt2, GPT2_LAYERS, "transformer.wte", QuantHFConv1D),
    "llama": (lm.tiny_llama, LLAMA_LAYERS, "model.embed_tokens", QuantLinear),
}
SCHEMES = {
    "int8": mq.QuantConfig(mq.Int8()),
    "int4": mq.QuantConfig(mq.Int4(group_size=128)),
    "int4-gptq": mq.QuantConfig(mq.Int4(group_size=128, method="gptq")),
}
# measured (see the test's comment): logits SQNR floor (dB) and largest perplexity increase per scheme
BOUNDS = {"int8": (40.0, 0.005), "int4": (20.0, 0.03), "int4-gptq": (20.0, 0.03)}


@pytest.fixture(scope="module")
def lang():
    return lm.make_language()


@pytest.fixture(scope="module")
def data(lang):
    return {"held_out": lm.sample(lang, 32, seed=1), "calibration": [lm.sample(lang, 16, seed=2 + i) for i in range(2)]}


@pytest.fixture(scope="module")
def trained(lang):
    return {arch: lm.train(build(), lang, TRAIN_STEPS) for arch, (build, *_) in ARCHS.items()}


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_eligible_layer_quantizes_and_the_tied_head_stays_float(trained, data, arch, scheme):
    _, layers, embedding, qcls = ARCHS[arch]
    model = copy.deepcopy(trained[arch])
    ref_logits, ref_ppl = _logits(model, data["held_out"]), lm.perplexity(model, data["held_out"])
    report = mq.quantize_(model, SCHEMES[scheme], calibration_data=data["calibration"])
    assert [r.name for r in report.quantized] == layers
    assert all(type(model.get_submodule(n)) is qcls for n in layers)
    emb = model.get_submodule(embedding)
    assert report.skipped == {"lm_head": f"weight is tied to {embedding} (Embedding), which stays float"}
    assert model.lm_head.weight is emb.weight and type(model.lm_head) is nn.Linear
    expected_scheme = {"int8": "int8-sym-channel", "int4": "int4-affine-g128", "int4-gptq": "int4-affine-g128"}
    assert {r.scheme for r in report.quantized} == {expected_scheme[scheme]}
    assert {r.method for r in report.quantized} == {"gptq" if scheme == "int4-gptq" else "rtn"}
    # on held-out sequences the calibration never saw; these models measure INT8 47-52 dB and |ppl change| < 0.01%,
    # INT4-g128 RTN 25-32 dB and GPTQ 31-38 dB with |ppl change| < 0.25%: the bounds leave 5+ dB and 10x of room
    floor, max_increase = BOUNDS[scheme]
    assert F.sqnr(ref_logits, _logits(model, data["held_out"])) > floor
    ppl = lm.perplexity(model, data["held_out"])
    assert ref_ppl * (1 - max_increase) < ppl < ref_ppl * (1 + max_increase)
    assert ref_ppl < 0.6 * lm.VOCAB  # the model did learn the language: the comparison means something


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_reload_into_a_meta_model_is_bit_exact_and_keeps_the_tie(trained, data, arch, tmp_path):
    build, layers, embedding, qcls = ARCHS[arch]
    model = copy.deepcopy(trained[arch])
    mq.quantize_(model, SCHEMES["int4-gptq"], calibration_data=data["calibration"])
    prompt = data["held_out"][:2, :8]
    logits, tokens = _logits(model, data["held_out"]), lm.greedy(model, prompt, 6)
    mq.save(model, tmp_path / "m.safetensors")
    # Llama's rotary inv_freq is a non-persistent buffer (in no file): a meta-built Llama would keep it without data
    with torch.device("meta" if arch == "gpt2" else "cpu"):
        fresh = build()
    mq.load(fresh, tmp_path / "m.safetensors")
    fresh.eval()
    assert fresh.lm_head.weight is fresh.get_submodule(embedding).weight  # one tensor, as before saving
    assert [n for n, m in fresh.named_modules() if type(m) is qcls] == layers
    saved, loaded = model.state_dict(), fresh.state_dict()
    assert list(saved) == list(loaded)
    assert all(torch.equal(saved[k], loaded[k]) and saved[k].dtype == loaded[k].dtype for k in saved)
    assert torch.equal(_logits(fresh, data["held_out"]), logits)
    assert torch.equal(lm.greedy(fresh, prompt, 6), tokens)
    assert "lm_head.weight" not in load_file(str(tmp_path / "m.safetensors"))  # stored once, as an alias


@settings(max_examples=15, deadline=None)
@given(nx=st.sampled_from([32, 64, 96, 256]), nf=st.integers(1, 80),
       spec=st.sampled_from([mq.Int8(), mq.Int8(symmetric=False), mq.Int4(group_size=32), mq.Float16()]),
       seed=st.integers(0, 2**16))
def test_quant_conv1d_is_quantlinear_of_the_transposed_weight(nx, nf, spec, seed):
    torch.manual_seed(seed)
    conv = Conv1D(nf, nx)
    with torch.no_grad():
        conv.bias.normal_()
    linear = nn.Linear(nx, nf)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    q, ql = QuantHFConv1D.from_float(conv, spec), QuantLinear.from_float(linear, spec)
    assert (q.nf, q.nx, q.in_features, q.out_features) == (nf, nx, nx, nf)
    assert set(q.state_dict()) == set(ql.state_dict())
    assert all(torch.equal(v, ql.state_dict()[k]) for k, v in q.state_dict().items())
    x = torch.randn(3, 5, nx)
    assert torch.equal(q(x), ql(x)) and q.last_kernel == ql.last_kernel
    assert q.weight.shape == (nx, nf) and torch.equal(q.weight, ql.weight.t())  # Conv1D's own layout
    back = q.to_float()
    assert type(back) is Conv1D and (back.nf, back.nx) == (nf, nx)
    assert torch.equal(back.weight, q.weight) and torch.equal(back.bias, conv.bias)


def test_from_float_refuses_other_layers_and_matching_never_imports_transformers():
    with pytest.raises(mq.ConfigError,
                       match=r"QuantHFConv1D\.from_float expects transformers\.pytorch_utils\.Conv1D, got Linear"):
        QuantHFConv1D.from_float(nn.Linear(64, 64))

    class MyConv1D(Conv1D):  # subclasses match too (by the class path in the MRO)
        pass

    assert quant_class_for(MyConv1D(8, 8)) is QuantHFConv1D
    assert quant_class_for(nn.Linear(8, 8)) is QuantLinear and quant_class_for(nn.Embedding(4, 4)) is mq.QuantEmbedding
    code = ("import sys, torch, monoquant as mq; m = torch.nn.Sequential(torch.nn.Linear(64, 64)); "
            "mq.quantize_(m, mq.Int8()); mq.dequantize_(m); assert 'transformers' not in sys.modules, 'imported'")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_dequantize_gives_back_conv1d_layers_with_the_dequantized_weights_and_the_tie(trained):
    model = copy.deepcopy(trained["gpt2"])
    mq.quantize_(model, mq.Int4(group_size=128))
    weights = {n: model.get_submodule(n).weight for n in GPT2_LAYERS}
    mq.dequantize_(model)
    for name, w in weights.items():
        layer = model.get_submodule(name)
        assert type(layer) is Conv1D and torch.equal(layer.weight, w)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_skip_head_takes_the_last_conv1d_when_no_layer_is_named_like_a_head():
    model = GPT2Model(lm.tiny_gpt2().config).eval()
    report = mq.quantize_(model, mq.QuantConfig(mq.Int8(), skip=mq.SkipRules(skip_head=True)))
    assert report.skipped == {"h.1.mlp.c_proj": LAST_LINEAR_HEAD_REASON}
    assert [r.name for r in report.quantized] == [n.removeprefix("transformer.") for n in GPT2_LAYERS[:-1]]


def test_int4_groups_run_along_the_conv1d_input():
    model = nn.Sequential(Conv1D(256, 96))  # 96 inputs, 256 outputs
    report = mq.quantize_(model, mq.Int4(group_size=128))
    g = mq.Int4(group_size=128).resolve_group_size(96)
    assert g is not None and 96 % g == 0
    assert report.row("0").scheme == f"int4-affine-g{g}"
    assert model[0].scale.shape == (256, 96 // g)


def test_a_quantized_state_dict_loads_into_a_float_gpt2(trained, data):
    model = copy.deepcopy(trained["gpt2"])
    mq.quantize_(model, mq.Int4(group_size=128))
    fresh = lm.tiny_gpt2().eval()
    mq.load(fresh, model.state_dict())
    assert [n for n, m in fresh.named_modules() if isinstance(m, QuantHFConv1D)] == GPT2_LAYERS
    assert torch.equal(_logits(fresh, data["held_out"]), _logits(model, data["held_out"]))


def test_sensitivity_ranks_every_conv1d_layer(trained, data):
    rows = mq.sensitivity(trained["gpt2"], mq.Int4(group_size=128), data["calibration"][:1])
    assert sorted(r.name for r in rows) == sorted(GPT2_LAYERS)
    assert [r.sqnr_db for r in rows] == sorted(r.sqnr_db for r in rows)


def test_cli_quantizes_a_gpt2_checkpoint_like_the_library(trained, data, tmp_path, capsys):
    model = trained["gpt2"]
    # as save_pretrained writes a tied GPT-2: the shared tensor once, as transformer.wte.weight
    save_file({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, tmp_path / "gpt2.safetensors")
    gpt2_args = ["--bits", "4", "--skip", "*wte", "--skip", "*wpe", "--no-progress"]
    conv1d = ["--conv1d", "*.c_attn", "--conv1d", "*.c_proj", "--conv1d", "*.c_fc"]
    assert cli_main(["quantize", str(tmp_path / "gpt2.safetensors"), str(tmp_path / "q.safetensors"), *gpt2_args,
                     *conv1d]) == 0
    assert "8 of" in capsys.readouterr().out
    with torch.device("meta"):
        fresh = lm.tiny_gpt2()
    mq.load(fresh, tmp_path / "q.safetensors").eval()
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    twin = copy.deepcopy(model)
    mq.quantize_(twin, mq.Int4(group_size=128))
    for name in GPT2_LAYERS:
        mine, lib = fresh.get_submodule(name).state_dict(), twin.get_submodule(name).state_dict()
        assert type(fresh.get_submodule(name)) is QuantHFConv1D
        assert all(torch.equal(mine[k], lib[k]) for k in lib)
    assert torch.equal(_logits(fresh, data["held_out"]), _logits(twin, data["held_out"]))

    # without --conv1d the transposed weights are quantized as [out, in] Linears: mq.load names the fix
    assert cli_main(["quantize", str(tmp_path / "gpt2.safetensors"), str(tmp_path / "bad.safetensors"),
                     *gpt2_args]) == 0
    with torch.device("meta"):
        fresh = lm.tiny_gpt2()
    with pytest.raises(mq.SerializationError, match=r"Conv1D in the model but QuantLinear .*--conv1d 'transformer"):
        mq.load(fresh, tmp_path / "bad.safetensors")
    assert cli_main(["quantize", str(tmp_path / "gpt2.safetensors"), str(tmp_path / "typo.safetensors"),
                     *gpt2_args, "--conv1d", "*.c_atn"]) == 1
    assert "--conv1d '*.c_atn' matches no 2-D *.weight tensor" in capsys.readouterr().err
    assert not (tmp_path / "typo.safetensors").exists()
