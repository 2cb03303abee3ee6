"""torch.compile(fullgraph=True) of a function that calls opt.step(), on every backend (the GPU ones
when a GPU is present): same trajectory as eager, and a Tensor lr changed by an LR scheduler causes
no recompilation."""

from __future__ import annotations

import re

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import fused_opt
from cases import INTERPRETER, ON_GPU

# No UserWarning either: neither "scheduler stepped before optimizer" nor any from dynamo.
pytestmark = pytest.mark.filterwarnings("error::UserWarning")

# (backend, device of the params, device of the Tensor lr): on the GPU, lr on the device (as in a
# captured step) or on the host (the usual `lr=torch.tensor(...)`).
BACKENDS = [pytest.param(("cpu", "cpu", "cpu"), id="cpu"), pytest.param(("reference", "cpu", "cpu"), id="reference"),
            pytest.param(("cuda_sim", "cpu", "cpu"), id="cuda_sim"),
            pytest.param(("triton", "cpu", "cpu"), marks=INTERPRETER, id="triton")]
BACKENDS += [pytest.param((backend, "cuda", lr_device), marks=ON_GPU, id=f"{backend}-gpu-lr-{lr_device}")
             for backend in ("cuda", "triton") for lr_device in ("cuda", "cpu")]
ALGOS = {"AdamW": {"l1": 0.01, "l1_mode": "proximal"}, "RMSprop": {"momentum": 0.9, "centered": True},
         "SGD": {"momentum": 0.9, "nesterov": True, "l1": 0.001}}


def _model(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(device)


def _grads(model, step):
    g = torch.Generator().manual_seed(step)
    model.zero_grad()
    x = torch.randn(5, 6, generator=g).to(next(model.parameters()).device)
    model(x).pow(2).mean().backward()


def _groups(model, groups):
    """One param group, or two as most training scripts make them: weights with decay, biases without."""
    if groups == 1:
        return model.parameters()
    return [{"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": 0.01},
            {"params": [p for p in model.parameters() if p.dim() == 1], "weight_decay": 0.0}]


@pytest.mark.parametrize("groups", [1, 2], ids=["one-group", "two-groups"])
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_matches_eager_without_recompiling(backend, algo, groups):
    backend, device, lr_device = backend
    torch._dynamo.reset()
    eager_model, compiled_model = _model(device=device), _model(device=device)
    kwargs = dict(lr=torch.tensor(0.01, device=lr_device), backend=backend, **ALGOS[algo])
    eager = getattr(fused_opt, algo)(_groups(eager_model, groups), **kwargs)
    opt = getattr(fused_opt, algo)(_groups(compiled_model, groups),
                                   **{**kwargs, "lr": torch.tensor(0.01, device=lr_device)})
    schedulers = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7) for o in (eager, opt)]
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step():
        opt.step()

    frames_after_warmup = None
    for i in range(6):
        _grads(eager_model, i)
        _grads(compiled_model, i)
        eager.step()
        step()
        for s in schedulers:
            s.step()
        if i == 1:  # step 1 creates state, step 2 sees it: both may compile
            frames_after_warmup = counter.frame_count
        for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.01 * 0.7**6)
    assert counter.frame_count == frames_after_warmup, "a changed lr must not recompile"


@pytest.mark.parametrize("backend", ["cpu", "cuda_sim"])
def test_compiled_step_with_master_weights(backend):
    """bfloat16 params with float32 master copies: the first compiled step creates the copies and
    float32 states in the graph, and the trajectory is eager's, without recompiling."""
    torch._dynamo.reset()
    eager_model, compiled_model = _model().to(torch.bfloat16), _model().to(torch.bfloat16)
    kwargs = dict(lr=torch.tensor(0.01), backend=backend, master_weights=True, weight_decay=0.1)
    eager = fused_opt.AdamW(eager_model.parameters(), **kwargs)
    opt = fused_opt.AdamW(compiled_model.parameters(), **{**kwargs, "lr": torch.tensor(0.01)})
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step():
        opt.step()

    for i in range(4):
        for model in (eager_model, compiled_model):
            g = torch.Generator().manual_seed(i)
            model.zero_grad()
            model(torch.randn(5, 6, generator=g).to(torch.bfloat16)).float().pow(2).mean().backward()
        eager.step()
        step()
        if i == 1:
            frames_after_warmup = counter.frame_count
        for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
            assert torch.equal(q, p)
            assert opt.state[q]["master_param"].dtype == opt.state[q]["exp_avg"].dtype == torch.float32
            torch.testing.assert_close(opt.state[q]["master_param"], eager.state[p]["master_param"], rtol=0, atol=0)
    assert counter.frame_count == frames_after_warmup


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_skips_nonfinite_grads(backend):
    """skip_nonfinite=True in a compiled step, with two param groups: a step whose grads hold a NaN
    changes nothing and is counted (the counter lives in a dict, which a compiled step may update),
    and the trajectory is eager's."""
    backend, device, lr_device = backend
    torch._dynamo.reset()
    eager_model, compiled_model = _model(device=device), _model(device=device)
    kwargs = dict(lr=torch.tensor(0.01, device=lr_device), backend=backend, skip_nonfinite=True)
    eager = fused_opt.AdamW(_groups(eager_model, 2), **kwargs)
    opt = fused_opt.AdamW(_groups(compiled_model, 2), **{**kwargs, "lr": torch.tensor(0.01, device=lr_device)})
    step = torch.compile(opt.step, fullgraph=True)
    for i in range(4):
        _grads(eager_model, i)
        _grads(compiled_model, i)
        if i == 2:
            for model in (eager_model, compiled_model):
                model[2].bias.grad[0] = float("nan")
        before = [p.detach().clone() for p in compiled_model.parameters()]
        eager.step()
        step()
        assert (i == 2) == all(torch.equal(p, b) for p, b in zip(compiled_model.parameters(), before))
        for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert opt.skipped_steps == eager.skipped_steps == 1


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "reference"])  # the reference is torch's ops
def test_inductor_runs_the_op_in_place(backend, algo):
    """torch.compile's default backend (Inductor) functionalizes the mutating op, then must put it
    back in place: the compiled code calls it on the params and states themselves, never on copies
    written back afterwards (which would move every byte twice), and the trajectory is eager's."""
    from torch._inductor.utils import run_and_get_code

    backend, device, lr_device = backend
    torch._dynamo.reset()
    eager_model, compiled_model = _model(device=device), _model(device=device)
    kwargs = dict(lr=torch.tensor(0.01, device=lr_device), backend=backend, **ALGOS[algo])
    eager = getattr(fused_opt, algo)(_groups(eager_model, 2), **kwargs)
    opt = getattr(fused_opt, algo)(_groups(compiled_model, 2), **{**kwargs, "lr": torch.tensor(0.01, device=lr_device)})
    step = torch.compile(opt.step, fullgraph=True)
    codes = []
    for i in range(3):
        _grads(eager_model, i)
        _grads(compiled_model, i)
        eager.step()
        codes += run_and_get_code(step)[1]
        for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
            for key, value in eager.state[p].items():
                torch.testing.assert_close(opt.state[q][key], value, rtol=1e-6, atol=1e-7)
    # run_and_get_code starts afresh each time: the first step's graph (it makes the state), then the usual one twice
    assert len(codes) == 3
    op = f"torch.ops.fused_opt.{'' if backend == 'cpu' else backend + '_'}{algo.lower().replace('adamw', 'adam')}_"
    for i, code in enumerate(codes):
        calls = [line for line in code.splitlines() if op in line]
        assert len(calls) == 2, code  # one a param group
        assert re.search(r"clone|copy", code) is None, code  # Inductor's copies in and back, had it not reinplaced
        if i > 0:  # the usual step: every list the op gets is the graph's inputs, the real tensors
            assert all(re.search(r"\bbuf\d", call) is None for call in calls), calls


def test_tensor_betas_are_refused_clearly_under_compile():
    # The kernels take betas as numbers, read from Tensor betas on the host in eager mode only.
    torch._dynamo.reset()
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = fused_opt.Adam(model.parameters(), lr=torch.tensor(0.01), betas=(torch.tensor(0.9), torch.tensor(0.99)),
                         backend="cpu")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(Exception, match="Tensor betas are read on the host at each step, which a compiled step"):
        torch.compile(opt.step, fullgraph=True)()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and not opt.state
