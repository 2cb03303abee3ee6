"""`python -m fused_opt.info`: versions, and which backends can run here (and why not)."""

from __future__ import annotations

import platform

import torch

import fused_opt
from fused_opt import dispatch, fatbin, ops


def _cuda_code() -> str:
    """The GPU architectures the CUDA extension has code for (fatbin.py), or why there is none."""
    why = ops.load_extensions()["fused_opt._C_cuda"]
    if why is not None:
        return f"none ({why})"
    return ", ".join(map(str, fatbin.images(ops.cuda_module().__file__))) or "none found"


def _cpu_kernels() -> str:
    """Which compiled variant of the CPU kernels runs (the widest this CPU and torch use)."""
    why = ops.load_extensions()["fused_opt._C"]
    if why is not None:
        return f"none ({why})"
    module = ops.cpu_module()
    threads = "" if module.cpu_kernels_threaded else (
        "; built without OpenMP, they run on one thread: rebuild with a compiler that has it (README, Install and build)")
    return f"{module.cpu_kernels()} (this CPU runs {', '.join(module.cpu_kernels_available())}){threads}"


def report() -> str:
    lines = [f"fused_opt {fused_opt.__version__}", f"torch {torch.__version__} (CUDA {torch.version.cuda})",
             f"python {platform.python_version()} on {platform.machine()}",
             f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads",
             f"CPU kernels: {_cpu_kernels()}",
             f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
             f"CUDA extension code: {_cuda_code()}",
             "backends:"]
    for backend in dispatch.BACKENDS:
        why = backend.unavailable()
        if why is None:  # say which tensors it takes here
            devices = [d for d in backend.device_types if backend.device_reason(torch.device(d)) is None]
            why = f"available for {'/'.join(devices)} tensors" if devices else "unavailable: " + "; ".join(
                backend.device_reason(torch.device(d)) for d in backend.device_types)
        else:
            why = "unavailable: " + why
        lines.append(f"  {backend.name:10s} {why}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
