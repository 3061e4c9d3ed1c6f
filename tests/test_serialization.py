import io
import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import monoquant as mq
from monoquant import safetensors_io as stio
from monoquant.serialization import FORMAT_VERSION, file_metadata, module_entry, spec_from_dict

SPECS = [
    mq.Int8(), mq.Int8(symmetric=False), mq.Int8(granularity="tensor"), mq.Int8(symmetric=False, granularity="tensor"),
    mq.Int4(group_size=32), mq.Int4(group_size=32, symmetric=True), mq.Float16(), mq.BFloat16(),
]
SPEC_IDS = ["int8", "int8-affine", "int8-tensor", "int8-affine-tensor", "int4", "int4-sym", "fp16", "bf16"]


class Net(nn.Module):
    """One layer of the kind under test between float layers (LayerNorm, Linear head)."""

    def __init__(self, kind: str, hidden: int = 64) -> None:
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.layer = nn.Linear(hidden, 96)
        elif kind == "conv1d":
            self.layer = nn.Conv1d(8, 16, 3, padding=1, bias=False)
        elif kind == "conv2d":
            self.layer = nn.Conv2d(8, 16, 4, stride=2, padding=1, groups=2)
        else:
            self.layer = nn.Conv3d(8, 16, (2, 2, 2), padding="same", padding_mode="reflect")
        self.norm = nn.LayerNorm(96 if kind == "linear" else 16)
        self.head = nn.Linear(96 if kind == "linear" else 16, 10)

    def example(self) -> torch.Tensor:
        shapes = {"linear": (3, 64), "conv1d": (2, 8, 12), "conv2d": (2, 8, 10, 10), "conv3d": (2, 8, 4, 6, 6)}
        return torch.randn(shapes[self.kind])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x)
        if self.kind != "linear":
            h = h.flatten(2).mean(-1)
        return self.head(self.norm(h))


def _quantized(kind: str, spec, skip=None) -> Net:
    model = Net(kind).eval()
    mq.quantize_(model, mq.QuantConfig(spec, skip=skip or mq.SkipRules.none()))
    return model


def _snapshot(model: nn.Module):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_unchanged(model: nn.Module, snap) -> None:
    mods, state = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == mods
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        if v.device.type != "meta":
            assert torch.equal(now[k], v), k


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize("skeleton", ["cpu", "meta"])
def test_round_trip_is_bit_identical(tmp_path, spec, kind, skeleton):
    model = _quantized(kind, spec)
    path = tmp_path / "m.safetensors"
    mq.save(model, path)
    with torch.device(skeleton):
        fresh = Net(kind).eval()
    assert mq.load(fresh, path) is fresh
    assert type(fresh.layer) is type(model.layer) and fresh.layer.scheme() == model.layer.scheme()
    assert not any(t.is_meta for t in fresh.state_dict().values())
    _assert_same_state(model, fresh)
    x = model.example()
    with torch.inference_mode():
        assert torch.equal(model(x), fresh(x))


def test_meta_skeleton_never_allocates_float_weights_for_quantized_layers(tmp_path, monkeypatch):
    model = _quantized("linear", mq.Int4(group_size=32))
    mq.save(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        fresh = Net("linear").eval()
    seen = []
    real = mq.QuantLinear.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["device"])
        real(self, *args, **kwargs)

    monkeypatch.setattr(mq.QuantLinear, "__init__", spy)
    mq.load(fresh, tmp_path / "m.safetensors")
    assert seen == ["meta", "meta"]  # both layers built without storage, then filled from the file
    assert fresh.layer.qweight.device.type == "cpu"


def test_header_describes_each_layer_and_versions(tmp_path):
    model = _quantized("conv2d", mq.Int4(group_size=32))
    path = tmp_path / "m.safetensors"
    mq.save(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "monoquant" and meta["format_version"] == str(FORMAT_VERSION)
    assert meta["monoquant_version"] == mq.__version__ and meta["torch_version"] == torch.__version__
    modules = json.loads(meta["modules"])
    assert sorted(modules) == ["head", "layer"]
    entry = modules["layer"]
    assert entry["spec"]["kind"] == "int4" and spec_from_dict(entry.pop("spec")) == mq.Int4(group_size=32)
    assert entry == {
        "class": "QuantConv2d", "scheme": "int4-affine-g32", "group_size": 32, "weight_shape": [16, 4, 4, 4],
        "bias": True,
        "float_dtype": "float32", "compute_dtype": None, "layout": "int4-packed-low-nibble-even-column",
        "geometry": {"in_channels": 8, "out_channels": 16, "kernel_size": [4, 4], "stride": [2, 2],
                     "padding": [1, 1], "dilation": [1, 1], "groups": 2, "padding_mode": "zeros"},
    }
    assert keys == set(model.state_dict())
    # a plain safetensors reader sees exactly the stored buffers: INT4 packed two per byte
    plain = load_file(str(path))
    assert plain["layer.qweight"].dtype == torch.uint8 and plain["layer.qweight"].shape == (16, 32)
    for k, v in model.state_dict().items():
        assert torch.equal(plain[k], v), k


def test_file_size_is_the_stored_bytes_plus_a_small_header(tmp_path):
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))
    mq.quantize_(model, mq.Int4(group_size=128))
    path = tmp_path / "m.safetensors"
    mq.save(model, path)
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert path.stat().st_size == 8 + header_len + stored
    assert header_len < 2048


def test_tied_linears_are_stored_once_and_stay_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 64)
            self.b = nn.Linear(64, 64)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    model = Tied()
    mq.quantize_(model, mq.QuantConfig(mq.Int4(group_size=32), skip=mq.SkipRules.none()))
    assert model.a.qweight is model.b.qweight
    path = tmp_path / "m.safetensors"
    mq.save(model, path)
    header = stio.read_header(path)
    assert json.loads(header.metadata["aliases"]) == {"b.qweight": "a.qweight", "b.scale": "a.scale",
                                                      "b.zero_point": "a.zero_point"}
    assert "b.qweight" not in header.tensors
    with torch.device("meta"):
        fresh = Tied()
    mq.load(fresh, path)
    assert fresh.a.qweight is fresh.b.qweight and fresh.a.scale is fresh.b.scale
    x = torch.randn(2, 64)
    assert torch.equal(model(x), fresh(x))


def test_shared_module_and_tied_float_parameters_survive(tmp_path):
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 64)
            self.block = nn.Linear(64, 64)
            self.blocks = nn.ModuleList([self.block, self.block])  # one layer registered three times
            self.lm_head = nn.Linear(64, 50, bias=False)
            self.lm_head.weight = self.embed.weight  # tied to an embedding: stays float

        def forward(self, ids):
            h = self.embed(ids)
            for blk in self.blocks:
                h = blk(h)
            return self.lm_head(h)

    model = LM().eval()
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), skip=mq.SkipRules.none()))
    assert isinstance(model.block, mq.QuantLinear) and model.blocks[1] is model.block
    path = tmp_path / "m.safetensors"
    mq.save(model, path)
    with torch.device("meta"):
        fresh = LM().eval()
    mq.load(fresh, path)
    assert fresh.blocks[0] is fresh.block and fresh.blocks[1] is fresh.block
    assert fresh.lm_head.weight is fresh.embed.weight
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(model(ids), fresh(ids))


def test_load_keeps_hooks_and_training_flags(tmp_path):
    model = _quantized("linear", mq.Int8())
    mq.save(model, tmp_path / "m.safetensors")
    fresh = Net("linear")
    fresh.layer.eval()
    calls = []
    fresh.layer.register_forward_hook(lambda mod, inp, out: calls.append(type(mod).__name__))
    mq.load(fresh, tmp_path / "m.safetensors")
    assert fresh.training and not fresh.layer.training
    fresh(torch.randn(1, 64))
    assert calls == ["QuantLinear"]


def test_load_into_an_already_quantized_twin(tmp_path):
    model = _quantized("linear", mq.Int4(group_size=32))
    mq.save(model, tmp_path / "m.safetensors")
    twin = _quantized("linear", mq.Int4(group_size=32))  # different random weights
    mq.load(twin, tmp_path / "m.safetensors")
    _assert_same_state(model, twin)


def test_torch_save_state_dict_round_trip_into_quantized_twin_and_float_model():
    model = _quantized("conv2d", mq.Int4(group_size=32, symmetric=True))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    twin = _quantized("conv2d", mq.Int4(group_size=32, symmetric=True))
    twin.load_state_dict(state)
    _assert_same_state(model, twin)
    x = model.example()
    assert torch.equal(model(x), twin(x))
    # into a float model: PyTorch cannot (the quantized keys are unexpected), mq.load can
    floating = Net("conv2d").eval()
    with pytest.raises(RuntimeError, match="qweight"):
        floating.load_state_dict(state)
    mq.load(floating, state)
    assert floating.layer.scheme() == "int4-sym-g32" and floating.head.scheme() == "int4-sym-g16"
    _assert_same_state(model, floating)
    assert torch.equal(model(x), floating(x))


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_state_dict_into_meta_float_model_infers_every_scheme(spec):
    model = _quantized("conv1d", spec)
    with torch.device("meta"):
        fresh = Net("conv1d").eval()
    mq.load(fresh, model.state_dict())
    assert fresh.layer.scheme() == model.layer.scheme()
    _assert_same_state(model, fresh)


@settings(max_examples=12, deadline=None)
@given(out_f=st.integers(1, 40), groups=st.integers(1, 4), g=st.sampled_from([32, 64]), sym=st.booleans(),
       bias=st.booleans())
def test_int4_round_trip_property(tmp_path_factory, out_f, groups, g, sym, bias):
    model = nn.Sequential(nn.Linear(g * groups, out_f, bias=bias))
    mq.quantize_(model, mq.QuantConfig(mq.Int4(group_size=g, symmetric=sym), skip=mq.SkipRules.none()))
    path = tmp_path_factory.mktemp("p") / "m.safetensors"
    mq.save(model, path)
    with torch.device("meta"):
        fresh = nn.Sequential(nn.Linear(g * groups, out_f, bias=bias))
    mq.load(fresh, path)
    _assert_same_state(model, fresh)


# ---- bad files: a MonoQuantError naming the first problem, and the model untouched -------------------------
@pytest.fixture
def saved(tmp_path):
    model = _quantized("linear", mq.Int4(group_size=32))
    path = tmp_path / "m.safetensors"
    mq.save(model, path)
    return model, path


def _rewrite(path, out, *, drop=(), add=None, metadata=None):
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(metadata or {})
    tensors = {k: v for k, v in tensors.items() if k not in drop}
    tensors.update(add or {})
    save_file(tensors, str(out), metadata=meta)
    return out


def _expect_error(model, path, match):
    snap = _snapshot(model)
    with pytest.raises(mq.SerializationError, match=match):
        mq.load(model, path)
    _assert_unchanged(model, snap)


def test_truncated_file(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "t.safetensors"
    bad.write_bytes(path.read_bytes()[:-100])
    _expect_error(Net("linear"), bad, "not a readable safetensors file")


@pytest.mark.parametrize("content", [b"", b"hello", b"PK\x03\x04" + bytes(200), b"\xff" * 64])
def test_not_a_safetensors_file(tmp_path, content):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(content)
    _expect_error(Net("linear"), bad, "not a readable safetensors file")


def test_missing_file(tmp_path):
    _expect_error(Net("linear"), tmp_path / "nope.safetensors", "no such file")


def test_unknown_format_version(saved, tmp_path):
    _, path = saved
    bad = _rewrite(path, tmp_path / "v.safetensors", metadata={"format_version": "99"})
    _expect_error(Net("linear"), bad, "format version '99'.*upgrade monoquant")


def test_plain_safetensors_is_not_a_monoquant_file(tmp_path):
    model = Net("linear")
    save_file(model.state_dict(), str(tmp_path / "p.safetensors"))
    _expect_error(Net("linear"), tmp_path / "p.safetensors", "not a monoquant file")


def test_missing_key(saved, tmp_path):
    _, path = saved
    bad = _rewrite(path, tmp_path / "k.safetensors", drop=["norm.bias"])
    _expect_error(Net("linear"), bad, "lacks 1 tensor.*'norm.bias'")


def test_unexpected_key(saved, tmp_path):
    _, path = saved
    bad = _rewrite(path, tmp_path / "u.safetensors", add={"extra.weight": torch.zeros(3)})
    _expect_error(Net("linear"), bad, "1 tensor.*no place for: 'extra.weight'")


def test_shape_mismatch_with_the_skeleton(saved, tmp_path):
    _, path = saved
    model = Net("linear")
    model.head = nn.Linear(96, 12)  # 12 classes instead of 10
    _expect_error(model, path, "layer 'head': the file's layer is .*'out_features': 10.*'out_features': 12")
    # without geometry in the header (as the CLI writes it), the weight shape check catches it
    with safe_open(str(path), framework="pt") as f:
        modules = json.loads(f.metadata()["modules"])
    for entry in modules.values():
        del entry["geometry"]
    bare = _rewrite(path, tmp_path / "g.safetensors", metadata={"modules": json.dumps(modules)})
    _expect_error(model, bare, "weight shape \\[10, 96\\] in the file, \\[12, 96\\] in the model")
    model.head = nn.Linear(96, 10)
    model.norm = nn.LayerNorm(80)  # a float layer of another size
    _expect_error(model, bare, "tensor 'norm.bias' is torch.float32 \\[96\\] there but the model expects "
                               "torch.float32 \\[80\\]")


def test_float_tensor_shape_or_dtype_mismatch(saved):
    _, path = saved
    model = Net("linear").to(torch.float64)
    _expect_error(model, path, "tensor 'norm.bias' is torch.float32 \\[96\\] there but the model expects "
                               "torch.float64")


def test_file_from_another_architecture(saved):
    _, path = saved
    _expect_error(Net("conv1d"), path, "saved from another architecture")
    other = nn.Sequential(nn.Linear(64, 96))
    _expect_error(other, path, "quantized layer 'head' that the model lacks")


def test_corrupt_module_map(saved, tmp_path):
    _, path = saved
    with safe_open(str(path), framework="pt") as f:
        modules = json.loads(f.metadata()["modules"])
    modules["layer"]["spec"]["kind"] = "int3"
    bad = _rewrite(path, tmp_path / "c.safetensors", metadata={"modules": json.dumps(modules)})
    _expect_error(Net("linear"), bad, "unknown weight spec kind 'int3'")


def test_save_refuses_meta_tensors_and_leaves_no_file(tmp_path):
    with torch.device("meta"):
        model = Net("linear")
    with pytest.raises(mq.SerializationError, match="meta device"):
        mq.save(model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_stream_writer_aborts_without_leaving_a_partial_file(tmp_path):
    path = tmp_path / "w.safetensors"
    with pytest.raises(RuntimeError, match="boom"), \
            stio.StreamWriter(path, [("a", torch.float32, (2,)), ("b", torch.uint8, (3,))], {}) as w:
        w.write("a", torch.ones(2))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    q = mq.QuantLinear(64, 8, True, mq.Int8(), device="meta")
    assert file_metadata({"x": module_entry(q, geometry=False)}, {})["format"] == "monoquant"


def test_float_model_file_loads_into_a_meta_skeleton(tmp_path):
    model = Net("conv2d").eval()
    mq.save(model, tmp_path / "f.safetensors")
    with torch.device("meta"):
        fresh = Net("conv2d").eval()
    mq.load(fresh, tmp_path / "f.safetensors")
    _assert_same_state(model, fresh)
    assert isinstance(fresh.layer, nn.Conv2d)


def test_activation_quantized_layers_round_trip(tmp_path):
    pytest.importorskip("monoquant.nn.activation")
    model = Net("linear").eval()
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), activations=mq.Int8(), skip=mq.SkipRules.none()))
    x = model.example()
    with pytest.raises(mq.SerializationError, match=r"mq\.freeze"):
        mq.save(model, tmp_path / "a.safetensors")
    with mq.calibrate(model):
        model(x)
    mq.freeze(model)
    mq.save(model, tmp_path / "a.safetensors")
    entry = json.loads(stio.read_header(tmp_path / "a.safetensors").metadata["modules"])["layer"]
    assert spec_from_dict(entry["activations"]) == mq.Int8()
    with torch.device("meta"):
        fresh = Net("linear").eval()
    mq.load(fresh, tmp_path / "a.safetensors")
    _assert_same_state(model, fresh)
    with torch.inference_mode():
        assert torch.equal(model(x), fresh(x))


def test_loaded_transformer_encoder_layers_call_their_quantized_layers(tmp_path):
    def encoder():
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()

    model = encoder()
    mq.quantize_(model, mq.Int4(group_size=32))
    mq.save(model, tmp_path / "enc.safetensors")
    loaded = mq.load(encoder(), tmp_path / "enc.safetensors")
    assert [layer.activation_relu_or_gelu for layer in loaded.layers] == [0, 0]  # no fused fast path
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.layers[0].linear1.last_kernel is not None
