"""Backend choice: auto, the environment override, the fallback warning, and one call per group."""

from __future__ import annotations

import warnings

import pytest
import torch

import fused_opt
from fused_opt import dispatch, ops


def test_auto_picks_compiled_cpu_kernels_and_says_nothing():
    dispatch.clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select("auto", torch.device("cpu"), torch.float32).name == "cpu"
        assert dispatch.select("auto", torch.device("cpu"), torch.complex64).name == "cpu"
        assert dispatch.select("reference", torch.device("cpu"), torch.float64).name == "reference"
    backends = fused_opt.available_backends()
    assert list(backends) == ["cuda", "cpu", "triton", "reference", "cuda_sim"]
    assert backends["cpu"] is None and backends["reference"] is None
    assert (backends["cuda"] is None) == (torch.cuda.is_available() and ops.load_extensions()["fused_opt._C_cuda"] is None)


def test_a_backend_asked_for_a_dtype_it_does_not_take_says_so():
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot update torch.int64 params on cpu\. cpu: does not "
                                           r"support dtype torch.int64; cuda: runs on cuda tensors, not cpu"):
        dispatch.select("cpu", torch.device("cpu"), torch.int64)


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv("FUSED_OPT_BACKEND", "reference")
    assert dispatch.select("auto", torch.device("cpu"), torch.float32).name == "reference"
    assert dispatch.select("cpu", torch.device("cpu"), torch.float32).name == "cpu"  # explicit wins
    monkeypatch.setenv("FUSED_OPT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="Invalid backend: 'nonsense'"):
        dispatch.select("auto", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="Invalid backend: 'tpu'; expected one of auto, cuda, triton, cpu, reference"):
        dispatch.select("tpu", torch.device("cpu"), torch.float32)


def test_an_extension_that_fails_to_import_is_tried_once(monkeypatch):
    # The backends ask at every step; each failed import cost ~20 us.
    import importlib
    tried, real_import = [], importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *args: tried.append(name) or real_import(name, *args))
    monkeypatch.setitem(ops.EXTENSIONS, "fused_opt._C_absent", ops._NOT_TRIED)
    reasons = [ops.load_extensions()["fused_opt._C_absent"] for _ in range(3)]
    assert reasons[0].startswith("ModuleNotFoundError") and reasons == reasons[:1] * 3
    assert tried == ["fused_opt._C_absent"]


def test_an_extension_whose_library_is_missing_at_load_time_says_so(monkeypatch):
    import importlib
    real_import = importlib.import_module

    def load(name, *args):
        if name == "fused_opt._C_needs_cuda":
            raise OSError("libcudart.so.13: cannot open shared object file: No such file or directory")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", load)
    monkeypatch.setitem(ops.EXTENSIONS, "fused_opt._C_needs_cuda", ops._NOT_TRIED)
    assert ops.load_extensions()["fused_opt._C_needs_cuda"] == ("OSError: libcudart.so.13: cannot open shared object "
                                                               "file: No such file or directory")


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setitem(ops.EXTENSIONS, "fused_opt._C", "ImportError: simulated")
    monkeypatch.setattr(ops, "load_extensions", lambda: dict(ops.EXTENSIONS))
    dispatch.clear_cache()
    try:
        with pytest.warns(RuntimeWarning, match="simulated.*pip install --no-build-isolation") as warned:
            fused_opt.Adam([torch.zeros(3, dtype=torch.float64, requires_grad=True)])
        assert [w.filename for w in warned] == [__file__]  # it points at the user's line
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert dispatch.select("auto", torch.device("cpu"), torch.float64).name == "reference"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert dispatch.select("auto", torch.device("cpu"), torch.float64).name == "reference"
        with pytest.raises(RuntimeError, match="backend 'cpu' cannot update.*simulated"):
            dispatch.select("cpu", torch.device("cpu"), torch.float64)
    finally:
        dispatch.clear_cache()


STALE_BUILD = """
import importlib.util, sys, torch
lib = torch.library.Library("fused_opt", "DEF")
lib.define("adam_(Tensor(a!)[] params, float lr) -> ()")  # not the schema the kernels were built for
spec = importlib.util.spec_from_file_location("fused_opt._C", sys.argv[1])
try:
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
except ImportError as e:
    print("ImportError:", e)
"""


def test_extension_built_for_other_schemas_fails_its_import_not_the_process():
    """A stale build (kernels compiled against older op schemas) raises ImportError on import,
    which load_extensions turns into a fallback with a warning, instead of aborting the process."""
    import subprocess
    import sys

    path = ops.cpu_module().__file__
    out = subprocess.run([sys.executable, "-c", STALE_BUILD, path], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ImportError: fused_opt: registering the kernels failed" in out.stdout
    assert "adam_" in out.stdout


def test_one_op_call_per_device_dtype_group(monkeypatch):
    """One successful call per group (a mixed list is first offered whole, refused, then split)."""
    calls = []
    backend = dispatch._BY_NAME["cpu"]
    monkeypatch.setattr(dispatch, "_BY_NAME", dict(dispatch._BY_NAME))
    counting = dispatch.Backend(backend.name, backend.device_types, backend.dtypes, backend.unavailable,
                                lambda family: (lambda *a, **k: (ops.op(family)(*a, **k), calls.append(len(a[0])))))
    monkeypatch.setitem(dispatch._BY_NAME, "cpu", counting)
    dispatch.clear_cache()
    try:
        params = [torch.randn(n, requires_grad=True) for n in (3, 5, 7)] + [torch.randn(4, dtype=torch.float64,
                                                                                       requires_grad=True)]
        opt = fused_opt.AdamW(params, backend="cpu")
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        assert sorted(calls) == [1, 3]
    finally:
        dispatch.clear_cache()


def test_info_says_which_tensors_each_backend_takes(monkeypatch):
    from fused_opt import info

    lines = {line.split()[0]: line for line in info.report().splitlines() if line.startswith("  ")}
    assert lines["cpu"].endswith("available for cpu tensors")
    assert lines["cuda_sim"].endswith("available for cpu tensors")
    if fused_opt.ops.triton_reason() is None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert info.report().count("triton     available for cuda/cpu tensors") == 1
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert info.report().count("triton     available for cuda tensors") == 1


def _simulate_a_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    props = type("Props", (), {"name": name, "major": capability[0], "minor": capability[1]})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    dispatch.clear_cache()


@pytest.mark.parametrize("gpu,capability,picked", [
    ("Tesla T4", (7, 5), "triton"),  # no code for sm_75 in the default build: auto takes Triton
    ("NVIDIA L4", (8, 9), "cuda"),  # sm_80 machine code runs there
    ("NVIDIA B200", (10, 0), "cuda"),  # compute_90 PTX, compiled by the driver
    ("Tesla P100", (6, 0), "reference"),  # too old for Triton too: the reference, with a warning
])
def test_auto_takes_cuda_only_on_a_gpu_the_extension_has_code_for(monkeypatch, gpu, capability, picked):
    """Simulated GPUs: the CUDA extension's own list of code images (fatbin.py) against each GPU's
    compute capability; on a GPU it has no code for, backend="cuda" says how to rebuild."""
    if ops.load_extensions()["fused_opt._C_cuda"] is not None or fused_opt.ops.triton_reason() is not None:
        pytest.skip("needs the CUDA extension built and Triton installed")
    built = ", ".join(map(str, fused_opt.fatbin.images(ops.cuda_module().__file__)))
    if built != "sm_80, sm_90, compute_90 (PTX)":  # the default FUSED_OPT_CUDA_ARCHS, which CI builds
        pytest.skip(f"the CUDA extension was built for other architectures ({built})")
    _simulate_a_gpu(monkeypatch, gpu, capability)
    try:
        if picked == "reference":
            with pytest.warns(RuntimeWarning, match=r"slow pure-PyTorch reference .*not for this GPU \(Tesla P100"):
                assert dispatch.select("auto", torch.device("cuda"), torch.float32).name == picked
            with pytest.raises(RuntimeError, match=r"compute capability 7.0 or later, not for this one \(Tesla P100, "
                                                   r"sm_60\)"):
                dispatch.select("triton", torch.device("cuda"), torch.float32)
        else:
            assert dispatch.select("auto", torch.device("cuda"), torch.float32).name == picked
        if picked == "triton":
            with pytest.raises(RuntimeError, match=r"holds code for sm_80, sm_90, compute_90 \(PTX\), not for this GPU \(Tesla T4, "
                                                   r"sm_75\); rebuild it for this GPU with: FUSED_OPT_CUDA_ARCHS=75"):
                dispatch.select("cuda", torch.device("cuda"), torch.float32)
    finally:
        dispatch.clear_cache()


def test_a_cuda_extension_whose_code_list_cannot_be_read_is_left_to_the_launch(monkeypatch):
    """Not an ELF fatbin.py can read: auto takes the CUDA kernels, whose launch will say if they
    cannot run."""
    if ops.load_extensions()["fused_opt._C_cuda"] is not None:
        pytest.skip("needs the CUDA extension built")

    def unreadable(path):
        raise ValueError(f"{path}: not an ELF file")

    monkeypatch.setattr(fused_opt.fatbin, "images", unreadable)
    monkeypatch.setattr(dispatch, "_CUDA_IMAGES", [])
    _simulate_a_gpu(monkeypatch, "Tesla T4", (7, 5))
    try:
        assert dispatch.select("auto", torch.device("cuda"), torch.float32).name == "cuda"
        assert dispatch._CUDA_IMAGES == [[]]  # read once
    finally:
        dispatch.clear_cache()


def test_on_a_gpu_without_the_cuda_extension_auto_goes_on_and_cuda_says_why(monkeypatch):
    monkeypatch.setitem(ops.EXTENSIONS, "fused_opt._C_cuda", "ImportError: simulated")
    monkeypatch.setattr(ops, "load_extensions", lambda: dict(ops.EXTENSIONS))

    def absent():
        raise ImportError("simulated")

    monkeypatch.setattr(ops, "cuda_module", absent)
    monkeypatch.setattr(dispatch, "_CUDA_IMAGES", [])
    _simulate_a_gpu(monkeypatch, "NVIDIA H200", (9, 0))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the reference's, where Triton is not installed)
            picked = dispatch.select("auto", torch.device("cuda"), torch.float32).name
        assert picked == ("triton" if ops.triton_reason() is None else "reference")
        with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot update torch.float32 params on cuda\. cuda: "
                                               r"the compiled extension fused_opt._C_cuda is not available \(ImportError: "
                                               r"simulated\); rebuild it with: pip install --no-build-isolation -v \."):
            dispatch.select("cuda", torch.device("cuda"), torch.float32)
    finally:
        dispatch.clear_cache()


def test_without_triton_the_triton_backend_says_why(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "fused_opt.triton", None)  # what an import finds when Triton is missing
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (else the backend would only say it wants cuda tensors)
    dispatch.clear_cache()
    try:
        assert ops.triton_reason().startswith("Triton is not available (ModuleNotFoundError: import of fused_opt.triton")
        assert fused_opt.available_backends()["triton"] == ops.triton_reason()
        with pytest.raises(RuntimeError, match=r"backend 'triton' cannot update torch.float32 params on cpu\. "
                                               r"triton: Triton is not available \(ModuleNotFoundError"):
            dispatch.select("triton", torch.device("cpu"), torch.float32)
    finally:
        dispatch.clear_cache()
