"""Learning-rate range test: train a few hundred steps with an exponentially increasing lr,
smooth the loss, stop once it diverges, and pick the lr where the smoothed loss falls fastest
(steepest descent against log lr) before the minimum. The model's and optimizer's state are
restored afterwards, so the real run starts from where it would have."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass
class RangeTest:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)     # raw
    smoothed: list[float] = field(default_factory=list)   # bias-corrected exponential average
    suggestion: float | None = None
    diverged_at: float | None = None


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def lr_range_test(model: torch.nn.Module, optimizer, loss_of_batch: Callable[[object], torch.Tensor],
                  batches: Iterator, min_lr: float = 1e-7, max_lr: float = 1.0, steps: int = 100,
                  smoothing: float = 0.98, diverge: float = 4.0, skip_start: int = 10) -> RangeTest:
    """Runs the test and returns the curve with the suggested lr.

    Keep `steps` modest (about 100): the longer the sweep, the more of the loss is already gone by
    the time the lr is useful, and the steepest drop moves to ever smaller lrs.

    loss_of_batch(batch) returns the loss of one batch (forward only: this function does the
    backward pass and the optimizer step). The lr grows geometrically from min_lr to max_lr over
    `steps` steps; the run stops early when the smoothed loss exceeds `diverge` times its minimum.
    """
    if not 0 < min_lr < max_lr or steps < skip_start + 11:
        raise ValueError(f"Invalid range test: min_lr={min_lr}, max_lr={max_lr}, steps={steps}")
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    result = RangeTest()
    avg, best = 0.0, math.inf
    try:
        for i in range(steps):
            lr = min_lr * (max_lr / min_lr) ** (i / (steps - 1))
            _set_lr(optimizer, lr)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of_batch(next(batches))
            loss.backward()
            optimizer.step()
            value = loss.item()
            avg = smoothing * avg + (1 - smoothing) * value
            smooth = avg / (1 - smoothing ** (i + 1))
            result.lrs.append(lr)
            result.losses.append(value)
            result.smoothed.append(smooth)
            if not math.isfinite(smooth) or (i > skip_start and smooth > diverge * best):
                result.diverged_at = lr
                break
            best = min(best, smooth)
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_opt)
    result.suggestion = steepest_descent(result.lrs, result.smoothed, skip_start)
    return result


def steepest_descent(lrs: list[float], smoothed: list[float], skip_start: int = 10, window: int = 5) -> float:
    """The lr where d(smoothed loss)/d(log lr) is most negative, before the loss minimum.

    The slope is a difference over +-window steps: step-to-step differences of a noisy loss
    measured a few percent of an lr decade apart are mostly noise."""
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    if len(finite) < skip_start + 2 * window + 1:
        raise RuntimeError("the range test ended too early to suggest an lr: lower min_lr or raise steps")
    end = min(finite, key=lambda i: smoothed[i]) + 1
    centres = range(skip_start + window, end - window)
    if not centres:
        return lrs[max(skip_start, end - 1)]
    def slope(i):
        return (smoothed[i + window] - smoothed[i - window]) / math.log(lrs[i + window] / lrs[i - window])
    return lrs[min(centres, key=slope)]


def plot(test: RangeTest, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(test.lrs, test.losses, alpha=0.3, label="loss")
    ax.plot(test.lrs, test.smoothed, label="smoothed")
    if test.suggestion:
        ax.axvline(test.suggestion, color="red", linestyle="--", label=f"chosen lr {test.suggestion:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss", title="LR range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
