"""One way to launch every kernel of this package: autotuned on a GPU, a chosen config in the interpreter, or recorded.

Every kernel module launches through :func:`launch`, so three things hold for all of them at once:

- **Autotuning.** A :class:`Tuned` kernel carries its block configurations and autotune key; on a GPU it runs
  through ``triton.autotune``, which times each configuration once per key.  The key holds the shapes and every
  ``constexpr`` that changes the code (kernel size, padding, precision), so a choice made for one never serves
  another.
- **Every configuration checked.** Triton's interpreter cannot time kernels, so it runs
  ``configs[forced % len(configs)]`` with ``forced`` from :func:`forced_config` (default 0); the tests step
  ``forced`` through every configuration of every kernel.
- **Recording.** Inside :func:`recording`, launches are not run but recorded (kernel, grid, arguments), which is
  how :mod:`.report` compiles each launch a workload makes, at its real shapes, for a GPU it does not have; and
  :func:`launch_count` counts launches (the step's launch budget is tested with it).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable

import triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

_forced: int | None = None
_recorder: list | None = None
_count = 0
_launching = False  # inside a launch (the interpreter's own tensor handling is not the workload's)


class Tuned:
    """A Triton kernel with its block configurations (autotuned on a GPU over ``key``)."""

    def __init__(self, fn, configs: list[triton.Config], key: list[str]):
        self.fn, self.configs, self.key = fn, configs, key
        self.name = fn.__name__
        self.autotuner = None if INTERPRETED else triton.autotune(configs=configs, key=key)(fn)

    def __repr__(self):
        return f"Tuned({self.name}, {len(self.configs)} configs)"


def tuned(configs: list[triton.Config], key: list[str]) -> Callable:
    """Decorator: ``@tuned(CONFIGS, key=[...])`` above ``@triton.jit``."""
    return lambda fn: Tuned(fn, configs, key)


@dataclass
class Launch:
    """One recorded launch: the kernel (a ``Tuned`` or a plain jit function), its grid and its arguments."""

    kernel: object
    grid: object
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return getattr(self.kernel, "name", None) or self.kernel.fn.__name__


def launch(kernel, grid, *args, **kwargs) -> None:
    """Run ``kernel`` on ``grid`` (a tuple, or a function of the config's meta-parameters for a ``Tuned`` kernel)."""
    global _count, _launching
    _count += 1
    if _recorder is not None:
        _recorder.append(Launch(kernel, grid, args, kwargs))
        return
    _launching = True
    try:
        _run(kernel, grid, args, kwargs)
    finally:
        _launching = False


def _run(kernel, grid, args, kwargs) -> None:
    if not isinstance(kernel, Tuned):
        kernel[grid](*args, **kwargs)
    elif INTERPRETED or _forced is not None:
        config = kernel.configs[(_forced or 0) % len(kernel.configs)]
        meta = {**kwargs, **config.kwargs}
        kernel.fn[grid(meta) if callable(grid) else grid](*args, **meta, num_warps=config.num_warps,
                                                          num_stages=config.num_stages)
    else:
        kernel.autotuner[grid](*args, **kwargs)


@contextlib.contextmanager
def forced_config(index: int):
    """Launch every ``Tuned`` kernel with its configuration ``index`` (modulo its count) instead of autotuning."""
    global _forced
    before, _forced = _forced, index
    try:
        yield
    finally:
        _forced = before


@contextlib.contextmanager
def recording():
    """Record launches instead of running them; yields the list they are appended to."""
    global _recorder
    before, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = before


def launch_count() -> int:
    """Launches made through :func:`launch` since the process started (recorded ones included)."""
    return _count


def launching() -> bool:
    """Whether a launch is running now (what the interpreter does with tensors then is not the workload's)."""
    return _launching


def max_configs(kernels) -> int:
    """The most configurations any of ``kernels`` has: how many forced indices cover every one of them."""
    return max(len(k.configs) for k in kernels if isinstance(k, Tuned))
