"""Functional API: lists of tensors in, in-place update, one op call per (device, dtype) group.

Mirrors torch.optim's functional signatures (torch.optim.adam.adam etc.) plus `l1`, `l1_mode`,
`backend`, `master_params` and `check_only` (raise what the step would refuse, write nothing: the
optimizers check every param group so before they update any). This layer groups tensors, makes
odd ones fit the kernels (complex params as real views; params or grads whose memory is not dense
or not laid out alike go through contiguous copies that are written back), picks the backend
(dispatch.py) and calls its op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import checks, dispatch, sparse
from .checks import is_dense, same_layout

L1_MODES = ("subgradient", "proximal")


def _dense_alike(p: Tensor, others) -> bool:
    """Can one flat loop walk p and the others together (dense, same element order)?"""
    if p.is_contiguous() and all(t.is_contiguous() for t in others):
        return True
    return is_dense(p) and all(same_layout(t, p) for t in others)


def _master_list(masters: Sequence[Tensor | None]) -> list[Tensor]:
    """The op's master_params: empty when no param of the call has a master copy."""
    if all(m is None for m in masters):
        return []
    if any(m is None for m in masters):
        raise ValueError("fused_opt: master_params must hold a tensor for every 16-bit param of a (device, dtype) "
                         "group, or none")
    return list(masters)


class _Group:
    """One (device, dtype) group's lists, made fit for a kernel, and what to copy back after.

    The first `len(mutable)` lists hold one tensor per param (param, grad, states, masters) and
    must share a dense layout; later lists (step counters) pass through untouched.
    """

    def __init__(self, family: str, names: Sequence[str], lists: Sequence[Sequence[Tensor]], mutable: Sequence[bool],
                 indices: list[int], dtype: torch.dtype, master_at: int):
        self.lists = [[lst[i] for i in indices] if lst else [] for lst in lists]
        self.lists[master_at] = _master_list(self.lists[master_at])
        self.write_back: list[tuple[Tensor, Tensor]] = []
        slots = [k for k in range(len(mutable)) if self.lists[k]]
        if dtype.is_complex:  # every row becomes real views
            rows = range(len(self.lists[0]))
        else:  # only the rows with a tensor that is not contiguous (map and zip: no Python loop per tensor)
            contiguous = zip(*(map(Tensor.is_contiguous, self.lists[k]) for k in slots))
            rows = [j for j, row in enumerate(contiguous) if not all(row)]
        for j in rows:
            row = [self.lists[k][j] for k in slots]
            if dtype.is_complex:
                row = [torch.view_as_real(t) for t in row]
            if not _dense_alike(row[0], row[1:]):
                for t, k in zip(row, slots):
                    if mutable[k]:  # the copy back would fail after the update
                        checks.check_writable(f"fused_opt.functional.{family}", names[k], indices[j], t)
                fixed = [t.contiguous() for t in row]
                self.write_back += [(orig, tmp) for orig, tmp, k in zip(row, fixed, slots)
                                    if mutable[k] and tmp is not orig]
                row = fixed
            for k, t in zip(slots, row):
                self.lists[k][j] = t

    def check(self, where: str, names: Sequence[str], master_at: int) -> None:
        """The checks its kernel will make (checks.py), without writing anything."""
        steps = self.lists[master_at + 1] if len(self.lists) > master_at + 1 else []
        states = [(name, lst, bool(lst)) for name, lst in zip(names[2:master_at], self.lists[2:master_at])]
        checks.check_group(where, self.lists[0], self.lists[1], states,
                           self.lists[master_at], (names[master_at + 1] if steps else "", steps, bool(steps)))

    def finish(self) -> None:
        for orig, tmp in self.write_back:
            orig.copy_(tmp)


def _groups(params: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """(device, dtype) -> indices of the params in it (the slow path: the fast one sends all at once)."""
    out: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        out.setdefault((p.device, p.dtype), []).append(i)
    return out


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" and torch.distributed.is_available()


def _local_shards(lists):
    """DTensor params (FSDP2, tensor parallel): every update is elementwise, so each rank updates
    its local shard; grads and states are first laid out like their param."""
    out = []
    for lst in lists:
        local = []
        for j, t in enumerate(lst):
            if _is_dtensor(t):
                p = lists[0][j]
                if t is not p and t.placements != p.placements:
                    t = t.redistribute(p.device_mesh, p.placements)
                t = t.to_local()
            local.append(t)
        out.append(local)
    return out


def _check_lengths(family: str, names: Sequence[str], lists: Sequence[Sequence], required: Sequence[bool]) -> None:
    """Each list holds one tensor per param; an optional one (e.g. amsgrad's) may also be empty."""
    n = len(lists[0])
    for name, lst, req in zip(names, lists, required):
        if len(lst) != n and (req or len(lst) != 0):
            raise ValueError(f"fused_opt.functional.{family}: expected {n} tensors in {name}, got {len(lst)}")


# The scalar arguments of each family's op (everything but the lists, lr and the AMP tensors).

def adam_options(*, amsgrad: bool, beta1: float, beta2: float, weight_decay: float | Tensor, eps: float, maximize: bool,
                 decoupled_weight_decay: bool = False, l1: float = 0.0, l1_mode: str = "subgradient") -> dict:
    return dict(beta1=float(beta1), beta2=float(beta2), eps=float(eps), amsgrad=amsgrad, maximize=maximize,
                decoupled_weight_decay=decoupled_weight_decay, **_weight_decay_kwargs(weight_decay),
                **_l1_kwargs(l1, l1_mode))


def rmsprop_options(*, alpha: float, eps: float, weight_decay: float | Tensor, momentum: float, centered: bool,
                    maximize: bool, l1: float = 0.0, l1_mode: str = "subgradient") -> dict:
    return dict(alpha=float(alpha), eps=float(eps), momentum=float(momentum), centered=centered, maximize=maximize,
                **_weight_decay_kwargs(weight_decay), **_l1_kwargs(l1, l1_mode))


def sgd_options(*, weight_decay: float | Tensor, momentum: float, dampening: float, nesterov: bool, maximize: bool,
                l1: float = 0.0, l1_mode: str = "subgradient", first_step: bool = False) -> dict:
    return dict(momentum=float(momentum), dampening=float(dampening), nesterov=nesterov, maximize=maximize,
                first_step=first_step, **_weight_decay_kwargs(weight_decay), **_l1_kwargs(l1, l1_mode))


OPTIONS = {"adam": adam_options, "rmsprop": rmsprop_options, "sgd": sgd_options}


def _placed(t: Tensor, device: torch.device) -> Tensor:
    """A scalar tensor where the kernel can read it: on the params' device, or on the host."""
    return t.to(device) if t.device != device and t.device.type != "cpu" else t


def lr_kwargs(lr, device: torch.device) -> dict:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        return {"lr": 0.0, "lr_tensor": _placed(lr, device)}
    return {"lr": float(lr)}


def _weight_decay_kwargs(weight_decay) -> dict:
    """A Tensor weight decay (like a Tensor lr) is read by the kernel where it runs, at every step:
    a CUDA graph replays with its current value, and changing it in place needs no recompilation."""
    if isinstance(weight_decay, Tensor):
        if weight_decay.numel() != 1:
            raise ValueError("Tensor weight_decay must be 1-element")
        return {"weight_decay": 0.0, "weight_decay_tensor": weight_decay}
    return {"weight_decay": float(weight_decay)}


def _scalar_kwargs(kwargs: dict, lr, device: torch.device) -> dict:
    """The op's keyword arguments for params on `device`: options, lr, weight decay tensor."""
    out = dict(kwargs, **lr_kwargs(lr, device))
    if out.get("weight_decay_tensor") is not None:
        out["weight_decay_tensor"] = _placed(out["weight_decay_tensor"], device)
    return out


def _l1_kwargs(l1: float, l1_mode: str) -> dict:
    if l1_mode not in L1_MODES:
        raise ValueError(f"Invalid l1_mode: {l1_mode!r}; expected 'subgradient' or 'proximal'")
    return {"l1": float(l1), "l1_proximal": l1_mode == "proximal"}


def _check_torch_flags(family: str, differentiable: bool) -> None:
    """torch.optim's functional calls take flags that pick one of its implementations (foreach,
    fused, capturable, has_complex, has_sparse_grad): they are taken and change nothing here, where
    one fused call does it all (and a GPU step is capturable as it is). differentiable=True is
    refused, as by the optimizers."""
    if differentiable:
        raise RuntimeError(f"fused_opt.functional.{family} does not support differentiable=True: its kernels update "
                           "params in place, outside autograd; use torch.optim for that")


# What a kernel may raise once its checks have passed, having possibly written something: the
# slow path's retry would apply the step twice to what was written.
_FAILED_AFTER_CHECKS = (torch.OutOfMemoryError, torch.AcceleratorError)


def _run(family: str, names, lists, mutable, kwargs: dict, lr, backend: str, grad_scale, found_inf,
         check_only: bool = False) -> None:
    """Calls the family's op once per (device, dtype) group of params (check_only: raises what
    they would refuse, and writes nothing).

    Fast path, the usual case: one device and dtype, dense tensors laid out alike. The kernels
    check all of that themselves before writing anything, so the lists go straight to the op;
    if it refuses them, the slow path groups the params and makes their layouts fit, then calls
    again (and a real error, such as a grad of the wrong dtype, is raised from there).
    The master_params list (the last of `mutable`) may hold None for params without a master.
    """
    params = lists[0]
    if not params:
        return
    if check_only:
        _check_scalars(family, lr, grad_scale, found_inf)
        _check_call(family, names, lists, mutable, backend)
        return
    master_at = len(mutable) - 1
    first = params[0]
    if _is_dtensor(first):
        lists = _local_shards(lists)
        params, first = lists[0], lists[0][0]
    masters = lists[master_at]
    if not first.dtype.is_complex and (all(m is None for m in masters) or all(m is not None for m in masters)):
        kernel = dispatch.select(backend, first.device, first.dtype).kernel(family)
        call = list(lists)
        call[master_at] = _master_list(masters)
        try:
            kernel(*call, **_scalar_kwargs(kwargs, lr, first.device), grad_scale=grad_scale, found_inf=found_inf)
            return
        except _FAILED_AFTER_CHECKS:
            raise  # a launch or allocation failed, maybe after some tensors were written: never retry
        except RuntimeError:
            pass
    # Every group is made fit, given its kernel and checked before the first is updated: a step
    # that raises leaves all of them untouched (each kernel checks its own lists, but only as it runs).
    groups = _fitted_groups(family, names, lists, mutable, backend)
    _check_groups(family, names, groups[1:], master_at)
    for device, kernel, group in groups:
        kernel(*group.lists, **_scalar_kwargs(kwargs, lr, device), grad_scale=grad_scale, found_inf=found_inf)
        group.finish()


def _fitted_groups(family: str, names, lists, mutable, backend: str) -> list[tuple[torch.device, object, _Group]]:
    """The slow path's calls: (device, kernel, lists made fit) per (device, dtype) group of params;
    raises for what no layout fix can make fit."""
    master_at = len(mutable) - 1
    return [(device, dispatch.select(backend, device, dtype).kernel(family),
             _Group(family, names, lists, mutable, indices, dtype, master_at))
            for (device, dtype), indices in _groups(lists[0]).items()]


def _check_groups(family: str, names, groups, master_at: int) -> None:
    for device, _, group in groups:
        group.check(f"fused_opt.functional.{family} ({group.lists[0][0].dtype} params on {device})", names, master_at)


def _check_scalars(family: str, lr, grad_scale, found_inf) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    checks.check_scalars(f"fused_opt.functional.{family}", grad_scale=grad_scale, found_inf=found_inf)


def _check_call(family: str, names, lists, mutable, backend: str) -> None:
    """Raises now whatever _run would refuse in these lists (before a call that must not follow
    another that has written); writes nothing."""
    if lists[0] and _is_dtensor(lists[0][0]):
        lists = _local_shards(lists)
    _check_groups(family, names, _fitted_groups(family, names, lists, mutable, backend), len(mutable) - 1)


def adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
         max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor], foreach: bool | None = None,
         capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
         grad_scale: Tensor | None = None, found_inf: Tensor | None = None, has_complex: bool = False,
         decoupled_weight_decay: bool = False, *, amsgrad: bool, beta1: float, beta2: float, lr: float | Tensor,
         weight_decay: float | Tensor, eps: float, maximize: bool, l1: float = 0.0, l1_mode: str = "subgradient",
         backend: str = "auto", master_params: list[Tensor | None] | None = None, check_only: bool = False) -> None:
    """Adam/AdamW step on lists of tensors (torch.optim.adam.adam's arguments, in its order, plus L1,
    backend and master_params: float32 master copies of 16-bit params, None for a param without one).
    check_only=True raises what the step would refuse, and writes nothing."""
    _check_torch_flags("adam", differentiable)
    names = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params", "state_steps")
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params or [], state_steps)
    _check_lengths("adam", names, lists, (True, True, True, True, amsgrad, False, True))
    kwargs = adam_options(amsgrad=amsgrad, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                          maximize=maximize, decoupled_weight_decay=decoupled_weight_decay, l1=l1, l1_mode=l1_mode)
    # state_steps are one-element counters: exempt from the layout fix-up (mutable list is 6 long).
    _run("adam", names, lists, (True, False, True, True, True, True), kwargs, lr, backend, grad_scale, found_inf,
         check_only)


def rmsprop(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor], grad_avgs: list[Tensor],
            momentum_buffer_list: list[Tensor], state_steps: list[Tensor], foreach: bool | None = None,
            maximize: bool = False, differentiable: bool = False, capturable: bool = False, has_complex: bool = False,
            *, lr: float | Tensor, alpha: float, eps: float, weight_decay: float | Tensor, momentum: float,
            centered: bool, l1: float = 0.0, l1_mode: str = "subgradient", grad_scale: Tensor | None = None,
            found_inf: Tensor | None = None, backend: str = "auto", master_params: list[Tensor | None] | None = None,
            check_only: bool = False) -> None:
    """RMSprop step on lists of tensors (torch.optim.rmsprop.rmsprop's arguments, in its order, plus
    L1, the AMP tensors, backend, master_params and check_only as in `adam`)."""
    _check_torch_flags("rmsprop", differentiable)
    names = ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffer_list", "master_params", "state_steps")
    lists = (params, grads, square_avgs, grad_avgs if centered else [],
             momentum_buffer_list if momentum > 0 else [], master_params or [], state_steps)
    _check_lengths("rmsprop", names, lists, (True, True, True, centered, momentum > 0, False, True))
    kwargs = rmsprop_options(alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
                             maximize=maximize, l1=l1, l1_mode=l1_mode)
    _run("rmsprop", names, lists, (True, False, True, True, True, True), kwargs, lr, backend, grad_scale, found_inf,
         check_only)


def sgd(params: list[Tensor], d_p_list: list[Tensor], momentum_buffer_list: list[Tensor | None],
        has_sparse_grad: bool = False, foreach: bool | None = None, fused: bool | None = None,
        grad_scale: Tensor | None = None, found_inf: Tensor | None = None, *, weight_decay: float | Tensor,
        momentum: float, lr: float | Tensor, dampening: float, nesterov: bool, maximize: bool, l1: float = 0.0,
        l1_mode: str = "subgradient", backend: str = "auto", master_params: list[Tensor | None] | None = None,
        check_only: bool = False) -> None:
    """SGD step on lists of tensors (torch.optim.sgd.sgd's arguments, in its order, plus L1, backend,
    master_params and check_only as in `adam`).

    As in torch, a None momentum buffer is created from the first gradient (float32 for a param
    with a master copy); the new buffers are put into `momentum_buffer_list`. Sparse (COO) grads
    are taken as torch.optim.SGD takes them (sparse.py).
    """
    names = ("params", "d_p_list", "momentum_buffer_list", "master_params")
    masters = master_params or []
    _check_lengths("sgd", names, (params, d_p_list, momentum_buffer_list, masters), (True, True, momentum != 0, False))
    if any(g.is_sparse for g in d_p_list) or any(b is not None and b.is_sparse for b in momentum_buffer_list):
        _sgd_with_sparse(params, d_p_list, momentum_buffer_list, masters, lr=lr, weight_decay=weight_decay,
                         momentum=momentum, dampening=dampening, nesterov=nesterov, maximize=maximize, l1=l1,
                         l1_mode=l1_mode, grad_scale=grad_scale, found_inf=found_inf, backend=backend,
                         check_only=check_only)
        return
    kwargs = sgd_options(weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=nesterov,
                         maximize=maximize, l1=l1, l1_mode=l1_mode)
    mutable = (True, False, True, True)
    if momentum == 0:
        _run("sgd", names, (params, d_p_list, [], masters), mutable, kwargs, lr, backend, grad_scale, found_inf,
             check_only)
        return
    fresh = [i for i, b in enumerate(momentum_buffer_list) if b is None]
    if check_only:  # a new buffer is never refused: each is checked as a tensor that is checked anyway
        new_buffers = {i: masters[i] if masters and masters[i] is not None else d_p_list[i] for i in fresh}
    else:  # torch clones the grad
        new_buffers = {i: torch.empty_like(d_p_list[i], dtype=torch.float32 if masters and masters[i] is not None
                                           else None) for i in fresh}
    # Two calls (the kernels' first_step is per call): the one for fresh buffers is checked before
    # the other writes, so that a step that raises changes nothing.
    calls = [(first_step, [params[i] for i in idx], [d_p_list[i] for i in idx],
              [new_buffers[i] if first_step else momentum_buffer_list[i] for i in idx],
              [masters[i] for i in idx] if masters else [])
             for first_step, idx in ((False, [i for i, b in enumerate(momentum_buffer_list) if b is not None]),
                                     (True, fresh)) if idx]
    if check_only:
        _check_scalars("sgd", lr, grad_scale, found_inf)
        for _, *lists in calls:
            _check_call("sgd", names, lists, mutable, backend)
        return
    if len(calls) == 2:
        _check_call("sgd", names, calls[1][1:], mutable, backend)
    for first_step, *lists in calls:
        _run("sgd", names, lists, mutable, dict(kwargs, first_step=first_step), lr, backend, grad_scale, found_inf)
    # A skipped step makes no buffers. Reading found_inf is a sync on a GPU: only where new buffers
    # wait on it (a param's first step), not at every step.
    if new_buffers and not (found_inf is not None and bool(found_inf)):
        for i, buf in new_buffers.items():
            momentum_buffer_list[i] = buf


def _sgd_with_sparse(params, d_p_list, momentum_buffer_list, masters, *, check_only, **options) -> None:
    """sgd() of a list with sparse gradients (see sparse.py) or sparse momentum buffers: the params
    with dense grads take the fused call (a sparse buffer that a sparse step made goes dense), the
    others torch.optim.SGD's update; all are checked before either writes."""
    op = "fused_opt.functional.sgd"
    momentum = options["momentum"]
    at = {False: [], True: []}  # sparse grad? -> indices
    for i, g in enumerate(d_p_list):
        at[g.is_sparse].append(i)
    buffers = list(momentum_buffer_list) if momentum != 0 else [None] * len(params)
    for i in at[True]:
        sparse.check_options(op, f"params[{i}]", weight_decay=options["weight_decay"], l1=options["l1"])
        sparse.check_param(op, f"params[{i}]", params[i], d_p_list[i], buffers[i], masters[i] if masters else None)
    _check_scalars("sgd", options["lr"], options["grad_scale"], options["found_inf"])
    for i in at[False]:
        if buffers[i] is not None and buffers[i].is_sparse:
            buffers[i] = buffers[i].to_dense()

    def pick(lst, indices):
        return [lst[i] for i in indices] if lst else []

    dense_buffers = pick(buffers, at[False]) if momentum != 0 else []
    sgd(pick(params, at[False]), pick(d_p_list, at[False]), dense_buffers, master_params=pick(masters, at[False]),
        check_only=check_only, **options)
    if check_only:
        return
    sparse_buffers = pick(buffers, at[True])
    sparse.sgd_(pick(params, at[True]), pick(d_p_list, at[True]), sparse_buffers, pick(masters, at[True]),
                **{k: options[k] for k in ("lr", "momentum", "dampening", "nesterov", "maximize", "grad_scale",
                                           "found_inf")})
    if momentum != 0:
        for indices, new in ((at[False], dense_buffers), (at[True], sparse_buffers)):
            for i, buf in zip(indices, new):
                momentum_buffer_list[i] = buf
