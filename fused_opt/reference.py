"""Pure-PyTorch reference of the fused_opt contract (ARCHITECTURE.md section 1).

The readable oracle for the tests and the last-resort backend. Same signatures as the ops in
ops.py; one tensor at a time, math in float32 (float64 for float64 params), 16-bit tensors
rounded once on store. Written for clarity, not speed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _opmath(t: Tensor) -> Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def _scalars(lr, lr_tensor, grad_scale, found_inf):
    """-> (lr, 1/grad_scale) as floats, or None when found_inf says to skip the step."""
    if found_inf is not None and float(found_inf) != 0.0:
        return None
    lr = float(lr_tensor) if lr_tensor is not None else lr
    inv_scale = 1.0 / float(grad_scale) if grad_scale is not None else 1.0
    return lr, inv_scale


def prepare_grad(p, g, *, lr, inv_scale, maximize, weight_decay, decoupled, l1, l1_proximal):
    """Maximize, unscale, coupled L2 and L1 subgradient on g; decoupled L2 on p. Returns (p, g)."""
    mul = (-1.0 if maximize else 1.0) * inv_scale
    if mul != 1.0:
        g = g * mul
    if weight_decay != 0 and not decoupled:
        g = g + weight_decay * p
    if l1 != 0 and not l1_proximal:
        g = g + l1 * torch.sign(p)
    if weight_decay != 0 and decoupled:
        p = p * (1.0 - lr * weight_decay)
    return p, g


def finish_param(p, *, lr, l1, l1_proximal):
    """L1 proximal step (soft threshold by lr * l1), after the update: exact zeros."""
    if l1 != 0 and l1_proximal:
        t = lr * l1
        p = p - p.clamp(-t, t)
    return p


def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2,
          weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, l1, l1_proximal,
          lr_tensor=None, grad_scale=None, found_inf=None) -> None:
    scalars = _scalars(lr, lr_tensor, grad_scale, found_inf)
    if scalars is None:
        return
    lr, inv_scale = scalars
    for i, param in enumerate(params):
        state_steps[i] += 1
        step = float(state_steps[i])
        p, g = prepare_grad(_opmath(param), _opmath(grads[i]), lr=lr, inv_scale=inv_scale, maximize=maximize,
                            weight_decay=weight_decay, decoupled=decoupled_weight_decay, l1=l1,
                            l1_proximal=l1_proximal)
        m = torch.lerp(_opmath(exp_avgs[i]), g, 1 - beta1)
        v = _opmath(exp_avg_sqs[i]) * beta2 + (1 - beta2) * g * g
        if amsgrad:
            v_used = torch.maximum(_opmath(max_exp_avg_sqs[i]), v)
            max_exp_avg_sqs[i].copy_(v_used)
        else:
            v_used = v
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = v_used.sqrt() / bias_correction2_sqrt + eps
        p = p + (-step_size) * (m / denom)
        p = finish_param(p, lr=lr, l1=l1, l1_proximal=l1_proximal)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        param.copy_(p)


def rmsprop_(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, *, lr, alpha, eps,
             weight_decay, momentum, centered, maximize, l1, l1_proximal,
             lr_tensor=None, grad_scale=None, found_inf=None) -> None:
    scalars = _scalars(lr, lr_tensor, grad_scale, found_inf)
    if scalars is None:
        return
    lr, inv_scale = scalars
    for i, param in enumerate(params):
        state_steps[i] += 1
        p, g = prepare_grad(_opmath(param), _opmath(grads[i]), lr=lr, inv_scale=inv_scale, maximize=maximize,
                            weight_decay=weight_decay, decoupled=False, l1=l1, l1_proximal=l1_proximal)
        sq = _opmath(square_avgs[i]) * alpha + (1 - alpha) * g * g
        if centered:
            ga = torch.lerp(_opmath(grad_avgs[i]), g, 1 - alpha)
            avg = (sq - ga * ga).sqrt()
            grad_avgs[i].copy_(ga)
        else:
            avg = sq.sqrt()
        avg = avg + eps
        if momentum > 0:
            buf = _opmath(momentum_buffers[i]) * momentum + g / avg
            p = p + (-lr) * buf
            momentum_buffers[i].copy_(buf)
        else:
            p = p + (-lr) * (g / avg)
        p = finish_param(p, lr=lr, l1=l1, l1_proximal=l1_proximal)
        square_avgs[i].copy_(sq)
        param.copy_(p)


def sgd_(params, grads, momentum_buffers, *, lr, weight_decay, momentum, dampening, nesterov, maximize,
         first_step, l1, l1_proximal, lr_tensor=None, grad_scale=None, found_inf=None) -> None:
    scalars = _scalars(lr, lr_tensor, grad_scale, found_inf)
    if scalars is None:
        return
    lr, inv_scale = scalars
    for i, param in enumerate(params):
        p, g = prepare_grad(_opmath(param), _opmath(grads[i]), lr=lr, inv_scale=inv_scale, maximize=maximize,
                            weight_decay=weight_decay, decoupled=False, l1=l1, l1_proximal=l1_proximal)
        if momentum != 0:
            buf = g if first_step else _opmath(momentum_buffers[i]) * momentum + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
            momentum_buffers[i].copy_(buf)
        p = p + (-lr) * g
        p = finish_param(p, lr=lr, l1=l1, l1_proximal=l1_proximal)
        param.copy_(p)
