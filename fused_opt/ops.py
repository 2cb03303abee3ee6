"""The fused_opt operators: one in-place multi-tensor op per algorithm family.

Schemas and fake (meta) implementations live here, in Python, so the package imports and
`torch.compile` traces without any compiled code. The C++ extension only registers kernels for
these schemas (csrc/cpu/ops_cpu.cpp for CPU, csrc/cuda/ops_cuda.cu for CUDA); importing it is
what `load_extensions` does. Each op checks its inputs, advances the step counters it owns, and
updates params and state in one pass; `found_inf` set means nothing is touched.

`lr_tensor` / `weight_decay_tensor`, when given, replace `lr` / `weight_decay` and are read where
the kernel runs (a CUDA graph replays with their current values).
`master_params` is empty, or holds a float32 master copy of each (16-bit) param: the update
then runs on the master (states float32 too) and the param gets the master's value rounded.
"""

from __future__ import annotations

import importlib

import torch

_SCALARS = ("Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
            "Tensor? weight_decay_tensor=None")

SCHEMAS = {
    "adam_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor(f!)[] master_params, Tensor(e!)[] state_steps, *, float lr, "
        "float beta1, float beta2, float weight_decay, float eps, bool amsgrad, bool maximize, "
        f"bool decoupled_weight_decay, float l1, bool l1_proximal, {_SCALARS}) -> ()"
    ),
    "rmsprop_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, Tensor(c!)[] grad_avgs, "
        "Tensor(d!)[] momentum_buffers, Tensor(f!)[] master_params, Tensor(e!)[] state_steps, *, float lr, "
        "float alpha, float eps, float weight_decay, float momentum, bool centered, bool maximize, float l1, "
        f"bool l1_proximal, {_SCALARS}) -> ()"
    ),
    "sgd_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(f!)[] master_params, *, "
        "float lr, float weight_decay, float momentum, float dampening, bool nesterov, bool maximize, "
        f"bool first_step, float l1, bool l1_proximal, {_SCALARS}) -> ()"
    ),
}

# The same schemas for two more implementations of each family: cuda_sim_<family>_, the CUDA
# kernels' traversal simulated on the CPU (csrc/cpu/cuda_sim.cpp), so tests can check the CUDA
# code's chunking and index math anywhere; triton_<family>_, the Triton kernels (fused_opt/triton).
VARIANTS = {f"{prefix}{name}": schema for prefix in ("cuda_sim_", "triton_") for name, schema in SCHEMAS.items()}

_lib = torch.library.Library("fused_opt", "DEF")  # noqa: TOR901 - schemas are defined once, here
for _name, _schema in {**SCHEMAS, **VARIANTS}.items():
    _lib.define(_name + _schema)


def _fake(name: str):
    """The op's fake (meta) implementation: every op only mutates its inputs in place, so nothing
    to allocate or return, but the kernels' checks, made as torch.compile traces the op. Lists
    mixing devices land here too, when one tensor is on "meta": refused, as a kernel would."""
    family = name.rstrip("_").rsplit("_", 1)[-1]

    def fake(params, grads, *lists, lr_tensor=None, grad_scale=None, found_inf=None, weight_decay_tensor=None,
             **options) -> None:
        from . import checks  # (it imports this module)

        op = f"fused_opt::{name}"
        states, rest = lists[:len(checks.STATE_LISTS[family])], lists[len(checks.STATE_LISTS[family]):]
        steps = ("state_steps", rest[1], True) if len(rest) > 1 else ("", [], False)
        checks.check_scalars(op, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
                             weight_decay_tensor=weight_decay_tensor)
        checks.check_group(op, params, grads, checks.op_lists(family, states, options), rest[0], steps)
    return fake


for _name in {**SCHEMAS, **VARIANTS}:
    torch.library.register_fake(f"fused_opt::{_name}", _fake(_name), lib=_lib)

# Extension module -> why it could not be loaded (None once loaded).
_NOT_TRIED = "not loaded yet"
EXTENSIONS = {"fused_opt._C": _NOT_TRIED, "fused_opt._C_cuda": _NOT_TRIED}


def load_extensions() -> dict[str, str | None]:
    """Imports the compiled kernels (registering them with the ops); returns name -> failure reason.
    Each import is tried once: a failure stands for the process (retried, a missing module cost
    ~20 us at every call, and the backends ask at every step)."""
    for module, reason in EXTENSIONS.items():
        if reason != _NOT_TRIED:
            continue
        try:
            importlib.import_module(module)
            EXTENSIONS[module] = None
        except (ImportError, OSError) as e:  # not built, built against another torch, a library missing
            EXTENSIONS[module] = f"{type(e).__name__}: {e}"
    return dict(EXTENSIONS)


def op(family: str):
    """The torch op of an algorithm family ('adam', 'rmsprop' or 'sgd')."""
    return getattr(torch.ops.fused_opt, family + "_")


def simulated_cuda_op(family: str):
    """The family's op run by the CPU simulation of the CUDA kernels."""
    return getattr(torch.ops.fused_opt, f"cuda_sim_{family}_")


def triton_reason() -> str | None:
    """Imports the Triton backend (registering its kernels); why it cannot, or None."""
    try:
        importlib.import_module("fused_opt.triton")
    except ImportError as e:
        return f"Triton is not available ({type(e).__name__}: {e})"
    return None


def triton_op(family: str):
    """The family's op run by the Triton kernels (see triton_reason)."""
    return getattr(torch.ops.fused_opt, f"triton_{family}_")


def cuda_module():
    """The compiled CUDA extension (fused_opt._C_cuda); load_extensions() says whether it loads."""
    return importlib.import_module("fused_opt._C_cuda")


def library() -> torch.library.Library:
    return _lib


def cpu_module():
    """The compiled CPU extension (fused_opt._C); load_extensions() says whether it loads."""
    return importlib.import_module("fused_opt._C")
