"""A Tensor weight decay (like a Tensor lr): the kernels read its value where they run, at every
step, so a schedule may change it in place -- between CUDA graph replays (tests/test_cuda_graphs.py)
or compiled steps -- without recapture or recompilation. Each backend against itself with the same
values given as numbers (exactly equal: the values are exact in float32), and against torch.optim
(foreach=False) with the number set in its param group before each step."""

from __future__ import annotations

import io

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import fused_opt
from cases import INTERPRETER

# Exact in float32, zero among them (the kernels then leave p and g alone), coupled and decoupled.
SCHEDULE = [0.5, 0.25, 0.0, 0.125, 0.375, 0.0625]
ALGOS = {
    "adamw": (fused_opt.AdamW, torch.optim.AdamW, {"lr": 0.01}),
    "adam-amsgrad": (fused_opt.Adam, torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    "rmsprop-centered-momentum": (fused_opt.RMSprop, torch.optim.RMSprop,
                                  {"lr": 0.01, "centered": True, "momentum": 0.5}),
    "sgd-nesterov": (fused_opt.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
}
BACKENDS = ["cpu", "reference", "cuda_sim",
            pytest.param("triton", marks=INTERPRETER)]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (33,), (), (4, 0), (130,)]
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _state(opt, params):
    return [(f"{i}.{k}", v) for i, p in enumerate(params) for k, v in sorted(opt.state[p].items())]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_weight_decay_tensor_changed_in_place_is_read_at_each_step(backend, algo):
    fused_cls, torch_cls, kwargs = ALGOS[algo]
    wd = torch.tensor(SCHEDULE[0])
    runs = {}
    for name in ("tensor", "number", "torch"):
        params = _params()
        if name == "torch":
            opt = torch_cls(params, foreach=False, weight_decay=SCHEDULE[0], **kwargs)
        else:
            opt = fused_cls(params, backend=backend, weight_decay=wd if name == "tensor" else SCHEDULE[0], **kwargs)
        runs[name] = (params, opt)
    for step, value in enumerate(SCHEDULE):
        wd.fill_(value)  # in place: the group keeps the same tensor object
        for name, (params, opt) in runs.items():
            if name != "tensor":
                opt.param_groups[0]["weight_decay"] = value
            _grads(params, step)
            opt.step()
        (tp, topt), (np_, nopt), (rp, ropt) = runs["tensor"], runs["number"], runs["torch"]
        assert topt.param_groups[0]["weight_decay"] is wd
        for p, q in zip(tp, np_):
            assert torch.equal(p, q), f"step {step}: param differs from the same weight decay given as a number"
        for (key, a), (_, b) in zip(_state(topt, tp), _state(nopt, np_)):
            assert torch.equal(a, b), f"step {step}: state {key}"
        for p, r in zip(tp, rp):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
        for (key, a), (_, b) in zip(_state(topt, tp), _state(ropt, rp)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}, {key}: {m}")


@pytest.mark.parametrize("backend", ["cpu", "reference", "cuda_sim"])
def test_compiled_step_reads_the_new_weight_decay_without_recompiling(backend):
    torch._dynamo.reset()
    eager_p, compiled_p = _params(), _params()
    wds = [torch.tensor(SCHEDULE[0]), torch.tensor(SCHEDULE[0])]
    eager = fused_opt.AdamW(eager_p, lr=0.01, weight_decay=wds[0], backend=backend)
    opt = fused_opt.AdamW(compiled_p, lr=0.01, weight_decay=wds[1], backend=backend)
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step():
        opt.step()

    frames = None
    for i, value in enumerate(SCHEDULE):
        for wd in wds:
            wd.fill_(value)
        _grads(eager_p, i)
        _grads(compiled_p, i)
        eager.step()
        step()
        if i == 1:
            frames = counter.frame_count
        for p, q in zip(eager_p, compiled_p):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert counter.frame_count == frames, "a weight decay changed in place must not recompile"


def test_a_weight_decay_tensor_resumes_from_a_checkpoint():
    params, wd = _params(), torch.tensor(0.25)
    opt = fused_opt.AdamW(params, lr=0.01, weight_decay=wd)
    _grads(params, 0)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin_p = [p.detach().clone().requires_grad_() for p in params]
    twin = fused_opt.AdamW(twin_p, lr=0.01, weight_decay=torch.tensor(0.0))
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    assert isinstance(twin.param_groups[0]["weight_decay"], torch.Tensor)
    assert twin.param_groups[0]["weight_decay"].item() == 0.25
    for step in (1, 2):
        _grads(params, step)
        _grads(twin_p, step)
        opt.step()
        twin.step()
    for p, q in zip(params, twin_p):
        assert torch.equal(p, q)


def test_a_weight_decay_tensor_must_hold_one_element():
    with pytest.raises(ValueError, match="Tensor weight_decay must be 1-element"):
        fused_opt.AdamW(_params(), weight_decay=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="Invalid weight_decay value"):
        fused_opt.SGD(_params(), lr=0.1, weight_decay=torch.tensor(-1.0))


@pytest.mark.parametrize("backend", ["cpu", "reference", "cuda_sim",
                                     pytest.param("triton", marks=INTERPRETER)])
def test_the_op_refuses_a_weight_decay_tensor_of_two_elements_before_writing(backend):
    from fused_opt import dispatch

    p, g = torch.ones(5), torch.full((5,), 0.5)
    before = p.clone()
    kernel = dispatch.select(backend, p.device, p.dtype).kernel("sgd")
    with pytest.raises(RuntimeError, match="weight_decay_tensor must be a one-element tensor"):
        kernel([p], [g], [], [], lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False,
               maximize=False, first_step=False, l1=0.0, l1_proximal=False,
               weight_decay_tensor=torch.tensor([0.1, 0.2]))
    assert torch.equal(p, before)
