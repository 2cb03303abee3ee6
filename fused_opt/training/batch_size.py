"""Automatic batch size: the largest batch whose training step fits, with a safety margin.

On a GPU "fits" means no CUDA out-of-memory error; on the CPU, where running out of memory
means swapping or being killed rather than an error, it means a measured peak within a budget.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import torch


class OutOfMemory(RuntimeError):
    """A trial step needed more memory than allowed."""


# CPU PeakMemory blocks now open (nesting, threads): one resets the process's high-water mark only
# after folding the mark so far into the others' highs, so none of them loses its peak.
_OPEN: set["PeakMemory"] = set()
_LOCK = threading.Lock()


def _status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (Linux: VmRSS, VmHWM) in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_high_water_mark() -> bool:
    """Linux 4.0+: sets the process's resident-set high-water mark (VmHWM) to its current size."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of the code in its `with` block, in bytes above what was in use at entry.

    CUDA: the allocator's own peak. CPU, on Linux: the kernel's high-water mark of the process's
    resident set (VmHWM), reset at entry, so even a temporary that lives a millisecond counts;
    that reset also lowers what getrusage's ru_maxrss reports for the process afterwards. Where
    the mark cannot be reset, it still counts when the block sets a new high for the process, and
    a background thread samples the resident set every `interval` seconds (elsewhere ru_maxrss, a
    process-wide high mark), which can miss a short-lived peak. The resident set is the whole
    process's: memory freed elsewhere during the block (a garbage collection, say) offsets what the
    block allocates.
    """

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.005):
        self.device, self.interval = torch.device(device), interval
        self.peak = 0
        self._exact = False
        self._thread = None

    @staticmethod
    def _rss() -> int:
        rss = _status_bytes("VmRSS")
        if rss is not None:
            return rss
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        with _LOCK:
            mark = _status_bytes("VmHWM")
            if mark is not None and _reset_high_water_mark():
                for other in _OPEN:
                    if other._exact:
                        other._high = max(other._high, mark)
                self._exact = True
            self._base = self._high = self._rss()
            self._mark_at_entry = _status_bytes("VmHWM")
            _OPEN.add(self)
        if not self._exact:
            self._running = True

            def sample():
                while self._running:
                    self._high = max(self._high, self._rss())
                    time.sleep(self.interval)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return False
        if self._thread is not None:
            self._running = False
            self._thread.join()
        with _LOCK:
            _OPEN.discard(self)
            mark = _status_bytes("VmHWM")
            if mark is not None and (self._exact or mark > (self._mark_at_entry or 0)):
                self._high = max(self._high, mark)  # the high since entry (or a new high set in the block)
            self._high = max(self._high, self._rss())
        self.peak = self._high - self._base
        return False


def find_batch_size(try_batch: Callable[[int], None], start: int = 1, limit: int = 1024,
                    margin: float = 0.9) -> int:
    """The largest batch size that fits, times `margin` (at least `start`).

    try_batch(b) runs one training step at batch size b and raises OutOfMemory (or a CUDA
    out-of-memory error) when it does not fit. Sizes double from `start` up to `limit`; after the
    first failure a binary search finds the boundary between the largest success and the failure.
    """
    if not 0 < margin <= 1:
        raise ValueError(f"Invalid margin: {margin}")

    def fits(b: int) -> bool:
        try:
            try_batch(b)
            return True
        except (OutOfMemory, torch.cuda.OutOfMemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return False

    if not fits(start):
        raise OutOfMemory(f"batch size {start} does not fit in memory; nothing smaller to try (use a smaller "
                          "model or max length, or a larger memory budget)")
    good, bad = start, None
    while bad is None and good < limit:
        b = min(good * 2, limit)
        if fits(b):
            good = b
        else:
            bad = b
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return max(start, int(good * margin))


def cpu_memory_budget(fraction: float = 0.5) -> int:
    """Bytes: `fraction` of the memory available now (Linux MemAvailable; else 4 GiB)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * fraction)
    except OSError:
        pass
    return int(4 * 2**30 * fraction)
