"""Cached group tables: the eager fast path of the optimizers (CPU, CUDA and Triton backends).

An ordinary step hands the op its lists (params, grads, each state), and the dispatcher converts
and the kernel re-checks every tensor of every list: ~0.2 us a tensor, most of a step for a model
of thousands of small tensors. After an ordinary step of a param group that qualifies (params
of one device and dtype run by the "cpu", "cuda" or "triton" backend, all plain dense tensors, each
param's grad and states in its element order (contiguous, channels_last, ...), with or without
float32 master weights), a GroupTable
(csrc/cpu/tables.cpp) remembers the group's tensors and the packed launch over them. The next
steps hand it only the group's param list (`ready`): it reads the grads itself and checks that
nothing it remembers has changed (the group's list as it was, its packed params in their places
and the others still without grads; the same state tensor objects in each param's state dict;
the same storage, size, dtype and strides), in parallel; a StateSnapshot taken after each step
catches entries of optimizer.state added, removed or replaced. When anything differs the table
declines, the group takes the ordinary path, and the table is rebuilt from it. Else `run` takes
the step, once the optimizer has checked every group of the step.
A group whose tables keep being declined (say, grads present on alternate steps) stops getting
them. For the CUDA and Triton backends the table does the same checks and hands this step's grad
addresses, with the rest of the group's pointer table, to the kernels' launch (the CUDA
extension's table_step; Triton's execute, whose block map it keeps); "cuda_sim" runs the CUDA
path's host code on the CPU for the tests. Tables are for eager mode only: under torch.compile
the ops are traced instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import dispatch, functional, ops

# Tables built in a row for a group without one fast step in between, after which the group
# stops getting them (they are not being reused; building one costs about an ordinary step).
GIVE_UP_AFTER = 3


def available() -> bool:
    return ops.load_extensions()["fused_opt._C"] is None


@dataclass
class _Entry:
    group: dict
    table: object  # the C++ GroupTable
    backend: str  # "cpu": the table runs the CPU kernels; else it hands its addresses to the backend's launch
    keys: tuple  # the state keys of its slots, of the step counter and of the master copies, when it was built
    device: torch.device
    dtype: torch.dtype
    plan: object = None  # triton: the launch's pointer table and block map
    counters: object = None  # triton: the step counters' addresses, where they are on the device (launch.Counters)
    pointers: tuple = ()  # cuda, cuda_sim: the pointer table (int64 [6, n], CPU) and numels
    like: Tensor | None = None  # cuda, cuda_sim: the first param (device and dtype of the launch)
    steps: list[Tensor] = field(default_factory=list)  # the step counters, in param order
    grad_ptrs: Tensor | None = None  # cuda, cuda_sim, triton: this step's grad addresses, from ready to run


class Tables:
    """One optimizer's cached group tables (see the module docstring)."""

    def __init__(self) -> None:
        self._tables: dict[int, _Entry] = {}  # id(group) -> its table
        self._builds: dict[int, int] = {}  # id(group) -> tables built in a row without a fast step
        self.fast_steps = 0  # group steps run from a table
        self._snapshot = None
        self._state_unchanged = False
        self._learned = False
        self._ready: list[_Entry] = []  # checked by ready in this step, not yet run

    def begin(self, state: dict) -> None:
        """At the start of a step: has optimizer.state kept its entries since the last one?"""
        self._state_unchanged = self._snapshot is not None and self._snapshot.matches(state)

    def ready(self, family: str, group: dict, keys: tuple, amp: dict) -> bool:
        """Can `group` step from its table? Makes all of the table's checks (writing nothing), so
        that an optimizer can check every group before it updates any; `run` then takes the step.
        `keys`: the state keys the group's options call for now, as `learn` takes them (an option
        such as amsgrad, momentum or master weights switched on needs a slot the table does not have)."""
        entry = self._tables.get(id(group)) if self._state_unchanged else None
        if entry is None or entry.group is not group or entry.keys != keys:
            return False
        if dispatch.select(group["backend"], entry.device, entry.dtype).name != entry.backend:
            return False
        lr, grad_scale, found_inf = group["lr"], amp["grad_scale"], amp["found_inf"]
        if ((grad_scale is not None and grad_scale.numel() != 1) or (found_inf is not None and found_inf.numel() != 1)
                or (isinstance(lr, Tensor) and lr.numel() != 1)):
            return False  # the ops say why
        if not entry.table.check(group["params"]):
            return False
        if entry.backend != "cpu":
            entry.grad_ptrs = entry.table.grad_pointers()
        self._ready.append(entry)
        return True

    def run(self, family: str, group: dict, options: dict, amp: dict) -> bool:
        """Steps `group` from its table, after `ready` said it can in this step."""
        entry = self._tables[id(group)]
        kwargs = functional.OPTIONS[family](**options)
        scalars = functional.lr_kwargs(group["lr"], entry.device)
        if entry.backend == "cpu":
            done = getattr(entry.table, family)(**kwargs, **scalars, **amp)
        else:
            done = self._launch_elsewhere(family, entry, kwargs, scalars, amp)
        if done:
            self._builds[id(group)] = 0
            self.fast_steps += 1
        return done

    def release(self) -> None:
        """After a step that raised: tables checked by `ready` that did not run let go of the
        grads they kept."""
        for entry in self._ready:
            entry.table.release()
        self._ready.clear()

    @staticmethod
    def _launch_elsewhere(family: str, entry: _Entry, kwargs: dict, scalars: dict, amp: dict) -> bool:
        """CUDA, cuda_sim and Triton: this step's grad addresses, checked by `ready`, go with the
        rest of the table's pointer table to the backend's launch."""
        grad_ptrs, entry.grad_ptrs = entry.grad_ptrs, None
        lr, lr_tensor, grad_scale, found_inf = scalars["lr"], scalars.get("lr_tensor"), amp["grad_scale"], amp["found_inf"]
        if entry.backend == "triton":
            from .triton import launch  # imported with the backend, which this table was built for
            launch.execute(family, entry.plan, grad_ptrs, entry.device, entry.dtype, entry.steps, entry.counters, lr,
                           lr_tensor, grad_scale, found_inf, kwargs, advance_host_steps=entry.table.advance_host_steps)
            return True
        table, numels = entry.pointers
        table[1].copy_(grad_ptrs)
        step = ops.cpu_module().sim_table_step if entry.backend == "cuda_sim" else ops.cuda_module().table_step
        step(family, table, numels, entry.like, entry.steps, lr, lr_tensor, grad_scale, found_inf, options=kwargs)
        return True

    def learn(self, family: str, group: dict, params: list[Tensor], state: dict, keys, step_key, master_key) -> None:
        """After an ordinary step of `group` over `params`: build a table for the next steps. `keys`: the
        state keys of the kernels' slots 2-4; `step_key`, `master_key`: of the step counter and of the
        float32 master copies (None: the group keeps none; the latter is used for 16-bit params only)."""
        key = id(group)
        self._tables.pop(key, None)
        self._learned = True
        builds = self._builds.get(key, 0)
        if builds >= GIVE_UP_AFTER or not params:
            return
        device, dtype = params[0].device, params[0].dtype
        backend = dispatch.select(group["backend"], device, dtype).name
        if backend not in ("cpu", "triton", "cuda", "cuda_sim"):
            return
        self._builds[key] = builds + 1
        masters = master_key if dtype in (torch.float16, torch.bfloat16) else None
        states = [state[p] for p in params] if step_key or masters or any(keys) else [None] * len(params)
        try:
            table = ops.cpu_module().GroupTable(family, params, states, list(keys), step_key, group["params"], masters)
        except ValueError:  # something the fast path does not take (a subclass, a strided view, ...)
            return
        entry = _Entry(group, table, backend, (tuple(keys), step_key, master_key), device, dtype)
        entry.steps = [s[step_key] for s in states] if step_key else []
        if backend == "triton":
            from .triton import launch
            entry.plan = launch.plan(*table.pointer_table(), device)
            entry.counters = launch.device_counters(entry.steps, device)
        elif backend != "cpu":
            entry.pointers, entry.like = table.pointer_table(), params[0]
        self._tables[key] = entry

    def end(self, state: dict) -> None:
        """At the end of a step: remember optimizer.state's entries if tables were (re)built."""
        self._ready.clear()
        if self._learned or not self._state_unchanged:
            self._snapshot = ops.cpu_module().StateSnapshot(state)
            self._learned = False
