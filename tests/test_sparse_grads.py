"""Sparse gradients (nn.Embedding(sparse=True)): fused_opt.SGD takes them as torch.optim.SGD does,
beside the fused update of the group's dense params; Adam and RMSprop refuse them, as torch's do.

A param with a sparse grad must end, step after step, with torch.optim.SGD's bits and its momentum
buffer with torch's layout (sparse) and values; the dense param of the same group must end where
fused_opt's update of it alone ends (it still takes the kernels)."""

from __future__ import annotations

import io

import pytest
import torch

import fused_opt
from cases import ALGORITHMS, DTYPES, INTERPRETER, ON_GPU, TOLERANCES, assert_same_bits
from fused_opt.optimizers import MASTER_KEY

SGD_OPTIONS = ALGORITHMS["sgd"][3]  # the case table's: gd, momentum, nesterov, dampening_max
BACKENDS = [("cpu", "cpu"), ("cuda_sim", "cpu"), ("reference", "cpu"), pytest.param("triton", "cpu", marks=INTERPRETER),
            pytest.param("cuda", "cuda", marks=ON_GPU), pytest.param("triton", "cuda", marks=ON_GPU)]
ROWS, COLS = 12, 5
STEPS = 5


def sparse_grad(step: int, dtype: torch.dtype, scale: float = 1.0, device: str = "cpu") -> torch.Tensor:
    """An embedding's grad: a repeated row (uncoalesced), a row that moves with the step, and no
    rows at all at step 2."""
    rows = [] if step == 2 else [1, 3, 3, (5 + step) % ROWS, 0]
    g = torch.Generator().manual_seed(step)
    values = torch.randn(len(rows), COLS, generator=g, dtype=torch.float64) * scale
    return torch.sparse_coo_tensor(torch.tensor(rows, dtype=torch.long).reshape(1, -1), values.to(dtype),
                                   (ROWS, COLS), check_invariants=True).to(device)


def with_row(g: torch.Tensor, k: int, value: float) -> torch.Tensor:
    """g with its k-th stored row of values set to `value`."""
    return torch.sparse_coo_tensor(g._indices(), g._values().index_fill(0, torch.tensor([k]), value), g.shape,
                                   check_invariants=True)


def dense_grad(step: int, dtype: torch.dtype, scale: float = 1.0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(3, 7, generator=g, dtype=torch.float64) * scale).to(device, dtype)


def make_params(dtype: torch.dtype, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(ROWS, COLS, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_(),
            torch.randn(3, 7, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()]


def assert_close(ours: list, theirs: list, where: str) -> None:
    for (name, x), (_, y) in zip(ours, theirs):
        torch.testing.assert_close(x, y, msg=lambda m: f"{where} {name}: {m}")


def assert_like_torch(ours, our_opt, theirs, their_opt, where: str, master: bool = False, exact: bool = True) -> None:
    """The sparse-grad param (master: its float32 master copy) and its momentum buffer: torch's
    bits (exact; else within the dtype's tolerance) and layout."""
    compare = assert_same_bits if exact else assert_close
    mine, torchs = our_opt.state[ours].get("momentum_buffer"), their_opt.state[theirs].get("momentum_buffer")
    compare([("param", our_opt.state[ours][MASTER_KEY] if master else ours)], [("param", theirs)], where)
    assert (mine is None) == (torchs is None), where
    if mine is not None:
        assert mine.layout == torchs.layout, where
        compare([("momentum_buffer", mine.to_dense())], [("momentum_buffer", torchs.to_dense())], where)


@pytest.mark.parametrize("lr", ["float", "tensor"])
@pytest.mark.parametrize("dtype", ["f32", "f64", "bf16"])
@pytest.mark.parametrize("option", SGD_OPTIONS)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sparse_grads_step_as_torch_sgd_and_dense_ones_as_fused(backend, device, option, dtype, lr):
    dtype = DTYPES[dtype]
    kwargs = dict(SGD_OPTIONS[option], lr=torch.tensor(0.1) if lr == "tensor" else 0.1)
    ours, theirs, alone = make_params(dtype, device), make_params(dtype, device), make_params(dtype, device)[1:]
    our_opt = fused_opt.SGD(ours, backend=backend, **kwargs)
    their_opt = torch.optim.SGD(theirs, **kwargs)
    alone_opt = fused_opt.SGD(alone, backend=backend, **kwargs)
    for step in range(STEPS):
        for params in (ours, theirs):
            params[0].grad = sparse_grad(step, dtype, device=device)
            params[1].grad = dense_grad(step, dtype, device=device)
        alone[0].grad = dense_grad(step, dtype, device=device)
        for opt in (our_opt, their_opt, alone_opt):
            opt.step()
        # (on a GPU torch may sum a sparse tensor's repeated rows in any order: an ulp apart at times)
        assert_like_torch(ours[0], our_opt, theirs[0], their_opt, f"step {step}", exact=device == "cpu")
        assert_same_bits([("dense", ours[1])], [("dense", alone[0])], f"step {step}")
    if dtype in TOLERANCES:  # and the dense param near torch's
        torch.testing.assert_close(ours[1], theirs[1], rtol=TOLERANCES[dtype][0], atol=TOLERANCES[dtype][1])


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("backend", ["cpu", "cuda_sim"])
def test_grad_scaler_unscales_inside_the_step_and_skips_like_torch(backend, dtype):
    """GradScaler hands fused_opt.SGD the scale and found_inf (torch's SGD gets unscaled grads);
    an inf in the sparse grad at step 3 skips that step for both, and the scale evolves alike.
    (GradScaler refuses float16 grads for torch's SGD: test_unscaling_gives_grad_scalers_bits.)"""
    dtype = DTYPES[dtype]
    kwargs = dict(lr=0.1, momentum=0.9)
    ours, theirs = make_params(dtype)[:1], make_params(dtype)[:1]
    runs = [(ours, fused_opt.SGD(ours, backend=backend, **kwargs)), (theirs, torch.optim.SGD(theirs, **kwargs))]
    scalers = [torch.amp.GradScaler("cpu", init_scale=3.7 * 2**6, growth_interval=2) for _ in runs]
    for step in range(STEPS):
        for (params, opt), scaler in zip(runs, scalers):
            g = sparse_grad(step, dtype, scale=scaler.scale(torch.ones(())).item())  # (as backward would scale it)
            if step == 3:
                g = with_row(g, 0, float("inf"))
            params[0].grad = g
            scaler.step(opt)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_like_torch(ours[0], runs[0][1], theirs[0], runs[1][1], f"step {step}")
    assert scalers[0].get_scale() < 3.7 * 2**6 * 2  # the inf step halved it


@pytest.mark.parametrize("option", [dict(nesterov=True), dict(dampening=0.3)])
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_16_bit_params_against_torch_in_float32(dtype, option):
    """bfloat16 with master weights: the float32 copy follows torch's float32 run bit for bit, and
    the param is the copy rounded. float16 without: torch's CPU kernels cannot add two sparse
    float16 tensors (its SGD raises mid-step); fused_opt adds them in float32 and rounds, close to
    torch's float32 run."""
    dtype = DTYPES[dtype]
    master = dtype == torch.bfloat16
    ours = make_params(dtype)[:1]
    theirs = [ours[0].detach().float().requires_grad_()]
    our_opt = fused_opt.SGD(ours, lr=0.1, momentum=0.9, master_weights=master, **option)
    their_opt = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, **option)
    for step in range(STEPS):
        ours[0].grad = sparse_grad(step, dtype)
        theirs[0].grad = ours[0].grad.float()
        our_opt.step()
        their_opt.step()
        if master:
            assert_like_torch(ours[0], our_opt, theirs[0], their_opt, f"step {step}", master=True)
            assert_same_bits([("param", ours[0])], [("param", theirs[0].to(dtype))], f"step {step}")
    buffer = our_opt.state[ours[0]]["momentum_buffer"]
    assert buffer.dtype == (torch.float32 if master else dtype) and buffer.is_sparse
    torch.testing.assert_close(ours[0].float(), theirs[0], rtol=0, atol=3e-3 if dtype == torch.float16 else 3e-2)


@pytest.mark.parametrize("into", ["fused_opt", "torch"])
def test_a_checkpoint_with_sparse_momentum_buffers_resumes_exactly(into):
    """Saved mid-run (torch.save, loaded with weights_only=True), loaded into a new optimizer of
    either library: it continues as the uninterrupted run."""
    make = {"fused_opt": fused_opt.SGD, "torch": torch.optim.SGD}
    kwargs = dict(lr=0.1, momentum=0.9, dampening=0.2)
    straight = make_params(torch.float32)[:1]
    straight_opt = fused_opt.SGD(straight, **kwargs)
    resumed = make_params(torch.float32)[:1]
    opt = fused_opt.SGD(resumed, **kwargs)
    for step in range(2 * STEPS):
        if step == STEPS:
            buffer = io.BytesIO()
            torch.save({"params": resumed[0].detach(), "opt": opt.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            resumed = [saved["params"].clone().requires_grad_()]
            opt = make[into](resumed, **kwargs)
            opt.load_state_dict(saved["opt"])
            assert opt.state[resumed[0]]["momentum_buffer"].is_sparse
        for params, o in ((straight, straight_opt), (resumed, opt)):
            params[0].grad = sparse_grad(step, torch.float32)
            o.step()
        assert_like_torch(resumed[0], opt, straight[0], straight_opt, f"step {step}")


def test_a_sparse_momentum_buffer_goes_dense_when_its_param_gets_dense_grads():
    """A model switched from nn.Embedding(sparse=True) to sparse=False mid-run (torch's SGD raises):
    the buffer is made dense, values unchanged, and the kernels take the param from there."""
    ours, theirs = make_params(torch.float32)[:1], make_params(torch.float32)[:1]
    our_opt = fused_opt.SGD(ours, lr=0.1, momentum=0.9)
    their_opt = fused_opt.SGD(theirs, lr=0.1, momentum=0.9)
    for step in range(2 * STEPS):
        for params in (ours, theirs):
            g = sparse_grad(step, torch.float32)
            params[0].grad = g.to_dense() if step >= STEPS else g
        if step == STEPS:  # the twin's buffer, made dense by hand
            their_opt.state[theirs[0]]["momentum_buffer"] = their_opt.state[theirs[0]]["momentum_buffer"].to_dense()
        our_opt.step()
        their_opt.step()
        assert_same_bits([("param", ours[0])], [("param", theirs[0])], f"step {step}")
    assert our_opt.state[ours[0]]["momentum_buffer"].layout == torch.strided



@pytest.mark.parametrize("nesterov", [False, True])
def test_a_dense_momentum_buffer_takes_sparse_grads(nesterov):
    """The other way round (sparse=True switched on mid-run): the dense buffer takes the sparse
    grad's rows and stays dense. torch.optim.SGD, from the same state, gives the same bits; with
    Nesterov it raises (it cannot add a dense buffer to a sparse grad), so it is handed the grads
    made dense, and the sum of a repeated row rounds otherwise."""
    kwargs = dict(lr=0.1, momentum=0.9, dampening=0.1 * (not nesterov), nesterov=nesterov)
    ours = make_params(torch.float32)[:1]
    our_opt = fused_opt.SGD(ours, **kwargs)
    for step in range(2):
        ours[0].grad = sparse_grad(step, torch.float32).to_dense()
        our_opt.step()
    theirs = [ours[0].detach().clone().requires_grad_()]
    their_opt = torch.optim.SGD(theirs, **kwargs)
    their_opt.state[theirs[0]]["momentum_buffer"] = our_opt.state[ours[0]]["momentum_buffer"].clone()
    for step in range(2, 2 + STEPS):
        ours[0].grad = sparse_grad(step, torch.float32)
        theirs[0].grad = ours[0].grad.to_dense() if nesterov else ours[0].grad
        our_opt.step()
        their_opt.step()
        assert our_opt.state[ours[0]]["momentum_buffer"].layout == torch.strided
        assert_like_torch(ours[0], our_opt, theirs[0], their_opt, f"step {step}", exact=not nesterov)


def test_a_zero_weight_decay_tensor_takes_sparse_grads():
    """weight_decay=torch.tensor(0.0) is no weight decay: the step goes as with 0.0."""
    runs = [make_params(torch.float32)[:1] for _ in range(2)]
    opts = [fused_opt.SGD(params, lr=0.1, momentum=0.9, weight_decay=wd)
            for params, wd in zip(runs, (torch.tensor(0.0), 0.0))]
    for step in range(STEPS):
        for params, opt in zip(runs, opts):
            params[0].grad = sparse_grad(step, torch.float32)
            opt.step()
        assert_like_torch(runs[0][0], opts[0], runs[1][0], opts[1], f"step {step}")

@pytest.mark.parametrize("option", [{"weight_decay": 0.1}, {"weight_decay": torch.tensor(0.1)}, {"l1": 0.01}])
def test_weight_decay_or_l1_with_a_sparse_grad_is_refused_before_anything_changes(option):
    """The sparse grad is the second param of the second group; the first group steps from its table."""
    params = [torch.randn(4, 6, requires_grad=True), torch.randn(3, 7, requires_grad=True),
              torch.randn(ROWS, COLS, requires_grad=True)]
    opt = fused_opt.SGD([{"params": params[:1]}, {"params": params[1:], **option}], lr=0.1, momentum=0.9)
    for step in range(2):  # the embedding without a grad yet
        params[0].grad, params[1].grad = torch.randn(4, 6), dense_grad(step, torch.float32)
        opt.step()
    before = [p.detach().clone() for p in params], {p: opt.state[p]["momentum_buffer"].clone() for p in params[:2]}
    params[2].grad = sparse_grad(0, torch.float32)
    with pytest.raises(RuntimeError, match=r"fused_opt\.SGD: the grad of param_groups\[1\]\['params'\]\[1\] is "
                                           r"sparse, which takes no weight decay or L1"):
        opt.step()
    for p, saved in zip(params, before[0]):
        assert torch.equal(p, saved)
    assert params[2] not in opt.state or not opt.state[params[2]]
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in before[1].items())


@pytest.mark.parametrize("algo", ["adam", "adamw", "rmsprop"])
def test_adam_and_rmsprop_refuse_sparse_grads_as_torch_does(algo):
    ours_cls, torch_cls, kwargs, _ = ALGORITHMS[algo]
    for cls in (ours_cls, torch_cls):
        p = make_params(torch.float32)[0]
        before = p.detach().clone()
        opt = cls([p], **kwargs)
        p.grad = sparse_grad(0, torch.float32)
        with pytest.raises(RuntimeError, match="does not support sparse gradients"):
            opt.step()
        assert torch.equal(p, before)


def test_skip_nonfinite_sees_a_nan_in_a_sparse_grad():
    params = make_params(torch.float32)
    opt = fused_opt.SGD(params, lr=0.1, momentum=0.9, skip_nonfinite=True)
    params[0].grad, params[1].grad = sparse_grad(0, torch.float32), dense_grad(0, torch.float32)
    opt.step()
    before = [p.detach().clone() for p in params], [opt.state[p]["momentum_buffer"].to_dense() for p in params]
    params[0].grad = with_row(sparse_grad(1, torch.float32), 2, float("nan"))
    params[1].grad = dense_grad(1, torch.float32)
    opt.step()
    assert opt.skipped_steps == 1
    for p, saved, buf in zip(params, *before):
        assert torch.equal(p, saved)
        assert torch.equal(opt.state[p]["momentum_buffer"].to_dense(), buf)


# A state tensor of the sparse-grad param replaced by one that does not fit: (state key, how, message).
MISFITS = {
    "buffer-shape": ("momentum_buffer", lambda b: torch.sparse_coo_tensor(b._indices(), b._values()[:, :-1],
                                                                         (ROWS, COLS - 1), check_invariants=True),
                     rf"the momentum buffer of {{0}} has shape \({ROWS}, {COLS - 1}\) on cpu but its param has shape "
                     rf"\({ROWS}, {COLS}\)"),
    "buffer-dtype": ("momentum_buffer", lambda b: b.double(),
                     r"the momentum buffer of {0} has dtype torch.float64 but must be torch.float32 \(its param is "
                     r"torch.float32\)"),
    "buffer-layout": ("momentum_buffer", lambda b: b.to_dense().to_sparse_csr(),
                      r"the momentum buffer of {0} must be a dense or sparse COO tensor, got layout torch.sparse_csr"),
    "master-shape": (MASTER_KEY, lambda m: m[:, :-1].clone(),
                     rf"the master copy of {{0}} has shape \({ROWS}, {COLS - 1}\) but its param has shape "
                     rf"\({ROWS}, {COLS}\)"),
    "master-dtype": (MASTER_KEY, lambda m: m.double(),
                     r"the master copy of {0} has dtype torch.float64 but must be torch.float32 \(its param is "
                     r"torch.bfloat16 with float32 master weights\)"),
    "master-layout": (MASTER_KEY, lambda m: m.to_sparse(),
                      r"the master copy of {0} must be a dense tensor, got layout torch.sparse_coo"),
}


@pytest.mark.parametrize("misfit", MISFITS)
def test_a_state_tensor_that_does_not_fit_is_refused_naming_its_param(misfit):
    key, make, message = MISFITS[misfit]
    master = key == MASTER_KEY
    params = make_params(torch.bfloat16 if master else torch.float32)
    opt = fused_opt.SGD(params, lr=0.1, momentum=0.9, master_weights=master)
    for step in range(2):
        params[0].grad, params[1].grad = sparse_grad(step, params[0].dtype), dense_grad(step, params[0].dtype)
        opt.step()
    opt.state[params[0]][key] = make(opt.state[params[0]][key])
    before = [p.detach().clone() for p in params], {k: v.clone() for k, v in opt.state[params[1]].items()}
    with pytest.raises(RuntimeError, match=r"fused_opt\.SGD: " + message.format(r"param_groups\[0\]\['params'\]\[0\]")):
        opt.step()
    assert all(torch.equal(p, saved) for p, saved in zip(params, before[0]))
    assert all(torch.equal(opt.state[params[1]][k], v) for k, v in before[1].items())


def test_a_master_copy_with_other_strides_steps_as_a_contiguous_one():
    """(One loaded from a checkpoint saved from a model in another memory format, say.) The sparse
    update takes any layout. torch adds a sparse tensor's repeated rows to a non-contiguous dense one
    after summing them (coalesced), to a contiguous one a row at a time: an ulp apart at times."""
    runs = [make_params(torch.bfloat16)[:1] for _ in range(2)]
    opts = [fused_opt.SGD(params, lr=0.1, momentum=0.9, master_weights=True) for params in runs]
    for step in range(STEPS):
        for params, opt in zip(runs, opts):
            params[0].grad = sparse_grad(step, torch.bfloat16)
            opt.step()
        if step == 0:
            master = opts[0].state[runs[0][0]][MASTER_KEY]
            opts[0].state[runs[0][0]][MASTER_KEY] = master.t().contiguous().t()
        ours, twins = ([(k, opt.state[params[0]][k].to_dense()) for k in ("momentum_buffer", MASTER_KEY)]
                       for params, opt in zip(runs, opts))
        assert_close(ours, twins, f"step {step}")
    assert opts[0].state[runs[0][0]][MASTER_KEY].stride() == (1, ROWS)


def test_a_sparse_param_is_refused():
    """torch.optim.SGD adds a sparse grad to a sparse param; the fused update is for dense params."""
    p = torch.randn(ROWS, COLS).to_sparse().requires_grad_()
    before = p.detach().clone()
    opt = fused_opt.SGD([p], lr=0.1, momentum=0.9)
    p.grad = sparse_grad(0, torch.float32)
    with pytest.raises(RuntimeError, match=r"fused_opt\.SGD: param_groups\[0\]\['params'\]\[0\] must be a dense "
                                           r"tensor, got layout torch.sparse_coo"):
        opt.step()
    assert torch.equal(p.detach().to_dense(), before.to_dense()) and not opt.state[p]


@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32", "f64"])
def test_unscaling_gives_grad_scalers_bits(dtype):
    """As GradScaler.unscale_ (its kernel on the values; float16 coalesced first), at a scale that
    is not a power of two."""
    g = sparse_grad(0, DTYPES[dtype], scale=1000.0)
    expected = g.coalesce() if g.dtype == torch.float16 else g
    values = expected._values().clone()
    scale = torch.tensor(3.7 * 2**8)
    torch._amp_foreach_non_finite_check_and_unscale_([values], torch.zeros(()), scale.double().reciprocal().float())
    got = fused_opt.sparse.unscale(g, scale)
    assert torch.equal(got._indices(), expected._indices())
    assert_same_bits([("values", got._values())], [("values", values)], dtype)


def test_an_embedding_trains_as_with_torch_sgd():
    """The whole loop: nn.Embedding(sparse=True) and a linear head, backward, step."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Embedding(50, 8, sparse=True), torch.nn.Flatten(), torch.nn.Linear(24, 1))
              for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [fused_opt.SGD(models[0].parameters(), lr=0.05, momentum=0.9),
            torch.optim.SGD(models[1].parameters(), lr=0.05, momentum=0.9)]
    tokens = torch.randint(0, 50, (16, 3))
    target = torch.randn(16, 1)
    for _ in range(10):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(tokens), target).backward()
            opt.step()
    assert opts[0].state[models[0][0].weight]["momentum_buffer"].is_sparse
    for ours, theirs in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scalar,error,message", [
    ("lr", ValueError, "Tensor lr must be 1-element"),
    ("grad_scale", RuntimeError, "grad_scale must be a one-element tensor"),
    ("found_inf", RuntimeError, "found_inf must be a one-element tensor"),
])
def test_a_scalar_tensor_of_two_elements_is_refused_when_every_grad_is_sparse(scalar, error, message):
    """(No dense grad: no fused call checks it.)"""
    params = make_params(torch.float32)[:1]
    buffers = [None]
    before = params[0].clone()
    kwargs = dict(lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False)
    kwargs[scalar] = torch.ones(2)
    with pytest.raises(error, match=message):
        fused_opt.functional.sgd(params, [sparse_grad(0, torch.float32)], buffers, **kwargs)
    assert torch.equal(params[0], before) and buffers == [None]


def test_check_only_writes_nothing_with_sparse_grads():
    params = make_params(torch.float32)
    before = [p.clone() for p in params]
    buffers = [None, None]
    fused_opt.functional.sgd(params, [sparse_grad(0, torch.float32), dense_grad(0, torch.float32)], buffers, lr=0.1,
                             weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False,
                             check_only=True)
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and buffers == [None, None]


def test_two_groups_with_sparse_grads_step_once_each_as_torch():
    """(An optimizer with several groups checks them all, with check_only, before it steps any.)"""
    ours, theirs = make_params(torch.float32), make_params(torch.float32)
    opts = [cls([{"params": params[:1]}, {"params": params[1:], "lr": 0.05}], lr=0.1, momentum=0.9)
            for cls, params in ((fused_opt.SGD, ours), (torch.optim.SGD, theirs))]
    for step in range(STEPS):
        for params, opt in zip((ours, theirs), opts):
            params[0].grad = sparse_grad(step, torch.float32)
            params[1].grad = dense_grad(step, torch.float32).to_sparse()
            opt.step()
        for i in range(2):
            assert_like_torch(ours[i], opts[0], theirs[i], opts[1], f"step {step} param {i}")
