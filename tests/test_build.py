"""The compiled modules share the runtime libraries of the process they load into (setup.py's
loaded_runtimes): a private static copy of the C++ runtime, as a GCC shipping only static archives
produced, crashed the process whenever an error message formatted a number."""

from __future__ import annotations

import importlib
import os
import struct

import pytest

from fused_opt import fatbin

MODULES = {"fused_opt._C": {"libstdc++.so.6", "libgomp.so.1"}, "fused_opt._C_cuda": {"libstdc++.so.6"}}


def needed_libraries(path: str) -> set[str]:
    """DT_NEEDED of a 64-bit little-endian ELF shared object: the libraries it links dynamically."""
    with open(path, "rb") as f:
        data = f.read()
    sections = fatbin.elf_sections(data)
    dynamic = next(s for s in sections if s.kind == 6)  # SHT_DYNAMIC
    strings = sections[dynamic.link].offset
    names = set()
    for at in range(dynamic.offset, dynamic.offset + dynamic.size, 16):
        tag, value = struct.unpack_from("<qQ", data, at)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            names.add(data[strings + value:data.index(b"\0", strings + value)].decode())
    return names


@pytest.mark.parametrize("name", MODULES)
def test_compiled_module_links_the_shared_runtimes(name):
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        pytest.skip(f"{name} is not built here: {e}")
    expected = MODULES[name] - (set() if getattr(module, "cpu_kernels_threaded", True) else {"libgomp.so.1"})
    missing = expected - needed_libraries(module.__file__)
    assert not missing, f"{module.__file__} does not link {sorted(missing)} dynamically (a private static copy?)"


def test_cpu_kernels_run_on_torchs_threads():
    # setup.py finds the compiler's OpenMP flags by trying them; a build without them still loads,
    # but its at::parallel_for runs serially (torch's ATen runs on OpenMP here).
    try:
        module = importlib.import_module("fused_opt._C")
    except ImportError as e:
        pytest.skip(f"fused_opt._C is not built here: {e}")
    assert module.cpu_kernels_threaded, "fused_opt._C was built without OpenMP: see setup.py's openmp_flags"


def test_needed_libraries_reads_a_known_library():
    # The parser itself, on a library whose needs are known: torch's C extension links libtorch.
    import torch._C
    assert "libtorch_python.so" in needed_libraries(torch._C.__file__)


def test_the_cuda_module_holds_code_for_the_architectures_it_was_built_for():
    # setup.py's rule: machine code for each of FUSED_OPT_CUDA_ARCHS (as the build saw it; CI uses
    # the default) and PTX for the newest, which later GPUs compile at first use.
    try:
        module = importlib.import_module("fused_opt._C_cuda")
    except ImportError as e:
        pytest.skip(f"fused_opt._C_cuda is not built here: {e}")
    archs = [int(a) for a in os.environ.get("FUSED_OPT_CUDA_ARCHS", "80;90").split(";") if a]
    expected = [fatbin.Image("sass", a) for a in sorted(archs)] + [fatbin.Image("ptx", max(archs))]
    assert fatbin.images(module.__file__) == expected


def test_a_module_without_gpu_code_has_no_images():
    import torch._C
    assert fatbin.images(torch._C.__file__) == []


@pytest.mark.parametrize("capability,runs", [
    ((8, 0), True), ((8, 6), True), ((8, 9), True),  # sm_80 code runs on later 8.x GPUs
    ((9, 0), True), ((10, 0), True), ((12, 0), True),  # from compute_90 PTX
    ((7, 5), False), ((7, 0), False),
])
def test_which_gpus_the_default_build_runs_on(capability, runs):
    default = [fatbin.Image("ptx", 90), fatbin.Image("sass", 80), fatbin.Image("sass", 90)]
    assert fatbin.runs_on(default, capability) is runs


def test_machine_code_alone_runs_only_within_its_major_version():
    sass = [fatbin.Image("sass", 80), fatbin.Image("sass", 90)]
    assert fatbin.runs_on(sass, (9, 0)) and fatbin.runs_on(sass, (8, 7))
    assert not fatbin.runs_on(sass, (10, 0)) and not fatbin.runs_on(sass, (12, 0))
