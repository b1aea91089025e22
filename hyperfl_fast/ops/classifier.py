"""batched_classifier_loss and classifier_sgd_step: every client's linear classifier head with cross-entropy.

features (N, B, D), weight (N, K, D), bias (N, K), labels (N, B) int64, valid (N, B) bool.  The loss of client n
is its mean cross-entropy over its valid rows (0 without one).  ``classifier_sgd_step`` takes one SGD step
(momentum, weight decay) of each active client's head on that loss, in place.
Triton: :mod:`hyperfl_fast.kernels.classifier` (one launch forward, one backward; the step is one launch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from .precision import triton_input_precision
from .sgd import masked_sgd_
from .validation import check_scalars, check_tensors, expect, expect_contiguous

MAX_TRITON_D, MAX_TRITON_CLASSES = 1024, 128


def reference_loss(features, weight, bias, labels, valid):
    """Client by client: F.linear, F.cross_entropy over the valid rows."""
    losses = []
    for n in range(features.shape[0]):
        rows = valid[n]
        logits = F.linear(features[n][rows], weight[n], bias[n])
        losses.append(F.cross_entropy(logits, labels[n][rows]) if rows.any() else logits.sum() * 0.0)
    return torch.stack(losses)


def vectorised_loss(features, weight, bias, labels, valid):
    """One ``baddbmm`` for the logits, one cross-entropy, a masked mean per client."""
    logits = torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    return (ce * valid).sum(1) / valid.sum(1).clamp(min=1)


def fused_loss(features, weight, bias, labels, valid):
    from ..kernels.classifier import ClassifierLoss

    return ClassifierLoss.apply(features.contiguous(), weight.contiguous(), bias.contiguous(), rows(labels),
                                rows(valid), triton_input_precision())


def rows(t: torch.Tensor) -> torch.Tensor:
    """(N, B) with unit stride along B (any stride between clients): what the kernels read without a copy."""
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


LOSS = dispatch.register(dispatch.Op("batched_classifier_loss", reference_loss, vectorised_loss, fused_loss,
                                                 short="classifier_loss"))


def _sgd_from(loss_fn):
    def step(features, weight, bias, labels, valid, active, weight_buf, bias_buf, lr, momentum, weight_decay):
        with torch.enable_grad():
            w, b = weight.detach().requires_grad_(), bias.detach().requires_grad_()
            grads = torch.autograd.grad(loss_fn(features.detach(), w, b, labels, valid).sum(), [w, b])
        masked_sgd_([weight, bias], list(grads), [weight_buf, bias_buf], active, lr, momentum, weight_decay)
    step.__doc__ = f"The gradients of ``{loss_fn.__name__}`` (each client's own loss), then the masked SGD update."
    return step


def fused_sgd(features, weight, bias, labels, valid, active, weight_buf, bias_buf, lr, momentum, weight_decay):
    from ..kernels.classifier import classifier_sgd_step as step

    step(features.contiguous(), weight, bias, rows(labels), rows(valid), active.contiguous(),
         weight_buf, bias_buf, lr, momentum, weight_decay, triton_input_precision())


SGD = dispatch.register(dispatch.Op("classifier_sgd_step", _sgd_from(reference_loss), _sgd_from(vectorised_loss),
                                    fused_sgd, mutates=(1, 2, 6, 7), short="classifier_sgd"))


def _check(op: str, features, weight, bias, labels, valid) -> None:
    check_tensors(op, dict(features=features, weight=weight, bias=bias))
    check_tensors(op, dict(features=features, labels=labels, valid=valid), float_only=False)
    if features.dim() != 3:
        raise ValueError(f"{op}: features must be (N, B, D), got shape {tuple(features.shape)}")
    n, b, d = features.shape
    if weight.dim() != 3 or weight.shape[0] != n or weight.shape[2] != d:
        raise ValueError(f"{op}: weight must be ({n}, K, {d}), got {tuple(weight.shape)}")
    expect(op, "bias", bias, (n, weight.shape[1]))
    expect(op, "labels", labels, (n, b))
    expect(op, "valid", valid, (n, b))
    if labels.dtype != torch.int64 or valid.dtype != torch.bool:
        raise ValueError(f"{op}: labels must be int64 and valid bool, got {labels.dtype} and {valid.dtype}")


def _triton_limits(op: str, weight: torch.Tensor):
    def check(chosen: str) -> None:
        k, d = weight.shape[1:]
        if chosen == "triton" and (d > MAX_TRITON_D or k > MAX_TRITON_CLASSES):
            raise ValueError(f"{op}: the triton path supports D <= {MAX_TRITON_D} and <= {MAX_TRITON_CLASSES} "
                             f"classes, got D {d} and {k} classes")
    return check


def batched_classifier_loss(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                            valid: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """Each client's mean cross-entropy of ``features weightᵀ + bias`` over its valid rows: (N,).

    Differentiable in features, weight and bias.
    """
    _check(LOSS.name, features, weight, bias, labels, valid)
    return dispatch.call(LOSS, path, (features, weight, bias, labels, valid), check=_triton_limits(LOSS.name, weight))


def classifier_sgd_step(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                        valid: torch.Tensor, active: torch.Tensor, weight_buf: torch.Tensor, bias_buf: torch.Tensor,
                        lr: float, momentum: float, weight_decay: float, path: str | None = None) -> None:
    """In place: one SGD step of each active client's head (weight, bias and their momentum buffers) on its
    :func:`batched_classifier_loss`; ``active`` (N,) bool.  The features are constants here."""
    op = SGD.name
    _check(op, features, weight, bias, labels, valid)
    check_tensors(op, dict(weight=weight, weight_buf=weight_buf, bias_buf=bias_buf))
    check_scalars(op, lr=lr, momentum=momentum, weight_decay=weight_decay)
    expect(op, "active", active, (features.shape[0],))
    expect(op, "weight_buf", weight_buf, weight.shape)
    expect(op, "bias_buf", bias_buf, bias.shape)
    expect_contiguous(op, dict(weight=weight, bias=bias, weight_buf=weight_buf, bias_buf=bias_buf))
    dispatch.call(SGD, path, (features, weight, bias, labels, valid, active, weight_buf, bias_buf, lr, momentum,
                              weight_decay), check=_triton_limits(op, weight))
