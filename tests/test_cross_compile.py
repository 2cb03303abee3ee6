"""The CPU module's sources compile for platforms that CI cannot run: Arm Linux, Apple silicon
macOS, and x86-64 Linux under clang. They are compiled with the clang in the `ziglang` package
(it carries every target's C library headers) against this torch's headers. Nothing is linked
or run: these tests catch code that only GCC or only x86 accepts. On Arm, the kernels are
kernels_default.cpp's at::vec code, which is NEON there (at::vec::Vectorized<float> holds 4 floats)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
# On x86-64 the files with x86-only code (the AVX variants and the CPU-feature check) are enough:
# the rest compiles as it does for Arm.
TARGETS = {"aarch64-linux-gnu": SOURCES, "aarch64-macos": SOURCES,
           "x86_64-linux-gnu": [s for s in SOURCES if s.stem.startswith("kernels") or s.stem == "host"]}


def clang(target: str, source: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    pytest.importorskip("ziglang", reason="pip install ziglang: the clang these tests compile with")
    from torch.utils import cpp_extension
    includes = [ROOT / "csrc" / "include", *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    command = [sys.executable, "-m", "ziglang", "c++", "-target", target, "-std=c++20", "-O0",
               "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", *flags,
               *(f"-I{path}" for path in includes), "-c", str(source), "-o", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("target", TARGETS)
def test_the_cpu_module_compiles_for(target, tmp_path):
    sources = TARGETS[target]
    assert len(SOURCES) >= 8 and len(sources) >= 4, sources
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        done = list(pool.map(lambda s: (s, clang(target, s, tmp_path / f"{s.stem}.o")), sources))
    failed = [f"{source.name}:\n{result.stderr[-3000:]}" for source, result in done if result.returncode != 0]
    assert not failed, f"clang for {target}:\n" + "\n".join(failed)
    assert all((tmp_path / f"{s.stem}.o").stat().st_size > 0 for s in sources)


@pytest.mark.parametrize("target, floats", [("aarch64-linux-gnu", 4), ("aarch64-macos", 4), ("x86_64-linux-gnu", 8)])
def test_the_targets_vector_width_is_what_the_kernels_expect(target, floats, tmp_path):
    # Compiles only if at::vec::Vectorized<float> holds `floats` floats for the target: NEON's 4
    # on Arm (so the check above did compile the NEON kernels), the generic 8 on x86 without AVX.
    probe = tmp_path / "width.cpp"
    probe.write_text("#include <ATen/cpu/vec/vec.h>\n"
                     f"static_assert(at::vec::Vectorized<float>::size() == {floats});\n")
    result = clang(target, probe, tmp_path / "width.o")
    assert result.returncode == 0, result.stderr[-3000:]
