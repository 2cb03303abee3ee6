"""Speed of fused_opt against torch.optim, measured against the memory roofline.

    fused-opt bench                       # CPU: GPT-2-small (124M params), 10,000 x 4,096, 5,000 x 1,000,
                                          #   ResNet-50 under channels_last (25.6M)
    fused-opt bench --quick               # seconds: scaled-down lists (what CI runs)
    fused-opt bench --device cuda         # GPU: adds a 1B-param GPT list

An optimizer step is memory-bound: its floor is (bytes that must move) / (bandwidth). The
ceiling is measured in the same run: on the CPU torch's in-place axpy (`a.add_(b, alpha=s)`,
12 bytes per element) over as many elements as the parameter list; on the GPU a large
device-to-device copy (8 bytes per element). Each provider updates the same params and grads
with its own state; times are medians of `reps` steps after a warm-up (CUDA events on the GPU).
On the GPU each row also counts the kernels and copies one step puts on the device (profiler).

Bytes per parameter, counted (p read+written, g read, each state read+written), times the dtype
size: Adam/AdamW 7, SGD-momentum and RMSprop 5 (28 and 20 bytes in fp32; states have the
param's dtype, as in torch.optim). "+L1+L2" adds weight decay and an L1 subgradient term,
"+L1prox+L2" weight decay and a proximal L1 step; torch has no L1, so its rows are what a user
writes today: an extra pass adding l1 * sign(p) to the grads, or a soft threshold after the step.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

import fused_opt

WEIGHT_DECAY, L1 = 0.01, 1e-4

# algorithm -> (torch class, fused_opt class, kwargs, tensors read+written per param, torch paths)
ALGORITHMS = {
    "Adam": (torch.optim.Adam, fused_opt.Adam, {}, 7, ("for-loop", "foreach", "fused")),
    "AdamW": (torch.optim.AdamW, fused_opt.AdamW, {}, 7, ("for-loop", "foreach", "fused")),
    "RMSprop": (torch.optim.RMSprop, fused_opt.RMSprop, {}, 5, ("for-loop", "foreach")),
    "SGD-momentum": (torch.optim.SGD, fused_opt.SGD, {"lr": 0.01, "momentum": 0.9}, 5,
                     ("for-loop", "foreach", "fused")),
}
TORCH_PATHS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gpt_shapes(d: int, layers: int, vocab: int, ctx: int) -> list[tuple[int, ...]]:
    """A GPT-2-style parameter list: embeddings, 12 tensors per block, final norm."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def resnet50_shapes(width_div: int = 1) -> list[tuple[int, ...]]:
    """ResNet-50's parameter list (25.6M params in 161 tensors; channels / width_div): convolutions,
    batch norms' weights and biases, the classifier."""
    w = lambda c: max(1, c // width_div)  # noqa: E731
    shapes = [(w(64), 3, 7, 7), (w(64),), (w(64),)]
    cin = w(64)
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            mid, out = w(width), w(4 * width)
            shapes += [(mid, cin, 1, 1), (mid,), (mid,), (mid, mid, 3, 3), (mid,), (mid,), (out, mid, 1, 1), (out,), (out,)]
            if b == 0:  # the projection shortcut
                shapes += [(out, cin, 1, 1), (out,), (out,)]
            cin = out
    return shapes + [(1000, cin), (1000,)]


# name -> (devices, shapes(quick))
PARAM_LISTS = {
    "gpt2-small": (("cpu", "cuda"), lambda q: gpt_shapes(768 // (8 if q else 1), 12, 50257 // (8 if q else 1),
                                                         1024)),  # 124M params in 148 tensors
    "gpt-1b": (("cuda",), lambda q: gpt_shapes(2048 // (8 if q else 1), 20, 50257, 2048)),  # 1.11B in 244
    "10000x4096": (("cpu", "cuda"), lambda q: [(4096,)] * (500 if q else 10000)),
    "5000x1000": (("cpu", "cuda"), lambda q: [(1000,)] * (500 if q else 5000)),
    # A vision model trained under channels_last, as torch recommends: its 4-d weights, their grads
    # and states are dense but not contiguous.
    "resnet50-cl": (("cpu", "cuda"), lambda q: resnet50_shapes(8 if q else 1)),
}
CHANNELS_LAST = {"resnet50-cl"}


def make_params(list_name: str, dtype: torch.dtype, device: str, quick: bool, seed: int = 0) -> list[torch.Tensor]:
    """A list's params, with grads laid out like them (as autograd makes them)."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for s in PARAM_LISTS[list_name][1](quick):
        p = (torch.randn(s, device=device, generator=g) * 0.02).to(dtype)
        if list_name in CHANNELS_LAST and p.dim() == 4:
            p = p.contiguous(memory_format=torch.channels_last)
        p.requires_grad_()
        p.grad = torch.empty_like(p).copy_(torch.randn(s, device=device, generator=g) * 1e-3)
        params.append(p)
    return params


@dataclass
class Provider:
    name: str
    algorithm: str       # e.g. "Adam" or "Adam+L1+L2"
    tensors_moved: int   # param-sized tensors read or written per step
    make: Callable       # (params) -> object with .step()


class _WithL1Pass:
    """torch today, L1 as a subgradient: add l1 * sign(p) to every grad (a foreach pass), then step."""

    def __init__(self, opt, l1):
        self.opt, self.l1 = opt, l1
        self.params = [p for g in opt.param_groups for p in g["params"]]

    def step(self):
        torch._foreach_add_([p.grad for p in self.params], torch._foreach_sign(self.params), alpha=self.l1)
        self.opt.step()


class _ThenSoftThreshold(_WithL1Pass):
    """torch today, L1 as a proximal step: the optimizer's step, then a soft threshold of every param."""

    def step(self):
        self.opt.step()
        with torch.no_grad():
            lr = float(self.opt.param_groups[0]["lr"])
            for p in self.params:
                p.copy_(torch.nn.functional.softshrink(p, lr * self.l1))


def fused_backends(device: str) -> list[str]:
    usable = fused_opt.available_backends()
    wanted = ("cuda", "triton", "reference") if device == "cuda" else ("cpu", "reference")
    return [b for b in wanted if usable.get(b) is None]


# regularisation -> (name suffix, fused_opt kwargs, how torch users add the L1 term, its label)
REGULARISATION = {
    "none": ("", {}, None, ""),
    "l1l2": ("+L1+L2", {"weight_decay": WEIGHT_DECAY, "l1": L1}, _WithL1Pass, " + L1 pass"),
    "l1prox": ("+L1prox+L2", {"weight_decay": WEIGHT_DECAY, "l1": L1, "l1_mode": "proximal"}, _ThenSoftThreshold,
               " + soft threshold"),
}


def providers(device: str, algorithms=None, regularisations=tuple(REGULARISATION), backends=None) -> list[Provider]:
    out = []
    for algo, (torch_cls, ours_cls, kwargs, moved, paths) in ALGORITHMS.items():
        if algorithms and algo not in algorithms:
            continue
        for reg in regularisations:
            suffix, extra, torch_l1, label = REGULARISATION[reg]
            torch_kwargs = {**kwargs, **{k: v for k, v in extra.items() if k == "weight_decay"}}
            for path in paths:
                def make(p, c=torch_cls, k={**torch_kwargs, **TORCH_PATHS[path]}, wrap=torch_l1):
                    return wrap(c(p, **k), L1) if wrap else c(p, **k)
                out.append(Provider(f"torch {path}{label}", algo + suffix, moved, make))
            for backend in backends or fused_backends(device):
                out.append(Provider(f"fused_opt {backend}", algo + suffix, moved,
                                    lambda p, c=ours_cls, k={**kwargs, **extra}, b=backend: c(p, backend=b, **k)))
    return out


def _median_time(fn, reps: int, device: str) -> tuple[float, float, float]:
    """(median, min, max) seconds of `reps` calls after one warm-up call."""
    fn()
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


def extra_peak_bytes(step: Callable, device: str) -> int:
    """Memory a step allocates beyond what exists before it, at its peak (state already made)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # CPU: the profiler charges each allocation to the op that made it (frees outside any op come
    # as "[memory]" events); replay those amounts in time order and keep the running peak. An
    # op's own temporaries that it frees before returning net out, so this is a lower bound.
    # acc_events: one cycle only, which also keeps torch 2.11-2.13 from warning that cycles clear events.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                acc_events=True) as prof:
        step()
    level = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        level += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def gpu_ops_per_step(step: Callable, device: str) -> int | None:
    """Kernels and copies one step puts on the GPU (the profiler counts them); None on the CPU or
    where the profiler cannot see the GPU."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA], acc_events=True) as prof:
            step()
            torch.cuda.synchronize()
    except RuntimeError:  # no CUPTI: the step still ran, the count is unknown
        return None
    return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())


def machine(device: str) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    kernels = fused_opt.ops.cpu_module().cpu_kernels() if fused_opt.ops.load_extensions()["fused_opt._C"] is None else None
    return {"cpu": cpu, "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_kernels": kernels,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton_version, "python": platform.python_version(),
            "fused_opt": fused_opt.__version__, "date": time.strftime("%Y-%m-%d")}


def plan(device="cpu", quick=False, lists=None, algorithms=None, dtypes=("fp32",),
         regularisations=tuple(REGULARISATION), backends=None) -> list[tuple[str, str, Provider]]:
    """The (list, dtype, provider) runs of one benchmark, in order (the order of `lists` when given)."""
    runs = []
    for list_name in lists or PARAM_LISTS:
        if device not in PARAM_LISTS[list_name][0]:
            continue
        for dtype in dtypes:
            runs += [(list_name, dtype, prov) for prov in providers(device, algorithms, regularisations, backends)]
    return runs


def run(device="cpu", quick=False, reps=None, lists=None, algorithms=None, dtypes=("fp32",),
        regularisations=tuple(REGULARISATION), backends=None, progress: Callable | None = None,
        partial: Callable[[dict], None] | None = None) -> dict:
    """Runs the matrix; returns {"machine", "device", "quick", "reps", "results": [row, ...]}.
    `partial`, if given, gets the report so far after each row (so that a run stopped by a time
    limit still leaves what it measured)."""
    reps = reps or (5 if quick else 9)
    runs = plan(device, quick, lists, algorithms, dtypes, regularisations, backends)
    results, ceilings, current = [], {}, (None, None)
    params = []
    for list_name, dtype_name, prov in (progress(runs) if progress else runs):
        if (list_name, dtype_name) != current:  # new parameter list: fresh params and grads
            params.clear()
            gc.collect()
            dtype = DTYPES[dtype_name]
            params = make_params(list_name, dtype, device, quick)
            numel = sum(p.numel() for p in params)
            if list_name not in ceilings:
                ceilings[list_name] = ceiling_bandwidth(numel, reps, device)
            current = (list_name, dtype_name)
        saved = [p.detach().clone() for p in params]
        opt = prov.make(params)
        first = time.perf_counter()
        opt.step()  # creates the state
        first = time.perf_counter() - first
        extra = extra_peak_bytes(opt.step, device)
        # A step of over half a second (torch's for-loop over 10,000 tensors on the GPU) is timed 3
        # times, not `reps`, and its kernels are not counted (the profiler takes seconds over its tens
        # of thousands): its median is as clear, and the matrix fits gpu_check.sh's minutes.
        slow = first > 0.5
        gpu_ops = None if slow else gpu_ops_per_step(opt.step, device)
        med, lo, hi = _median_time(opt.step, min(reps, 3) if slow else reps, device)
        del opt
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        del saved
        gc.collect()
        bytes_per_param = prov.tensors_moved * DTYPES[dtype_name].itemsize
        gbps = bytes_per_param * numel / med / 1e9
        results.append({"params": list_name, "numel": numel, "tensors": len(params), "dtype": dtype_name,
                        "algorithm": prov.algorithm, "provider": prov.name, "ms": 1e3 * med, "ms_min": 1e3 * lo,
                        "ms_max": 1e3 * hi, "bytes_per_param": bytes_per_param, "gbps": gbps,
                        "ceiling_gbps": ceilings[list_name] / 1e9, "fraction_of_ceiling": gbps * 1e9 / ceilings[list_name],
                        "extra_peak_mb": extra / 2**20, "gpu_ops_per_step": gpu_ops})
        if partial:
            partial(_report(device, quick, reps, results))
    return _report(device, quick, reps, results)


def _report(device: str, quick: bool, reps: int, results: list[dict]) -> dict:
    rows = [dict(r) for r in results]
    add_ratios(rows)
    return {"machine": machine(device), "device": device, "quick": quick, "reps": reps, "results": rows}


def add_ratios(results: list[dict]) -> None:
    """ratio_to_best_torch = fused_opt time / the fastest torch time for the same work (lower is better)."""
    for r in results:
        if not r["provider"].startswith("fused_opt"):
            continue
        same = [o["ms"] for o in results if (o["params"], o["dtype"], o["algorithm"]) ==
                (r["params"], r["dtype"], r["algorithm"]) and o["provider"].startswith("torch")]
        r["ratio_to_best_torch"] = r["ms"] / min(same) if same else None


def markdown(report: dict) -> str:
    m = report["machine"]
    where = f"GPU {m['gpu']} (CUDA {m['cuda']}, Triton {m['triton']}); host " if report["device"] == "cuda" else ""
    gpu = report["device"] == "cuda"
    kind = "device-to-device copy" if gpu else "in-place axpy"
    lines = [f"{where}CPU {m['cpu']}, {m['threads']} threads ({m['cpu_capability']}"
             + (f"; fused_opt's {m['cpu_kernels']} kernels" if m.get("cpu_kernels") else "") + f"); torch {m['torch']}, "
             f"Python {m['python']}, fused_opt {m['fused_opt']}; {m['date']}; median of {report['reps']} steps"
             + (" (quick mode: scaled-down lists)" if report["quick"] else ""), "",
             "| params | dtype | algorithm | provider | ms (min-max) | GB/s | of ceiling | extra MB | vs best torch |"
             + (" GPU ops/step |" if gpu else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for r in report["results"]:
        ratio = r.get("ratio_to_best_torch")
        ops = r.get("gpu_ops_per_step")
        lines.append(f"| {r['params']} | {r['dtype']} | {r['algorithm']} | {r['provider']} | {r['ms']:.2f} "
                     f"({r['ms_min']:.2f}-{r['ms_max']:.2f}) | {r['gbps']:.1f} | {r['fraction_of_ceiling']:.2f} | "
                     f"{r['extra_peak_mb']:.0f} | {'' if ratio is None else f'{ratio:.2f}'} |"
                     + (f" {'?' if ops is None else ops} |" if gpu else ""))
    ceilings = {r["params"]: r["ceiling_gbps"] for r in report["results"]}
    lines += ["", f"Ceiling ({kind}, same run): " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in ceilings.items())]
    return "\n".join(lines) + "\n"


def chart(report: dict, path: str) -> None:
    """Bars of GB/s per provider for each (params, dtype, algorithm), a line at the ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    panels = list(dict.fromkeys((r["params"], r["dtype"]) for r in rows))
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.6 * len(panels)), squeeze=False)
    for ax, (lst, dt) in zip(axes[:, 0], panels):
        sub = [r for r in rows if (r["params"], r["dtype"]) == (lst, dt)]
        algos = list(dict.fromkeys(r["algorithm"] for r in sub))
        def base(name):
            return name.replace(" + L1 pass", "").replace(" + soft threshold", "")

        provs = list(dict.fromkeys(base(r["provider"]) for r in sub))
        width = 0.8 / len(provs)
        for j, prov in enumerate(provs):
            xs, ys = [], []
            for i, algo in enumerate(algos):
                for r in sub:
                    if r["algorithm"] == algo and base(r["provider"]) == prov:
                        xs.append(i + j * width)
                        ys.append(r["gbps"])
            ax.bar(xs, ys, width, label=prov)
        ax.axhline(sub[0]["ceiling_gbps"], color="black", linestyle="--", label="ceiling (same run)")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(algos))], algos, fontsize=8)
        ax.set_ylabel("GB/s")
        ax.set_title(f"{lst}, {dt}")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save(report: dict, folder: str, tag: str, with_chart: bool = True) -> list[str]:
    """Writes <device>-<tag>.json, .md and (with matplotlib) .png into folder; returns the paths."""
    import json

    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, f"{report['device']}-{tag}")
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(report))
    paths = [base + ".json", base + ".md"]
    if with_chart:
        chart(report, base + ".png")
        paths.append(base + ".png")
    return paths
