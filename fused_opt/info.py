"""`python -m fused_opt.info`: versions, and which backends can run here (and why not)."""

from __future__ import annotations

import platform

import torch

import fused_opt


def report() -> str:
    lines = [f"fused_opt {fused_opt.__version__}", f"torch {torch.__version__} (CUDA {torch.version.cuda})",
             f"python {platform.python_version()} on {platform.machine()}",
             f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads",
             f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
             "backends:"]
    for name, why in fused_opt.available_backends().items():
        lines.append(f"  {name:10s} {'available' if why is None else 'unavailable: ' + why}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
