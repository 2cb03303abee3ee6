"""The CUDA kernels' traversal, run on the CPU by the cuda_sim backend: launches that fill up on
tensors or blocks, a tensor spanning two launches, unaligned storage and odd lengths (masked
path), compared with the CPU kernels."""

from __future__ import annotations

import pytest
import torch

import fused_opt

CHUNK, MAX_TENSORS, MAX_BLOCKS = 65536, 32, 320


def _run(sizes, backend, offset=0, dtype=torch.float32, steps=2, master_weights=False):
    g = torch.Generator().manual_seed(0)
    params = []
    for n in sizes:
        base = torch.randn(n + offset, generator=g).to(dtype)
        params.append(base[offset:].requires_grad_())  # offset 1: storage not 16-byte aligned
    opt = fused_opt.Adam(params, lr=0.01, weight_decay=0.1, l1=0.01, l1_mode="proximal", backend=backend,
                         master_weights=master_weights)
    for step in range(steps):
        gg = torch.Generator().manual_seed(step + 1)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gg).to(dtype)
        opt.step()
    return params, opt


LAYOUTS = {
    "many_small_tensors": [5, 17, 1024, 4096, 3] * 20,               # > 32 tensors: several launches
    "tensor_spans_launches": [MAX_BLOCKS * CHUNK + 12345, 77],       # > 320 blocks in one tensor
    "chunk_edges": [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3],
}


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_simulated_cuda_traversal_matches_cpu_kernels(layout, offset):
    sizes = LAYOUTS[layout]
    sim, sim_opt = _run(sizes, "cuda_sim", offset)
    cpu, cpu_opt = _run(sizes, "cpu", offset)
    for i, (a, b) in enumerate(zip(sim, cpu)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"param {i}: {m}")
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sim_opt.state[a][key], cpu_opt.state[b][key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_simulated_cuda_traversal_other_dtypes(dtype):
    sizes = [7, 4097, CHUNK + 9]
    sim, _ = _run(sizes, "cuda_sim", 0, dtype)
    cpu, _ = _run(sizes, "cpu", 0, dtype)
    for a, b in zip(sim, cpu):
        # Same fp32/fp64 math; FMA contraction may differ between the two builds by an ulp.
        torch.testing.assert_close(a, b, rtol=torch.finfo(dtype).eps * 2, atol=torch.finfo(dtype).eps * 2)


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
            torch.testing.assert_close(sim_opt.state[a][key], cpu_opt.state[b][key], rtol=1e-6, atol=1e-7,
                                       msg=lambda m: f"param {i} {key}: {m}")
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
