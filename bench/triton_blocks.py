"""Triton block size and warps, measured (bench/gpu_check.sh runs it on the lent GPU): fp32 Adam
steps on the 1B-param GPT list and on 10,000 x 4,096, for each (elements per program, warps),
next to the CUDA backend and launch.py's own choice, in one run. The data behind
fused_opt/triton/launch.py's block_size rule and NUM_WARPS (no autotuning at run time: it would
rerun an in-place update).

    python3 bench/triton_blocks.py OUT_DIR        # writes triton-blocks.json and .md there
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch

import fused_opt
from fused_opt import benchmark
from fused_opt.triton import launch

CONFIGS = [(block, warps) for block in (1024, 2048, 4096, 8192) for warps in (4, 8)]
LISTS = {"gpt-1b": benchmark.gpt_shapes(2048, 20, 50257, 2048), "10000x4096": [(4096,)] * 10000}
REPS = 7


def step_ms(opt) -> float:
    opt.step()  # state, compile
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(out: str) -> int:
    ceiling = benchmark.ceiling_bandwidth(1 << 28, REPS, "cuda")
    rows = []
    default_warps = launch.NUM_WARPS
    for name, shapes in LISTS.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        params = [torch.randn(s, device="cuda", generator=g).requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=g) * 1e-3
        numel = sum(p.numel() for p in params)
        chosen = launch.block_size(torch.tensor([p.numel() for p in params]), torch.device("cuda"))
        runs = [("cuda", None, None), ("triton", None, None)] + [("triton", b, w) for b, w in CONFIGS]
        for backend, block, warps in runs:
            launch.block_override, launch.NUM_WARPS = block, warps or default_warps
            ms = step_ms(fused_opt.Adam(params, lr=1e-4, backend=backend))
            gbps = 28 * numel / (ms / 1e3) / 1e9
            if backend == "triton" and block is None:
                backend, block, warps = "triton (launch.py's choice)", chosen, default_warps
            rows.append({"params": name, "backend": backend, "block": block, "warps": warps, "ms": ms, "gbps": gbps,
                         "fraction_of_ceiling": gbps * 1e9 / ceiling})
            print(f"{name} {backend} block={block} warps={warps}: {ms:.3f} ms, {gbps:.0f} GB/s", flush=True)
            torch.cuda.empty_cache()
        del params
        torch.cuda.empty_cache()
    launch.block_override, launch.NUM_WARPS = None, default_warps
    report = {"machine": benchmark.machine("cuda"), "ceiling_gbps": ceiling / 1e9, "rows": rows}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "triton-blocks.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"fp32 Adam (28 bytes/param), median of {REPS} steps; ceiling (device-to-device copy) "
             f"{ceiling / 1e9:.0f} GB/s; {report['machine']['gpu']}, torch {report['machine']['torch']}, "
             f"Triton {report['machine']['triton']}", "", "| params | backend | block | warps | ms | GB/s | of ceiling |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['params']} | {r['backend']} | {r['block'] or ''} | {r['warps'] or ''} | {r['ms']:.3f} | "
              f"{r['gbps']:.0f} | {r['fraction_of_ceiling']:.2f} |" for r in rows]
    with open(os.path.join(out, "triton-blocks.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "out"))
