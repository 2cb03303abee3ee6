"""Early stopping on a validation metric: by patience (no improvement larger than min_delta for
`patience` epochs), by threshold (loss below / accuracy above a target) or on a monitored value
that is NaN or infinite (a diverged run: waiting out the patience would only burn compute),
optionally restoring the best weights. Says which rule stopped the run and when."""

from __future__ import annotations

import copy
import math

import torch


class EarlyStopping:
    def __init__(self, monitor: str = "val_loss", patience: int | None = 3, min_delta: float = 0.0,
                 restore_best: bool = True, stop_below: dict[str, float] | None = None,
                 stop_above: dict[str, float] | None = None, stop_nonfinite: bool = True):
        """monitor: a metric name; lower is better when it ends in "loss", else higher.
        patience: epochs without improvement before stopping (0: stop at the first one; None: never).
        stop_below / stop_above: metric -> threshold that stops the run once crossed.
        stop_nonfinite: stop as soon as the monitored value is NaN or infinite."""
        if patience is not None and patience < 0:
            raise ValueError(f"Invalid patience: {patience}")
        if min_delta < 0:
            raise ValueError(f"Invalid min_delta: {min_delta}")
        self.monitor, self.patience, self.min_delta, self.restore_best = monitor, patience, min_delta, restore_best
        self.stop_nonfinite = stop_nonfinite
        self.lower_is_better = monitor.endswith("loss")
        self.stop_below, self.stop_above = dict(stop_below or {}), dict(stop_above or {})
        self.best_value = math.inf if self.lower_is_better else -math.inf
        self.best_epoch: int | None = None
        self.best_state: dict | None = None
        self.bad_epochs = 0
        self.stopped_epoch: int | None = None
        self.reason: str | None = None

    def _improved(self, value: float) -> bool:
        if self.lower_is_better:
            return value < self.best_value - self.min_delta
        return value > self.best_value + self.min_delta

    def update(self, epoch: int, metrics: dict[str, float], model: torch.nn.Module | None = None) -> bool:
        """Records an epoch's metrics; returns True when training should stop now."""
        value = metrics[self.monitor]
        if self.stop_nonfinite and not math.isfinite(value):  # never the best, even -inf for a loss
            self.bad_epochs += 1
            return self._stop(epoch, f"{self.monitor} is {value}")
        if self._improved(value):
            self.best_value, self.best_epoch, self.bad_epochs = value, epoch, 0
            if self.restore_best and model is not None:
                self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.bad_epochs += 1
        for name, target in self.stop_below.items():
            if metrics[name] < target:
                return self._stop(epoch, f"{name} {metrics[name]:.4g} fell below {target:g}")
        for name, target in self.stop_above.items():
            if metrics[name] > target:
                return self._stop(epoch, f"{name} {metrics[name]:.4g} rose above {target:g}")
        if self.patience is not None and self.bad_epochs > self.patience:
            return self._stop(epoch, f"no {self.monitor} improvement > {self.min_delta:g} for "
                                     f"{self.bad_epochs} epoch(s) (patience {self.patience})")
        return False

    def _stop(self, epoch: int, reason: str) -> bool:
        self.stopped_epoch, self.reason = epoch, reason
        return True

    def restore(self, model: torch.nn.Module) -> bool:
        """Loads the best epoch's weights into model (when kept); returns whether it did."""
        if self.best_state is None:
            return False
        model.load_state_dict(self.best_state)
        return True
