"""master_weights=True: float32 master copies of 16-bit params, float32 states, params rounded
once per step -- against the reference backend (float32 math on the master), against
torch.optim run in float32 on the same values, through checkpoints, and refused where it
cannot apply."""

from __future__ import annotations

import io

import pytest
import torch

import fused_opt
from cases import (ALGORITHMS, INTERPRETER, MASTER_CASES, STEPS, TOLERANCES, Case, assert_same_bits, make_grads,
                   make_params)
from fused_opt.optimizers import MASTER_KEY

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


def _params(init, dtype, device="cpu"):
    return [p.detach().to(device, dtype).clone().requires_grad_() for p in init]


def _named(opt, params):
    """[(name, tensor)]: each param, then its states by key."""
    return [(f"param{i}", p) for i, p in enumerate(params)] + [
        (f"param{i}.{k}", v) for i, p in enumerate(params) for k, v in sorted(opt.state[p].items())]


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.to(p.device, p.dtype)
    opt.step()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in MASTER_CASES])
def test_master_trajectory(case: Case):
    """Every step: the same state keys, float32 states and master, the master within float32
    tolerance of the reference, and each param exactly its master rounded to the param dtype."""
    dtype = DTYPES[case.dtype]
    init = make_params(case.layout, torch.float64)
    ours_p, ref_p = _params(init, dtype, case.device), _params(init, dtype)
    ours = case.fused_cls(ours_p, backend=case.backend, **case.kwargs)
    ref = case.fused_cls(ref_p, backend="reference", **case.kwargs)
    if case.bit_twin:
        twin_p = _params(init, dtype)
        twin = case.fused_cls(twin_p, backend=case.bit_twin, **case.kwargs)
    rtol, atol = TOLERANCES[torch.float32]
    for step in range(1, STEPS + 1):
        grads = make_grads(init, step)
        _step(ours, ours_p, grads)
        _step(ref, ref_p, grads)
        if case.bit_twin:
            _step(twin, twin_p, grads)
            assert_same_bits(_named(ours, ours_p), _named(twin, twin_p), f"{case.id} step {step}")
        for i, (p, q) in enumerate(zip(ours_p, ref_p)):
            where = f"{case.id} step {step} param{i}"
            mine, theirs = ours.state[p], ref.state[q]
            assert sorted(mine) == sorted(theirs) and MASTER_KEY in mine, where
            for key in mine:
                x, y = mine[key].cpu(), theirs[key]
                if key == "step":
                    assert x.item() == y.item() == step, where
                    continue
                assert x.dtype == torch.float32 and x.shape == p.shape, f"{where}.{key}"
                scale = max(1.0, y.abs().max().item() if y.numel() else 0.0)
                torch.testing.assert_close(x, y, rtol=rtol, atol=atol * scale, msg=lambda m: f"{where}.{key}: {m}")
            assert torch.equal(p.detach().cpu(), mine[MASTER_KEY].cpu().to(dtype)), f"{where}: param != its master"


@pytest.mark.parametrize("algo,option", [(a, o) for a, spec in ALGORITHMS.items() for o in spec[3]])
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_master_follows_torch_in_float32(algo, option, dtype):
    """The master copy's trajectory is torch.optim's, run in float32 on the same 16-bit values
    (rounded params to start, the same 16-bit grads), and so are the states."""
    fused_cls, torch_cls, base, variants = ALGORITHMS[algo]
    kwargs = {**base, **variants[option]}
    init = [t.to(DTYPES[dtype]) for t in make_params("mixed", torch.float64)]
    ours_p = _params(init, DTYPES[dtype])
    yard_p = _params(init, torch.float32)
    ours = fused_cls(ours_p, master_weights=True, backend="cpu", **kwargs)
    yard = torch_cls(yard_p, foreach=False, **kwargs)
    rtol, atol = TOLERANCES[torch.float32]
    for step in range(1, STEPS + 1):
        grads = [g.to(DTYPES[dtype]) for g in make_grads(init, step)]
        _step(ours, ours_p, grads)
        _step(yard, yard_p, grads)
        for p, q in zip(ours_p, yard_p):
            scale = max(1.0, q.abs().max().item() if q.numel() else 0.0)
            torch.testing.assert_close(ours.state[p][MASTER_KEY], q.detach(), rtol=rtol, atol=atol * scale)
            for key, value in yard.state[q].items():
                if key != "step":
                    torch.testing.assert_close(ours.state[p][key], value, rtol=rtol, atol=atol * max(
                        1.0, value.abs().max().item() if value.numel() else 0.0))


@pytest.mark.parametrize("backend", ["cpu", "cuda_sim", "reference"])
def test_small_updates_accumulate(backend):
    """The point of master weights: 1,000 updates of 1e-4 move a bfloat16 param of 1.0 by ~0.1,
    where bfloat16 alone (spacing 2**-7 above 1, 2**-8 below) rounds every one of them away."""
    plain, master = torch.ones(64, dtype=torch.bfloat16, requires_grad=True), torch.ones(64, dtype=torch.bfloat16,
                                                                                       requires_grad=True)
    opts = [fused_opt.SGD([plain], lr=1e-4, backend=backend),
            fused_opt.SGD([master], lr=1e-4, backend=backend, master_weights=True)]
    for _ in range(1000):
        for p, opt in zip((plain, master), opts):
            p.grad = torch.ones_like(p)
            opt.step()
    assert torch.equal(plain, torch.ones_like(plain))
    expected = torch.full((64,), 1.0, dtype=torch.float32)
    for _ in range(1000):
        expected -= torch.tensor(1e-4, dtype=torch.float32)
    torch.testing.assert_close(opts[1].state[master][MASTER_KEY], expected, rtol=0, atol=1e-6)
    assert torch.equal(master, expected.to(torch.bfloat16))


def _run(opt_cls, params, steps, seed, **kwargs):
    opt = opt_cls(params, master_weights=True, backend="cpu", **kwargs)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        _step(opt, params, [torch.randn(p.shape, generator=g) for p in params])
    return opt


@pytest.mark.parametrize("opt_cls,kwargs", [(fused_opt.AdamW, {"amsgrad": True}), (fused_opt.SGD, {"momentum": 0.9}),
                                            (fused_opt.RMSprop, {"centered": True, "momentum": 0.5})])
def test_checkpoint_resumes_exactly_in_float32(opt_cls, kwargs):
    """A saved state_dict keeps the float32 master and states (load_state_dict would otherwise
    cast them to bfloat16), loads with weights_only=True, and the resumed run is bit-identical."""
    init = [torch.randn(300), torch.randn(7, 5)]
    full = [t.to(torch.bfloat16).requires_grad_() for t in init]
    opt = _run(opt_cls, full, 3, seed=0, lr=1e-2, **kwargs)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in full], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = opt_cls(resumed, master_weights=True, backend="cpu", lr=1e-2, **kwargs)
    opt2.load_state_dict(saved["opt"])
    for p, q in zip(full, resumed):
        for key, value in opt.state[p].items():
            assert opt2.state[q][key].dtype == value.dtype and torch.equal(opt2.state[q][key], value), key
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in full]
        _step(opt, full, grads)
        _step(opt2, resumed, grads)
    for p, q in zip(full, resumed):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(opt2.state[q][key], value), key


def test_torch_checkpoint_gains_a_master_and_switching_off_drops_it():
    """A torch.optim state_dict (bfloat16 states, no master) loads into master_weights=True:
    the states become float32 and the master starts from the param. Switched off mid-run, the
    master goes and the states return to the param dtype."""
    p = torch.randn(50).to(torch.bfloat16).requires_grad_()
    stock = torch.optim.Adam([p], lr=1e-2)
    p.grad = torch.randn(50).to(torch.bfloat16)
    stock.step()
    q = p.detach().clone().requires_grad_()
    ours = fused_opt.Adam([q], lr=1e-2, master_weights=True, backend="cpu")
    ours.load_state_dict(stock.state_dict())
    assert ours.state[q]["exp_avg"].dtype == torch.bfloat16  # as loaded; converted at the next step
    before = {k: v.clone() for k, v in ours.state[q].items()}
    q.grad = torch.randn(50).to(torch.bfloat16)
    grad = q.grad.float()
    ours.step()
    state = ours.state[q]
    assert {k: v.dtype for k, v in state.items()} == {"step": torch.float32, "exp_avg": torch.float32,
                                                       "exp_avg_sq": torch.float32, MASTER_KEY: torch.float32}
    # The step ran from the converted state: exp_avg = lerp(old, g, 0.1) in float32.
    torch.testing.assert_close(state["exp_avg"], torch.lerp(before["exp_avg"].float(), grad, 0.1))
    assert torch.equal(q, state[MASTER_KEY].to(torch.bfloat16))

    ours.param_groups[0]["master_weights"] = False
    q.grad = torch.randn(50).to(torch.bfloat16)
    ours.step()
    assert MASTER_KEY not in ours.state[q]
    assert ours.state[q]["exp_avg"].dtype == ours.state[q]["exp_avg_sq"].dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["cpu", "cuda_sim", "reference"])
def test_a_checkpoint_saved_after_switching_off_holds_no_stale_master(backend):
    """Saved after master weights were switched off but before a step dropped the copy, a
    checkpoint still holds it (torch's loader then casts it to bfloat16). Loading drops it, as the
    step would have, so that switching master weights on again starts a new copy from the param
    instead of failing on a bfloat16 master. (A random table sequence found this.)"""
    p = torch.randn(50).to(torch.bfloat16).requires_grad_()
    ours = fused_opt.Adam([p], lr=1e-2, master_weights=True, backend=backend)
    p.grad = torch.randn(50).to(torch.bfloat16)
    ours.step()
    ours.param_groups[0]["master_weights"] = False
    saved = ours.state_dict()
    assert MASTER_KEY in saved["state"][0]
    ours.load_state_dict(saved)
    assert MASTER_KEY not in ours.state[p]
    ours.param_groups[0]["master_weights"] = True
    before = {k: v.clone() for k, v in ours.state[p].items()}
    start = p.detach().float()
    p.grad = torch.randn(50).to(torch.bfloat16)
    ours.step()
    state = ours.state[p]
    assert state[MASTER_KEY].dtype == state["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(state["exp_avg"], torch.lerp(before["exp_avg"].float(), p.grad.float(), 0.1))
    step_size = 1e-2 / (1 - 0.9 ** 2)
    denom = (state["exp_avg_sq"].sqrt() / (1 - 0.999 ** 2) ** 0.5) + 1e-8
    torch.testing.assert_close(state[MASTER_KEY], start - step_size * state["exp_avg"] / denom)  # the new copy: from p
    assert torch.equal(p, state[MASTER_KEY].to(torch.bfloat16))


def test_float32_params_have_no_master():
    a, b = torch.randn(20, requires_grad=True), None
    b = a.detach().clone().requires_grad_()
    with_flag = fused_opt.Adam([a], master_weights=True, backend="cpu")
    without = fused_opt.Adam([b], backend="cpu")
    for opt, p in ((with_flag, a), (without, b)):
        _step(opt, [p], [torch.ones(20)])
    assert MASTER_KEY not in with_flag.state[a] and torch.equal(a, b)


@pytest.mark.parametrize("op_name", ["adam_", "cuda_sim_adam_", pytest.param("triton_adam_", marks=INTERPRETER)])
def test_op_refuses_bad_master_lists_before_writing(op_name):
    if op_name.startswith("triton"):
        assert fused_opt.ops.triton_reason() is None
    op = getattr(torch.ops.fused_opt, op_name)

    def call(params, states, masters):
        steps = [torch.tensor(0.0) for _ in params]
        op(params, [torch.ones_like(p) for p in params], states[0], states[1], [], masters, steps, lr=0.1, beta1=0.9,
           beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False, decoupled_weight_decay=False,
           l1=0.0, l1_proximal=False)
        return steps

    f32 = [torch.randn(8)]
    snapshot = f32[0].clone()
    with pytest.raises(RuntimeError, match="master_params are for float16 and bfloat16 params"):
        call(f32, ([torch.zeros(8)], [torch.zeros(8)]), [torch.zeros(8)])
    assert torch.equal(f32[0], snapshot)
    half = [torch.randn(8).to(torch.bfloat16)]
    snapshot = half[0].clone()
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] has dtype .* but must be .*float32 master weights"):
        call(half, ([torch.zeros(8, dtype=torch.bfloat16)], [torch.zeros(8)]), [torch.zeros(8)])
    with pytest.raises(RuntimeError, match=r"master_params\[0\] has dtype"):
        call(half, ([torch.zeros(8)], [torch.zeros(8)]), [torch.zeros(8, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match="expected 0 or 1 tensors in master_params, got 2"):
        call(half, ([torch.zeros(8)], [torch.zeros(8)]), [torch.zeros(8), torch.zeros(8)])
    assert torch.equal(half[0], snapshot)
