"""The Triton backend beyond the shared case table (test_parity.py): its kernels compile for real
GPUs with wide loads, its pointer tables are cached and rebuilt, found_inf masks a launch, and
it refuses what it cannot do."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_opt
from fused_opt import dispatch
from cases import INTERPRETER, HostReads

pytestmark = INTERPRETER
HERE = os.path.dirname(__file__)


def _launch():
    assert fused_opt.ops.triton_reason() is None
    from fused_opt.triton import launch
    return launch


def test_kernels_compile_for_sm80_and_sm90_with_16_byte_loads_and_no_fma():
    """Compiled as launch.py launches them: 16-byte loads for every slot of an unmasked block, and no
    multiply-add contracted into an FMA (Triton's default), which would round unlike torch.optim and
    the other backends (and differ from the interpreter the other tests run)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(fused_opt.__file__))  # compile this tree's kernels
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, os.path.join(HERE, "triton_compile.py")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    loads = json.loads(out.stdout)
    # An unmasked block of 2048 elements over 128 threads: 16 elements a thread and slot, so
    # itemsize 16-byte loads for each slot the variant reads.
    itemsize = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
    slots = {("adam", True): 5, ("adam", False): 4, ("rmsprop", True): 5, ("rmsprop", False): 3,
             ("sgd", True): 2, ("sgd", False): 2}  # SGD's first step does not read the fresh buffer
    assert loads.pop("adam-fp32-sm90-tritons-default")["fma"] > 0  # the count sees FMAs where Triton makes them
    counters = {k: loads.pop(k)["stores"] for k in list(loads) if k.startswith("counters-")}
    assert len(counters) == 4 and all(stores > 0 for stores in counters.values()), counters  # the step kernel's
    assert len(loads) == 30
    for variant, counts in loads.items():
        assert counts["fma"] == 0, variant
        count = counts["loads16"]
        family, dtype, _, *kind = variant.split("-")
        if kind == ["master"]:  # the grad in bfloat16; the float32 master copy (not the param) and states
            assert count == itemsize[dtype] + (slots[family, True] - 1) * 4, variant
        else:
            assert count == slots[family, not kind] * itemsize[dtype], variant


def _adam(n=3, **kwargs):
    params = [torch.randn(5 + k, requires_grad=True) for k in range(n)]
    return params, fused_opt.Adam(params, lr=0.1, backend="triton", **kwargs)


def _step(params, opt):
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()


def test_pointer_table_is_kept_while_tensors_stay_and_rebuilt_when_they_move():
    launch = _launch()
    launch._PLANS.clear()
    params, opt = _adam()
    _step(params, opt)
    _step(params, opt)
    assert len(launch._PLANS) == 1
    plan = next(iter(launch._PLANS.values()))
    _step(params, opt)
    assert next(iter(launch._PLANS.values())) is plan
    opt.state[params[1]]["exp_avg"] = opt.state[params[1]]["exp_avg"].clone()  # state moved
    before = params[1].detach().clone()
    _step(params, opt)
    assert len(launch._PLANS) == 2 and not torch.equal(params[1], before)


def test_the_ops_plans_are_reused_and_the_least_recently_used_dropped(monkeypatch):
    """Direct op calls (and steps the group tables cannot take) look their plan up by the kept rows'
    addresses and the sizes: the same tensors reuse one plan, and a full cache drops the plan used
    longest ago, not the oldest made."""
    launch = _launch()
    monkeypatch.setattr(launch, "_MAX_PLANS", 2)
    launch._PLANS.clear()
    calls = []
    for n in (1, 2, 3):
        params = [torch.randn(5 + k) for k in range(n)]
        calls.append((params, [torch.randn_like(p) for p in params], [torch.zeros_like(p) for p in params],
                      [torch.zeros_like(p) for p in params], [], [], [torch.zeros(()) for _ in params]))

    def adam(i):
        torch.ops.fused_opt.triton_adam_(*calls[i], lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                                         amsgrad=False, maximize=False, decoupled_weight_decay=False, l1=0.0,
                                         l1_proximal=False)
        return list(launch._PLANS.values())

    first = adam(0)
    assert len(first) == 1 and adam(0)[0] is first[0] and len(launch._PLANS) == 1  # the same tensors: the same plan
    assert adam(1)[0] is first[0]
    kept = adam(0)  # now the most recently used of the two
    assert kept[-1] is first[0]
    third = adam(2)
    assert len(third) == 2 and third[0] is first[0] and all(plan is not kept[0] for plan in third)
    assert [s.item() for s in calls[0][-1]] == [3.0]  # and each call stepped


class Launches:
    """Stands for the step kernel: runs it, keeping each launch's keyword arguments."""

    def __init__(self, kernels):
        self.kernel, self.calls = kernels.step_kernel, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return run


def test_the_block_map_gives_each_program_one_tensors_slice():
    """Tensors of 4096, 4097, 1 and 0 elements under the interpreter's 4096-element blocks: one,
    two, one and no programs, each told its tensor and where its slice starts."""
    launch = _launch()
    table = torch.arange(6 * 4, dtype=torch.int64).reshape(6, 4) * 4096  # (addresses, never dereferenced)
    plan = launch.plan(table, torch.tensor([4096, 4097, 1, 0]), torch.device("cpu"))
    assert plan.block == 4096 and plan.blocks == 4
    assert plan.block_tensor.tolist() == [0, 1, 1, 2] and plan.block_start.tolist() == [0, 0, 4096, 0]


@pytest.mark.parametrize("param_at,grad_at,aligned", [(0, 0, True), (1, 0, False), (0, 3, False), (4, 8, True)])
def test_wide_loads_only_where_every_tensor_starts_on_16_bytes(param_at, grad_at, aligned, monkeypatch):
    """The kernel's ALIGNED variant (16-byte loads, which a GPU faults on at other addresses) is
    launched only when the param, grad and states all start on 16 bytes; the grads' addresses
    are checked at every call, the rest once per plan. Tensors here: slices of float32 buffers
    starting `param_at` / `grad_at` elements in."""
    launch = _launch()
    launched = Launches(launch.kernels)
    monkeypatch.setattr(launch.kernels, "step_kernel", launched)
    param, grad = torch.randn(64)[param_at:param_at + 9], torch.randn(64)[grad_at:grad_at + 9]
    expected = param.clone()
    for p, g in ((param, grad), (expected, grad.clone())):
        op = torch.ops.fused_opt.triton_sgd_ if p is param else torch.ops.fused_opt.sgd_
        op([p], [g], [torch.zeros(9)], [], lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False,
           maximize=False, first_step=False, l1=0.0, l1_proximal=False)
    assert [kwargs["ALIGNED"] for kwargs in launched.calls] == [aligned] and torch.equal(param, expected)


def test_found_inf_on_the_params_device_masks_the_launch_and_keeps_the_steps():
    params, opt = _adam(amsgrad=True)
    _step(params, opt)
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    opt.found_inf = torch.ones(())
    _step(params, opt)
    for p, b, s in zip(params, before, state):
        assert torch.equal(p, b)
        assert all(torch.equal(opt.state[p][k], v) for k, v in s.items())


def test_found_inf_on_the_params_device_is_not_read_on_the_host():
    """GradScaler's found_inf where the params are: the step is counted, or skipped and not
    counted, on the device, without reading the flag on the host (the interpreter's device is the
    CPU, where such a read shows as aten._local_scalar_dense; on a GPU it would be a sync). The
    steps run from the group's table, which calls the launch (shared with the op, whose insides
    the mode cannot see) directly."""
    params, opt = _adam()
    _step(params, opt)
    for flag, counted in ((0.0, 2), (1.0, 2), (0.0, 3)):
        opt.found_inf = torch.tensor(flag)
        with HostReads(opt.found_inf) as host:
            _step(params, opt)
        assert host.reads == 0 and opt._tables.fast_steps > 0
        assert [opt.state[p]["step"].item() for p in params] == [counted] * len(params)


class FailsToCompile:
    """Stands for a kernel that fails at its first launch (say, out of shared memory on a smaller GPU)."""

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            from triton.runtime.errors import OutOfResources
            raise OutOfResources(300000, 232448, "shared memory")
        return run


@pytest.mark.parametrize("found_inf", [None, 0.0], ids=["no-scaler", "found-inf-clear"])
@pytest.mark.parametrize("path", ["op", "table"])
@pytest.mark.parametrize("capturable", [False, True], ids=["host-steps", "device-steps"])
def test_a_launch_that_fails_leaves_params_and_state_untouched(path, capturable, found_inf, monkeypatch):
    # A kernel that fails to compile raises at its first launch, after the step counters were
    # advanced: they are put back.
    from triton.runtime.errors import OutOfResources

    launch = _launch()
    params, opt = _adam(capturable=capturable)
    _step(params, opt)
    if found_inf is not None:
        opt.found_inf = torch.tensor(found_inf)
    if path == "op":
        opt._tables = fused_opt.tables.Tables()  # forgets the group's table: the next step takes the op
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    monkeypatch.setattr(launch.kernels, "step_kernel", FailsToCompile())
    with pytest.raises(OutOfResources):
        _step(params, opt)
    for p, b, s in zip(params, before, state):
        assert torch.equal(p, b)
        assert all(torch.equal(opt.state[p][k], v) for k, v in s.items())
        assert opt.state[p]["step"].item() == 1


def test_found_inf_is_not_read_on_the_host_with_counters_of_two_dtypes(monkeypatch):
    """Counters that counters_kernel cannot take (two dtypes) still count a step, or not, on the
    device from GradScaler's found_inf (shape (1,)), without a host read (seen here as a call of
    .item() on it), in the op (the first step) and from the group's table (the next ones)."""
    params, opt = _adam()
    _step(params, opt)
    opt.state[params[0]]["step"] = opt.state[params[0]]["step"].double()
    real_item, reads = torch.Tensor.item, []
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t.untyped_storage().data_ptr()) or real_item(t))
    for flag, counted in ((0.0, 2), (1.0, 2), (0.0, 3)):
        opt.found_inf = torch.full((1,), flag)
        before = [p.detach().clone() for p in params]
        _step(params, opt)
        assert opt.found_inf.untyped_storage().data_ptr() not in reads
        assert [real_item(opt.state[p]["step"]) for p in params] == [counted] * len(params)
        assert all(torch.equal(p, b) == bool(flag) for p, b in zip(params, before))
    assert opt._tables.fast_steps == 2


@pytest.mark.parametrize("found_inf", [None, 0.0], ids=["no-scaler", "found-inf-clear"])
def test_a_failed_launch_puts_back_counters_of_two_dtypes(found_inf, monkeypatch):
    """Counters of two dtypes cannot go to counters_kernel: torch's foreach ops advance them, and
    take the advance back when the launch fails."""
    from triton.runtime.errors import OutOfResources

    launch = _launch()
    params = [torch.randn(5), torch.randn(6)]
    steps = [torch.tensor(3.0), torch.tensor(3.0, dtype=torch.float64)]
    assert launch.device_counters(steps, torch.device("cpu")) is None
    monkeypatch.setattr(launch.kernels, "step_kernel", FailsToCompile())
    before = [p.clone() for p in params]
    with pytest.raises(OutOfResources):
        torch.ops.fused_opt.triton_adam_(params, [torch.ones_like(p) for p in params],
                                         [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                                         [], [], steps, lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                                         amsgrad=False, maximize=False, decoupled_weight_decay=False, l1=0.0,
                                         l1_proximal=False,
                                         found_inf=None if found_inf is None else torch.full((1,), found_inf))
    assert [s.item() for s in steps] == [3.0, 3.0] and [s.dtype for s in steps] == [torch.float32, torch.float64]
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_empty_tensors_only_launch_nothing_and_count_the_step(monkeypatch):
    # (a grid of no programs is an error on a GPU)
    launch = _launch()
    launched = Launches(launch.kernels)
    monkeypatch.setattr(launch.kernels, "step_kernel", launched)
    params, opt = _adam()
    params[:] = [torch.zeros(0, requires_grad=True), torch.zeros(0, 3, requires_grad=True)]
    opt.param_groups[0]["params"] = list(params)
    for _ in range(2):
        _step(params, opt)
    assert launched.calls == [] and [opt.state[p]["step"].item() for p in params] == [2.0, 2.0]


@pytest.mark.parametrize("found_inf", [None, 0.0], ids=["no-scaler", "found-inf-clear"])
def test_an_sgd_launch_that_fails_raises_its_error_with_nothing_written(found_inf, monkeypatch):
    """SGD has no step counters to put back: the launch's own error comes through."""
    from triton.runtime.errors import OutOfResources

    launch = _launch()
    monkeypatch.setattr(launch.kernels, "step_kernel", FailsToCompile())
    params, buffers = [torch.randn(5), torch.randn(6)], [torch.randn(5), torch.randn(6)]
    before = [t.clone() for t in params + buffers]
    with pytest.raises(OutOfResources):
        torch.ops.fused_opt.triton_sgd_(params, [torch.ones_like(p) for p in params], buffers, [], lr=0.1,
                                        weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False,
                                        first_step=False, l1=0.0, l1_proximal=False,
                                        found_inf=None if found_inf is None else torch.full((1,), found_inf))
    assert all(torch.equal(t, b) for t, b in zip(params + buffers, before))


class CounterTouches(TorchDispatchMode):
    """Counts the torch ops that take any of `counters` (as an argument or in a list argument)."""

    def __init__(self, counters: list[torch.Tensor]):
        super().__init__()
        self.addresses, self.ops = {c.data_ptr() for c in counters}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])]
        if any(isinstance(t, torch.Tensor) and t.data_ptr() in self.addresses for t in flat):
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("found_inf", [None, 0.0, 1.0], ids=["no-scaler", "found-inf-clear", "found-inf-set"])
@pytest.mark.parametrize("counter_dtype", [torch.float32, torch.float64], ids=["f32-steps", "f64-steps"])
def test_step_counters_on_the_params_device_advance_in_one_launch_of_their_own(found_inf, counter_dtype,
                                                                               monkeypatch):
    # On a GPU, torch's foreach add over 10,000 counters is ~91 launches and stacking them for
    # Adam's bias corrections ~79 more: counters on the params' device (the CPU, here) go to
    # counters_kernel instead, in one launch, and no torch op touches them. The result must be
    # the bits of the foreach path, which counters of mixed dtypes still take.
    launch = _launch()
    monkeypatch.setattr(launch, "COUNTER_BLOCK", 64)  # 1024 on a GPU; fewer tensors to interpret
    n = 64 + 13  # two programs, the second masked
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(2, generator=gen) for _ in range(n)]
    grads = [torch.randn(2, generator=gen) for _ in range(n)]
    steps = [torch.tensor(float(k % 5), dtype=counter_dtype) for k in range(n)]
    flag = None if found_inf is None else torch.tensor(found_inf)
    kwargs = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                  decoupled_weight_decay=False, l1=0.0, l1_proximal=False, found_inf=flag)

    def run(params, steps):
        states = [[torch.zeros(2) for _ in range(n)] for _ in range(2)]
        launch.adam_(params, grads, *states, [], [], steps, **kwargs)
        return states

    via_foreach = ([p.clone() for p in params], [s.clone() for s in steps])
    with monkeypatch.context() as m:
        m.setattr(launch, "device_counters", lambda steps, device: None)
        states_foreach = run(*via_foreach)

    grids, kernel = [], launch.kernels.counters_kernel

    class Counted:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(launch.kernels, "counters_kernel", Counted())
    with CounterTouches(steps) as touches:
        states = run(params, steps)
    assert grids == [(2,)] and touches.ops == []
    assert [s.item() for s in steps] == [k % 5 + (found_inf != 1.0) for k in range(n)]
    for got, want in zip([params, steps, *states], [*via_foreach, *states_foreach]):
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, want))


@pytest.mark.parametrize("checks", ["c++", "python"])
def test_only_counters_all_on_the_params_device_with_one_dtype_go_to_the_kernel(checks, monkeypatch):
    launch = _launch()
    if checks == "python":  # as on a machine where the CPU extension was not built
        monkeypatch.setattr(fused_opt.ops, "load_extensions", lambda: {"fused_opt._C": "ImportError: simulated"})
    cpu = torch.device("cpu")
    steps = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)]
    counters = launch.device_counters(steps, cpu)
    assert counters.addresses.tolist() == [s.data_ptr() for s in steps]
    assert (counters.count, counters.dtype) == (3, torch.float32)
    assert launch.device_counters(steps, torch.device("meta")) is None  # not where the params are
    assert launch.device_counters([*steps, torch.tensor(1.0, dtype=torch.float64)], cpu) is None  # mixed dtypes
    assert launch.device_counters([*steps, torch.tensor(1.0, device="meta")], cpu) is None  # mixed devices
    assert launch.device_counters([], cpu) is None


@pytest.mark.parametrize("checks", ["c++", "python"])
def test_bad_input_gets_the_ops_error_before_any_write(checks, monkeypatch):
    launch = _launch()
    if checks == "python":  # as on a machine where the CPU extension was not built
        monkeypatch.setattr(fused_opt.ops, "load_extensions", lambda: {"fused_opt._C": "ImportError: simulated"})
    params = [torch.randn(4), torch.randn(3)]
    grads = [torch.randn(4), torch.randn(3, dtype=torch.float64)]
    states = [[torch.zeros(4), torch.zeros(3)] for _ in range(2)]
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    before = [p.clone() for p in params]
    with pytest.raises(RuntimeError, match=r"triton_adam_: grads\[1\] has dtype (Double|torch.float64) but its param"):
        launch.adam_(params, grads, *states, [], [], steps, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8,
                     amsgrad=False, maximize=False, decoupled_weight_decay=False, l1=0.0, l1_proximal=False)
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and [s.item() for s in steps] == [0.0, 0.0]


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    launch = _launch()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    dispatch.clear_cache()
    try:
        with pytest.raises(RuntimeError, match="triton: runs on cpu tensors only under TRITON_INTERPRET=1"):
            dispatch.select("triton", torch.device("cpu"), torch.float32)
        p = torch.zeros(3)
        with pytest.raises(RuntimeError, match="only under TRITON_INTERPRET=1"):
            launch.sgd_([p], [torch.ones(3)], [], [], lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0,
                        nesterov=False, maximize=False, first_step=False, l1=0.0, l1_proximal=False)
        assert torch.equal(p, torch.zeros(3))
    finally:
        dispatch.clear_cache()


def test_a_cuda_graph_capture_is_refused_before_anything_is_written(monkeypatch):
    # The GPU half (a real capture) is in tests/test_cuda_graphs.py; here the refusal itself.
    launch = _launch()
    calls = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: calls.append(1) or True)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph.*backend='cuda'"):
        launch.refuse_capture(torch.device("cuda"))
    launch.refuse_capture(torch.device("cpu"))  # CPU tensors are never captured: not even asked
    assert calls == [1]


@pytest.mark.parametrize("path", ["op", "table"])
def test_each_step_path_asks_about_a_capture_before_writing(path, monkeypatch):
    launch = _launch()
    params, opt = _adam()
    _step(params, opt)
    if path == "op":
        opt._tables = fused_opt.tables.Tables()  # forgets the group's table: the next step takes the op
    before = [p.detach().clone() for p in params]

    def capturing(device):
        raise RuntimeError("a capture is on (simulated)")

    monkeypatch.setattr(launch, "refuse_capture", capturing)
    launch._PLANS.clear()
    with pytest.raises(RuntimeError, match="simulated"):
        _step(params, opt)
    assert not launch._PLANS  # nor was a plan copied to the device (a copy a capture cannot hold)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert [opt.state[p]["step"].item() for p in params] == [1.0] * len(params)


def test_auto_never_picks_the_interpreter_for_cpu_params():
    assert dispatch.select("triton", torch.device("cpu"), torch.float32).name == "triton"
    assert dispatch.select("auto", torch.device("cpu"), torch.float32).name == "cpu"


def test_block_size_follows_the_measured_rule(monkeypatch):
    # launch.py's rule from the H200 sweep: 1024 elements a program for large tensors, 2048 for
    # small ones; a fixed size under the interpreter; the sweep's override wins.
    from fused_opt.triton import launch
    gpu, host = torch.device("cuda"), torch.device("cpu")
    gpt_like = torch.tensor([50257 * 2048, 2048, 2048 * 8192, 2048])  # mean far above 64K
    many_small = torch.full((10000,), 4096)
    assert launch.block_size(gpt_like, gpu) == 1024
    assert launch.block_size(many_small, gpu) == 2048
    assert launch.block_size(torch.full((3,), launch.LARGE_TENSOR), gpu) == 1024
    assert launch.block_size(torch.full((3,), launch.LARGE_TENSOR - 1), gpu) == 2048
    assert launch.block_size(gpt_like, host) == launch.BLOCK_INTERPRETED == 4096
    monkeypatch.setattr(launch, "block_override", 8192)
    assert launch.block_size(many_small, gpu) == 8192
