"""LR schedules, early stopping and the batch-size finder, on their own and at their edges."""

from __future__ import annotations

import gc
import math

import pytest
import torch

import fused_opt
from fused_opt.training import EarlyStopping, OutOfMemory, PeakMemory, ScheduleFactor, build_scheduler, find_batch_size


def _lrs(kind, total=10, **kw):
    opt = fused_opt.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = build_scheduler(opt, total, kind, **kw)
    out = []
    for _ in range(total + 3):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_linear_decay_to_floor():
    lrs = _lrs("linear", total=10, warmup_steps=4, floor=0.1)
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[4:11] == pytest.approx([1.0 - 0.9 * s / 6 for s in range(7)])
    assert lrs[10:] == pytest.approx([0.1] * 3)  # stays on the floor


def test_exponential_decay_reaches_the_floor_at_the_end_and_stays():
    lrs = _lrs("exponential", total=8, floor=0.01)
    assert lrs[0] == 1.0 and lrs[8] == pytest.approx(0.01)
    assert all(b < a for a, b in zip(lrs[:8], lrs[1:9]))
    assert min(lrs) == pytest.approx(0.01)
    gamma_lrs = _lrs("exponential", total=5, gamma=0.5)
    assert gamma_lrs[:4] == pytest.approx([1, 0.5, 0.25, 0.125])


def test_the_shortest_schedule_has_no_warmup_unless_told():
    one = ScheduleFactor("linear", total_steps=1, floor=0.25)
    assert [one(t) for t in range(3)] == [1.0, 0.25, 0.25]
    assert ScheduleFactor("constant", total_steps=1, warmup_steps=1)(0) == 0.5


def test_schedule_state_round_trips_and_bad_input_is_refused():
    opt = fused_opt.AdamW([torch.zeros(1, requires_grad=True)], lr=torch.tensor(0.1))
    sched = build_scheduler(opt, 20, "linear", warmup_steps=2)
    for _ in range(5):
        opt.step()
        sched.step()
    twin_opt = fused_opt.AdamW([torch.zeros(1, requires_grad=True)], lr=torch.tensor(0.1))
    twin = build_scheduler(twin_opt, 20, "linear", warmup_steps=2)
    twin.load_state_dict(sched.state_dict())
    twin_opt.load_state_dict(opt.state_dict())
    assert float(twin_opt.param_groups[0]["lr"]) == float(opt.param_groups[0]["lr"])
    for bad, words in ((dict(kind="cosine", total_steps=5), "Invalid schedule: 'cosine'"),
                       (dict(kind="linear", total_steps=0), "Invalid schedule length"),
                       (dict(kind="linear", total_steps=5, warmup_steps=6), "Invalid schedule length"),
                       (dict(kind="exponential", total_steps=5), "needs gamma or a floor"),
                       (dict(kind="exponential", total_steps=5, gamma=1.5), "Invalid gamma: 1.5"),
                       (dict(kind="linear", total_steps=5, floor=2.0), "Invalid floor: 2.0")):
        with pytest.raises(ValueError, match=words):
            ScheduleFactor(**bad)


def _model(value):
    m = torch.nn.Linear(1, 1)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def test_patience_zero_stops_at_the_first_epoch_without_improvement():
    stop = EarlyStopping("val_loss", patience=0)
    assert not stop.update(1, {"val_loss": 1.0})
    assert not stop.update(2, {"val_loss": 0.9})
    assert stop.update(3, {"val_loss": 0.95})
    assert stop.stopped_epoch == 3 and stop.best_epoch == 2 and "patience 0" in stop.reason


def test_min_delta_and_accuracy_mode():
    stop = EarlyStopping("val_accuracy", patience=1, min_delta=0.01)
    assert not stop.update(1, {"val_accuracy": 0.80})
    assert not stop.update(2, {"val_accuracy": 0.805})  # not better by more than min_delta
    assert stop.update(3, {"val_accuracy": 0.809})
    assert stop.best_epoch == 1


def test_restores_the_best_weights_when_the_best_epoch_is_the_first():
    model = _model(1.0)
    stop = EarlyStopping("val_loss", patience=1)
    assert not stop.update(1, {"val_loss": 0.5}, model)
    with torch.no_grad():
        model.weight.fill_(7.0)
    assert not stop.update(2, {"val_loss": 0.6}, model)
    assert stop.update(3, {"val_loss": 0.7}, model)
    assert stop.restore(model) and model.weight.item() == 1.0


def test_threshold_stops_at_the_first_epoch_that_crosses_it():
    stop = EarlyStopping("val_loss", patience=None, stop_below={"val_loss": 0.3}, stop_above={"val_accuracy": 0.95})
    losses, accs = [0.9, 0.5, 0.31, 0.29, 0.1], [0.5, 0.7, 0.8, 0.9, 0.99]
    epoch = next(e for e, (l, a) in enumerate(zip(losses, accs), 1)
                 if stop.update(e, {"val_loss": l, "val_accuracy": a}))
    assert epoch == 4 and "val_loss 0.29 fell below 0.3" in stop.reason
    acc_stop = EarlyStopping("val_loss", patience=None, stop_above={"val_accuracy": 0.85})
    epoch = next(e for e, (l, a) in enumerate(zip(losses, accs), 1)
                 if acc_stop.update(e, {"val_loss": l, "val_accuracy": a}))
    assert epoch == 4 and "val_accuracy" in acc_stop.reason


def _fits_below(limit, tried):
    def try_batch(b):
        tried.append(b)
        if b > limit:
            raise OutOfMemory(f"{b} > {limit}")
    return try_batch


@pytest.mark.parametrize("limit", [1, 2, 37, 64, 100, 1000])
def test_batch_size_finder_finds_the_boundary_then_keeps_a_margin(limit):
    tried = []
    size = find_batch_size(_fits_below(limit, tried), start=1, limit=512, margin=0.9)
    assert size == max(1, int(min(limit, 512) * 0.9))
    assert len(tried) <= 2 * math.ceil(math.log2(512)) + 2  # doubling, then a binary search


def test_batch_size_finder_refuses_when_the_smallest_size_does_not_fit():
    with pytest.raises(OutOfMemory, match="batch size 4 does not fit"):
        find_batch_size(_fits_below(3, []), start=4)


MiB = 2**20


def _temporary(mib: int) -> None:
    x = torch.ones(mib * MiB // 4)  # touched, so resident; freed on return
    x.add_(1)


@pytest.fixture
def no_garbage_collection():
    """The resident set is the whole process's: earlier tests' garbage, collected inside a block,
    would lower it there and hide the block's own peak (seen once in CI: an inner peak of 0)."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_peak_memory_sees_a_large_temporary_on_cpu(no_garbage_collection):
    # A temporary of a few milliseconds, which a sampling thread can miss on a busy machine.
    with PeakMemory("cpu") as mem:
        _temporary(64)
    assert mem.peak >= 48 * MiB


def test_peak_memory_blocks_nest_on_cpu(no_garbage_collection):
    """An inner block resets the process's high-water mark: the outer must keep the peak it saw
    before, and the inner must not count it."""
    # Both temporaries are over glibc's largest mmap threshold (32 MiB), so each gets fresh pages
    # (a smaller one may reuse heap pages still resident, and not raise the resident set at all).
    with PeakMemory("cpu") as outer:
        _temporary(128)
        with PeakMemory("cpu") as inner:
            _temporary(40)
    assert outer.peak >= 96 * MiB
    assert 32 * MiB <= inner.peak < 96 * MiB


def _noisy_quadratic(noise=0.1, seed=3):
    """0.5 * sum a_i (w_i - noise_i)^2 with fresh noise every step: SGD's classic model problem."""
    a = torch.linspace(1, 10, 20)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.ones(20))
    g = torch.Generator().manual_seed(seed)

    def loss(_):
        return 0.5 * (a * (model.w - noise * torch.randn(20, generator=g)) ** 2).sum()

    def true_loss():
        return (0.5 * (a * model.w.detach() ** 2).sum()).item()

    return model, loss, true_loss


def test_lr_range_test_picks_within_3x_of_the_best_lr_and_restores_state():
    import itertools

    from fused_opt.training import lr_range_test

    def final_loss(lr, steps=100):
        model, loss, true_loss = _noisy_quadratic()
        opt = fused_opt.SGD(model.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss(None).backward()
            opt.step()
        value = true_loss()
        return value if math.isfinite(value) else math.inf

    grid = [10 ** (k / 16) for k in range(-64, 8)]
    best = min(grid, key=final_loss)
    model, loss, _ = _noisy_quadratic(seed=7)
    opt = fused_opt.SGD(model.parameters(), lr=0.5, momentum=0.0)
    before = model.w.detach().clone()
    test = lr_range_test(model, opt, loss, itertools.repeat(None), min_lr=1e-4, max_lr=10.0, steps=100)
    assert best / 3 <= test.suggestion <= best * 3, (test.suggestion, best)
    assert test.diverged_at is not None and test.diverged_at > test.suggestion
    assert torch.equal(model.w.detach(), before) and opt.param_groups[0]["lr"] == 0.5


def test_random_batch_sizes_stay_in_bounds_and_are_reproducible():
    from fused_opt.training import RandomBatchSizes

    a, b = RandomBatchSizes.parse("random:3:9", seed=5), RandomBatchSizes(3, 9, seed=5)
    sizes = [a.draw() for _ in range(500)]
    assert sizes == [b.draw() for _ in range(500)]
    assert min(sizes) == 3 and max(sizes) == 9
    batches = RandomBatchSizes(3, 9, seed=1).split(torch.arange(100))
    assert torch.equal(torch.cat(batches), torch.arange(100))
    assert all(3 <= len(x) <= 9 for x in batches[:-1])
    sgd = RandomBatchSizes(4, 12, lr_power=1.0)
    assert sgd.lr_factor(4) == 0.5 and sgd.lr_factor(12) == 1.5 and RandomBatchSizes(4, 12).lr_factor(16) == 2 ** 0.5
    assert RandomBatchSizes.parse("random:4:12").lr_factor(16) == 2 ** 0.5  # square root unless told
    ones = RandomBatchSizes.parse("random:1:1")  # the smallest range there is
    assert [ones.draw() for _ in range(3)] == [1, 1, 1] and len(ones.split(torch.arange(4))) == 4
    for bad in ("random:0:4", "random:5:4", "rand:1:2", "random:1"):
        with pytest.raises(ValueError):
            RandomBatchSizes.parse(bad)


def test_min_delta_in_loss_mode_and_the_default_patience():
    stop = EarlyStopping("val_loss", min_delta=0.1)  # patience 3 unless told
    assert not stop.update(1, {"val_loss": 1.0})
    assert not stop.update(2, {"val_loss": 0.95})  # lower, but not by more than min_delta
    assert not stop.update(3, {"val_loss": 0.85})  # better by 0.15: the new best
    assert [stop.update(e, {"val_loss": 0.8}) for e in (4, 5, 6, 7)] == [False, False, False, True]
    assert stop.best_epoch == 3 and stop.best_value == 0.85 and stop.stopped_epoch == 7


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_diverged_metric_stops_at_once_unless_told_otherwise(value):
    model = _model(1.0)
    stop = EarlyStopping("val_loss", patience=5)
    assert not stop.update(1, {"val_loss": 0.5}, model)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    assert stop.update(2, {"val_loss": value}, model)
    assert stop.stopped_epoch == 2 and stop.reason == f"val_loss is {value}" and stop.bad_epochs == 1
    assert stop.restore(model) and model.weight.item() == 1.0
    patient = EarlyStopping("val_accuracy", patience=1, stop_nonfinite=False)  # NaN never improves
    assert [patient.update(e, {"val_accuracy": math.nan}) for e in (1, 2)] == [False, True]
    assert "patience 1" in patient.reason


@pytest.mark.parametrize("bad", [dict(patience=-1), dict(min_delta=-0.01)])
def test_early_stopping_refuses_a_negative_patience_or_min_delta(bad):
    with pytest.raises(ValueError, match="Invalid (patience|min_delta): -"):
        EarlyStopping(**bad)


def test_restore_does_nothing_when_no_weights_were_kept():
    model = _model(2.0)
    stop = EarlyStopping("val_loss", restore_best=False)
    assert not stop.update(1, {"val_loss": 0.5}, model)
    with torch.no_grad():
        model.weight.fill_(3.0)
    assert not stop.restore(model) and model.weight.item() == 3.0
    assert not EarlyStopping().restore(model)  # no epoch recorded yet
