"""The CUDA kernels' traversal, run on the CPU by the cuda_sim backend: launches that fill up on
tensors or blocks, a tensor spanning two launches, unaligned storage and odd lengths (masked
path), compared with the CPU kernels; and how the GPU's launches are packed (launch_plan)."""

from __future__ import annotations

import math

import pytest
import torch

import fused_opt

CHUNK = 65536
MAX_TENSORS, MAX_BLOCKS = 32, 320  # the simulation's launches (the GPU's: 256 tensors, 2560 blocks)
GPU_MAX_TENSORS, GPU_MAX_BLOCKS = 256, 2560


def _run(sizes, backend, offset=0, dtype=torch.float32, steps=2, master_weights=False, device="cpu"):
    g = torch.Generator().manual_seed(0)
    params = []
    for n in sizes:
        base = torch.randn(n + offset, generator=g).to(device, dtype)
        params.append(base[offset:].requires_grad_())  # offset 1: storage not 16-byte aligned
    opt = fused_opt.Adam(params, lr=0.01, weight_decay=0.1, l1=0.01, l1_mode="proximal", backend=backend,
                         master_weights=master_weights)
    for step in range(steps):
        gg = torch.Generator().manual_seed(step + 1)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gg).to(device, dtype)
        opt.step()
    return params, opt


LAYOUTS = {
    "many_small_tensors": [5, 17, 1024, 4096, 3] * 20,               # > 32 tensors: several launches
    "tensor_spans_launches": [MAX_BLOCKS * CHUNK + 12345, 77],       # > 320 blocks in one tensor
    "chunk_edges": [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3],
}


# The same edges at the GPU's launch bounds (run by gpu_check.sh; the CPU kernels run alongside).
GPU_LAYOUTS = {
    "many_small_tensors": [5, 17, 1024, 4096, 3] * 120,                       # > 256 tensors
    "tensor_spans_launches": [GPU_MAX_BLOCKS * CHUNK + 12345, 77],           # > 2560 blocks in one tensor
    "chunk_edges": LAYOUTS["chunk_edges"],
}


def _assert_same_adam(params, opt, ref_params, ref_opt, exact=True):
    """The same bits as the CPU kernels when the traversal runs on the CPU (the same math, no FMA in
    either build); on a GPU within an ulp or so (its pow, for device step counters, is libdevice's)."""
    rtol, atol = (0, 0) if exact else (1e-6, 1e-7)
    for i, (a, b) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(a.cpu(), b, rtol=rtol, atol=atol, msg=lambda m: f"param {i}: {m}")
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[a][key].cpu(), ref_opt.state[b][key], rtol=rtol, atol=atol,
                                       msg=lambda m: f"param {i} {key}: {m}")


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_simulated_cuda_traversal_matches_cpu_kernels(layout, offset):
    sizes = LAYOUTS[layout]
    _assert_same_adam(*_run(sizes, "cuda_sim", offset), *_run(sizes, "cpu", offset))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("layout", GPU_LAYOUTS)
def test_cuda_traversal_matches_cpu_kernels(layout, offset):
    sizes = GPU_LAYOUTS[layout]
    _assert_same_adam(*_run(sizes, "cuda", offset, device="cuda"), *_run(sizes, "cpu", offset), exact=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_simulated_cuda_traversal_other_dtypes(dtype):
    sizes = [7, 4097, CHUNK + 9]
    sim, _ = _run(sizes, "cuda_sim", 0, dtype)
    cpu, _ = _run(sizes, "cpu", 0, dtype)
    for a, b in zip(sim, cpu):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same math, no FMA in either build


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("layout", ["many_small_tensors", "chunk_edges"])
def test_simulated_cuda_traversal_with_master_weights(layout, offset):
    """bfloat16 params with float32 master copies and states: 8 elements a vector step, two 16-byte
    loads for each float32 slot, the param written but not read."""
    sizes = LAYOUTS[layout]
    sim, sim_opt = _run(sizes, "cuda_sim", offset, torch.bfloat16, master_weights=True)
    cpu, cpu_opt = _run(sizes, "cpu", offset, torch.bfloat16, master_weights=True)
    for i, (a, b) in enumerate(zip(sim, cpu)):
        for key in ("master_param", "exp_avg", "exp_avg_sq"):
            assert sim_opt.state[a][key].dtype == torch.float32
            torch.testing.assert_close(sim_opt.state[a][key], cpu_opt.state[b][key], rtol=0, atol=0,
                                       msg=lambda m: f"param {i} {key}: {m}")  # the same math, no FMA
        assert torch.equal(a, sim_opt.state[a]["master_param"].to(torch.bfloat16))


@pytest.mark.parametrize("config", range(4))
def test_the_sanitizer_workload_agrees_with_the_reference_on_cuda_sim(config):
    # bench/sanitize_cuda.py, which gpu_check.sh runs under compute-sanitizer, on the CPU
    # simulation of the same traversal (float32: its agreement limit there is 1e-5).
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "bench" / "sanitize_cuda.py"
    spec = importlib.util.spec_from_file_location("sanitize_cuda", path)
    workload = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(workload)
    opt_cls, kwargs = workload.CONFIGS[config]
    assert workload.run("cuda_sim", opt_cls, kwargs, torch.float32, False, "cpu") <= 1e-5


def _check_plan(numels, plan, max_tensors, max_blocks):
    """Every chunk of every non-empty tensor in exactly one block, in order, with its own numel and
    step; every launch within its bounds and, but the last, full in blocks or in tensors (no launch
    wasted). Tensor t is described by launch_plan with slot-k address 8 * (16 * (t + 1) + k) and
    host step t; each launch comes as (the block count it was given, the blocks read from it)."""
    seen = []
    for i, (count, launch) in enumerate(plan):
        tensors = len({addr for addr, *_ in launch})
        assert count >= 1, f"launch {i} is empty"
        assert count <= max_blocks, f"launch {i} was given {count} blocks"
        assert count == len(launch), f"launch {i}: {count} blocks given, {len(launch)} readable"
        assert tensors <= max_tensors, f"launch {i} holds {tensors} tensors"
        if i + 1 < len(plan):
            assert count == max_blocks or tensors == max_tensors, f"launch {i} left room ({count} blocks, {tensors} tensors)"
        for addr, master_addr, numel, step, chunk in launch:
            t = addr // 128 - 1
            assert addr == 128 * (t + 1) and master_addr == addr + 8 * 5, f"launch {i}: wrong addresses {addr}, {master_addr}"
            assert numel == numels[t], f"launch {i}: tensor {t} has numel {numel}, not {numels[t]}"
            assert step == t, f"launch {i}: tensor {t} has step {step}, not {t}"
            seen.append((t, chunk))
    expected = [(t, c) for t, n in enumerate(numels) for c in range(-(-n // CHUNK))]
    assert seen == expected, f"chunks covered {seen[:8]}..., expected {expected[:8]}..."


def _block(numels, t, chunk):
    return (128 * (t + 1), 128 * (t + 1) + 40, numels[t], float(t), chunk)


def test_a_small_plan_is_packed_as_worked_out_by_hand():
    # Bounds of 2 tensors / 2 blocks: [t0 chunk 0, t1 chunk 0] fills the blocks, so tensor 1 goes on
    # in the next launch (in slot 0) with its chunk 1; the empty tensor 2 takes no block.
    from fused_opt._C import launch_plan

    numels = [3, CHUNK + 1, 0]
    b = lambda t, c: _block(numels, t, c)  # noqa: E731
    plan = launch_plan(numels, 2, 2)
    assert plan == [(2, [b(0, 0), b(1, 0)]), (1, [b(1, 1)])]
    _check_plan(numels, plan, 2, 2)  # and the check below accepts it (it rejects each bad variant)


# For numels [3, CHUNK + 1] at bounds (2 tensors, 2 blocks) unless given: each plan breaks one rule,
# and the check must reject it for that rule (its message), not for another.
BAD_PLANS = {
    "empty launch": (lambda b: [(0, []), (2, [b(0, 0), b(1, 0)]), (1, [b(1, 1)])], "launch 0 is empty"),
    "over-full launch": (lambda b: [(3, [b(0, 0), b(1, 0), b(1, 1)])], "launch 0 was given 3 blocks"),
    "too many tensors": (lambda b: [(2, [b(0, 0), b(1, 0)]), (1, [b(1, 1)])], "launch 0 holds 2 tensors", (1, 2)),
    "blocks given but not readable": (lambda b: [(2, [b(0, 0)]), (2, [b(1, 0), b(1, 1)])],
                                      "launch 0: 2 blocks given, 1 readable"),
    "launch left room": (lambda b: [(1, [b(0, 0)]), (2, [b(1, 0), b(1, 1)])], "launch 0 left room"),
    "wrong address": (lambda b: [(2, [b(0, 0), b(1, 0)[:1] + (0,) + b(1, 0)[2:]]), (1, [b(1, 1)])],
                      "launch 0: wrong addresses"),
    "wrong numel": (lambda b: [(2, [b(0, 0), b(1, 0)[:2] + (7,) + b(1, 0)[3:]]), (1, [b(1, 1)])],
                    "launch 0: tensor 1 has numel 7"),
    "wrong step": (lambda b: [(2, [b(0, 0), b(1, 0)]), (1, [b(1, 1)[:3] + (5.0,) + b(1, 1)[4:]])],
                   "launch 1: tensor 1 has step 5.0"),
    "chunk missing": (lambda b: [(2, [b(0, 0), b(1, 0)])], "chunks covered"),
    "chunk twice": (lambda b: [(2, [b(0, 0), b(1, 0)]), (2, [b(1, 0), b(1, 1)])], "chunks covered"),
}


@pytest.mark.parametrize("bad", BAD_PLANS)
def test_the_plan_check_rejects_each_kind_of_bad_plan(bad):
    numels = [3, CHUNK + 1]
    build, message, *bounds = BAD_PLANS[bad]
    with pytest.raises(AssertionError, match=message):
        _check_plan(numels, build(lambda t, c: _block(numels, t, c)), *(bounds[0] if bounds else (2, 2)))


@pytest.mark.parametrize("layout", ["gpt-1b", "10000x4096", "mixed"])
def test_gpu_launches_hold_many_tensors(layout):
    """What issue 3 asks of the launch count, with the GPU's bounds: a GPT-shaped 1B-param list in a
    handful of launches, 10,000 small tensors in a few dozen."""
    from fused_opt._C import launch_plan

    from fused_opt.benchmark import gpt_shapes
    numels = {
        "gpt-1b": [math.prod(s) for s in gpt_shapes(2048, 20, 50257, 2048)],
        "10000x4096": [4096] * 10000,
        "mixed": [0, 5, GPU_MAX_BLOCKS * CHUNK + 3, 0, 7] + [CHUNK + 1] * 300 + [1] * 600,
    }[layout]
    plan = launch_plan(numels)
    _check_plan(numels, plan, GPU_MAX_TENSORS, GPU_MAX_BLOCKS)
    launches = {"gpt-1b": 7, "10000x4096": 40, "mixed": 5}[layout]
    assert len(plan) <= launches, f"{len(plan)} launches"


@pytest.mark.parametrize("limits", [(1, 1), (2, 3), (32, 320), (256, 2560)])
def test_launch_packing_at_any_bounds(limits):
    from fused_opt._C import launch_plan

    numels = [3, CHUNK, 0, 2 * CHUNK + 1, 1, 5 * CHUNK, 0, 9] * 5
    _check_plan(numels, launch_plan(numels, *limits), *limits)


def test_launch_plan_refuses_bounds_over_the_capacity():
    from fused_opt._C import launch_plan

    with pytest.raises(RuntimeError, match="limits must be within"):
        launch_plan([1], GPU_MAX_TENSORS + 1, 1)


def _gpu_step_kernels(count: int, path: str, backend: str) -> list[str]:
    """The GPU kernels (and copies) of the second Adam step of `count` tensors of 4,096 elements."""
    params = [torch.zeros(4096, device="cuda", requires_grad=True) for _ in range(count)]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = fused_opt.Adam(params, backend=backend)
    opt.step()  # creates the states (and the group's table)
    if path == "op":
        opt._tables = fused_opt.tables.Tables()  # forgets the table: the next step takes the op
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA], acc_events=True) as prof:
        opt.step()
        torch.cuda.synchronize()
    assert opt.state[params[0]]["step"].device.type == "cuda" and opt.state[params[-1]]["step"].item() == 2
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("path", ["op", "table"])
def test_a_gpu_step_launches_as_planned(path):
    """10,000 tensors of 4,096 elements: one step is 40 update launches and 3 that advance the step
    counters on the GPU, and nothing else (the profiler counts them), through the op and through
    the cached group table."""
    from fused_opt._C import counters_per_launch, launch_plan

    kernels = _gpu_step_kernels(10000, path, "cuda")
    updates = [name for name in kernels if "multi_tensor_kernel" in name]
    counters = [name for name in kernels if "advance_counters_kernel" in name]
    assert len(updates) == len(launch_plan([4096] * 10000)) == 40, kernels[:5]
    assert len(counters) == -(-10000 // counters_per_launch) == 3, kernels[:5]
    assert len(kernels) == len(updates) + len(counters), [name for name in kernels if name not in updates + counters][:5]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or fused_opt.ops.triton_reason() is not None,
                    reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("path", ["op", "table"])
def test_a_gpu_triton_step_is_one_update_launch_and_one_counter_launch(path):
    """10,000 tensors: one launch of the update and one of counters_kernel; what else runs (Adam's
    bias corrections over all counters at once, the scalars' and tables' copies) is the same for
    100 tensors, so nothing is launched per tensor or per group of tensors."""
    kernels = _gpu_step_kernels(10000, path, "triton")
    assert sum("step_kernel" in name for name in kernels) == 1, kernels[:20]
    assert sum("counters_kernel" in name for name in kernels) == 1, kernels[:20]
    assert len(kernels) == len(_gpu_step_kernels(100, path, "triton")), kernels[:20]


# 64-bit index math: a tensor of more than 2**31 elements (bfloat16, 4.3 GB, and its grad), whose
# last chunks lie past every 32-bit offset. p starts at 0 and takes one SGD step with lr 1, so it
# must end as exactly -grad: an element left unwritten stays 0, one written from the wrong place
# gets another grad (the grad is random around the 2**31 boundary and in the first and last chunks).
HUGE = 2**31 + 3 * CHUNK + 5
_PROBED = [slice(0, CHUNK), slice(2**31 - CHUNK, 2**31 + CHUNK), slice(HUGE - 2 * CHUNK - 7, HUGE)]


def _available_bytes(device):
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def _huge_step(backend, device):
    if _available_bytes(device) < 12 * 2**30:
        pytest.skip(f"needs 12 GiB free on {device} for two tensors of {HUGE} bfloat16 elements")
    p = torch.zeros(HUGE, dtype=torch.bfloat16, device=device, requires_grad=True)
    g = torch.ones(HUGE, dtype=torch.bfloat16, device=device)
    gen = torch.Generator().manual_seed(0)
    for s in _PROBED:
        g[s] = torch.randn(s.stop - s.start, generator=gen).to(device, torch.bfloat16)
    p.grad = g
    fused_opt.SGD([p], lr=1.0, backend=backend).step()
    with torch.no_grad():
        for start in range(0, HUGE, 2**28):  # p + g == 0 everywhere, a slice at a time
            end = min(start + 2**28, HUGE)
            wrong = (p[start:end] + g[start:end]).ne(0).nonzero()
            assert len(wrong) == 0, f"{backend}: element {start + int(wrong[0])} of {HUGE} is wrong"


@pytest.mark.parametrize("backend", ["cpu", "cuda_sim"])
def test_a_tensor_over_2_31_elements(backend):
    _huge_step(backend, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_a_tensor_over_2_31_elements_on_the_gpu(backend):
    _huge_step(backend, "cuda")


def test_the_plan_of_tensors_over_2_31_elements():
    from fused_opt._C import launch_plan

    numels = [HUGE, 3, 2**32 + CHUNK + 1]
    _check_plan(numels, launch_plan(numels), GPU_MAX_TENSORS, GPU_MAX_BLOCKS)


@pytest.mark.parametrize("path", ["op", "table"])
@pytest.mark.parametrize("counters", ["device", "host", "both"])
def test_a_failed_launch_leaves_params_and_state_untouched(path, counters):
    """A GPU launch can fail before it runs (an invalid configuration, say) and raises at once;
    the step counters advanced before it are put back, so the step raises with nothing changed,
    and the functional layer does not retry it on its slow path. Float32 counters take the
    device-counter path in cuda_sim, float64 ones the host path."""
    from fused_opt._C import set_failing_sim_launches

    dtype = torch.float32 if counters != "host" else torch.float64
    params = [torch.randn(n, dtype=dtype, requires_grad=True) for n in (5, 70000, 3)]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the step counters' dtype follows it, as in torch.optim
    try:
        opt = fused_opt.Adam(params, lr=0.1, backend="cuda_sim", amsgrad=True)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    finally:
        torch.set_default_dtype(default)
    assert opt.state[params[0]]["step"].dtype == dtype
    if counters == "both":
        opt.state[params[1]]["step"] = opt.state[params[1]]["step"].double()
    if path == "op":
        opt._tables = fused_opt.tables.Tables()  # forgets the group's table: the next step takes the op
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    set_failing_sim_launches(1)
    try:
        with pytest.raises(RuntimeError, match="simulated launch failure"):
            opt.step()
    finally:
        set_failing_sim_launches(0)
    for p, b, s in zip(params, before, state):
        assert torch.equal(p, b)
        for key, value in s.items():
            assert torch.equal(opt.state[p][key], value), key
    opt.step()  # and the next step runs
    assert all(opt.state[p]["step"].item() == 2 for p in params)


SIM_COUNTERS_PER_LAUNCH = 7  # cuda_sim.cpp's limit; a GPU launch advances up to 4,000 counters


@pytest.mark.parametrize("path", ["op", "table"])
@pytest.mark.parametrize("failing", [0, 1, 2], ids=["first", "second", "third"])
def test_device_step_counters_advance_in_launches_of_their_own(failing, path):
    """Float32 step counters (the device kind, in cuda_sim) advance before the update in launches
    of their own, 7 counters a launch in cuda_sim: 20 params take three. With found_inf set on the
    device none counts; when one of the three launches fails, the step raises with every counter,
    param and state as it was (the launches before it are undone), and the next step runs."""
    from fused_opt._C import set_failing_sim_launches

    n = 3 * SIM_COUNTERS_PER_LAUNCH - 1
    torch.manual_seed(0)
    ours = [torch.randn(1 + 37 * i, requires_grad=True) for i in range(n)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = fused_opt.Adam(ours, lr=0.1, backend="cuda_sim", amsgrad=True)
    ref = torch.optim.Adam(theirs, lr=0.1, amsgrad=True, foreach=False)

    def step(found_inf=None, reference=True):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        if path == "op":
            opt._tables = fused_opt.tables.Tables()  # forgets the group's table: the step takes the op
        opt.found_inf = found_inf
        opt.step()
        if reference:
            ref.step()

    def counters():
        return [float(opt.state[p]["step"]) for p in ours]

    step()
    step(found_inf=torch.ones(()), reference=False)
    assert counters() == [1.0] * n
    step(found_inf=torch.zeros(()))
    assert counters() == [2.0] * n and opt.state[ours[0]]["step"].dtype == torch.float32
    before = [p.detach().clone() for p in ours], [{k: v.clone() for k, v in opt.state[p].items()} for p in ours]
    set_failing_sim_launches(1, counters=True, after=failing)
    try:
        with pytest.raises(RuntimeError, match=r"simulated launch failure \(step counters\)"):
            step(reference=False)
    finally:
        set_failing_sim_launches(0, counters=True)
    for p, saved, saved_state in zip(ours, *before):
        assert torch.equal(p, saved)
        assert all(torch.equal(opt.state[p][k], v) for k, v in saved_state.items())
    step()
    assert counters() == [3.0] * n
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=(
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")))])
def test_a_group_with_both_kinds_of_step_counter(device):
    """Device counters (float32 on the params' device: in cuda_sim, on the CPU) and host counters
    (on a GPU, those on the CPU, as fused=False keeps them; in cuda_sim, float64 ones) in one group,
    as capturable switched on mid-run leaves them: every param steps as torch.optim's, and a step skipped by found_inf (on the
    device, as GradScaler keeps it) counts none of them."""
    backend = "cuda_sim" if device == "cpu" else "cuda"
    torch.manual_seed(0)
    ours = [torch.randn(n, device=device, requires_grad=True) for n in (5, 7, 3)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = fused_opt.Adam(ours, lr=0.1, backend=backend, fused=False)  # fused=False: host counters first
    ref = torch.optim.Adam(theirs, lr=0.1, foreach=False)

    def step(with_grads, found_inf=None):
        for i in with_grads:
            g = torch.randn(ours[i].shape, device=device)
            ours[i].grad, theirs[i].grad = g.clone(), g.clone()
        opt.found_inf = found_inf
        opt.step()
        if found_inf is None or not found_inf.item():
            ref.step()

    step([0])
    if device == "cuda":
        opt.param_groups[0]["capturable"] = True  # new counters on the device
    step([0, 1, 2])
    if device == "cpu":
        opt.state[ours[2]]["step"] = opt.state[ours[2]]["step"].double()  # the host kind, in cuda_sim
    kinds = {(s.device.type, s.dtype) for s in (opt.state[p]["step"] for p in ours)}
    assert len(kinds) == 2, kinds
    step([0, 1, 2], found_inf=torch.ones((), device=device))
    assert [float(opt.state[p]["step"]) for p in ours] == [2.0, 1.0, 1.0]
    step([0, 1, 2], found_inf=torch.zeros((), device=device))
    step([0, 1, 2])
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for p, q in zip(ours, theirs):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-6, atol=1e-7)
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"])


SAME_BITS_CONFIGS = [("Adam", {"amsgrad": True, "weight_decay": 0.1}), ("AdamW", {"weight_decay": 0.1, "l1": 0.01}),
                     ("RMSprop", {"centered": True, "momentum": 0.9}),
                     ("RMSprop", {"l1": 0.01, "l1_mode": "proximal"}),
                     ("SGD", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name,kwargs", SAME_BITS_CONFIGS)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_and_triton_kernels_give_the_same_bits_on_a_gpu(name, kwargs, dtype):
    """Neither GPU backend contracts a multiply and an add into an FMA, and both write the same math
    (math.h, triton/kernels.py) in the same order: on a GPU they agree bit for bit, as their CPU
    stand-ins (cuda_sim, Triton's interpreter) do. Triton's default would contract."""
    runs = {}
    for backend in ("cuda", "triton"):
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(n, generator=g).to("cuda", dtype).requires_grad_() for n in (1, 4099, 3 * CHUNK + 5)]
        opt = getattr(fused_opt, name)(params, lr=0.01, backend=backend, **kwargs)
        for step in range(5):
            gg = torch.Generator().manual_seed(step + 1)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gg).to("cuda", dtype)
            opt.step()
        runs[backend] = [t for p in params for t in [p.detach()] + [opt.state[p][k] for k in sorted(opt.state[p])]]
    for a, b in zip(runs["cuda"], runs["triton"]):
        assert torch.equal(a, b)
