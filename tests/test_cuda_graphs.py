"""capturable=True on the CUDA backend: a whole training step (forward, backward, opt.step())
captured in a CUDA graph and replayed while an LR scheduler changes a device-tensor lr (and, in
one config, a schedule halves a device-tensor weight decay in place) ends where the same steps run
eagerly end (GPU only; torch's recipe: warm up on a side stream, then
capture with the grads set to None, so that backward writes them into the graph's memory)."""

from __future__ import annotations

import copy

import pytest
import torch

import fused_opt

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WARMUP, STEPS = 3, 12
CONFIGS = {
    "adamw": (fused_opt.AdamW, {"capturable": True}),
    "adamw-weight-decay-tensor": (fused_opt.AdamW, {"capturable": True, "weight_decay": "tensor"}),
    "adam-amsgrad-l1": (fused_opt.Adam, {"capturable": True, "amsgrad": True, "l1": 1e-3, "weight_decay": 0.01}),
    "rmsprop-centered-momentum": (fused_opt.RMSprop, {"capturable": True, "centered": True, "momentum": 0.9}),
    "sgd-nesterov": (fused_opt.SGD, {"momentum": 0.9, "nesterov": True}),  # no step counter to capture
}


def _setup(model, opt_cls, kwargs):
    if kwargs.get("weight_decay") == "tensor":
        kwargs = {**kwargs, "weight_decay": torch.tensor(0.5, device="cuda")}
    opt = opt_cls(model.parameters(), lr=torch.tensor(0.01, device="cuda"), backend="cuda", **kwargs)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    return opt, sched


def _schedule(opt, sched):
    sched.step()  # fills the lr tensor in place: the next replay reads the new value
    wd = opt.param_groups[0]["weight_decay"]
    if isinstance(wd, torch.Tensor):
        wd.mul_(0.5)  # so does a weight decay schedule


def _train_step(model, opt, x, y):
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("config", CONFIGS)
def test_graph_replay_matches_eager(config):
    opt_cls, kwargs = CONFIGS[config]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).cuda()
    twin = copy.deepcopy(model)
    data = [(torch.randn(8, 16, device="cuda"), torch.randn(8, 4, device="cuda")) for _ in range(STEPS)]

    opt, sched = _setup(model, opt_cls, kwargs)
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps create the state outside the graph
        for x, y in data[:WARMUP]:
            static_x.copy_(x), static_y.copy_(y)
            opt.zero_grad(set_to_none=True)
            _train_step(model, opt, static_x, static_y)
            _schedule(opt, sched)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        _train_step(model, opt, static_x, static_y)
    for x, y in data[WARMUP:]:
        static_x.copy_(x), static_y.copy_(y)
        graph.replay()
        _schedule(opt, sched)

    twin_opt, twin_sched = _setup(twin, opt_cls, kwargs)
    for x, y in data:
        twin_opt.zero_grad(set_to_none=True)
        _train_step(twin, twin_opt, x, y)
        _schedule(twin_opt, twin_sched)

    torch.cuda.synchronize()
    assert opt.param_groups[0]["lr"].item() == pytest.approx(0.01 * 0.9**STEPS)
    if kwargs.get("weight_decay") == "tensor":
        assert opt.param_groups[0]["weight_decay"].item() == 0.5**(STEPS + 1)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key, value in twin_opt.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    if "capturable" in kwargs:
        assert all(opt.state[p]["step"].item() == STEPS for p in model.parameters())


@pytest.mark.parametrize("opt_cls, kwargs, error", [
    (fused_opt.AdamW, {"backend": "triton", "capturable": True}, "cannot be captured in a CUDA graph"),
    (fused_opt.AdamW, {"backend": "cuda"}, "capturable is False"),  # host step counters: torch's error
    (fused_opt.RMSprop, {"backend": "cuda", "momentum": 0.9}, "capturable is False"),
    (fused_opt.Adam, {"backend": "cuda", "capturable": True,  # read on the host at each step
                      "betas": (torch.tensor(0.9), torch.tensor(0.99))}, "Tensor betas are read on the host"),
], ids=["triton", "adamw-host-steps", "rmsprop-host-steps", "tensor-betas"])
def test_a_capture_that_cannot_replay_is_refused_and_writes_nothing(opt_cls, kwargs, error):
    p = torch.ones(1000, device="cuda", requires_grad=True)
    opt = opt_cls([p], lr=0.01, **kwargs)
    p.grad = torch.ones_like(p)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()  # warm-up: state created outside the graph
    torch.cuda.current_stream().wait_stream(side)
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=error):
        with torch.cuda.graph(graph):
            opt.step()
    assert torch.equal(p, before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())
