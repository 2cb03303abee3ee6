"""The Triton kernels: one launch updates every tensor of a (device, dtype) group.

Each program updates one block of one tensor. The launch gets a pointer table (slot-major:
table[k * n + t] is the address of slot k of tensor t; slots as in csrc/cpu/launch.h: 0 param,
1 grad, 2..4 state, 5 the float32 master copy), each tensor's numel, and a block map (block ->
tensor, first element). With MASTER the math runs on the master copy, the states are STATE
(float32) and the param is written, rounded, never read.
Scalars that depend on lr, grad_scale or the step come precomputed in float64 and rounded to
the math type (launch.py), the same values the C++ kernels use; `coef` holds the per-launch
ones and, for Adam, `per_tensor` the per-tensor bias corrections. A set found_inf masks every
load and store: nothing is written, without a host sync. Step counters that live on the
params' device are advanced before, by counters_kernel: one launch for all, whatever their number.

The per-element math mirrors csrc/include/fused_opt/math.h line by line (one helper per
family); 16-bit params are computed in float32, float64 params in float64.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Offsets of the shared coefficients in `coef` (the family's own follow from COMMON on);
# constexpr, so that the kernels may read them.
GRAD_MUL, WEIGHT_DECAY, DECAY, L1, L1_THRESHOLD, COMMON = (tl.constexpr(i) for i in range(6))


@triton.jit
def _sqrt(x):
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)  # IEEE rounding, as torch's sqrt
    else:
        return tl.sqrt(x)


@triton.jit
def _div(a, b):
    if a.dtype == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _to(x, DTYPE: tl.constexpr):
    """Rounds to the param dtype, to nearest even (by hand for bfloat16: the interpreter truncates)."""
    if DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)
    else:
        return x.to(DTYPE)


@triton.jit
def _maximum(a, b):  # NaN propagates, like torch.maximum
    return tl.where((a != a) | (a > b), a, b)


@triton.jit
def _lerp(a, b, w):  # torch.lerp's two forms, chosen by the weight
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def _prepare_grad(p, g, coef, SCALE_GRAD: tl.constexpr, COUPLED_L2: tl.constexpr, L1_SUBGRADIENT: tl.constexpr,
                  DECOUPLED_L2: tl.constexpr):
    """Everything that happens to g before the family's update, and to p before it (decoupled L2)."""
    if SCALE_GRAD:
        g = g * tl.load(coef + GRAD_MUL)
    if COUPLED_L2:
        g = g + tl.load(coef + WEIGHT_DECAY) * p
    if L1_SUBGRADIENT:
        g = g + tl.load(coef + L1) * ((p > 0).to(p.dtype) - (p < 0).to(p.dtype))
    if DECOUPLED_L2:
        p = p * tl.load(coef + DECAY)
    return p, g


@triton.jit
def _finish_param(p, coef, L1_PROXIMAL: tl.constexpr):
    if L1_PROXIMAL:  # soft threshold: exact zeros inside [-t, t], NaN stays NaN
        t = tl.load(coef + L1_THRESHOLD)
        p = p - tl.where(p > t, t, tl.where(p < -t, -t, p))
    return p


@triton.jit
def _slot(table, k, n, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(table + k * n + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every tensor starts on 16 bytes: wide loads are safe
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load(ptr, offs, numel, OPMATH: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offs, mask=offs < numel).to(OPMATH)
    else:
        return tl.load(ptr + offs).to(OPMATH)


@triton.jit
def _store(ptr, offs, numel, x, DTYPE: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, _to(x, DTYPE), mask=offs < numel)
    else:
        tl.store(ptr + offs, _to(x, DTYPE))


@triton.jit
def _load_param(table, n, t, offs, numel, DTYPE: tl.constexpr, OPMATH: tl.constexpr, ALIGNED: tl.constexpr,
                MASKED: tl.constexpr, MASTER: tl.constexpr):
    if MASTER:
        return _load(_slot(table, 5, n, t, tl.float32, ALIGNED), offs, numel, OPMATH, MASKED)
    else:
        return _load(_slot(table, 0, n, t, DTYPE, ALIGNED), offs, numel, OPMATH, MASKED)


@triton.jit
def _store_param(table, n, t, offs, numel, p, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
                 MASTER: tl.constexpr):
    if MASTER:
        _store(_slot(table, 5, n, t, tl.float32, ALIGNED), offs, numel, p, tl.float32, MASKED)
    _store(_slot(table, 0, n, t, DTYPE, ALIGNED), offs, numel, p, DTYPE, MASKED)


@triton.jit
def _param_and_grad(table, n, t, offs, numel, coef, DTYPE: tl.constexpr, OPMATH: tl.constexpr, MASTER: tl.constexpr,
                    ALIGNED: tl.constexpr, MASKED: tl.constexpr, SCALE_GRAD: tl.constexpr, COUPLED_L2: tl.constexpr,
                    L1_SUBGRADIENT: tl.constexpr, DECOUPLED_L2: tl.constexpr):
    """Every family's start: the param (or its master copy) and the grad, loaded and prepared."""
    p = _load_param(table, n, t, offs, numel, DTYPE, OPMATH, ALIGNED, MASKED, MASTER)
    g = _load(_slot(table, 1, n, t, DTYPE, ALIGNED), offs, numel, OPMATH, MASKED)
    return _prepare_grad(p, g, coef, SCALE_GRAD, COUPLED_L2, L1_SUBGRADIENT, DECOUPLED_L2)


@triton.jit
def _program(numels, block_tensor, block_start, found_inf, BLOCK: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """This program's tensor, its elements and the tensor's numel; whether to write at all."""
    b = tl.program_id(0)
    t = tl.load(block_tensor + b)
    start = tl.multiple_of(tl.load(block_start + b), BLOCK)  # blocks start at multiples of BLOCK
    live = True
    if HAS_FOUND_INF:
        live = tl.load(found_inf) == 0
    return t, start + tl.arange(0, BLOCK), start, tl.load(numels + t), live


# Each family: a block function (one block of one tensor, masked or not), all with one signature,
# run by step_kernel below. Full blocks run unmasked, so that the compiler may use 16-byte loads;
# the tail block is masked.

@triton.jit
def _adam_block(table, n, t, offs, numel, coef, per_tensor, DTYPE: tl.constexpr, STATE: tl.constexpr,
                OPMATH: tl.constexpr, MASTER: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
                SCALE_GRAD: tl.constexpr, COUPLED_L2: tl.constexpr, L1_SUBGRADIENT: tl.constexpr,
                DECOUPLED_L2: tl.constexpr, L1_PROXIMAL: tl.constexpr,
                AMSGRAD: tl.constexpr, _F2: tl.constexpr, _F3: tl.constexpr):
    m_ptr = _slot(table, 2, n, t, STATE, ALIGNED)
    v_ptr = _slot(table, 3, n, t, STATE, ALIGNED)
    p, g = _param_and_grad(table, n, t, offs, numel, coef, DTYPE, OPMATH, MASTER, ALIGNED, MASKED, SCALE_GRAD,
                           COUPLED_L2, L1_SUBGRADIENT, DECOUPLED_L2)
    exp_avg = _load(m_ptr, offs, numel, OPMATH, MASKED)
    exp_avg_sq = _load(v_ptr, offs, numel, OPMATH, MASKED)
    exp_avg = _lerp(exp_avg, g, tl.load(coef + COMMON))
    exp_avg_sq = exp_avg_sq * tl.load(coef + COMMON + 1) + tl.load(coef + COMMON + 2) * g * g
    second = exp_avg_sq
    if AMSGRAD:
        x_ptr = _slot(table, 4, n, t, STATE, ALIGNED)
        second = _maximum(_load(x_ptr, offs, numel, OPMATH, MASKED), exp_avg_sq)
        _store(x_ptr, offs, numel, second, STATE, MASKED)
    denom = _div(_sqrt(second), tl.load(per_tensor + 2 * t + 1)) + tl.load(coef + COMMON + 3)
    # per_tensor: -step size, sqrt(bias corr. 2); (value * t1) / t2, as torch's addcdiv
    p = p + _div(tl.load(per_tensor + 2 * t) * exp_avg, denom)
    p = _finish_param(p, coef, L1_PROXIMAL)

    _store_param(table, n, t, offs, numel, p, DTYPE, ALIGNED, MASKED, MASTER)
    _store(m_ptr, offs, numel, exp_avg, STATE, MASKED)
    _store(v_ptr, offs, numel, exp_avg_sq, STATE, MASKED)


@triton.jit
def _rmsprop_block(table, n, t, offs, numel, coef, per_tensor, DTYPE: tl.constexpr, STATE: tl.constexpr,
                   OPMATH: tl.constexpr, MASTER: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
                   SCALE_GRAD: tl.constexpr, COUPLED_L2: tl.constexpr, L1_SUBGRADIENT: tl.constexpr,
                   DECOUPLED_L2: tl.constexpr, L1_PROXIMAL: tl.constexpr,
                   CENTERED: tl.constexpr, MOMENTUM: tl.constexpr, _F3: tl.constexpr):
    sq_ptr = _slot(table, 2, n, t, STATE, ALIGNED)
    p, g = _param_and_grad(table, n, t, offs, numel, coef, DTYPE, OPMATH, MASTER, ALIGNED, MASKED, SCALE_GRAD,
                           COUPLED_L2, L1_SUBGRADIENT, DECOUPLED_L2)
    square_avg = _load(sq_ptr, offs, numel, OPMATH, MASKED)
    one_minus_alpha = tl.load(coef + COMMON + 1)
    square_avg = square_avg * tl.load(coef + COMMON) + one_minus_alpha * g * g
    if CENTERED:
        ga_ptr = _slot(table, 3, n, t, STATE, ALIGNED)
        grad_avg = _lerp(_load(ga_ptr, offs, numel, OPMATH, MASKED), g, one_minus_alpha)
        _store(ga_ptr, offs, numel, grad_avg, STATE, MASKED)
        avg = _sqrt(square_avg - grad_avg * grad_avg)
    else:
        avg = _sqrt(square_avg)
    avg = avg + tl.load(coef + COMMON + 2)
    neg_lr = tl.load(coef + COMMON + 4)
    if MOMENTUM:
        buf_ptr = _slot(table, 4, n, t, STATE, ALIGNED)
        buf = _load(buf_ptr, offs, numel, OPMATH, MASKED) * tl.load(coef + COMMON + 3) + _div(g, avg)
        _store(buf_ptr, offs, numel, buf, STATE, MASKED)
        p = p + neg_lr * buf
    else:
        p = p + _div(neg_lr * g, avg)
    p = _finish_param(p, coef, L1_PROXIMAL)

    _store_param(table, n, t, offs, numel, p, DTYPE, ALIGNED, MASKED, MASTER)
    _store(sq_ptr, offs, numel, square_avg, STATE, MASKED)


@triton.jit
def _sgd_block(table, n, t, offs, numel, coef, per_tensor, DTYPE: tl.constexpr, STATE: tl.constexpr,
               OPMATH: tl.constexpr, MASTER: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
               SCALE_GRAD: tl.constexpr, COUPLED_L2: tl.constexpr, L1_SUBGRADIENT: tl.constexpr,
               DECOUPLED_L2: tl.constexpr, L1_PROXIMAL: tl.constexpr,
               MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr):
    p, g = _param_and_grad(table, n, t, offs, numel, coef, DTYPE, OPMATH, MASTER, ALIGNED, MASKED, SCALE_GRAD,
                           COUPLED_L2, L1_SUBGRADIENT, DECOUPLED_L2)
    if MOMENTUM:
        momentum = tl.load(coef + COMMON)
        buf_ptr = _slot(table, 2, n, t, STATE, ALIGNED)
        if FIRST_STEP:  # fresh buffers: buf = g, as torch.optim.SGD's clone
            buf = g
        else:
            buf = _load(buf_ptr, offs, numel, OPMATH, MASKED) * momentum + tl.load(coef + COMMON + 1) * g
        _store(buf_ptr, offs, numel, buf, STATE, MASKED)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p + tl.load(coef + COMMON + 2) * g
    p = _finish_param(p, coef, L1_PROXIMAL)
    _store_param(table, n, t, offs, numel, p, DTYPE, ALIGNED, MASKED, MASTER)


@triton.jit
def step_kernel(table, numels, block_tensor, block_start, found_inf, coef, per_tensor, n, BLOCK_FN: tl.constexpr,
                DTYPE: tl.constexpr, STATE: tl.constexpr, OPMATH: tl.constexpr, MASTER: tl.constexpr,
                BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
                HAS_FOUND_INF: tl.constexpr, SCALE_GRAD: tl.constexpr, COUPLED_L2: tl.constexpr,
                L1_SUBGRADIENT: tl.constexpr, DECOUPLED_L2: tl.constexpr, L1_PROXIMAL: tl.constexpr,
                F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr):
    """The one kernel: BLOCK_FN is the family's block function, F1-F3 its own flags (FAMILY_FLAGS)."""
    t, offs, start, numel, live = _program(numels, block_tensor, block_start, found_inf, BLOCK, HAS_FOUND_INF)
    if live:
        if start + BLOCK <= numel:
            BLOCK_FN(table, n, t, offs, numel, coef, per_tensor, DTYPE, STATE, OPMATH, MASTER, ALIGNED, False, SCALE_GRAD,
                     COUPLED_L2, L1_SUBGRADIENT, DECOUPLED_L2, L1_PROXIMAL, F1, F2, F3)
        else:
            BLOCK_FN(table, n, t, offs, numel, coef, per_tensor, DTYPE, STATE, OPMATH, MASTER, ALIGNED, True, SCALE_GRAD,
                     COUPLED_L2, L1_SUBGRADIENT, DECOUPLED_L2, L1_PROXIMAL, F1, F2, F3)


@triton.jit
def counters_kernel(addresses, n, found_inf, values, COUNTER: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_FOUND_INF: tl.constexpr, UNDO: tl.constexpr):
    """Advances n step counters (one COUNTER element each, at `addresses`, int64) by 1, or by
    1 - found_inf read here, in COUNTER arithmetic as torch's foreach add; writes the new values
    to `values` (float64 [n]) for the scalars. UNDO takes the same increment off again."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    ptrs = tl.load(addresses + i, mask=mask, other=0).to(tl.pointer_type(COUNTER))
    step = tl.load(ptrs, mask=mask)
    if HAS_FOUND_INF:
        increment = (1 - tl.load(found_inf)).to(COUNTER)
    else:
        increment = tl.full((), 1, COUNTER)
    if UNDO:
        step = step - increment
    else:
        step = step + increment
    tl.store(ptrs, step, mask=mask)
    tl.store(values + i, step.to(tl.float64), mask=mask)


# family -> its block function, and the names of the flags it takes as F1, F2, F3.
BLOCKS = {"adam": _adam_block, "rmsprop": _rmsprop_block, "sgd": _sgd_block}
FAMILY_FLAGS = {"adam": ("AMSGRAD",), "rmsprop": ("CENTERED", "MOMENTUM"), "sgd": ("MOMENTUM", "NESTEROV", "FIRST_STEP")}
