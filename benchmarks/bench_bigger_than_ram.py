"""A checkpoint larger than the memory its quantizer may use: ``mq.quantize_pretrained`` with GPTQ under a cap.

    PYTHONPATH=. python benchmarks/bench_bigger_than_ram.py            # 48 blocks of width 512 (~620 MB)
    PYTHONPATH=. python benchmarks/bench_bigger_than_ram.py --small    # quick check that it runs

1. Writes a synthetic Llama-style checkpoint (random weights, one safetensors shard per block, index and
   config.json) tensor by tensor, so the writer never holds the model either.
2. Runs ``mq.quantize_pretrained(src, dst, Int4(method="gptq", sequential=True), batches)`` in a child
   process that caps its own address space (``RLIMIT_AS``) at its virtual size after imports plus
   ``--budget-mb``, which must be at most a third of the checkpoint (checked). ``RLIMIT_AS`` counts virtual
   memory, so the child sets ``MALLOC_ARENA_MAX=2`` (glibc reserves 64 MB of address space per thread arena
   otherwise) and the budget is measured from the child's own virtual size, not from zero.
3. Prints the sizes, the cap, the child's peak RSS growth during the call (Linux ``VmHWM`` reset through
   ``/proc/self/clear_refs`` just before it; it also counts pages of already-mapped libraries touched for the
   first time, which the cap does not limit), the time, and the ratio of checkpoint size to cap; then loads
   the output with ``mq.load`` into a meta skeleton and checks one layer's type. Finishing under the cap is
   the evidence: every anonymous allocation of the call fits in it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys, time
import torch, transformers
import monoquant as mq

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

src, dst, budget, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])  # argv[5]: ranges
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
vocab = json.load(open(os.path.join(src, "config.json")))["vocab_size"]
batches = [torch.randint(0, vocab, (2, 64), generator=g) for _ in range(4)]
ranges = {} if sys.argv[5] == "mse" else {"observer": mq.MinMaxObserver()}
spec = mq.Int4(group_size=128, method="gptq", sequential=True, **ranges)
# load every library before measuring the virtual size (a shared object mapped after the cap would count):
# transformers' lazy modules (the model class, tokenizers), monoquant's compiled kernel, the thread pool
from pathlib import Path
from monoquant.pipeline import _skeleton
_skeleton(Path(src))
warm = torch.nn.Sequential(torch.nn.Linear(256, 256))
mq.quantize_(warm, spec, calibration_data=[torch.randn(4, 256)], on_failure="ignore", progress=False)
warm(torch.randn(4, 256))
del warm
vsz = status("VmSize")
cap = vsz + budget
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
rss = status("VmRSS")
t = time.perf_counter()
mq.quantize_pretrained(src, dst, spec, batches, progress=False)
seconds = time.perf_counter() - t
print("RESULT", json.dumps({"seconds": seconds, "peak_growth": status("VmHWM") - rss, "cap": cap}))
"""


def write_checkpoint(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> int:
    """A random Llama-style checkpoint, one shard per block; returns its size in bytes."""
    import torch
    import transformers

    from monoquant import safetensors_io as stio

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                      num_key_value_heads=hidden // 64, tie_word_embeddings=False,
                                      architectures=["LlamaForCausalLM"])
    with torch.device("meta"):  # shapes only: nothing is allocated
        skeleton = transformers.LlamaForCausalLM(config)
    shapes = {n: tuple(t.shape) for n, t in skeleton.state_dict().items()}
    shards: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        key = f"block{int(parts[2]):03d}" if name.startswith("model.layers.") else "rest"
        shards.setdefault(key, []).append(name)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, (_, names) in enumerate(sorted(shards.items())):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with stio.StreamWriter(folder / file, [(n, torch.float32, shapes[n]) for n in names], {"format": "pt"}) as w:
            for n in names:
                t = torch.ones(shapes[n]) if "norm" in n else torch.randn(shapes[n], generator=g) * 0.02
                w.write(n, t)
                total += t.numel() * 4
                weight_map[n] = file
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    config.save_pretrained(folder)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="24 blocks of width 256: a quick check")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--budget-mb", type=float, default=None,
                        help="memory the child may use above its size after imports (default: checkpoint / 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ranges", choices=("minmax", "mse"), default="minmax",
                        help="GPTQ's group ranges: MinMax (fast) or the format's default MSE search")
    args = parser.parse_args()
    if args.small:
        args.layers, args.hidden, args.intermediate, args.vocab = 24, 256, 704, 256
    mb = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        src.mkdir()
        total = write_checkpoint(src, args.layers, args.hidden, args.intermediate, args.vocab)
        budget = int(args.budget_mb * mb) if args.budget_mb else total // 3
        if 3 * budget > total:
            sys.exit(f"the budget ({budget / mb:.0f} MB) must be at most a third of the checkpoint "
                     f"({total / mb:.0f} MB)")
        env = dict(os.environ, MALLOC_ARENA_MAX="2", PYTHONPATH=str(ROOT))
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), str(budget), str(args.threads),
                            args.ranges],
                           capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            sys.exit(f"the capped child failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
        res = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
        out = (dst / "model.safetensors").stat().st_size
        block = total / args.layers
        rows = [
            ("checkpoint (float32)", f"{total / mb:.0f} MB", f"{args.layers} blocks of {block / mb:.1f} MB"),
            ("address-space cap above imports", f"{budget / mb:.0f} MB", f"checkpoint / cap = {total / budget:.1f}x"),
            ("peak RSS growth during the call", f"{res['peak_growth'] / mb:.0f} MB",
             "includes library code paged in on first use (file-backed, not under the cap)"),
            (f"output (int4-g128, gptq, {args.ranges} ranges)", f"{out / mb:.0f} MB",
             f"{out / total:.3f}x the checkpoint"),
            ("quantize_pretrained time", f"{res['seconds']:.1f} s",
             f"{res['seconds'] / args.layers:.1f} s/block, {args.threads} threads (child wall {wall:.0f} s)"),
        ]
        width = max(len(r[0]) for r in rows)
        print(f"\nquantize_pretrained under RLIMIT_AS (hidden {args.hidden}, intermediate {args.intermediate}, "
              f"vocab {args.vocab}; 4 batches of 2x64 tokens)")
        for name, value, note in rows:
            print(f"  {name:<{width}}  {value:>9}  {note}")
        import torch
        import transformers

        import monoquant as mq

        with torch.device("meta"):
            skeleton = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(dst))
        mq.load(skeleton, dst / "model.safetensors")
        assert isinstance(skeleton.model.layers[-1].mlp.down_proj, mq.QuantLinear)
        print("  output loads with mq.load into a meta skeleton: yes")


if __name__ == "__main__":
    main()
