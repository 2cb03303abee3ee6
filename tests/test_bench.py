"""The benchmark's quick mode runs, and its derived figures are consistent with its timings."""

from __future__ import annotations

import math

from bench import roofline


def test_quick_benchmark_figures_are_consistent():
    report = roofline.run(quick=True, reps=2, device="cpu", only=["SGD-momentum", "Adam+L1+L2"], lists=["5000x1000"])
    rows = report["results"]
    assert {r["provider"] for r in rows} == {"torch for-loop", "torch foreach", "torch fused", "fused_opt",
                                             "torch fused + L1 pass"}
    for r in rows:
        assert r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert math.isclose(r["gbps"], r["bytes_per_param"] * r["numel"] / (r["ms"] / 1e3) / 1e9, rel_tol=1e-9)
        assert math.isclose(r["fraction_of_ceiling"], r["gbps"] / r["ceiling_gbps"], rel_tol=1e-9)
    for r in (r for r in rows if r["provider"] == "fused_opt"):
        best = min(o["ms"] for o in rows if o["algorithm"] == r["algorithm"] and o["provider"] != "fused_opt")
        assert math.isclose(r["ratio_to_best_torch"], r["ms"] / best, rel_tol=1e-9)
    table = roofline.markdown(report)
    assert table.count("\n| 5000x1000 |") == len(rows)
