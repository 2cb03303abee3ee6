"""torch.compile(fullgraph=True) of a function that calls opt.step(), on every CPU backend: same
trajectory as eager, and a Tensor lr changed by an LR scheduler causes no recompilation."""

from __future__ import annotations

import os

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import fused_opt

# No UserWarning either: neither "scheduler stepped before optimizer" nor any from dynamo.
pytestmark = pytest.mark.filterwarnings("error::UserWarning")

BACKENDS = ["cpu", "reference", "cuda_sim",
            pytest.param("triton", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                             reason="needs TRITON_INTERPRET=1"))]
ALGOS = {"AdamW": {"l1": 0.01, "l1_mode": "proximal"}, "RMSprop": {"momentum": 0.9, "centered": True},
         "SGD": {"momentum": 0.9, "nesterov": True, "l1": 0.001}}


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _grads(model, step):
    g = torch.Generator().manual_seed(step)
    model.zero_grad()
    model(torch.randn(5, 6, generator=g)).pow(2).mean().backward()


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_matches_eager_without_recompiling(backend, algo):
    torch._dynamo.reset()
    eager_model, compiled_model = _model(), _model()
    kwargs = dict(lr=torch.tensor(0.01), backend=backend, **ALGOS[algo])
    eager = getattr(fused_opt, algo)(eager_model.parameters(), **kwargs)
    opt = getattr(fused_opt, algo)(compiled_model.parameters(), **{**kwargs, "lr": torch.tensor(0.01)})
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
