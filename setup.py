"""Builds fused_opt's C++ kernels: fused_opt._C (CPU; FUSED_OPT_CPU=0 leaves it out) and
fused_opt._C_cuda (CUDA, when nvcc and a CUDA build of torch are present; FUSED_OPT_CUDA=0|1 forces
the choice). Build with
`pip install --no-build-isolation .` so the extension links against the torch you run."""

import glob
import os
import re
import subprocess
import sys
import sysconfig
import tempfile

import torch
from setuptools import setup
from setuptools.errors import CompileError, LinkError
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
# No FMA contraction (-ffp-contract=off, nvcc --fmad=false): the same roundings as torch.optim, so
# trajectories stay within 1e-5, and the CUDA kernels round as the CPU kernels do.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
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


# A program that builds only where OpenMP compiles, links and runs its pragmas.
OPENMP_PROBE = """#include <omp.h>
int main() {
  int threads = 0;
#pragma omp parallel reduction(+ : threads)
  threads += 1;
  return threads >= 1 && omp_get_max_threads() >= 1 ? 0 : 1;
}
"""


def openmp_flags(compiler) -> tuple[list, list, str | None]:
    """(compile flags, link flags, why none) that make the CPU kernels' at::parallel_for run on
    torch's threads. Where torch's ATen runs on OpenMP (Linux wheels), at::parallel_for is a header
    template that runs in parallel only when our code is compiled with OpenMP too; elsewhere it calls
    torch's own thread pool and needs nothing. A compiler without OpenMP (Apple's clang) builds the
    kernels anyway, which then run on one thread: a warning says so, and `python -m fused_opt.info`."""
    if os.environ.get("FUSED_OPT_OPENMP", "1") == "0":
        return [], [], "FUSED_OPT_OPENMP=0"
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return [], [], None
    if compiler.compiler_type == "msvc":
        candidates = [(["/openmp"], [])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
        torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        if sys.platform == "darwin" and os.path.exists(os.path.join(torch_lib, "libomp.dylib")):
            # Apple's clang parses the pragmas when asked. omp.h from torch's headers or Homebrew's
            # libomp; the runtime is always the libomp torch loads (a second one would abort).
            headers = cpp_extension.include_paths() + [
                d for d in ("/opt/homebrew/opt/libomp/include", "/usr/local/opt/libomp/include") if os.path.isdir(d)]
            candidates.append((["-Xpreprocessor", "-fopenmp"] + [f"-I{d}" for d in headers],
                               [f"-L{torch_lib}", "-lomp", f"-Wl,-rpath,{torch_lib}"]))
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "openmp_probe.cpp")
        with open(source, "w") as f:
            f.write(OPENMP_PROBE)
        for compile_flags, link_flags in candidates:
            try:
                objects = compiler.compile([source], output_dir=tmp, extra_postargs=compile_flags)
                compiler.link_executable(objects, "openmp_probe", output_dir=tmp, extra_postargs=link_flags)
                if subprocess.run([os.path.join(tmp, "openmp_probe")], timeout=60).returncode == 0:
                    return compile_flags, link_flags, None
            except (CompileError, LinkError, OSError, subprocess.SubprocessError):
                continue
    name = getattr(compiler, "compiler_so", [compiler.compiler_type])[0]
    return [], [], f"{name} builds no OpenMP program with {' or '.join(' '.join(c) for c, _ in candidates)}"


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, with the CPU module's OpenMP flags found by trying the compiler."""

    def build_extensions(self) -> None:
        cpu = [e for e in self.extensions if e.name == "fused_opt._C"]
        if cpu:
            compile_flags, link_flags, why = openmp_flags(self.compiler)
            if why is not None:
                print(f"fused_opt: WARNING: building the CPU kernels without OpenMP ({why}): they will run on one thread."
                      " For all cores, rebuild with a compiler that has OpenMP (GCC; on macOS, `brew install libomp`).")
            cpu[0].extra_compile_args["cxx"] = cpu[0].extra_compile_args["cxx"] + compile_flags
            cpu[0].extra_link_args = link_flags + cpu[0].extra_link_args
        super().build_extensions()


def sources(*patterns) -> list:
    return sorted(os.path.relpath(f, ROOT) for p in patterns for f in glob.glob(os.path.join(ROOT, "csrc", p)))


ext_modules = []
# FUSED_OPT_CPU=0 leaves the CPU module out: bench/gpu_check.sh builds the two modules side by side.
if os.environ.get("FUSED_OPT_CPU", "1") == "1":
    ext_modules.append(cpp_extension.CppExtension(
        "fused_opt._C", sources("cpu/*.cpp"), include_dirs=include_dirs(), extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=loaded_runtimes("libstdc++.so", "libgomp")))
if want_cuda():
    ext_modules.append(cpp_extension.CUDAExtension(
        "fused_opt._C_cuda", sources("module.cpp", "cuda/*.cu"), include_dirs=include_dirs(),
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}, extra_link_args=loaded_runtimes("libstdc++.so")))

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension})
