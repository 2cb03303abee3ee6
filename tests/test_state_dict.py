"""state_dict compatibility with torch.optim both ways, and exact resume in a new process."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch

import fused_opt
from cases import ALGORITHMS, REGULARISATION, make_grads, make_params

CONFIGS = {
    "adam": {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1},
    "adamw": {"lr": 1e-2},
    "rmsprop": {"lr": 1e-2, "centered": True, "momentum": 0.9},
    "sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
}


def _run(opt, params, steps, start=1):
    for step in range(start, start + steps):
        for p, g in zip(params, make_grads(params, step)):
            p.grad = g.to(p.device, p.dtype)
        opt.step()


def _fresh(cls, kwargs, **extra):
    params = make_params("mixed", torch.float32)
    return params, cls(params, **kwargs, **extra)


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])  # (torch's step counters follow it)
@pytest.mark.parametrize("algo", CONFIGS)
def test_same_keys_shapes_dtypes_as_torch(algo, default_dtype):
    fused_cls, torch_cls = ALGORITHMS[algo][:2]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        ours_p, ours = _fresh(fused_cls, CONFIGS[algo])
        theirs_p, theirs = _fresh(torch_cls, CONFIGS[algo], foreach=False)
        _run(ours, ours_p, 3)
        _run(theirs, theirs_p, 3)
    finally:
        torch.set_default_dtype(previous)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for key in a["state"][i]:
            x, y = a["state"][i][key], b["state"][i][key]
            assert (x.dtype, x.shape, x.device) == (y.dtype, y.shape, y.device), (i, key)
    for ga, gb in zip(a["param_groups"], b["param_groups"]):
        assert set(ga) - set(gb) == {"l1", "l1_mode", "backend", "master_weights"}
        assert {k: ga[k] for k in gb if k != "foreach"} == {k: v for k, v in gb.items() if k != "foreach"}


@pytest.mark.parametrize("algo", CONFIGS)
def test_a_state_dict_of_an_older_torch_loads_as_torch_loads_it(algo):
    """Param groups without the keys torch.optim added since (foreach, maximize, capturable,
    differentiable, fused, decoupled_weight_decay: AdamW's is True whatever was saved) and step
    counters saved as numbers (before torch 1.12): loaded into either library, the same param
    groups and counters, and the same next steps."""
    fused_cls, torch_cls = ALGORITHMS[algo][:2]
    params, opt = _fresh(torch_cls, CONFIGS[algo], foreach=False)
    _run(opt, params, 3)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for key in ("foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"):
            group.pop(key, None)
    for state in old["state"].values():
        if "step" in state:
            state["step"] = int(state["step"])
    loaded = []
    for cls in (fused_cls, torch_cls):
        ps = [p.detach().clone().requires_grad_() for p in params]
        o = cls(ps, **CONFIGS[algo])
        o.load_state_dict(copy.deepcopy(old))
        loaded.append((ps, o))
    (ours_p, ours), (theirs_p, theirs) = loaded
    for ga, gb in zip(ours.param_groups, theirs.param_groups):
        assert {k: ga[k] for k in gb if k != "params"} == {k: v for k, v in gb.items() if k != "params"}
    for p, q in zip(ours_p, theirs_p):
        assert ours.state[p].keys() == theirs.state[q].keys()
        if "step" in theirs.state[q]:
            x, y = ours.state[p]["step"], theirs.state[q]["step"]
            assert (x.dtype, x.device, x.item()) == (y.dtype, y.device, y.item())
    _run(ours, ours_p, 3, start=4)
    _run(theirs, theirs_p, 3, start=4)
    for p, q in zip(ours_p, theirs_p):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
@pytest.mark.parametrize("algo", CONFIGS)
def test_load_across_and_continue(algo, direction):
    fused_cls, torch_cls = ALGORITHMS[algo][:2]
    first, second = (torch_cls, fused_cls) if direction == "torch_to_fused" else (fused_cls, torch_cls)
    extra = lambda cls: {"foreach": False} if cls is torch_cls else {}  # noqa: E731
    params, opt = _fresh(first, CONFIGS[algo], **extra(first))
    _run(opt, params, 5)
    # Continue in the other implementation, and in the first one as the expected trajectory.
    cont_params = [p.detach().clone().requires_grad_() for p in params]
    cont = second(cont_params, **CONFIGS[algo], **extra(second))
    cont.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a checkpoint: no shared tensors
    _run(opt, params, 5, start=6)
    _run(cont, cont_params, 5, start=6)
    for p, q in zip(params, cont_params):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    for p, q in zip(params, cont_params):
        for key in opt.state[p]:
            torch.testing.assert_close(cont.state[q][key], opt.state[p][key], rtol=1e-5, atol=1e-5)


def _conv_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))


def _conv_steps(model, opt, steps):
    for step in steps:
        g = torch.Generator().manual_seed(step)
        opt.zero_grad()
        x = torch.randn(2, 3, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("source", ["torch", "fused_opt"])
@pytest.mark.parametrize("algo", CONFIGS)
def test_a_checkpoint_of_contiguous_params_resumes_under_channels_last(algo, source):
    """The usual recipe converts the model after loading a checkpoint saved before channels_last:
    the loaded states take their params' layout (values unchanged), so the steps stay one flat
    pass from the group tables, and continue as the contiguous run does."""
    fused_cls, torch_cls = ALGORITHMS[algo][:2]
    first = _conv_net()
    opt = torch_cls(first.parameters(), **CONFIGS[algo], foreach=False) if source == "torch" else \
        fused_cls(first.parameters(), **CONFIGS[algo])
    _conv_steps(first, opt, range(3))
    saved = copy.deepcopy(opt.state_dict())
    resumed = copy.deepcopy(first).to(memory_format=torch.channels_last)
    assert not resumed[0].weight.is_contiguous()
    cont = fused_cls(resumed.parameters(), **CONFIGS[algo])
    cont.load_state_dict(saved)
    for p, q in zip(first.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            torch.testing.assert_close(cont.state[q][key], value, rtol=0, atol=0)
            if key != "step":
                assert cont.state[q][key].stride() == q.stride(), key
    _conv_steps(first, opt, range(3, 7))
    _conv_steps(resumed, cont, range(3, 7))
    for p, q in zip(first.parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        for key in opt.state[p]:
            torch.testing.assert_close(cont.state[q][key], opt.state[p][key], rtol=1e-5, atol=1e-5)
    assert cont._tables.fast_steps == 3  # steps 5-7 ran from the table built after step 4


@pytest.mark.parametrize("algo", CONFIGS)
def test_a_model_made_channels_last_mid_run_continues_as_torch(algo):
    """Module.to(memory_format=...) gives the same params new memory; their states, made before,
    take the new layout at the next step (values unchanged), and the steps go on from the tables."""
    fused_cls, torch_cls = ALGORITHMS[algo][:2]
    ours, theirs = _conv_net(), _conv_net()
    opt = fused_cls(ours.parameters(), **CONFIGS[algo])
    ref = torch_cls(theirs.parameters(), **CONFIGS[algo], foreach=False)
    for model, o in ((ours, opt), (theirs, ref)):
        _conv_steps(model, o, range(3))
        model.to(memory_format=torch.channels_last)
        _conv_steps(model, o, range(3, 8))
    weight = ours[0].weight
    assert not weight.is_contiguous()
    assert all(t.stride() == weight.stride() for k, t in opt.state[weight].items() if k != "step")
    # float32 rounding against torch's for-loop: centered RMSprop's grows to ~6e-6 in the params and
    # ~1e-4 relative in the states here, the same without the conversion
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
        for key in ref.state[q]:
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=2e-4, atol=1e-4)
    assert opt._tables.fast_steps >= 2 + 4  # steps 2-3, then 5-8 from the table rebuilt at step 4


def test_a_step_that_raises_keeps_the_states_it_would_have_laid_out_anew():
    model = _conv_net()
    opt = fused_opt.Adam(model.parameters(), lr=0.01)
    _conv_steps(model, opt, range(2))
    model.to(memory_format=torch.channels_last)
    weight = model[0].weight
    before = dict(opt.state[weight])
    opt.zero_grad()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    bias = opt.state[model[-1].bias]
    good, bias["exp_avg"] = bias["exp_avg"], torch.zeros(5)  # a state that does not fit its param
    with pytest.raises(RuntimeError, match="exp_avg"):
        opt.step()
    assert all(opt.state[weight][k] is v for k, v in before.items()) and len(opt.state[weight]) == len(before)
    bias["exp_avg"] = good
    opt.step()
    assert all(t.stride() == weight.stride() for k, t in opt.state[weight].items() if k != "step")


@pytest.mark.parametrize("switched_on", ["amsgrad", "master_weights"])
def test_a_refused_step_takes_back_what_an_option_switched_on_made(switched_on):
    """amsgrad switched on makes a new slot; master weights, a float32 copy and float32 states,
    which a param made channels_last first lays out anew, then converts (two changes to one entry,
    taken back in reverse). A step refused for another param leaves every entry the object it was."""
    model = _conv_net().to(torch.bfloat16)
    opt = fused_opt.Adam(model.parameters(), lr=0.01)
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    for _ in range(2):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    model.to(memory_format=torch.channels_last)
    for group in opt.param_groups:
        group[switched_on] = True
    before = {p: dict(opt.state[p]) for p in model.parameters()}
    opt.state[model[-1].bias]["exp_avg"] = torch.zeros(5, dtype=torch.bfloat16)  # does not fit its param
    with pytest.raises(RuntimeError, match="exp_avg"):
        opt.step()
    for p, saved in before.items():
        if p is not model[-1].bias:
            assert opt.state[p].keys() == saved.keys() and all(opt.state[p][k] is v for k, v in saved.items())


@pytest.mark.parametrize("broken", ["expanded", "strided"])
def test_a_broken_state_of_a_param_that_is_not_contiguous_is_not_relaid(broken):
    """Only a dense state takes its param's layout: an expanded one (one memory location for many
    elements) is refused as before, and a strided view stays the user's tensor (updated in place)."""
    model = _conv_net().to(memory_format=torch.channels_last)
    opt = fused_opt.Adam(model.parameters(), lr=0.01)
    _conv_steps(model, opt, range(2))
    weight = model[0].weight
    state = opt.state[weight]
    if broken == "expanded":
        state["exp_avg"] = torch.zeros(()).expand(weight.shape)
        with pytest.raises(RuntimeError, match="exp_avg"):
            _conv_steps(model, opt, range(2, 3))
        assert state["exp_avg"].stride() == (0, 0, 0, 0)
        return
    view = torch.zeros(2 * weight.shape[0], *weight.shape[1:])[::2]
    view.copy_(state["exp_avg"])
    state["exp_avg"] = view
    _conv_steps(model, opt, range(2, 3))
    assert state["exp_avg"] is view and view.abs().sum() > 0


def test_torch_state_dict_keeps_our_own_options():
    """A torch.optim state_dict has no l1/l1_mode/backend/master_weights: loading one keeps the
    optimizer's (L1 must not silently switch off); a fused_opt state_dict brings its own."""
    params, stock = _fresh(torch.optim.Adam, {"lr": 1e-2})
    _run(stock, params, 2)
    ours = fused_opt.Adam([p.detach().clone().requires_grad_() for p in params], lr=1e-3, l1=0.01,
                          l1_mode="proximal", backend="reference", master_weights=True)
    ours.load_state_dict(stock.state_dict())
    group = ours.param_groups[0]
    assert (group["lr"], group["l1"], group["l1_mode"], group["backend"], group["master_weights"]) == (
        1e-2, 0.01, "proximal", "reference", True)
    other = fused_opt.Adam([p.detach().clone().requires_grad_() for p in params], l1=0.5)
    other.load_state_dict(ours.state_dict())
    assert (other.param_groups[0]["l1"], other.param_groups[0]["backend"]) == (0.01, "reference")


@pytest.mark.parametrize("source", ["torch", "fused_opt"])
@pytest.mark.parametrize("saved,loaded", [(a, b) for a in CONFIGS for b in CONFIGS
                                          if {a, b} != {"adam", "adamw"} and a != b])
def test_a_state_dict_of_another_kind_of_optimizer_is_refused_before_anything_changes(saved, loaded, source):
    """An SGD checkpoint loaded into Adam, say: refused at the load, naming what it lacks, and the
    optimizer keeps its own state and hyperparameters (torch.optim replaces them, then fails at the
    load or the first step, depending on the pair)."""
    fused_cls, torch_cls = ALGORITHMS[saved][:2]
    params, other = _fresh(torch_cls if source == "torch" else fused_cls, CONFIGS[saved])
    _run(other, params, 2)
    ours_p, ours = _fresh(ALGORITHMS[loaded][0], CONFIGS[loaded])
    _run(ours, ours_p, 2)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match=r"param group 0 has no '\w+'.*: it was saved by another kind of optimizer"):
        ours.load_state_dict(other.state_dict())
    after = ours.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for i, state in before["state"].items():
        assert after["state"][i].keys() == state.keys()
        assert all(torch.equal(after["state"][i][k], v) for k, v in state.items())


def test_a_state_dict_missing_a_state_tensor_is_refused_before_anything_changes():
    params, opt = _fresh(fused_opt.Adam, CONFIGS["adam"])
    _run(opt, params, 2)
    broken = copy.deepcopy(opt.state_dict())
    del broken["state"][1]["exp_avg_sq"]
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=re.escape("the loaded state of param_groups[0]['params'][1] has no "
                                                   "'exp_avg_sq' (it has 'step', 'exp_avg', 'max_exp_avg_sq')")):
        opt.load_state_dict(broken)
    assert all(torch.equal(opt.state[p]["exp_avg_sq"], before["state"][i]["exp_avg_sq"])
               for i, p in enumerate(params))


def _resume_configs():
    """Every algorithm, every option variant of the case table, with each kind of regularisation."""
    out = []
    for algo, (fused_cls, _, base, variants) in ALGORITHMS.items():
        for option, extra in variants.items():
            for reg in ("none", "l1sub", "elastic"):
                out.append({"id": f"{algo}-{option}-{reg}", "cls": fused_cls.__name__,
                            "kwargs": {**base, **extra, **REGULARISATION[reg]}})
    return out


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _train(model, opt, sched, steps):
    for step in steps:
        g = torch.Generator().manual_seed(step)
        opt.zero_grad()
        model(torch.randn(4, 5, generator=g)).pow(2).mean().backward()
        opt.step()
        sched.step()


def _setup(config):
    model = _model()
    opt = getattr(fused_opt, config["cls"])(model.parameters(), **config["kwargs"])
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=8)
    return model, opt, sched


RESUME_SCRIPT = """
import sys, json, torch
sys.path.insert(0, sys.argv[1])
from test_state_dict import _setup, _train
configs = json.load(open(sys.argv[2]))
out = {}
for config in configs:
    model, opt, sched = _setup(config)
    ckpt = torch.load(f"{sys.argv[3]}/{config['id']}.pt", weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    _train(model, opt, sched, range(5, 10))
    out[config["id"]] = {"model": model.state_dict(), "opt": opt.state_dict()["state"]}
torch.save(out, f"{sys.argv[3]}/resumed.pt")
"""


def test_checkpoint_resumes_bit_identically_in_a_new_process(tmp_path):
    """Model + optimizer + LR scheduler saved mid-run; a new process loads them (weights_only) and
    must continue exactly as the run that never stopped, for every algorithm and option."""
    configs = _resume_configs()
    expected = {}
    for config in configs:
        model, opt, sched = _setup(config)
        _train(model, opt, sched, range(5))
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
                   tmp_path / f"{config['id']}.pt")
        _train(model, opt, sched, range(5, 10))
        expected[config["id"]] = {"model": model.state_dict(), "opt": opt.state_dict()["state"]}
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, os.path.dirname(__file__), str(tmp_path / "configs.json"),
                    str(tmp_path)], check=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for cid, exp in expected.items():
        for key, value in exp["model"].items():
            assert torch.equal(resumed[cid]["model"][key], value), (cid, key)
        for i, state in exp["opt"].items():
            for key, value in state.items():
                assert torch.equal(resumed[cid]["opt"][i][key], value), (cid, i, key)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("algo", CONFIGS)
def test_gpu_checkpoint_loads_on_cpu_and_back(algo, tmp_path):
    cls = ALGORITHMS[algo][0]
    gpu_params = [p.detach().cuda().requires_grad_() for p in make_params("mixed", torch.float32)]
    gpu = cls(gpu_params, **CONFIGS[algo])
    _run(gpu, gpu_params, 3)
    _assert_steps_on(gpu, "cuda")  # GPU params count on the GPU, as torch's fused optimizers do
    torch.save({"opt": gpu.state_dict(), "params": [p.detach() for p in gpu_params]}, tmp_path / "gpu.pt")
    ckpt = torch.load(tmp_path / "gpu.pt", map_location="cpu", weights_only=True)
    cpu_params = [p.clone().requires_grad_() for p in ckpt["params"]]
    cpu = cls(cpu_params, **CONFIGS[algo])
    cpu.load_state_dict(ckpt["opt"])
    _assert_steps_on(cpu, "cpu")
    _run(gpu, gpu_params, 3, start=4)
    _run(cpu, cpu_params, 3, start=4)
    for p, q in zip(cpu_params, gpu_params):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-5, atol=1e-6)
    back_params = [p.detach().cuda().requires_grad_() for p in cpu_params]
    back = cls(back_params, **CONFIGS[algo])
    back.load_state_dict(cpu.state_dict())  # CPU state onto GPU params: moved to their device
    _assert_steps_on(back, "cuda")  # the CPU checkpoint's host counters too
    _run(back, back_params, 2, start=7)
    _run(cpu, cpu_params, 2, start=7)
    for p, q in zip(cpu_params, back_params):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-5, atol=1e-6)


def _assert_steps_on(opt, device_type: str) -> None:
    steps = [state["step"] for state in opt.state.values() if "step" in state]
    assert all(s.device.type == device_type and s.dtype == torch.float32 for s in steps), steps


@pytest.mark.parametrize("device,group,on_device", [
    ("cuda", {"fused": None}, True), ("cuda", {}, True),  # the default (RMSprop has no `fused`)
    ("cuda", {"fused": False}, False), ("cuda", {"fused": False, "capturable": True}, True),
    ("cpu", {"fused": None}, False), ("cpu", {"fused": True}, True), ("meta", {}, False),
])
def test_where_step_counters_live(device, group, on_device):
    """The rule the GPU tests above check in use (a CPU-only CI sees no GPU param): off the CPU,
    counters live on the params' device unless fused=False, as in torch's fused optimizers."""
    p = types.SimpleNamespace(device=torch.device(device))
    assert fused_opt.Adam._counts_on_device(p, group) is on_device
