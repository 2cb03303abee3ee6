"""Optimizer behaviour users rely on: groups, None grads, closures, hooks, zero_grad, deepcopy,
add_param_group, pickling, named params, complex params, GradScaler, torch's default device."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch

import fused_opt
from cases import INTERPRETER, ON_GPU


def _pair(algo, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    twin = copy.deepcopy(model)
    return model, twin


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=g).to(next(model.parameters()).device)
    return model(x).pow(2).mean()


@pytest.mark.parametrize("algo", ["Adam", "AdamW", "RMSprop", "SGD"])
def test_param_groups_none_grads_and_closure(algo):
    model, twin = _pair(algo)
    groups = lambda m: [{"params": m[0].parameters(), "lr": 0.05, "weight_decay": 0.1},  # noqa: E731
                        {"params": m[2].parameters()}]
    extra = {"momentum": 0.9} if algo in ("SGD", "RMSprop") else {}
    ours = getattr(fused_opt, algo)(groups(model), lr=0.01, **extra)
    theirs = getattr(torch.optim, algo)(groups(twin), lr=0.01, foreach=False, **extra)
    for step in range(6):
        for m, opt in ((model, ours), (twin, theirs)):
            def closure(m=m, opt=opt):
                opt.zero_grad()
                loss = _loss(m, step)
                loss.backward()
                if step % 2:  # a param without grad this step: skipped, as in torch
                    m[2].bias.grad = None
                return loss
            loss = opt.step(closure)
            assert loss is not None
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert len(ours.state) == len(theirs.state)


def test_hooks_zero_grad_deepcopy_add_param_group():
    model, _ = _pair("Adam")
    opt = fused_opt.Adam(model[0].parameters(), lr=0.1)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    _loss(model, 0).backward()
    opt.step()
    assert seen == ["pre", "post"]
    clone = copy.deepcopy(opt)
    assert clone.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    opt.zero_grad()
    assert all(p.grad is None for p in model[0].parameters())
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.5, "l1": 0.1, "l1_mode": "proximal"})
    assert opt.param_groups[1]["l1"] == 0.1 and opt.param_groups[1]["backend"] == "auto"
    with pytest.raises(ValueError, match="Invalid l1 value"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "l1": -1.0})


@pytest.mark.parametrize("backend", ["cpu", "cuda_sim", "reference", pytest.param("triton", marks=INTERPRETER)])
@pytest.mark.parametrize("algo", ["Adam", "RMSprop", "SGD"])
def test_pickled_with_its_model_it_continues_exactly(algo, backend):
    """torch.save(obj) of a whole trainer (model and optimizer objects, not state dicts) pickles the
    optimizer: the copy steps its copy of the model as the original steps the original."""
    extra = {"amsgrad": True} if algo == "Adam" else {"centered": True, "momentum": 0.9} if algo == "RMSprop" \
        else {"momentum": 0.9, "l1": 0.01}
    model, _ = _pair(algo)
    opt = getattr(fused_opt, algo)(model.parameters(), lr=0.01, backend=backend, **extra)
    _loss(model, 0).backward()
    opt.step()
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.param_groups[0]["params"][0] is model2[0].weight
    for step in range(1, 4):
        for m, o in ((model, opt), (model2, opt2)):
            o.zero_grad()
            _loss(m, step).backward()
            o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == opt2.state[q].keys()
        assert all(torch.equal(v, opt2.state[q][k]) for k, v in opt.state[p].items())


def test_named_parameters_in_state_dict():
    model, twin = _pair("SGD")
    ours = fused_opt.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    theirs = torch.optim.SGD(twin.named_parameters(), lr=0.1, momentum=0.9)
    assert ours.state_dict()["param_groups"][0]["param_names"] == theirs.state_dict()["param_groups"][0]["param_names"]


@pytest.mark.parametrize("algo", ["Adam", "RMSprop", "SGD"])
def test_complex_params_like_torch(algo):
    torch.manual_seed(0)
    p = torch.randn(7, dtype=torch.complex64, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    extra = {"momentum": 0.9} if algo != "Adam" else {}
    ours = getattr(fused_opt, algo)([p], lr=0.1, **extra)
    theirs = getattr(torch.optim, algo)([q], lr=0.1, foreach=False, **extra)
    for _ in range(5):
        g = torch.randn(7, dtype=torch.complex64)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(p, q)


def test_l1_proximal_gives_exact_zeros():
    p = torch.full((1000,), 0.01, requires_grad=True)
    opt = fused_opt.SGD([p], lr=0.1, l1=1.0, l1_mode="proximal")
    p.grad = torch.zeros(1000)
    opt.step()
    assert (p == 0).all()


# (device, backend, optimizer, kwargs): every host-side tensor the step makes (step counters, pointer
# tables, Triton's block map and coefficients) must say where it goes.
DEFAULT_DEVICE_CASES = [
    (fused_opt.AdamW, {"lr": torch.tensor(0.01), "amsgrad": True, "l1": 0.01}),
    (fused_opt.Adam, {"lr": 0.01, "skip_nonfinite": True, "master_weights": True}),
    (fused_opt.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.5, "weight_decay": torch.tensor(0.1)}),
    (fused_opt.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "l1": 0.01, "l1_mode": "proximal"}),
]
DEFAULT_DEVICE_BACKENDS = ([pytest.param(("cpu", b), id=b) for b in ("cpu", "cuda_sim", "reference")]
                           + [pytest.param(("cpu", "triton"), marks=INTERPRETER, id="triton"),
                              pytest.param(("cuda", "cuda"), marks=ON_GPU, id="cuda-gpu"),
                              pytest.param(("cuda", "triton"), marks=ON_GPU, id="triton-gpu")])


@pytest.mark.parametrize("where", DEFAULT_DEVICE_BACKENDS)
@pytest.mark.parametrize("case", range(len(DEFAULT_DEVICE_CASES)),
                         ids=[cls.__name__ for cls, _ in DEFAULT_DEVICE_CASES])
def test_torchs_default_device_set_elsewhere_changes_nothing(case, where):
    """Code that sets torch.set_default_device("cuda") (or a `with torch.device(...)` block) still
    trains CPU params, as torch.optim does; the meta device stands for "elsewhere" here, since any
    tensor made there without a device breaks loudly."""
    (cls, kwargs), (device, backend) = DEFAULT_DEVICE_CASES[case], where

    def run(default):
        torch.manual_seed(0)
        params = [torch.randn(s, device=device, dtype=torch.bfloat16 if kwargs.get("master_weights") else None,
                              requires_grad=True) for s in [(7, 5), (33,), ()]]
        opt = cls(params, backend=backend, **kwargs)
        with torch.device(default):
            for step in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, device=device, dtype=p.dtype)
                if step == 1 and kwargs.get("skip_nonfinite"):
                    params[1].grad[0] = float("nan")
                opt.step()
        return params, opt

    ours, opt = run("meta")
    expected, expected_opt = run(device)
    for p, q in zip(ours, expected):
        assert torch.equal(p, q)
        for key, value in expected_opt.state[q].items():
            assert value.device == opt.state[p][key].device, key
            assert torch.equal(opt.state[p][key], value), key
    if kwargs.get("skip_nonfinite"):
        assert opt.skipped_steps == expected_opt.skipped_steps == 1


# (device, backend): the scaler hands grad_scale and found_inf to the kernels of each backend (on the CPU:
# the C++ kernels, the CUDA kernels' simulation and the Triton interpreter).
SCALER_BACKENDS = [pytest.param(("cpu", "auto"), id="cpu"),
                   pytest.param(("cpu", "cuda_sim"), id="cuda-simulated"),
                   pytest.param(("cpu", "triton"), marks=INTERPRETER, id="triton-interpreted"),
                   pytest.param(("cuda", "cuda"), marks=ON_GPU, id="cuda-gpu"),
                   pytest.param(("cuda", "triton"), marks=ON_GPU, id="triton-gpu")]


@pytest.mark.parametrize("where", SCALER_BACKENDS)
@pytest.mark.parametrize("algo", ["Adam", "RMSprop", "SGD"])
def test_grad_scaler_unscales_inside_the_step(algo, where):
    device, backend = where
    model, twin = (m.to(device) for m in _pair(algo))
    extra = {"momentum": 0.9} if algo != "Adam" else {}
    ours = getattr(fused_opt, algo)(model.parameters(), lr=0.01, backend=backend, **extra)
    theirs = getattr(torch.optim, algo)(twin.parameters(), lr=0.01, foreach=False, **extra)
    s_ours, s_theirs = (torch.amp.GradScaler(device, init_scale=1024.0) for _ in range(2))
    for step in range(4):
        for m, opt, scaler in ((model, ours, s_ours), (twin, theirs, s_theirs)):
            opt.zero_grad()
            scaler.scale(_loss(m, step)).backward()
            if step == 2:  # an overflow: both must skip the step and lower the scale
                next(m.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
    assert s_ours.get_scale() == s_theirs.get_scale() < 1024.0
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", SCALER_BACKENDS)
@pytest.mark.parametrize("algo", ["AdamW", "RMSprop", "SGD"])
def test_grad_scaler_unscale_then_clip_then_step(algo, where):
    """AMP with gradient clipping: the user unscales first (scaler.unscale_), clips, then
    scaler.step passes found_inf and no grad_scale; an overflow still skips the step."""
    device, backend = where
    model, twin = (m.to(device) for m in _pair(algo))
    extra = {"momentum": 0.9} if algo != "AdamW" else {}
    ours = getattr(fused_opt, algo)(model.parameters(), lr=0.01, backend=backend, **extra)
    theirs = getattr(torch.optim, algo)(twin.parameters(), lr=0.01, foreach=False, **extra)
    scalers = [torch.amp.GradScaler(device, init_scale=1024.0) for _ in range(2)]
    for step in range(5):
        for m, opt, scaler in ((model, ours, scalers[0]), (twin, theirs, scalers[1])):
            opt.zero_grad()
            scaler.scale(_loss(m, step)).backward()
            if step == 2:
                next(m.parameters()).grad[0, 0] = float("nan")
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            scaler.step(opt)
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale() < 1024.0
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key, value in theirs.state[q].items():  # (GPU params count on the GPU, torch's on the host)
            torch.testing.assert_close(ours.state[p][key].cpu(), value.cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused,lr", [(None, 0.01), (True, 0.01), (False, 0.01), (None, "tensor")],
                         ids=["default", "fused", "not-fused", "tensor-lr"])
@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=ON_GPU), pytest.param("triton", marks=ON_GPU)])
def test_grad_scaler_step_does_not_sync_with_device_step_counters(backend, fused, lr):
    # By default (and with fused=True) the step counters of GPU params live on the GPU, as torch's
    # fused optimizers keep them: the scaler's step (unscale, inf check, update, counters) then runs
    # without waiting for the GPU, also with lr a GPU tensor. fused=False keeps torch's host
    # counters, which cost one sync.
    model, _ = _pair("AdamW")
    model = model.cuda()
    lr = torch.tensor(0.01, device="cuda") if lr == "tensor" else lr
    opt = fused_opt.AdamW(model.parameters(), lr=lr, fused=fused, backend=backend)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    for step in range(4):  # the first steps create the state and the launch tables
        opt.zero_grad()
        scaler.scale(_loss(model, step)).backward()
        if step == 2:  # a skipped step: not counted
            next(model.parameters()).grad[0, 0] = float("inf")
        if step == 3 and fused is not False:
            torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()
    where = "cpu" if fused is False else "cuda"
    assert all(opt.state[p]["step"].device.type == where and opt.state[p]["step"].item() == 3
               for p in model.parameters())


@pytest.mark.parametrize("algo", ["Adam", "AdamW", "RMSprop", "SGD"])
def test_constructor_is_torch_optims_and_documented(algo):
    """Every torch.optim argument, with its default and in its place (positional ones in torch's
    order); ours come after, keyword-only. help() lists each argument with its default."""
    ours = inspect.signature(getattr(fused_opt, algo).__init__).parameters
    theirs = inspect.signature(getattr(torch.optim, algo).__init__).parameters
    positional = [inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY]
    assert [n for n, p in theirs.items() if p.kind in positional] == [n for n, p in ours.items() if p.kind in positional]
    for name, p in theirs.items():
        assert name in ours, name
        assert (ours[name].kind, ours[name].default) == (p.kind, p.default), name
    for name in set(ours) - set(theirs):
        assert ours[name].kind == inspect.Parameter.KEYWORD_ONLY, name
    doc = getattr(fused_opt, algo).__doc__
    for name, p in ours.items():
        if name != "self":
            default = "" if p.default is inspect.Parameter.empty else f"(default: {p.default!r})."
            line = next((line for line in doc.splitlines() if line.strip().startswith(f"{name} (")), None)
            assert line is not None and line.endswith(default), (name, line)
    backend_line = next(line for line in doc.splitlines() if line.strip().startswith("backend ("))
    assert all(f'"{name}"' in backend_line for name in fused_opt.dispatch.BACKEND_NAMES)
