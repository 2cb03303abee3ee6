"""Host time of an Adam step over many tensors, where the host and not memory bounds the step
(10,000 tensors on a GPU). bench/gpu_check.sh runs it on the lent GPU; it runs on the CPU too.
Each timed step follows a pass over a 64 MB host buffer, as a forward and backward pass would
push the optimizer's Python and tensor objects out of the CPU caches. Medians of --reps steps:

- table check: the cached group table's check alone (fused_opt/tables.py), which writes nothing;
- fused_opt: a whole step, the step counters on the params' device (the default);
- fused_opt, fused=False: the step counters on the CPU (the same as the above on a CPU);
- torch fused: torch.optim.Adam(fused=True).
On a GPU the fused_opt rows are there for the CUDA and for the Triton backend.

"host ms" is the time until step() returns, "step ms" until the device is done too.

    python3 bench/host_overhead.py [--device cuda] [--tensors 10000] [--numel 4096] [--backends ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import fused_opt


def timed(fn, reps: int, device: str) -> tuple[float, float]:
    """(host, whole) median milliseconds of fn, each call after the host caches were swept."""
    sweep = torch.zeros(64 << 20, dtype=torch.uint8)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    host, whole = [], []
    for _ in range(reps):
        sweep.add_(1)
        sync()
        start = time.perf_counter()
        fn()
        returned = time.perf_counter()
        sync()
        host.append(returned - start)
        whole.append(time.perf_counter() - start)
    return 1e3 * statistics.median(host), 1e3 * statistics.median(whole)


def adam_over(shapes, device: str, make):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    return params, make(params)


def ours_rows(shapes, args, backend: str, label: str) -> list[tuple[str, float, float]]:
    """The table check alone, then whole steps with the step counters on the device and on the CPU."""
    params, opt = adam_over(shapes, args.device, lambda p: fused_opt.Adam(p, lr=1e-3, backend=backend))
    opt.step()
    opt.step()
    tables = opt._tables._tables
    assert opt._tables.fast_steps == 1 and len(tables) == 1, "the step did not run from a group table"
    table, group_params = next(iter(tables.values())).table, opt.param_groups[0]["params"]

    def check():
        assert table.check(group_params), "the table declined"
        table.release()

    rows = [(f"{label}: table check", *timed(check, args.reps, args.device)),
            (label, *timed(opt.step, args.reps, args.device))]
    del params, opt, table, group_params, tables
    params, opt = adam_over(shapes, args.device, lambda p: fused_opt.Adam(p, lr=1e-3, backend=backend, fused=False))
    rows.append((f"{label}, fused=False", *timed(opt.step, args.reps, args.device)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tensors", type=int, default=10000)
    parser.add_argument("--numel", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--backends", nargs="+", help="fused_opt backends (default: cuda triton on a GPU, else cpu)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    shapes = [(args.numel,)] * args.tensors
    rows = []

    backends = args.backends or (["cuda", "triton"] if args.device == "cuda" else ["cpu"])
    for backend in backends:
        rows += ours_rows(shapes, args, backend, label="fused_opt" if len(backends) == 1 else f"fused_opt {backend}")
    params, opt = adam_over(shapes, args.device, lambda p: torch.optim.Adam(p, lr=1e-3, fused=True))
    rows.append(("torch fused", *timed(opt.step, args.reps, args.device)))
    del params, opt

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    title = (f"Adam over {args.tensors} x {args.numel} fp32 on {where}; torch {torch.__version__}; "
             f"{time.strftime('%Y-%m-%d')}; median of {args.reps} steps, host caches swept before each")
    lines = [title, "", "| what | host ms | step ms | host us a tensor |", "|---|---|---|---|"]
    lines += [f"| {name} | {host:.2f} | {whole:.2f} | {1e3 * host / args.tensors:.3f} |" for name, host, whole in rows]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"host-overhead-{args.device}"
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
        stem.with_suffix(".json").write_text(json.dumps(
            {"title": title, "rows": [{"what": n, "host_ms": h, "step_ms": w} for n, h, w in rows]}, indent=1))


if __name__ == "__main__":
    main()
