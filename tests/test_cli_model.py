"""``monoquant quantize --model``: the model (built on the meta device from its config) picks each weight's layer
class, instead of the weight's rank. Tiny GPT-2 and Llama configs, nothing downloaded."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import monoquant as mq
from monoquant import functional as F
from monoquant.cli import main as cli_main

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

GPT2_SKIP = ("--skip", "*wte", "--skip", "*wpe")


def _classes(path) -> dict[str, str]:
    """Layer name -> quantized class, from the file header."""
    with safe_open(str(path), "pt") as f:
        modules = json.loads(f.metadata()["modules"])
    return {name: entry["class"] for name, entry in modules.items()}


def _gpt2(tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_positions=16, n_embd=64, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config).eval()
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)  # config.json + model.safetensors (lm_head is tied to wte: not stored)
    return model, folder


def test_gpt2_conv1d_weights_become_quant_hf_conv1d_without_patterns(tmp_path):
    model, folder = _gpt2(tmp_path)
    by_model, by_pattern = tmp_path / "model.safetensors", tmp_path / "pattern.safetensors"
    assert cli_main(["quantize", str(folder / "model.safetensors"), str(by_model), "--bits", "8", "--model",
                     str(folder), *GPT2_SKIP, "--no-progress"]) == 0
    conv1d = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                    "mlp.c_proj")]
    assert _classes(by_model) == dict.fromkeys(conv1d, "QuantHFConv1D")
    # the very bytes the documented --conv1d patterns write
    assert cli_main(["quantize", str(folder / "model.safetensors"), str(by_pattern), "--bits", "8", *GPT2_SKIP,
                     "--conv1d", "*.c_attn", "--conv1d", "*.c_proj", "--conv1d", "*.c_fc", "--no-progress"]) == 0
    got, want = load_file(str(by_model)), load_file(str(by_pattern))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # and it loads into the float model and runs close to it
    loaded = mq.load(GPT2LMHeadModel(model.config).eval(), by_model)
    assert all(type(loaded.get_submodule(n)).__name__ == "QuantHFConv1D" for n in conv1d)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = model(ids).logits, loaded(ids).logits
    assert F.sqnr(ref, out) > 30.0


def test_without_model_a_gpt2_conv1d_weight_falls_back_to_linear_by_rank(tmp_path):
    _, folder = _gpt2(tmp_path)
    out = tmp_path / "rank.safetensors"
    assert cli_main(["quantize", str(folder / "model.safetensors"), str(out), "--bits", "8", *GPT2_SKIP,
                     "--no-progress"]) == 0
    assert set(_classes(out).values()) == {"QuantLinear"}


def test_llama_from_its_config_json_matches_the_rank_fallback_and_keeps_norms_float(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config).eval()
    ckpt = tmp_path / "llama.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    config.to_json_file(str(tmp_path / "config.json"))
    by_model, by_rank = tmp_path / "model.safetensors", tmp_path / "rank.safetensors"
    # --no-default-skip: the norms stay float because the model says they are RMSNorms, not by their names
    assert cli_main(["quantize", str(ckpt), str(by_model), "--bits", "4", "--model", str(tmp_path / "config.json"),
                     "--skip", "*embed_tokens", "--no-default-skip", "--no-progress"]) == 0
    linears = [f"model.layers.{i}.{m}" for i in range(2)
               for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert _classes(by_model) == dict.fromkeys([*linears, "lm_head"], "QuantLinear")
    assert cli_main(["quantize", str(ckpt), str(by_rank), "--bits", "4", "--no-progress"]) == 0
    got, want = load_file(str(by_model)), load_file(str(by_rank))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_weight_the_model_does_not_have_is_an_error_naming_it(tmp_path, capsys):
    model, folder = _gpt2(tmp_path)
    state = {k: v.contiguous() for k, v in model.transformer.state_dict().items()}
    state["extra.proj.weight"] = torch.randn(64, 64)
    ckpt = tmp_path / "extra.safetensors"
    save_file(state, str(ckpt))
    out = tmp_path / "out.safetensors"
    assert cli_main(["quantize", str(ckpt), str(out), "--bits", "8", "--model", str(folder), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "1 weight(s) of the checkpoint are not in the model" in err and "extra.proj.weight" in err
    assert not out.exists()
