"""Random training sessions against torch.optim (foreach=False), step after step: param lists that
mix float32 and float64 and contiguous, transposed and strided params (so the fast path, the
slow path and their checks all take part); steps with some grads missing; checkpoints through
torch.save and torch.load(weights_only=True) into a new optimizer; a param group added; lr
edited; steps refused for a broken state tensor, which must change nothing. Params and every
state tensor must follow torch's."""

from __future__ import annotations

import io
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_opt
from cases import INTERPRETER, ON_GPU

ALGORITHMS = [("Adam", {"amsgrad": True}), ("Adam", {"weight_decay": 0.1, "maximize": True}), ("AdamW", {}),
              ("RMSprop", {"centered": True, "momentum": 0.5}), ("RMSprop", {"weight_decay": 0.05}),
              ("SGD", {"momentum": 0.9, "nesterov": True}), ("SGD", {"momentum": 0.9, "dampening": 0.2}), ("SGD", {})]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}

param_specs = st.lists(st.tuples(st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
                                 st.sampled_from([torch.float32, torch.float64]),
                                 st.sampled_from(["contiguous", "transposed", "strided"])), min_size=1, max_size=5)
# A step names which of up to 10 params (5 and 5 added) get a grad.
grads = st.lists(st.booleans(), min_size=10, max_size=10)
step = st.tuples(st.just("step"), grads)
# A step whose state of one param with a grad (the n-th, cyclically) is broken: how (key to break
# -> new value; "tensor": its first state tensor, "step": its step counter).
BREAKS = {
    "wrong-shape": ("tensor", lambda t: torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)),
    "wrong-dtype": ("tensor", lambda t: t.to(torch.float64 if t.dtype == torch.float32 else torch.float32)),
    "expanded": ("tensor", lambda t: torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)),
    "on-meta": ("tensor", lambda t: t.to("meta")),
    "not-a-tensor": ("tensor", lambda t: 0.5),
    "step-of-two": ("step", lambda t: torch.zeros(2)),
    "sparse-step": ("step", lambda t: t.to_sparse()),
}
refused = st.tuples(st.just("refused-step"), grads, st.integers(0, 9), st.sampled_from(sorted(BREAKS)))
actions = st.lists(st.one_of(step, refused, st.tuples(st.sampled_from(["checkpoint", "add-group", "halve-lr"]))),
                   min_size=1, max_size=8)


def _make(spec, values: torch.Tensor, device: str) -> torch.Tensor:
    shape, dtype, layout = spec
    values = values.to(device, dtype).clone()  # each run's own copy: `values` starts the other run too
    if layout == "transposed" and len(shape) > 1:  # dense, not contiguous
        return values.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    if layout == "strided":  # every other row of a larger tensor: not dense, the slow path's copies
        base = torch.zeros(shape[0] * 2, *shape[1:], dtype=dtype, device=device)
        base[::2] = values
        return base[::2].requires_grad_()
    return values.requires_grad_()


def _refused_step(opt, params, n: int, how: str) -> None:
    """Breaks the state of a param with a grad, steps, expects the step refused with params and
    optimizer.state unchanged (no state made either), and puts the state back."""
    kind, make = BREAKS[how]
    keys = {p: sorted(k for k in opt.state.get(p, {}) if (k == "step") == (kind == "step")) for p in params}
    targets = [p for p in params if p.grad is not None and keys[p]]
    if not targets:
        return
    target = targets[n % len(targets)]
    state, key = opt.state[target], keys[target][0]
    good = state[key]
    if how == "expanded" and good.numel() < 2:
        return  # one element: nothing shares memory, the step would be right to run
    before = [p.detach().clone() for p in params], {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    state[key] = make(good)
    with pytest.raises((RuntimeError, TypeError), match=re.escape(f"state['{key}'] of param_groups[")):
        opt.step()
    state[key] = good  # put back before the comparison: everything else must be as it was
    assert all(torch.equal(p, saved) for p, saved in zip(params, before[0]))
    assert set(opt.state) == set(before[1])
    for p, saved in before[1].items():
        assert opt.state[p].keys() == saved.keys() and all(torch.equal(opt.state[p][k], v) for k, v in saved.items())


def _session(backend, algorithm, specs, extra_specs, actions, seed, device="cpu"):
    name, kwargs = algorithm
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(s[0], generator=g, dtype=torch.float64) for s in specs + extra_specs]
    runs = {}
    for impl, cls, options in (("ours", getattr(fused_opt, name), {"backend": backend}),
                               ("torch", getattr(torch.optim, name), {"foreach": False})):
        grads = torch.Generator().manual_seed(seed)
        params = [_make(s, v, device) for s, v in zip(specs, values)]
        opt = cls(params, lr=0.05, **kwargs, **options)
        for action, *args in actions:
            if action in ("step", "refused-step"):
                for p, present in zip(params, args[0]):
                    p.grad = (torch.randn(p.shape, generator=grads, dtype=torch.float64).to(p.device, p.dtype)
                              if present else None)
                if action == "step":
                    opt.step()
                elif impl == "ours":  # torch's does not step
                    _refused_step(opt, params, *args[1:])
            elif action == "checkpoint":  # saved, loaded into a new optimizer over the same params
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                buffer.seek(0)
                saved = torch.load(buffer, weights_only=True)
                opt = cls([{"params": group["params"]} for group in opt.param_groups], lr=0.05, **kwargs, **options)
                opt.load_state_dict(saved)
            elif action == "add-group" and len(opt.param_groups) == 1:
                new = [_make(s, v, device) for s, v in zip(extra_specs, values[len(specs):])]
                opt.add_param_group({"params": new})
                params = params + new
            elif action == "halve-lr":
                for group in opt.param_groups:
                    group["lr"] *= 0.5
        runs[impl] = (params, opt)
    (ours_p, ours), (torch_p, theirs) = runs["ours"], runs["torch"]
    for i, (p, q) in enumerate(zip(ours_p, torch_p)):
        tol = TOLERANCE[q.dtype]
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=lambda m: f"param {i}: {m}")
        assert set(ours.state[p]) == set(theirs.state[q]), f"param {i}: state keys"
        for key, value in theirs.state[q].items():
            mine = ours.state[p][key]
            if key == "step":  # GPU params count on the GPU (as in torch's fused optimizers), torch's on the host
                mine, value = mine.cpu(), value.cpu()
            torch.testing.assert_close(mine, value, rtol=tol, atol=tol, msg=lambda m: f"{i}.{key}: {m}")


SESSION = dict(algorithm=st.sampled_from(ALGORITHMS), specs=param_specs, extra_specs=param_specs, actions=actions,
               seed=st.integers(0, 2**16))


@pytest.mark.parametrize("backend", ["cpu", "cuda_sim", "reference"])
@settings(max_examples=200, deadline=None, derandomize=True)
@given(**SESSION)
def test_a_random_session_follows_torch_optim(backend, algorithm, specs, extra_specs, actions, seed):
    _session(backend, algorithm, specs, extra_specs, actions, seed)


@INTERPRETER
@settings(max_examples=40, deadline=None, derandomize=True)
@given(**SESSION)
def test_a_random_session_follows_torch_optim_on_triton(algorithm, specs, extra_specs, actions, seed):
    _session("triton", algorithm, specs, extra_specs, actions, seed)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=ON_GPU) for b in ("cuda", "triton")])
@settings(max_examples=30, deadline=None, derandomize=True)
@given(**SESSION)
def test_a_random_session_follows_torch_optim_on_a_gpu(backend, algorithm, specs, extra_specs, actions, seed):
    _session(backend, algorithm, specs, extra_specs, actions, seed, device="cuda")
