"""Training tools used by the reference fine-tune, reusable on their own: LR schedules, early
stopping, an LR range test, random batch sizes, and automatic batch sizing with a peak-memory probe."""

from .batch_size import OutOfMemory, PeakMemory, find_batch_size
from .early_stopping import EarlyStopping
from .lr_finder import RangeTest, lr_range_test
from .random_batches import RandomBatchSizes
from .schedules import ScheduleFactor, build_scheduler

__all__ = ["OutOfMemory", "PeakMemory", "find_batch_size", "EarlyStopping", "RangeTest", "lr_range_test", "RandomBatchSizes",
           "ScheduleFactor", "build_scheduler"]
