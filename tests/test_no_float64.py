"""The reference backend on a device without float64 arithmetic (MPS; Intel GPUs without fp64),
simulated on the CPU: the CPU is marked as such a device, and any op that makes a float64 tensor
raises, as MPS does. Params keep their step counters on the device (as for any GPU param), so the
coefficients of every step are made there. Each case must step without float64, stay within float32
tolerance of the reference's usual run (float64 coefficients) and follow torch.optim."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cases import STEPS, TOLERANCES, build_cases, make_grads, make_params
from fused_opt import reference


class NoFloat64(TorchDispatchMode):
    """Raises when an op makes a float64 tensor, as a device without float64 would."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        made = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.dtype == torch.float64]
        if made:
            raise TypeError(f"{func} made a float64 tensor on a device without float64")
        return out


@pytest.fixture
def cpu_without_float64(monkeypatch):
    monkeypatch.setattr(reference, "NO_FLOAT64", reference.NO_FLOAT64 | {"cpu"})


def _on_device_counters(case) -> dict:
    """The options that put the step counters on the params' device (a GPU param's default)."""
    return {"capturable": True} if case.algo == "rmsprop" else {"fused": True}


CASES = [c for c in build_cases(backends=("reference",), dtypes=("f32", "bf16"))
         if c.layout == "mixed" and c.reg in ("none", "l2", "elastic")]


def _step(opt, params, grads, mode=None):
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype)
    if mode is None:
        opt.step()
    else:
        with mode:
            opt.step()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_steps_without_float64_match_the_usual_reference(case, cpu_without_float64):
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[case.dtype]
    init = make_params(case.layout, torch.float64)
    ours_p, usual_p = ([p.detach().to(dtype).clone().requires_grad_() for p in init] for _ in range(2))
    ours = case.fused_cls(ours_p, backend="reference", **_on_device_counters(case), **case.kwargs)
    usual = case.fused_cls(usual_p, backend="reference", **_on_device_counters(case), **case.kwargs)
    rtol, atol = TOLERANCES[torch.float32] if dtype == torch.float32 else (2 * torch.finfo(dtype).eps, 1e-3)
    for step in range(1, STEPS + 1):
        grads = make_grads(init, step)
        _step(ours, ours_p, grads, NoFloat64())
        with pytest.MonkeyPatch.context() as m:  # the usual run: float64 coefficients
            m.setattr(reference, "NO_FLOAT64", {"mps"})
            _step(usual, usual_p, grads)
        for i, (p, q) in enumerate(zip(ours_p, usual_p)):
            where = f"{case.id} step {step} param{i}"
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")
            for key, value in usual.state[q].items():
                assert ours.state[p][key].dtype == value.dtype, f"{where} {key}"
                torch.testing.assert_close(ours.state[p][key], value, rtol=rtol, atol=atol * 30,
                                           msg=lambda m: f"{where} {key}: {m}")


@pytest.mark.parametrize("algo", ["adam", "adamw", "rmsprop", "sgd"])
def test_tensor_scalars_and_amp_without_float64(algo, cpu_without_float64):
    """A Tensor lr and weight decay, and GradScaler's grad_scale and found_inf (its protocol sets
    them on the optimizer), all read where they live: a step with found_inf set changes nothing."""
    case = next(c for c in CASES if c.algo == algo and c.reg == "none" and c.dtype == "f32")
    init = make_params(case.layout, torch.float32)
    kwargs = {**case.kwargs, "lr": torch.tensor(case.kwargs["lr"]), "weight_decay": torch.tensor(0.05)}
    ours_p, yard_p = ([p.detach().clone().requires_grad_() for p in init] for _ in range(2))
    ours = case.fused_cls(ours_p, backend="reference", **_on_device_counters(case), **kwargs)
    yard = case.torch_cls(yard_p, foreach=False, **{**case.torch_kwargs(), "weight_decay": 0.05})
    scale = torch.tensor(1024.0)
    for step in range(1, 6):
        grads = make_grads(init, step)
        ours.grad_scale, ours.found_inf = scale, torch.tensor(float(step == 3))
        _step(ours, ours_p, [g * 1024.0 for g in grads], NoFloat64())
        if step != 3:  # torch's step 3 is the one ours skipped
            _step(yard, yard_p, grads)
        for i, (p, q) in enumerate(zip(ours_p, yard_p)):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{algo} step {step} param{i}: {m}")
        counters = [ours.state[p]["step"] for p in ours_p if "step" in ours.state[p]]
        assert all(c.item() == (step if step < 3 else step - 1) for c in counters), f"{algo} step {step}"


def test_intel_gpus_say_per_device_whether_they_have_float64(monkeypatch):
    """An XPU device is asked once (its properties' has_fp64, True when the field is absent, as on
    older torch); the answer is kept per device. No XPU runs here: the properties are stood in for."""
    from types import SimpleNamespace

    asked = []

    def properties(device):
        asked.append(str(device))
        return {"xpu:0": SimpleNamespace(has_fp64=False), "xpu:1": SimpleNamespace(has_fp64=True)}.get(
            str(device), SimpleNamespace())

    monkeypatch.setattr(torch.xpu, "get_device_properties", properties)
    monkeypatch.setattr(reference, "_XPU_FLOAT64", {})
    answers = [reference._has_float64(torch.device(d)) for d in ("xpu:0", "xpu:1", "xpu:2", "xpu:0", "cpu", "mps")]
    assert answers == [False, True, True, False, True, False]
    assert asked == ["xpu:0", "xpu:1", "xpu:2"]
