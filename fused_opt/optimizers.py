"""fused_opt.Adam, AdamW, RMSprop and SGD: drop-in torch.optim optimizers.

Same constructor arguments, defaults, validation messages, param_groups and state_dict as
torch.optim's, plus arguments of our own: `l1` (L1 penalty strength), `l1_mode` ("subgradient"
or "proximal"), `backend` ("auto", "cpu", "cuda", "triton", "reference"), `master_weights`
(float32 master copies of 16-bit params, see below) and `skip_nonfinite`.
Each step reads every hyperparameter from param_groups, gathers the params that have grads
(creating torch.optim's state lazily), checks every group and then makes one fused call per
(device, dtype) group: a step that raises leaves all params and state as they were.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import checks, dispatch, functional, sparse, tables

_EXTRA_DEFAULTS = {"l1": 0.0, "l1_mode": "subgradient", "backend": "auto", "master_weights": False}

# master_weights=True: each float16/bfloat16 param keeps a float32 copy in its state under this
# key, and its states are float32. The update runs on the copy, and the param receives it rounded
# (once, in the same pass), so small updates accumulate instead of vanishing in 16-bit rounding.
MASTER_KEY = "master_param"
_HALF = (torch.float16, torch.bfloat16)
_MISSING = object()  # a key that a dict did not hold


# The constructors' arguments, described once; each class's docstring lists its own, in its
# signature's order, with the signature's defaults (_documented below).
_ARGS = {
    "params": ("iterable", "params to optimize, or dicts defining param groups (named_parameters() too)"),
    "lr": ("float or Tensor", "learning rate; a one-element Tensor is read where the kernel runs, at every step"),
    "betas": ("tuple of 2 floats or Tensors", "running-average coefficients of the gradient and its square"),
    "eps": ("float", "added to the denominator for numerical stability"),
    "weight_decay": ("float or Tensor", "L2 penalty: g += weight_decay * p (coupled)"),
    "amsgrad": ("bool", "use the maximum of past squared-gradient averages (AMSGrad)"),
    "alpha": ("float", "smoothing constant of the squared-gradient average"),
    "momentum": ("float", "momentum factor"),
    "centered": ("bool", "normalize by the estimated variance of the gradient"),
    "dampening": ("float", "dampening for momentum"),
    "nesterov": ("bool", "Nesterov momentum"),
    "maximize": ("bool", "maximize the objective instead of minimizing it"),
    "foreach": ("bool", "accepted for torch.optim compatibility: fused_opt always makes one fused call per "
                        "(device, dtype) group"),
    "capturable": ("bool", "a step may be captured in a CUDA graph: step counters, and lr and weight decay "
                           "given as Tensors, are read on the params' device"),
    "differentiable": ("bool", "must be False: the kernels update params in place, outside autograd"),
    "fused": ("bool", "accepted (the step is always fused); None and True keep the step counters of params "
                      "off the CPU on their device, as torch's fused optimizers do (no host sync under "
                      "GradScaler), False keeps them on the CPU, as torch's non-fused optimizers do"),
    "decoupled_weight_decay": ("bool", "AdamW's decay, p *= 1 - lr * weight_decay before the update"),
    "l1": ("float", "L1 penalty strength, applied in the same pass"),
    "l1_mode": ("str", '"subgradient": g += l1 * sign(p); "proximal": after the update '
                       "p = sign(p) * max(|p| - lr * l1, 0), which gives exact zeros"),
    "backend": ("str", '"auto", "cuda", "triton", "cpu", "reference" or "cuda_sim" (the CUDA kernels\' traversal '
                       'run on the CPU, for tests); "auto" takes the first usable for each (device, dtype) group, '
                       'and the environment variable FUSED_OPT_BACKEND, when set, replaces "auto"'),
    "skip_nonfinite": ("bool", "a step whose grads hold NaN or Inf changes no param or state, and is counted "
                               "in `skipped_steps`"),
    "master_weights": ("bool", f"float16/bfloat16 params keep a float32 copy (state['{MASTER_KEY}']) and "
                               "float32 states; the update runs on the copy"),
}


def _documented(summary: str, **override: str):
    """Class decorator: a torch.optim-style docstring, `summary` and then the constructor's
    arguments with their defaults (`override`: this class's own wording for an argument)."""
    def document(cls):
        lines = [summary, "", "Args:"]
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if name == "self":
                continue
            kind, text = _ARGS[name]
            text = override.get(name, text)
            if parameter.default is inspect.Parameter.empty:
                lines.append(f"    {name} ({kind}): {text}.")
            else:
                lines.append(f"    {name} ({kind}, optional): {text} (default: {parameter.default!r}).")
        cls.__doc__ = "\n".join(lines)
        return cls
    return document


def _check_range(name: str, value, low=0.0, high=None, high_open=True) -> None:
    """torch.optim's checks and wording: 'Invalid <name>: <value>'. NaN and infinity fail too."""
    v = float(value)
    ok = v >= low and (high is None or (v < high if high_open else v <= high))
    if not ok or not math.isfinite(v):
        raise ValueError(f"Invalid {name}: {value}")


# Scalar hyperparameters re-checked at every step (a user may edit param_groups between steps).
_STEP_CHECKED = ("lr", "eps", "weight_decay", "l1", "momentum", "dampening", "alpha")


def _check_group_finite(index: int, group: dict) -> None:
    values = [(k, group[k]) for k in _STEP_CHECKED if k in group]
    values += [(f"betas[{i}]", b) for i, b in enumerate(group.get("betas", ()))]
    for key, v in values:
        if isinstance(v, (int, float)) and not math.isfinite(v):
            raise ValueError(f"Invalid {key} in param group {index}: {v}")


def _check_lr(lr) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    _check_range("learning rate", lr)


def _check_betas(betas) -> tuple:
    """torch.optim.Adam's checks and wording. Tensor betas (one element each) are kept, as torch
    keeps them, and read at every step, so a schedule may change them in place."""
    for i, b in enumerate(betas):
        if isinstance(b, Tensor) and b.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element")
        _check_range(f"beta parameter at index {i}", b, 0.0, 1.0)
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    return tuple(b.squeeze() if isinstance(b, Tensor) else float(b) for b in betas)


def _check_weight_decay(weight_decay) -> None:
    """A Tensor weight decay is read by the kernels at every step (see functional.py), like a Tensor lr."""
    if isinstance(weight_decay, Tensor) and weight_decay.numel() != 1:
        raise ValueError("Tensor weight_decay must be 1-element")
    _check_range("weight_decay value", weight_decay)


class _Work(NamedTuple):
    """A param group's step on the ordinary path: its functional call over the params with grads."""
    index: int
    group: dict
    tabled: bool  # the group may have a table, built after this step
    params: list
    call: Callable


class FusedOptimizer(Optimizer):
    """Shared machinery; subclasses set `family` and implement `_options`, `_state_keys` and `_prepare`."""

    family: str
    _state_needed: tuple[str, ...] = ()  # the keys every (non-empty) state of a param holds
    _takes_sparse_grads = False  # as in torch.optim, only SGD takes them (sparse.py)
    # Params in a step are grouped per (device, dtype) and updated by one kernel call each, which
    # unscales grads by `grad_scale` and skips the step on `found_inf` (GradScaler's protocol).
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, *, l1: float, l1_mode: str, backend: str,
                 skip_nonfinite: bool = False, master_weights: bool = False) -> None:
        _check_range("l1 value", l1)
        if l1_mode not in functional.L1_MODES:
            raise ValueError(f"Invalid l1_mode: {l1_mode!r}; expected 'subgradient' or 'proximal'")
        dispatch.check_backend_name(backend)
        if defaults.get("differentiable"):
            raise RuntimeError(f"fused_opt.{type(self).__name__} does not support differentiable=True: its kernels "
                               "update params in place, outside autograd; use torch.optim for that")
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults.update(l1=l1, l1_mode=l1_mode, backend=backend, master_weights=bool(master_weights))
        super().__init__(params, defaults)
        # skip_nonfinite: a step whose grads hold any NaN/Inf changes nothing and is counted.
        self.skip_nonfinite = skip_nonfinite
        self._tally: dict[str, Tensor | None] = {"skipped": None}  # a dict: see _opt_called
        self._undo: list[tuple[dict, object, object]] = []  # see _state
        self._called = {"step": False}  # see _opt_called
        self._tables = tables.Tables()

    # LR schedulers replace `opt.step` with a wrapper that sets `_opt_called`, unless step says it
    # is wrapped already; that wrapper lives in a file torch.compile does not trace, which would
    # split a compiled step. So step says so (below) and records the call itself, in a dict: the
    # one kind of mutation torch.compile carries out of a compiled optimizer step.
    @property
    def _opt_called(self) -> bool:
        return self._called["step"]

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        self._called["step"] = bool(value)

    def __getstate__(self) -> dict:  # pickle and deepcopy: torch's three entries and our options
        return {**super().__getstate__(), "skip_nonfinite": self.skip_nonfinite, "_tally": self._tally}

    def __setstate__(self, state: dict) -> None:
        # Also runs at the end of load_state_dict: a torch.optim state_dict has no l1/backend keys.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in {**self._torch_defaults(), **_EXTRA_DEFAULTS}.items():
                group.setdefault(key, value)
            for p in group["params"]:  # torch before 1.12 saved step counters as numbers: as torch.optim, made tensors
                step = self.state.get(p, {}).get("step")
                if step is not None and not isinstance(step, Tensor):
                    self.state[p]["step"] = self._new_step(p, group).fill_(float(step))
        self.__dict__.setdefault("skip_nonfinite", False)
        self.__dict__.setdefault("_tally", {"skipped": self.__dict__.pop("_skipped", None)})
        self.__dict__.setdefault("_undo", [])
        self.__dict__.setdefault("_called", {"step": False})
        self._tables = tables.Tables()  # tables hold the old tensors: never carried over

    @staticmethod
    def _torch_defaults() -> dict:
        return {"maximize": False, "foreach": None, "differentiable": False}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_range("l1 value", group["l1"])
        dispatch.check_backend_name(group["backend"])
        for p in group["params"]:  # fail now, not at the first step, if no backend can run them
            dispatch.select(group["backend"], p.device, p.dtype)

    def load_state_dict(self, state_dict: dict) -> None:
        self._check_loadable(state_dict)
        ours = [{key: group[key] for key in _EXTRA_DEFAULTS} for group in self.param_groups]
        super().load_state_dict(state_dict)
        # A torch.optim state_dict has no l1/l1_mode/backend/master_weights: keep this optimizer's.
        for group, saved, extra in zip(self.param_groups, state_dict["param_groups"], ours):
            group.update({key: value for key, value in extra.items() if key not in saved})
        # torch.optim casts floating state to its param's dtype; the float32 master copy and states
        # of a 16-bit param under master_weights are put back from the source, to resume exactly.
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        for (p, group), pid in zip(((p, g) for g in self.param_groups for p in g["params"]), saved_ids):
            # Host step counters (a torch.optim or CPU checkpoint) move where this optimizer keeps them.
            step = self.state.get(p, {}).get("step")
            if isinstance(step, Tensor) and step.device != p.device and self._counts_on_device(p, group):
                self.state[p]["step"] = step.to(p.device, torch.float32)
            if p.dtype not in _HALF or not group["master_weights"]:
                # A copy saved after master weights were switched off, before a step dropped it (torch
                # cast it to p's dtype): dropped now, so that switching them on again starts afresh.
                self.state.get(p, {}).pop(MASTER_KEY, None)
                continue
            for key, value in state_dict["state"].get(pid, {}).items():
                if key != "step" and isinstance(value, Tensor) and value.dtype == torch.float32:
                    self.state[p][key] = value.to(p.device, copy=True)
        for p in (p for group in self.param_groups for p in group["params"]):
            self._lay_out_like(p, self.state.get(p, {}), dict.__setitem__)

    @staticmethod
    def _lay_out_like(p: Tensor, state: dict, put: Callable) -> None:
        """Dense states laid out unlike their dense param (a checkpoint saved before the model went
        channels_last, or the model converted mid-run) take its layout, values unchanged, through
        put(state, key, tensor): the kernels then walk them with it in one flat pass (else every step
        copies them to a common layout and back, and the group tables refuse them). A state that is
        not dense or not on p's device is left for the step to refuse or copy, as before."""
        stride = p.stride()
        for key, value in list(state.items()):
            if (key != "step" and isinstance(value, Tensor) and value.layout == torch.strided
                    and value.stride() != stride  # (the usual case: same)
                    and value.shape == p.shape and value.device == p.device and not checks.same_layout(value, p)
                    and checks.is_dense(value) and checks.is_dense(p)):
                put(state, key, torch.empty_like(p, dtype=value.dtype).copy_(value))

    def _check_loadable(self, state_dict: dict) -> None:
        """Refuses, before this optimizer changes, a state dict that another kind of optimizer saved
        (an SGD checkpoint loaded into Adam, say): its param groups lack this one's hyperparameters
        or its states lack this one's state. torch.optim finds some such mismatches (KeyError 'step'
        at the load), others only at the first step, after the load replaced the optimizer's state."""
        name = f"fused_opt.{type(self).__name__}"
        needed = [k for k in self.defaults if k not in self._torch_defaults() and k not in _EXTRA_DEFAULTS]
        ids = {}
        for g, group in enumerate(state_dict.get("param_groups", [])):
            missing = [k for k in needed if k not in group]
            if missing:
                raise ValueError(f"{name}: the loaded state dict's param group {g} has no "
                                 f"{', '.join(map(repr, missing))}: it was saved by another kind of optimizer")
            ids.update({pid: f"param_groups[{g}]['params'][{k}]" for k, pid in enumerate(group.get("params", []))})
        for pid, state in state_dict.get("state", {}).items():
            missing = [k for k in self._state_needed if state and k not in state]
            if missing:
                raise ValueError(f"{name}: the loaded state of {ids.get(pid, f'param {pid}')} has no "
                                 f"{', '.join(map(repr, missing))} (it has {', '.join(map(repr, state))}): it was "
                                 "saved by another kind of optimizer")

    @staticmethod
    def _state_dtype(p: Tensor, group: dict) -> torch.dtype:
        return torch.float32 if group["master_weights"] and p.dtype in _HALF else p.dtype

    def _zeros(self, p: Tensor, group: dict) -> Tensor:
        """A new state tensor for p: like p, float32 under master weights."""
        return torch.zeros_like(p, dtype=self._state_dtype(p, group), memory_format=torch.preserve_format)

    def _fit_states(self, p: Tensor, state: dict, group: dict) -> Tensor | None:
        """Makes p's states fit p and the group's options, and returns p's float32 master copy under
        master_weights (None: p has none). State made without one (a torch.optim checkpoint, or
        master_weights switched on mid-run) is converted to float32 here; switched off, the copy is
        dropped and the states go back to p's dtype. States laid out unlike a param that is not
        contiguous (a model made channels_last mid-run) take its layout (see _lay_out_like)."""
        if not p.is_contiguous() and not torch.compiler.is_compiling():
            self._lay_out_like(p, state, self._put)
        if self._state_dtype(p, group) != p.dtype:
            master = state.get(MASTER_KEY)
            if master is None:
                for key, value in list(state.items()):
                    if key != "step" and isinstance(value, Tensor) and value.dtype in _HALF:
                        self._put(state, key, value.float())
                master = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
                self._put(state, MASTER_KEY, master)
            return master
        if MASTER_KEY in state:
            self._put(state, MASTER_KEY, _MISSING)
            for key, value in list(state.items()):
                if key != "step" and isinstance(value, Tensor) and value.is_floating_point():
                    self._put(state, key, value.to(p.dtype))
        return None

    # What a step changes in optimizer.state before its checks pass (the lazily made state, as
    # torch.optim makes it; state slots an option switched on; master copies made or dropped) is
    # noted, so that a step that raises can put it all back.
    def _state(self, p: Tensor) -> dict:
        """p's state dict, made empty if it has none."""
        state = self.state.get(p)
        if state is None:
            state = self.state[p] = {}
            self._undo.append((self.state, p, _MISSING))
        return state

    def _put(self, state: dict, key, value) -> None:
        """state[key] = value (_MISSING: deleted)."""
        self._undo.append((state, key, state.get(key, _MISSING)))
        if value is _MISSING:
            del state[key]
        else:
            state[key] = value

    def _put_back(self) -> None:
        for where, key, old in reversed(self._undo):
            if old is _MISSING:
                where.pop(key, None)
            else:
                where[key] = old
        self._undo.clear()

    @staticmethod
    def _counts_on_device(p: Tensor, group: dict) -> bool:
        """Does p's step counter live on p's device (float32)? With capturable or fused=True, as in
        torch.optim, and by default for params off the CPU, as torch's fused optimizers keep them:
        the kernels then advance and read it there, so GradScaler's found_inf needs no host sync.
        fused=False keeps torch's non-fused layout, a CPU scalar (one sync a step under GradScaler)."""
        if group.get("capturable") or group.get("fused"):
            return True
        return group.get("fused") is None and p.device.type not in ("cpu", "meta")

    def _new_step(self, p: Tensor, group: dict) -> Tensor:
        """torch.optim's step counter, where `_counts_on_device` puts it."""
        if self._counts_on_device(p, group):
            return torch.zeros((), dtype=torch.float32, device=p.device)
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        return torch.tensor(0.0, dtype=dtype, device="cpu")  # not torch's default device: torch.optim's place

    def _grads_of(self, group: dict) -> tuple[list[Tensor], list[Tensor]]:
        params, grads = [], []
        for p in group["params"]:
            g = p.grad
            if g is not None:
                params.append(p)
                grads.append(g)
        if not self._takes_sparse_grads and any(g.is_sparse for g in grads):
            raise RuntimeError(f"fused_opt.{type(self).__name__} does not support sparse gradients")
        return params, grads

    @property
    def skipped_steps(self) -> int:
        """Steps skipped by skip_nonfinite=True because a gradient held NaN or Inf."""
        skipped = self._tally["skipped"]
        return 0 if skipped is None else int(skipped.item())

    def _nonfinite(self, grads: list[Tensor]) -> Tensor | None:
        """A one-element tensor, non-zero when any grad holds NaN/Inf, computed without a host sync."""
        if not grads:
            return None
        by_device: dict[torch.device, list[Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        device = grads[0].device
        found = torch.zeros((), dtype=torch.float32, device=device)
        for gs in by_device.values():
            gs = [g.coalesce()._values() if g.is_sparse else g for g in gs]  # (summed duplicates may overflow)
            norms = torch._foreach_norm([torch.view_as_real(g) if g.is_complex() else g for g in gs], float("inf"))
            found += (~torch.stack(norms).isfinite()).any().to(device, torch.float32)
        return found

    def _count_skipped(self, found: Tensor) -> None:
        skipped = self._tally["skipped"]
        if skipped is None:
            skipped = self._tally["skipped"] = torch.zeros((), dtype=torch.float32, device=found.device)
        skipped += found.to(skipped.device) > 0

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        self._called["step"] = True
        self._check_capture()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            _check_group_finite(i, group)
        gathered, ours = [], None
        found_inf = getattr(self, "found_inf", None)
        if self.skip_nonfinite:  # all groups are checked before any is updated
            gathered = [self._grads_of(group) for group in self.param_groups]
            ours = self._nonfinite([g for _, grads in gathered for g in grads])
            if ours is not None:
                found_inf = ours if found_inf is None else found_inf + ours.to(found_inf.device)
        amp = {"grad_scale": getattr(self, "grad_scale", None), "found_inf": found_inf}
        # Cached group tables (tables.py) in eager mode; torch.compile traces the ops instead.
        fast = not torch.compiler.is_compiling() and tables.available()
        if fast:
            self._tables.begin(self.state)
        self._undo.clear()  # (not a new list: torch.compile may not set attributes of an optimizer)
        try:
            self._step_groups(gathered, amp, fast)
        except BaseException:
            if fast:
                self._tables.release()
            self._put_back()
            raise
        self._undo.clear()
        if ours is not None:
            self._count_skipped(ours)
        if fast:
            self._tables.end(self.state)
        return loss

    def _step_groups(self, gathered: list, amp: dict, fast: bool) -> None:
        """Checks every param group's step, then takes them all: a step that raises leaves every
        group's params and state as they were. A table checks its group in `ready`; the other
        groups (the ordinary path) are checked through the functional layer, but for the one taken
        first, whose kernels check it before they write. (Groups share no param: any order will do.)"""
        from_tables, ordinary = [], []
        for index, group in enumerate(self.param_groups):
            options = self._options(group)
            # Groups with a Tensor weight decay take the op path (the tables pass it as a number).
            tabled = fast and not isinstance(group["weight_decay"], Tensor)
            if tabled and self._tables.ready(self.family, group, self._table_keys(group), amp):
                from_tables.append((group, options))
                continue
            params, grads = gathered[index] if gathered else self._grads_of(group)
            if params:
                ordinary.append(self._work(index, group, options, tabled, params, grads, amp))
        if ordinary:
            if not torch.compiler.is_compiling():  # a compiled step is checked as it is traced, before it runs
                for w in ordinary[1:]:
                    self._explained(w, check_only=True)
            self._explained(ordinary[0])
            self._undo.clear()  # written: what fails from here on (a launch) cannot be undone either
            self._learn(ordinary[0])
        for group, options in from_tables:
            if not self._tables.run(self.family, group, options, amp):  # after ready, only by a fault of ours
                params, grads = self._grads_of(group)
                self._work(-1, group, options, True, params, grads, amp).call()
        for w in ordinary[1:]:
            w.call()
            self._learn(w)

    def _work(self, index, group, options, tabled, params, grads, amp) -> _Work:
        kwargs = dict(options, lr=group["lr"], backend=group["backend"], **amp)
        return _Work(index, group, tabled, params, self._prepare(group, params, grads, kwargs))

    def _learn(self, w: _Work) -> None:
        if w.tabled:  # a table for the next steps
            self._tables.learn(self.family, w.group, w.params, self.state, *self._table_keys(w.group))

    def _explained(self, w: _Work, check_only: bool = False) -> None:
        """Calls (or checks) `w`; an error that a param's grad or state caused names that param as
        the user knows it."""
        try:
            w.call(check_only=check_only)
        except (RuntimeError, TypeError, AttributeError) as error:  # (a state value that is not a tensor: either)
            culprit = self._culprit(w.index, w.group)
            if culprit is None:
                raise
            raise culprit from error

    def _culprit(self, index: int, group: dict) -> Exception | None:
        """The error for the first param of group `index` whose grad or state the step refuses
        (the functional layer's checks, given per param), naming it by its place in param_groups
        and, for named params, by its name; None if each fits its param."""
        op = f"fused_opt.{type(self).__name__}"
        names = group.get("param_names")
        slots, step_key = self._state_keys(group)
        for k, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            place = f"param_groups[{index}]['params'][{k}]" + (f" ({names[k]!r})" if names else "")
            state = self.state.get(p, {})
            dtype = self._state_dtype(p, group)
            tensors = [(f"state[{key!r}] of {place}", state[key], dtype) for key in slots
                       if key in state and (state[key] is not None or key in self._state_needed)]  # SGD: None = new
            if MASTER_KEY in state:
                tensors.append((f"state[{MASTER_KEY!r}] of {place}", state[MASTER_KEY], torch.float32))
            if step_key in state:
                tensors.append((f"state[{step_key!r}] of {place}", state[step_key], None))
            try:
                if p.grad.is_sparse and self._takes_sparse_grads:
                    sparse.check_options(op, place, weight_decay=group["weight_decay"], l1=group["l1"])
                    sparse.check_param(op, place, p, p.grad, state.get(slots[0]), state.get(MASTER_KEY))
                    continue
                checks.check_writable(op, place, None, p)
                checks.check_like_param(op, f"grad of {place}", None, p.grad, p, p.dtype, strides=False)
                for label, t, dtype in tensors:
                    if not isinstance(t, Tensor):
                        return TypeError(f"{op}: {label} is a {type(t).__name__}, not a tensor")
                    if dtype is None:
                        checks.check_step(op, label, None, t, p)
                    else:
                        checks.check_like_param(op, label, None, t, p, dtype, strides=False)
                        checks.check_writable(op, label, None, t)
            except RuntimeError as error:
                return error
        return None

    step._wrapped_by_lr_sched = True  # see _opt_called

    def _check_capture(self) -> None:
        # As torch.optim: a CUDA graph captured while step counters live on the host would replay
        # the captured step's bias correction forever.
        if torch.compiler.is_compiling() or not torch.cuda.is_available():
            return
        if not torch.cuda.is_current_stream_capturing():
            return
        if not all(g.get("capturable", True) for g in self.param_groups):
            raise RuntimeError(f"Attempting CUDA graph capture of step() for an instance of {type(self).__name__} "
                               "but param_groups' capturable is False.")
        # The kernels take betas as numbers, read from Tensor betas at each step: a graph would keep one.
        if any(isinstance(b, Tensor) for g in self.param_groups for b in g.get("betas", ())):
            raise RuntimeError(f"fused_opt.{type(self).__name__}: Tensor betas are read on the host at each step, "
                               "which a CUDA graph cannot replay; use float betas to capture step()")

    def _options(self, group: dict) -> dict:
        """The group's hyperparameters as the functional API's keyword arguments (but lr)."""
        return dict(weight_decay=group["weight_decay"], maximize=group["maximize"], l1=group["l1"],
                    l1_mode=group["l1_mode"])

    def _state_keys(self, group: dict) -> tuple[tuple[str | None, str | None, str | None], str | None]:
        """The state keys of the kernels' slots 2, 3, 4 (None: unused) and of the step counter."""
        raise NotImplementedError

    def _table_keys(self, group: dict) -> tuple:
        """What a group table remembers of a group's state: _state_keys, and the master copies' key
        (16-bit params under master_weights)."""
        return (*self._state_keys(group), MASTER_KEY if group["master_weights"] else None)

    def _prepare(self, group: dict, params: list[Tensor], grads: list[Tensor], kwargs: dict):
        """The group's functional call over `params` (their state made, as torch.optim makes it
        lazily): call() steps, call(check_only=True) raises what the step would refuse."""
        raise NotImplementedError


@_documented("torch.optim.Adam, fused: the update, L2 and L1 weight decay in one pass over memory.")
class Adam(FusedOptimizer):

    family = "adam"
    _state_needed = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float | Tensor = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False, l1: float = 0.0,
                 l1_mode: str = "subgradient", backend: str = "auto", skip_nonfinite: bool = False,
                 master_weights: bool = False) -> None:
        _check_lr(lr)
        _check_range("epsilon value", eps)
        betas = _check_betas(betas)
        _check_weight_decay(weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, l1=l1, l1_mode=l1_mode, backend=backend, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights)

    @staticmethod
    def _torch_defaults() -> dict:
        return {**FusedOptimizer._torch_defaults(), "amsgrad": False, "capturable": False, "fused": None,
                "decoupled_weight_decay": False}

    def _prepare(self, group, params, grads, kwargs):
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, masters = [], [], [], [], []
        for p in params:
            state = self._state(p)
            if not state:
                state["step"] = self._new_step(p, group)
                state["exp_avg"] = self._zeros(p, group)
                state["exp_avg_sq"] = self._zeros(p, group)
            if group["amsgrad"]:
                if "max_exp_avg_sq" not in state:
                    self._put(state, "max_exp_avg_sq", self._zeros(p, group))
            masters.append(self._fit_states(p, state, group))
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return functools.partial(functional.adam, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                                 master_params=masters, **kwargs)

    def _options(self, group):
        beta1, beta2 = group["betas"]
        if isinstance(beta1, Tensor) or isinstance(beta2, Tensor):  # their values now (see _check_betas)
            if torch.compiler.is_compiling():
                raise RuntimeError(f"fused_opt.{type(self).__name__}: Tensor betas are read on the host at each "
                                   "step, which a compiled step cannot do; use float betas under torch.compile")
            beta1, beta2 = float(beta1), float(beta2)
        return dict(super()._options(group), amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    decoupled_weight_decay=group["decoupled_weight_decay"])

    def _state_keys(self, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if group["amsgrad"] else None), "step"


@_documented("torch.optim.AdamW (Adam with decoupled weight decay), fused: the update, weight decay "
             "and L1 in one pass over memory.",
             weight_decay="decoupled weight decay: p *= 1 - lr * weight_decay before the update")
class AdamW(Adam):

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float | Tensor = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, l1: float = 0.0, l1_mode: str = "subgradient",
                 backend: str = "auto", skip_nonfinite: bool = False, master_weights: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, l1=l1, l1_mode=l1_mode, backend=backend,
                         skip_nonfinite=skip_nonfinite, master_weights=master_weights)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True  # as torch.optim.AdamW


@_documented("torch.optim.RMSprop, fused: the update, L2 and L1 weight decay in one pass over memory.",
             eps="added to the denominator, outside the square root")
class RMSprop(FusedOptimizer):

    family = "rmsprop"
    _state_needed = ("step", "square_avg")

    def __init__(self, params, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float | Tensor = 0, momentum: float = 0, centered: bool = False,
                 capturable: bool = False, foreach: bool | None = None, maximize: bool = False,
                 differentiable: bool = False, *,
                 l1: float = 0.0, l1_mode: str = "subgradient", backend: str = "auto",
                 skip_nonfinite: bool = False, master_weights: bool = False) -> None:
        _check_lr(lr)
        _check_range("epsilon value", eps)
        _check_range("momentum value", momentum)
        _check_weight_decay(weight_decay)
        _check_range("alpha value", alpha)
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach, maximize=maximize,
                        differentiable=differentiable)
        super().__init__(params, defaults, l1=l1, l1_mode=l1_mode, backend=backend, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights)

    @staticmethod
    def _torch_defaults() -> dict:
        return {**FusedOptimizer._torch_defaults(), "momentum": 0, "centered": False, "capturable": False}

    def _prepare(self, group, params, grads, kwargs):
        square_avgs, grad_avgs, momentum_buffers, steps, masters = [], [], [], [], []
        for p in params:
            state = self._state(p)
            if len(state) == 0:
                state["step"] = self._new_step(p, group)
                state["square_avg"] = self._zeros(p, group)
            if group["momentum"] > 0 and "momentum_buffer" not in state:
                self._put(state, "momentum_buffer", self._zeros(p, group))
            if group["centered"] and "grad_avg" not in state:
                self._put(state, "grad_avg", self._zeros(p, group))
            masters.append(self._fit_states(p, state, group))
            if group["momentum"] > 0:
                momentum_buffers.append(state["momentum_buffer"])
            if group["centered"]:
                grad_avgs.append(state["grad_avg"])
            square_avgs.append(state["square_avg"])
            steps.append(state["step"])
        return functools.partial(functional.rmsprop, params, grads, square_avgs, grad_avgs, momentum_buffers, steps,
                                 master_params=masters, **kwargs)

    def _options(self, group):
        return dict(super()._options(group), alpha=group["alpha"], eps=group["eps"], momentum=group["momentum"],
                    centered=group["centered"])

    def _state_keys(self, group):
        return ("square_avg", "grad_avg" if group["centered"] else None,
                "momentum_buffer" if group["momentum"] > 0 else None), "step"


@_documented("torch.optim.SGD (plain gradient descent when momentum=0; momentum, Nesterov), fused: "
             "the update, L2 and L1 weight decay in one pass over memory. Sparse gradients "
             "(nn.Embedding(sparse=True)) take torch.optim.SGD's own update, without weight decay, as in torch.")
class SGD(FusedOptimizer):

    family = "sgd"
    _takes_sparse_grads = True

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 l1: float = 0.0, l1_mode: str = "subgradient", backend: str = "auto",
                 skip_nonfinite: bool = False, master_weights: bool = False) -> None:
        _check_lr(lr)
        _check_range("momentum value", momentum)
        _check_weight_decay(weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused)
        super().__init__(params, defaults, l1=l1, l1_mode=l1_mode, backend=backend, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights)

    @staticmethod
    def _torch_defaults() -> dict:
        return {**FusedOptimizer._torch_defaults(), "nesterov": False, "fused": False}

    def _prepare(self, group, params, grads, kwargs):
        masters = [self._fit_states(p, self._state(p), group) for p in params]
        buffers = [self.state[p].get("momentum_buffer") for p in params] if group["momentum"] != 0 else []

        def call(check_only: bool = False) -> None:
            functional.sgd(params, grads, buffers, master_params=masters, check_only=check_only, **kwargs)
            if not check_only:  # the buffers made in this step
                for p, buf in zip(params, buffers):
                    if buf is not None:
                        self.state[p]["momentum_buffer"] = buf
        return call

    def _options(self, group):
        return dict(super()._options(group), momentum=group["momentum"], dampening=group["dampening"],
                    nesterov=group["nesterov"])

    def _state_keys(self, group):
        return ("momentum_buffer" if group["momentum"] != 0 else None, None, None), None
