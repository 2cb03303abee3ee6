"""fused_opt: Adam/AdamW, RMSprop and SGD with L1/L2 weight decay, fused into one pass over memory.

Drop-in torch.optim optimizers backed by C++ CPU kernels, CUDA kernels and a pure-PyTorch
reference, chosen per (device, dtype) by fused_opt.dispatch.
"""

from . import ops  # noqa: F401  (defines the torch ops before any kernel registers)
from . import functional
from .dispatch import available_backends
from .optimizers import SGD, Adam, AdamW, FusedOptimizer, RMSprop

ops.load_extensions()

__all__ = ["Adam", "AdamW", "RMSprop", "SGD", "FusedOptimizer", "functional", "available_backends"]
__version__ = "0.1.0"
