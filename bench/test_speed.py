"""The benchmark matrix on pytest-benchmark: `pytest bench --benchmark-only`.

Quick (scaled-down lists) unless FUSED_OPT_BENCH_FULL=1; FUSED_OPT_BENCH_DEVICE=cuda on a GPU.
Each run records numel, bytes per param and GB/s in the benchmark's extra_info (see --benchmark-json).
`fused-opt bench` runs the same matrix with the roofline ceiling and writes the results tables.
"""

from __future__ import annotations

import os

import pytest
import torch

from fused_opt import benchmark as B

QUICK = os.environ.get("FUSED_OPT_BENCH_FULL") != "1"
DEVICE = os.environ.get("FUSED_OPT_BENCH_DEVICE", "cpu")
RUNS = B.plan(DEVICE, QUICK, dtypes=("fp32", "bf16"))


@pytest.fixture(scope="module")
def param_lists():
    made = {}

    def get(list_name, dtype_name):
        key = (list_name, dtype_name)
        if key not in made:
            made.clear()  # one list alive at a time
            made[key] = B.make_params(list_name, B.DTYPES[dtype_name], DEVICE, QUICK)
        return made[key]

    return get


@pytest.mark.parametrize("run", RUNS, ids=[f"{lst}-{dt}-{p.algorithm}-{p.name.replace(' ', '_')}" for lst, dt, p in RUNS])
def test_step(benchmark, param_lists, run):
    list_name, dtype_name, provider = run
    params = param_lists(list_name, dtype_name)
    saved = [p.detach().clone() for p in params]
    opt = provider.make(params)

    def step():
        opt.step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5 if QUICK else 9, warmup_rounds=1)
    numel = sum(p.numel() for p in params)
    bytes_per_param = provider.tensors_moved * B.DTYPES[dtype_name].itemsize
    benchmark.extra_info.update(numel=numel, bytes_per_param=bytes_per_param,
                                gbps=bytes_per_param * numel / benchmark.stats.stats.median / 1e9)
    assert all(torch.isfinite(p).all() for p in params), "a step produced non-finite params"
    with torch.no_grad():  # the next provider starts from the same params
        for p, s in zip(params, saved):
            p.copy_(s)
