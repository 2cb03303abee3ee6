"""Pure-PyTorch reference of the fused_opt contract (ARCHITECTURE.md section 1).

The readable oracle for the tests and the last-resort backend (the only one for devices other
than the CPU and CUDA GPUs: MPS, XPU). Same signatures as the ops in ops.py; one tensor at a time,
math in float32 (float64 for float64 params), 16-bit tensors rounded once on store; with
master_params, on the float32 master copy. Written for clarity, not speed, and without host syncs
or data-dependent branches (lr, weight decay, grad_scale, found_inf and the step counters may be
tensors), so that torch.compile can trace it whole.

The per-step coefficients (from the step counter, a Tensor lr, weight decay or grad scale) are
computed in float64, as the kernels compute theirs, on the device the tensor lives on; a device
without float64 arithmetic (MPS, an Intel GPU without fp64) computes them in float32 instead, as
torch's own kernels for such devices do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks


def _opmath(t: Tensor) -> Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


# Device types whose tensors cannot hold float64 (MPS); Intel GPUs say so per device (has_fp64).
NO_FLOAT64 = {"mps"}
_XPU_FLOAT64: dict[str, bool] = {}


def _has_float64(device: torch.device) -> bool:
    if device.type in NO_FLOAT64:
        return False
    if device.type == "xpu":
        key = str(device)
        if key not in _XPU_FLOAT64:
            _XPU_FLOAT64[key] = bool(getattr(torch.xpu.get_device_properties(device), "has_fp64", True))
        return _XPU_FLOAT64[key]
    return True


def _coef_math(t: Tensor) -> Tensor:
    """A scalar tensor (step counter, lr, weight decay, grad scale) in the coefficients' math type:
    float64 where its device has it, else float32 (see the module docstring)."""
    return t.to(torch.float64 if _has_float64(t.device) else torch.float32)


def _scalars(lr, lr_tensor, grad_scale, weight_decay, weight_decay_tensor):
    """-> (lr, 1/grad_scale, weight_decay): floats, or 0-d tensors (_coef_math) when given as tensors."""
    lr = _coef_math(lr_tensor) if lr_tensor is not None else lr
    inv_scale = 1.0 / _coef_math(grad_scale) if grad_scale is not None else 1.0
    weight_decay = _coef_math(weight_decay_tensor).reshape(()) if weight_decay_tensor is not None else weight_decay
    return lr, inv_scale, weight_decay


def _check(family: str, params, grads, state_lists, master_params, state_steps, options: dict, **scalars) -> None:
    """Every input checked before anything is written, as the kernels do (checks.py)."""
    op = f"fused_opt.reference.{family}_"
    checks.check_group(op, params, grads, checks.op_lists(family, state_lists, options), master_params,
                       ("state_steps", state_steps, family != "sgd"))
    checks.check_scalars(op, **scalars)


def _coef(x, like: Tensor):
    """A coefficient in the math type of `like`: a coefficient tensor (from a Tensor lr, grad_scale or
    the step) is rounded first, as the kernels round theirs; otherwise a 0-d param would promote."""
    return x.to(like.dtype) if isinstance(x, Tensor) else x


def _commit(dst: Tensor, new: Tensor, skip: Tensor | None) -> None:
    """dst = new, unless found_inf said to skip the step (then dst keeps its value)."""
    dst.copy_(new if skip is None else torch.where(skip, _opmath(dst), new))


def _weights(param: Tensor, masters, i: int) -> Tensor:
    """The value the update runs on: the float32 master copy when there is one, else the param."""
    return masters[i].float() if masters else _opmath(param)


def _commit_param(param: Tensor, masters, i: int, p: Tensor, skip: Tensor | None) -> None:
    """Writes the updated value: to the master (if any) and to the param, rounded once."""
    if masters:
        _commit(masters[i], p, skip)
    _commit(param, p, skip)


def _skip_mask(found_inf: Tensor | None) -> Tensor | None:
    return None if found_inf is None else found_inf.reshape(()) != 0


def _advance(step_t: Tensor, skip: Tensor | None) -> Tensor:
    """Adds one to the step counter (not when skipping); returns the step of this update (_coef_math)."""
    step = _coef_math(step_t) + 1
    step_t.copy_(step if skip is None else torch.where(skip, step - 1, step))
    return step


def prepare_grad(p, g, *, lr, inv_scale, maximize, weight_decay, decoupled, l1, l1_proximal):
    """Maximize, unscale, coupled L2 and L1 subgradient on g; decoupled L2 on p. Returns (p, g)."""
    if maximize:
        g = -g
    if not (isinstance(inv_scale, float) and inv_scale == 1.0):
        g = g * _coef(inv_scale, g)
    if isinstance(weight_decay, Tensor):  # read where it lives, no sync: zero leaves p and g alone
        on = weight_decay != 0  # coefficients rounded to the math type first, as the kernels do
        if decoupled:
            p = torch.where(on, p * _coef(1.0 - lr * weight_decay, p), p)
        else:
            g = torch.where(on, g + _coef(weight_decay, g) * p, g)
    elif weight_decay != 0 and not decoupled:
        g = g + weight_decay * p
    if l1 != 0 and not l1_proximal:
        g = g + l1 * torch.sign(p)
    if not isinstance(weight_decay, Tensor) and weight_decay != 0 and decoupled:
        p = p * _coef(1.0 - lr * weight_decay, p)
    return p, g


def finish_param(p, *, lr, l1, l1_proximal):
    """L1 proximal step (soft threshold by lr * l1), after the update: exact zeros."""
    if l1 != 0 and l1_proximal:
        t = _coef(lr * l1, p)
        p = p - p.clamp(-t, t)
    return p


def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, *, lr, beta1, beta2,
          weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, l1, l1_proximal,
          lr_tensor=None, grad_scale=None, found_inf=None, weight_decay_tensor=None) -> None:
    _check("adam", params, grads, (exp_avgs, exp_avg_sqs, max_exp_avg_sqs), master_params, state_steps,
           {"amsgrad": amsgrad}, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
           weight_decay_tensor=weight_decay_tensor)
    lr, inv_scale, weight_decay = _scalars(lr, lr_tensor, grad_scale, weight_decay, weight_decay_tensor)
    skip = _skip_mask(found_inf)
    for i, param in enumerate(params):
        step = _advance(state_steps[i], skip)
        p, g = prepare_grad(_weights(param, master_params, i), _opmath(grads[i]), lr=lr, inv_scale=inv_scale,
                            maximize=maximize, weight_decay=weight_decay, decoupled=decoupled_weight_decay, l1=l1,
                            l1_proximal=l1_proximal)
        m = torch.lerp(_opmath(exp_avgs[i]), g, 1 - beta1)
        v = _opmath(exp_avg_sqs[i]) * beta2 + (1 - beta2) * g * g
        if amsgrad:
            v_used = torch.maximum(_opmath(max_exp_avg_sqs[i]), v)
            _commit(max_exp_avg_sqs[i], v_used, skip)
        else:
            v_used = v
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = v_used.sqrt() / _coef(bias_correction2_sqrt, v_used) + eps
        p = p + _coef(-step_size, p) * m / denom  # torch's addcdiv: (value * t1) / t2
        p = finish_param(p, lr=lr, l1=l1, l1_proximal=l1_proximal)
        _commit(exp_avgs[i], m, skip)
        _commit(exp_avg_sqs[i], v, skip)
        _commit_param(param, master_params, i, p, skip)


def rmsprop_(params, grads, square_avgs, grad_avgs, momentum_buffers, master_params, state_steps, *, lr, alpha, eps,
             weight_decay, momentum, centered, maximize, l1, l1_proximal,
             lr_tensor=None, grad_scale=None, found_inf=None, weight_decay_tensor=None) -> None:
    _check("rmsprop", params, grads, (square_avgs, grad_avgs, momentum_buffers), master_params, state_steps,
           {"centered": centered, "momentum": momentum}, lr_tensor=lr_tensor, grad_scale=grad_scale,
           found_inf=found_inf, weight_decay_tensor=weight_decay_tensor)
    lr, inv_scale, weight_decay = _scalars(lr, lr_tensor, grad_scale, weight_decay, weight_decay_tensor)
    skip = _skip_mask(found_inf)
    for i, param in enumerate(params):
        _advance(state_steps[i], skip)
        p, g = prepare_grad(_weights(param, master_params, i), _opmath(grads[i]), lr=lr, inv_scale=inv_scale,
                            maximize=maximize, weight_decay=weight_decay, decoupled=False, l1=l1,
                            l1_proximal=l1_proximal)
        sq = _opmath(square_avgs[i]) * alpha + (1 - alpha) * g * g
        if centered:
            ga = torch.lerp(_opmath(grad_avgs[i]), g, 1 - alpha)
            avg = (sq - ga * ga).sqrt()
            _commit(grad_avgs[i], ga, skip)
        else:
            avg = sq.sqrt()
        avg = avg + eps
        if momentum > 0:
            buf = _opmath(momentum_buffers[i]) * momentum + g / avg
            p = p + _coef(-lr, p) * buf
            _commit(momentum_buffers[i], buf, skip)
        else:
            p = p + _coef(-lr, p) * g / avg
        p = finish_param(p, lr=lr, l1=l1, l1_proximal=l1_proximal)
        _commit(square_avgs[i], sq, skip)
        _commit_param(param, master_params, i, p, skip)


def sgd_(params, grads, momentum_buffers, master_params, *, lr, weight_decay, momentum, dampening, nesterov, maximize,
         first_step, l1, l1_proximal, lr_tensor=None, grad_scale=None, found_inf=None, weight_decay_tensor=None) -> None:
    _check("sgd", params, grads, (momentum_buffers,), master_params, [], {"momentum": momentum}, lr_tensor=lr_tensor,
           grad_scale=grad_scale, found_inf=found_inf, weight_decay_tensor=weight_decay_tensor)
    lr, inv_scale, weight_decay = _scalars(lr, lr_tensor, grad_scale, weight_decay, weight_decay_tensor)
    skip = _skip_mask(found_inf)
    for i, param in enumerate(params):
        p, g = prepare_grad(_weights(param, master_params, i), _opmath(grads[i]), lr=lr, inv_scale=inv_scale,
                            maximize=maximize, weight_decay=weight_decay, decoupled=False, l1=l1,
                            l1_proximal=l1_proximal)
        if momentum != 0:
            buf = g if first_step else _opmath(momentum_buffers[i]) * momentum + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
            _commit(momentum_buffers[i], buf, skip)
        p = p + _coef(-lr, p) * g
        p = finish_param(p, lr=lr, l1=l1, l1_proximal=l1_proximal)
        _commit_param(param, master_params, i, p, skip)
