"""File sizes and peak memory of monoquant files, against float PyTorch / safetensors.

    PYTHONPATH=. python benchmarks/bench_files.py            # ~1 GB of temporary files, a minute or two
    PYTHONPATH=. python benchmarks/bench_files.py --small    # quick check that it runs

Prints three tables:

1. file size of ``mq.save`` after INT4-g128 / INT8 quantization, as a ratio of the float model's
   ``safetensors.torch.save_file`` file (Linear-dominated model; targets: INT4 <= 0.15x, INT8 <= 0.27x);
2. peak memory of loading (``mq.load`` into a meta-device skeleton, and float ``load_file`` +
   ``load_state_dict`` for comparison), as a ratio of the float model's size (target for INT4: <= 0.25x);
3. peak memory of ``monoquant quantize`` on a float checkpoint, as a ratio of its largest tensor and of the
   whole checkpoint.

Peak memory is the growth of the process's peak resident set size (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` just before the operation; it sees torch's allocations, unlike ``tracemalloc``)
over the resident size just before it, measured in a fresh subprocess per measurement, after imports.
Each is repeated ``--repeat`` times; medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODEL_CODE = """
import torch
from torch import nn

class Net(nn.Module):
    '''A Linear-dominated model: an embedding-free stack of MLP blocks with LayerNorms.'''

    def __init__(self, hidden, layers):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
            for _ in range(layers))
        self.head = nn.Linear(hidden, 1000)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)
"""

PEAK_SNIPPET = """
import resource, sys
sys.path.insert(0, {root!r})
{model_code}
import monoquant as mq
from safetensors.torch import load_file

def _status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

def reset_peak():
    # Linux: make the peak (VmHWM) equal to the current RSS, so only what follows counts. ru_maxrss cannot be
    # reset and is inherited from the (large) parent across fork+exec, so it is only a fallback elsewhere.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

def peak():
    try:
        return _status("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

what, path, hidden, layers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if what == "mq-meta":
    with torch.device("meta"):
        model = Net(hidden, layers)
    before = reset_peak()
    mq.load(model, path)
elif what == "float":
    model = Net(hidden, layers)  # the float model itself is allocated here, before the measurement
    before = reset_peak()
    model.load_state_dict(load_file(path))
elif what == "cli":
    from monoquant.cli import main
    before = reset_peak()
    assert main(["quantize", path, sys.argv[5], "--bits", "4", "--no-progress"]) == 0
print("PEAK", peak() - before)
"""


def _peak(what: str, path: Path, hidden: int, layers: int, *extra: str) -> int:
    code = PEAK_SNIPPET.format(root=str(ROOT), model_code=MODEL_CODE)
    r = subprocess.run([sys.executable, "-c", code, what, str(path), str(hidden), str(layers), *extra],
                       capture_output=True, text=True, check=True)
    return int(next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("PEAK")))


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def _table(title: str, head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    print(f"\n{title}")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny sizes: checks the script runs")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    hidden, layers = (256, 2) if args.small else (1024, 8)  # 8 x 8M + 1M params: ~270 MB float32
    ckpt_rows, ckpt_cols, ckpt_tensors = (512, 512, 4) if args.small else (4096, 4096, 12)  # 12 x 64 MB

    import torch
    from safetensors.torch import save_file

    import monoquant as mq

    namespace: dict = {}
    exec(MODEL_CODE, namespace)
    net = namespace["Net"]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = net(hidden, layers).eval()
        float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        save_file(model.state_dict(), str(tmp / "float.safetensors"))
        float_file = (tmp / "float.safetensors").stat().st_size
        sizes = [("float32 (safetensors.save_file)", float_file)]
        for label, spec, target in [("int4-g128", mq.Int4(group_size=128), 0.15), ("int8", mq.Int8(), 0.27)]:
            q = net(hidden, layers).eval()
            q.load_state_dict(model.state_dict())
            mq.quantize_(q, mq.QuantConfig(spec, skip=mq.SkipRules.none()), on_failure="ignore")
            mq.save(q, tmp / f"{label}.safetensors")
            sizes.append((f"{label} (mq.save), target <= {target}x", (tmp / f"{label}.safetensors").stat().st_size))
            del q
        _table(f"File size, Linear-dominated model ({hidden=}, {layers=}, {float_bytes / 2**20:.0f} MB float32)",
               ("file", "size", "ratio to float"), [(n, _mb(s), f"{s / float_file:.3f}x") for n, s in sizes])

        loads = []
        for label, what, path in [("mq.load int4-g128 into a meta skeleton", "mq-meta", "int4-g128"),
                                  ("mq.load int8 into a meta skeleton", "mq-meta", "int8"),
                                  ("float: load_file + load_state_dict", "float", "float")]:
            peaks = [_peak(what, tmp / f"{path}.safetensors", hidden, layers) for _ in range(args.repeat)]
            loads.append((label, _mb(statistics.median(peaks)), f"{statistics.median(peaks) / float_bytes:.3f}x"))
        _table("Load peak memory (median peak RSS growth; target int4 <= 0.25x)", ("load", "peak", "ratio to float"),
               loads)

        del model
        state = {f"layers.{i}.weight": torch.randn(ckpt_rows, ckpt_cols) for i in range(ckpt_tensors)}
        state.update({f"layers.{i}.bias": torch.randn(ckpt_rows) for i in range(ckpt_tensors)})
        save_file(state, str(tmp / "ckpt.safetensors"))
        largest = ckpt_rows * ckpt_cols * 4
        total = sum(t.numel() * t.element_size() for t in state.values())
        del state
        peaks = [_peak("cli", tmp / "ckpt.safetensors", 0, 0, str(tmp / "ckpt-int4.safetensors"))
                 for _ in range(args.repeat)]
        peak = statistics.median(peaks)
        _table(f"monoquant quantize --bits 4 on a {_mb(total)} checkpoint ({ckpt_tensors} x {ckpt_rows}x{ckpt_cols} "
               "float32)", ("peak", "ratio to largest tensor", "ratio to checkpoint"),
               [(_mb(peak), f"{peak / largest:.2f}x", f"{peak / total:.3f}x")])


if __name__ == "__main__":
    main()
