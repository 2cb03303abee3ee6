"""The torch.library ops: schemas, fake impls and mutation annotations pass torch's opcheck."""

from __future__ import annotations


import pytest
import torch

import fused_opt
from cases import INTERPRETER, ON_GPU


def _lists(n, size, dtype=torch.float32):
    return [torch.randn(size, dtype=dtype) for _ in range(n)]


def _adam_args(amsgrad):
    args = (_lists(2, 9), _lists(2, 9), _lists(2, 9), [t.abs() for t in _lists(2, 9)],
            [t.abs() for t in _lists(2, 9)] if amsgrad else [], [], [torch.tensor(3.0), torch.tensor(3.0)])
    kwargs = dict(lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=amsgrad, maximize=False,
                  decoupled_weight_decay=True, l1=0.01, l1_proximal=True)
    return args, kwargs


def _rmsprop_args():
    args = (_lists(2, 9), _lists(2, 9), [t.abs() for t in _lists(2, 9)], [t * 0 for t in _lists(2, 9)], _lists(2, 9),
            [], [torch.tensor(1.0), torch.tensor(1.0)])
    return args, dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.9, centered=True, maximize=True,
                      l1=0.01, l1_proximal=False)


def _sgd_args():
    args = (_lists(3, 5), _lists(3, 5), _lists(3, 5), [])
    return args, dict(lr=0.1, weight_decay=0.01, momentum=0.9, dampening=0.0, nesterov=True, maximize=False,
                      first_step=False, l1=0.0, l1_proximal=False, lr_tensor=torch.tensor(0.05))


SAMPLES = {"adam": lambda: _adam_args(False), "adam_amsgrad": lambda: _adam_args(True),
           "rmsprop": _rmsprop_args, "sgd": _sgd_args}


def _to(device, value):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(device, v) for v in value)
    return value


VARIANTS = [pytest.param("", "cpu", id="cpu"), pytest.param("cuda_sim_", "cpu", id="cuda_sim"),
            pytest.param("triton_", "cpu", id="triton-interpreter", marks=INTERPRETER),
            pytest.param("", "cuda", id="cuda", marks=ON_GPU), pytest.param("triton_", "cuda", id="triton-cuda", marks=ON_GPU)]


@pytest.mark.parametrize("prefix,device", VARIANTS)
@pytest.mark.parametrize("sample", SAMPLES)
def test_opcheck(sample, prefix, device):
    if prefix == "triton_":
        assert fused_opt.ops.triton_reason() is None
    args, kwargs = SAMPLES[sample]()
    op = getattr(torch.ops.fused_opt, prefix + sample.split("_")[0] + "_")
    torch.library.opcheck(op, _to(device, args), _to(device, kwargs))


def test_op_updates_in_place_once_per_call():
    args, kwargs = _adam_args(False)
    before = [p.clone() for p in args[0]]
    torch.ops.fused_opt.adam_(*args, **kwargs)
    assert all(not torch.equal(p, b) for p, b in zip(args[0], before))
    assert [float(s) for s in args[6]] == [4.0, 4.0]
