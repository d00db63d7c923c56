"""Launch plans: repeat a kernel launch through its compiled object, skipping Triton's per-call Python.

A launch through `kernel[grid](...)` binds and specialises every argument, looks the autotuner and
the heuristics up and builds launch metadata: ~0.1 ms of host time for kernels with 40-80
arguments, more than some of these kernels run on the GPU. The first launch of a signature goes
through Triton (compiling, autotuning); its compiled kernel and final constexprs are kept as a
plan, and later launches with the same signature call the compiled kernel directly.

A signature holds everything the compiled kernel or the choice of it can depend on: the device,
constexpr values, tensor dtypes and pointer alignment (mod 16), and every integer argument's
value, except those a launcher names as `varying` (e.g. a decode cache length, or the strides of
a growing cache's scales), which are keyed by what Triton specialises integers on (== 1, divisible
by 16, 32-bit range), and those it names `varying_mod16` (strides a heuristic checks for word
alignment), keyed by their value mod 16. Any failure of the fast path turns it off for good (Triton then
launches as usual); `QUANTATTN_TRITON_LAUNCH_CACHE=0` turns it off.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from .tuning import interpreting

MAX_PLANS = 256


def _enabled_by_env() -> bool:
    return os.environ.get("QUANTATTN_TRITON_LAUNCH_CACHE", "1") != "0" and not interpreting()


@dataclass
class _Plan:
    compiled: Any
    meta: dict[str, Any]
    tail: tuple[Any, ...]


def _int_class(value: int) -> tuple[bool, bool, bool]:
    return value == 1, value % 16 == 0, -(2**31) <= value < 2**31


def _int_class_mod16(value: int) -> tuple[bool, int, bool]:
    return value == 1, value % 16, -(2**31) <= value < 2**31


class LaunchCache:
    """`LaunchCache(kernel, varying=...)(grid, *args, **kw)` launches as `kernel[grid](*args, **kw)` does."""

    enabled = _enabled_by_env()

    def __init__(self, kernel: Any, varying: tuple[str, ...] = (), varying_mod16: tuple[str, ...] = ()) -> None:
        self.kernel = kernel
        self.plans: dict[tuple, _Plan] = {}
        self.hits = 0
        self._recorded: dict[str, Any] | None = None
        if not LaunchCache.enabled:  # the interpreter's kernels have no compiled form
            return
        jit = kernel
        while not isinstance(jit, JITFunction):
            jit = jit.fn
        self.jit = jit
        self.names = list(jit.arg_names)
        self.classes = {i: _int_class for i, name in enumerate(self.names) if name in varying}
        self.classes.update({i: _int_class_mod16 for i, name in enumerate(self.names) if name in varying_mod16})
        jit.add_pre_run_hook(self._record)

    def _record(self, *args: Any, **kwargs: Any) -> None:
        self._recorded = kwargs

    def _signature(self, args: tuple[Any, ...], constexprs: dict[str, Any]) -> tuple:
        classes = self.classes
        key: list[Any] = [driver.active.get_current_device()]
        for i, arg in enumerate(args):
            kind = type(arg)
            if kind is int:
                key.append(classes[i](arg) if i in classes else arg)
            elif kind is float:
                key.append(float)
            elif isinstance(arg, torch.Tensor):
                key.append((arg.dtype, arg.data_ptr() & 15))
            else:
                key.append(arg)
        return (tuple(key), tuple(constexprs.items()))

    def __call__(self, grid: Any, *args: Any, **constexprs: Any) -> None:
        if not LaunchCache.enabled:
            self.kernel[grid](*args, **constexprs)
            return
        try:
            key = self._signature(args, constexprs)
            plan = self.plans.get(key)
        except TypeError:  # an unhashable argument: launch as usual
            self.kernel[grid](*args, **constexprs)
            return
        if plan is None:
            self._recorded = None
            compiled = self.kernel[grid](*args, **constexprs)
            self._store(key, compiled, len(args))
            return
        try:
            self._launch(plan, grid, args)
            self.hits += 1
        except Exception as exc:  # the fast path is an optimisation: never the reason a call fails
            LaunchCache.enabled = False
            warnings.warn(f"quantattn: Triton launch cache off ({type(exc).__name__}: {exc})", stacklevel=2)
            self.kernel[grid](*args, **constexprs)

    def _store(self, key: tuple, compiled: Any, n_args: int) -> None:
        recorded = self._recorded
        if compiled is None or recorded is None or not all(n in recorded for n in self.names[n_args:]):
            return
        if hasattr(compiled, "result"):
            compiled = compiled.result()
        if len(self.plans) >= MAX_PLANS:
            self.plans.clear()
        tail = tuple(recorded[n] for n in self.names[n_args:])
        self.plans[key] = _Plan(compiled, recorded, tail)

    def _launch(self, plan: _Plan, grid: Any, args: tuple[Any, ...]) -> None:
        values = (*args, *plan.tail)
        if callable(grid):
            grid = grid(plan.meta)
        g = (*grid, 1, 1)
        stream = driver.active.get_current_stream(driver.active.get_current_device())
        kernel = plan.compiled
        metadata = kernel.launch_metadata(grid, stream, *values)
        hooks = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, metadata, *hooks, *values)
