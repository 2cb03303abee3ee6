"""The cached group tables (fused_opt/tables.py): the eager fast path must be taken when nothing
changed, and must notice every change a user can make between steps -- each scenario below is
applied alike to a fused_opt optimizer and to torch.optim's (foreach=False), and both must then
follow the same trajectory, params and every state tensor."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_opt
from cases import INTERPRETER, ON_GPU
from fused_opt.optimizers import MASTER_KEY
from fused_opt.tables import GIVE_UP_AFTER

SHAPES = [(7,), (3, 5), (), (4097,), (2, 2)]
ALGOS = {
    "adam": ("Adam", {"lr": 0.01, "weight_decay": 0.1}),
    "adamw-amsgrad": ("AdamW", {"lr": 0.01, "amsgrad": True}),
    "rmsprop-centered-momentum": ("RMSprop", {"lr": 0.01, "centered": True, "momentum": 0.5}),
    "sgd-nesterov": ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "sgd-plain": ("SGD", {"lr": 0.1}),
}


# The CPU kernels run from the table; for the CUDA kernels (here their traversal simulated on the
# CPU, the same host code) and for Triton the table hands its addresses to the launch.
BACKENDS = ["cpu", "cuda_sim", pytest.param("triton", marks=INTERPRETER)]


class Pair:
    """The same params, optimized by fused_opt (on `device`) and by torch.optim (on the CPU) side by side."""

    def __init__(self, algo: str, shapes=SHAPES, backend="cpu", device="cpu", layout=lambda t: t, **extra):
        name, kwargs = ALGOS[algo]
        kwargs = {**kwargs, **extra}
        g = torch.Generator().manual_seed(0)
        init = [layout(torch.randn(s, generator=g)) for s in shapes]
        self.ours = [p.to(device, copy=True).requires_grad_() for p in init]  # (copies keep a dense layout)
        self.theirs = [p.clone().requires_grad_() for p in init]
        self.opt = getattr(fused_opt, name)(self.ours, backend=backend, **kwargs)
        self.ref = getattr(torch.optim, name)(self.theirs, foreach=False, **kwargs)
        self.k = 0

    def both(self):
        return (self.opt, self.ours), (self.ref, self.theirs)

    def step(self, skip=(), contiguous_grads=False):
        """One step with the same grads on both sides; params whose index is in `skip` get none."""
        self.k += 1
        g = torch.Generator().manual_seed(100 + self.k)
        grads = [torch.randn(p.shape, generator=g) for p in self.ours]
        for _, params in self.both():
            for i, (p, grad) in enumerate(zip(params, grads)):  # laid out like p, as autograd makes them
                p.grad = None if i in skip else grad.clone() if contiguous_grads else torch.empty_like(p).copy_(grad)
        self.opt.step()
        self.ref.step()
        assert not self.opt._tables._ready  # (nothing kept from step to step)

    def check(self, atol=1e-6):
        for i, (p, q) in enumerate(zip(self.ours, self.theirs)):
            torch.testing.assert_close(p.cpu(), q, rtol=1e-5, atol=atol, msg=lambda m: f"param {i}: {m}")
            ours, theirs = self.opt.state.get(p, {}), self.ref.state.get(q, {})
            assert ours.keys() == theirs.keys(), i
            for key in ours:
                torch.testing.assert_close(ours[key].cpu(), theirs[key], rtol=1e-5, atol=atol,
                                           msg=lambda m: f"param {i} state {key}: {m}")

    @property
    def fast_steps(self) -> int:
        return self.opt._tables.fast_steps


def _replace_param_storage(pair):
    for _, params in pair.both():
        params[1].data = params[1].data * 2 + 1


def _replace_state_tensor(pair):
    for opt, params in pair.both():
        state = opt.state[params[0]]
        for key in [k for k in state if k != "step"][:1]:
            state[key] = torch.full_like(params[0], 0.25)


def _replace_state_storage(pair):
    for opt, params in pair.both():
        state = opt.state[params[3]]
        for key in [k for k in state if k != "step"][:1]:
            state[key].data = torch.full_like(params[3], 0.5)


def _reset_param_state(pair):
    for opt, params in pair.both():
        opt.state[params[1]] = {}


def _delete_param_state(pair):
    for opt, params in pair.both():
        opt.state.pop(params[4], None)


def _replace_step_counter(pair):
    for opt, params in pair.both():
        if "step" in opt.state[params[0]]:
            opt.state[params[0]]["step"] = torch.tensor(50.0)


def _replace_param_in_group(pair):
    g = torch.Generator().manual_seed(7)
    fresh = torch.randn(SHAPES[2], generator=g)
    for opt, params in pair.both():
        params[2] = fresh.to(params[0].device, copy=True).requires_grad_()
        opt.param_groups[0]["params"][2] = params[2]


def _append_param_to_group(pair):
    g = torch.Generator().manual_seed(8)
    fresh = torch.randn((3,), generator=g)
    for opt, params in pair.both():
        params.append(fresh.to(params[0].device, copy=True).requires_grad_())
        opt.param_groups[0]["params"].append(params[-1])


def _reverse_group(pair):
    for opt, _ in pair.both():
        opt.param_groups[0]["params"].reverse()


def _load_earlier_checkpoint(pair):
    # A copy, as torch.load gives: torch.optim's loader keeps the very tensors it is handed (steps
    # then write into the saved dict), ours copies the states it lays out anew, so a dict loaded
    # twice would differ between the two.
    for opt, _ in pair.both():
        opt.load_state_dict(copy.deepcopy(pair.saved[id(opt)]))


SCENARIOS = {
    "param-storage-replaced": _replace_param_storage,
    "state-tensor-replaced": _replace_state_tensor,
    "state-storage-replaced": _replace_state_storage,
    "param-state-reset": _reset_param_state,
    "param-state-deleted": _delete_param_state,
    "step-counter-replaced": _replace_step_counter,
    "param-replaced-in-group": _replace_param_in_group,
    "param-appended-to-group": _append_param_to_group,
    "group-reordered": _reverse_group,
    "earlier-checkpoint-loaded": _load_earlier_checkpoint,
}


def _not_contiguous(t):
    """Dense layouts that are not contiguous: channels_last (4-d, 5-d), a transposed matrix."""
    if t.dim() == 4:
        return t.to(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.to(memory_format=torch.channels_last_3d)
    return t.t().contiguous().t() if t.dim() == 2 else t


# A convolution net under channels_last, and tied or transposed weights: (1, 3, 1, 1) stays contiguous.
DENSE_SHAPES = [(8, 16, 3, 3), (5, 6), (7,), (2, 3, 2, 2, 2), (1, 3, 1, 1), (33, 65)]


def _contiguous_strides(t):
    return torch.empty(t.shape).stride()


@torch.no_grad()
def _relay_in_place(t):
    """t's memory reread in contiguous order, its values kept index for index (a user's
    as_strided_ and copy_; same memory, another element order)."""
    values = t.clone()
    t.as_strided_(t.shape, _contiguous_strides(t))
    t.copy_(values)


def _relay_a_state(opt, params, i=1):
    state = opt.state.get(params[i], {})
    for key in [k for k in state if k != "step"][:1]:
        _relay_in_place(state[key])


def _relay_param(opt, params, i=1):
    _relay_in_place(params[i])


# Changes that leave every tensor's memory where it was but change its element order: the table
# must see that a flat walk no longer pairs each param element with its own grad and states. (A
# state laid out unlike its param that is not contiguous then takes the param's layout again at
# the next step; the states of a param made contiguous keep theirs, so it takes the ordinary path.)
LAYOUT_CHANGES = {
    "state-relaid": _relay_a_state,
    "param-relaid": _relay_param,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_tables_notice_every_change(algo, scenario, backend):
    _follow_a_change(algo, scenario, backend, "cpu")


@pytest.mark.parametrize("backend", [pytest.param(b, marks=ON_GPU) for b in ("cuda", "triton")])
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_tables_notice_every_change_on_a_gpu(algo, scenario, backend):
    _follow_a_change(algo, scenario, backend, "cuda")


def _follow_a_change(algo, scenario, backend, device):
    pair = Pair(algo, backend=backend, device=device)
    pair.step()
    _save_checkpoint(pair)
    pair.step()
    pair.step()
    assert pair.fast_steps == 2  # steps 2 and 3 ran from the table built after step 1
    SCENARIOS[scenario](pair)
    tables = pair.opt._tables  # load_state_dict starts afresh
    before = tables.fast_steps
    for _ in range(3):
        pair.step()
        pair.check()
    assert tables.fast_steps - before >= 2  # a table is rebuilt after the change


# Changes to one tensor of a large group: its tensors are checked in parallel chunks of 256, so
# a change seen only by the last chunk must still make the table decline.
DEEP_CHANGES = {
    "param-storage-replaced": lambda opt, params, i: setattr(params[i], "data", params[i].data * 2 + 1),
    "state-storage-replaced": lambda opt, params, i: setattr(opt.state[params[i]]["exp_avg"], "data",
                                                             torch.full_like(params[i], 0.5)),
    "state-tensor-replaced": lambda opt, params, i: opt.state[params[i]].update(exp_avg_sq=torch.full_like(params[i], 0.25)),
    "step-counter-replaced": lambda opt, params, i: opt.state[params[i]].update(step=torch.tensor(50.0)),
    "param-replaced-in-group": lambda opt, params, i: _replace_param(opt, params, i),
}


def _replace_param(opt, params, i):
    params[i] = params[i].detach().clone().requires_grad_()
    opt.param_groups[0]["params"][i] = params[i]


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", ["cpu", "cuda_sim"])
@pytest.mark.parametrize("change", DEEP_CHANGES)
def test_a_change_deep_in_a_large_group_is_noticed(change, backend, two_threads):
    pair = Pair("adam", shapes=[(3,)] * 1100, backend=backend)
    pair.step()
    pair.step()
    assert pair.fast_steps == 1
    for opt, params in pair.both():
        DEEP_CHANGES[change](opt, params, 1090)
    pair.step()
    pair.check()
    assert pair.fast_steps == 1  # the table declined; the ordinary path took the step
    pair.step()
    pair.check()
    assert pair.fast_steps == 2  # and the rebuilt table takes the next


@pytest.mark.parametrize("backend", ["cpu", "cuda_sim"])
def test_a_grad_that_appears_deep_in_a_large_group_is_noticed(backend, two_threads):
    """A param without a grad when the table was built, deep in the group, then given one: the
    table must decline (it has no slot for it) and the rebuilt one take it."""
    pair = Pair("adam", shapes=[(3,)] * 1100, backend=backend)
    pair.step(skip={1090})
    pair.step(skip={1090})
    assert pair.fast_steps == 1
    pair.step()
    pair.check()
    assert pair.fast_steps == 1
    pair.step()
    pair.check()
    assert pair.fast_steps == 2


def _save_checkpoint(pair):
    pair.saved = {id(opt): copy.deepcopy(opt.state_dict()) for opt, _ in pair.both()}


def _set_hyperparameters(pair, lr, weight_decay, maximize):
    for opt, _ in pair.both():
        opt.param_groups[0].update(lr=lr, weight_decay=weight_decay, maximize=maximize)


# One user action between steps. A checkpoint is loaded only while the params are in the order it
# was saved in (loaded into a reordered group, it would hand each param another's state), and none
# is saved once a param was replaced in its group (its old state stays behind, and torch.optim's
# state_dict raises a KeyError for it).
ACTIONS = st.one_of(
    st.tuples(st.just("step"), st.frozensets(st.integers(0, len(SHAPES) - 1), max_size=2)),
    st.tuples(st.just("hyperparameters"), st.sampled_from([0.01, 0.003]), st.sampled_from([0.0, 0.1]), st.booleans()),
    st.tuples(st.sampled_from(["save", "load"])),
    st.tuples(st.sampled_from([name for name in SCENARIOS if name != "earlier-checkpoint-loaded"])),
    st.tuples(st.sampled_from(["contiguous-grads", *LAYOUT_CHANGES])),
)


def _follow_a_sequence(backend, algo, actions, dense=False):
    """The scenarios above one at a time miss how they combine: here random sequences of steps
    (some params without grads, or with grads laid out unlike their params), hyperparameter edits,
    checkpoints and the scenarios' changes, over contiguous params or over `dense` ones that are not."""
    pair = Pair(algo, backend=backend, layout=_not_contiguous if dense else lambda t: t)
    pair.step()
    pair.saved, can_save = None, True
    for name, *args in actions:
        if name == "step":
            pair.step(skip=args[0])
            pair.check(atol=1e-5)  # float32 rounding, as torch's, around a weight decay that cancels a grad
        elif name == "hyperparameters":
            _set_hyperparameters(pair, *args)
        elif name == "contiguous-grads":
            pair.step(contiguous_grads=True)
            pair.check(atol=1e-5)
        elif name in LAYOUT_CHANGES:
            for opt, params in pair.both():
                LAYOUT_CHANGES[name](opt, params)
        elif name == "save":
            if can_save:
                _save_checkpoint(pair)
        elif name == "load":
            if pair.saved is not None:
                _load_earlier_checkpoint(pair)
        else:
            SCENARIOS[name](pair)
            if name in ("group-reordered", "param-appended-to-group"):
                pair.saved = None  # a checkpoint loads only into a group of its params, in its order
            can_save = can_save and name != "param-replaced-in-group"
    pair.step()
    pair.check(atol=1e-5)


SEQUENCES = dict(algo=st.sampled_from(list(ALGOS)), actions=st.lists(ACTIONS, min_size=1, max_size=12),
                 dense=st.booleans())


@pytest.mark.parametrize("backend", ["cpu", "cuda_sim"])
@settings(max_examples=100, deadline=None, derandomize=True)
@given(**SEQUENCES)
def test_any_sequence_of_changes_is_followed(backend, algo, actions, dense):
    _follow_a_sequence(backend, algo, actions, dense)


@INTERPRETER
@settings(max_examples=40, deadline=None, derandomize=True)  # ~0.4 s a sequence in the interpreter
@given(**SEQUENCES)
def test_any_sequence_of_changes_is_followed_on_triton(algo, actions, dense):
    _follow_a_sequence("triton", algo, actions, dense)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_tables_follow_grads_that_come_and_go(algo, backend):
    pair = Pair(algo, backend=backend)
    for skip in [(), (), (1,), (1,), (), (0, 4), (), ()]:
        pair.step(skip)
        pair.check()
    assert pair.fast_steps >= 3


def test_a_group_whose_table_never_lasts_stops_getting_one():
    pair = Pair("adam")
    for k in range(12):
        pair.step(skip=(k % 2,))  # a different set of params has grads every step
        pair.check()
        assert len(pair.opt._tables._tables) == (k < GIVE_UP_AFTER), f"after step {k}"
    assert pair.fast_steps == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["adam", "sgd-nesterov"])
def test_hyperparameter_changes_between_steps(algo, backend):
    pair = Pair(algo, backend=backend)
    pair.step()
    pair.step()
    for opt, _ in pair.both():
        group = opt.param_groups[0]
        group["lr"] = torch.tensor(0.003)
        group["weight_decay"] = 0.2
        if "amsgrad" in group:
            group["maximize"] = True
        else:
            group["dampening"], group["nesterov"] = 0.1, False
    for _ in range(3):
        pair.step()
        pair.check()
    assert pair.fast_steps == 4


SLOT_CHANGES = {  # an option switched on mid-run that needs a state slot the table was built without
    "adam-amsgrad": ("Adam", {"lr": 0.01}, {"amsgrad": True}),
    "rmsprop-centered": ("RMSprop", {"lr": 0.01}, {"centered": True}),
    "rmsprop-momentum": ("RMSprop", {"lr": 0.01, "centered": True}, {"momentum": 0.5}),
    "sgd-momentum": ("SGD", {"lr": 0.1}, {"momentum": 0.9}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", SLOT_CHANGES)
def test_an_option_that_needs_a_new_state_slot_is_followed(change, backend):
    """torch.optim raises a KeyError here; fused_opt creates the new state as on a first step.
    The table must decline (its slot for that state is empty) and be rebuilt; the reference
    backend, which has no tables, is the yardstick."""
    name, kwargs, switch = SLOT_CHANGES[change]
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    runs = []
    for b in (backend, "reference"):
        params = [p.clone().requires_grad_() for p in init]
        runs.append((params, getattr(fused_opt, name)(params, backend=b, **kwargs)))
    for k in range(6):
        if k == 3:
            for _, opt in runs:
                opt.param_groups[0].update(switch)
        grads = [torch.randn(s, generator=g) for s in SHAPES]
        for params, opt in runs:
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            opt.step()
        (ours, opt), (ref, ref_opt) = runs
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            assert opt.state[p].keys() == ref_opt.state[q].keys()
            for key, value in ref_opt.state[q].items():
                torch.testing.assert_close(opt.state[p][key], value, rtol=1e-5, atol=1e-6)
    assert opt._tables.fast_steps == 4  # steps 2, 3, 5 and 6: step 4 declined and rebuilt the table


def test_grads_the_table_cannot_take_go_the_ordinary_way():
    pair = Pair("adam", shapes=[(3, 4), (5,)])
    pair.step()
    for k in range(3):
        g = torch.Generator().manual_seed(k)
        grad = torch.randn(4, 3, generator=g).t()  # a transposed (non-contiguous) grad
        for _, params in pair.both():
            params[0].grad = grad.clone()
            params[1].grad = torch.ones(5)
        pair.opt.step()
        pair.ref.step()
        pair.check()
    assert pair.fast_steps == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_dense_params_that_are_not_contiguous_step_from_the_table(algo, backend):
    """Their grads (from autograd) and states (zeros_like) share their strides, so one flat walk
    steps them all; the states keep the param's layout, as torch.optim's do."""
    _step_dense_params(algo, backend, "cpu")


@pytest.mark.parametrize("backend", [pytest.param(b, marks=ON_GPU) for b in ("cuda", "triton")])
@pytest.mark.parametrize("algo", ALGOS)
def test_dense_params_that_are_not_contiguous_step_from_the_table_on_a_gpu(algo, backend):
    _step_dense_params(algo, backend, "cuda")


def _step_dense_params(algo, backend, device):
    pair = Pair(algo, shapes=DENSE_SHAPES, backend=backend, device=device, layout=_not_contiguous)
    assert sum(not p.is_contiguous() for p in pair.ours) == 4
    for _ in range(4):
        pair.step()
        pair.check()
    assert pair.fast_steps == 3
    for p, q in zip(pair.ours, pair.theirs):
        for key, value in pair.ref.state[q].items():
            if key != "step":
                assert pair.opt.state[p][key].stride() == value.stride(), key
                assert pair.opt.state[p][key].device == p.device, key


@pytest.mark.parametrize("backend", ["cpu", "cuda_sim"])
@pytest.mark.parametrize("algo", ["adam", "rmsprop-centered-momentum", "sgd-nesterov"])
@pytest.mark.parametrize("change", LAYOUT_CHANGES)
def test_a_change_of_element_order_is_noticed(change, algo, backend):
    pair = Pair(algo, shapes=DENSE_SHAPES, backend=backend, layout=_not_contiguous)
    for _ in range(3):
        pair.step()
    assert pair.fast_steps == 2
    for opt, params in pair.both():
        LAYOUT_CHANGES[change](opt, params)
    pair.step()
    pair.check()
    assert pair.fast_steps == 2  # the table declined
    for _ in range(2):
        pair.step()
        pair.check()
    # a relaid state took its param's layout again, so the rebuilt table runs the next steps; the
    # states of a param made contiguous are left as they are, and it goes the ordinary way each step
    assert pair.fast_steps == (4 if change == "state-relaid" else 2)


@pytest.mark.parametrize("backend", ["cpu", "cuda_sim"])
def test_grads_laid_out_unlike_their_params_go_the_ordinary_way(backend):
    pair = Pair("adam", shapes=DENSE_SHAPES, backend=backend, layout=_not_contiguous)
    pair.step()
    pair.step(contiguous_grads=True)
    pair.check()
    assert pair.fast_steps == 0
    pair.step()
    pair.check()
    assert pair.fast_steps == 1


def test_a_bad_grad_still_gets_the_ops_error_and_changes_nothing():
    pair = Pair("adam", shapes=[(3,), (5,)])
    pair.step()
    pair.step()
    before = [p.detach().clone() for p in pair.ours]
    state = [{k: v.clone() for k, v in pair.opt.state[p].items()} for p in pair.ours]
    pair.ours[1].grad = torch.ones(5).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        pair.opt.step()
    for p, b, s in zip(pair.ours, before, state):
        assert torch.equal(p, b)
        assert all(torch.equal(pair.opt.state[p][k], v) for k, v in s.items())


# A scalar of the step given as a tensor of two elements, after steps from a table.
TWO_ELEMENT_SCALARS = {
    "grad_scale": (lambda opt: setattr(opt, "grad_scale", torch.ones(2)), RuntimeError, "grad_scale must be a one-element tensor"),
    "found_inf": (lambda opt: setattr(opt, "found_inf", torch.zeros(2)), RuntimeError, "found_inf must be a one-element tensor"),
    "lr": (lambda opt: opt.param_groups[0].update(lr=torch.full((2,), 0.01)), ValueError, "Tensor lr must be 1-element"),
}


@pytest.mark.parametrize("scalar", TWO_ELEMENT_SCALARS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scalar_of_two_elements_still_gets_the_ops_error_and_changes_nothing(scalar, backend):
    set_scalar, error, message = TWO_ELEMENT_SCALARS[scalar]
    pair = Pair("adam", shapes=[(3,), (5,)], backend=backend)
    pair.step()
    pair.step()
    assert pair.fast_steps == 1
    before = [p.detach().clone() for p in pair.ours]
    state = [{k: v.clone() for k, v in pair.opt.state[p].items()} for p in pair.ours]
    set_scalar(pair.opt)
    with pytest.raises(error, match=message):
        pair.opt.step()
    for p, b, s in zip(pair.ours, before, state):
        assert torch.equal(p, b)
        assert all(torch.equal(pair.opt.state[p][k], v) for k, v in s.items())

def test_a_step_that_raises_lets_go_of_the_grads_a_table_checked():
    """A CPU table holds the step's grads from its checks until it runs; when a later group raises,
    it lets go of them (else they would live until the next step)."""
    params = [torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = fused_opt.Adam([{"params": params[:1]}, {"params": params[1:]}])
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert opt._tables.fast_steps == 2
    params[0].grad, params[1].grad = torch.randn(5), torch.randn(3).to_sparse()
    held = weakref.ref(params[0].grad)
    with pytest.raises(RuntimeError, match="does not support sparse gradients") as raised:
        opt.step()
    del raised  # (its traceback's frames hold the step's lists)
    params[0].grad = None
    assert held() is None

def test_add_param_group_and_a_second_group():
    pair = Pair("adam")
    pair.step()
    pair.step()
    extra_init = torch.randn(6, generator=torch.Generator().manual_seed(3))
    for opt, params in pair.both():
        params.append(extra_init.clone().requires_grad_())
        opt.add_param_group({"params": [params[-1]], "lr": 0.05})
    for _ in range(4):
        pair.step()
        pair.check()
    assert pair.fast_steps >= 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_skips_a_table_step_entirely(backend):
    pair = Pair("adam", backend=backend)
    pair.step()
    before = [p.detach().clone() for p in pair.ours]
    steps = [pair.opt.state[p]["step"].item() for p in pair.ours]
    pair.opt.found_inf = torch.ones(())
    for p in pair.ours:
        p.grad = torch.ones_like(p)
    pair.opt.step()
    del pair.opt.found_inf
    assert pair.fast_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(pair.ours, before))
    assert [pair.opt.state[p]["step"].item() for p in pair.ours] == steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_backend_change_between_steps_is_followed(backend):
    pair = Pair("adam", backend="reference")
    for _ in range(3):
        pair.step()
    assert pair.fast_steps == 0  # the reference gets no tables
    pair.opt.param_groups[0]["backend"] = backend
    for _ in range(3):
        pair.step()
        pair.check()
    assert pair.fast_steps == 2
    pair.opt.param_groups[0]["backend"] = "reference"
    pair.step()
    pair.check()
    assert pair.fast_steps == 2


def test_a_deepcopy_gets_no_tables_and_continues_like_the_original():
    pair = Pair("adam")
    pair.opt.skip_nonfinite = True
    pair.step()
    pair.step()
    twin = copy.deepcopy(pair.opt)
    assert twin.skip_nonfinite and not twin._tables._tables
    twin_params = twin.param_groups[0]["params"]
    for _ in range(2):
        for p, q in zip(pair.ours, twin_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        pair.opt.step()
        twin.step()
    for p, q in zip(pair.ours, twin_params):
        assert torch.equal(p, q)
        assert all(torch.equal(v, twin.state[q][k]) for k, v in pair.opt.state[p].items())


class MasterRun:
    """bfloat16 params with float32 master weights on one backend; the reference backend (which
    has no tables) is the yardstick, each change applied to both alike."""

    def __init__(self, algo: str, backend: str, shapes=SHAPES, device="cpu", layout=lambda t: t):
        name, kwargs = ALGOS[algo]
        g = torch.Generator().manual_seed(0)
        self.params = [layout(torch.randn(s, generator=g)).to(device, torch.bfloat16).requires_grad_() for s in shapes]
        self.opt = getattr(fused_opt, name)(self.params, backend=backend, master_weights=True, **kwargs)
        self.k = 0

    def step(self, skip=()):
        self.k += 1
        g = torch.Generator().manual_seed(100 + self.k)
        for i, p in enumerate(self.params):
            grad = torch.randn(p.shape, generator=g)
            p.grad = None if i in skip else torch.empty_like(p).copy_(grad)
        self.opt.step()


def _master_pair(algo, backend, shapes=SHAPES, device="cpu", layout=lambda t: t):
    return MasterRun(algo, backend, shapes, device, layout), MasterRun(algo, "reference", shapes, layout=layout)


def _check_masters(ours: MasterRun, ref: MasterRun, rounded: bool = False):
    """States and master copies within float32 tolerance of the reference; each param its master
    rounded, so within a bfloat16 rounding of the reference's. So are the bfloat16 states once
    master weights are switched off (a rounding that falls the other way can then carry on), and
    everything once they were (`rounded`: the copies made again from the params)."""
    def close(x, y, what):
        scale = max(1.0, y.abs().max().item() if y.numel() else 0.0)
        rtol, atol = (1e-5, 1e-6) if y.dtype == torch.float32 and not rounded else (2 ** -7, 2 ** -7)
        torch.testing.assert_close(x.cpu(), y, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")

    for i, (p, q) in enumerate(zip(ours.params, ref.params)):
        mine, theirs = ours.opt.state[p], ref.opt.state[q]
        assert sorted(mine) == sorted(theirs), i
        for key, value in theirs.items():
            assert mine[key].dtype == value.dtype, (i, key)
            close(mine[key], value, f"param {i} {key}")
        close(p, q, f"param {i}")
        if MASTER_KEY in mine and p.grad is not None:  # stepped just now
            assert torch.equal(p, mine[MASTER_KEY].to(p.dtype)), f"param {i} is not its master rounded"


def _set_master(run, i, value):
    run.opt.state[run.params[i]][MASTER_KEY] = torch.full_like(run.params[i], value, dtype=torch.float32)


MASTER_CHANGES = {
    "master-replaced": lambda run, saved: _set_master(run, 0, 0.25),
    "master-storage-replaced": lambda run, saved: setattr(run.opt.state[run.params[3]][MASTER_KEY], "data",
                                                          torch.full_like(run.params[3], 0.5, dtype=torch.float32)),
    "param-storage-replaced": lambda run, saved: setattr(run.params[1], "data", run.params[1].data * 2),
    "master-weights-switched-off": lambda run, saved: run.opt.param_groups[0].update(master_weights=False),
    "earlier-checkpoint-loaded": lambda run, saved: run.opt.load_state_dict(saved[run]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["adam", "rmsprop-centered-momentum", "sgd-nesterov"])
@pytest.mark.parametrize("change", MASTER_CHANGES)
def test_tables_with_master_weights_notice_every_change(change, algo, backend):
    """Groups with master weights step from tables too (the master copies are a sixth slot); a
    change to a master copy, or master weights switched off, must make the table decline."""
    _follow_a_master_change(change, algo, backend, "cpu")


@pytest.mark.parametrize("backend", [pytest.param(b, marks=ON_GPU) for b in ("cuda", "triton")])
@pytest.mark.parametrize("algo", ["adam", "rmsprop-centered-momentum", "sgd-nesterov"])
@pytest.mark.parametrize("change", MASTER_CHANGES)
def test_tables_with_master_weights_notice_every_change_on_a_gpu(change, algo, backend):
    _follow_a_master_change(change, algo, backend, "cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["adam", "rmsprop-centered-momentum", "sgd-nesterov"])
def test_dense_params_with_master_weights_step_from_the_table(algo, backend):
    ours, ref = _master_pair(algo, backend, shapes=DENSE_SHAPES, layout=_not_contiguous)
    for _ in range(4):
        for run in (ours, ref):
            run.step()
        _check_masters(ours, ref)
    assert ours.opt._tables.fast_steps == 3
    for p in ours.params:  # the master copy and the states keep the param's layout
        assert all(t.stride() == p.stride() for k, t in ours.opt.state[p].items() if k != "step")


def _follow_a_master_change(change, algo, backend, device):
    ours, ref = _master_pair(algo, backend, device=device)
    for run in (ours, ref):
        run.step()
    saved = {run: copy.deepcopy(run.opt.state_dict()) for run in (ours, ref)}
    for _ in range(2):
        for run in (ours, ref):
            run.step()
        _check_masters(ours, ref)
    assert ours.opt._tables.fast_steps == 2 and ref.opt._tables.fast_steps == 0
    for run in (ours, ref):
        MASTER_CHANGES[change](run, saved)
    tables = ours.opt._tables  # load_state_dict starts afresh
    before = tables.fast_steps
    for _ in range(3):
        for run in (ours, ref):
            run.step()
        _check_masters(ours, ref)
    assert tables.fast_steps - before >= 2  # a table is rebuilt after the change


@pytest.mark.parametrize("backend", ["cpu", "cuda_sim"])
def test_a_master_copy_replaced_deep_in_a_large_group_is_noticed(backend, two_threads):
    ours, ref = _master_pair("adam", backend, shapes=[(3,)] * 1100)
    for _ in range(2):
        for run in (ours, ref):
            run.step()
    assert ours.opt._tables.fast_steps == 1
    for run in (ours, ref):
        _set_master(run, 1090, 0.75)
    for fast in (1, 2):  # the table declines, then the rebuilt one takes the next step
        for run in (ours, ref):
            run.step()
        _check_masters(ours, ref)
        assert ours.opt._tables.fast_steps == fast


_CHANGED = {"master-replaced": 0, "master-storage-replaced": 3, "param-storage-replaced": 1}  # (once it has a master)
MASTER_ACTIONS = st.one_of(
    st.tuples(st.just("step"), st.frozensets(st.integers(0, len(SHAPES) - 1), max_size=2)),
    st.tuples(st.just("master_weights"), st.booleans()),
    st.tuples(st.sampled_from(["save", "load"])),
    st.tuples(st.sampled_from(list(_CHANGED))),
)


@pytest.mark.parametrize("backend", ["cpu", "cuda_sim"])
@settings(max_examples=60, deadline=None, derandomize=True)
@given(algo=st.sampled_from(list(ALGOS)), actions=st.lists(MASTER_ACTIONS, min_size=1, max_size=12))
def test_any_sequence_of_master_weight_changes_is_followed(backend, algo, actions):
    """Random sequences of steps (some params without grads), master weights switched on and off,
    checkpoints, master copies and params replaced: the tables against the reference."""
    ours, ref = _master_pair(algo, backend)
    saved, rounded = None, False
    for name, *args in actions:
        rounded = rounded or (name == "master_weights" and not args[0])
        for run in (ours, ref):
            if name == "step":
                run.step(skip=args[0])
            elif name == "master_weights":
                run.opt.param_groups[0]["master_weights"] = args[0]
            elif name == "load" and saved is not None:
                run.opt.load_state_dict(saved[run])
            elif name in MASTER_CHANGES and MASTER_KEY in run.opt.state.get(run.params[_CHANGED[name]], {}):
                MASTER_CHANGES[name](run, saved)
        if name == "save":
            saved = {run: copy.deepcopy(run.opt.state_dict()) for run in (ours, ref)}
        if name == "step":
            _check_masters(ours, ref, rounded)
    for run in (ours, ref):
        run.step()
    _check_masters(ours, ref, rounded)
