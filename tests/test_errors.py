"""Bad input: torch.optim's exception types and wording; the kernels' own checks leave params and
state untouched; a NaN in one gradient stays in that parameter."""

from __future__ import annotations

import re

import pytest
import torch

import fused_opt
from cases import INTERPRETER, ON_GPU

INVALID = [
    ("Adam", {"lr": -1.0}), ("Adam", {"eps": -1e-8}), ("Adam", {"betas": (1.0, 0.999)}),
    ("Adam", {"betas": (0.9, -0.1)}), ("Adam", {"weight_decay": -0.1}), ("AdamW", {"lr": -0.5}),
    ("RMSprop", {"alpha": -0.1}), ("RMSprop", {"momentum": -0.1}), ("RMSprop", {"eps": -1.0}),
    ("SGD", {"lr": -0.1}), ("SGD", {"momentum": -0.5}), ("SGD", {"weight_decay": -1.0}),
    ("SGD", {"nesterov": True}), ("SGD", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}),
    ("Adam", {"lr": torch.tensor([0.1, 0.2])}), ("Adam", {"betas": (0.9, torch.tensor(0.99))}),
    ("AdamW", {"betas": (torch.tensor(0.9), 0.99)}), ("Adam", {"betas": (torch.tensor(1.0), torch.tensor(0.99))}),
    ("Adam", {"fused": True, "foreach": True}), ("SGD", {"fused": True, "foreach": True}),
]


@pytest.mark.parametrize("name,kwargs", INVALID, ids=lambda x: str(x))
def test_invalid_hyperparameters_match_torch(name, kwargs):
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(Exception) as theirs:
        getattr(torch.optim, name)(p, **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        getattr(fused_opt, name)(p, **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_tensor_betas_of_two_elements_are_refused():
    # torch.optim means to say this too, but its range check fails first, on a tensor's truth value.
    with pytest.raises(ValueError, match=r"Tensor betas\[1\] must be 1-element"):
        fused_opt.Adam([torch.zeros(3, requires_grad=True)], betas=(torch.tensor(0.9), torch.tensor([0.9, 0.99])))


@pytest.mark.parametrize("kwargs,match", [
    ({"l1": -0.1}, "Invalid l1 value: -0.1"),
    ({"l1": float("nan")}, "Invalid l1 value: nan"),
    ({"l1_mode": "lasso"}, "Invalid l1_mode: 'lasso'"),
    ({"backend": "tpu"}, "Invalid backend: 'tpu'"),
])
def test_invalid_extensions(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fused_opt.Adam([torch.zeros(3, requires_grad=True)], **kwargs)


def test_unavailable_backend_lists_every_reason():
    with pytest.raises(RuntimeError) as e:
        fused_opt.SGD([torch.zeros(3, requires_grad=True)], backend="cuda")
    msg = str(e.value)
    for name in ("cuda", "triton", "cpu", "reference", "cuda_sim"):
        assert f"{name}:" in msg
    assert "cuda: runs on cuda tensors, not cpu" in msg
    assert "; cpu: available;" in msg and "; reference: available;" in msg


def test_sparse_gradients_and_differentiable_are_refused():
    p = torch.zeros(4, requires_grad=True)
    opt = fused_opt.Adam([p])
    p.grad = torch.zeros(4).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    with pytest.raises(RuntimeError, match="does not support differentiable=True"):
        fused_opt.SGD([p], differentiable=True)


@pytest.mark.parametrize("backend", ["cpu", "reference", "cuda_sim"])
@pytest.mark.parametrize("algo", ["Adam", "RMSprop", "SGD"])
def test_nan_in_one_gradient_stays_in_that_parameter(algo, backend):
    kwargs = {"momentum": 0.9} if algo != "Adam" else {}
    ours_p = [torch.ones(5, requires_grad=True), torch.ones(3, requires_grad=True)]
    theirs_p = [p.detach().clone().requires_grad_() for p in ours_p]
    ours = getattr(fused_opt, algo)(ours_p, lr=0.1, backend=backend, **kwargs)
    theirs = getattr(torch.optim, algo)(theirs_p, lr=0.1, foreach=False, **kwargs)
    for ps, opt in ((ours_p, ours), (theirs_p, theirs)):
        ps[0].grad = torch.tensor([1.0, float("nan"), float("inf"), -1.0, 0.5])
        ps[1].grad = torch.tensor([0.1, 0.2, 0.3])
        opt.step()
    torch.testing.assert_close(ours_p[0], theirs_p[0], equal_nan=True)
    assert torch.isfinite(ours_p[1]).all()
    torch.testing.assert_close(ours_p[1], theirs_p[1])


def _adam_inputs(n=3, size=10):
    params = [torch.randn(size) for _ in range(n)]
    grads = [torch.randn(size) for _ in range(n)]
    m = [torch.zeros(size) for _ in range(n)]
    v = [torch.zeros(size) for _ in range(n)]
    steps = [torch.tensor(0.0) for _ in range(n)]
    return params, grads, m, v, steps


def _last(lists, *tensors):
    """The lists with their last tensors replaced."""
    return tuple(lst[:-1] + [t] for lst, t in zip(lists, tensors))


# Each: (params, grads, exp_avgs, exp_avg_sqs, steps) -> those, or those and (master_params, op kwargs).
BAD_INPUTS = {
    "short_grads": lambda p, g, m, v, s: (p, g[:-1], m, v, s),
    "short_state": lambda p, g, m, v, s: (p, g, m, v[:-1], s),
    "wrong_state_dtype": lambda p, g, m, v, s: (p, g, m[:-1] + [m[-1].double()], v, s),
    "wrong_state_numel": lambda p, g, m, v, s: (p, g, m, v[:-1] + [torch.zeros(11)], s),
    "wrong_grad_shape": lambda p, g, m, v, s: (p, g[:-1] + [g[-1].view(2, 5)], m, v, s),
    # only the rows' stride differs (a slice of a wider tensor)
    "grad_rows_apart": lambda p, g, m, v, s: (*_last((p, g, m, v), torch.randn(2, 5), torch.randn(2, 6)[:, :5],
                                                     torch.zeros(2, 5), torch.zeros(2, 5)), s),
    "sparse_grad": lambda p, g, m, v, s: (p, g[:-1] + [g[-1].to_sparse()], m, v, s),
    "sparse_param": lambda p, g, m, v, s: (p[:-1] + [p[-1].to_sparse()], g, m, v, s),
    "integer_params": lambda p, g, m, v, s: tuple(
        [t.long() for t in lst] for lst in (p, g, m, v)) + (s,),
    "overlapping_param": lambda p, g, m, v, s: (p[:-1] + [torch.zeros(1).expand(10)], g, m, v, s),
    "missing_step": lambda p, g, m, v, s: (p, g, m, v, s[:-1]),
    "step_not_scalar": lambda p, g, m, v, s: (p, g, m, v, s[:-1] + [torch.zeros(2)]),
    "last_step_int": lambda p, g, m, v, s: (p, g, m, v, s[:-1] + [torch.zeros((), dtype=torch.long)]),
    "mixed_dtypes": lambda p, g, m, v, s: (p[:-1] + [p[-1].double()], g[:-1] + [g[-1].double()],
                                           m[:-1] + [m[-1].double()], v[:-1] + [v[-1].double()], s),
    # dispatched to the fake implementation, which must refuse it too (it used to do nothing)
    "state_on_meta": lambda p, g, m, v, s: (p, g, m[:-1] + [m[-1].to("meta")], v, s),
    "masters_of_float32_params": lambda p, g, m, v, s: (p, g, m, v, s, [torch.zeros(10) for _ in p], {}),
    "short_masters": lambda p, g, m, v, s: (*[[t.bfloat16() for t in lst] for lst in (p, g)], m, v, s,
                                            [torch.zeros(10)] * (len(p) - 1), {}),
    "float64_master": lambda p, g, m, v, s: (*[[t.bfloat16() for t in lst] for lst in (p, g)], m, v, s,
                                             [torch.zeros(10)] * (len(p) - 1) + [torch.zeros(10).double()], {}),
    "two_element_grad_scale": lambda p, g, m, v, s: (p, g, m, v, s, [], {"grad_scale": torch.ones(2)}),
    "two_element_found_inf": lambda p, g, m, v, s: (p, g, m, v, s, [], {"found_inf": torch.zeros(2)}),
    "amsgrad_state_without_amsgrad": lambda p, g, m, v, s: (p, g, m, v, s, [],
                                                            {"max_exp_avg_sqs": [torch.zeros(10) for _ in p]}),
}
# The ops, and the checks they make: the C++ ops always their own; the reference and the Triton
# launch those of checks.py, which call the CPU extension's when it is built, else check in Python.
CHECKED_OPS = [("adam_", "c++"), ("cuda_sim_adam_", "c++"), ("reference", "c++"), ("reference", "python"),
               pytest.param("triton_adam_", "c++", marks=INTERPRETER),
               pytest.param("triton_adam_", "python", marks=INTERPRETER)]


def _bad_call(bad):
    p, g, m, v, s, *rest = BAD_INPUTS[bad](*_adam_inputs())
    masters, kwargs = rest if rest else ([], {})
    kwargs = dict(kwargs)
    return (p, g, m, v, kwargs.pop("max_exp_avg_sqs", []), masters, s), kwargs


def _call_adam(op_name, lists, kwargs):
    if op_name.startswith("triton"):  # (importing the backend registers its op for CPU tensors too)
        assert fused_opt.ops.triton_reason() is None
    op = fused_opt.reference.adam_ if op_name == "reference" else getattr(torch.ops.fused_opt, op_name)
    op(*lists, lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
       decoupled_weight_decay=False, l1=0.0, l1_proximal=False, **kwargs)


# The names each op's refusals start with: the CUDA kernels' simulation speaks as the CUDA op,
# and a call with a meta tensor is refused by the op's fake implementation, in the op's own name.
OP_NAMES = {"adam_": ("fused_opt::adam_",), "cuda_sim_adam_": ("fused_opt::adam_", "fused_opt::cuda_sim_adam_"),
            "reference": ("fused_opt.reference.adam_",), "triton_adam_": ("fused_opt::triton_adam_",)}


@pytest.mark.parametrize("op_name,checks", CHECKED_OPS)
@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_kernel_checks_leave_everything_untouched(bad, op_name, checks, monkeypatch):
    """Every implementation refuses the call before writing anything, in the words of the C++
    checks (those the reference makes when the CPU extension is built)."""
    with pytest.raises(RuntimeError, match="fused_opt.reference.adam_: ") as words:
        _call_adam("reference", *_bad_call(bad))
    if checks == "python":
        monkeypatch.setattr(fused_opt.checks, "_compiled", lambda: False)
    lists, kwargs = _bad_call(bad)
    before = [[t.clone() for t in lst] for lst in lists]
    if bad.startswith("sparse") and op_name != "reference":  # torch's dispatcher has no sparse kernel to call
        with pytest.raises(NotImplementedError, match=f"Could not run 'fused_opt::{op_name}' with arguments from the "
                                                      "'SparseCPU' backend"):
            _call_adam(op_name, lists, kwargs)
    else:
        with pytest.raises(RuntimeError) as error:
            _call_adam(op_name, lists, kwargs)
        name, message = str(error.value).split(": ", 1)
        assert name in OP_NAMES[op_name] and message == str(words.value).split(": ", 1)[1]
    for lst, saved in zip(lists, before):
        for t, s in zip(lst, saved):
            assert t.is_meta or (torch.equal(t.to_dense(), s.to_dense()) and t.layout == s.layout)


@pytest.mark.parametrize("bad", [bad for bad in BAD_INPUTS if not bad.startswith("sparse")])
def test_what_torch_compile_traces_refuses_as_the_kernels(bad):
    """Under fake tensors (how torch.compile traces a step) the op's fake implementation refuses
    each bad call in the kernels' words, so a compiled step fails where an eager one would."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with pytest.raises(RuntimeError, match="fused_opt.reference.adam_: ") as words:
        _call_adam("reference", *_bad_call(bad))
    with FakeTensorMode(), pytest.raises(RuntimeError) as error:
        _call_adam("adam_", *_bad_call(bad))
    assert str(error.value) == "fused_opt::adam_: " + str(words.value).split(": ", 1)[1]


@pytest.mark.parametrize("op_name,checks", CHECKED_OPS)
@pytest.mark.parametrize("family", ["adam", "rmsprop", "sgd"])
def test_a_call_without_params_does_nothing(family, op_name, checks, monkeypatch):
    if checks == "python":
        monkeypatch.setattr(fused_opt.checks, "_compiled", lambda: False)
    if op_name.startswith("triton"):
        assert fused_opt.ops.triton_reason() is None
    op = (getattr(fused_opt.reference, f"{family}_") if op_name == "reference"
          else getattr(torch.ops.fused_opt, op_name.replace("adam", family)))
    steps = [] if family == "sgd" else [[]]
    options = {"adam": dict(beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=False, decoupled_weight_decay=False),
               "rmsprop": dict(alpha=0.99, eps=1e-8, momentum=0.0, centered=False),
               "sgd": dict(momentum=0.0, dampening=0.0, nesterov=False, first_step=False)}[family]
    grad_scale = torch.ones(())
    op([], [], *[[] for _ in fused_opt.checks.STATE_LISTS[family]], [], *steps, lr=0.1, weight_decay=0.0,
       maximize=False, l1=0.0, l1_proximal=False, grad_scale=grad_scale, **options)
    assert torch.equal(grad_scale, torch.ones(()))


AMP_BACKENDS = ["cpu", "reference", "cuda_sim",
                pytest.param("triton", marks=INTERPRETER),
                pytest.param("cuda", marks=ON_GPU, id="cuda-gpu"), pytest.param("triton", marks=ON_GPU, id="triton-gpu")]


@pytest.mark.parametrize("backend", AMP_BACKENDS)
@pytest.mark.parametrize("capturable", [False, True], ids=["host-steps", "capturable"])
@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-d", "1-element"])
def test_found_inf_skips_everything(request, backend, capturable, shape):
    """AMP's found_inf and grad_scale, 0-d (as GradScaler makes them) or one element of another
    shape: a skipped step leaves params and every state (the step counters too) untouched, and the
    next step is the same as with 0-d tensors. On the GPU they live on the device (no sync)."""
    device = "cuda" if "gpu" in request.node.callspec.id else "cpu"

    def run(shape):
        params = [torch.linspace(-1, 1, 40, device=device, requires_grad=True)]
        opt = fused_opt.Adam(params, lr=0.1, backend=backend, capturable=capturable)
        params[0].grad = torch.linspace(-2, 3, 40, device=device)
        opt.step()
        snapshot = {k: v.clone() for k, v in opt.state[params[0]].items()}
        p_before = params[0].detach().clone()
        opt.found_inf, opt.grad_scale = torch.ones(shape, device=device), torch.full(shape, 4.0, device=device)
        opt.step()
        assert torch.equal(params[0], p_before)
        for k, v in opt.state[params[0]].items():
            assert torch.equal(v, snapshot[k]), k
        opt.found_inf = torch.zeros(shape, device=device)
        opt.step()
        return params[0], opt.state[params[0]]

    p, state = run(shape)
    q, expected = run(())
    assert not torch.equal(p, torch.linspace(-1, 1, 40, device=device)) and torch.equal(p, q)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


@pytest.mark.parametrize("name,kwargs,refused", [
    ("Adam", {}, True), ("RMSprop", {"momentum": 0.9}, True), ("Adam", {"capturable": True}, False),
    ("SGD", {"momentum": 0.9}, False),  # no step counter
], ids=["adam", "rmsprop", "adam-capturable", "sgd"])
def test_a_graph_capture_with_host_step_counters_is_refused(monkeypatch, name, kwargs, refused):
    """torch.optim's rule and message: capturing step() needs capturable=True where there are step
    counters (else the graph would replay one frozen bias correction). The capture is faked on the
    CPU; the GPU tests capture for real (test_cuda_graphs.py)."""
    def run(capturing):
        p = torch.linspace(-1, 1, 7, requires_grad=True)
        p.grad = torch.linspace(1, 2, 7)
        opt = getattr(fused_opt, name)([p], lr=0.1, backend="cpu", **kwargs)
        with monkeypatch.context() as m:
            if capturing:
                m.setattr(torch.cuda, "is_available", lambda: True)
                m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
            try:
                opt.step()
            except RuntimeError as e:
                return p, opt, e
        return p, opt, None

    p, opt, error = run(capturing=True)
    q, _, _ = run(capturing=False)
    assert not torch.equal(q, torch.linspace(-1, 1, 7))  # the step changes the param when it runs
    if refused:
        assert str(error) == (f"Attempting CUDA graph capture of step() for an instance of {name} but "
                              "param_groups' capturable is False.")
        assert torch.equal(p, torch.linspace(-1, 1, 7)) and not opt.state  # nothing written
    else:
        assert error is None and torch.equal(p, q)


def test_a_graph_capture_with_tensor_betas_is_refused(monkeypatch):
    """The kernels take betas as numbers, read from Tensor betas at each step, which a replayed graph
    would not do: refused before anything is written (capture faked on the CPU, as above)."""
    p = torch.linspace(-1, 1, 7, requires_grad=True)
    p.grad = torch.ones(7)
    opt = fused_opt.Adam([p], capturable=True, betas=(torch.tensor(0.9), torch.tensor(0.99)), backend="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="Tensor betas are read on the host at each step"):
        opt.step()
    assert torch.equal(p, torch.linspace(-1, 1, 7)) and not opt.state


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, torch.AcceleratorError])
def test_a_kernel_failing_after_its_checks_is_not_retried(monkeypatch, error):
    # The functional layer retries a refused call on its slow path; a launch or allocation failure
    # may come after some tensors were written, and a retry would step them twice.
    from fused_opt import dispatch

    calls = []
    real_select = dispatch.select

    class Failing:  # the selected backend, whose kernels raise `error` after doing their work
        def __init__(self, backend):
            self.backend, self.name = backend, backend.name

        def kernel(self, family):
            def run(*args, **kwargs):
                calls.append(family)
                self.backend.kernel(family)(*args, **kwargs)
                raise error("launch failed")
            return run

    monkeypatch.setattr(dispatch, "select", lambda *args: Failing(real_select(*args)))
    p = torch.zeros(5, requires_grad=True)
    p.grad = torch.arange(5.0)
    with pytest.raises(error, match="launch failed"):
        fused_opt.SGD([p], lr=1.0, backend="cpu").step()
    assert calls == ["sgd"]
    assert torch.equal(p.detach(), -torch.arange(5.0))  # stepped once


def test_a_launch_failing_after_another_group_was_written_keeps_that_groups_state(monkeypatch):
    """Once a group is written, a later failure (a launch) cannot undo it: the state that group's
    step made (its first) stays with the params it updated."""
    from fused_opt import dispatch

    real_select, calls = dispatch.select, []

    class SecondFails:
        def __init__(self, backend):
            self.backend, self.name = backend, backend.name

        def kernel(self, family):
            def run(*args, **kwargs):
                calls.append(family)
                if len(calls) == 2:
                    raise torch.AcceleratorError("launch failed")
                self.backend.kernel(family)(*args, **kwargs)
            return run

    monkeypatch.setattr(dispatch, "select", lambda *args: SecondFails(real_select(*args)))
    first, second = torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)
    opt = fused_opt.Adam([{"params": [first]}, {"params": [second]}], lr=0.1, backend="cpu")
    first.grad, second.grad = torch.ones(3), torch.ones(4)
    with pytest.raises(torch.AcceleratorError, match="launch failed"):
        opt.step()
    assert not torch.equal(first, torch.zeros(3)) and float(opt.state[first]["step"]) == 1.0
    assert torch.equal(second, torch.zeros(4))


# A state tensor a user (or a bad checkpoint) broke: every backend refuses the step before writing
# anything, and names the param by its place in param_groups.
# name -> (the state key, how its value is broken, the error, what it says of it)
BROKEN_STATES = {
    "wrong-dtype": ("exp_avg_sq", lambda t: t.float() if t.dtype == torch.float64 else t.double(), RuntimeError,
                    r"has dtype \S+ but its param has dtype"),
    "wrong-shape": ("exp_avg_sq", lambda t: t.reshape(-1), RuntimeError,
                    r"has shape \(15,\) but its param has shape \(5, 3\)"),
    "expanded": ("exp_avg_sq", lambda t: torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape), RuntimeError,
                 r"has elements that are one memory location"),
    # the same tensor object, so optimizer.state looks unchanged: the group's table must notice
    "resized-in-place": ("exp_avg_sq", lambda t: t.resize_(16), RuntimeError,
                         r"has shape \(16,\) but its param has shape \(5, 3\)"),
    # the dispatcher sends a call with a meta tensor to the ops' fake implementation, which checks
    "on-meta": ("exp_avg_sq", lambda t: t.to("meta"), RuntimeError, r"is on meta but its param is on"),
    "step-on-meta": ("step", lambda t: t.to("meta"), RuntimeError, r"is on meta, expected cpu(\Z| or cuda:0\Z)"),
    "not-a-tensor": ("exp_avg_sq", lambda t: 0.0, TypeError, r"is a float, not a tensor"),
    "sparse-step": ("step", lambda t: t.to_sparse(), RuntimeError,
                    r"must be a one-element dense float32 or float64 tensor"),
}
STATE_BACKENDS = [("cpu", "cpu"), ("cuda_sim", "cpu"), ("reference", "cpu"),
                  pytest.param("triton", "cpu", marks=INTERPRETER), pytest.param("cuda", "cuda", marks=ON_GPU),
                  pytest.param("triton", "cuda", marks=ON_GPU)]


@pytest.mark.parametrize("backend,device", STATE_BACKENDS)
@pytest.mark.parametrize("layout", ["one-group", "float32-and-float64", "two-groups"])
@pytest.mark.parametrize("broken", BROKEN_STATES)
@pytest.mark.parametrize("checks", ["c++", "python"])
def test_a_broken_state_tensor_is_refused_before_anything_is_written(checks, broken, layout, backend, device,
                                                                      monkeypatch):
    """The broken tensor belongs to the second param, which is updated after the first: in the
    float64 part of a param group that mixes dtypes (one kernel call each), or in a second param
    group. Two steps first, so that the groups that can have tables have them."""
    if checks == "python":  # as where the CPU extension was not built (the CPU and CUDA kernels keep their own)
        monkeypatch.setattr(fused_opt.checks, "_compiled", lambda: False)
    torch.manual_seed(0)
    params = [torch.randn(4, 6, device=device, requires_grad=True),
              torch.randn(5, 3, device=device, dtype=torch.float64 if layout == "float32-and-float64" else torch.float32,
                          requires_grad=True)]
    groups = [{"params": params[:1]}, {"params": params[1:]}] if layout == "two-groups" else params
    opt = fused_opt.Adam(groups, lr=0.1, amsgrad=True, backend=backend)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    before = [p.detach().clone() for p in params], [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    key, make, error, message = BROKEN_STATES[broken]
    opt.state[params[1]][key] = broken_value = make(opt.state[params[1]][key])
    for p in params:
        p.grad = torch.randn_like(p)
    place = "param_groups[1]['params'][0]" if layout == "two-groups" else "param_groups[0]['params'][1]"
    with pytest.raises(error, match=re.escape(f"fused_opt.Adam: state['{key}'] of {place} ") + message):
        opt.step()
    del before[1][1][key]
    assert opt.state[params[1]][key] is broken_value
    for p, saved, saved_state in zip(params, *before):
        assert torch.equal(p, saved)
        assert all(torch.equal(opt.state[p][k], v) for k, v in saved_state.items())


def test_a_refused_step_names_the_param():
    """Named params (torch.optim's named_parameters()) are named by their names too."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    named = list(model.named_parameters())
    opt = fused_opt.SGD([{"params": named[:2]}, {"params": named[2:], "weight_decay": 0.1}], lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    opt.state[model[1].bias]["momentum_buffer"] = torch.zeros(3)
    with pytest.raises(RuntimeError) as error:
        opt.step()
    assert str(error.value) == ("fused_opt.SGD: state['momentum_buffer'] of param_groups[1]['params'][1] ('1.bias') "
                                "has shape (3,) but its param has shape (2,)")
    assert "momentum_buffers[" in str(error.value.__cause__)  # the kernel's own words, kept as the cause


@pytest.mark.parametrize("backend,device", STATE_BACKENDS)
@pytest.mark.parametrize("shared_shape", [(4,), (2, 2)], ids=["all-one-element", "rows-one-row"])
def test_sgd_refusing_a_param_with_a_fresh_buffer_leaves_the_others_untouched(shared_shape, backend, device):
    # SGD steps params with momentum buffers and those getting their first in two kernel calls; the
    # second is checked before the first writes.
    stepped = torch.ones(4, device=device, requires_grad=True)
    # a stride of 0 (along every dimension, or along the 2 rows only): cannot be updated in place
    shared = torch.zeros(shared_shape[1:], device=device).expand(shared_shape).requires_grad_()
    opt = fused_opt.SGD([stepped, shared], lr=0.1, momentum=0.9, backend=backend)
    stepped.grad = torch.ones(4, device=device)
    opt.step()
    before = stepped.detach().clone(), opt.state[stepped]["momentum_buffer"].clone()
    stepped.grad, shared.grad = torch.ones(4, device=device), torch.ones(shared_shape, device=device)
    with pytest.raises(RuntimeError, match=re.escape("fused_opt.SGD: param_groups[0]['params'][1] has elements that "
                                                     "are one memory location")):
        opt.step()
    assert torch.equal(stepped, before[0]) and torch.equal(opt.state[stepped]["momentum_buffer"], before[1])
    assert "momentum_buffer" not in opt.state[shared]


def _functional_call(family, broken):
    """A family's functional call over two float32 params (SGD: the second gets its first momentum
    buffer); `broken`: the first param's state has a wrong shape."""
    torch.manual_seed(0)
    params, grads = [torch.randn(6), torch.randn(2, 3)], [torch.randn(6), torch.randn(2, 3)]
    state = [torch.rand(5 if broken else 6), torch.rand(2, 3)]
    if family == "adam":
        return fused_opt.functional.adam, (params, grads, state, [torch.rand_like(p) for p in params], [],
                                           [torch.tensor(1.0), torch.tensor(1.0)]), dict(
            amsgrad=False, beta1=0.9, beta2=0.99, lr=0.1, weight_decay=0.0, eps=1e-8, maximize=False)
    if family == "rmsprop":
        return fused_opt.functional.rmsprop, (params, grads, state, [], [], [torch.tensor(1.0), torch.tensor(1.0)]), dict(
            lr=0.1, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False)
    return fused_opt.functional.sgd, (params, grads, [state[0], None]), dict(
        lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False)


@pytest.mark.parametrize("backend", ["cpu", "reference", "cuda_sim"])
@pytest.mark.parametrize("family", ["adam", "rmsprop", "sgd"])
def test_functional_check_only_raises_what_the_step_would_and_writes_nothing(family, backend):
    fn, lists, kwargs = _functional_call(family, broken=False)
    before = [[None if t is None else t.clone() for t in lst] for lst in lists]
    fn(*lists, **kwargs, backend=backend, check_only=True)
    for lst, saved in zip(lists, before):  # SGD's fresh buffer is not made either
        assert all(t is s is None or torch.equal(t, s) for t, s in zip(lst, saved))
    fn(*lists, **kwargs, backend=backend)
    assert not torch.equal(lists[0][0], before[0][0])  # the step itself writes
    fn, lists, kwargs = _functional_call(family, broken=True)
    before = [[None if t is None else t.clone() for t in lst] for lst in lists]
    with pytest.raises(RuntimeError) as step_error:
        fn(*lists, **kwargs, backend=backend)
    with pytest.raises(RuntimeError) as check_error:
        fn(*lists, **kwargs, backend=backend, check_only=True)
    # the same words (the functional layer names the lists by its own argument names)
    assert "[0] has shape (5,)" in str(check_error.value)
    assert str(check_error.value).split("[0]")[1] == str(step_error.value).split("[0]")[1]
    for lst, saved in zip(lists, before):
        assert all(t is s is None or torch.equal(t, s) for t, s in zip(lst, saved))


def _adam_call(n=2, dtype=torch.float32):
    """fused_opt.functional.adam's arguments for n params (lists, keyword arguments)."""
    torch.manual_seed(0)
    params = [torch.randn(6, dtype=dtype) for _ in range(n)]
    lists = dict(params=params, grads=[torch.randn_like(p) for p in params],
                 exp_avgs=[torch.zeros(6, dtype=dtype) for _ in params],
                 exp_avg_sqs=[torch.zeros(6, dtype=dtype) for _ in params], max_exp_avg_sqs=[],
                 state_steps=[torch.tensor(0.0) for _ in params])
    return lists, dict(amsgrad=False, beta1=0.9, beta2=0.99, lr=0.1, weight_decay=0.0, eps=1e-8, maximize=False)


FUNCTIONAL_MISTAKES = {
    "short_grads": (lambda lists, kw: lists["grads"].pop(), ValueError,
                    "fused_opt.functional.adam: expected 2 tensors in grads, got 1"),
    "short_state": (lambda lists, kw: lists["exp_avgs"].pop(), ValueError,
                    "fused_opt.functional.adam: expected 2 tensors in exp_avgs, got 1"),
    **{f"no_{name}": (lambda lists, kw, name=name: lists[name].clear(), ValueError,
                      f"fused_opt.functional.adam: expected 2 tensors in {name}, got 0")
       for name in ("grads", "exp_avgs", "exp_avg_sqs", "state_steps")},  # (only an unused list may be empty)
    # without amsgrad its list may be empty, but not of another length
    "short_unused_list": (lambda lists, kw: lists.update(max_exp_avg_sqs=[torch.zeros(6)]), ValueError,
                          "fused_opt.functional.adam: expected 2 tensors in max_exp_avg_sqs, got 1"),
    "two_element_lr": (lambda lists, kw: kw.update(lr=torch.ones(2)), ValueError, "Tensor lr must be 1-element"),
    "two_element_weight_decay": (lambda lists, kw: kw.update(weight_decay=torch.ones(2)), ValueError,
                                 "Tensor weight_decay must be 1-element"),
    "unknown_l1_mode": (lambda lists, kw: kw.update(l1=0.1, l1_mode="lasso"), ValueError,
                        "Invalid l1_mode: 'lasso'; expected 'subgradient' or 'proximal'"),
    # (a step says it in the op's name)
    "two_element_grad_scale": (lambda lists, kw: kw.update(grad_scale=torch.ones(2)), RuntimeError,
                               "grad_scale must be a one-element tensor"),
    "master_for_one_param_of_two": (
        lambda lists, kw: kw.update(master_params=[lists["params"][0].float(), None]), ValueError,
        "fused_opt: master_params must hold a tensor for every 16-bit param of a (device, dtype) group, or none"),
}


@pytest.mark.parametrize("check_only", [False, True], ids=["step", "check_only"])
@pytest.mark.parametrize("mistake", FUNCTIONAL_MISTAKES)
def test_functional_refuses_bad_arguments_and_writes_nothing(mistake, check_only):
    lists, kwargs = _adam_call(dtype=torch.bfloat16 if mistake.startswith("master") else torch.float32)
    make, error, message = FUNCTIONAL_MISTAKES[mistake]
    if mistake.startswith("master"):  # float32 states for bfloat16 params with master weights
        lists.update(exp_avgs=[t.float() for t in lists["exp_avgs"]], exp_avg_sqs=[t.float() for t in lists["exp_avg_sqs"]])
    make(lists, kwargs)
    before = {k: [t.clone() for t in v] for k, v in lists.items()}
    with pytest.raises(error, match=re.escape(message)):
        fused_opt.functional.adam(**lists, **kwargs, check_only=check_only)
    for k, saved in before.items():
        assert all(torch.equal(t, s) for t, s in zip(lists[k], saved)), k
