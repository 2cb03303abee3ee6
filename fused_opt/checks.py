"""Every check an op makes before it writes anything, for the code in Python that writes: the
Triton launch, the reference, and the functional layer's slow path (which checks every
(device, dtype) group before the first one is updated, so that a bad tensor in a later group
cannot leave the earlier ones stepped). The checks and messages are those of the C++ ops
(csrc/include/fused_opt/checks.h): run there, by the CPU extension, when it is built, and here
when it is not or while torch.compile traces (which cannot enter the extension).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops

# (name, tensors, used): an unused list (amsgrad's, say, without amsgrad) must be empty.
Named = tuple[str, list, bool]

# Each family's state lists, as the ops name them, and the option that puts each in use (None: always).
STATE_LISTS = {
    "adam": (("exp_avgs", None), ("exp_avg_sqs", None), ("max_exp_avg_sqs", "amsgrad")),
    "rmsprop": (("square_avgs", None), ("grad_avgs", "centered"), ("momentum_buffers", "momentum")),
    "sgd": (("momentum_buffers", "momentum"),),
}
_PARAM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def op_lists(family: str, state_lists, options: dict) -> list[Named]:
    """A family's state lists named and marked used from the op's options."""
    return [(name, lst, option is None or bool(options[option]))
            for (name, option), lst in zip(STATE_LISTS[family], state_lists)]


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one block of memory in some dimension order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def shares_elements(t: Tensor) -> bool:
    """Some elements are one memory location (a stride of 0 where a dimension has more than one
    element: an expanded tensor): torch refuses to write to such a tensor."""
    return any(st == 0 and sz > 1 for sz, st in zip(t.shape, t.stride()))


def check_group(op: str, params, grads, states: list[Named], masters: list[Tensor], steps: Named) -> None:
    """The lists of one launch: lengths, then each param (one device and dtype, dense) and each
    grad, state and master copy against its param, then the step counters. Writes nothing."""
    states = states + [("", [], False)] * (3 - len(states))
    if _compiled():
        ops.cpu_module().check_lists(op, params, grads, [lst for _, lst, _ in states], [u for _, _, u in states],
                                     [name for name, _, _ in states], masters, steps[1], steps[2])
    else:
        _check_group(op, params, grads, states, masters, steps)


def pack_group(op: str, params, grads, states: list[Named], masters: list[Tensor], steps: Named):
    """check_group, then the launch's pointer table (int64 [6, n], CPU; rows: param, grad, three
    states, masters; 0 where unused) and the numels."""
    states = states + [("", [], False)] * (3 - len(states))
    if _compiled():
        return ops.cpu_module().pack_group(op, params, grads, [lst for _, lst, _ in states],
                                           [u for _, _, u in states], [name for name, _, _ in states], masters,
                                           steps[1], steps[2])
    _check_group(op, params, grads, states, masters, steps)
    n = len(params)
    rows = [params, grads] + [lst if used else [] for _, lst, used in states] + [masters]
    table = torch.tensor([[t.data_ptr() for t in lst] if lst else [0] * n for lst in rows], dtype=torch.int64,
                         device="cpu")
    return table.reshape(len(rows), n), torch.tensor([p.numel() for p in params], dtype=torch.int64, device="cpu")


def counter_pointers(steps: list[Tensor], device: torch.device) -> Tensor | None:
    """The step counters' addresses (int64 [n], CPU) when all live on `device` with one dtype (the
    Triton launch then advances them in a kernel); else, or with none, None."""
    if _compiled():
        return ops.cpu_module().counter_pointers(steps, device)
    if not steps or any(s.device != device or s.dtype != steps[0].dtype for s in steps):
        return None
    return torch.tensor([s.data_ptr() for s in steps], dtype=torch.int64, device="cpu")


def check_scalars(op: str, **tensors: Tensor | None) -> None:
    """lr_tensor, grad_scale, found_inf, weight_decay_tensor: one element each, when given."""
    for name, t in tensors.items():
        if t is not None and t.numel() != 1:
            raise RuntimeError(f"{op}: {name} must be a one-element tensor")


def _compiled() -> bool:
    return not torch.compiler.is_compiling() and ops.load_extensions()["fused_opt._C"] is None


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Same element order in memory: equal shapes, and equal strides wherever a dimension has more
    than one element."""
    return a.shape == b.shape and all(x == y for x, y, s in zip(a.stride(), b.stride(), a.shape) if s > 1)


def _label(name: str, i: int | None) -> str:
    return name if i is None else f"{name}[{i}]"


def check_like_param(op: str, name: str, i: int | None, t: Tensor, p: Tensor, dtype: torch.dtype,
                     strides: bool = True) -> None:
    """t (`name[i]`, or `name` when i is None), which goes with param p, is a dense `dtype` tensor
    on p's device with p's shape, and with p's strides unless `strides` is False (the functional
    layer fits those itself)."""
    if t.layout != torch.strided:
        raise RuntimeError(f"{op}: {_label(name, i)} must be a dense tensor, got layout {t.layout}")
    if t.device != p.device:
        raise RuntimeError(f"{op}: {_label(name, i)} is on {t.device} but its param is on {p.device}")
    if t.dtype != dtype:
        raise RuntimeError(f"{op}: {_label(name, i)} has dtype {t.dtype} but its param has dtype {p.dtype}"
                           if dtype == p.dtype else f"{op}: {_label(name, i)} has dtype {t.dtype} but must be "
                           f"{dtype} (its param is {p.dtype} with float32 master weights)")
    if strides and not same_layout(t, p):
        raise RuntimeError(f"{op}: {_label(name, i)} has shape {tuple(t.shape)} and strides {t.stride()} but its "
                           f"param has shape {tuple(p.shape)} and strides {p.stride()}")
    if t.shape != p.shape:
        raise RuntimeError(f"{op}: {_label(name, i)} has shape {tuple(t.shape)} but its param has shape "
                           f"{tuple(p.shape)}")


def check_writable(op: str, name: str, i: int | None, t: Tensor) -> None:
    """A tensor the step writes through a contiguous copy: the copy back needs distinct elements."""
    if shares_elements(t):
        raise RuntimeError(f"{op}: {_label(name, i)} has elements that are one memory location (a stride of 0), "
                           "so it cannot be updated in place; clone() it")


def check_step(op: str, name: str, i: int | None, s: Tensor, p: Tensor) -> None:
    """A step counter: one float32 or float64 element, on the CPU or on its param's device."""
    if s.layout != torch.strided or s.numel() != 1 or s.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{op}: {_label(name, i)} must be a one-element dense float32 or float64 tensor")
    if s.device.type != "cpu" and s.device != p.device:
        raise RuntimeError(f"{op}: {_label(name, i)} is on {s.device}, expected {_step_devices(p)}")


def _step_devices(p: Tensor) -> str:
    return "cpu" if p.device.type == "cpu" else f"cpu or {p.device}"


def _check_group(op: str, params, grads, states: list[Named], masters: list[Tensor], steps: Named) -> None:
    n = len(params)
    if len(grads) != n:
        raise RuntimeError(f"{op}: expected {n} grads (one per param), got {len(grads)}")
    for name, lst, used in [*states, steps]:
        if len(lst) != (n if used else 0):
            raise RuntimeError(f"{op}: expected {n if used else 0} tensors in {name}, got {len(lst)}")
    if len(masters) not in (0, n):
        raise RuntimeError(f"{op}: expected 0 or {n} tensors in master_params, got {len(masters)}")
    if n == 0:
        return
    first = params[0]
    if first.dtype not in _PARAM_DTYPES:
        raise RuntimeError(f"{op}: params must be float32, float64, float16 or bfloat16, got {first.dtype}")
    if masters and first.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"{op}: master_params are for float16 and bfloat16 params; params are {first.dtype} "
                           "(pass an empty list)")
    state_dtype = torch.float32 if masters else first.dtype
    for i, p in enumerate(params):
        if p.layout != torch.strided:
            raise RuntimeError(f"{op}: params[{i}] must be a dense tensor, got layout {p.layout}")
        if p.device != first.device or p.dtype != first.dtype:
            raise RuntimeError(f"{op}: params[{i}] is {p.dtype} on {p.device} but params[0] is {first.dtype} on "
                               f"{first.device}; call once per (device, dtype) group")
        if not is_dense(p):
            raise RuntimeError(f"{op}: params[{i}] must be non-overlapping and dense (e.g. contiguous); "
                               f"got strides {p.stride()}")
        check_like_param(op, "grads", i, grads[i], p, p.dtype)
        for name, lst, used in states:
            if used:
                check_like_param(op, name, i, lst[i], p, state_dtype)
        if masters:
            check_like_param(op, "master_params", i, masters[i], p, torch.float32)
        if steps[2]:
            check_step(op, steps[0], i, steps[1][i], p)
