"""Per-client classifier head + cross-entropy, fused: one program per client, one launch each way.

features (N, B, D), weight (N, C, D), bias (N, C), labels (N, B), valid (N, B) -> loss (N,): each client's mean
cross-entropy of ``features Wᵀ + b`` over its valid rows (0 for a client without one).  The logits never reach
memory: the forward keeps each row's log-sum-exp (N, B); the backward recomputes the logits from it and forms
``dlogits = (softmax - onehot) * valid * dloss / count``, then ``dfeatures = dlogits W``, ``dW = dlogitsᵀ
features`` and ``db = sum dlogits`` as needed.  :func:`classifier_sgd_step` goes one step further for the
classifier phase: it applies SGD (momentum, weight decay) to W and b in place in the same program, so a
classifier step after the features is a single launch.

Rows run in blocks of BLOCK_B; D and the class count are whole tiles (D <= 1024, classes <= 128).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch

BLOCK_B, NUM_WARPS = 16, 4  # spill-free for D = 128 on sm_80 and sm_90, every variant (the report)
MAX_D, MAX_CLASSES = 1024, 128


@triton.jit
def _logits(f_ptr, w_tile, b_row, rows, d, row_ok, D, PRECISION: tl.constexpr):
    """(features tile (BLOCK_B, BLOCK_D), logits (BLOCK_B, BLOCK_C)) of the given rows."""
    f = tl.load(f_ptr + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    return f, tl.dot(f, tl.trans(w_tile), input_precision=PRECISION) + b_row[None, :]


@triton.jit
def _rows_in(valid_ptr, y_ptr, n, r, B, stride_vn, stride_yn):
    """(row in range, valid as 0/1 float, label) of rows r of client n."""
    row_ok = r < B
    valid = tl.load(valid_ptr + n * stride_vn + r, mask=row_ok, other=0).to(tl.float32)
    return row_ok, valid, tl.load(y_ptr + n * stride_yn + r, mask=row_ok, other=0)


@triton.jit
def _log_sum_exp(logits):
    top = tl.max(logits, axis=1)
    return top + tl.log(tl.sum(tl.exp(logits - top[:, None]), axis=1))


@triton.jit
def _client_head(w_ptr, b_ptr, n, C, D, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    c = tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + n * C * D + c[:, None] * D + d[None, :], mask=(c[:, None] < C) & (d[None, :] < D), other=0.0)
    b = tl.load(b_ptr + n * C + c, mask=c < C, other=float("-inf"))  # padded classes never win the softmax
    return c, d, w, b


@triton.jit
def _classifier_loss_fwd_kernel(f_ptr, w_ptr, b_ptr, y_ptr, valid_ptr, loss_ptr, lse_ptr, B, C, D, stride_yn,
                                stride_vn, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    c, d, w, b = _client_head(w_ptr, b_ptr, n, C, D, BLOCK_C, BLOCK_D)
    total = tl.zeros((BLOCK_B,), dtype=tl.float32)
    count = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        r = b0 + tl.arange(0, BLOCK_B)
        row_ok, valid, label = _rows_in(valid_ptr, y_ptr, n, r, B, stride_vn, stride_yn)
        _, logits = _logits(f_ptr + n * B * D, w, b, r, d, row_ok, D, PRECISION)
        lse = _log_sum_exp(logits)
        picked = tl.sum(tl.where(c[None, :] == label[:, None], logits, 0.0), axis=1)
        total += tl.where(valid > 0, lse - picked, 0.0)
        count += valid
        tl.store(lse_ptr + n * B + r, lse, mask=row_ok)
    tl.store(loss_ptr + n, tl.sum(total, axis=0) / tl.maximum(tl.sum(count, axis=0), 1.0))


@triton.jit
def _classifier_loss_bwd_kernel(f_ptr, w_ptr, b_ptr, y_ptr, valid_ptr, lse_ptr, dloss_ptr, df_ptr, dw_ptr, db_ptr,
                                wbuf_ptr, bbuf_ptr, active_ptr, B, C, D, stride_yn, stride_vn, lr, momentum,
                                weight_decay,
                                NEED_DF: tl.constexpr, NEED_DW: tl.constexpr, SGD: tl.constexpr,
                                PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    """Gradients of client n's loss (scaled by dloss[n]); with SGD, a step on W and b instead of storing dW, db
    (the loss itself, dloss = 1: the log-sum-exp is computed here and nothing is read from a forward)."""
    n = tl.program_id(0).to(tl.int64)
    c, d, w, b = _client_head(w_ptr, b_ptr, n, C, D, BLOCK_C, BLOCK_D)
    count = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        r = b0 + tl.arange(0, BLOCK_B)
        count += tl.load(valid_ptr + n * stride_vn + r, mask=r < B, other=0).to(tl.float32)
    scale = (1.0 if SGD else tl.load(dloss_ptr + n)) / tl.maximum(tl.sum(count, axis=0), 1.0)
    dw = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        r = b0 + tl.arange(0, BLOCK_B)
        row_ok, valid, label = _rows_in(valid_ptr, y_ptr, n, r, B, stride_vn, stride_yn)
        f, logits = _logits(f_ptr + n * B * D, w, b, r, d, row_ok, D, PRECISION)
        lse = _log_sum_exp(logits) if SGD else tl.load(lse_ptr + n * B + r, mask=row_ok, other=0.0)
        p = tl.exp(logits - lse[:, None]) - tl.where(c[None, :] == label[:, None], 1.0, 0.0)
        dlogits = tl.where((valid > 0)[:, None] & (c[None, :] < C), p * scale, 0.0)  # (BLOCK_B, BLOCK_C)
        if NEED_DF:
            df = tl.dot(dlogits, w, input_precision=PRECISION)
            tl.store(df_ptr + n * B * D + r[:, None] * D + d[None, :], df, mask=row_ok[:, None] & (d[None, :] < D))
        if NEED_DW:
            dw += tl.dot(tl.trans(dlogits), f, input_precision=PRECISION)
            db += tl.sum(dlogits, axis=0)
    if NEED_DW:
        w_offs = n * C * D + c[:, None] * D + d[None, :]
        w_mask = (c[:, None] < C) & (d[None, :] < D)
        if SGD:  # torch.optim.SGD on this client's head, skipped for an inactive client (as StackedSGD)
            if tl.load(active_ptr + n) != 0:
                wbuf = momentum * tl.load(wbuf_ptr + w_offs, mask=w_mask, other=0.0) + (dw + weight_decay * w)
                tl.store(wbuf_ptr + w_offs, wbuf, mask=w_mask)
                tl.store(w_ptr + w_offs, w - lr * wbuf, mask=w_mask)
                b_old = tl.load(b_ptr + n * C + c, mask=c < C, other=0.0)
                bbuf = momentum * tl.load(bbuf_ptr + n * C + c, mask=c < C, other=0.0) + (db + weight_decay * b_old)
                tl.store(bbuf_ptr + n * C + c, bbuf, mask=c < C)
                tl.store(b_ptr + n * C + c, b_old - lr * bbuf, mask=c < C)
        else:
            tl.store(dw_ptr + w_offs, dw, mask=w_mask)
            tl.store(db_ptr + n * C + c, db, mask=c < C)


def _blocks(num_classes: int, dim: int) -> dict:
    return dict(BLOCK_B=BLOCK_B, BLOCK_C=max(16, triton.next_power_of_2(num_classes)),
                BLOCK_D=max(16, triton.next_power_of_2(dim)), num_warps=NUM_WARPS)


def classifier_loss_forward(features, weight, bias, labels, valid, precision: str):
    """(loss (N,), lse (N, B)); labels and valid may have any row stride, the rest is contiguous."""
    n, b, d = features.shape
    c = weight.shape[1]
    loss = torch.empty(n, device=features.device, dtype=torch.float32)
    lse = torch.empty(n, b, device=features.device, dtype=torch.float32)
    launch(_classifier_loss_fwd_kernel, (n,), features, weight, bias, labels, valid, loss, lse, b, c, d,
           labels.stride(0), valid.stride(0), PRECISION=precision, **_blocks(c, d))
    return loss, lse


def classifier_loss_backward(features, weight, bias, labels, valid, lse, d_loss, need_features: bool,
                             need_weights: bool, precision: str):
    """(dfeatures or None, dweight or None, dbias or None) for the upstream gradient d_loss (N,)."""
    n, b, d = features.shape
    c = weight.shape[1]
    df = torch.empty_like(features) if need_features else features
    dw = torch.empty_like(weight) if need_weights else weight
    db = torch.empty_like(bias) if need_weights else bias
    launch(_classifier_loss_bwd_kernel, (n,), features, weight, bias, labels, valid, lse, d_loss, df, dw, db,
           weight, bias, valid, b, c, d, labels.stride(0), valid.stride(0), 0.0, 0.0, 0.0, NEED_DF=need_features,
           NEED_DW=need_weights, SGD=False, PRECISION=precision, **_blocks(c, d))
    return (df if need_features else None), (dw if need_weights else None), (db if need_weights else None)


def classifier_sgd_step(features, weight, bias, labels, valid, active, weight_buf, bias_buf, lr: float,
                        momentum: float, weight_decay: float, precision: str) -> None:
    """In place: one SGD step of every active client's head on its mean cross-entropy (contiguous tensors)."""
    n, b, d = features.shape
    c = weight.shape[1]
    unused = features  # the lse, dloss, dfeatures, dW and db arguments: not read or written with SGD
    launch(_classifier_loss_bwd_kernel, (n,), features, weight, bias, labels, valid, unused, unused, unused, unused,
           unused, weight_buf, bias_buf, active, b, c, d, labels.stride(0), valid.stride(0), float(lr),
           float(momentum), float(weight_decay),
           NEED_DF=False, NEED_DW=True, SGD=True, PRECISION=precision, **_blocks(c, d))


class ClassifierLoss(torch.autograd.Function):
    """Each client's mean cross-entropy of its own linear head over its valid rows: (N,)."""

    @staticmethod
    def forward(ctx, features, weight, bias, labels, valid, precision: str):
        loss, lse = classifier_loss_forward(features, weight, bias, labels, valid, precision)
        ctx.save_for_backward(features, weight, bias, labels, valid, lse)
        ctx.precision = precision
        return loss

    @staticmethod
    def backward(ctx, d_loss):
        features, weight, bias, labels, valid, lse = ctx.saved_tensors
        df, dw, db = classifier_loss_backward(features, weight, bias, labels, valid, lse, d_loss.contiguous(),
                                              ctx.needs_input_grad[0],
                                              ctx.needs_input_grad[1] or ctx.needs_input_grad[2], ctx.precision)
        return df, dw, db, None, None, None
