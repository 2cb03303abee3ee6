"""Cached group tables: the eager fast path of the optimizers for CPU params.

An ordinary step hands the op its lists (params, grads, each state), and the dispatcher converts
and the kernel re-checks every tensor of every list: ~0.2 us a tensor, most of a step for a model
of thousands of small tensors. After an ordinary step of a param group that qualifies (CPU params
of one dtype run by the "cpu" backend, all plain dense tensors), a GroupTable
(csrc/cpu/tables.cpp) remembers the group's tensors and the packed launch over them. The next
steps hand it only the group's param list: it reads the grads itself and, before writing
anything, checks that nothing it remembers has changed (same params with grads, same state tensor
objects in each param's state dict, same storage, size, dtype and layout); a StateSnapshot taken
after each step catches entries of optimizer.state added, removed or replaced. When anything
differs the table declines, the step takes the ordinary path, and the table is rebuilt from it.
A group whose tables keep being declined (say, grads present on alternate steps) stops getting
them. Tables are for eager mode only: under torch.compile the ops are traced instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch, functional, ops

# Tables built in a row for a group without one fast step in between, after which the group
# stops getting them (they are not being reused; building one costs about an ordinary step).
GIVE_UP_AFTER = 3
_CPU = torch.device("cpu")


def available() -> bool:
    return ops.load_extensions()["fused_opt._C"] is None


class Tables:
    """One optimizer's cached group tables (see the module docstring)."""

    def __init__(self) -> None:
        self._tables: dict[int, tuple[dict, object, torch.dtype]] = {}  # id(group) -> (group, table, dtype)
        self._builds: dict[int, int] = {}  # id(group) -> tables built in a row without a fast step
        self.fast_steps = 0  # group steps run from a table
        self._snapshot = None
        self._state_unchanged = False
        self._learned = False

    def begin(self, state: dict) -> None:
        """At the start of a step: has optimizer.state kept its entries since the last one?"""
        self._state_unchanged = self._snapshot is not None and self._snapshot.matches(state)

    def run(self, family: str, group: dict, options: dict, amp: dict) -> bool:
        """Steps `group` from its table; False (nothing written) when it has none or it declines."""
        entry = self._tables.get(id(group)) if self._state_unchanged else None
        if entry is None or entry[0] is not group:
            return False
        _, table, dtype = entry
        if dispatch.select(group["backend"], _CPU, dtype).name != "cpu":
            return False
        kwargs = functional.OPTIONS[family](**options)
        done = getattr(table, family)(group["params"], **kwargs, **functional.lr_kwargs(group["lr"], _CPU), **amp)
        if done:
            self._builds[id(group)] = 0
            self.fast_steps += 1
        return done

    def learn(self, family: str, group: dict, params: list[Tensor], state: dict, keys, step_key) -> None:
        """After an ordinary step of `group` over `params`: build a table for the next steps."""
        key = id(group)
        self._tables.pop(key, None)
        self._learned = True
        builds = self._builds.get(key, 0)
        if builds >= GIVE_UP_AFTER or not params or params[0].device.type != "cpu":
            return
        if dispatch.select(group["backend"], _CPU, params[0].dtype).name != "cpu":
            return
        self._builds[key] = builds + 1
        states = [state[p] for p in params] if step_key or any(keys) else [None] * len(params)
        try:
            table = ops.cpu_module().GroupTable(family, params, states, list(keys), step_key)
        except ValueError:  # something the fast path does not take (a subclass, a strided view, ...)
            return
        self._tables[key] = (group, table, params[0].dtype)

    def end(self, state: dict) -> None:
        """At the end of a step: remember optimizer.state's entries if tables were (re)built."""
        if self._learned or not self._state_unchanged:
            self._snapshot = ops.cpu_module().StateSnapshot(state)
            self._learned = False
