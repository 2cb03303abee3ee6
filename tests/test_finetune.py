"""The reference fine-tune end to end on a tiny slice (real model, real data, seconds)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fused_opt import finetune
from fused_opt.training import OutOfMemory

REQUIRED = {"impl", "optimizer", "val_accuracy", "val_loss", "optimizer_step_ms", "train_step_ms", "epochs_run",
            "stopped_early", "batch_size"}


def tiny(**kw):
    base = dict(limit=40, max_length=16, epochs=2, batch_size=4, effective_batch=8, progress=False)
    return finetune.Config(**{**base, **kw})


def test_pipeline_end_to_end(tmp_path):
    report = finetune.run(tiny(), out=str(tmp_path))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [r["impl"] for r in saved["runs"]] == ["torch", "fused_opt"]
    for r in saved["runs"]:
        assert REQUIRED <= r.keys()
        assert r["epochs_run"] == 2 and r["batch_size"] == 4 and r["effective_batch"] == 8
        assert len(r["history"]["train_loss"]) == 2 * 4  # 28 train articles / 8 per step, 2 epochs
        assert 0.0 <= r["val_accuracy"] <= 1.0 and r["optimizer_step_ms"] > 0
    # Same seed, weights, dropout masks and data order: the two loss curves agree to rounding.
    assert report["comparison"]["max_train_loss_difference"] < 1e-4
    assert "| fused_opt | fused_opt.AdamW |" in (tmp_path / "report.md").read_text()
    for png in ("curves.png", "step_times.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_threshold_stopping_and_proximal_l1(tmp_path):
    report = finetune.run(tiny(epochs=3, stop_at_accuracy=0.0, l1=0.5, l1_mode="proximal", impls=("fused_opt",)))
    run = report["runs"][0]
    assert run["epochs_run"] == 1 and run["stopped_early"] and "val_accuracy" in run["stop_reason"]
    assert run["zero_weight_fraction"] > 0.0


def test_torch_cannot_take_an_l1_term():
    with pytest.raises(ValueError, match="no L1 term"):
        finetune.run(tiny(l1=0.1, impls=("torch",)))


def test_auto_batch_size_is_bounded_by_the_memory_budget():
    with pytest.raises(OutOfMemory, match="batch size 1 does not fit"):
        finetune.run(tiny(batch_size="auto", memory_budget_mb=0.001, impls=("fused_opt",)))
    report = finetune.run(tiny(batch_size="auto", memory_budget_mb=8000, epochs=1, impls=("fused_opt",)))
    assert report["runs"][0]["batch_size"] in range(1, 29)  # at most the training set (28)


def test_random_batch_sizes_and_lr_range_test(tmp_path):
    report = finetune.run(tiny(batch_size="random:3:9", lr="auto", lr_finder_steps=30, epochs=1), out=str(tmp_path))
    finder = report["lr_finder"]
    assert report["config"]["lr"] == finder["suggestion"] and 1e-7 <= finder["suggestion"] <= 1e-2
    torch_run, fused_run = report["runs"]
    assert torch_run["history"]["batch_size"] == fused_run["history"]["batch_size"]  # same seeded draws
    sizes = fused_run["history"]["batch_size"]
    assert sum(sizes) == report["sizes"]["train"] and all(3 <= s <= 9 for s in sizes[:-1])
    assert report["comparison"]["max_train_loss_difference"] < 1e-4
    assert (tmp_path / "lr_finder.png").read_bytes()[:4] == b"\x89PNG"
    assert "LR range test" in (tmp_path / "report.md").read_text()


def test_packed_assets_give_the_same_data_and_the_weights_rounded_to_float16(tmp_path):
    # The folder carried to a machine without the packages (--pack-assets / --assets).
    import torch
    from transformers import AutoTokenizer

    assets = str(tmp_path / "assets")
    sizes = finetune.pack_assets(assets)
    assert sizes["model"] < 50e6 and sizes["model"] + sizes["corpus"] < 60 * 2**20  # fits the 64 MiB carry
    assert finetune.load_bbc(assets) == finetune.load_bbc()
    cfg = tiny(limit=60)
    packed = finetune.prepare_data(dataclasses.replace(cfg, assets=assets),
                                   AutoTokenizer.from_pretrained(finetune.model_path(assets)))
    stock = finetune.prepare_data(cfg, AutoTokenizer.from_pretrained(finetune.model_path()))
    assert torch.equal(packed.input_ids, stock.input_ids) and torch.equal(packed.labels, stock.labels)
    torch.manual_seed(0)
    widened = finetune.load_model(5, "cpu", assets).state_dict()
    torch.manual_seed(0)
    original = finetune.load_model(5, "cpu").state_dict()
    assert widened.keys() == original.keys()
    for name, value in original.items():
        assert widened[name].dtype == value.dtype
        expected = value.half().float() if value.is_floating_point() and "classifier" not in name else value
        assert torch.equal(widened[name], expected), name
    assert any(not torch.equal(widened[n], original[n]) for n in original)  # the rounding is real


@pytest.mark.parametrize("argv, expected", [
    ([], dict(batch_size=16, epochs=3, max_length=128)),
    (["--quick"], dict(batch_size=4, epochs=1, max_length=32)),
    (["--quick", "--batch-size", "8"], dict(batch_size=8, epochs=1, max_length=32)),
    (["--batch-size", "auto"], dict(batch_size="auto", epochs=3, max_length=128)),
])
def test_command_line_defaults(argv, expected):
    cfg, _, quick, _ = finetune.parse(argv)
    assert quick == ("--quick" in argv)
    assert {key: getattr(cfg, key) for key in expected} == expected
