"""RTN vs MSE vs GPTQ INT4 weight quantization: layer and end-to-end output SQNR, and quantization time.

Models: the example MLP (examples/quantize_existing_model.py) and a small stack of ``nn.TransformerEncoderLayer``
trained briefly inside this script on structured synthetic sequences (mixtures of sinusoids; the task is to
predict a smoothed, shifted copy). Each is quantized at INT4-g128 and INT4-g32 with ``method="rtn"``,
``"mse"`` and ``"gptq"`` (GPTQ calibrated on training batches), and evaluated on held-out batches:

* layer SQNR: each quantized layer's output vs the float layer's on the *same* (float-model) inputs;
* end-to-end SQNR: the quantized model's output vs the float model's.

Target: GPTQ improves end-to-end SQNR over RTN by >= 1.5 dB at INT4-g128 on the transformer stack.
``--big`` also times GPTQ on a ~100M-parameter Linear stack (6 x 4096x4096).

Run: ``python benchmarks/bench_accuracy.py [--big] [--steps N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import monoquant as mq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from quantize_existing_model import build_model

FEATURES, SEQ = 16, 32


def synthetic_batch(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of sinusoid mixtures; target: the input smoothed over 3 steps and shifted one step ahead."""
    t = torch.arange(SEQ + 2, dtype=torch.float32)
    freq = torch.rand(batch, 1, FEATURES, generator=generator) * 0.5 + 0.05
    phase = torch.rand(batch, 1, FEATURES, generator=generator) * 2 * math.pi
    amp = torch.randn(batch, 1, FEATURES, generator=generator)
    signal = amp * torch.sin(freq * t[None, :, None] + phase)
    mixed = signal @ (torch.eye(FEATURES) + 0.3 * torch.randn(FEATURES, FEATURES, generator=generator))
    x = mixed[:, :SEQ] + 0.05 * torch.randn(batch, SEQ, FEATURES, generator=generator)
    y = (mixed[:, :SEQ] + mixed[:, 1:SEQ + 1] + mixed[:, 2:SEQ + 2]) / 3
    return x, y


class TransformerStack(nn.Module):
    def __init__(self, d_model: int = 256, layers: int = 4, ff: int = 1024) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, d_model)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model, 4, ff, dropout=0.0, batch_first=True), layers,
            enable_nested_tensor=False)
        self.head = nn.Linear(d_model, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


def train_transformer(steps: int) -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor], float]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = TransformerStack()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        x, y = synthetic_batch(32, g)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    calib = [synthetic_batch(16, g)[0] for _ in range(16)]
    held_out = [synthetic_batch(16, g)[0] for _ in range(4)]
    return model, calib, held_out, float(loss.detach())


def mlp_data() -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    model = build_model().eval()
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(32, 64, generator=g) for _ in range(8)], [torch.randn(32, 64, generator=g)
                                                                        for _ in range(4)]


def capture_inputs(model: nn.Module, data: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Inputs every nn.Linear of the float model sees on ``data`` (fast path off, so each layer is called)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=name: seen.setdefault(n, []).append(args[0]))
             for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    with torch.no_grad():
        for x in data:
            model(x)
    torch.backends.mha.set_fastpath_enabled(fast)
    for h in hooks:
        h.remove()
    return seen


def timed_quantize(model: nn.Module, cfg: mq.QuantConfig, calib: list[torch.Tensor]) -> tuple[float, mq.QuantReport]:
    """Seconds to quantize (swap, then calibrate + freeze when the method needs data), and the report."""
    t0 = time.perf_counter()
    report = mq.quantize_(model, cfg, progress=False)
    if mq.needs_calibration(model):
        mq.calibrate_with(model, calib, progress=False)
        mq.freeze(model)
    return time.perf_counter() - t0, report


def evaluate(model: nn.Module, data: list[torch.Tensor], group: int, method: str):
    q = copy.deepcopy(model)
    cfg = mq.QuantConfig(mq.Int4(group_size=group, method=method))
    seconds, report = timed_quantize(q, cfg, data[0])
    float_inputs = capture_inputs(model, data[1])
    modules = dict(q.named_modules())
    float_modules = dict(model.named_modules())
    layer_sqnr = []
    with torch.no_grad():
        for row in report.quantized:
            xs = torch.cat([x.reshape(-1, x.shape[-1]) for x in float_inputs[row.name]])
            layer_sqnr.append(mq.functional.sqnr(float_modules[row.name](xs), modules[row.name](xs)))
        ref = torch.cat([model(x) for x in data[1]])
        out = torch.cat([q(x) for x in data[1]])
    return statistics.median(layer_sqnr), mq.functional.sqnr(ref, out), seconds, len(layer_sqnr)


def big_linear_stack(rows: int = 64, batches: int = 8) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(6)]).eval()
    params = sum(p.numel() for p in model.parameters())
    data = [torch.randn(rows, 4096) for _ in range(batches)]
    print(f"\n{params / 1e6:.1f}M-parameter Linear stack (6 x 4096x4096), {batches} x {rows} calibration rows")
    print(f"{'method':8} {'quantize s':>11}")
    for method in ("rtn", "gptq"):
        q = copy.deepcopy(model)
        seconds, _ = timed_quantize(q, mq.QuantConfig(mq.Int4(group_size=128, method=method)), data)
        print(f"{method:8} {seconds:11.1f}")
        del q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps for the transformer stack")
    parser.add_argument("--big", action="store_true", help="also time GPTQ on a 100M-parameter Linear stack")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=mq.AccuracyWarning)  # INT4 first+last layers: deliberate here
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    transformer, calib, held_out, loss = train_transformer(args.steps)
    print(f"transformer stack trained {args.steps} steps in {time.perf_counter() - t0:.0f} s (final loss {loss:.4f})")
    mlp, mlp_calib, mlp_held = mlp_data()
    for title, model, data in (("transformer stack (4 x TransformerEncoderLayer, d=256)", transformer,
                                (calib, held_out)),
                               ("example MLP (examples/quantize_existing_model.py)", mlp, (mlp_calib, mlp_held))):
        print(f"\n{title}")
        print(f"{'scheme':10} {'method':6} {'layers':>6} {'layer SQNR dB (median)':>23} {'end-to-end SQNR dB':>19} "
              f"{'vs RTN':>7} {'quantize s':>11}")
        for group in (128, 32):
            base = None
            for method in ("rtn", "mse", "gptq"):
                layer, e2e, seconds, n = evaluate(model, data, group, method)
                base = e2e if method == "rtn" else base
                print(f"{'INT4-g' + str(group):10} {method:6} {n:6d} {layer:23.2f} {e2e:19.2f} "
                      f"{e2e - base:+7.2f} {seconds:11.2f}")
    if args.big:
        big_linear_stack()


if __name__ == "__main__":
    main()
