"""Batched per-client conv2d + bias -> leaky ReLU -> 2x2 max-pool, fused, forward and backward.

x (N, B, C, H, W), weight (N, Cout, C, k, k), bias (N, Cout) -> y (N, B, Cout, Hp, Wp)
with Hc = H + 2*pad - k + 1 (stride 1) and Hp = Hc // 2 (floor pooling).

**Forward: an implicit GEMM whose rows are pooling windows.**  Each client's convolution has one row per
conv-output pixel that a window pools, ordered window by window: row ``4 j + q`` is position q (raster order)
of pooled pixel j = (sample, py, px).  A program owns BLOCK_M rows (BLOCK_M / 4 whole windows) and BLOCK_N
output channels and keeps **one** accumulator; at the end the tile is reshaped to (windows, Cout, 2, 2) and
split into the four positions, so the window's maximum is taken in registers and the full-resolution conv
output never reaches memory.  Per pooled output it stores y and one int8 *code*: the winning position
(bits 0-1, the first maximum in raster order; a NaN wins as in PyTorch) and whether y > 0 (bit 2, the leaky
ReLU's slope).  Leaky ReLU is increasing, so pool(leaky(z + b)) = leaky(max(z) + b).

**Backward** reads dy and the code only (g = dy * leaky'(y) at the winner, 0 elsewhere):

- ``dW[n] = dzᵀ · im2col(x)`` over the same window rows as the forward.  Each client's rows are split into
  chunks of ``ROWS_PER_SPLIT``; each program writes a partial sum of its chunk, weight and bias gradients side
  by side (``COUT*K + COUT`` values), and one sum over the chunks in a fixed order finishes them, so the result
  is deterministic.
- ``dx = conv_transpose(dz, W)``, tap by tap: for a fixed tap (kh, kw) an input pixel reaches exactly one
  conv-output pixel, so the pooled offset and the window position it must have won are per-row values and the
  gather is an outer sum of a row part and a channel part (no per-element index arithmetic).

Offsets within one client are int32; the client's base offset is int64, so no product overflows however many
clients there are.  Block sizes are autotuned per shape, kernel size, padding and precision
(:mod:`.launch`); every configuration kept here compiles without register spills for sm_80 and sm_90
(``python -m hyperfl_fast.kernels.report``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, tuned

ROWS_PER_SPLIT = 2048  # dW: window rows of one client summed by one program before the fixed-order reduction

# Chosen with the report (sm_90 and sm_80, both precisions, both models): no spills, at most about 200
# registers; one stage because the im2col gathers are plain loads that a deeper pipeline only holds in registers.
FWD_CONFIGS = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=8, num_stages=1),
               triton.Config({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1),
               triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8, num_stages=1)]
DW_CONFIGS = [triton.Config({"BLOCK_CO": 32, "BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1),
              triton.Config({"BLOCK_CO": 32, "BLOCK_M": 64, "BLOCK_K": 32}, num_warps=8, num_stages=1),
              triton.Config({"BLOCK_CO": 16, "BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2)]
DX_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1),
              triton.Config({"BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=8, num_stages=1),
              triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=2, num_stages=1)]
KEY = ["B", "C", "H", "W", "COUT", "KS", "PAD", "PRECISION"]


@triton.jit
def _window_rows(m, HP, WP):
    """Window row m = 4 j + q -> (sample, pooled pixel p, position q, conv-output row oy, column ox)."""
    j = m // 4
    q = m % 4
    b = j // (HP * WP)
    p = j % (HP * WP)
    return b, p, q, 2 * (p // WP) + q // 2, 2 * (p % WP) + q % 2


@triton.jit
def _im2col_tile(x_client, row_off, oy, ox, row_ok, col_off, kh, kw, k_ok, H, W, PAD: tl.constexpr):
    """x values (rows, BLOCK_K) feeding conv-output pixels (oy, ox) through taps (kh, kw): an outer sum of offsets."""
    mask = row_ok[:, None] & k_ok[None, :]
    if PAD > 0:  # without padding every tap of a pooled pixel lies inside the image
        iy = oy[:, None] + kh[None, :] - PAD
        ix = ox[:, None] + kw[None, :] - PAD
        mask = mask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    return tl.load(x_client + row_off[:, None] + col_off[None, :], mask=mask, other=0.0)


@triton.jit
def _taps(k_start, C, H, W, KS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Reduction indices k_start + [0, BLOCK_K) over (channel, kh, kw): (index, in range, x offset, kh, kw)."""
    rk = k_start + tl.arange(0, BLOCK_K)
    ci = rk // (KS * KS)
    r = rk % (KS * KS)
    kh = r // KS
    kw = r % KS
    return rk, rk < C * KS * KS, ci * H * W + kh * W + kw, kh, kw


@tuned(FWD_CONFIGS, KEY)
@triton.jit
def _conv_pool_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, code_ptr, B, C, H, W, COUT, HP, WP,
                          stride_xn, stride_wn, stride_bn,
                          KS: tl.constexpr, PAD: tl.constexpr, SLOPE: tl.constexpr, PRECISION: tl.constexpr,
                          SAVE_CODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """y[n, b, co, p] = leaky(max over window p of conv(x) + bias) and its code, for BLOCK_M / 4 windows."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    x_client = x_ptr + n * stride_xn
    w_client = w_ptr + n * stride_wn
    kk = C * KS * KS
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b, p, q, oy, ox = _window_rows(m, HP, WP)
    row_ok = m < B * HP * WP * 4
    row_off = b * C * H * W + (oy - PAD) * W + ox - PAD
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < COUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, kk, BLOCK_K):
        rk, k_ok, col_off, kh, kw = _taps(k0, C, H, W, KS, BLOCK_K)
        a = _im2col_tile(x_client, row_off, oy, ox, row_ok, col_off, kh, kw, k_ok, H, W, PAD)
        wv = tl.load(w_client + co[None, :] * kk + rk[:, None], mask=k_ok[:, None] & co_ok[None, :], other=0.0)
        acc += tl.dot(a, wv, input_precision=PRECISION)
    # the four positions of each window: (windows, Cout, dy, dx), split into z[dy][dx]
    z = tl.permute(tl.reshape(acc, (BLOCK_M // 4, 2, 2, BLOCK_N)), (0, 3, 1, 2))
    left, right = tl.split(z)  # dx = 0, 1: (windows, Cout, dy)
    z00, z10 = tl.split(left)
    z01, z11 = tl.split(right)
    # PyTorch's rule: a later position wins if it is larger or NaN (so the first maximum, or the last NaN)
    best, winner = z00, tl.zeros((BLOCK_M // 4, BLOCK_N), dtype=tl.int32)
    take = (z01 > best) | (z01 != z01)
    best, winner = tl.where(take, z01, best), tl.where(take, 1, winner)
    take = (z10 > best) | (z10 != z10)
    best, winner = tl.where(take, z10, best), tl.where(take, 2, winner)
    take = (z11 > best) | (z11 != z11)
    best, winner = tl.where(take, z11, best), tl.where(take, 3, winner)
    best += tl.load(b_ptr + n * stride_bn + co, mask=co_ok, other=0.0)[None, :]
    y = tl.where(best > 0, best, best * SLOPE)
    j = pid_m * (BLOCK_M // 4) + tl.arange(0, BLOCK_M // 4)
    hwp = HP * WP
    out = n * B * COUT * hwp + ((j // hwp) * COUT * hwp + j % hwp)[:, None] + co[None, :] * hwp
    mask = (j < B * hwp)[:, None] & co_ok[None, :]
    tl.store(y_ptr + out, y, mask=mask)
    if SAVE_CODE:
        tl.store(code_ptr + out, (winner + tl.where(best > 0, 4, 0)).to(tl.int8), mask=mask)


@triton.jit
def _winner_gradient(dy_ptr, code_ptr, offs, mask, q, SLOPE: tl.constexpr):
    """dz at the given conv-output pixels: dy * leaky'(y) where the pixel won window position q, else 0."""
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
    code = tl.load(code_ptr + offs, mask=mask, other=0).to(tl.int32)
    g = tl.where((code & 4) != 0, dy, dy * SLOPE)
    return tl.where((code & 3) == q, g, 0.0)


@tuned(DW_CONFIGS, KEY)
@triton.jit
def _conv_dw_kernel(x_ptr, dy_ptr, code_ptr, part_ptr, B, C, H, W, COUT, HP, WP, stride_xn, SPLIT, RPS,
                    KS: tl.constexpr, PAD: tl.constexpr, SLOPE: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_CO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial [dW | db] of client n over window rows [s RPS, (s+1) RPS); program axis 2 is (n, s)."""
    pid_k, pid_co, ns = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = (ns // SPLIT).to(tl.int64)
    s = ns % SPLIT
    x_client = x_ptr + n * stride_xn
    hwp = HP * WP
    pooled_client = n * B * COUT * hwp
    kk = C * KS * KS
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < COUT
    rk, k_ok, col_off, kh, kw = _taps(pid_k * BLOCK_K, C, H, W, KS, BLOCK_K)  # fixed for the program
    acc = tl.zeros((BLOCK_CO, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    start = s * RPS
    end = tl.minimum(start + RPS, B * hwp * 4)
    for m0 in range(start, end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        row_ok = m < end
        b, p, q, oy, ox = _window_rows(m, HP, WP)
        offs = pooled_client + (b * COUT * hwp + p)[None, :] + co[:, None] * hwp  # (BLOCK_CO, BLOCK_M)
        dz = _winner_gradient(dy_ptr, code_ptr, offs, co_ok[:, None] & row_ok[None, :], q[None, :], SLOPE)
        acc_b += tl.sum(dz, axis=1)
        row_off = b * C * H * W + (oy - PAD) * W + ox - PAD
        a = _im2col_tile(x_client, row_off, oy, ox, row_ok, col_off, kh, kw, k_ok, H, W, PAD)
        acc += tl.dot(dz, a, input_precision=PRECISION)
    part = part_ptr + ns.to(tl.int64) * (COUT * kk + COUT)
    tl.store(part + co[:, None] * kk + rk[None, :], acc, mask=co_ok[:, None] & k_ok[None, :])
    if pid_k == 0:
        tl.store(part + COUT * kk + co, acc_b, mask=co_ok)


@tuned(DX_CONFIGS, KEY)
@triton.jit
def _conv_dx_kernel(dy_ptr, code_ptr, w_ptr, dx_ptr, B, C, H, W, COUT, HP, WP, stride_wn,
                    KS: tl.constexpr, PAD: tl.constexpr, SLOPE: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[n, b, ci, iy, ix] = sum over taps (kh, kw) and channels co of w[n, co, ci, kh, kw] dz[n, b, co, oy, ox],
    (oy, ox) = (iy + PAD - kh, ix + PAD - kw); rows (b, iy, ix), columns ci, reduction over co per tap."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    w_client = w_ptr + n * stride_wn
    hw, hwp = H * W, HP * WP
    pooled_client = n * B * COUT * hwp
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = m < B * hw
    b = m // hw
    pix = m % hw
    iy = pix // W
    ix = pix % W
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = ci < C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(0, KS * KS):
        oy = iy + PAD - tap // KS
        ox = ix + PAD - tap % KS
        inside = row_ok & (oy >= 0) & (ox >= 0) & (oy < 2 * HP) & (ox < 2 * WP)
        oy = tl.where(inside, oy, 0)
        ox = tl.where(inside, ox, 0)
        row_off = pooled_client + b * COUT * hwp + (oy // 2) * WP + ox // 2
        q = (oy % 2) * 2 + ox % 2  # the window position this pixel must have won
        for co0 in range(0, COUT, BLOCK_K):
            co = co0 + tl.arange(0, BLOCK_K)
            co_ok = co < COUT
            dz = _winner_gradient(dy_ptr, code_ptr, row_off[:, None] + co[None, :] * hwp,
                                  inside[:, None] & co_ok[None, :], q[:, None], SLOPE)
            wv = tl.load(w_client + (co[:, None] * C + ci[None, :]) * (KS * KS) + tap,
                         mask=co_ok[:, None] & ci_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
            acc += tl.dot(dz, wv, input_precision=PRECISION)
    out = n * B * C * hw + (b * C * hw + pix)[:, None] + ci[None, :] * hw
    tl.store(dx_ptr + out, acc, mask=row_ok[:, None] & ci_ok[None, :])


def _pooled_size(h: int, w: int, ks: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - ks + 1) // 2, (w + 2 * padding - ks + 1) // 2


def conv_pool_forward(x, weight, bias, padding: int, slope: float, precision: str, save_code: bool = True):
    """(y, code) of the fused forward; x's and weight's per-client blocks contiguous, any client stride."""
    n, b, c, h, w = x.shape
    cout, ks = weight.shape[1], weight.shape[-1]
    hp, wp = _pooled_size(h, w, ks, padding)
    y = torch.empty(n, b, cout, hp, wp, device=x.device, dtype=torch.float32)
    code = torch.empty(n, b, cout, hp, wp, device=x.device, dtype=torch.int8) if save_code else y

    def grid(meta):
        return triton.cdiv(b * hp * wp * 4, meta["BLOCK_M"]), triton.cdiv(cout, meta["BLOCK_N"]), n

    launch(_conv_pool_fwd_kernel, grid, x, weight, bias, y, code, b, c, h, w, cout, hp, wp,
           x.stride(0), weight.stride(0), bias.stride(0), KS=ks, PAD=padding, SLOPE=slope, PRECISION=precision,
           SAVE_CODE=save_code)
    return y, (code if save_code else None)


def conv_pool_weight_grad(x, dy, code, cout: int, ks: int, padding: int, slope: float, precision: str):
    """(dW (N, Cout, C, k, k), db (N, Cout)) from the window rows, in ceil(rows / ROWS_PER_SPLIT) chunks."""
    n, b, c, h, w = x.shape
    hp, wp = dy.shape[-2:]
    kk = c * ks * ks
    split = triton.cdiv(b * hp * wp * 4, ROWS_PER_SPLIT)
    part = torch.empty(n * split, cout * kk + cout, device=x.device, dtype=torch.float32)

    def grid(meta):
        return triton.cdiv(kk, meta["BLOCK_K"]), triton.cdiv(cout, meta["BLOCK_CO"]), n * split

    launch(_conv_dw_kernel, grid, x, dy, code, part, b, c, h, w, cout, hp, wp, x.stride(0), split, ROWS_PER_SPLIT,
           KS=ks, PAD=padding, SLOPE=slope, PRECISION=precision)
    full = part.view(n, split, -1).sum(1) if split > 1 else part  # the chunks' partials, in a fixed order
    return full[:, :cout * kk].view(n, cout, c, ks, ks), full[:, cout * kk:]


def conv_pool_input_grad(dy, code, weight, x_shape, padding: int, slope: float, precision: str):
    """dx (N, B, C, H, W): the transposed convolution of the unpooled gradient, tap by tap."""
    n, b, c, h, w = x_shape
    cout, ks = weight.shape[1], weight.shape[-1]
    hp, wp = dy.shape[-2:]
    dx = torch.empty(x_shape, device=dy.device, dtype=torch.float32)

    def grid(meta):
        return triton.cdiv(b * h * w, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_N"]), n

    launch(_conv_dx_kernel, grid, dy, code, weight, dx, b, c, h, w, cout, hp, wp, weight.stride(0), KS=ks,
           PAD=padding, SLOPE=slope, PRECISION=precision)
    return dx


class Conv2dLeakyPool(torch.autograd.Function):
    """Fused per-client conv + bias + leaky ReLU (negative slope ``slope``) + 2x2 max-pool, float32.

    ``precision`` is ``tl.dot``'s input precision ("ieee" or "tf32").  x, weight and bias need contiguous
    per-client blocks (any stride between clients, e.g. views of one flat theta).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding: int, slope: float, precision: str):
        save = any(ctx.needs_input_grad[:3])
        y, code = conv_pool_forward(x, weight, bias, padding, slope, precision, save_code=save)
        if save:
            ctx.save_for_backward(x, weight, code)
        ctx.padding, ctx.slope, ctx.precision = padding, slope, precision
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, code = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw, db = conv_pool_weight_grad(x, dy, code, weight.shape[1], weight.shape[-1], ctx.padding, ctx.slope,
                                           ctx.precision)
        if ctx.needs_input_grad[0]:
            dx = conv_pool_input_grad(dy, code, weight, x.shape, ctx.padding, ctx.slope, ctx.precision)
        return dx, dw, db, None, None, None
