"""torch.compile(fullgraph=True) and torch.export on quantized models: every compiled kernel and the linear
dispatch are torch.library custom ops with fake implementations (:mod:`monoquant.fused`, :mod:`monoquant.ops`).

Compiles are slow on small CPUs (several seconds each), so one model carries every layer type and format."""

import gc
import time

import pytest
import torch
from torch import nn

import monoquant as mq
from monoquant import fused, kernels, ops
from monoquant.errors import ModelError
from monoquant.nn import QuantConv2d, QuantEmbedding, QuantLinear

needs_ext = pytest.mark.skipif(not fused.available(), reason=f"no compiled kernel here: {fused.load_error()}")


class EveryLayer(nn.Module):
    """An INT4 embedding, INT8 / INT4 / NF4 linears and an INT4 and an INT8 Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = QuantEmbedding.from_float(nn.Embedding(50, 64), mq.Int4(group_size=32))
        self.int8 = QuantLinear.from_float(nn.Linear(64, 64), mq.Int8())
        self.int4 = QuantLinear.from_float(nn.Linear(64, 64), mq.Int4(group_size=32))
        self.nf4 = QuantLinear.from_float(nn.Linear(64, 32), mq.NF4())
        self.conv4 = QuantConv2d.from_float(nn.Conv2d(4, 8, 3, padding=1), mq.Int4(group_size=12))
        self.conv8 = QuantConv2d.from_float(nn.Conv2d(8, 8, 3), mq.Int8())

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.nf4(torch.relu(self.int4(self.int8(self.emb(ids)))))
        return h, self.conv8(torch.relu(self.conv4(img)))


def test_compile_fullgraph_equals_eager_on_every_layer_type():
    model = EveryLayer().eval()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break fails the test
    calls = [(torch.randint(0, 50, (3, 5)), torch.randn(2, 4, 9, 9)),  # the second shapes recompile with
             (torch.randint(0, 50, (2, 7)), torch.randn(3, 4, 9, 9))]  # symbolic sizes
    with torch.no_grad():
        start = time.perf_counter()
        for ids, img in calls:
            for got, expected in zip(compiled(ids, img), model(ids, img)):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        seconds = time.perf_counter() - start
        bad = calls[1][0].clone()
        bad[1, 3] = 50  # one row past the table: the compiled gather refuses it (eager: InputError)
        with pytest.raises((RuntimeError, IndexError), match=r"out of bounds|out of range"):
            compiled(bad, calls[1][1])
    assert seconds < 180, f"compiling a 6-layer model twice took {seconds:.0f} s"


def test_compile_fullgraph_of_a_conv_with_dynamic_int8_activations():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10)).eval()
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), activations=mq.Int8(dynamic=True), skip=mq.SkipRules.none()))
    x = torch.randn(4, 3, 8, 8)
    x[1, 0, 0, 0] = float("inf")  # that sample's output is NaN on both paths, the others are numbers
    with torch.no_grad():
        expected, got = model(x), torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert got[1].isnan().all() and not got[[0, 2, 3]].isnan().any()


def mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).eval()
    mq.quantize_(model, mq.QuantConfig(weights=mq.Int4(group_size=32)))
    return model


def test_export_of_a_quantized_mlp_has_one_op_per_layer_and_equal_outputs():
    model = mlp()
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = model(x)
        program = torch.export.export(model, (x,))
        model[0].quant_weight.ran.clear()  # forget the eager call: the record below is the op's
        got = program.module()(x)
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets == ["monoquant.linear.default", "aten.gelu.default", "monoquant.linear.default"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert set(kernels.kernels_run(model[0])) == {4}  # the op runs the eager dispatch, which records it


def _buffers(layer) -> list[torch.Tensor]:
    return [b for b in (layer.qweight, layer.scale, layer.zero_point, layer.bias) if b is not None]


def test_a_graph_whose_layer_was_freed_says_to_compile_again():
    model = mlp()
    layer = model[0]
    handle = ops.layer_handle(layer)
    x = torch.randn(2, 32)
    buffers = _buffers(layer)
    torch.testing.assert_close(ops._linear_op(x, buffers, 64, handle), layer(x))
    del model, layer
    gc.collect()
    with pytest.raises(ModelError, match="compile or export the model again"):
        ops._linear_op(x, buffers, 64, handle)


def test_linear_dispatch_op_passes_opcheck():
    layer = mlp()[0]
    x = torch.randn(3, 32)
    torch.library.opcheck(ops._linear_op, (x, _buffers(layer), 64, ops.layer_handle(layer)))


def _fused_op_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g)
    q4 = torch.randint(0, 256, (16, 32), dtype=torch.uint8, generator=g)
    s4 = torch.rand(2, 16, generator=g) + 0.1
    z4 = torch.randint(0, 16, (2, 16), dtype=torch.uint8, generator=g)
    q8 = torch.randint(-127, 128, (16, 64), dtype=torch.int8, generator=g)
    s8 = torch.rand(16, 1, generator=g) + 0.1
    codes = torch.randint(-127, 128, (3, 64), dtype=torch.int8, generator=g)
    view = torch.randn(5, 8, dtype=torch.float64, generator=g)
    return {
        "int4_linear": (x, q4, s4, z4, 32),
        "int8_linear": (x, q8, s8, None),
        "dequantize_int4": (torch.empty(16, 64), q4, s4, z4, 32, 0),
        "dequantize_int8": (torch.empty(16, 64), q8, s8, None, 0, True),
        "w8a8_pack": (q8,),
        "w8a8_gemm": (codes, fused.w8a8_pack(q8), 16),
        "quantize_rows": (x, torch.tensor(0.05), None, -128, 127, 0),
        "dynamic_quantize_rows": (x, 0, 255, False, 1e-8),
        "rescale_rows": (torch.randint(-1000, 1000, (3, 16), dtype=torch.int32, generator=g), torch.rand(3) + 0.1,
                         torch.rand(16) + 0.1, torch.randn(16), torch.tensor([3, -1, 0], dtype=torch.int32),
                         torch.randint(-1000, 1000, (16,), dtype=torch.int32, generator=g), True),
        "mse_clip_errors": (view, view.amin(1), view.amax(1), torch.tensor([1.0, 0.9], dtype=torch.float64), -8, 7,
                            True, 1e-8),
    }


@needs_ext
@pytest.mark.parametrize("name", list(_fused_op_cases()))
def test_every_compiled_kernel_is_a_custom_op_with_a_fake_implementation(name):
    """opcheck: the schema, the fake (meta) implementation's shapes and dtypes against the real output, and the
    mutation declarations (the dequantize ops write ``out`` in place)."""
    op = getattr(torch.ops.monoquant, name).default
    torch.library.opcheck(op, _fused_op_cases()[name])


@pytest.mark.parametrize("dtype, k", [(torch.bfloat16, 8), (torch.float32, 6), (torch.float32, 5)])
def test_the_python_nibble_unpack_is_a_custom_op_too(dtype, k):
    """Its dtype-reinterpreting views fail inside Inductor with symbolic shapes, so traced code calls it as an op."""
    packed = torch.randint(0, 256, (3, (k + 1) // 2), dtype=torch.uint8)
    values = [float(v) / 3 for v in range(16)]
    torch.library.opcheck(torch.ops.monoquant.unpack_int4_into.default, (torch.empty(3, k, dtype=dtype), packed,
                                                                          values))
    out = torch.empty(3, k, dtype=dtype)
    torch.ops.monoquant.unpack_int4_into(out, packed, values)
    codes = torch.stack((packed & 15, packed >> 4), -1).reshape(3, -1)[:, :k].long()
    assert torch.equal(out, torch.tensor(values).to(dtype)[codes])
