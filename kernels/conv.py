"""Batched per-client conv2d + bias -> leaky ReLU -> 2x2 max-pool, fused, forward and backward.

x (N, B, C, H, W), weight (N, Cout, C, k, k), bias (N, Cout) -> y (N, B, Cout, Hp, Wp)
with Hc = H + 2*pad - k + 1 (stride 1) and Hp = Hc // 2 (floor pooling).

Each client's convolution is an implicit GEMM: rows are (sample, pooled pixel)
pairs, M = B*Hp*Wp of them, columns the Cout output channels, and the reduction
runs over K = C*k*k.  A program owns a BLOCK_M x BLOCK_N tile of one client:
every K step loads that client's weight tile once and multiplies it with the
im2col tiles of all four pool positions, so four accumulators hold the 2x2
window and only its maximum (plus the int8 index of the winning position) is
ever written: the full-resolution conv output never reaches memory.

Backward, with g = dy * leaky'(y) at each window's winner (y has the sign of
the winning pre-activation, so the slope is read off it):

- ``dW[n] = sum over rows of dz x im2col(x)``, where dz is g at the winner and
  0 elsewhere.  The rows of one client are split into ``SPLIT`` contiguous
  chunks, each program writes a partial sum, and the partials are added in a
  fixed order afterwards: the result is deterministic.  The bias gradient is
  the same reduction of g.
- ``dx = conv_transpose(dz, W)``, an implicit GEMM over rows (sample, input
  pixel) and columns C with K = Cout*k*k; dz is unpooled on the fly from dy,
  y and the winner index, so it is never materialised either.

Block sizes are autotuned per shape on a GPU (``triton.autotune``); the
interpreter, which cannot time kernels, uses each set's first configuration.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ROWS_PER_SPLIT = 1024  # dW: rows of one client summed by one program before the fixed-order reduction

FWD_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4),
               triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8),
               triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8),
               triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4)]
DW_CONFIGS = [triton.Config({"BLOCK_CO": 32, "BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4),
              triton.Config({"BLOCK_CO": 16, "BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4),
              triton.Config({"BLOCK_CO": 32, "BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8),
              triton.Config({"BLOCK_CO": 64, "BLOCK_M": 64, "BLOCK_K": 32}, num_warps=8)]
DX_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4),
              triton.Config({"BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4),
              triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=8),
              triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8)]
SHAPE_KEY = ["B", "C", "H", "W", "COUT", "KS"]


def _autotune(configs):
    """``triton.autotune`` keyed on the shapes; in the interpreter the launcher passes ``configs[0]`` itself."""
    return (lambda kernel: kernel) if INTERPRETED else triton.autotune(configs=configs, key=SHAPE_KEY)


def _blocks(configs) -> dict:
    """Block sizes a launch must pass explicitly (only when interpreted)."""
    return dict(configs[0].kwargs) if INTERPRETED else {}


@triton.jit
def _taps(k_start, kk, KS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Reduction indices k_start + [0, BLOCK_K) over (channel, kh, kw): (index, in range, channel, tap, kh, kw)."""
    rk = k_start + tl.arange(0, BLOCK_K)
    r = rk % (KS * KS)
    return rk, rk < kk, rk // (KS * KS), r, r // KS, r % KS


@triton.jit
def _im2col_tile(x_rows, ci, kh, kw, oy, ox, row_ok, k_ok, H, W, PAD):
    """x values (BLOCK_M, BLOCK_K) feeding output pixels (oy, ox) of each row through taps (ci, kh, kw)."""
    iy = oy[:, None] + kh[None, :] - PAD
    ix = ox[:, None] + kw[None, :] - PAD
    mask = row_ok[:, None] & k_ok[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    return tl.load(x_rows[:, None] + ci[None, :] * H * W + iy * W + ix, mask=mask, other=0.0)


@_autotune(FWD_CONFIGS)
@triton.jit
def _conv_pool_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, win_ptr, B, C, H, W, COUT, HP, WP, PAD,
                          KS: tl.constexpr, SLOPE: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[n, b, co, py, px] = leaky(max over the 2x2 window of conv(x) + bias); rows (b, py, px) of client n."""
    pid_m, pid_n, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kk = C * KS * KS
    hwp = HP * WP
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b, p = m // hwp, m % hwp
    py, px = p // WP, p % WP
    row_ok = m < B * hwp
    x_rows = x_ptr + (n * B + b) * C * H * W  # (BLOCK_M,) each row's image
    w_client = w_ptr + n * COUT * kk
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, kk, BLOCK_K):
        rk, k_ok, ci, r, kh, kw = _taps(k0, kk, KS, BLOCK_K)
        wv = tl.load(w_client + co[None, :] * kk + rk[:, None], mask=k_ok[:, None] & (co[None, :] < COUT),
                     other=0.0)  # (BLOCK_K, BLOCK_N), shared by the four pool positions
        acc0 += tl.dot(_im2col_tile(x_rows, ci, kh, kw, 2 * py, 2 * px, row_ok, k_ok, H, W, PAD), wv,
                       input_precision=PRECISION)
        acc1 += tl.dot(_im2col_tile(x_rows, ci, kh, kw, 2 * py, 2 * px + 1, row_ok, k_ok, H, W, PAD), wv,
                       input_precision=PRECISION)
        acc2 += tl.dot(_im2col_tile(x_rows, ci, kh, kw, 2 * py + 1, 2 * px, row_ok, k_ok, H, W, PAD), wv,
                       input_precision=PRECISION)
        acc3 += tl.dot(_im2col_tile(x_rows, ci, kh, kw, 2 * py + 1, 2 * px + 1, row_ok, k_ok, H, W, PAD), wv,
                       input_precision=PRECISION)
    # the window's maximum in raster order; the first maximum wins, as in PyTorch
    best, winner = acc0, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    take = acc1 > best
    best, winner = tl.where(take, acc1, best), tl.where(take, 1, winner)
    take = acc2 > best
    best, winner = tl.where(take, acc2, best), tl.where(take, 2, winner)
    take = acc3 > best
    best, winner = tl.where(take, acc3, best), tl.where(take, 3, winner)
    best += tl.load(b_ptr + n * COUT + co, mask=co < COUT, other=0.0)[None, :]
    y = tl.where(best > 0, best, best * SLOPE)
    offs = (n * B + b)[:, None] * COUT * hwp + co[None, :] * hwp + p[:, None]
    mask = row_ok[:, None] & (co[None, :] < COUT)
    tl.store(y_ptr + offs, y, mask=mask)
    tl.store(win_ptr + offs, winner.to(tl.int8), mask=mask)


@_autotune(DW_CONFIGS)
@triton.jit
def _conv_dw_kernel(x_ptr, dy_ptr, y_ptr, win_ptr, dw_part_ptr, db_part_ptr, B, C, H, W, COUT, HP, WP, PAD, SPLIT,
                    RPS, KS: tl.constexpr, SLOPE: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_CO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial dW[n, co, k] (and db) over rows [s RPS, (s+1) RPS) of client n; program axis 2 is (n, s)."""
    pid_k, pid_co, ns = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, s = ns // SPLIT, ns % SPLIT
    kk = C * KS * KS
    hwp = HP * WP
    rows = B * hwp
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    rk, k_ok, ci, r, kh, kw = _taps(pid_k * BLOCK_K, kk, KS, BLOCK_K)
    acc = tl.zeros((BLOCK_CO, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    start = s * RPS
    end = tl.minimum(start + RPS, rows)
    for m0 in range(start, end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        row_ok = m < end
        b, p = m // hwp, m % hwp
        py, px = p // WP, p % WP
        offs = (n * B + b)[None, :] * COUT * hwp + co[:, None] * hwp + p[None, :]  # (BLOCK_CO, BLOCK_M)
        mask = (co[:, None] < COUT) & row_ok[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
        yv = tl.load(y_ptr + offs, mask=mask, other=0.0)
        q = tl.load(win_ptr + offs, mask=mask, other=0).to(tl.int32)
        g = tl.where(yv > 0, dy, dy * SLOPE)  # the gradient at each window's winner
        acc_b += tl.sum(g, axis=1)
        x_rows = x_ptr + (n * B + b) * C * H * W
        acc += tl.dot(tl.where(q == 0, g, 0.0),
                      _im2col_tile(x_rows, ci, kh, kw, 2 * py, 2 * px, row_ok, k_ok, H, W, PAD),
                      input_precision=PRECISION)
        acc += tl.dot(tl.where(q == 1, g, 0.0),
                      _im2col_tile(x_rows, ci, kh, kw, 2 * py, 2 * px + 1, row_ok, k_ok, H, W, PAD),
                      input_precision=PRECISION)
        acc += tl.dot(tl.where(q == 2, g, 0.0),
                      _im2col_tile(x_rows, ci, kh, kw, 2 * py + 1, 2 * px, row_ok, k_ok, H, W, PAD),
                      input_precision=PRECISION)
        acc += tl.dot(tl.where(q == 3, g, 0.0),
                      _im2col_tile(x_rows, ci, kh, kw, 2 * py + 1, 2 * px + 1, row_ok, k_ok, H, W, PAD),
                      input_precision=PRECISION)
    tl.store(dw_part_ptr + ns * COUT * kk + co[:, None] * kk + rk[None, :], acc,
             mask=(co[:, None] < COUT) & k_ok[None, :])
    if pid_k == 0:
        tl.store(db_part_ptr + ns * COUT + co, acc_b, mask=co < COUT)


@_autotune(DX_CONFIGS)
@triton.jit
def _conv_dx_kernel(dy_ptr, y_ptr, win_ptr, w_ptr, dx_ptr, B, C, H, W, COUT, HP, WP, PAD,
                    KS: tl.constexpr, SLOPE: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[n, b, ci, iy, ix] = sum over (co, kh, kw) of w[n, co, ci, kh, kw] dz[n, b, co, iy + PAD - kh, ix + PAD - kw].

    dz is unpooled on the fly: g at the window's winner, 0 elsewhere and outside the pooled area.
    """
    pid_m, pid_n, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kk = COUT * KS * KS  # the reduction runs over (co, kh, kw)
    hw, hwp = H * W, HP * WP
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b, pix = m // hw, m % hw
    iy, ix = pix // W, pix % W
    row_ok = m < B * hw
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, kk, BLOCK_K):
        rk, k_ok, co, r, kh, kw = _taps(k0, kk, KS, BLOCK_K)
        oy = iy[:, None] + PAD - kh[None, :]  # (BLOCK_M, BLOCK_K): the conv output pixel each tap reaches
        ox = ix[:, None] + PAD - kw[None, :]
        inside = row_ok[:, None] & k_ok[None, :] & (oy >= 0) & (ox >= 0) & (oy < 2 * HP) & (ox < 2 * WP)
        oy, ox = tl.where(inside, oy, 0), tl.where(inside, ox, 0)
        offs = (n * B + b)[:, None] * COUT * hwp + co[None, :] * hwp + (oy // 2) * WP + ox // 2
        dy = tl.load(dy_ptr + offs, mask=inside, other=0.0)
        yv = tl.load(y_ptr + offs, mask=inside, other=0.0)
        q = tl.load(win_ptr + offs, mask=inside, other=0).to(tl.int32)
        dz = tl.where(inside & (q == (oy % 2) * 2 + ox % 2), tl.where(yv > 0, dy, dy * SLOPE), 0.0)
        wv = tl.load(w_ptr + ((n * COUT + co[:, None]) * C + ci[None, :]) * KS * KS + r[:, None],
                     mask=k_ok[:, None] & (ci[None, :] < C), other=0.0)  # (BLOCK_K, BLOCK_N)
        acc += tl.dot(dz, wv, input_precision=PRECISION)
    tl.store(dx_ptr + (n * B + b)[:, None] * C * hw + ci[None, :] * hw + pix[:, None], acc,
             mask=row_ok[:, None] & (ci[None, :] < C))


class Conv2dLeakyPool(torch.autograd.Function):
    """Fused per-client conv + bias + leaky ReLU (negative slope ``slope``) + 2x2 max-pool (contiguous float32).

    ``precision`` is ``tl.dot``'s input precision ("ieee" or "tf32").
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding: int, slope: float, precision: str):
        n, b, c, h, w = x.shape
        cout, ks = weight.shape[1], weight.shape[-1]
        hp, wp = (h + 2 * padding - ks + 1) // 2, (w + 2 * padding - ks + 1) // 2
        y = torch.empty(n, b, cout, hp, wp, device=x.device, dtype=torch.float32)
        winner = torch.empty(n, b, cout, hp, wp, device=x.device, dtype=torch.int8)

        def grid(meta):
            return triton.cdiv(b * hp * wp, meta["BLOCK_M"]), triton.cdiv(cout, meta["BLOCK_N"]), n

        _conv_pool_fwd_kernel[grid](x, weight, bias, y, winner, b, c, h, w, cout, hp, wp, padding, KS=ks,
                                    SLOPE=slope, PRECISION=precision, **_blocks(FWD_CONFIGS))
        ctx.save_for_backward(x, weight, y, winner)
        ctx.padding, ctx.slope, ctx.precision = padding, slope, precision
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, y, winner = ctx.saved_tensors
        dy = dy.contiguous()
        n, b, c, h, w = x.shape
        cout, ks = weight.shape[1], weight.shape[-1]
        hp, wp = y.shape[-2:]
        shape = (b, c, h, w, cout, hp, wp, ctx.padding)
        dx = dw = db = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            split = triton.cdiv(b * hp * wp, ROWS_PER_SPLIT)
            dw_part = torch.empty(n * split, cout, c * ks * ks, device=x.device, dtype=torch.float32)
            db_part = torch.empty(n * split, cout, device=x.device, dtype=torch.float32)

            def grid(meta):
                return triton.cdiv(c * ks * ks, meta["BLOCK_K"]), triton.cdiv(cout, meta["BLOCK_CO"]), n * split

            _conv_dw_kernel[grid](x, dy, y, winner, dw_part, db_part, *shape, split, ROWS_PER_SPLIT, KS=ks,
                                  SLOPE=ctx.slope, PRECISION=ctx.precision, **_blocks(DW_CONFIGS))
            dw = dw_part.view(n, split, *weight.shape[1:]).sum(1)  # fixed-order sum of the partials
            db = db_part.view(n, split, cout).sum(1)
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)

            def grid(meta):
                return triton.cdiv(b * h * w, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_N"]), n

            _conv_dx_kernel[grid](dy, y, winner, weight, dx, *shape, KS=ks, SLOPE=ctx.slope,
                                  PRECISION=ctx.precision, **_blocks(DX_CONFIGS))
        return dx, dw, db, None, None, None
