"""What bounds ``quantize_``'s memory: row-chunked RTN codes and weight SQNR (same numbers as whole-tensor), and
the peak RSS above the float model measured in a subprocess: the quantized bytes + one layer's temporaries."""

import json
import statistics
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import monoquant as mq
from monoquant import functional as F
from monoquant import measure


@pytest.mark.parametrize("spec", [mq.Int4(group_size=32), mq.Int4(group_size=64, symmetric=True), mq.Int8(),
                                  mq.Int8(granularity="tensor"), mq.Int8(symmetric=False)])
def test_rtn_in_row_chunks_stores_what_one_pass_stores(spec, monkeypatch):
    w = torch.randn(37, 128)
    g = spec.resolve_group_size(128)
    whole = spec.quantize(w, g)
    monkeypatch.setattr(F, "QUANTIZE_CHUNK", 200)  # one row (128 values) per chunk
    chunked = spec.quantize(w, g)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(whole, chunked))


def test_weight_sqnr_in_row_chunks_equals_whole_tensor_and_leaves_the_weight_alone(monkeypatch):
    layer = nn.Linear(256, 48)
    before = layer.weight.detach().clone()
    q = mq.QuantLinear.from_float(layer, mq.Int4(group_size=32))
    monkeypatch.setattr(measure, "WEIGHT_SQNR_CHUNK", 300)
    got = measure.weight_sqnr(layer, q)
    assert got == pytest.approx(F.sqnr(layer.weight, q.dequantize_weight(torch.float32)), abs=1e-6)
    assert torch.equal(layer.weight, before)


PEAK = textwrap.dedent("""
    import json, sys, torch
    from torch import nn
    import monoquant as mq
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    layers, width = int(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    mq.quantize_(nn.Sequential(nn.Linear(64, 64)), mq.Int4(group_size=32), progress=False)  # first-use costs
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    report = mq.quantize_(model, mq.Int4(group_size=128), progress=False)
    print(json.dumps([status("VmHWM") - before, sum(r.bytes_after for r in report.quantized)]))
""")


def _peak(layers: int, width: int) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PEAK, str(layers), str(width)], capture_output=True, text=True,
                         check=True).stdout
    peak, quantized = json.loads(out.strip().splitlines()[-1])
    return peak, quantized


def _median_peak(layers: int, width: int, runs: int = 3) -> tuple[int, int]:
    """Median over fresh processes of the peak above the float model (the allocator's state moves it by a few MB
    from run to run), with the quantized bytes (the same in every run)."""
    peaks = [_peak(layers, width) for _ in range(runs)]
    return statistics.median(p for p, _ in peaks), peaks[0][1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_is_bounded_by_the_quantized_bytes_and_two_layers_temporaries():
    # 2048 wide: layers' temporaries above glibc's mmap threshold, where 0.2 kept them, layer after layer
    # (0.2: 1 layer 149 MB above the float model, 16 layers 347 MB > 36 MB quantized + 2 x 147 MB).
    # RTN's temporaries are now cache-sized chunks plus the layer's codes (one byte per weight) and their packing:
    # one layer measured 0.59x-0.62x the float32 layer above its quantized bytes, once 1.03x in a fresh clone's
    # run (before: 2.2x-4.5x, the allocator's state deciding, which needed a 6x allowance); 16 layers 0.73x-0.97x
    # above theirs. 1.5x still fails on any weight-sized float64 temporary (2x)
    layer = 2048 * 2048 * 4
    one, q_one = _median_peak(1, 2048)
    many, q_many = _median_peak(16, 2048)
    assert one - q_one < 1.5 * layer
    # issue 21: quantized bytes + the temporaries of the two largest layers (all layers are the same size here),
    # a layer's temporaries being what the one-layer model measured above its quantized bytes
    assert many <= q_many + 2 * (one - q_one)
