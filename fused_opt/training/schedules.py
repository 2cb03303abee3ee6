"""Learning-rate schedules: optional linear warmup, then constant, linear or exponential decay to
a floor, as one torch.optim.lr_scheduler.LambdaLR (so it saves, loads and drives a Tensor lr like
any torch scheduler)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

KINDS = ("constant", "linear", "exponential")


class ScheduleFactor:
    """lr multiplier at scheduler step t. An object, not a lambda, so LambdaLR's state_dict keeps it.

    warmup: factor (t + 1) / (warmup + 1) for t < warmup, reaching 1 at t = warmup.
    linear: from 1 down to `floor` at `total_steps`, then stays there.
    exponential: gamma ** (t - warmup), never below `floor`; gamma defaults to the value that
    reaches the floor exactly at `total_steps`.
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int = 0, floor: float = 0.0,
                 gamma: float | None = None):
        if kind not in KINDS:
            raise ValueError(f"Invalid schedule: {kind!r}; expected one of {', '.join(KINDS)}")
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"Invalid schedule length: total_steps={total_steps}, warmup_steps={warmup_steps}")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"Invalid floor: {floor}; expected a fraction of the peak lr in [0, 1]")
        decay_steps = max(1, total_steps - warmup_steps)
        if kind == "exponential" and gamma is None:
            if floor <= 0.0:
                raise ValueError("exponential decay needs gamma or a floor > 0 to reach")
            gamma = floor ** (1.0 / decay_steps)
        if gamma is not None and not 0.0 < gamma <= 1.0:
            raise ValueError(f"Invalid gamma: {gamma}")
        self.kind, self.total_steps, self.warmup_steps = kind, total_steps, warmup_steps
        self.floor, self.gamma, self.decay_steps = floor, gamma, decay_steps

    def __call__(self, t: int) -> float:
        if t < self.warmup_steps:
            return (t + 1) / (self.warmup_steps + 1)
        s = t - self.warmup_steps
        if self.kind == "linear":
            return max(self.floor, 1.0 - (1.0 - self.floor) * min(s, self.decay_steps) / self.decay_steps)
        if self.kind == "exponential":
            return max(self.floor, self.gamma**s)
        return 1.0


def build_scheduler(optimizer: Optimizer, total_steps: int, kind: str = "linear", warmup_steps: int = 0,
                    floor: float = 0.0, gamma: float | None = None) -> LambdaLR:
    """A scheduler to step once per optimizer step; see ScheduleFactor for the shapes."""
    return LambdaLR(optimizer, ScheduleFactor(kind, total_steps, warmup_steps, floor, gamma))
