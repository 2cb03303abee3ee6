"""The benchmark engine (fused_opt.benchmark) in quick mode: its derived figures must agree with
its own timings, and its outputs (JSON, markdown, PNG) must be written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from fused_opt import benchmark


def test_quick_benchmark_figures_are_consistent(tmp_path):
    report = benchmark.run(device="cpu", quick=True, reps=2, lists=["5000x1000"], algorithms=["SGD-momentum"],
                           dtypes=("fp32", "bf16"))
    rows = report["results"]
    assert {r["provider"] for r in rows} == {"torch for-loop", "torch foreach", "torch fused", "fused_opt cpu",
                                             "fused_opt reference", "torch for-loop + L1 pass",
                                             "torch foreach + L1 pass", "torch fused + L1 pass",
                                             "torch for-loop + soft threshold", "torch foreach + soft threshold",
                                             "torch fused + soft threshold"}
    for r in rows:
        assert r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert r["bytes_per_param"] == (20 if r["dtype"] == "fp32" else 10)
        assert math.isclose(r["gbps"], r["bytes_per_param"] * r["numel"] / (r["ms"] / 1e3) / 1e9, rel_tol=1e-9)
        assert math.isclose(r["fraction_of_ceiling"], r["gbps"] / r["ceiling_gbps"], rel_tol=1e-9)
        assert r["extra_peak_mb"] >= 0
        assert r["gpu_ops_per_step"] is None  # counted on the GPU only
    for r in (r for r in rows if r["provider"].startswith("fused_opt")):
        best = min(o["ms"] for o in rows if (o["algorithm"], o["dtype"]) == (r["algorithm"], r["dtype"])
                   and o["provider"].startswith("torch"))
        assert math.isclose(r["ratio_to_best_torch"], r["ms"] / best, rel_tol=1e-9)
        assert r["extra_peak_mb"] == 0  # the fused step allocates nothing
    l1_pass = [r for r in rows if r["provider"] == "torch fused + L1 pass" and r["dtype"] == "fp32"]
    assert l1_pass[0]["extra_peak_mb"] > 0  # torch's extra sign() pass allocates a grad-sized list

    paths = benchmark.save(report, str(tmp_path), "test")
    assert [p.rsplit(".", 1)[1] for p in paths] == ["json", "md", "png"]
    assert json.load(open(paths[0]))["results"] == rows
    assert open(paths[1]).read().count("\n| 5000x1000 |") == len(rows)
    assert open(paths[2], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "GPU ops/step" not in open(paths[1]).read()

    # A GPU report adds the count of kernels and copies per step as a last column.
    gpu = dict(report, device="cuda", machine=dict(report["machine"], gpu="H200"),
               results=[dict(r, gpu_ops_per_step=i) for i, r in enumerate(rows)])
    table = [line for line in benchmark.markdown(gpu).splitlines() if line.startswith("| 5000x1000 |")]
    assert [line.rsplit("|", 2)[1].strip() for line in table] == [str(i) for i in range(len(rows))]


def test_the_cli_keeps_the_table_on_disk_after_every_row(tmp_path, monkeypatch):
    # A run stopped by a time limit (gpu_check.sh) must leave what it measured: the JSON and the
    # markdown are rewritten after each row, in the order of --lists.
    from fused_opt import cli

    seen = []
    real_save = benchmark.save

    def save(report, folder, tag, with_chart=True):
        paths = real_save(report, folder, tag, with_chart=False)
        seen.append([(r["params"], r["provider"]) for r in json.load(open(paths[0]))["results"]])
        return paths

    monkeypatch.setattr(benchmark, "save", save)
    assert cli.main(["bench", "--quick", "--reps", "1", "--lists", "5000x1000", "10000x4096", "--algorithms",
                     "RMSprop", "--regularisations", "none", "--backends", "cpu", "--tag", "t", "--out",
                     str(tmp_path), "--no-chart"]) == 0
    rows = seen[-1]
    assert len(rows) == 2 * 3 and len(seen) == len(rows) + 1  # torch for-loop, foreach, fused_opt cpu; final save
    assert [s for s in seen[:-1]] == [rows[:k] for k in range(1, len(rows) + 1)]
    assert [p for p, _ in rows] == ["5000x1000"] * 3 + ["10000x4096"] * 3


def test_the_host_overhead_benchmark_runs_from_a_table(tmp_path):
    # bench/host_overhead.py asserts that the step it times runs from a group table and that the
    # table's check passes; here at a size CI can afford, on the CPU.
    script = Path(__file__).resolve().parents[1] / "bench" / "host_overhead.py"
    result = subprocess.run([sys.executable, str(script), "--tensors", "300", "--numel", "8", "--reps", "2",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "host-overhead-cpu.json").read_text())
    assert [r["what"] for r in report["rows"]] == ["fused_opt: table check", "fused_opt", "fused_opt, fused=False", "torch fused"]
    assert all(0 < r["host_ms"] <= r["step_ms"] for r in report["rows"])
    assert "300 x 8" in report["title"]


def test_the_host_overhead_benchmark_has_rows_for_each_backend(tmp_path):
    # On a GPU it compares the CUDA and Triton backends; here the CUDA path's host code (cuda_sim).
    script = Path(__file__).resolve().parents[1] / "bench" / "host_overhead.py"
    result = subprocess.run([sys.executable, str(script), "--tensors", "50", "--numel", "8", "--reps", "2",
                             "--backends", "cpu", "cuda_sim", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r["what"] for r in json.loads((tmp_path / "host-overhead-cpu.json").read_text())["rows"]]
    assert rows == [f"fused_opt {b}{suffix}" for b in ("cpu", "cuda_sim") for suffix in (": table check", "", ", fused=False")] \
        + ["torch fused"]


def test_the_cli_offers_every_parameter_list():
    from fused_opt import cli

    assert cli.LISTS == tuple(benchmark.PARAM_LISTS)


def test_the_channels_last_list_is_resnet50_laid_out_like_training():
    shapes = benchmark.resnet50_shapes()
    assert (len(shapes), sum(math.prod(s) for s in shapes)) == (161, 25_557_032)  # torchvision's resnet50
    params = benchmark.make_params("resnet50-cl", benchmark.DTYPES["bf16"], "cpu", quick=True)
    convs = [p for p in params if p.dim() == 4]
    assert len(convs) == 53 and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert sum(not p.is_contiguous() for p in convs) > 0  # (1x1 convolutions are both)
    assert all(p.grad.stride() == p.stride() and p.grad.dtype == p.dtype for p in params)
