"""The CUDA kernels as ptxas compiles them for the H200 (sm_90), checked without a GPU: each kernel
(the updates' and the step counters') keeps its work in registers (no stack frame, no spills: the
~31 KB of launch metadata in the kernel's arguments is read in place, never copied to local
memory) and fits the threads a block of its launch bounds; and no multiply and add is contracted
into an FMA (`--fmad=false`), so the kernels round as torch.optim and the CPU kernels do."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch
from torch.utils import cpp_extension

ROOT = pathlib.Path(__file__).parent.parent
FAMILIES = ("AdamFamily", "RMSpropFamily", "SGDFamily")
# float, double, Half and BFloat16 params; the two 16-bit types also with float32 master weights.
KERNELS_PER_FAMILY = 6


def _cuda_home() -> str | None:
    # scripts/cuda_home.sh follows the nvcc wrapper on PATH to the toolkit, as the build does.
    home = os.environ.get("CUDA_HOME") or subprocess.run(
        ["bash", "-c", "source scripts/cuda_home.sh; echo ${CUDA_HOME:-}"], cwd=ROOT, capture_output=True,
        text=True).stdout.strip()
    return home if home and os.path.exists(os.path.join(home, "bin", "nvcc")) else None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[str, str]:
    """ptxas's report on ops_cuda.cu for sm_90, and the PTX nvcc made for it."""
    home = _cuda_home()
    if home is None or torch.version.cuda is None or shutil.which("bash") is None:
        pytest.skip("needs nvcc and a CUDA build of torch")
    std = "c++20" if torch.__version__ >= "2.13" else "c++17"  # what torch's cpp_extension uses
    includes = [str(ROOT / "csrc" / "include"), sysconfig.get_paths()["include"],
                os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13", "include")]
    includes += cpp_extension.include_paths(device_type="cuda")
    # setup.py's nvcc flags (-lineinfo aside), for the one GPU the project is measured on.
    out = tmp_path_factory.mktemp("ptxas")
    cmd = [os.path.join(home, "bin", "nvcc"), f"-std={std}", "-O3", "--fmad=false", "-gencode=arch=compute_90,code=sm_90",
           "-Xptxas", "-v", "-keep", "-keep-dir", str(out), "-c", str(ROOT / "csrc" / "cuda" / "ops_cuda.cu"),
           "-o", str(out / "ops_cuda.o"),
           "-DTORCH_EXTENSION_NAME=_C_cuda", "-Xcompiler", "-fPIC"] + [f"-I{d}" for d in includes]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr, "".join(f.read_text() for f in out.glob("*.ptx"))


@pytest.fixture(scope="module")
def ptxas_report(compiled) -> str:
    return compiled[0]


# kernel -> the threads a block of its launch bounds (multi_tensor.h: kThreads, kCounterThreads)
THREADS = {"multi_tensor_kernel": 512, "advance_counters_kernel": 256}


def _kernels(report: str) -> dict[str, str]:
    """Each kernel's mangled name (the updates' and the step counters') -> the ptxas lines that
    describe it."""
    out, name = {}, None
    for line in report.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?(\w+)'?", line)
        if m:
            name = m.group(1) if any(kernel in m.group(1) for kernel in THREADS) else None
            if name:
                out.setdefault(name, "")
        elif name:
            out[name] += line + "\n"
    return out


def test_every_kernel_is_compiled(ptxas_report):
    kernels = _kernels(ptxas_report)
    for family in FAMILIES:
        assert sum(family in k for k in kernels) == KERNELS_PER_FAMILY, sorted(kernels)
    assert sum("advance_counters_kernel" in k for k in kernels) == 1, sorted(kernels)


def test_no_kernel_uses_local_memory(ptxas_report):
    for name, lines in _kernels(ptxas_report).items():
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", lines)
        assert frame is not None, f"{name}: no resource report in\n{lines}"
        assert frame.groups() == ("0", "0", "0"), f"{name}: {frame.group(0)}"


def test_kernels_fit_their_launch_bounds(ptxas_report):
    for name, lines in _kernels(ptxas_report).items():
        regs = re.search(r"Used (\d+) registers", lines)
        assert regs is not None, f"{name}: no register count in\n{lines}"
        threads = next(n for kernel, n in THREADS.items() if kernel in name)
        assert int(regs.group(1)) <= 65536 // threads, f"{name}: {regs.group(0)}"


def test_no_multiply_and_add_is_fused(compiled):
    """In float32, the math of every param dtype but float64: no FMA at all. (In float64, libdevice's
    pow, which makes the bias corrections of device step counters, is built on FMAs by design.)"""
    ptx = compiled[1]
    assert len(re.findall(r"\bmul\.rn\.f32\b", ptx)) > 50  # the kernels' products, each rounded on its own
    assert re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\b", ptx) == []
