"""Training tools used by the reference fine-tune, reusable on their own: LR schedules, early
stopping, and automatic batch sizing with a peak-memory probe."""

from .batch_size import OutOfMemory, PeakMemory, find_batch_size
from .early_stopping import EarlyStopping
from .schedules import ScheduleFactor, build_scheduler

__all__ = ["OutOfMemory", "PeakMemory", "find_batch_size", "EarlyStopping", "ScheduleFactor", "build_scheduler"]
