"""What `pip install` gets: the wheel must hold every module of the package (its subpackages too:
an editable install, as the tests use, would hide one left out), and the source distribution
every file needed to build the extension from it (headers included). Both are built here through
setuptools' PEP 517 hooks, from a copy of the source tree, with the extension builds switched off
(they take minutes and are checked by every other test)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a build leaves in a checkout, and what is not part of the package's sources.
NOT_SOURCES = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".pytest_cache",
                                     ".hypothesis", ".benchmarks", ".assets", "out", "finetune-out", ".whl")


def _files(folder: Path, *patterns: str) -> set[str]:
    return {str(f.relative_to(ROOT)) for p in patterns for f in folder.rglob(p) if "__pycache__" not in f.parts}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, set[str]]:
    """The file lists of a wheel and an sdist built from a copy of this checkout."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES)
    out = tmp / "dist"
    env = dict(os.environ, FUSED_OPT_CPU="0", FUSED_OPT_CUDA="0")
    names = {}
    for kind in ("wheel", "sdist"):  # a process each: the hooks run setup.py, which is not made to run twice
        hook = f"import sys, setuptools.build_meta as m; print('\\nbuilt', m.build_{kind}(sys.argv[1]))"
        run = subprocess.run([sys.executable, "-c", hook, str(out)], cwd=src, env=env, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        names[kind] = run.stdout.splitlines()[-1].split()[1]
    wheel_name, sdist_name = names["wheel"], names["sdist"]
    with zipfile.ZipFile(out / wheel_name) as wheel:
        wheel_files = set(wheel.namelist())
    with tarfile.open(out / sdist_name) as sdist:
        # Paths inside the sdist start with "fused_opt-<version>/".
        sdist_files = {m.name.split("/", 1)[1] for m in sdist.getmembers() if m.isfile() and "/" in m.name}
    return {"wheel": wheel_files, "sdist": sdist_files}


def test_the_wheel_holds_every_module_of_the_package(built):
    modules = _files(ROOT / "fused_opt", "*.py")
    assert {"fused_opt/triton/launch.py", "fused_opt/training/schedules.py"} <= modules  # the check sees subpackages
    missing = sorted(modules - built["wheel"])
    assert not missing, f"left out of the wheel: {missing}"
    assert any(".dist-info/" in f and f.endswith("/LICENSE") for f in built["wheel"]), "the wheel has no LICENSE"


def test_the_sdist_holds_everything_the_build_and_tests_need(built):
    needed = _files(ROOT / "csrc", "*") | _files(ROOT / "fused_opt", "*.py") | _files(ROOT / "tests", "*.py")
    needed = {f for f in needed if (ROOT / f).is_file() and not f.endswith(".so")}
    needed |= {"setup.py", "pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", "MANIFEST.in",
               "scripts/install.sh", "scripts/test.sh"}
    assert any(f.endswith(".h") for f in needed) and any(f.endswith(".cu") for f in needed)
    missing = sorted(needed - built["sdist"])
    assert not missing, f"left out of the sdist: {missing}"
