"""Batched per-client conv2d + bias -> leaky ReLU -> 2x2 max-pool, fused, forward and backward.

x (N, B, C, H, W), weight (N, Cout, C, k, k), bias (N, Cout) -> y (N, B, Cout, Hp, Wp)
with Hc = H + 2*pad - k + 1 (stride 1) and Hp = Hc // 2 (floor pooling).

Forward: an implicit GEMM per (client, sample): a tile of output channels x
pooled pixels is computed for each of the four pool positions, and only the
max is kept, so the full-resolution conv output never reaches memory.  The
winning position (0..3) is saved as int8 for the backward.

Backward: the pooled gradient (times leaky ReLU's slope, read off the sign of
y, which has the sign of the winning pre-activation) is scattered to the winner
positions (dz, full resolution), then two implicit GEMMs give
``dW[n] = sum_b dz * im2col(x)`` (with the bias gradient) and
``dx = conv_transpose(dz, W)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


BLOCK_PIX = 32
BLOCK_K = 32


@triton.jit
def _conv_pool_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, win_ptr, B, C, H, W, COUT, HP, WP, PAD,
                          KS: tl.constexpr, SLOPE: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_CO: tl.constexpr, BLOCK_PIX: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_pix, pid_co, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = nb // B
    kk = C * KS * KS
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    pix = pid_pix * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    py, px = pix // WP, pix % WP
    x_base = x_ptr + nb * C * H * W
    w_base = w_ptr + n * COUT * kk
    best = tl.full((BLOCK_CO, BLOCK_PIX), float("-inf"), dtype=tl.float32)
    winner = tl.zeros((BLOCK_CO, BLOCK_PIX), dtype=tl.int32)
    for q in tl.static_range(4):  # the 2x2 pool window, in raster order (first max wins, as PyTorch)
        oy = py * 2 + q // 2
        ox = px * 2 + q % 2
        acc = tl.zeros((BLOCK_CO, BLOCK_PIX), dtype=tl.float32)
        for k0 in range(0, kk, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            ci, r = rk // (KS * KS), rk % (KS * KS)
            iy = oy[None, :] + (r // KS)[:, None] - PAD  # (BLOCK_K, BLOCK_PIX)
            ix = ox[None, :] + (r % KS)[:, None] - PAD
            xmask = (rk[:, None] < kk) & (pix[None, :] < HP * WP) & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            xv = tl.load(x_base + ci[:, None] * H * W + iy * W + ix, mask=xmask, other=0.0)
            wv = tl.load(w_base + co[:, None] * kk + rk[None, :], mask=(co[:, None] < COUT) & (rk[None, :] < kk),
                         other=0.0)
            acc += tl.dot(wv, xv, input_precision=PRECISION)
        take = acc > best
        best = tl.where(take, acc, best)
        winner = tl.where(take, q, winner)
    best += tl.load(b_ptr + n * COUT + co, mask=co < COUT, other=0.0)[:, None]
    y = tl.where(best > 0, best, best * SLOPE)
    out_offs = nb * COUT * HP * WP + co[:, None] * HP * WP + pix[None, :]
    out_mask = (co[:, None] < COUT) & (pix[None, :] < HP * WP)
    tl.store(y_ptr + out_offs, y, mask=out_mask)
    tl.store(win_ptr + out_offs, winner.to(tl.int8), mask=out_mask)


@triton.jit
def _unpool_kernel(dy_ptr, y_ptr, win_ptr, dz_ptr, total, HP, WP, HC, WC, SLOPE: tl.constexpr,
                   BLOCK: tl.constexpr):
    """dz (zeroed, full resolution) at each window's winner = dy * leaky'(y)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    q = tl.load(win_ptr + offs, mask=mask, other=0).to(tl.int32)
    plane, pix = offs // (HP * WP), offs % (HP * WP)  # plane = (n, b, co)
    oy = (pix // WP) * 2 + q // 2
    ox = (pix % WP) * 2 + q % 2
    tl.store(dz_ptr + plane * HC * WC + oy * WC + ox, tl.where(y > 0, dy, dy * SLOPE), mask=mask)


@triton.jit
def _conv_dw_kernel(x_ptr, dz_ptr, dw_ptr, db_ptr, B, C, H, W, COUT, HC, WC, PAD, KS: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_PIX: tl.constexpr, BLOCK_K: tl.constexpr):
    """dw[n, co, k] = sum_{b, pix} dz[n, b, co, pix] * im2col(x[n, b])[k, pix]; db likewise (pid_k == 0)."""
    pid_k, pid_co, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kk = C * KS * KS
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ci, r = rk // (KS * KS), rk % (KS * KS)
    acc = tl.zeros((BLOCK_CO, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    for b in range(0, B):
        nb = n * B + b
        for p0 in range(0, HC * WC, BLOCK_PIX):
            pix = p0 + tl.arange(0, BLOCK_PIX)
            oy, ox = pix // WC, pix % WC
            dz = tl.load(dz_ptr + nb * COUT * HC * WC + co[:, None] * HC * WC + pix[None, :],
                         mask=(co[:, None] < COUT) & (pix[None, :] < HC * WC), other=0.0)  # (CO, PIX)
            iy = oy[:, None] + (r // KS)[None, :] - PAD  # (PIX, K)
            ix = ox[:, None] + (r % KS)[None, :] - PAD
            xmask = (pix[:, None] < HC * WC) & (rk[None, :] < kk) & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            xv = tl.load(x_ptr + nb * C * H * W + ci[None, :] * H * W + iy * W + ix, mask=xmask, other=0.0)
            acc += tl.dot(dz, xv, input_precision=PRECISION)
            acc_b += tl.sum(dz, axis=1)
    tl.store(dw_ptr + n * COUT * kk + co[:, None] * kk + rk[None, :], acc,
             mask=(co[:, None] < COUT) & (rk[None, :] < kk))
    if pid_k == 0:
        tl.store(db_ptr + n * COUT + co, acc_b, mask=co < COUT)


@triton.jit
def _conv_dx_kernel(dz_ptr, w_ptr, dx_ptr, B, C, H, W, COUT, HC, WC, PAD, KS: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_PIX: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[n, b, ci, y, x] = sum_{co, kh, kw} w[n, co, ci, kh, kw] * dz[n, b, co, y + PAD - kh, x + PAD - kw]."""
    pid_pix, pid_ci, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = nb // B
    kk = COUT * KS * KS  # reduction over (co, kh, kw)
    ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    pix = pid_pix * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    iy, ix = pix // W, pix % W
    acc = tl.zeros((BLOCK_CI, BLOCK_PIX), dtype=tl.float32)
    for k0 in range(0, kk, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        co, r = rk // (KS * KS), rk % (KS * KS)
        kh, kw = r // KS, r % KS
        wv = tl.load(w_ptr + n * COUT * C * KS * KS + co[None, :] * C * KS * KS + ci[:, None] * KS * KS + r[None, :],
                     mask=(ci[:, None] < C) & (rk[None, :] < kk), other=0.0)  # (CI, K)
        oy = iy[None, :] + PAD - kh[:, None]  # (K, PIX)
        ox = ix[None, :] + PAD - kw[:, None]
        zmask = (rk[:, None] < kk) & (pix[None, :] < H * W) & (oy >= 0) & (oy < HC) & (ox >= 0) & (ox < WC)
        dz = tl.load(dz_ptr + nb * COUT * HC * WC + co[:, None] * HC * WC + oy * WC + ox, mask=zmask, other=0.0)
        acc += tl.dot(wv, dz, input_precision=PRECISION)
    tl.store(dx_ptr + nb * C * H * W + ci[:, None] * H * W + pix[None, :], acc,
             mask=(ci[:, None] < C) & (pix[None, :] < H * W))


def _co_block(cout: int) -> int:
    return max(16, min(64, triton.next_power_of_2(cout)))


class Conv2dLeakyPool(torch.autograd.Function):
    """Fused per-client conv + bias + leaky ReLU (negative slope ``slope``) + 2x2 max-pool (contiguous float32)."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding: int, slope: float, precision: str):
        n, b, c, h, w = x.shape
        cout, ks = weight.shape[1], weight.shape[-1]
        hc, wc = h + 2 * padding - ks + 1, w + 2 * padding - ks + 1
        hp, wp = hc // 2, wc // 2
        y = torch.empty(n, b, cout, hp, wp, device=x.device, dtype=torch.float32)
        winner = torch.empty(n, b, cout, hp, wp, device=x.device, dtype=torch.int8)
        block_co = _co_block(cout)
        grid = (triton.cdiv(hp * wp, BLOCK_PIX), triton.cdiv(cout, block_co), n * b)
        _conv_pool_fwd_kernel[grid](x, weight, bias, y, winner, b, c, h, w, cout, hp, wp, padding, KS=ks,
                                    SLOPE=slope, PRECISION=precision, BLOCK_CO=block_co, BLOCK_PIX=BLOCK_PIX, BLOCK_K=BLOCK_K)
        ctx.save_for_backward(x, weight, y, winner)
        ctx.padding, ctx.slope, ctx.precision = padding, slope, precision
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, y, winner = ctx.saved_tensors
        pad = ctx.padding
        n, b, c, h, w = x.shape
        cout, ks = weight.shape[1], weight.shape[-1]
        hp, wp = y.shape[-2:]
        hc, wc = h + 2 * pad - ks + 1, w + 2 * pad - ks + 1
        dz = torch.zeros(n, b, cout, hc, wc, device=x.device, dtype=torch.float32)
        total = y.numel()
        _unpool_kernel[(triton.cdiv(total, 1024),)](dy.contiguous(), y, winner, dz, total, hp, wp, hc, wc,
                                                     SLOPE=ctx.slope, BLOCK=1024)
        block_co = _co_block(cout)
        dx = dw = db = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw = torch.empty_like(weight)
            db = torch.empty(n, cout, device=x.device, dtype=torch.float32)
            grid = (triton.cdiv(c * ks * ks, BLOCK_K), triton.cdiv(cout, block_co), n)
            _conv_dw_kernel[grid](x, dz, dw, db, b, c, h, w, cout, hc, wc, pad, KS=ks, PRECISION=ctx.precision,
                                  BLOCK_CO=block_co, BLOCK_PIX=BLOCK_PIX, BLOCK_K=BLOCK_K)
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            block_ci = max(16, min(64, triton.next_power_of_2(c)))
            grid = (triton.cdiv(h * w, BLOCK_PIX), triton.cdiv(c, block_ci), n * b)
            _conv_dx_kernel[grid](dz, weight, dx, b, c, h, w, cout, hc, wc, pad, KS=ks, PRECISION=ctx.precision,
                                  BLOCK_CI=block_ci, BLOCK_PIX=BLOCK_PIX, BLOCK_K=BLOCK_K)
        return dx, dw, db, None, None, None
