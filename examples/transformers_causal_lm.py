"""Quantize Hugging Face causal language models: a small GPT-2 (``Conv1D`` layers) and a small Llama (``nn.Linear``).

Nothing is downloaded: both models are built from their configs and trained for a few hundred steps on a synthetic
language made up here (a random second-order Markov chain), so that perplexity means something and its ideal value
is known. Each model is then quantized to INT8, INT4-g128 round-to-nearest and INT4-g128 GPTQ; the script prints
perplexity before and after, saves the GPTQ model with ``save_pretrained``, reloads it with
``AutoModelForCausalLM.from_pretrained`` and checks that greedy generation gives the same tokens before saving and
after reloading. It also writes the per-layer report as Markdown
and a chart, and a chart of the layer sensitivity ranking.

Run: python examples/transformers_causal_lm.py [--out DIR] [--steps N]
(needs pip install monoquant[transformers,plot])
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import monoquant as mq
import monoquant.hf  # registers monoquant with transformers: from_pretrained reads quantized folders
from monoquant.report import plot_sensitivity

VOCAB = 32
SEQ_LEN = 32


@dataclass
class Language:
    """A second-order Markov chain: after tokens ``(a, b)`` comes one of ``successors[a, b]`` with ``probs[a, b]``."""

    successors: torch.Tensor  # [V, V, branching] int64
    probs: torch.Tensor  # [V, V, branching] float

    @property
    def vocab(self) -> int:
        return self.successors.shape[0]


def make_language(vocab: int = VOCAB, branching: int = 3, seed: int = 0) -> Language:
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, vocab, branching), generator=g)
    probs = torch.softmax(2.0 * torch.randn(vocab, vocab, branching, generator=g), dim=-1)
    return Language(successors, probs)


def sample(lang: Language, batch: int, length: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    """``[batch, length]`` token sequences of ``lang`` (the first two tokens uniform)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.empty(batch, length, dtype=torch.long)
    tokens[:, :2] = torch.randint(0, lang.vocab, (batch, 2), generator=g)
    for t in range(2, length):
        a, b = tokens[:, t - 2], tokens[:, t - 1]
        pick = torch.multinomial(lang.probs[a, b], 1, generator=g).squeeze(1)
        tokens[:, t] = lang.successors[a, b, pick]
    return tokens


def ideal_perplexity(lang: Language, tokens: torch.Tensor) -> float:
    """Perplexity of the true chain on ``tokens`` (positions 2.. only), the best any model can reach."""
    a, b, nxt = tokens[:, :-2], tokens[:, 1:-1], tokens[:, 2:]
    p = ((lang.successors[a, b] == nxt.unsqueeze(-1)) * lang.probs[a, b]).sum(-1)
    return math.exp(-p.log().mean().item())


def tiny_gpt2(vocab: int = VOCAB) -> GPT2LMHeadModel:
    """2 blocks, width 128: 8 ``Conv1D`` layers, ``lm_head`` tied to the token embedding. No dropout and the exact
    GELU (one kernel, not the tanh formula's several): measured 1.75x faster training steps on a CPU."""
    cfg = GPT2Config(vocab_size=vocab, n_positions=SEQ_LEN, n_embd=128, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu",
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg)


def tiny_llama(vocab: int = VOCAB) -> LlamaForCausalLM:
    """2 blocks, width 128: 14 ``nn.Linear`` layers, ``lm_head`` tied to the token embedding."""
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def train(model: nn.Module, lang: Language, steps: int, batch: int = 16, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """Next-token training on fresh samples of ``lang``; returns ``model`` in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        x = sample(lang, batch, seed=1000 + seed * 100_000 + step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor) -> float:
    """Perplexity on next-token prediction over positions 2.. (the first two tokens are unpredictable)."""
    logits = model(input_ids=tokens).logits[:, 1:-1]
    return math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 2:].reshape(-1)).item())


@torch.no_grad()
def greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 12) -> torch.Tensor:
    """``new_tokens`` tokens picked greedily after ``prompt``. (``model.generate`` would stop at the end-of-text
    token, which this language does not have: every token id is a word of it.)"""
    ids = prompt
    for _ in range(new_tokens):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1]:]


SCHEMES = {
    "INT8": mq.QuantConfig(mq.Int8()),
    "INT4-g128 RTN": mq.QuantConfig(mq.Int4(group_size=128)),
    "INT4-g128 GPTQ": mq.QuantConfig(mq.Int4(group_size=128, method="gptq")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for the files (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per model")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="monoquant_lm_"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    lang = make_language()
    held_out = sample(lang, 64, seed=1)  # perplexity is measured here
    calibration = [sample(lang, 16, seed=2 + i) for i in range(4)]  # GPTQ and the report's measurements
    prompt = sample(lang, 2, 8, seed=99)
    table: list[tuple[str, float, list[float]]] = []
    for arch, build in (("GPT-2", tiny_gpt2), ("Llama", tiny_llama)):
        start = time.perf_counter()
        model = train(build(), lang, args.steps)
        print(f"\n== {arch}: trained {args.steps} steps in {time.perf_counter() - start:.0f} s ==")
        ppl = []
        for name, cfg in SCHEMES.items():
            quantized = copy.deepcopy(model)
            report = mq.quantize_(quantized, cfg, calibration_data=calibration)
            ppl.append(perplexity(quantized, held_out))
            if name == "INT4-g128 GPTQ":
                print(report)
                stem = out / f"{arch.lower()}_int4_gptq"
                Path(f"{stem}_report.md").write_text(report.to_markdown())
                report.plot(f"{stem}_report.png", title=f"{arch}, INT4-g128 GPTQ")
                before = greedy(quantized, prompt)
                # mq.quantize_ made the model's save_pretrained write the quantized tensors and their header
                # (config.json's quantization_config); from_pretrained builds it on the meta device and loads them
                # straight into quantized layers: no float weight is allocated, generation is identical
                quantized.save_pretrained(stem)
                fresh = AutoModelForCausalLM.from_pretrained(stem).eval()
                after = greedy(fresh, prompt)
                assert torch.equal(before, after), "generation changed after save_pretrained + from_pretrained"
                print(f"greedy generation before save_pretrained and after from_pretrained: identical {after.tolist()}")
                print(f"wrote {stem}/ (save_pretrained), {stem}_report.md, {stem}_report.png")
        table.append((arch, perplexity(model, held_out), ppl))
        if arch == "GPT-2":
            ranking = mq.sensitivity(model, mq.Int4(group_size=128), calibration)
            plot_sensitivity(ranking, out / "gpt-2_int4_sensitivity.png", title="GPT-2: INT4-g128 sensitivity")
            print(f"wrote {out / 'gpt-2_int4_sensitivity.png'}")

    print(f"\nheld-out perplexity ({held_out.shape[0]} sequences of {SEQ_LEN} tokens; the true chain's is "
          f"{ideal_perplexity(lang, held_out):.3f}, uniform guessing {VOCAB})")
    head = ["model", "float", *SCHEMES]
    rows = [[arch, f"{fp:.3f}", *(f"{p:.3f} ({100 * (p / fp - 1):+.2f}%)" for p in ppl)] for arch, fp, ppl in table]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


if __name__ == "__main__":
    main()
