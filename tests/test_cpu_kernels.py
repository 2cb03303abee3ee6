"""Every compiled variant of the CPU kernels (DEFAULT, AVX2, AVX512) that this CPU runs, against
the variant the ops pick, bit for bit, step after step, over the case table's CPU cases.

test_parity judges the picked variant against torch.optim and the float64 reference. The variants
share math.h and none fuses a multiply-add, so every element must come out the same: a difference
is a fault in one variant's vector loads and stores, its tails or its 16-bit conversions.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cases import DTYPES, STEPS, build_cases, build_master_cases, make_grads, make_params
from fused_opt import _C, info

VARIANTS = ("DEFAULT", "AVX2", "AVX512")
PICKED = _C.cpu_kernels()
# One test per family, dtype and master flag, each running every option and regularisation on
# the mixed layout (every loop's SIMD body and tails); of the large tensors (many chunks, threads:
# code the variants share) one case per family and dtype.
CASES = [c for c in build_cases(("cpu",)) + build_master_cases(("cpu",))
         if c.layout == "mixed" or (c.option in ("plain", "momentum") and c.reg == "elastic")]
GROUPS = sorted({(c.algo, c.dtype, c.master) for c in CASES})


def _variant_param(name):
    runs = name in _C.cpu_kernels_available()
    return pytest.param(name, id=name, marks=pytest.mark.skipif(not runs, reason=f"{name} kernels cannot run here"))


@pytest.fixture
def restore_kernels():
    yield
    _C.use_cpu_kernels(PICKED)


def _snapshot(opt, params):
    out = [(f"param{i}", p.detach().clone()) for i, p in enumerate(params)]
    for i, p in enumerate(params):
        out += [(f"param{i}.{k}", v.clone()) for k, v in sorted(opt.state[p].items())]
    return out


@pytest.mark.parametrize("variant", [_variant_param(v) for v in VARIANTS if v != PICKED])
@pytest.mark.parametrize("algo,dtype,master", [pytest.param(*g, id=f"{g[0]}-{g[1]}" + ("-master" if g[2] else ""))
                                                for g in GROUPS])
def test_variant_steps_like_the_picked_one_bit_for_bit(restore_kernels, variant, algo, dtype, master):
    for case in (c for c in CASES if (c.algo, c.dtype, c.master) == (algo, dtype, master)):
        init = make_params(case.layout, torch.float64)
        runs = {}
        for name in (variant, PICKED):
            params = [p.detach().to(DTYPES[dtype]).clone().requires_grad_() for p in init]
            runs[name] = (params, case.fused_cls(params, backend="cpu", **case.kwargs))
        for step in range(1, STEPS + 1):
            grads = make_grads(init, step)
            for name, (params, opt) in runs.items():
                for p, g in zip(params, grads):
                    p.grad = g.to(p.dtype)
                _C.use_cpu_kernels(name)
                opt.step()
            ours, picked = (_snapshot(opt, params) for params, opt in runs.values())
            for (key, x), (_, y) in zip(ours, picked, strict=True):
                assert torch.equal(x, y), f"{case.id} step {step} {key}: {variant} differs from {PICKED}"


def test_the_picked_variant_is_the_widest_this_cpu_runs():
    available = _C.cpu_kernels_available()
    assert available[0] == "DEFAULT" and list(available) == list(VARIANTS[:len(available)])
    assert PICKED == available[-1]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert PICKED in ("AVX2", "AVX512")  # where torch runs AVX kernels, ours are never the generic ones
    assert f"CPU kernels: {PICKED} (this CPU runs {', '.join(available)})" in info.report()


def test_info_says_when_the_kernels_run_on_one_thread(monkeypatch):
    # A build whose compiler had no OpenMP (setup.py's openmp_flags) loads and runs serially.
    line = next(x for x in info.report().splitlines() if x.startswith("CPU kernels:"))
    assert "one thread" not in line
    monkeypatch.setattr(_C, "cpu_kernels_threaded", False)
    serial = next(x for x in info.report().splitlines() if x.startswith("CPU kernels:"))
    assert serial.startswith(line) and "built without OpenMP, they run on one thread" in serial


def test_an_unknown_or_unrunnable_variant_is_refused(restore_kernels):
    with pytest.raises(ValueError, match=r"no CPU kernels named 'SSE4' \(AVX512, AVX2 or DEFAULT\)"):
        _C.use_cpu_kernels("SSE4")
    if PICKED != "AVX512":
        with pytest.raises(RuntimeError, match=rf"the AVX512 kernels cannot run here \(the widest this CPU and torch's CPU capability allow: {PICKED}\)"):
            _C.use_cpu_kernels("AVX512")
    assert _C.cpu_kernels() == PICKED


def test_torchs_capability_override_caps_ours_too():
    """ATEN_CPU_CAPABILITY=default makes torch run its generic kernels; ours follow, and wider
    ones are refused."""
    code = ("import fused_opt._C as C\nprint(C.cpu_kernels())\n"
            "try:\n    C.use_cpu_kernels('AVX2')\nexcept RuntimeError as e:\n    print(e)")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "DEFAULT"
    assert lines[1].startswith("fused_opt: the AVX2 kernels cannot run here (the widest this CPU and torch's "
                               "CPU capability allow: DEFAULT)"), out.stdout
