"""Host side of the Triton kernels: the implementations of fused_opt::triton_adam_, triton_rmsprop_
and triton_sgd_ (schemas in fused_opt/ops.py), for CUDA tensors and, under TRITON_INTERPRET=1,
CPU tensors (how the tests run them without a GPU).

Per call: check every input before anything is written (fused_opt/checks.py: the C++ ops'
checks, run by the CPU extension when it is built; else the same in Python), advance
the step counters (where they live on the params' device, in one launch of their own), compute
the scalars in float64 (the same values the C++ kernels use), and launch one kernel over all
tensors. The pointer table and block map depend only on where the
params and states live and how big they are, so they are kept (a few per process, least recently
used dropped) and reused while those addresses and sizes are unchanged; only the grads' row is
rewritten each call. The optimizers' cached group tables (fused_opt/tables.py) skip the per-call
checks and packing and call `execute` directly.

Block size: from a sweep on an H200 (see BLOCK_LARGE_TENSORS below), 4096 under the interpreter
(fewer, larger numpy steps). Autotuning is left out on purpose: it would rerun an in-place update.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import checks
from . import kernels

# Elements per program, from bench/triton_blocks.py on an H200 (bench/results/h200-2026-11-30/):
# fp32 Adam on the 1B-param GPT list ran at 0.91 of the copy bandwidth with 1024 elements and 4
# warps, 0.84 with 2048 (8192 with 4 warps: 0.50); on 10,000 tensors of 4,096, where launching and
# checking dominate, 2048 took 4.1 ms and 1024 7.9. Hence 1024 where the tensors average 64K
# elements or more, else 2048. Under the CPU interpreter, 4096: fewer programs to interpret.
BLOCK_LARGE_TENSORS, BLOCK_SMALL_TENSORS, LARGE_TENSOR, BLOCK_INTERPRETED = 1024, 2048, 1 << 16, 4096
NUM_WARPS = 4
COUNTER_BLOCK = 1024  # step counters a program of counters_kernel advances
# Compiler options of every launch. No FMA contraction (Triton's default contracts a * b + c): each
# product and sum rounded on its own, as torch.optim's ops and our C++ and CUDA kernels round them.
COMPILE_OPTIONS = {"enable_fp_fusion": False}
block_override: int | None = None  # set by bench/triton_blocks.py's sweep
# The pointer table's rows: param, grad, up to three states, the master copy (csrc/cpu/launch.h).
_KEPT_ROWS = [0, 2, 3, 4, 5]  # the rows that do not change from step to step (all but the grads')
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16}
_MAX_PLANS = 8


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class _Plan:
    table: Tensor  # int64 [6, n] on the device; row 1 (grads) is rewritten by each call
    master: bool  # row 5 holds float32 master copies (and the states are float32)
    numels: Tensor
    block_tensor: Tensor
    block_start: Tensor
    blocks: int
    block: int
    aligned: bool  # every param and state starts on 16 bytes


_PLANS: OrderedDict[tuple, _Plan] = OrderedDict()
_PLANS_LOCK = threading.Lock()  # steps in several threads share the cache (an eviction between a get and a move)


def block_size(numels: Tensor, device: torch.device) -> int:
    """Elements per program for tensors of these sizes on this device (see BLOCK_LARGE_TENSORS)."""
    if device.type != "cuda":
        return BLOCK_INTERPRETED
    if block_override is not None:
        return block_override
    return BLOCK_LARGE_TENSORS if numels.double().mean() >= LARGE_TENSOR else BLOCK_SMALL_TENSORS


def plan(table: Tensor, numels: Tensor, device: torch.device) -> _Plan:
    """The device pointer table and block map for this pointer table (int64 [6, n] on the
    CPU; its grads' row does not count) and these numels: cached, least recently used dropped."""
    block = block_size(numels, device)
    key = (device, block, table[_KEPT_ROWS].numpy().tobytes(), numels.numpy().tobytes())
    with _PLANS_LOCK:
        found = _PLANS.get(key)
        if found is not None:
            _PLANS.move_to_end(key)
            return found
    blocks_per = (numels + block - 1) // block
    block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32, device="cpu"), blocks_per)
    first = torch.cumsum(blocks_per, 0) - blocks_per  # index of each tensor's first block
    block_start = (torch.arange(len(block_tensor), device="cpu") - first.repeat_interleave(blocks_per)) * block
    aligned = bool((table[_KEPT_ROWS] % 16 == 0).all())
    found = _Plan(table.to(device), bool(table[5].any()), numels.to(device), block_tensor.to(device),
                  block_start.to(device), len(block_tensor), block, aligned)
    with _PLANS_LOCK:
        _PLANS[key] = found
        if len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)
    return found


# ---------------------------------------------------------------- scalars

def _coefficients(device: torch.device, opmath: torch.dtype, lr, grad_scale: Tensor | None, options: dict,
                  family_terms: list[tuple[float, float]], weight_decay: Tensor | None = None) -> Tensor:
    """`coef` of kernels.py. Every entry is a + lr * b (grad_mul also / grad_scale; the weight decay
    terms from `weight_decay` when it is a tensor), computed in float64 -- on the device when lr or
    weight_decay is a device tensor, so nothing syncs -- then rounded."""
    a = [-1.0 if options["maximize"] else 1.0, options["weight_decay"], 1.0, options["l1"], 0.0]
    b = [0.0, 0.0, -options["weight_decay"], 0.0, options["l1"]]
    a += [x for x, _ in family_terms]
    b += [y for _, y in family_terms]
    ab = torch.tensor([a, b], dtype=torch.float64, device="cpu")
    if isinstance(lr, Tensor) and lr.device.type != "cpu":  # a and b go there (not made there: a sync)
        ab = _to_device(ab, device)
        coef = ab[0] + _lr64(lr, device) * ab[1]
    else:
        coef = _to_device(ab[0] + _lr64(lr, torch.device("cpu")) * ab[1], device)
    if weight_decay is not None:
        wd = _to_device(weight_decay, device, torch.float64).reshape(())
        coef[kernels.WEIGHT_DECAY.value] = wd
        coef[kernels.DECAY.value] = 1.0 - _lr64(lr, device) * wd
    if grad_scale is not None:
        scale = _to_device(grad_scale, device, torch.float64).reshape(())
        coef[kernels.GRAD_MUL.value] = coef[kernels.GRAD_MUL.value] / scale
    return coef.to(opmath)


def _pinned(t: Tensor, device: torch.device) -> Tensor:
    """t, in pinned memory if it goes from the host to a GPU: a copy from pageable memory waits for
    the stream (with non_blocking=True too, where the driver stages it), so each step would stall
    the host until the GPU had caught up. torch's pinned-memory cache keeps the buffer until the
    copy is done."""
    return t.pin_memory() if device.type == "cuda" and t.device.type == "cpu" else t


def _to_device(t: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """t on `device`, from the host without blocking (see _pinned)."""
    return _pinned(t.to(dtype or t.dtype), device).to(device, non_blocking=True)


def _lr64(lr, device: torch.device) -> Tensor | float:
    if isinstance(lr, Tensor):
        return lr.to(device, torch.float64).reshape(())
    return float(lr)


def _flags(o: dict, grad_scale, weight_decay: Tensor | None = None) -> dict:
    decoupled = o.get("decoupled_weight_decay", False)
    l2 = weight_decay is not None or o["weight_decay"] != 0  # a tensor's value is not looked at (no sync)
    return dict(SCALE_GRAD=o["maximize"] or grad_scale is not None, COUPLED_L2=l2 and not decoupled,
                DECOUPLED_L2=l2 and decoupled, L1_SUBGRADIENT=o["l1"] != 0 and not o["l1_proximal"],
                L1_PROXIMAL=o["l1"] != 0 and o["l1_proximal"])


# ---------------------------------------------------------------- the launch

def _step_values(steps: list[Tensor], device: torch.device) -> Tensor:
    try:  # one call, as the counters usually share a device and shape
        return _to_device(torch.stack(steps).reshape(-1), device, torch.float64)
    except RuntimeError:
        return torch.stack([_to_device(x.reshape(()), device, torch.float64) for x in steps])


def _adam_per_tensor(s: Tensor, lr, device: torch.device, opmath: torch.dtype, beta1: float, beta2: float) -> Tensor:
    """[neg_step_size, bias_correction2_sqrt] per tensor, from each tensor's (advanced) step `s`."""
    s = _to_device(s, device, torch.float64)
    lr = _lr64(lr, device)
    bias_correction1 = 1.0 - torch.pow(beta1, s)
    # A true division, as the C++ kernels': torch's float / Tensor is a reciprocal and a multiply,
    # an ulp off at times (float64 params show it).
    neg_step = (torch.full_like(bias_correction1, -lr) if not isinstance(lr, Tensor) else -lr) / bias_correction1
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, s))
    return torch.stack([neg_step, bc2_sqrt], dim=1).to(opmath).flatten()


def _spec(family: str, o: dict) -> tuple[list, dict]:
    """A family's op arguments as kernels.py wants them: the family's `coef` terms (a, b: a + lr * b,
    in kernels.py's order) and its constexpr flags."""
    if family == "adam":
        return [(1.0 - o["beta1"], 0.0), (o["beta2"], 0.0), (1.0 - o["beta2"], 0.0), (o["eps"], 0.0)], \
            dict(AMSGRAD=o["amsgrad"])
    if family == "rmsprop":
        return [(o["alpha"], 0.0), (1.0 - o["alpha"], 0.0), (o["eps"], 0.0), (o["momentum"], 0.0), (0.0, -1.0)], \
            dict(CENTERED=o["centered"], MOMENTUM=o["momentum"] > 0)
    return [(o["momentum"], 0.0), (1.0 - o["dampening"], 0.0), (0.0, -1.0)], \
        dict(MOMENTUM=o["momentum"] != 0, NESTEROV=o["nesterov"], FIRST_STEP=o["first_step"])


def refuse_capture(device: torch.device) -> None:
    """A step copies its launch tables and scalars from the host, which a CUDA graph cannot replay:
    refuse during capture, before anything is written (the CUDA backend is capture-safe)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("fused_opt: the Triton kernels cannot be captured in a CUDA graph (each step copies its "
                           "launch tables from the host); use backend='cuda' for capturable=True")


def _current(device: torch.device):
    """Makes the params' GPU the current device for a step (as the CUDA extension's CUDAGuard does):
    Triton launches on the current device's current stream, so a model on cuda:1 stepped while
    cuda:0 is current would otherwise launch its kernel on the wrong GPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@dataclass
class Counters:
    """A group's step counters when all live on the params' device with one dtype: their
    addresses (int64 [n] on the device), which counters_kernel advances in one launch."""
    addresses: Tensor
    dtype: torch.dtype
    count: int


def device_counters(steps: list[Tensor], device: torch.device) -> Counters | None:
    """The Counters of `steps`, or None when they are not all on `device` with one dtype (those
    advance with torch's foreach add). The cached group tables keep theirs."""
    addresses = checks.counter_pointers(steps, device)
    return None if addresses is None else Counters(_to_device(addresses, device), steps[0].dtype, len(steps))


def _advance_counters(steps: list[Tensor], counters: Counters | None, found_inf: Tensor | None, device: torch.device,
                      undo: bool = False) -> Tensor | None:
    """Adds 1 to each step counter, or 1 - found_inf where found_inf is on the device (no sync), or
    takes that off again (undo). Returns the new values (float64 [n], on the device) when
    counters_kernel did it, else None."""
    if counters is not None:
        values = torch.empty(counters.count, dtype=torch.float64, device=device)
        kernels.counters_kernel[(triton.cdiv(counters.count, COUNTER_BLOCK),)](
            counters.addresses, counters.count, values if found_inf is None else found_inf, values,
            COUNTER=_TL_DTYPES[counters.dtype], BLOCK=COUNTER_BLOCK, HAS_FOUND_INF=found_inf is not None, UNDO=undo,
            num_warps=NUM_WARPS)
        return values
    # A Tensor passed where torch's foreach ops take a Scalar would be read on the host: the
    # Tensor overload takes it on the device.
    if found_inf is not None:
        torch._foreach_add_(steps, (1 - found_inf).to(steps[0].dtype), alpha=-1 if undo else 1)
    elif undo:
        torch._foreach_sub_(steps, 1.0)
    else:
        torch._foreach_add_(steps, 1.0)
    return None


def execute(family: str, plan: _Plan, grad_ptrs: Tensor, device: torch.device, dtype: torch.dtype,
            steps: list[Tensor], counters: Counters | None, lr: float, lr_tensor: Tensor | None,
            grad_scale: Tensor | None, found_inf: Tensor | None, options: dict, advance_host_steps=None,
            weight_decay_tensor: Tensor | None = None) -> None:
    """One checked step over a plan: step counters (`counters`: device_counters(steps, device)),
    scalars, this step's grads (their addresses, int64 on the CPU), one launch. Also the entry of
    the cached group tables (tables.py), which pass `advance_host_steps`: it advances counters kept
    on the CPU in one call and returns their values (None if they are not all there)."""
    with _current(device):
        refuse_capture(device)
        if found_inf is not None:
            found_inf = found_inf.reshape(())  # one element of any shape; the counters' undo needs 0-d
        # found_inf on the params' device masks the kernel and undoes the step counters' advance, with
        # no sync; elsewhere (or with counters on the host) it is read here.
        found_here = (found_inf is not None and found_inf.device == device
                      and (counters is not None or all(s.device == device for s in steps)))
        if found_inf is not None and not found_here and found_inf.item() != 0:
            return
        values = advance_host_steps() if advance_host_steps is not None and steps and not found_here else None
        if values is None and steps:
            values = _advance_counters(steps, counters, found_inf if found_here else None, device)
        try:  # the kernel reads the steps' values, not the counters: a failure here (a compile error,
            # an allocation) puts the counters back, so that the step raises with nothing changed
            _launch(family, plan, grad_ptrs, device, dtype, steps, values, lr_tensor if lr_tensor is not None else lr,
                    grad_scale, found_inf if found_here else None, options, weight_decay_tensor)
        except BaseException:
            if steps:
                _advance_counters(steps, counters, found_inf if found_here else None, device, undo=True)
            raise


def _launch(family: str, plan: _Plan, grad_ptrs: Tensor, device: torch.device, dtype: torch.dtype,
            steps: list[Tensor], values: Tensor | None, lr, grad_scale: Tensor | None, found_inf: Tensor | None,
            options: dict, weight_decay_tensor: Tensor | None) -> None:
    """execute's scalars and launch, after the step counters were advanced (`values`: their new
    values, float64 [n], when the host or counters_kernel gave them; else read from `steps`)."""
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    terms, flags = _spec(family, options)
    coef = _coefficients(device, opmath, lr, grad_scale, options, terms, weight_decay_tensor)
    per_tensor = coef
    if family == "adam":
        values = _step_values(steps, device) if values is None else values
        per_tensor = _adam_per_tensor(values, lr, device, opmath, options["beta1"], options["beta2"])
    if plan.blocks == 0:  # only empty tensors
        return
    plan.table[1].copy_(_pinned(grad_ptrs, device), non_blocking=True)
    aligned = plan.aligned and bool((grad_ptrs % 16 == 0).all())
    family_flags = [flags[name] for name in kernels.FAMILY_FLAGS[family]] + [False] * 3
    kernels.step_kernel[(plan.blocks,)](
        plan.table, plan.numels, plan.block_tensor, plan.block_start, coef if found_inf is None else found_inf, coef,
        per_tensor, len(grad_ptrs), BLOCK_FN=kernels.BLOCKS[family], DTYPE=_TL_DTYPES[dtype],
        STATE=tl.float32 if plan.master else _TL_DTYPES[dtype], OPMATH=_TL_DTYPES[opmath], MASTER=plan.master,
        BLOCK=plan.block, ALIGNED=aligned, HAS_FOUND_INF=found_inf is not None,
        **_flags(options, grad_scale, weight_decay_tensor), F1=family_flags[0], F2=family_flags[1], F3=family_flags[2],
        num_warps=NUM_WARPS, **COMPILE_OPTIONS)


def _op(family: str, params: list[Tensor], grads: list[Tensor], state_lists, masters: list[Tensor],
        steps: list[Tensor], lr: float, lr_tensor, grad_scale, found_inf, options: dict) -> None:
    op = f"fused_opt::triton_{family}_"
    weight_decay_tensor = options.pop("weight_decay_tensor", None)
    checks.check_scalars(op, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
                         weight_decay_tensor=weight_decay_tensor)
    counted = family != "sgd"  # SGD keeps no step counter
    table, numels = checks.pack_group(op, params, grads, checks.op_lists(family, state_lists, options), masters,
                                      ("state_steps", steps, counted))
    if not params:
        return
    device = params[0].device
    refuse_capture(device)
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(f"{op}: the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    execute(family, plan(table, numels, device), table[1], device, params[0].dtype, steps,
            device_counters(steps, device), lr, lr_tensor, grad_scale, found_inf, options,
            weight_decay_tensor=weight_decay_tensor)


def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, *, lr, lr_tensor=None,
          grad_scale=None, found_inf=None, **options) -> None:
    _op("adam", params, grads, (exp_avgs, exp_avg_sqs, max_exp_avg_sqs), master_params, state_steps, lr, lr_tensor,
        grad_scale, found_inf, options)


def rmsprop_(params, grads, square_avgs, grad_avgs, momentum_buffers, master_params, state_steps, *, lr,
             lr_tensor=None, grad_scale=None, found_inf=None, **options) -> None:
    _op("rmsprop", params, grads, (square_avgs, grad_avgs, momentum_buffers), master_params, state_steps, lr,
        lr_tensor, grad_scale, found_inf, options)


def sgd_(params, grads, momentum_buffers, master_params, *, lr, lr_tensor=None, grad_scale=None, found_inf=None,
         **options) -> None:
    _op("sgd", params, grads, (momentum_buffers,), master_params, [], lr, lr_tensor, grad_scale, found_inf, options)


IMPLS = {"adam": adam_, "rmsprop": rmsprop_, "sgd": sgd_}
