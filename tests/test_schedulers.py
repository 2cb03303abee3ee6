"""LR schedulers drive fused_opt exactly as they drive torch.optim (lr read at every step)."""

from __future__ import annotations

import pytest
import torch
from torch.optim import lr_scheduler

import fused_opt
from cases import make_grads, make_params

SCHEDULERS = {
    "exponential": lambda opt: lr_scheduler.ExponentialLR(opt, gamma=0.8),
    "linear": lambda opt: lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=6),
    "lambda_warmup": lambda opt: lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5)),
    "onecycle": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=12),
    "sequential": lambda opt: lr_scheduler.SequentialLR(
        opt, [lr_scheduler.LinearLR(opt, 0.1, total_iters=3), lr_scheduler.ExponentialLR(opt, 0.7)], milestones=[3]),
}


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("algo", ["Adam", "AdamW", "RMSprop", "SGD"])
def test_scheduler_trajectory_matches_torch(algo, name, tensor_lr):
    kwargs = {"momentum": 0.9} if algo in ("SGD", "RMSprop") else {}
    lr = torch.tensor(0.01) if tensor_lr else 0.01
    ours_p, theirs_p = make_params("mixed", torch.float32), make_params("mixed", torch.float32)
    ours = getattr(fused_opt, algo)(ours_p, lr=lr.clone() if tensor_lr else lr, **kwargs)
    theirs = getattr(torch.optim, algo)(theirs_p, lr=lr.clone() if tensor_lr else lr, foreach=False, **kwargs)
    s_ours, s_theirs = SCHEDULERS[name](ours), SCHEDULERS[name](theirs)
    lrs = []
    for step in range(1, 13):
        for ps in (ours_p, theirs_p):
            for p, g in zip(ps, make_grads(ps, step)):
                p.grad = g.float()
        ours.step()
        theirs.step()
        s_ours.step()
        s_theirs.step()
        lrs.append(float(ours.param_groups[0]["lr"]))
        assert float(ours.param_groups[0]["lr"]) == float(theirs.param_groups[0]["lr"])
        for p, q in zip(ours_p, theirs_p):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert len(set(lrs)) > 3  # the schedule really moved lr
