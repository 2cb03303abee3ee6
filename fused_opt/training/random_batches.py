"""Random batch sizes: a new size each optimizer step, drawn from a seeded generator, with the
learning rate rescaled for it.

The loss is the mean over the batch, so the gradient's scale does not depend on the size; what
changes with the size is the gradient noise, and the lr that suits it. The rescaling follows the
usual rules: linear in the batch size for SGD (Goyal et al., 2017), square root for adaptive
methods such as Adam and RMSprop (Malladi et al., 2022), relative to the middle of the range.
"""

from __future__ import annotations

import torch


class RandomBatchSizes:
    def __init__(self, low: int, high: int, seed: int = 0, lr_power: float = 0.5):
        if not 1 <= low <= high:
            raise ValueError(f"Invalid batch size range: {low}..{high}")
        self.low, self.high, self.lr_power = low, high, lr_power
        self.reference = (low + high) / 2
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def parse(cls, spec: str, seed: int = 0, lr_power: float = 0.5) -> "RandomBatchSizes":
        """From 'random:MIN:MAX'."""
        parts = spec.split(":")
        if len(parts) != 3 or parts[0] != "random":
            raise ValueError(f"Invalid batch size: {spec!r}; expected an integer, 'auto' or 'random:MIN:MAX'")
        return cls(int(parts[1]), int(parts[2]), seed, lr_power)

    def draw(self) -> int:
        return int(torch.randint(self.low, self.high + 1, (), generator=self.generator, device="cpu"))

    def lr_factor(self, size: int) -> float:
        return (size / self.reference) ** self.lr_power

    def split(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """Cuts an epoch's shuffled indices into consecutive batches of freshly drawn sizes."""
        out, start = [], 0
        while start < len(indices):
            size = self.draw()
            out.append(indices[start:start + size])
            start += size
        return out
