"""The Triton backend: kernels.py holds the @triton.jit kernels, launch.py their host side.

Importing this package registers the implementations of fused_opt::triton_adam_, triton_rmsprop_
and triton_sgd_ (schemas in fused_opt/ops.py) for CUDA tensors, and for CPU tensors, which the
kernels take only under TRITON_INTERPRET=1 (the tests' way to run them without a GPU).
"""

from __future__ import annotations

from .. import ops
from . import launch

for _family, _impl in launch.IMPLS.items():
    for _key in ("CUDA", "CPU"):
        ops.library().impl(f"triton_{_family}_", _impl, _key)
