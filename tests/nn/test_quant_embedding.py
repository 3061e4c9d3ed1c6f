"""QuantEmbedding: lookups equal the dequantized table, only requested rows are dequantized, tied heads share one
quantized table in memory and in files, and a BERT-style model shrinks to a quarter of its float bytes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import monoquant as mq


class TinyLM(nn.Module):
    """Embedding -> MLP -> head tied to the embedding (tie_word_embeddings)."""

    def __init__(self, vocab: int = 512, dim: int = 64, tied: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.fc = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.fc(self.embed(ids))))


def _reference_lookup(q: mq.QuantEmbedding, ids: torch.Tensor) -> torch.Tensor:
    table = q.spec.dequantize(q.stored, q.embedding_dim, q.group_size, torch.float64)
    return table[ids].float()


@pytest.mark.parametrize("spec", [mq.Int8(), mq.Int8(symmetric=False), mq.Int8(granularity="tensor"),
                                  mq.Int4(group_size=32), mq.Int4(group_size=64, symmetric=True), mq.Float16(),
                                  mq.NF4(group_size=64)])
def test_lookup_equals_float64_reference_of_the_dequantized_table(spec):
    torch.manual_seed(0)
    emb = nn.Embedding(300, 128)
    q = mq.QuantEmbedding.from_float(emb, mq.QuantConfig(mq.Int8(), embeddings=spec))
    ids = torch.randint(0, 300, (4, 7))
    out = q(ids)
    assert out.shape == (4, 7, 128) and out.dtype == torch.float32
    assert torch.allclose(out, _reference_lookup(q, ids), rtol=0, atol=1e-6)
    assert q.last_kernel == "gather_dequant"


@settings(max_examples=25, deadline=None)
@given(vocab=st.integers(1, 70), dim=st.sampled_from([32, 64, 96, 128]), bits=st.sampled_from([8, 4]),
       shape=st.lists(st.integers(0, 5), min_size=0, max_size=3))
def test_lookup_any_shape(vocab, dim, bits, shape):
    torch.manual_seed(vocab)
    spec = mq.Int8() if bits == 8 else mq.Int4(group_size=32)
    q = mq.QuantEmbedding.from_float(nn.Embedding(vocab, dim), mq.QuantConfig(mq.Int8(), embeddings=spec))
    ids = torch.randint(0, vocab, tuple(shape))
    out = q(ids)
    assert out.shape == (*shape, dim)
    assert torch.allclose(out, _reference_lookup(q, ids), rtol=0, atol=1e-6)


def test_a_per_layer_buffer_is_not_gathered_even_when_it_has_one_entry_per_row():
    q = mq.QuantEmbedding.from_float(nn.Embedding(16, 64), mq.QuantConfig(mq.Int8(), embeddings=mq.NF4()))
    ids = torch.tensor([15, 0, 15, 3])  # NF4's 16-entry codebook must stay whole for a 16-row table
    assert torch.allclose(q(ids), _reference_lookup(q, ids), rtol=0, atol=1e-6)


def test_only_the_requested_rows_are_dequantized(monkeypatch):
    q = mq.QuantEmbedding.from_float(nn.Embedding(1000, 64), mq.QuantConfig(mq.Int8(), embeddings=mq.Int8()))
    seen = []
    original = type(q.spec).dequantize_into

    def spy(self, out, *args, **kwargs):
        seen.append(out.shape[0])
        return original(self, out, *args, **kwargs)

    monkeypatch.setattr(type(q.spec), "dequantize_into", spy)
    q(torch.tensor([[3, 5], [7, 999]]))
    assert seen == [4]


def test_embeddings_stay_float_by_default_and_head_tied_to_them_too():
    model = TinyLM()
    report = mq.quantize_(model, mq.Int8())
    assert isinstance(model.embed, nn.Embedding) and isinstance(model.lm_head, nn.Linear)
    assert report.skipped == {"lm_head": "weight is tied to embed (Embedding), which stays float"}
    assert [r.name for r in report.quantized] == ["fc"]


def test_tied_head_shares_the_quantized_table_after_quantize_and_after_reload(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(1, 512, (3, 9))
    ref = model(ids)
    report = mq.quantize_(model, mq.QuantConfig(mq.Int4(group_size=32), embeddings=mq.Int8()))
    assert [r.name for r in report.quantized] == ["embed", "fc", "lm_head"]
    # the head follows the embedding's format and runs from the very same buffers
    assert model.lm_head.spec == model.embed.spec == mq.Int8()
    assert model.lm_head.qweight is model.embed.qweight and model.lm_head.scale is model.embed.scale
    out = model(ids)
    assert mq.functional.sqnr(ref, out) > 18  # INT4 fc, INT8 table, bf16 compute
    path = tmp_path / "lm.safetensors"
    mq.save(model, path)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        stored = set(f.keys())
    assert "embed.qweight" in stored and "lm_head.qweight" not in stored  # stored once, listed as an alias
    loaded = mq.load(TinyLM(), path)
    assert loaded.lm_head.qweight is loaded.embed.qweight
    assert torch.equal(loaded(ids), out)
    with torch.device("meta"):
        skeleton = TinyLM()
    assert torch.equal(mq.load(skeleton, path)(ids), out)


def test_untied_embedding_quantizes_with_its_own_format():
    model = TinyLM(tied=False)
    report = mq.quantize_(model, mq.QuantConfig(mq.Int4(group_size=32), embeddings=mq.Int8()))
    assert {r.name: r.scheme for r in report.quantized} == {
        "embed": "int8-sym-channel", "fc": "int4-affine-g32", "lm_head": "int4-affine-g32"}


def test_padding_row_is_exactly_zero_and_geometry_round_trips():
    emb = nn.Embedding(50, 64, padding_idx=3)
    q = mq.QuantEmbedding.from_float(emb, mq.QuantConfig(mq.Int8(), embeddings=mq.Int4(group_size=32)))
    assert torch.equal(q(torch.tensor([3])), torch.zeros(1, 64))
    back = q.to_float()
    assert type(back) is nn.Embedding and back.padding_idx == 3 and back.num_embeddings == 50
    assert torch.equal(back.weight, q.dequantize_weight())


def test_max_norm_embeddings_stay_float_with_the_reason():
    model = nn.Sequential(nn.Embedding(100, 64, max_norm=1.0), nn.Linear(64, 64))
    report = mq.quantize_(model, mq.QuantConfig(mq.Int8(), embeddings=mq.Int8()))
    assert report.skipped["0"].startswith("max_norm renormalises looked-up rows in place")
    with pytest.raises(mq.ConfigError, match="max_norm"):
        mq.QuantEmbedding.from_float(model[0], mq.QuantConfig(mq.Int8(), embeddings=mq.Int8()))


def test_bad_indices_and_configs_are_refused():
    q = mq.QuantEmbedding.from_float(nn.Embedding(10, 32), mq.QuantConfig(mq.Int8(), embeddings=mq.Int8()))
    with pytest.raises(mq.InputError, match="integer indices"):
        q(torch.zeros(2))
    with pytest.raises(mq.InputError, match="10 rows but got indices from 0 to 10"):
        q(torch.tensor([0, 10]))
    with pytest.raises(mq.ConfigError, match="embeddings are looked up"):
        mq.QuantConfig(mq.Int8(), embeddings=mq.Int8(method="gptq"))
    with pytest.raises(mq.ConfigError, match=r"QuantConfig\(embeddings=\.\.\.\)"):
        mq.QuantEmbedding.from_float(nn.Embedding(10, 32), mq.QuantConfig(mq.Int8()))  # embeddings not set


def test_a_bare_spec_given_to_the_embedding_class_is_its_format():
    emb = nn.Embedding(10, 32)
    by_spec = mq.QuantEmbedding.from_float(emb, mq.Int4(group_size=32))
    by_config = mq.QuantEmbedding.from_float(emb, mq.QuantConfig(mq.Int8(), embeddings=mq.Int4(group_size=32)))
    assert by_spec.scheme() == by_config.scheme() == "int4-affine-g32"
    assert torch.equal(by_spec.qweight, by_config.qweight) and torch.equal(by_spec.scale, by_config.scale)
    assert mq.QuantEmbedding.from_float(emb, "int8").scheme() == mq.QuantEmbedding.from_float(emb, mq.Int8()).scheme()


def test_state_dict_load_infers_the_embedding_format():
    torch.manual_seed(1)
    model = TinyLM(tied=False)
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), embeddings=mq.Int4(group_size=64)))
    loaded = mq.load(TinyLM(tied=False), model.state_dict())
    assert loaded.embed.spec == mq.Int4(group_size=64, symmetric=False)
    ids = torch.randint(0, 512, (2, 5))
    assert torch.equal(loaded(ids), model(ids))


class SentenceEncoder(nn.Module):
    """BERT-style: word embeddings about half of all parameters (as in 6-layer, 384-wide sentence encoders)."""

    def __init__(self, vocab: int = 4000, d: int = 384, ffn: int = 1536) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(ids))
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5, -1) @ self.v(x)
        x = x + self.o(att)
        return (x + self.down(torch.relu(self.up(x)))).mean(1)


def test_sentence_encoder_shrinks_to_a_quarter_with_int8_embeddings_and_int4_linears():
    torch.manual_seed(0)
    model = SentenceEncoder()
    n_embed = model.embed.weight.numel()
    n_all = sum(p.numel() for p in model.parameters())
    assert 0.4 < n_embed / n_all < 0.6
    float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ids = torch.randint(0, 4000, (4, 32))
    ref = model(ids)
    ratio_linears_only = sum(t.numel() * t.element_size() for t in _q(mq.Int4(group_size=128)).values())
    assert 0.5 < ratio_linears_only / float_bytes < 0.62  # INT4 linears alone: embeddings dominate
    mq.quantize_(model, mq.QuantConfig(mq.Int4(group_size=128), embeddings=mq.Int8()))
    ratio = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / float_bytes
    assert ratio <= 0.25
    assert mq.functional.sqnr(ref, model(ids)) > 15


def _q(config) -> dict:
    torch.manual_seed(0)
    model = SentenceEncoder()
    mq.quantize_(model, config)
    return model.state_dict()
