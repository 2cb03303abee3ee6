"""Property tests (hypothesis): random shapes, dtypes, hyperparameters and options, every
available backend against the float64 reference (on the CPU), a few steps each: the CPU backends,
Triton (its interpreter here; on a GPU, with the CUDA backend, in `pytest -m cuda`)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_opt
from cases import INTERPRETER, ON_GPU

# For CPU tensors: the compiled kernels and the reference (Triton's interpreter has its own test).
BACKENDS = [b for b, why in fused_opt.available_backends().items() if why is None and b not in ("cuda", "triton")]
# (rtol, atol) of a backend in this dtype against float64, after 3 steps.
TOLERANCE = {torch.float32: (2e-5, 2e-6), torch.float64: (1e-10, 1e-12), torch.bfloat16: (4e-2, 4e-2)}

shapes = st.lists(st.lists(st.integers(0, 37), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)
common = {
    "lr": st.floats(1e-4, 0.1), "weight_decay": st.sampled_from([0.0, 0.01, 0.3]),
    "maximize": st.booleans(), "l1": st.sampled_from([0.0, 1e-3, 0.05]),
    "l1_mode": st.sampled_from(["subgradient", "proximal"]), "master_weights": st.booleans(),
}
algorithms = st.one_of(
    st.fixed_dictionaries({"cls": st.just(fused_opt.Adam), "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
                           "eps": st.floats(1e-10, 1e-3), "amsgrad": st.booleans(),
                           "decoupled_weight_decay": st.booleans(), **common}),
    st.fixed_dictionaries({"cls": st.just(fused_opt.RMSprop), "alpha": st.floats(0.5, 0.999), "eps": st.floats(1e-8, 1e-3),
                           "momentum": st.sampled_from([0.0, 0.5, 0.9]), "centered": st.booleans(), **common}),
    st.fixed_dictionaries({"cls": st.just(fused_opt.SGD), "momentum": st.sampled_from([0.0, 0.5, 0.9]),
                           "dampening": st.sampled_from([0.0, 0.2]), **common}),
)


# derandomize: CI must not flake; the examples still cover the space broadly and shrink on failure.
def _settings(examples):
    return settings(max_examples=examples, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


cases = dict(shapes=shapes, config=algorithms, dtype=st.sampled_from(list(TOLERANCE)), seed=st.integers(0, 2**16))


@_settings(120)
@given(backend=st.sampled_from(BACKENDS), **cases)
def test_matches_float64_reference(shapes, config, dtype, backend, seed):
    _check_against_reference(shapes, config, dtype, backend, seed, "cpu")


# The interpreter runs a launch in ~0.1 s: fewer examples, the same space.
@INTERPRETER
@_settings(60)
@given(**cases)
def test_triton_interpreter_matches_float64_reference(shapes, config, dtype, seed):
    _check_against_reference(shapes, config, dtype, "triton", seed, "cpu")


# Each new option set compiles a Triton kernel (a second or so), inside gpu_check.sh's minutes.
@pytest.mark.parametrize("backend", [pytest.param(b, marks=ON_GPU) for b in ("cuda", "triton")])
@_settings(30)
@given(**cases)
def test_gpu_backends_match_float64_reference(backend, shapes, config, dtype, seed):
    _check_against_reference(shapes, config, dtype, backend, seed, "cuda")


def _check_against_reference(shapes, config, dtype, backend, seed, device):
    config = dict(config)
    cls = config.pop("cls")
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ours_p = [t.to(device, dtype).clone().requires_grad_() for t in init]
    ref_p = [t.to(dtype).double().clone().requires_grad_() for t in init]  # same start, exactly representable
    ours = cls(ours_p, backend=backend, **config)
    ref = cls(ref_p, backend="reference", **config)
    for _ in range(3):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        for ps in (ours_p, ref_p):
            for p, gr in zip(ps, grads):
                p.grad = gr.to(dtype).to(p.device, p.dtype)
        ours.step()
        ref.step()
    rtol, atol = TOLERANCE[dtype]
    for p, q in zip(ours_p, ref_p):
        scale = max(1.0, q.abs().max().item()) if q.numel() else 1.0
        torch.testing.assert_close(p.double().cpu(), q, rtol=rtol, atol=atol * scale)
        for key, value in ours.state[p].items():
            expected = q if key == "master_param" else ref.state[q][key]  # bfloat16 with master_weights
            scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
            torch.testing.assert_close(value.double().cpu(), expected.double(), rtol=rtol, atol=atol * scale,
                                       msg=lambda m: f"{key}: {m}")
