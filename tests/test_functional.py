"""fused_opt.functional takes torch.optim's functional calls (torch_adam, .rmsprop.rmsprop,
.sgd.sgd) as they are written, with their defaults, and gives their results: params and every
state list, step after step, in float64 (where both round alike to within 1e-10)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.optim.adam import adam as torch_adam
from torch.optim.rmsprop import rmsprop as torch_rmsprop
from torch.optim.sgd import sgd as torch_sgd

import fused_opt
from cases import TOLERANCES

SHAPES = [(5, 3), (7,), ()]
STEPS = 4


def _lists(family: str, params: list[torch.Tensor], options: dict) -> list[list]:
    """The state lists torch.optim's optimizer hands its functional call, as they start."""
    zeros = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    if family == "adam":
        return [[z.clone() for z in zeros], [z.clone() for z in zeros],
                [z.clone() for z in zeros] if options.get("amsgrad") else [], steps]
    if family == "rmsprop":
        return [[z.clone() for z in zeros], [z.clone() for z in zeros] if options.get("centered") else [],
                [z.clone() for z in zeros] if options.get("momentum", 0) > 0 else [], steps]
    return [[None for _ in params]]  # sgd: buffers made by the first step


# family -> (torch's call, the keyword arguments every call must give, variants)
CALLS = {
    "adam": (torch_adam, dict(amsgrad=False, beta1=0.9, beta2=0.99, lr=0.01, weight_decay=0.0, eps=1e-8,
                                         maximize=False),
             {"plain": {}, "amsgrad-l2": dict(amsgrad=True, weight_decay=0.1),
              "adamw-maximize": dict(decoupled_weight_decay=True, weight_decay=0.1, maximize=True)}),
    "rmsprop": (torch_rmsprop, dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                                                   centered=False),  # (maximize has a default in torch)
                {"plain": {}, "centered-l2": dict(centered=True, weight_decay=0.1),
                 "momentum-maximize": dict(momentum=0.9, maximize=True),
                 "centered-momentum": dict(centered=True, momentum=0.5)}),
    "sgd": (torch_sgd, dict(weight_decay=0.0, momentum=0.0, lr=0.1, dampening=0.0, nesterov=False,
                                      maximize=False),
            {"gd": {}, "momentum-l2": dict(momentum=0.9, weight_decay=0.1), "nesterov": dict(momentum=0.9, nesterov=True),
             "dampening-maximize": dict(momentum=0.9, dampening=0.3, maximize=True)}),
}


@pytest.mark.parametrize("family,variant", [(f, v) for f, (_, _, variants) in CALLS.items() for v in variants])
def test_the_functional_calls_of_torch_optim_give_its_results(family, variant):
    theirs_fn, required, variants = CALLS[family]
    ours_fn = getattr(fused_opt.functional, family)
    kwargs = {**required, **variants[variant]}
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    runs = [([p.clone() for p in init], _lists(family, init, kwargs)) for _ in range(2)]
    rtol, atol = TOLERANCES[torch.float64]
    for step in range(STEPS):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
        for (params, lists), fn in zip(runs, (ours_fn, theirs_fn)):
            fn(params, [x.clone() for x in grads], *lists, foreach=False, **kwargs)
        for name, ours, theirs in [("params", runs[0][0], runs[1][0])] + [
                (f"list {k}", a, b) for k, (a, b) in enumerate(zip(runs[0][1], runs[1][1]))]:
            assert len(ours) == len(theirs), f"step {step} {name}"
            for i, (x, y) in enumerate(zip(ours, theirs)):
                assert (x is None) == (y is None), f"step {step} {name}[{i}]"
                if x is not None:
                    torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"step {step} {name}[{i}]: {m}")


@pytest.mark.parametrize("family", CALLS)
def test_the_functional_signatures_are_torch_optims(family):
    """Every parameter of torch's call, in its order, of its kind, with its default (ours add theirs
    after them, keyword-only)."""
    theirs = list(inspect.signature(CALLS[family][0]).parameters.values())
    ours = list(inspect.signature(getattr(fused_opt.functional, family)).parameters.values())
    positional = [p for p in theirs if p.kind != p.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in ours[:len(positional)]] == [(p.name, p.default) for p in positional]
    ours_by_name = {p.name: p for p in ours}
    for p in theirs:
        assert p.name in ours_by_name and ours_by_name[p.name].kind == p.kind, p.name
        assert ours_by_name[p.name].default == p.default, p.name
    assert all(p.kind == p.KEYWORD_ONLY for p in ours[len(positional):])


@pytest.mark.parametrize("family", ["adam", "rmsprop"])  # (torch's sgd has no such flag)
def test_differentiable_is_refused_before_anything_changes(family):
    _, required, _ = CALLS[family]
    params = [torch.randn(3, dtype=torch.float64)]
    before = params[0].clone()
    lists = _lists(family, params, required)
    with pytest.raises(RuntimeError, match=rf"fused_opt\.functional\.{family} does not support differentiable=True"):
        getattr(fused_opt.functional, family)(params, [torch.ones(3, dtype=torch.float64)], *lists,
                                              differentiable=True, **required)
    assert torch.equal(params[0], before) and all(t is None or not t.any() for lst in lists for t in lst)


# A variant of each family that uses every list it has.
EVERY_LIST = {"adam": "amsgrad-l2", "rmsprop": "centered-momentum", "sgd": "momentum-l2"}


@pytest.mark.parametrize("length", [0, 1])
@pytest.mark.parametrize("family", CALLS)
def test_a_list_of_another_length_is_refused_before_anything_changes(family, length):
    """Each list after params (the grads, each state list) in turn, emptied or cut short."""
    _, required, variants = CALLS[family]
    kwargs = {**required, **variants[EVERY_LIST[family]]}
    names = list(inspect.signature(getattr(fused_opt.functional, family)).parameters)
    for k in range(1, 2 + len(_lists(family, [], kwargs))):
        params = [torch.randn(3, dtype=torch.float64) for _ in range(2)]
        lists = [[torch.ones(3, dtype=torch.float64) for _ in params]] + _lists(family, params, kwargs)
        del lists[k - 1][length:]
        before = [[None if t is None else t.clone() for t in lst] for lst in [params] + lists]
        with pytest.raises(ValueError, match=rf"fused_opt\.functional\.{family}: expected 2 tensors in {names[k]}, "
                                             rf"got {length}"):
            getattr(fused_opt.functional, family)(params, *lists, **kwargs)
        for lst, saved in zip([params] + lists, before):
            assert all(t is s is None or torch.equal(t, s) for t, s in zip(lst, saved)), names[k]


@pytest.mark.parametrize("check_only", [False, True], ids=["step", "check_only"])
@pytest.mark.parametrize("scalar,error,message", [
    ("lr", ValueError, "Tensor lr must be 1-element"),
    ("grad_scale", RuntimeError, "grad_scale must be a one-element tensor"),
    ("found_inf", RuntimeError, "found_inf must be a one-element tensor"),
])
@pytest.mark.parametrize("family", CALLS)
def test_a_scalar_tensor_of_two_elements_is_refused(family, scalar, error, message, check_only):
    _, required, variants = CALLS[family]
    kwargs = {**required, **variants[EVERY_LIST[family]], scalar: torch.ones(2, dtype=torch.float32)}
    params = [torch.randn(3, dtype=torch.float64)]
    lists = [[torch.ones(3, dtype=torch.float64)]] + _lists(family, params, kwargs)
    before = params[0].clone()
    with pytest.raises(error, match=message):
        getattr(fused_opt.functional, family)(params, *lists, **kwargs, check_only=check_only)
    assert torch.equal(params[0], before)
