"""Public API of the fused HyperFL ops, for this package and for other FL code bases.

=====================================  =========================================================
:func:`generate_weights`               embeddings (N, E) -> theta (N, P), shared or per-client hypernetworks
:func:`fused_head_sgd_step`            clipped SGD step of per-client heads without materialising their gradient
:func:`head_grad_sq_norm`              closed-form squared gradient norm of the heads, per client
:func:`batched_conv2d_leaky_pool`      per-client conv2d + bias -> leaky ReLU -> 2x2 max-pool
:func:`batched_linear`                 per-client linear + bias (-> leaky ReLU)
=====================================  =========================================================

Every op has three paths with the same semantics:

- ``"reference"``: a readable per-client loop (:mod:`hyperfl_fast.ops.naive`), the oracle;
- ``"torch"``: vectorised PyTorch (:mod:`hyperfl_fast.ops.torch_ops`), the fast path without a GPU;
- ``"triton"``: fused Triton kernels (:mod:`hyperfl_fast.kernels`), float32 only.

Dispatch rule: the ``path`` argument if given, else the environment variable
``HYPERFL_OPS_PATH``, else for CUDA tensors the path measured fastest on a GPU
(:data:`CUDA_DEFAULT_PATHS`, from ``benchmarks/RESULTS.md``) and ``"torch"``
otherwise.  A rewritten kernel becomes a CUDA default only once a GPU benchmark
shows it faster; until then it is selected with ``path="triton"``.  The Triton
path on CPU tensors needs ``TRITON_INTERPRET=1`` (set before triton is
imported), which is how the tests check kernel logic without a GPU.  Inputs
are validated here; a bad call raises ``ValueError`` naming the argument.

Precision: one policy for all paths, ``fp32`` (default) or ``tf32``
(:func:`set_precision`, :mod:`hyperfl_fast.ops.precision`).
"""
from __future__ import annotations

import math
import os
import warnings

import torch

from . import naive, torch_ops
from .activation import LEAKY_SLOPE
from .precision import PRECISIONS, apply_environment, get_precision, set_precision, triton_input_precision

PATHS = ("reference", "torch", "triton")
ENV_VAR = "HYPERFL_OPS_PATH"
MAX_TRITON_HIDDEN = 256  # the split-P transposed GEMV keeps a whole hidden row in registers

# The default path of each op for CUDA tensors: the fastest measured on a GPU (benchmarks/RESULTS.md: one H100,
# torch 2.11, triton 3.6).  A kernel enters this table only with a GPU benchmark that shows it faster.
CUDA_DEFAULT_PATHS = {
    "generate_weights/shared": "torch",  # one cuBLAS GEMM, 0.130 ms; the Triton path took 0.399 ms
    "generate_weights/per-client": "triton",  # 63% / 83% of copy bandwidth (fmnist / cifar); torch 54% / 59%
    "fused_head_sgd_step": "triton",  # 99.9% of copy bandwidth; torch 40%
    "batched_conv2d_leaky_pool": "torch",  # cuDNN grouped conv: the Triton CNN stack was 2.1x (fmnist) slower
    "batched_linear": "torch",  # cuBLAS; timed only inside that CNN stack
}

__all__ = ["PATHS", "ENV_VAR", "CUDA_DEFAULT_PATHS", "PRECISIONS", "resolve_path", "describe_paths",
           "set_precision", "get_precision", "generate_weights", "fused_head_sgd_step", "head_grad_sq_norm",
           "batched_conv2d_leaky_pool", "batched_linear"]

try:
    apply_environment()  # the precision policy holds from the first op on
except ValueError as exc:  # a bad variable must not break `import hyperfl_fast`
    warnings.warn(f"{exc}; using fp32", stacklevel=2)


def resolve_path(path: str | None, device: torch.device, op: str | None = None) -> str:
    """The path ``op`` (a key of :data:`CUDA_DEFAULT_PATHS`; others default to torch) runs on for ``device``."""
    default = CUDA_DEFAULT_PATHS.get(op, "torch") if device.type == "cuda" else "torch"
    chosen = path or os.environ.get(ENV_VAR) or default
    if chosen not in PATHS:
        source = "path" if path else ENV_VAR
        raise ValueError(f"{source} must be one of {', '.join(PATHS)}, got {chosen!r}")
    if chosen == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton path needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)")
    return chosen


def describe_paths(device: torch.device) -> str:
    """Which path each op takes by default on ``device``, and the precision: for log lines."""
    paths = ", ".join(f"{op} {resolve_path(None, device, op)}" for op in CUDA_DEFAULT_PATHS)
    return f"{paths}; precision {get_precision()}"


def _check(op: str, named: dict[str, torch.Tensor], path: str | None, dispatch_key: str | None = None) -> str:
    """Tensors on one device with one floating dtype (float32 for triton); returns the resolved path."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device}, {first_name} on {first.device}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be floating point, got {t.dtype}")
        if t.dtype != first.dtype:
            raise ValueError(f"{op}: {name} is {t.dtype}, {first_name} {first.dtype}; pass one dtype")
    path = resolve_path(path, first.device, dispatch_key or op)
    if path == "triton" and first.dtype != torch.float32:
        raise ValueError(f"{op}: the triton path takes float32, {first_name} is {first.dtype}")
    return path


def _check_scalars(op: str, **named) -> None:
    for name, value in named.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{op}: {name} must be a finite number, got {value!r}")


def _check_batch(op: str, x: torch.Tensor) -> None:
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{op}: x has no {'clients' if x.shape[0] == 0 else 'samples'} (shape {tuple(x.shape)})")


def _expect(op: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def generate_weights(embeddings: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor,
                     head_weight: torch.Tensor, head_bias: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """theta (N, P) = ReLU(embeddings fcᵀ + fc_bias) headsᵀ + head_bias, differentiable in every input.

    embeddings (N, E).  Shared hypernetwork: fc_weight (H, E), fc_bias (H,),
    head_weight (P, H), head_bias (P,).  Per-client hypernetworks: the same
    with a leading N.  (The two layers may independently be shared or per-client.)
    """
    op = "generate_weights"
    shared = isinstance(head_weight, torch.Tensor) and head_weight.dim() == 2
    path = _check(op, dict(embeddings=embeddings, fc_weight=fc_weight, fc_bias=fc_bias, head_weight=head_weight,
                           head_bias=head_bias), path, f"{op}/{'shared' if shared else 'per-client'}")
    if embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"{op}: embeddings must be (N, E) with N >= 1, got shape {tuple(embeddings.shape)}")
    n, e = embeddings.shape
    for name, w in (("fc_weight", fc_weight), ("head_weight", head_weight)):
        if w.dim() == 3 and w.shape[0] != n:
            raise ValueError(f"{op}: {name} has {w.shape[0]} clients, embeddings {n}")
    if fc_weight.dim() not in (2, 3) or fc_weight.shape[-1] != e:
        raise ValueError(f"{op}: fc_weight must be (H, {e}) or ({n}, H, {e}), got {tuple(fc_weight.shape)}")
    h = fc_weight.shape[-2]
    _expect(op, "fc_bias", fc_bias, ((n,) if fc_weight.dim() == 3 else ()) + (h,))
    if head_weight.dim() not in (2, 3) or head_weight.shape[-1] != h:
        raise ValueError(f"{op}: head_weight must be (P, {h}) or ({n}, P, {h}), got {tuple(head_weight.shape)}")
    _expect(op, "head_bias", head_bias, ((n,) if head_weight.dim() == 3 else ()) + (head_weight.shape[-2],))
    if path == "reference":
        return naive.generate_weights(embeddings, fc_weight, fc_bias, head_weight, head_bias)
    if path == "torch":
        return torch_ops.generate_weights(embeddings, fc_weight, fc_bias, head_weight, head_bias)
    if h > MAX_TRITON_HIDDEN:
        raise ValueError(f"{op}: the triton path supports hidden size <= {MAX_TRITON_HIDDEN}, got {h}")
    from ..kernels.generate import GenerateWeights

    args = (t.contiguous() for t in (embeddings, fc_weight, fc_bias, head_weight, head_bias))
    return GenerateWeights.apply(*args, triton_input_precision())


def head_grad_sq_norm(d_theta: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Per-client squared norm of the heads' gradient, from its closed form, without touching the heads.

    For theta_n = W_n h_n + b_n the gradients are dW_n = dtheta_n ⊗ h_n and
    db_n = dtheta_n, so ``‖dW_n‖² + ‖db_n‖² = ‖dtheta_n‖² (‖h_n‖² + 1)``.
    d_theta (N, P), hidden (N, H) -> (N,).
    """
    op = "head_grad_sq_norm"
    _check(op, dict(d_theta=d_theta, hidden=hidden), "torch")
    if d_theta.dim() != 2 or hidden.dim() != 2 or d_theta.shape[0] != hidden.shape[0]:
        raise ValueError(f"{op}: d_theta must be (N, P) and hidden (N, H) with the same N, got "
                         f"{tuple(d_theta.shape)} and {tuple(hidden.shape)}")
    return d_theta.pow(2).sum(1) * (hidden.pow(2).sum(1) + 1.0)


def fused_head_sgd_step(head_weight: torch.Tensor, head_bias: torch.Tensor, weight_buf: torch.Tensor,
                        bias_buf: torch.Tensor, d_theta: torch.Tensor, hidden: torch.Tensor,
                        clip_coef: torch.Tensor, lr: float, momentum: float, weight_decay: float,
                        path: str | None = None) -> None:
    """In place: SGD (momentum, weight decay) on per-client heads with gradient clip_coef * (dtheta ⊗ h).

    head_weight, weight_buf (N, P, H); head_bias, bias_buf (N, P); d_theta (N, P);
    hidden (N, H); clip_coef (N,).  Equivalent to ``clip_grad_norm_`` (which
    scales by ``clip_coef``) then ``torch.optim.SGD.step``; momentum buffers
    must start at zero.  The triton path reads and writes the heads and their
    buffer once each.
    """
    op = "fused_head_sgd_step"
    named = dict(head_weight=head_weight, head_bias=head_bias, weight_buf=weight_buf, bias_buf=bias_buf,
                 d_theta=d_theta, hidden=hidden, clip_coef=clip_coef)
    path = _check(op, named, path)
    _check_scalars(op, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if head_weight.dim() != 3:
        raise ValueError(f"{op}: head_weight must be (N, P, H), got shape {tuple(head_weight.shape)}")
    n, p, h = head_weight.shape
    for name, shape in (("head_bias", (n, p)), ("weight_buf", (n, p, h)), ("bias_buf", (n, p)),
                        ("d_theta", (n, p)), ("hidden", (n, h)), ("clip_coef", (n,))):
        _expect(op, name, named[name], shape)
    for name in ("head_weight", "head_bias", "weight_buf", "bias_buf"):
        if not named[name].is_contiguous():
            raise ValueError(f"{op}: {name} is updated in place and must be contiguous")
    if path == "reference":
        return naive.head_sgd_step(head_weight, head_bias, weight_buf, bias_buf, d_theta, hidden, clip_coef,
                                   lr, momentum, weight_decay)
    if path == "torch":
        return torch_ops.head_sgd_step(head_weight, head_bias, weight_buf, bias_buf, d_theta, hidden, clip_coef,
                                       lr, momentum, weight_decay)
    if h > 1024:
        raise ValueError(f"{op}: the triton path supports hidden size <= 1024, got {h}")
    from ..kernels.head_sgd import head_sgd_step

    head_sgd_step(head_weight, head_bias, weight_buf, bias_buf, d_theta.contiguous(), hidden.contiguous(),
                  clip_coef.contiguous(), lr, momentum, weight_decay)


def batched_conv2d_leaky_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int = 0,
                              path: str | None = None) -> torch.Tensor:
    """Per-client conv2d (stride 1) + bias -> leaky ReLU -> 2x2 max-pool.

    x (N, B, C, H, W), weight (N, Cout, C, k, k), bias (N, Cout) -> (N, B, Cout, Hp, Wp)
    with Hp = (H + 2 padding - k + 1) // 2.
    """
    op = "batched_conv2d_leaky_pool"
    path = _check(op, dict(x=x, weight=weight, bias=bias), path)
    if x.dim() != 5:
        raise ValueError(f"{op}: x must be (N, B, C, H, W), got shape {tuple(x.shape)}")
    _check_batch(op, x)
    n, _, c, h, w = x.shape
    if weight.dim() != 5 or weight.shape[0] != n or weight.shape[2] != c or weight.shape[3] != weight.shape[4]:
        raise ValueError(f"{op}: weight must be ({n}, Cout, {c}, k, k), got {tuple(weight.shape)}")
    _expect(op, "bias", bias, (n, weight.shape[1]))
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"{op}: padding must be a non-negative int, got {padding!r}")
    k = weight.shape[-1]
    if min(h, w) + 2 * padding - k + 1 < 2:
        raise ValueError(f"{op}: a {h}x{w} input with kernel {k} and padding {padding} leaves nothing to pool")
    if path == "reference":
        return naive.conv2d_leaky_pool(x, weight, bias, padding)
    if path == "torch":
        return torch_ops.conv2d_leaky_pool(x, weight, bias, padding)
    from ..kernels.conv import Conv2dLeakyPool

    return Conv2dLeakyPool.apply(x.contiguous(), weight.contiguous(), bias.contiguous(), padding, LEAKY_SLOPE,
                                 triton_input_precision())


def batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, leaky: bool = False,
                   path: str | None = None) -> torch.Tensor:
    """Per-client linear: x (N, B, K), weight (N, M, K), bias (N, M) -> (N, B, M), optional leaky ReLU."""
    op = "batched_linear"
    path = _check(op, dict(x=x, weight=weight, bias=bias), path)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (N, B, K), got shape {tuple(x.shape)}")
    _check_batch(op, x)
    n, _, k = x.shape
    if weight.dim() != 3 or weight.shape[0] != n or weight.shape[2] != k:
        raise ValueError(f"{op}: weight must be ({n}, M, {k}), got {tuple(weight.shape)}")
    _expect(op, "bias", bias, (n, weight.shape[1]))
    if path == "reference":
        return naive.linear(x, weight, bias, leaky)
    if path == "torch":
        return torch_ops.linear(x, weight, bias, leaky)
    from ..kernels.linear import BatchedLinear

    return BatchedLinear.apply(x.contiguous(), weight.contiguous(), bias.contiguous(), LEAKY_SLOPE if leaky else None,
                               triton_input_precision())
