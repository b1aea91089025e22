"""Input checks shared by the ops: a bad call raises ``ValueError`` naming the op and the argument, before any work."""
from __future__ import annotations

import math

import torch


def check_tensors(op: str, named: dict[str, torch.Tensor], float_only: bool = True) -> None:
    """Tensors on one device; with ``float_only`` all of one floating dtype."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device}, {first_name} on {first.device}")
        if float_only and not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be floating point, got {t.dtype}")
        if float_only and t.dtype != first.dtype:
            raise ValueError(f"{op}: {name} is {t.dtype}, {first_name} {first.dtype}; pass one dtype")


def check_scalars(op: str, **named) -> None:
    for name, value in named.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{op}: {name} must be a finite number, got {value!r}")


def check_batch(op: str, x: torch.Tensor) -> None:
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{op}: x has no {'clients' if x.shape[0] == 0 else 'samples'} (shape {tuple(x.shape)})")


def expect(op: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def expect_contiguous(op: str, named: dict[str, torch.Tensor]) -> None:
    for name, t in named.items():
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} is updated in place and must be contiguous")


def client_blocks(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if each client's block (all but dim 0) is contiguous, whatever the stride between clients
    (views of one flat theta, say), else a contiguous copy: the layout the Triton kernels take."""
    expected = 1
    for size, stride in reversed(list(zip(t.shape[1:], t.stride()[1:]))):
        if size != 1 and stride != expected:
            return t.contiguous()
        expected *= size
    return t
