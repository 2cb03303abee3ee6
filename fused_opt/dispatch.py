"""Backend choice: the one place that decides which kernels run a (device, dtype) group.

Each backend states what it can do as data (device types, dtypes, and a check for whether it is
usable at all on this machine). "auto" takes the first usable backend in priority order; the
environment variable FUSED_OPT_BACKEND replaces "auto" (for CI and benchmarks). Asking for a
backend that cannot run raises an error that gives every backend's reason.
"""

from __future__ import annotations

import os
import struct
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import fatbin, ops, reference

BACKEND_NAMES = ("auto", "cuda", "triton", "cpu", "reference", "cuda_sim")
REBUILD_HINT = "rebuild it with: pip install --no-build-isolation -v ."
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _extension_reason(module: str) -> str | None:
    reason = ops.load_extensions()[module]
    return None if reason is None else f"the compiled extension {module} is not available ({reason}); {REBUILD_HINT}"


def _cuda_reason() -> str | None:
    return _extension_reason("fused_opt._C_cuda") or (None if torch.cuda.is_available() else "no CUDA device is visible")


_CUDA_IMAGES: list = []  # [the CUDA module's images], read once (fatbin.py)


def _cuda_device_reason(device: torch.device) -> str | None:
    """Why the CUDA module cannot run on this GPU: it holds no code for its architecture."""
    if _cuda_reason() is not None:  # unavailable() says why
        return None
    if not _CUDA_IMAGES:
        try:
            _CUDA_IMAGES.append(fatbin.images(ops.cuda_module().__file__))
        except (OSError, ValueError, struct.error):  # not an ELF we can read: let the launch decide
            _CUDA_IMAGES.append([])
    found = _CUDA_IMAGES[0]
    props = torch.cuda.get_device_properties(device)
    if not found or fatbin.runs_on(found, (props.major, props.minor)):
        return None
    arch = props.major * 10 + props.minor
    return (f"the CUDA extension holds code for {', '.join(map(str, found))}, not for this GPU ({props.name}, sm_{arch}); "
            f"rebuild it for this GPU with: FUSED_OPT_CUDA_ARCHS={arch} pip install --no-build-isolation -v .")


def _triton_device_reason(device: torch.device) -> str | None:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "runs on cpu tensors only under TRITON_INTERPRET=1 (Triton's interpreter, for tests)"
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        if props.major < 7:  # as torch.compile's own check of the GPUs Triton compiles for
            return (f"Triton compiles for GPUs of compute capability 7.0 or later, not for this one "
                    f"({props.name}, sm_{props.major}{props.minor})")
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    unavailable: Callable[[], str | None]  # why it cannot run on this machine at all, or None
    kernel: Callable[[str], Callable]  # family ("adam", "rmsprop", "sgd") -> in-place op
    auto_devices: tuple[str, ...] | None = None  # device types "auto" may pick it for (None: all it runs on)
    device_reason: Callable[[torch.device], str | None] = lambda device: None  # a further condition

    def reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot update params of this device and dtype (None: it can)."""
        if device.type not in self.device_types:
            return f"runs on {'/'.join(self.device_types)} tensors, not {device.type}"
        if dtype not in self.dtypes:
            return f"does not support dtype {dtype}"
        return self.device_reason(device) or self.unavailable()


# In priority order for "auto". On a GPU the CUDA extension comes first and Triton serves where
# it was not built: measured side by side on an H200 (bench/results/h200-2026-11-30/), CUDA was
# as fast or faster on every fp32 list (gpt-1b Adam 8.10 ms against 8.84, 10,000 tensors 3.77
# against 5.32; the two rows where Triton led, by 1%, are within the noise).
BACKENDS = (
    Backend("cuda", ("cuda",), _FLOATS, _cuda_reason, ops.op, device_reason=_cuda_device_reason),
    Backend("cpu", ("cpu",), _FLOATS, lambda: _extension_reason("fused_opt._C"), ops.op),
    Backend("triton", ("cuda", "cpu"), _FLOATS, ops.triton_reason, ops.triton_op, auto_devices=("cuda",),
            device_reason=_triton_device_reason),
    Backend("reference", ("cpu", "cuda", "xpu", "mps", "meta"), _FLOATS, lambda: None,
            lambda family: getattr(reference, family + "_")),
    # For tests: the CUDA kernels' traversal run block by block on the CPU (slow, never "auto").
    Backend("cuda_sim", ("cpu",), _FLOATS, lambda: _extension_reason("fused_opt._C"), ops.simulated_cuda_op,
            auto_devices=()),
)
_BY_NAME = {b.name: b for b in BACKENDS}


def check_backend_name(name: str) -> None:
    if name not in BACKEND_NAMES:
        raise ValueError(f"Invalid backend: {name!r}; expected one of {', '.join(BACKEND_NAMES)}")


def _requested(name: str) -> str:
    if name == "auto":
        name = os.environ.get("FUSED_OPT_BACKEND", "auto") or "auto"
        check_backend_name(name)
    return name


_CHOICES: dict[tuple[str, torch.device, torch.dtype], Backend] = {}


def clear_cache() -> None:
    """Forget the choices made so far (after a change of environment or extensions)."""
    _CHOICES.clear()


def _select(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    key = (name, device, dtype)
    if key not in _CHOICES:  # a plain dict, not lru_cache: torch.compile traces through it cleanly
        _CHOICES[key] = _choose(name, device, dtype)
    return _CHOICES[key]


_OURS_AND_TORCHS = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def _callers_level() -> int:
    """The stacklevel of warnings.warn, called from the function that calls this, that names the
    first frame outside fused_opt and torch: the user's line (a constructor, a step, a call)."""
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_OURS_AND_TORCHS):
        level, frame = level + 1, frame.f_back
    return level


def _choose(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    if name == "auto":
        candidates = [b for b in BACKENDS if device.type in (b.device_types if b.auto_devices is None
                                                              else b.auto_devices)]
    else:
        candidates = [_BY_NAME[name]]
    reasons = {}
    for backend in candidates:
        why = backend.reason(device, dtype)
        if why is None:
            if name == "auto" and backend.name == "reference" and device.type in ("cpu", "cuda"):
                compiled = "cpu" if device.type == "cpu" else "cuda"
                warnings.warn(f"fused_opt: using the slow pure-PyTorch reference for {device.type} {dtype} params: "
                              f"{_BY_NAME[compiled].reason(device, dtype)}", RuntimeWarning,
                              stacklevel=_callers_level())
            return backend
        reasons[backend.name] = why
    if name != "auto":  # say what every backend would have done, to help pick another
        for backend in BACKENDS:
            reasons.setdefault(backend.name, backend.reason(device, dtype) or "available")
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise RuntimeError(f"fused_opt: backend {name!r} cannot update {dtype} params on {device}. {detail}")


def select(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that will update params of this device and dtype when `name` is asked for."""
    check_backend_name(name)
    if dtype.is_complex:  # updated as real views (see functional.py)
        dtype = dtype.to_real()
    return _select(_requested(name), torch.device(device), dtype)


def available_backends() -> dict[str, str | None]:
    """Backend name -> None if usable on this machine, else why not."""
    return {b.name: b.unavailable() for b in BACKENDS}
