"""`python -m fused_opt.demo`: the point of the package in one minute on a CPU.

Trains a small Transformer language model twice from the same seed and batches, once with
torch.optim.AdamW (its default single-tensor path) and once with fused_opt.AdamW, and prints how
closely the loss curves agree and how long the optimizer step takes, next to torch's foreach and
fused paths. Then it shows what only fused_opt offers: the same step with L1 (proximal) added,
at the cost of plain AdamW, leaving exact zeros in the weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import fused_opt


class TinyLM(nn.Module):
    def __init__(self, vocab=256, d_model=256, layers=4, heads=4, seq=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.encoder(x, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True))


def batches(steps, batch, seq, vocab, seed=0):
    """A learnable synthetic language: each sequence counts up from a random start, mod vocab."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        yield (start + torch.arange(seq + 1)) % vocab


def train(make_opt, steps, batch, seq, vocab, seed=0):
    torch.manual_seed(seed)
    model = TinyLM(vocab=vocab, seq=seq)
    opt = make_opt(model.parameters())
    losses, opt_ms, step_ms = [], [], []
    for tokens in batches(steps, batch, seq, vocab, seed):
        t0 = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        losses.append(loss.item())
        opt_ms.append(1e3 * (t2 - t1))
        step_ms.append(1e3 * (t2 - t0))
    zeros = sum(int((p == 0).sum()) for p in model.parameters()) / sum(p.numel() for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    return losses, statistics.median(opt_ms[2:]), statistics.median(step_ms[2:]), zeros, n_params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args(argv)
    vocab, lr, wd = 256, 1e-3, 0.01
    runs = {
        "torch AdamW (for-loop)": lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=wd, foreach=False),
        "torch AdamW (foreach)": lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=wd, foreach=True),
        "torch AdamW (fused)": lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=wd, fused=True),
        "fused_opt AdamW": lambda p: fused_opt.AdamW(p, lr=lr, weight_decay=wd),
        "fused_opt AdamW + L1 prox": lambda p: fused_opt.AdamW(p, lr=lr, weight_decay=wd, l1=0.05,
                                                               l1_mode="proximal"),
    }
    print(f"fused_opt demo: Transformer LM, {args.steps} steps, batch {args.batch}x{args.seq}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    results = {}
    for name, make in runs.items():
        results[name] = train(make, args.steps, args.batch, args.seq, vocab)
        losses, opt_ms, step_ms, zeros, n = results[name]
        print(f"  {name:28s} final loss {losses[-1]:.4f}  optimizer step {opt_ms:7.2f} ms  "
              f"train step {step_ms:7.1f} ms  zero weights {100 * zeros:5.2f}%", flush=True)
    ref, ours = results["torch AdamW (for-loop)"][0], results["fused_opt AdamW"][0]
    diff = max(abs(a - b) for a, b in zip(ref, ours))
    print(f"\nparams: {results['fused_opt AdamW'][4]:,}; max |loss difference| torch vs fused_opt over "
          f"{len(ref)} steps: {diff:.2e}")
    base = results["fused_opt AdamW"][1]
    for name in ("torch AdamW (for-loop)", "torch AdamW (foreach)", "torch AdamW (fused)"):
        print(f"optimizer step, fused_opt / {name}: {base / results[name][1]:.2f}x the time")
    print(f"L1 proximal on top of AdamW: {results['fused_opt AdamW + L1 prox'][1] / base:.2f}x plain fused_opt AdamW")
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
