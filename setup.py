"""Builds fused_opt's C++ kernels: fused_opt._C (CPU; FUSED_OPT_CPU=0 leaves it out) and
fused_opt._C_cuda (CUDA, when nvcc and a CUDA build of torch are present; FUSED_OPT_CUDA=0|1 forces
the choice). Build with
`pip install --no-build-isolation .` so the extension links against the torch you run."""

import glob
import os
import re
import sysconfig

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
# No FMA contraction (-ffp-contract=off, nvcc --fmad=false): the same roundings as torch.optim, so
# trajectories stay within 1e-5, and the CUDA kernels round as the CPU kernels do.
# -fopenmp: at::parallel_for is a header template that runs in parallel only when compiled with
# OpenMP (torch's own backend); without it every step would run on one thread.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
# GPU architectures: FUSED_OPT_CUDA_ARCHS="80;90" by default (A100, H100/H200); 70 or later, as
# the kernels take up to 32 KB of arguments (csrc/include/fused_opt/multi_tensor.h).
ARCHS = [a for a in os.environ.get("FUSED_OPT_CUDA_ARCHS", "80;90").split(";") if a]
if any(not re.fullmatch(r"\d+[af]?", a) or int(a.rstrip("af")) < 70 for a in ARCHS):
    raise SystemExit(f"FUSED_OPT_CUDA_ARCHS={';'.join(ARCHS)}: give compute capabilities of 70 or later, e.g. 80;90")
# Machine code for each, and PTX of the newest plain one, which the driver compiles for later GPUs
# (Blackwell and on) at first use. fused_opt/fatbin.py reads the list back to pick a backend.
PTX = max((a for a in ARCHS if a.isdigit()), key=int, default=None)
NVCC_FLAGS = ["-O3", "-lineinfo", "--fmad=false"] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS] + (
    [f"-gencode=arch=compute_{PTX},code=compute_{PTX}"] if PTX else [])


def want_cuda() -> bool:
    forced = os.environ.get("FUSED_OPT_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def include_dirs() -> list:
    dirs = [os.path.join(ROOT, "csrc", "include")]
    # Headers of the CUDA math libraries that torch's headers include, from torch's pip wheels.
    wheel_headers = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13", "include")
    if os.path.isdir(wheel_headers):
        dirs.append(wheel_headers)
    return dirs


def loaded_runtimes(*names) -> list:
    """Link arguments naming the runtime libraries this process already runs with (`import torch`
    loaded them: libstdc++.so.6, and torch's own libgomp.so.1), so the extensions share them. A GCC
    unpacked beside the system's can ship only static archives (the lent H200's image does): the
    extension then carried a private copy of the C++ runtime, whose iostreams GCC 13 never
    initialises, and formatting a number into an error message crashed the process; a private
    OpenMP runtime would add a second thread pool. Given before the compiler's own -lstdc++ and
    -lgomp, these supply every symbol they have; elsewhere they are what those flags find anyway."""
    try:
        with open("/proc/self/maps") as maps:
            loaded = sorted({line.split()[-1] for line in maps if "/" in line})
    except OSError:  # not Linux
        return []
    return [next(p for p in loaded if f"/{name}" in p) for name in names if any(f"/{name}" in p for p in loaded)]


def sources(*patterns) -> list:
    return sorted(os.path.relpath(f, ROOT) for p in patterns for f in glob.glob(os.path.join(ROOT, "csrc", p)))


ext_modules = []
# FUSED_OPT_CPU=0 leaves the CPU module out: bench/gpu_check.sh builds the two modules side by side.
if os.environ.get("FUSED_OPT_CPU", "1") == "1":
    ext_modules.append(cpp_extension.CppExtension(
        "fused_opt._C", sources("cpu/*.cpp"), include_dirs=include_dirs(), extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"] + loaded_runtimes("libstdc++.so", "libgomp")))
if want_cuda():
    ext_modules.append(cpp_extension.CUDAExtension(
        "fused_opt._C_cuda", sources("module.cpp", "cuda/*.cu"), include_dirs=include_dirs(),
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}, extra_link_args=loaded_runtimes("libstdc++.so")))

setup(ext_modules=ext_modules, cmdclass={"build_ext": cpp_extension.BuildExtension})
