"""Every case of the table, step after step: params and every state tensor against torch.optim
(foreach=False, same dtype; when there is no L1 term) and against the float64 reference; and the
CPU stand-ins of the GPU backends (cuda_sim, Triton's interpreter) against the CPU kernels, bit for
bit, as they write the same math in the same order with no FMA."""

from __future__ import annotations

import pytest
import torch

import fused_opt
from fused_opt import checks
from cases import (CASES, LOW_PRECISION_FACTOR, LOW_PRECISION_ULPS, STEPS, TOLERANCES, Case, assert_same_bits, make_grads,
                   make_params)


def _clone_params(params, dtype, device="cpu"):
    return [p.detach().to(device, dtype).clone().requires_grad_() for p in params]


def _state_tensors(opt, params):
    """[(name, tensor)] for every state tensor of every param, in a fixed order."""
    out = []
    for i, p in enumerate(params):
        for key in sorted(opt.state[p]):
            out.append((f"param{i}.{key}", opt.state[p][key].cpu()))
    return out


def _in_param_layout(name, state, params):
    """A state laid out like its dense param: where torch's follows a grad laid out otherwise (SGD's
    momentum buffer, a clone of the first grad), ours takes its param's layout at the next step."""
    if "." not in name:
        return False
    p = params[int(name.split(".")[0][len("param"):])]
    return checks.is_dense(p) and checks.same_layout(state, p)


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.to(p.device, p.dtype)


def _max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return (x.double() - ref.double()).abs().max().item()


def _resolution(dtype, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return torch.finfo(dtype).eps * max(scale, 1e-3) * LOW_PRECISION_ULPS


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_trajectory(case: Case):
    dtype = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}[case.dtype]
    init = make_params(case.layout, torch.float64)
    ours_p = _clone_params(init, dtype, case.device)
    oracle_p = _clone_params(init, torch.float64)
    ours = case.fused_cls(ours_p, backend=case.backend, **case.kwargs)
    oracle = case.fused_cls(oracle_p, backend="reference", **case.kwargs)
    # The yardstick: torch.optim in the same dtype, or (with L1, which torch lacks) our reference.
    yard_p = _clone_params(init, dtype, case.device)
    if case.has_l1:
        yard = case.fused_cls(yard_p, backend="reference", **case.kwargs)
    else:
        yard = case.torch_cls(yard_p, foreach=False, **case.torch_kwargs())

    # In 16-bit, torch's own result can overflow (fp16 Adam: eps=1e-8 rounds to 0); then our
    # reference in the same dtype (fp32 math, rounded once) is the yardstick instead.
    low_p = _clone_params(init, dtype)
    low = case.fused_cls(low_p, backend="reference", **case.kwargs)
    runs = ((ours_p, ours), (oracle_p, oracle), (yard_p, yard)) + (((low_p, low),) if dtype not in TOLERANCES else ())
    if case.bit_twin:  # the CPU kernels, which this backend must match bit for bit
        twin_p = _clone_params(init, dtype)
        twin = case.fused_cls(twin_p, backend=case.bit_twin, **case.kwargs)
        runs += ((twin_p, twin),)

    for step in range(1, STEPS + 1):
        grads = make_grads(init, step)
        for params, opt in runs:
            _set_grads(params, grads)
            opt.step()

        ours_t = [(f"param{i}", p.cpu()) for i, p in enumerate(ours_p)] + _state_tensors(ours, ours_p)
        oracle_t = [(f"param{i}", p) for i, p in enumerate(oracle_p)] + _state_tensors(oracle, oracle_p)
        yard_t = [(f"param{i}", p.cpu()) for i, p in enumerate(yard_p)] + _state_tensors(yard, yard_p)
        assert [n for n, _ in ours_t] == [n for n, _ in yard_t] == [n for n, _ in oracle_t], "state keys differ"
        if case.bit_twin:
            assert_same_bits(ours_t, [(f"param{i}", p) for i, p in enumerate(twin_p)] + _state_tensors(twin, twin_p),
                             f"{case.id} step {step}")
        for (name, x), (_, ref), (_, y) in zip(ours_t, oracle_t, yard_t):
            where = f"{case.id} step {step} {name}"
            if name.endswith(".step"):
                assert x.dtype == y.dtype and x.item() == y.item() == step, where
                continue
            assert x.dtype == y.dtype and x.shape == y.shape, where
            assert x.stride() == y.stride() or _in_param_layout(name, x, ours_p), where
            if dtype in TOLERANCES:  # 16-bit: judged over the whole list below
                rtol, atol = TOLERANCES[dtype]
                atol *= max(1.0, y.abs().max().item() if y.numel() else 0.0)  # ulps scale with the tensor
                torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{where} vs yardstick: {m}")
                torch.testing.assert_close(x.double(), ref, rtol=max(rtol, 1e-5 if dtype == torch.float32 else rtol),
                                           atol=atol * 10, msg=lambda m: f"{where} vs float64: {m}")
        if dtype not in TOLERANCES:
            low_t = [(f"param{i}", p) for i, p in enumerate(low_p)] + _state_tensors(low, low_p)
            _check_low_precision(case, step, dtype, ours_t, oracle_t, yard_t, low_t)


def _by_kind(named):
    """Concatenates all params, all exp_avgs, ... : 16-bit errors are judged over a whole list."""
    kinds = {}
    for name, t in named:
        kind = name.partition(".")[2] or "param"
        if kind != "step":
            kinds.setdefault(kind, []).append(t.detach().double().flatten())
    return {k: torch.cat(v) for k, v in kinds.items()}


def _check_low_precision(case, step, dtype, ours_t, oracle_t, yard_t, low_t):
    ours, ref, yard, low = _by_kind(ours_t), _by_kind(oracle_t), _by_kind(yard_t), _by_kind(low_t)
    for kind in ref:
        ours_err, yard_err = _max_error(ours[kind], ref[kind]), _max_error(yard[kind], ref[kind])
        if yard_err != yard_err:  # NaN: torch's own run broke down in this dtype
            yard_err = _max_error(low[kind], ref[kind])
        bound = LOW_PRECISION_FACTOR * yard_err + _resolution(dtype, ref[kind])
        assert ours_err <= bound, (f"{case.id} step {step} {kind}: error {ours_err:.3g} vs float64 > {bound:.3g} "
                                   f"(yardstick {yard_err:.3g})")


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
