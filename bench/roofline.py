"""Speed of fused_opt against torch.optim, measured against the memory roofline.

    python -m bench.roofline                    # CPU: GPT-2-small list (124M params), 5,000 x 1,000
    python -m bench.roofline --quick            # seconds: scaled-down lists, for CI and smoke tests
    python -m bench.roofline --device cuda      # GPU: GPT-2-small, a 1B-param GPT list, 10,000 x 4,096

An optimizer step is memory-bound: its floor is (bytes that must move) / (bandwidth). The
bandwidth ceiling is measured in the same run: on the CPU torch's in-place axpy
(`a.add_(b, alpha=s)`, 12 bytes per element) over as many elements as the parameter list, on the
GPU a large device-to-device copy (8 bytes per element). Every provider updates the same params
and grads, with its own state; times are medians of `--reps` steps after a warm-up (GPU: CUDA
events). Writes bench/results/<device>-<tag>.json and .md (machine, versions, table).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import fused_opt

HERE = os.path.dirname(os.path.abspath(__file__))


def gpt2_small_shapes(scale: int = 1) -> list[tuple[int, ...]]:
    """GPT-2 small's 148 parameter tensors (124M params); `scale` divides the width for quick runs."""
    d, vocab, ctx = 768 // scale, 50257 // scale, 1024 // scale
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def gpt_shapes(d: int, layers: int, vocab: int = 50257, ctx: int = 2048) -> list[tuple[int, ...]]:
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


PARAM_LISTS = {
    "cpu": {
        "gpt2-small": lambda quick: gpt2_small_shapes(8 if quick else 1),
        "5000x1000": lambda quick: [(1000,)] * (500 if quick else 5000),
    },
    "cuda": {
        "gpt2-small": lambda quick: gpt2_small_shapes(8 if quick else 1),
        "gpt-1b": lambda quick: gpt_shapes(2048 // (8 if quick else 1), 20),  # 1.11B params
        "10000x4096": lambda quick: [(4096,)] * (1000 if quick else 10000),
    },
}


@dataclass
class Provider:
    name: str
    family: str          # torch's or fused_opt's algorithm, for the table
    bytes_per_param: int
    make: Callable       # (params) -> object with .step()


def _l1_subgradient_then(opt, l1):
    """What a user writes today for L1 with torch: add l1 * sign(p) to the grads, then step."""
    class Step:
        def step(self):
            params = [p for g in opt.param_groups for p in g["params"]]
            torch._foreach_add_([p.grad for p in params], torch._foreach_sign(params), alpha=l1)
            opt.step()
    return Step()


def _then_soft_threshold(opt, l1):
    """Proximal L1 with torch today: the step, then a soft threshold of every param."""
    class Step:
        def step(self):
            opt.step()
            with torch.no_grad():
                for g in opt.param_groups:
                    for p in g["params"]:
                        p.copy_(F.softshrink(p, g["lr"] * l1))
    return Step()


def providers(l1=1e-4, wd=0.01) -> list[Provider]:
    T, FO = torch.optim, fused_opt
    out = []
    for name, torch_cls, ours in (("Adam", T.Adam, FO.Adam), ("AdamW", T.AdamW, FO.AdamW)):
        out += [Provider(f"torch for-loop", name, 28, lambda p, c=torch_cls: c(p, foreach=False)),
                Provider(f"torch foreach", name, 28, lambda p, c=torch_cls: c(p, foreach=True)),
                Provider(f"torch fused", name, 28, lambda p, c=torch_cls: c(p, fused=True)),
                Provider(f"fused_opt", name, 28, lambda p, c=ours: c(p))]
    name = "Adam+L1+L2"
    out += [Provider("torch fused + L1 pass", name, 28,
                     lambda p: _l1_subgradient_then(T.Adam(p, weight_decay=wd, fused=True), l1)),
            Provider("fused_opt", name, 28, lambda p: FO.Adam(p, weight_decay=wd, l1=l1)),
            Provider("torch fused + soft threshold", name + " (prox)", 28,
                     lambda p: _then_soft_threshold(T.Adam(p, weight_decay=wd, fused=True), l1)),
            Provider("fused_opt", name + " (prox)", 28,
                     lambda p: FO.Adam(p, weight_decay=wd, l1=l1, l1_mode="proximal"))]
    name = "SGD-momentum"
    out += [Provider("torch for-loop", name, 20, lambda p: T.SGD(p, lr=0.01, momentum=0.9, foreach=False)),
            Provider("torch foreach", name, 20, lambda p: T.SGD(p, lr=0.01, momentum=0.9, foreach=True)),
            Provider("torch fused", name, 20, lambda p: T.SGD(p, lr=0.01, momentum=0.9, fused=True)),
            Provider("fused_opt", name, 20, lambda p: FO.SGD(p, lr=0.01, momentum=0.9))]
    name = "RMSprop"
    out += [Provider("torch for-loop", name, 20, lambda p: T.RMSprop(p, foreach=False)),
            Provider("torch foreach", name, 20, lambda p: T.RMSprop(p, foreach=True)),
            Provider("fused_opt", name, 20, lambda p: FO.RMSprop(p))]
    return out


def _median_time(fn, reps: int, device: str) -> tuple[float, float, float]:
    fn()  # warm-up: creates state
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def ceiling_bandwidth(numel: int, reps: int, device: str) -> float:
    """Bytes per second of the reference memory-bound operation (see the module docstring)."""
    if device == "cuda":
        n = max(numel, 1 << 28)
        a, b = torch.empty(n, device=device), torch.empty(n, device=device)
        med, _, _ = _median_time(lambda: b.copy_(a), reps, device)
        return 8 * n / med
    a, b = torch.randn(numel), torch.randn(numel)
    med, _, _ = _median_time(lambda: a.add_(b, alpha=1e-3), reps, device)
    return 12 * numel / med


def machine(device: str) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "fused_opt": fused_opt.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%d")}


def run(quick: bool, reps: int, device: str = "cpu", only: list[str] | None = None,
        lists: list[str] | None = None) -> dict:
    results = []
    for list_name, shapes_of in PARAM_LISTS[device].items():
        if lists and list_name not in lists:
            continue
        shapes = shapes_of(quick)
        params = [(torch.randn(s, device=device) * 0.02).requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        numel = sum(p.numel() for p in params)
        ceiling = ceiling_bandwidth(numel, reps, device)
        print(f"{list_name}: {numel:,} params in {len(params)} tensors; axpy ceiling {ceiling / 1e9:.1f} GB/s",
              flush=True)
        for prov in providers():
            if only and prov.family not in only:
                continue
            saved = [p.detach().clone() for p in params]
            opt = prov.make(params)
            if device == "cuda":
                opt.step()  # creates the state, so the peak below is what a step itself allocates
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            med, lo, hi = _median_time(opt.step, reps, device)
            extra = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
            del opt
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            del saved
            gc.collect()
            gbps = prov.bytes_per_param * numel / med
            results.append({"params": list_name, "numel": numel, "tensors": len(params), "algorithm": prov.family,
                            "provider": prov.name, "ms": 1e3 * med, "ms_min": 1e3 * lo, "ms_max": 1e3 * hi,
                            "bytes_per_param": prov.bytes_per_param, "gbps": gbps / 1e9,
                            "fraction_of_ceiling": gbps / ceiling, "ceiling_gbps": ceiling / 1e9,
                            "extra_peak_mb": None if extra is None else extra / 2**20})
            print(f"  {prov.family:18s} {prov.name:30s} {1e3 * med:9.2f} ms  {gbps / 1e9:6.1f} GB/s  "
                  f"{gbps / ceiling:5.2f} of ceiling", flush=True)
    _add_ratios(results)
    return {"machine": machine(device), "device": device, "quick": quick, "reps": reps, "results": results}


def _add_ratios(results: list[dict]) -> None:
    """ratio = fused_opt time / the best torch time for the same work (lower is better)."""
    for r in results:
        if r["provider"] != "fused_opt":
            continue
        torch_times = [o["ms"] for o in results if o["params"] == r["params"] and o["algorithm"] == r["algorithm"]
                       and o["provider"] != "fused_opt"]
        r["ratio_to_best_torch"] = r["ms"] / min(torch_times) if torch_times else None


def markdown(report: dict) -> str:
    m = report["machine"]
    where = f"GPU: {m['gpu']} (CUDA {m['cuda']}), host " if report["device"] == "cuda" else ""
    lines = [f"{where}CPU: {m['cpu']}, {m['threads']} threads ({m['cpu_capability']}); torch {m['torch']}, "
             f"Python {m['python']}, fused_opt {m['fused_opt']}; {m['date']}; median of {report['reps']} steps"
             + (" (quick mode)" if report["quick"] else ""), "",
             "| params | algorithm | provider | ms (min-max) | GB/s | of ceiling | fused_opt / best torch |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        ratio = r.get("ratio_to_best_torch")
        lines.append(f"| {r['params']} | {r['algorithm']} | {r['provider']} | {r['ms']:.2f} ({r['ms_min']:.2f}-"
                     f"{r['ms_max']:.2f}) | {r['gbps']:.1f} | {r['fraction_of_ceiling']:.2f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}'} |")
    ceilings = {r["params"]: r["ceiling_gbps"] for r in report["results"]}
    kind = "device-to-device copy" if report["device"] == "cuda" else "in-place axpy"
    lines += ["", f"Ceiling ({kind}, same run): " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in ceilings.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fused_opt roofline benchmark")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="small lists, a few seconds")
    ap.add_argument("--lists", nargs="*", help="parameter lists to run, e.g. gpt2-small")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--only", nargs="*", help="algorithms to run, e.g. Adam RMSprop")
    ap.add_argument("--tag", default=None, help="results file name: <out>/<device>-<tag>.json/.md")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the results files")
    args = ap.parse_args(argv)
    reps = args.reps or (5 if args.quick else 9)
    report = run(args.quick, reps, args.device, args.only, args.lists)
    text = markdown(report)
    print("\n" + text)
    if args.tag:
        os.makedirs(args.out, exist_ok=True)
        base = os.path.join(args.out, f"{args.device}-{args.tag}")
        with open(base + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(text)
        print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
