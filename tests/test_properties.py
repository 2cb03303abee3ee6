"""Property tests (hypothesis): random shapes, dtypes, hyperparameters and options, every
available backend against the float64 reference (on the CPU), a few steps each: the CPU backends,
Triton (its interpreter here; on a GPU, with the CUDA backend, in `pytest -m cuda`). On the CPU,
cuda_sim and Triton's interpreter must also give the CPU kernels' bits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_opt
from cases import INTERPRETER, ON_GPU, assert_same_bits

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
    """Three runs from the same start on the same grads: `backend`, the reference in `dtype` (on the CPU)
    and the reference in float64. As flash-attention's tests do, our error against float64 may be at
    most twice the same-precision reference's, element by element, plus the dtype's tolerance: a
    gradient that cancels its weight decay to a few roundings' worth leaves any 16-bit run far from
    float64 (in any implementation), and is no bug."""
    config = dict(config)
    cls = config.pop("cls")
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    start = {"ours": [t.to(device, dtype) for t in init], "low": [t.to(dtype) for t in init],
             "ref": [t.to(dtype).double() for t in init]}  # the same start, exactly representable
    backends = {"ours": backend, "low": "reference", "ref": "reference"}
    if device == "cpu" and backend in ("cuda_sim", "triton"):  # the GPU backends' stand-ins: the CPU kernels' bits
        start["twin"], backends["twin"] = start["low"], "cpu"
    params = {run: [t.clone().requires_grad_() for t in ts] for run, ts in start.items()}
    opts = {run: cls(params[run], backend=backends[run], **config) for run in params}
    for _ in range(3):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        for run, opt in opts.items():
            for p, gr in zip(params[run], grads):
                p.grad = gr.to(dtype).to(p.device, p.dtype)
            opt.step()
    if "twin" in opts:
        named = {run: [(f"param{i}.{k}", v) for i, p in enumerate(params[run])
                       for k, v in [("param", p), *sorted(opts[run].state[p].items())]] for run in ("ours", "twin")}
        assert_same_bits(named["ours"], named["twin"], f"{backend} vs cpu")
    rtol, atol = TOLERANCE[dtype]
    for i, q in enumerate(params["ref"]):
        ours, low, ref = ({"param": params[run][i], **opts[run].state[params[run][i]]} for run in ("ours", "low", "ref"))
        for key, value in ours.items():
            expected = ref.get(key, q).double()  # float64 params keep no master copy: the param is it
            scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
            allowed = 2 * (low[key].double() - expected).abs() + rtol * expected.abs() + atol * scale
            error = (value.detach().double().cpu() - expected).abs()
            off = (error > allowed).nonzero()
            assert not len(off), (f"{key} (param {i}): {len(off)} of {error.numel()} elements off, first at "
                                  f"{tuple(off[0].tolist())}: {value[tuple(off[0])]}"
                                  f" against {expected[tuple(off[0])]} (same-precision reference: {low[key][tuple(off[0])]})")
