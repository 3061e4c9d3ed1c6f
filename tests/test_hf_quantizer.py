"""transformers' save_pretrained / from_pretrained of monoquant models (tiny models from configs, no downloads):
bit-exact round trips for an encoder, a classification head, GPT-2 (Conv1D) and a tied-head Llama, sharded and
not, through transformers and through mq.load; quantizing while loading; peak memory of a load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import monoquant as mq

pytestmark = pytest.mark.transformers
pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import monoquant.hf as mqhf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bert_config(**kw) -> BertConfig:
    return BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=32, **kw)


def llama_config(hidden: int = 32, layers: int = 2, intermediate: int = 64) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                       tie_word_embeddings=True)


MODELS = {
    "bert": (lambda: BertModel(bert_config()), AutoModel, lambda out: out.last_hidden_state),
    "bert-classifier": (lambda: BertForSequenceClassification(bert_config(num_labels=3)),
                        AutoModelForSequenceClassification, lambda out: out.logits),
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                                          bos_token_id=0, eos_token_id=0)),
             AutoModelForCausalLM, lambda out: out.logits),
    "llama-tied": (lambda: LlamaForCausalLM(llama_config()), AutoModelForCausalLM, lambda out: out.logits),
}
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
INT4 = mq.QuantConfig(mq.Int4(group_size=16))


def quantized(arch: str, config: mq.QuantConfig = INT4):
    torch.manual_seed(0)
    model = MODELS[arch][0]().eval()
    report = mq.quantize_(model, config)
    assert report.quantized
    return model


def output(arch: str, model) -> torch.Tensor:
    with torch.no_grad():
        return MODELS[arch][2](model(IDS))


@pytest.mark.parametrize("shard", [None, "20KB"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_save_pretrained_from_pretrained_is_bit_exact(tmp_path, arch, shard):
    model = quantized(arch)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "monoquant"
    assert sorted(qc["modules"]) == sorted(n for n, m in model.named_modules() if isinstance(m, mq.QuantModule))
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard is not None)
    if shard:
        assert len({*json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values()}) > 1

    loaded = MODELS[arch][1].from_pretrained(tmp_path).eval()
    assert {n for n, m in loaded.named_modules() if isinstance(m, mq.QuantModule)} == set(qc["modules"])
    assert torch.equal(output(arch, loaded), output(arch, model))
    loaded.save_pretrained(tmp_path / "again")  # a loaded model saves again, to the same header
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert again["modules"] == qc["modules"]

    with torch.device("meta"):  # mq.load reads the same folder, without transformers' loader
        skeleton = MODELS[arch][0]().eval()
    assert torch.equal(output(arch, mq.load(skeleton, tmp_path)), output(arch, model))


def test_from_pretrained_quantizes_a_float_checkpoint_while_loading(tmp_path):
    torch.manual_seed(0)
    float_model = LlamaForCausalLM(llama_config()).eval()
    float_model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=mqhf.MonoQuantConfig(INT4)).eval()
    eager = LlamaForCausalLM(llama_config()).eval()
    eager.load_state_dict(float_model.state_dict())
    mq.quantize_(eager, INT4)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, mq.QuantLinear)
    assert torch.equal(output("llama-tied", loaded), output("llama-tied", eager))
    loaded.save_pretrained(tmp_path / "q")
    assert torch.equal(output("llama-tied", AutoModelForCausalLM.from_pretrained(tmp_path / "q")),
                       output("llama-tied", eager))


def test_configs_that_need_data_name_the_call_to_use(tmp_path):
    BertModel(bert_config()).save_pretrained(tmp_path)
    static = mq.QuantConfig(mq.Int8(), activations=mq.Int8())
    with pytest.raises(mq.ConfigError, match=r"calibration data.*mq.quantize_\(model, config, calibration_data="):
        AutoModel.from_pretrained(tmp_path, quantization_config=mqhf.MonoQuantConfig(static))


def test_dequantize_saves_a_float_model_again(tmp_path):
    model = quantized("bert")
    mq.dequantize_(model)
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert isinstance(AutoModel.from_pretrained(tmp_path).encoder.layer[0].output.dense, torch.nn.Linear)


PEAK = """
import sys, torch, monoquant.hf
from transformers import AutoModelForCausalLM, LlamaConfig

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

config = LlamaConfig.from_pretrained(sys.argv[1])
with torch.device("meta"):
    AutoModelForCausalLM.from_config(config)  # the skeleton's own cost (code, caches) is in the baseline
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) restarts at the current RSS
before = status("VmRSS")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print("PEAK", status("VmHWM") - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_from_pretrained_peak_memory_is_the_quantized_bytes_not_the_float_ones(tmp_path):
    model = LlamaForCausalLM(llama_config(hidden=512, layers=4, intermediate=1536)).eval()
    mq.quantize_(model, mq.QuantConfig(mq.Int8()))
    model.save_pretrained(tmp_path)
    quantized_bytes = (tmp_path / "model.safetensors").stat().st_size
    float_bytes = sum(p.numel() * 4 for p in LlamaForCausalLM(llama_config(512, 4, 1536)).parameters())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path)], capture_output=True, text=True, check=True,
                         env=env).stdout
    peak = int(next(line.split()[1] for line in out.splitlines() if line.startswith("PEAK")))
    print(f"from_pretrained peak RSS growth {peak / 2**20:.1f} MB; quantized file {quantized_bytes / 2**20:.1f} MB; "
          f"float weights {float_bytes / 2**20:.1f} MB")
    assert peak < 1.3 * quantized_bytes


def readme_section_blocks(title: str) -> list[str]:
    """The ```python blocks of the README section ``title`` (up to the next heading)."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n{title}\n", 1)[1].split("\n#", 1)[0]
    return [b.split("\n", 1)[1].rsplit("```", 1)[0] for b in section.split("```python")[1:]]


def test_the_readme_transformers_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = readme_section_blocks("### Hugging Face transformers")
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = MODELS["gpt2"][0]().eval()
    model.save_pretrained(tmp_path / "float")
    expected = model
    scope = {"model": model, "batches": [IDS[:, :5], IDS[:, 2:]], "float_folder": str(tmp_path / "float")}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # quantize_, report, save_pretrained, from_pretrained
    assert isinstance(scope["model"].transformer.h[0].mlp.c_fc, mq.QuantHFConv1D)
    assert torch.equal(output("gpt2", scope["model"]), output("gpt2", expected))
    assert (tmp_path / "layers.png").is_file() and (tmp_path / "tiny-int4" / "config.json").is_file()
    exec(compile(blocks[1], "README.md", "exec"), scope)  # quantizing a float checkpoint while loading
    assert isinstance(scope["model"].transformer.h[1].attn.c_attn, mq.QuantHFConv1D)


def test_a_head_tied_to_a_quantized_embedding_round_trips_sharing_its_buffers(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).eval()
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), embeddings=mq.Int8()))
    assert model.lm_head.qweight is model.model.embed_tokens.qweight
    model.save_pretrained(tmp_path)
    aliases = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["aliases"]
    assert aliases == {"lm_head.qweight": "model.embed_tokens.qweight", "lm_head.scale": "model.embed_tokens.scale"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.qweight is loaded.model.embed_tokens.qweight
    assert torch.equal(output("llama-tied", loaded), output("llama-tied", model))


def test_static_activations_calibrated_later_save_once_frozen(tmp_path):
    """quantize_ without data attaches the quantizer anyway; save_pretrained refuses until mq.freeze, like mq.save."""
    torch.manual_seed(0)
    model = BertModel(bert_config()).eval()
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), activations=mq.Int8()))
    with pytest.raises(mq.SerializationError, match=r"still being calibrated.*mq.freeze\(model\)"):
        model.save_pretrained(tmp_path)
    mq.calibrate_and_freeze(model, [IDS, IDS[:, :4]])
    model.save_pretrained(tmp_path)
    assert torch.equal(output("bert", AutoModel.from_pretrained(tmp_path).eval()), output("bert", model))
