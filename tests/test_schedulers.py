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


@pytest.mark.parametrize("algo", ["Adam", "AdamW"])
def test_tensor_betas_changed_in_place_match_torch(algo):
    """Tensor betas stay Tensors in param_groups (as torch.optim keeps them) and are read at every
    step: changed in place by a schedule, they take effect like torch.optim's, and exactly as their
    (float32) values given as numbers."""
    schedule = [(0.9, 0.999), (0.8, 0.99), (0.85, 0.995), (0.5, 0.9), (0.7, 0.98), (0.75, 0.999)]
    runs = {}
    for impl in ("torch", "tensor", "float"):
        params = make_params("mixed", torch.float32)
        betas = tuple(torch.tensor(b) for b in schedule[0]) if impl != "float" else schedule[0]
        cls = getattr(torch.optim, algo) if impl == "torch" else getattr(fused_opt, algo)
        opt = cls(params, lr=0.01, betas=betas, amsgrad=True, **({"foreach": False} if impl == "torch" else {}))
        for step, (b1, b2) in enumerate(schedule, start=1):
            group = opt.param_groups[0]
            if impl == "float":  # the tensors' float32 values
                group["betas"] = (float(torch.tensor(b1)), float(torch.tensor(b2)))
            else:
                group["betas"][0].fill_(b1)
                group["betas"][1].fill_(b2)
            for p, g in zip(params, make_grads(params, step)):
                p.grad = g.float()
            opt.step()
        runs[impl] = (params, opt)
    assert all(isinstance(b, torch.Tensor) for b in runs["tensor"][1].param_groups[0]["betas"])
    for (p, q, r) in zip(runs["torch"][0], runs["tensor"][0], runs["float"][0]):
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            theirs, ours, floats = (run[1].state[x][key] for run, x in zip(runs.values(), (p, q, r)))
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
            assert torch.equal(ours, floats), key
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        assert torch.equal(q, r)
