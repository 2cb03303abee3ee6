"""SGD's sparse gradients (nn.Embedding(sparse=True), say), taken as torch.optim.SGD takes them.

The kernels walk dense memory; a sparse (COO) gradient changes only the rows it holds. Its params
take torch.optim.SGD's own per-tensor update (torch's sparse ops: a new momentum buffer is the
sparse gradient's clone, as in torch), beside the fused call for the group's dense gradients.
As torch.optim.SGD, no weight decay (nor L1, which would touch every element too). GradScaler:
the gradient is unscaled as GradScaler.unscale_ does it, and found_inf is read on the host.
Adam and RMSprop refuse sparse gradients, as torch.optim's do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks


def _nonzero(x) -> bool:
    return bool(x != 0) if isinstance(x, Tensor) else x != 0


def check_options(op: str, place: str, *, weight_decay, l1: float) -> None:
    """The options of `place`'s param group, whose grad is sparse."""
    if _nonzero(weight_decay) or l1 != 0:
        raise RuntimeError(f"{op}: the grad of {place} is sparse, which takes no weight decay or L1 (either would "
                           "change every element; torch.optim.SGD takes no weight decay with sparse gradients "
                           "either): set weight_decay=0 and l1=0 in its param group")


def check_param(op: str, place: str, p: Tensor, g: Tensor, buffer: Tensor | None, master: Tensor | None) -> None:
    """The sparse grad g of param p (named `place`), with p's momentum buffer (None: none yet) and
    float32 master copy (None: none): what the update needs of them. Writes nothing."""
    if p.layout != torch.strided:
        raise RuntimeError(f"{op}: {place} must be a dense tensor, got layout {p.layout}")
    state_dtype = torch.float32 if master is not None else p.dtype
    for label, t, dtype in ((f"the grad of {place}", g, p.dtype),
                            (f"the momentum buffer of {place}", buffer, state_dtype)):
        if t is None:
            continue
        if t.layout not in (torch.strided, torch.sparse_coo):
            raise RuntimeError(f"{op}: {label} must be a dense or sparse COO tensor, got layout {t.layout}")
        if t.device != p.device or t.shape != p.shape:
            raise RuntimeError(f"{op}: {label} has shape {tuple(t.shape)} on {t.device} but its param has shape "
                               f"{tuple(p.shape)} on {p.device}")
        if t.dtype != dtype:
            raise RuntimeError(f"{op}: {label} has dtype {t.dtype} but must be {dtype} (its param is {p.dtype}"
                               f"{' with float32 master weights' if master is not None else ''})")
    if master is not None:
        checks.check_like_param(op, f"the master copy of {place}", None, master, p, torch.float32, strides=False)


def unscale(g: Tensor, grad_scale: Tensor) -> Tensor:
    """g / grad_scale as GradScaler.unscale_ computes it: a float16 gradient is coalesced first (its
    duplicates summed), and its values are multiplied by the float32 reciprocal of the scale in
    float32 (float64 for float64 values), then rounded."""
    if g.dtype == torch.float16:
        g = g.coalesce()
    inv_scale = grad_scale.double().reciprocal().float().to(g.device)
    values = g._values()
    values = (values.to(torch.promote_types(values.dtype, torch.float32)) * inv_scale).to(values.dtype)
    return torch.sparse_coo_tensor(g._indices(), values, g.shape, is_coalesced=g.is_coalesced(),
                                   check_invariants=False)  # (g's indices: valid)


def _sparse_sum_works(a: Tensor, b: Tensor) -> bool:
    """Can torch compute a.add(b)? Not for a sparse a and a dense b, nor for two sparse float16 tensors on the CPU."""
    return not a.is_sparse or (b.is_sparse and not (a.dtype == torch.float16 and a.device.type == "cpu"))


def _sparse_sum(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """a + alpha * b where torch cannot add them as they are: in float32 (sparse if both are), rounded
    to a's dtype."""
    if a.is_sparse != b.is_sparse:
        a, b = a.to_dense(), b.to_dense()
    return a.float().add(b.float(), alpha=alpha).to(a.dtype)


def sgd_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None],
         masters: list[Tensor | None], *, lr, momentum: float, dampening: float, nesterov: bool, maximize: bool,
         grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """torch.optim.SGD's update of params with sparse grads, in place; new momentum buffers are put
    into `momentum_buffers` (when momentum != 0). Under master weights the update runs on the
    float32 copy, which the param then takes, rounded."""
    if found_inf is not None and bool(found_inf.ne(0).any()):
        return  # GradScaler found inf/NaN: the step is skipped, and no buffer is made
    lr = lr.item() if isinstance(lr, Tensor) else lr
    for i, (p, g) in enumerate(zip(params, grads)):
        master = masters[i] if masters else None
        if grad_scale is not None:
            g = unscale(g, grad_scale)
        if maximize:
            g = -g
        if master is not None:
            g = g.float()  # the math of a 16-bit param with a master copy is float32, as in the kernels
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = momentum_buffers[i] = g.detach().clone()
            elif _sparse_sum_works(buf, g):
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            else:
                buf = momentum_buffers[i] = _sparse_sum(buf.mul_(momentum), g, 1 - dampening)
            if nesterov:  # (torch cannot add a dense buffer, made by a dense step, to a sparse grad)
                g = g.add(buf, alpha=momentum) if _sparse_sum_works(g, buf) else _sparse_sum(g, buf, momentum)
            else:
                g = buf
        (p if master is None else master).add_(g, alpha=-lr)
        if master is not None:
            p.copy_(master)
