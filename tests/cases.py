"""The case table behind the parity tests, and the tolerance table.

A case is one optimizer configuration run for STEPS steps on one list of params; its id reads
like `adam-amsgrad-l1prox-bf16-mixed-cpu`.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from dataclasses import dataclass, field

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_opt

STEPS = 20

# Triton on CPU tensors runs in its interpreter (conftest.py turns it on when there is no GPU); torch's
# CPU-only wheels do not bring Triton at all. A broken fused_opt.triton is not a reason to skip: it fails.
INTERPRETER = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
    reason="needs Triton's interpreter (triton installed, TRITON_INTERPRET=1)")
# GPU tests carry the `cuda` mark (gpu_check.sh runs them) and are skipped only when no GPU is present.
ON_GPU = (pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


class HostReads(TorchDispatchMode):
    """Counts the reads of `watched`'s memory on the host (for a GPU tensor, a sync), as a CPU test
    can see them: made by Python code (an op's insides are out of sight), and only `watched`'s own
    (on the CPU torch's kernels read other 0-d tensors on the host as they work)."""

    def __init__(self, watched: torch.Tensor):
        super().__init__()
        self.address, self.reads = watched.untyped_storage().data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += args[0].untyped_storage().data_ptr() == self.address
        return func(*args, **(kwargs or {}))


# algorithm -> (fused_opt class, torch.optim class, base kwargs, option variants)
ALGORITHMS = {
    "adam": (fused_opt.Adam, torch.optim.Adam, {"lr": 1e-2},
             {"plain": {}, "amsgrad": {"amsgrad": True}, "maximize": {"maximize": True},
              "decoupled": {"decoupled_weight_decay": True}}),
    "adamw": (fused_opt.AdamW, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.0},
              {"plain": {}, "amsgrad": {"amsgrad": True, "betas": (0.5, 0.99)}}),  # lerp weight 0.5: its 2nd form
    "rmsprop": (fused_opt.RMSprop, torch.optim.RMSprop, {"lr": 1e-2},
                {"plain": {}, "centered": {"centered": True}, "momentum": {"momentum": 0.9},
                 "centered_momentum_max": {"centered": True, "momentum": 0.5, "maximize": True, "alpha": 0.5}}),
    "sgd": (fused_opt.SGD, torch.optim.SGD, {"lr": 0.1},
            {"gd": {}, "momentum": {"momentum": 0.9}, "nesterov": {"momentum": 0.9, "nesterov": True},
             "dampening_max": {"momentum": 0.9, "dampening": 0.3, "maximize": True}}),
}

# regularisation -> extra kwargs (L2 through torch's weight_decay; L1 is ours)
REGULARISATION = {
    "none": {},
    "l2": {"weight_decay": 0.1},
    "l1sub": {"l1": 0.01},
    "l1prox": {"l1": 0.05, "l1_mode": "proximal"},
    "elastic": {"weight_decay": 0.05, "l1": 0.02, "l1_mode": "proximal"},
}

DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}

# (rtol, atol) against torch.optim in the same dtype, and against the float64 reference; atol is
# scaled by the tensor's largest magnitude (RMSprop's momentum buffers grow to ~30).
TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-10, 1e-12),
}
# For 16-bit params: error against float64 at most this factor times torch's own error ...
LOW_PRECISION_FACTOR = 2.0
# ... plus this many units of the dtype's resolution (both errors can be a rounding apart).
LOW_PRECISION_ULPS = 1.0


def assert_same_bits(ours: list, twin: list, where: str) -> None:
    """[(name, tensor)] lists equal element for element (NaN where the twin has NaN)."""
    assert [n for n, _ in ours] == [n for n, _ in twin], f"{where}: state keys differ"
    for (name, x), (_, y) in zip(ours, twin):
        x, y = x.detach().cpu(), y.detach().cpu()
        assert x.dtype == y.dtype and x.shape == y.shape, f"{where} {name}: {x.dtype} {x.shape} vs {y.dtype} {y.shape}"
        same = (x == y) | (x.isnan() & y.isnan())
        if not bool(same.all()):
            diff = (x.double() - y.double()).abs().max().item()
            raise AssertionError(f"{where} {name}: {int((~same).sum())} of {x.numel()} elements differ from the "
                                 f"CPU kernels' (by up to {diff:.3g})")


def make_params(layout: str, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Leaf tensors of odd shapes and layouts; 'mixed' covers 0-d, empty, tiny, odd, transposed, sliced."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    if layout == "mixed":
        return [randn(()).requires_grad_(), randn(0).requires_grad_(), randn(1).requires_grad_(),
                randn(7).requires_grad_(), randn(4097).requires_grad_(),
                randn(33, 20).t().requires_grad_(),           # transposed: dense, not contiguous
                randn(13, 9)[:, ::2].requires_grad_()]        # sliced: not dense
    n = int(layout[1:])
    return [randn(n).requires_grad_()]


def make_grads(params, step: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * seed + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]


@dataclass(frozen=True)
class Case:
    algo: str
    option: str
    reg: str
    dtype: str
    layout: str
    backend: str
    device: str = "cpu"
    master: bool = False  # master_weights=True (16-bit params with float32 master copies)
    kwargs: dict = field(hash=False, compare=False, default_factory=dict)

    @property
    def id(self) -> str:
        where = f"-{self.device}" if self.device != self.backend and self.device != "cpu" else ""
        master = "-master" if self.master else ""
        return f"{self.algo}-{self.option}-{self.reg}-{self.dtype}{master}-{self.layout}-{self.backend}{where}"

    @property
    def marks(self):
        """GPU cases carry the `cuda` mark and are skipped only when no GPU is present; Triton on
        the CPU needs Triton's interpreter (conftest.py turns it on when there is no GPU)."""
        if self.device == "cuda":
            return ON_GPU
        if self.backend == "triton":
            return (INTERPRETER,)
        return ()

    @property
    def bit_twin(self) -> str | None:
        """The backend this case must match bit for bit: on the CPU, the GPU backends' stand-ins
        (cuda_sim, Triton's interpreter) and the CPU kernels write the same math in the same order,
        with no FMA, so every element comes out the same."""
        return "cpu" if self.device == "cpu" and self.backend in ("cuda_sim", "triton") else None

    @property
    def fused_cls(self):
        return ALGORITHMS[self.algo][0]

    @property
    def torch_cls(self):
        return ALGORITHMS[self.algo][1]

    @property
    def has_l1(self) -> bool:
        return "l1" in self.kwargs

    def torch_kwargs(self) -> dict:
        return {k: v for k, v in self.kwargs.items() if k not in ("l1", "l1_mode")}


def _case(algo, option, reg, dtype, layout, backend, device="cpu", master=False) -> Case:
    base, variants = ALGORITHMS[algo][2], ALGORITHMS[algo][3]
    kwargs = {**base, **variants[option], **REGULARISATION[reg]}
    if option == "decoupled" and reg in ("none", "l1sub", "l1prox"):
        kwargs["weight_decay"] = 0.1  # decoupled decay needs a decay to mean anything
    if master:
        kwargs["master_weights"] = True
    return Case(algo, option, reg, dtype, layout, backend, device, master, kwargs)


def build_cases(backends=("cpu", "reference", "cuda_sim"), device="cpu", dtypes=tuple(DTYPES)) -> list[Case]:
    cases = []
    for algo, (_, _, _, variants) in ALGORITHMS.items():
        for option, reg, dtype, backend in itertools.product(variants, REGULARISATION, dtypes, backends):
            cases.append(_case(algo, option, reg, dtype, "mixed", backend, device))
        # Large odd-sized tensors: several chunks per tensor, SIMD body plus tail.
        for option, reg, backend in itertools.product(variants, ("none", "elastic"), backends):
            cases.append(_case(algo, option, reg, "f32", "n278011", backend, device))
        for dtype, backend in itertools.product(("bf16", "f64"), backends[:1]):
            cases.append(_case(algo, "plain" if algo != "sgd" else "momentum", "elastic", dtype, "n278011", backend,
                               device))
    return cases


def triton_interpreter_cases() -> list[Case]:
    """Triton's interpreter is slow (numpy, block by block): every option and regularisation in
    float32, the 16-bit and float64 paths with and without regularisation, and one large odd size
    per family (several blocks, masked tail). On a GPU the whole table runs (device="cuda")."""
    keep = {"f32": set(REGULARISATION), "bf16": {"none", "elastic"}, "f64": {"none", "elastic"}, "f16": {"l1sub"}}
    cases = [c for c in build_cases(("triton",)) if c.layout == "mixed" and c.reg in keep[c.dtype]]
    for algo, option in (("adam", "amsgrad"), ("rmsprop", "centered_momentum_max"), ("sgd", "nesterov")):
        cases.append(_case(algo, option, "elastic", "f32", "n12289", "triton"))  # 3 blocks + 1
    return cases


CASES = build_cases() + triton_interpreter_cases() + build_cases(backends=("cuda", "triton"), device="cuda")


def build_master_cases(backends=("cpu", "cuda_sim"), device="cpu", regs=("none", "elastic")) -> list[Case]:
    """master_weights=True: every option of every algorithm, 16-bit params, with and without
    regularisation (the yardstick is the reference backend with master weights, float32 math)."""
    return [_case(algo, option, reg, dtype, "mixed", backend, device, master=True)
            for algo, (_, _, _, variants) in ALGORITHMS.items()
            for option, reg, dtype, backend in itertools.product(variants, regs, ("bf16", "f16"), backends)]


MASTER_CASES = (build_master_cases()
                + [c for c in build_master_cases(("triton",), regs=("elastic",)) if c.dtype == "bf16"]
                + build_master_cases(("cuda", "triton"), device="cuda"))
