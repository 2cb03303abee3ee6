"""A small workload for compute-sanitizer (bench/gpu_check.sh runs it under memcheck): every family
and the options that add state slots, on the CUDA and Triton backends, over tensors that hit each
edge of the traversal -- empty, one element, a vector-width tail, a chunk edge, a tensor spanning
launches, storage that is not 16-byte aligned -- in float32, bfloat16 and bfloat16 with float32
master weights, for several steps (the later ones from the cached group tables), with a
device-tensor lr and weight decay and AMP's grad_scale/found_inf. Each result is checked against
the reference backend on the same values, so the run fails on a wrong value as well as on a
memory error. Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that an access past a tensor's end
leaves its allocation.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 bench/sanitize_cuda.py
    TRITON_INTERPRET=1 python3 bench/sanitize_cuda.py cpu    # the same checks on the CPU (cuda_sim)
"""

from __future__ import annotations

import sys

import torch

import fused_opt


CONFIGS = [
    (fused_opt.AdamW, {"amsgrad": True, "l1": 1e-3, "l1_mode": "proximal"}),
    (fused_opt.Adam, {"weight_decay": 0.01, "maximize": True}),
    (fused_opt.RMSprop, {"centered": True, "momentum": 0.9, "l1": 1e-3}),
    (fused_opt.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
]
CHUNK = 65536  # csrc/include/fused_opt/multi_tensor.h kChunk


def tensors(dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """The same values on any device: drawn on the host, then copied there."""
    g = torch.Generator().manual_seed(0)
    sizes = [0, 1, 7, 8, 9, CHUNK - 1, CHUNK + 3, 5 * CHUNK + 17]
    host = [torch.randn(n, dtype=dtype, generator=g) for n in sizes]
    unaligned = torch.randn(1001, dtype=dtype, generator=g)
    # More tensors than a launch holds (256 on the GPU, 32 in the CPU simulation).
    host += [torch.randn(33, dtype=dtype, generator=g) for _ in range(260)]
    out = [t.to(device, copy=True) for t in host]
    out.insert(len(sizes), unaligned.to(device, copy=True)[1:])  # storage offset 1: not 16-byte aligned
    return [t.requires_grad_() for t in out]


def on_device(grads: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    """Copies of `grads` on `device` in one copy (each a call under the sanitizer, and without the
    caching allocator a cudaMalloc): slices of one buffer, each starting on 16 bytes as the
    allocator's own tensors do, so the kernels' aligned paths are the ones checked."""
    offsets, total = [], 0
    for g in grads:
        offsets.append(total)
        total += -(-g.numel() // 16) * 16
    flat = torch.zeros(total, dtype=grads[0].dtype)
    for g, at in zip(grads, offsets):
        flat[at:at + g.numel()] = g.flatten()
    flat = flat.to(device)
    return [flat[at:at + g.numel()].view(g.shape) for g, at in zip(grads, offsets)]


def run(backend: str, opt_cls, kwargs: dict, dtype: torch.dtype, master: bool, device: str, steps: int = 3) -> float:
    """Largest difference from the reference backend (on the host: under memcheck only the kernels
    being checked run on the GPU), relative to each param's largest magnitude."""
    where = {backend: device, "reference": "cpu"}
    params = {name: tensors(dtype, at) for name, at in where.items()}
    assert params[backend][len(params[backend]) - 261].storage_offset() == 1
    opts = {name: opt_cls(params[name], lr=torch.tensor(1e-2, device=at), backend=name, master_weights=master,
                          **{"weight_decay": torch.tensor(0.01, device=at), **kwargs})
            for name, at in where.items()}
    worst = 0.0
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, dtype=dtype, generator=g) for p in params["reference"]]
        for name, opt in opts.items():
            for p, gr in zip(params[name], on_device(grads, where[name])):
                p.grad = gr
            opt.grad_scale = torch.tensor(2.0, device=where[name])  # GradScaler's protocol, as it sets them
            opt.found_inf = torch.tensor(float(step == 1), device=where[name])  # step 1 is skipped
            opt.step()
    for p, q in zip(params[backend], params["reference"]):
        if p.numel():
            worst = max(worst, ((p.cpu().float() - q.float()).abs().max() / (q.float().abs().max() + 1e-6)).item())
    return worst


def main(device: str) -> int:
    failures = 0
    for backend in ("cuda", "triton") if device == "cuda" else ("cuda_sim", "triton"):
        for opt_cls, kwargs in CONFIGS:
            for dtype, master in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
                worst = run(backend, opt_cls, kwargs, dtype, master, device)
                limit = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16 params: rounding apart
                ok = worst <= limit
                failures += not ok
                print(f"{backend:6s} {opt_cls.__name__:7s} {str(dtype)[6:]:8s} master={master!s:5s} "
                      f"largest relative difference from the reference {worst:.2e} {'ok' if ok else 'FAIL'}")
    if device == "cuda":
        torch.cuda.synchronize()
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
