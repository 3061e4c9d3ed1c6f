"""Real checkpoints and tokenizer batches: ignorable keys (old ``position_ids``), ``strict=False``, folders,
non-persistent buffers of meta skeletons, ``BatchEncoding`` and ``labels`` batches (tiny BERT, no downloads)."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import monoquant as mq
from monoquant.cli import main as cli_main
from monoquant.data import call_form

pytestmark = pytest.mark.transformers
pytest.importorskip("transformers")
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.tokenization_utils_base import BatchEncoding  # noqa: E402

INT8 = mq.QuantConfig(mq.Int8())


def bert_config() -> BertConfig:
    return BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=32)


def bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(bert_config()).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def old_checkpoint(tmp_path) -> str:
    """A float BERT checkpoint as older transformers saved it: with the (now non-persistent) ``position_ids``."""
    model = bert()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["embeddings.position_ids"] = model.embeddings.position_ids.clone()
    path = str(tmp_path / "model.safetensors")
    save_file(state, path)
    return path


def test_cli_output_of_an_old_checkpoint_loads_skipping_position_ids_with_a_note(tmp_path, capsys):
    out = str(tmp_path / "q.safetensors")
    assert cli_main(["quantize", old_checkpoint(tmp_path), out, "--bits", "8"]) == 0
    with pytest.warns(UserWarning, match=r"skipping \['embeddings.position_ids'\].*declares ignorable"):
        eager = mq.load(bert(), out)
    with torch.device("meta"):
        skeleton = BertModel(bert_config()).eval()
    with pytest.warns(UserWarning, match="position_ids"):
        meta = mq.load(skeleton, out)
    assert meta.embeddings.position_ids.device.type == "cpu"
    assert torch.equal(meta.embeddings.position_ids, eager.embeddings.position_ids)
    assert torch.equal(meta.embeddings.token_type_ids, eager.embeddings.token_type_ids)
    with torch.no_grad():
        assert torch.equal(meta(ids()).last_hidden_state, eager(ids()).last_hidden_state)


def test_unknown_keys_fail_by_default_and_are_listed_with_strict_false(tmp_path):
    model = bert()
    mq.quantize_(model, INT8)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["pooler.extra.weight"] = torch.ones(3)
    with pytest.raises(mq.SerializationError, match=r"'pooler.extra.weight'.*strict=False"):
        mq.load(bert(), state)
    with pytest.warns(UserWarning, match=r"strict=False\): \['pooler.extra.weight'\]"):
        loaded = mq.load(bert(), state, strict=False)
    with torch.no_grad():
        assert torch.equal(loaded(ids()).last_hidden_state, model(ids()).last_hidden_state)


def test_meta_skeleton_of_a_rotary_llama_gets_inv_freq_from_its_own_init(tmp_path):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    eager = LlamaForCausalLM(cfg).eval()
    mq.quantize_(eager, INT8)
    mq.save(eager, tmp_path / "q.safetensors")
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing left on meta
        loaded = mq.load(skeleton, tmp_path / "q.safetensors")
    assert not [n for n, b in loaded.named_buffers() if b.device.type == "meta"]
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, eager(ids()).logits)


def test_a_plain_model_with_a_meta_buffer_left_is_named_in_a_warning(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 8)
            self.register_buffer("offset", torch.ones(8), persistent=False)

    net = Net()
    mq.quantize_(net, mq.QuantConfig(mq.Int8(), skip=mq.SkipRules.none()))
    mq.save(net, tmp_path / "n.safetensors")
    with torch.device("meta"):
        skeleton = Net()
    with pytest.warns(UserWarning, match=r"'offset' of the model are non-persistent buffers"):
        mq.load(skeleton, tmp_path / "n.safetensors")


def test_tokenizer_batch_encodings_calibrate_like_dicts():
    batches = [BatchEncoding({"input_ids": ids(s), "attention_mask": torch.ones(2, 7, dtype=torch.long)})
               for s in range(3)]
    static = mq.QuantConfig(mq.Int8(), activations=mq.Int8())
    as_dicts, as_encodings = bert(), bert()
    mq.quantize_(as_dicts, static, calibration_data=[dict(b) for b in batches])
    mq.quantize_(as_encodings, static, calibration_data=batches)
    with torch.no_grad():
        assert torch.equal(as_encodings(ids(9)).last_hidden_state, as_dicts(ids(9)).last_hidden_state)


class Encoder(nn.Module):
    """A model whose ``forward`` takes no ``**kwargs`` (transformers 5 models take any keyword)."""

    def __init__(self):
        super().__init__()
        self.bert = bert()

    def forward(self, input_ids, attention_mask=None):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def test_labels_forward_does_not_take_are_dropped_with_one_warning():
    model = Encoder().eval()
    batch = {"input_ids": ids(), "labels": torch.zeros(2, dtype=torch.long)}
    with pytest.warns(UserWarning, match=r"Encoder.forward takes no \['labels'\]") as caught:
        args, kwargs = call_form(model, batch)
        call_form(model, batch)
    assert len(caught) == 1 and args == () and list(kwargs) == ["input_ids"]
    calibrated = Encoder().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mq.quantize_(calibrated, mq.QuantConfig(mq.Int8(), activations=mq.Int8()), calibration_data=[batch] * 2)
    with torch.no_grad():
        assert torch.equal(mq.run_batch(calibrated, batch), calibrated(ids()))


def test_a_batch_forward_cannot_take_is_refused_naming_forward_fn():
    with pytest.raises(mq.ConfigError, match=r"dicts with keys \['inputs'\] .*missing a required argument.*"
                                             r"forward_fn="):
        call_form(nn.Linear(4, 4), {"inputs": torch.ones(1, 4)})
    with pytest.raises(mq.ConfigError, match=r"batch of type str.*forward_fn="):
        call_form(nn.Linear(4, 4), "text")


def test_a_folder_holding_one_monoquant_file_loads(tmp_path):
    """``dst/config.json`` (no monoquant quantization_config) + ``dst/model.safetensors`` written by ``mq.save``."""
    model = bert()
    mq.quantize_(model, INT8)
    mq.save(model, tmp_path / "model.safetensors")
    bert_config().to_json_file(tmp_path / "config.json")
    with torch.device("meta"):
        skeleton = BertModel(bert_config()).eval()
    with torch.no_grad():
        assert torch.equal(mq.load(skeleton, tmp_path)(ids()).last_hidden_state, model(ids()).last_hidden_state)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(mq.SerializationError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"):
        mq.load(bert(), tmp_path)
