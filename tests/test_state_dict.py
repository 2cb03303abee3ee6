"""state_dict compatibility with torch.optim both ways, and exact resume in a new process."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_opt
from cases import ALGORITHMS, make_grads, make_params

CONFIGS = {
    "adam": {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1},
    "adamw": {"lr": 1e-2},
    "rmsprop": {"lr": 1e-2, "centered": True, "momentum": 0.9},
    "sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
}


def _run(opt, params, steps, start=1):
    for step in range(start, start + steps):
        for p, g in zip(params, make_grads(params, step)):
            p.grad = g.to(p.dtype)
        opt.step()


def _fresh(cls, kwargs, **extra):
    params = make_params("mixed", torch.float32)
    return params, cls(params, **kwargs, **extra)


@pytest.mark.parametrize("algo", CONFIGS)
def test_same_keys_shapes_dtypes_as_torch(algo):
    fused_cls, torch_cls = ALGORITHMS[algo][:2]
    ours_p, ours = _fresh(fused_cls, CONFIGS[algo])
    theirs_p, theirs = _fresh(torch_cls, CONFIGS[algo], foreach=False)
    _run(ours, ours_p, 3)
    _run(theirs, theirs_p, 3)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for key in a["state"][i]:
            x, y = a["state"][i][key], b["state"][i][key]
            assert (x.dtype, x.shape, x.device) == (y.dtype, y.shape, y.device), (i, key)
    for ga, gb in zip(a["param_groups"], b["param_groups"]):
        assert set(ga) - set(gb) == {"l1", "l1_mode", "backend"}
        assert {k: ga[k] for k in gb if k != "foreach"} == {k: v for k, v in gb.items() if k != "foreach"}


@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
@pytest.mark.parametrize("algo", CONFIGS)
def test_load_across_and_continue(algo, direction):
    fused_cls, torch_cls = ALGORITHMS[algo][:2]
    first, second = (torch_cls, fused_cls) if direction == "torch_to_fused" else (fused_cls, torch_cls)
    extra = lambda cls: {"foreach": False} if cls is torch_cls else {}  # noqa: E731
    params, opt = _fresh(first, CONFIGS[algo], **extra(first))
    _run(opt, params, 5)
    # Continue in the other implementation, and in the first one as the expected trajectory.
    cont_params = [p.detach().clone().requires_grad_() for p in params]
    cont = second(cont_params, **CONFIGS[algo], **extra(second))
    cont.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a checkpoint: no shared tensors
    _run(opt, params, 5, start=6)
    _run(cont, cont_params, 5, start=6)
    for p, q in zip(params, cont_params):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    for p, q in zip(params, cont_params):
        for key in opt.state[p]:
            torch.testing.assert_close(cont.state[q][key], opt.state[p][key], rtol=1e-5, atol=1e-5)


RESUME_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import fused_opt
    from cases import make_params, make_grads
    params = make_params("mixed", torch.float32)
    opt = getattr(fused_opt, {cls!r})(params, **{kwargs!r})
    ckpt = torch.load({path!r}, weights_only=True)
    opt.load_state_dict(ckpt["opt"])
    with torch.no_grad():
        for p, saved in zip(params, ckpt["params"]):
            p.copy_(saved)
    for step in range(6, 11):
        for p, g in zip(params, make_grads(params, step)):
            p.grad = g.to(p.dtype)
        opt.step()
    torch.save({{"params": [p.detach() for p in params],
                "state": opt.state_dict()["state"]}}, {out!r})
""")


@pytest.mark.parametrize("algo", CONFIGS)
def test_resume_in_new_process_is_bit_identical(algo, tmp_path):
    cls = ALGORITHMS[algo][0]
    params, opt = _fresh(cls, CONFIGS[algo])
    _run(opt, params, 5)
    path, out = tmp_path / "ckpt.pt", tmp_path / "out.pt"
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in params]}, path)
    _run(opt, params, 5, start=6)

    script = RESUME_SCRIPT.format(tests=os.path.dirname(__file__), cls=cls.__name__, kwargs=CONFIGS[algo],
                                  path=str(path), out=str(out))
    subprocess.run([sys.executable, "-c", script], check=True)
    resumed = torch.load(out, weights_only=True)
    for p, q in zip(params, resumed["params"]):
        assert torch.equal(p.detach(), q)
    mine = opt.state_dict()["state"]
    for i in mine:
        for key in mine[i]:
            assert torch.equal(mine[i][key], resumed["state"][i][key]), (i, key)
