"""Triton kernels of the RL losses: kl_penalty, ppo_policy_loss, value_loss.

Cost model, (B, T) inputs of b bytes each (mask 1 byte), per token. The ops are element-wise with a
handful of flops per token, so on a GPU they are bound by bytes moved and, at RL batch sizes
((64, 2048) = 131k tokens, ~1 MB per bf16 input), by kernel launches: the eager reference of
ppo_policy_loss launches ~40 kernels forward and backward, each a pass over a (B, T) fp32
temporary (~8 bytes per token each, ~300 bytes per token in all).

  kl_penalty       forward  reads 2b, writes 4 (+ 4: dk/dx, only when a gradient is needed)  (1 launch)
  ppo_policy_loss  forward  reads 3b + 1, writes 4 (per-token gradient, only when needed)
                            + 32 bytes of partial sums per tile  (2 launches: tiles, finalize)
  value_loss       as ppo_policy_loss, 28 bytes of partials per tile
  every backward   a PyTorch multiply of the saved derivative by the upstream gradient: reads
                   4 + 4, writes b (rlhf_fast/ops/_aggregation.py, kl_penalty.py); no kernel here

The loss kernels compute everything in one pass: the per-token loss, its gradient m * dl/dx (the
loss is a scalar, so the gradient is known in the forward), and per-tile partial sums of the loss
and of every statistic. A one-program finalize kernel combines the tiles in a fixed order (no
atomics: results are deterministic) into the loss, the statistics, and one aggregation weight per
sequence w_b; the backward is grad = token_grad * (grad_loss * w_b).

The formulas and the defined values follow csrc/include/rlhf_fast/ppo_losses_math.h (shared by the
CPU and CUDA kernels): masked positions become zeros before any math (whatever they hold cannot
reach a sum or the gradient); k3 near 0 comes from a Taylor series, without cancellation; the
value loss keeps per-tile moments (count, mean, sum of squared deviations from the tile mean, two
passes over the tile in registers) merged with Chan's formula, so the explained variance does not
suffer E[x^2] - E[x]^2 cancellation. Cross-tile sums are fp32 here (fp64 on CPU and CUDA): counts
stay exact up to 2^24 valid tokens per call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Codes shared with the native kernels (ppo::Estimator, ppo::Aggregation in ppo_losses_math.h).
K1, ABS, K2, K3 = 0, 1, 2, 3
AGG_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_SUM, AGG_SEQ_MEAN_TOKEN_SUM_NORM = 0, 1, 2, 3
# Partial sums per tile (ppo::PolicyPartial / ppo::ValuePartial) and statistics per loss.
POLICY_PARTIALS, VALUE_PARTIALS = 8, 7
POLICY_STATS, VALUE_STATS = 6, 2

# Tuning. Element-wise kernels and the loss tiles: one program per (row, block of columns), 8
# elements per thread (two 128-bit loads of bf16 or fp32 in flight per input), so a 2048-column
# block runs on 8 warps; four inputs and ~12 live fp32 values per element stay well under 128
# registers (rlhf-fast inspect). The finalize kernel is one program of 4 warps
# walking the tiles in blocks of FINALIZE_BLOCK.
MAX_BLOCK = 2048
ELEMS_PER_THREAD = 8
MAX_NUM_WARPS = 8
FINALIZE_BLOCK = 256
FINALIZE_WARPS = 4
NUM_STAGES = 1  # no tl.dot, no loop to pipeline
MAX_GRID_Y = 65535  # grid axis 1 (blocks of a row) is limited by CUDA


def launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of n_cols elements: next_power_of_2(n_cols) capped at MAX_BLOCK,
    ELEMS_PER_THREAD elements per thread."""
    block = min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK)
    return block, min(max(block // (32 * ELEMS_PER_THREAD), 1), MAX_NUM_WARPS)


# ---------------------------------------------------------------------------------------------
# Per-token math (ppo_losses_math.h)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _exp_parts(y):
    """(e^y, e^y - 1, e^y - 1 - y); the last two from the Taylor series for |y| < 1/2."""
    p = y * (1.0 / 3628800.0) + (1.0 / 362880.0)
    p = p * y + (1.0 / 40320.0)
    p = p * y + (1.0 / 5040.0)
    p = p * y + (1.0 / 720.0)
    p = p * y + (1.0 / 120.0)
    p = p * y + (1.0 / 24.0)
    p = p * y + (1.0 / 6.0)
    p = p * y + 0.5
    series = y * y * p
    e = tl.exp(y)
    small = tl.abs(y) < 0.5
    em1 = tl.where(small, y + series, e - 1.0)
    return e, em1, tl.where(small, series, (e - 1.0) - y)


@triton.jit
def _kl_token(x, clamp, cap, ESTIMATOR: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_CAP: tl.constexpr):
    """(kl, d kl / d logprobs) at x = logprobs - ref_logprobs: x clamped to [-clamp, clamp] when
    HAS_CLAMP, the value to [-cap, cap] when HAS_CAP, the derivative 0 where either is active."""
    if HAS_CLAMP:
        active = tl.abs(x) > clamp
        x = tl.where(x > clamp, clamp, tl.where(x < -clamp, -clamp, x))
    if ESTIMATOR == 0:  # k1
        kl = x
        dkl = tl.full(x.shape, 1.0, tl.float32)
    elif ESTIMATOR == 1:  # abs
        kl = tl.abs(x)
        dkl = tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))
    elif ESTIMATOR == 2:  # k2
        kl = 0.5 * x * x
        dkl = x
    else:  # k3 = e^-x - 1 + x, derivative 1 - e^-x
        _, em1, q = _exp_parts(-x)
        kl = q
        dkl = -em1
    if HAS_CLAMP:
        dkl = tl.where(active, 0.0, dkl)
    if HAS_CAP:  # an exploding k3 (inf past x = -88) becomes cap, with derivative 0 (not -inf)
        over = (kl > cap) | (kl < -cap)
        kl = tl.where(kl > cap, cap, tl.where(kl < -cap, -cap, kl))
        dkl = tl.where(over, 0.0, dkl)
    return kl, dkl


@triton.jit
def _masked_tile(a_ptr, b_ptr, c_ptr, mask_ptr, row, cols, inb, stride_a_r, stride_a_c, stride_b_r, stride_b_c,
                 stride_c_r, stride_c_c, stride_m_r, stride_m_c):
    """Columns `cols` (in bounds where `inb`) of row `row` of three (B, T) inputs and their mask, as fp32:
    (m, m != 0, a, b, c). Masked positions and lanes past T read as 0: whatever they hold cannot reach a
    sum."""
    m = tl.load(mask_ptr + row * stride_m_r + cols * stride_m_c, mask=inb, other=0).to(tl.float32)
    valid = m != 0.0
    a = tl.where(valid, tl.load(a_ptr + row * stride_a_r + cols * stride_a_c, mask=inb, other=0.0).to(tl.float32), 0.0)
    b = tl.where(valid, tl.load(b_ptr + row * stride_b_r + cols * stride_b_c, mask=inb, other=0.0).to(tl.float32), 0.0)
    c = tl.where(valid, tl.load(c_ptr + row * stride_c_r + cols * stride_c_c, mask=inb, other=0.0).to(tl.float32), 0.0)
    return m, valid, a, b, c


@triton.jit
def _policy_token(lp, old, adv, ratio_low, ratio_high, dual_clip, log_ratio_clamp, HAS_DUAL: tl.constexpr,
                  HAS_LOG_RATIO_CLAMP: tl.constexpr, CISPO: tl.constexpr):
    """(loss, grad, clipped, dual_clipped, k3, ratio) of valid tokens (see ppo::policy_token)."""
    d = lp - old
    if HAS_LOG_RATIO_CLAMP:  # before exp; the ratio is constant (gradient 0) outside the range
        clamped = tl.abs(d) > log_ratio_clamp
        d = tl.where(d > log_ratio_clamp, log_ratio_clamp, tl.where(d < -log_ratio_clamp, -log_ratio_clamp, d))
    r, _, k3 = _exp_parts(d)
    neg_adv = 0.0 - adv
    if CISPO:  # the capped ratio is a constant weight: no clamp stops the gradient
        g = neg_adv * tl.minimum(r, ratio_high)
        return g * lp, g, tl.where(r > ratio_high, 1.0, 0.0), tl.zeros_like(g), k3, r
    l1 = neg_adv * r
    l2 = neg_adv * tl.minimum(tl.maximum(r, ratio_low), ratio_high)
    clipped = l2 > l1
    loss = tl.maximum(l1, l2)
    grad = tl.where(clipped, 0.0, l1)  # d(-A e^d)/dd = l1
    if HAS_LOG_RATIO_CLAMP:
        grad = tl.where(clamped, 0.0, grad)
    dual = tl.zeros_like(loss)
    if HAS_DUAL:
        l3 = neg_adv * dual_clip
        on = (adv < 0.0) & (loss > l3)
        loss = tl.where(on, l3, loss)
        grad = tl.where(on, 0.0, grad)
        dual = tl.where(on, 1.0, 0.0)
    return loss, grad, tl.where(clipped, 1.0, 0.0), dual, k3, r


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _kl_penalty_fwd_kernel(
    lp_ptr,       # (R, C) fp32/bf16/fp16, element (i, j) at lp_ptr + i * stride_lp_r + j * stride_lp_c
    ref_ptr,      # (R, C) fp32/bf16/fp16, own strides
    kl_ptr,       # (R, C) fp32 out, contiguous
    dkl_ptr,      # (R, C) fp32 out, contiguous: dk/dx; only written when NEED_GRAD
    stride_lp_r, stride_lp_c, stride_ref_r, stride_ref_c,
    n_cols,       # C
    clamp,        # > 0, read only when HAS_CLAMP
    cap,          # > 0, read only when HAS_CAP
    ESTIMATOR: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_CAP: tl.constexpr, NEED_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 long before R does
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = cols < n_cols
    lp = tl.load(lp_ptr + row * stride_lp_r + cols * stride_lp_c, mask=inb, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + row * stride_ref_r + cols * stride_ref_c, mask=inb, other=0.0).to(tl.float32)
    kl, dkl = _kl_token(lp - ref, clamp, cap, ESTIMATOR, HAS_CLAMP, HAS_CAP)
    tl.store(kl_ptr + row * n_cols + cols, kl, mask=inb)
    if NEED_GRAD:
        tl.store(dkl_ptr + row * n_cols + cols, dkl, mask=inb)


@triton.jit
def _ppo_policy_loss_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr,  # (B, T) fp32/bf16/fp16 each, own strides
    mask_ptr,                  # (B, T) bool or fp32/bf16/fp16
    partials_ptr,              # (B, n_tiles, POLICY_PARTIALS) fp32 out, tile = program_id(1)
    token_grad_ptr,            # (B, T) fp32 out, contiguous: m * dl/dlogprobs; only when NEED_GRAD
    stride_lp_r, stride_lp_c, stride_old_r, stride_old_c, stride_adv_r, stride_adv_c, stride_m_r, stride_m_c,
    n_cols,                    # T
    ratio_low, ratio_high,     # 1 - eps_low, 1 + eps_high
    dual_clip,                 # c > 1, read only when HAS_DUAL
    log_ratio_clamp,           # > 0, read only when HAS_LOG_RATIO_CLAMP
    HAS_DUAL: tl.constexpr, HAS_LOG_RATIO_CLAMP: tl.constexpr, CISPO: tl.constexpr, NEED_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    inb = cols < n_cols
    m, valid, lp, old, adv = _masked_tile(
        lp_ptr, old_ptr, adv_ptr, mask_ptr, row, cols, inb,
        stride_lp_r, stride_lp_c, stride_old_r, stride_old_c, stride_adv_r, stride_adv_c, stride_m_r, stride_m_c)
    loss, grad, clipped, dual, k3, ratio = _policy_token(lp, old, adv, ratio_low, ratio_high, dual_clip,
                                                         log_ratio_clamp, HAS_DUAL, HAS_LOG_RATIO_CLAMP, CISPO)
    if NEED_GRAD:
        tl.store(token_grad_ptr + row * n_cols + cols, m * grad, mask=inb)
    out = partials_ptr + (row * tl.num_programs(1) + tile) * 8
    tl.store(out + 0, tl.sum(m * loss, axis=0))
    tl.store(out + 1, tl.sum(m, axis=0))
    tl.store(out + 2, tl.sum(m * clipped, axis=0))
    tl.store(out + 3, tl.sum(m * dual, axis=0))
    tl.store(out + 4, tl.sum(m * k3, axis=0))
    tl.store(out + 5, tl.sum(m * ratio, axis=0))
    tl.store(out + 6, tl.min(tl.where(valid, ratio, float("inf")), axis=0))
    tl.store(out + 7, tl.max(tl.where(valid, ratio, float("-inf")), axis=0))


@triton.jit
def _value_loss_fwd_kernel(
    v_ptr, old_ptr, ret_ptr,  # (B, T) fp32/bf16/fp16 each, own strides
    mask_ptr,                 # (B, T) bool or fp32/bf16/fp16
    partials_ptr,             # (B, n_tiles, VALUE_PARTIALS) fp32 out
    token_grad_ptr,           # (B, T) fp32 out, contiguous: m * dl/dvalues; only when NEED_GRAD
    stride_v_r, stride_v_c, stride_old_r, stride_old_c, stride_ret_r, stride_ret_c, stride_m_r, stride_m_c,
    n_cols, clip_eps,
    NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    inb = cols < n_cols
    m, valid, v, v_old, ret = _masked_tile(
        v_ptr, old_ptr, ret_ptr, mask_ptr, row, cols, inb,
        stride_v_r, stride_v_c, stride_old_r, stride_old_c, stride_ret_r, stride_ret_c, stride_m_r, stride_m_c)
    # ppo::value_token
    v_clipped = tl.minimum(tl.maximum(v, v_old - clip_eps), v_old + clip_eps)
    e1 = v - ret
    e2 = v_clipped - ret
    l1 = e1 * e1
    l2 = e2 * e2
    clipped = l2 > l1
    loss = 0.5 * tl.maximum(l1, l2)
    if NEED_GRAD:
        tl.store(token_grad_ptr + row * n_cols + cols, m * tl.where(clipped, 0.0, e1), mask=inb)
    # moments of R and of R - v over the tile: two passes over the registers
    count = tl.sum(m, axis=0)
    safe = tl.where(count != 0.0, count, 1.0)
    err = ret - v
    mean_ret = tl.sum(m * ret, axis=0) / safe
    mean_err = tl.sum(m * err, axis=0) / safe
    d_ret = tl.where(valid, ret - mean_ret, 0.0)
    d_err = tl.where(valid, err - mean_err, 0.0)
    out = partials_ptr + (row * tl.num_programs(1) + tile) * 7
    tl.store(out + 0, tl.sum(m * loss, axis=0))
    tl.store(out + 1, count)
    tl.store(out + 2, tl.sum(m * tl.where(clipped, 1.0, 0.0), axis=0))
    tl.store(out + 3, mean_ret)
    tl.store(out + 4, tl.sum(m * d_ret * d_ret, axis=0))
    tl.store(out + 5, mean_err)
    tl.store(out + 6, tl.sum(m * d_err * d_err, axis=0))


@triton.jit
def _ppo_loss_finalize_kernel(
    partials_ptr,   # (n_rows, per_row, N_PARTIALS) fp32, from a *_fwd_kernel
    loss_ptr,       # () fp32 out
    stats_ptr,      # (POLICY_STATS or VALUE_STATS,) fp32 out
    row_scale_ptr,  # (n_rows,) fp32 out: w_b
    num_items_ptr,  # () any real dtype, read only when NUM_ITEMS_FROM_PTR
    n_rows, per_row,
    num_items,      # >= 0: the divisor given as a number; < 0: not given (unless NUM_ITEMS_FROM_PTR)
    norm_length,    # L of seq-mean-token-sum-norm
    AGGREGATION: tl.constexpr, IS_VALUE: tl.constexpr, N_PARTIALS: tl.constexpr,
    NUM_ITEMS_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    # 1. tokens per row -> total tokens and rows with tokens
    total = tl.full((), 0.0, tl.float32)
    rows_with_tokens = tl.full((), 0.0, tl.float32)
    for b0 in range(0, n_rows, BLOCK):
        rows = (b0 + offs).to(tl.int64)
        rmask = rows < n_rows
        tokens = tl.zeros((BLOCK,), tl.float32)
        for j in range(0, per_row):
            tokens += tl.load(partials_ptr + (rows * per_row + j) * N_PARTIALS + 1, mask=rmask, other=0.0)
        total += tl.sum(tokens, axis=0)
        rows_with_tokens += tl.sum(tl.where(tokens > 0.0, 1.0, 0.0), axis=0)
    # 2. the divisor (ppo::agg_divisor)
    if NUM_ITEMS_FROM_PTR:
        items = tl.load(num_items_ptr).to(tl.float32)
    else:
        items = num_items * 1.0
    given = items >= 0.0
    n_rows_f = n_rows * 1.0
    if AGGREGATION == 0:
        divisor = tl.where(given, items, total)
    elif AGGREGATION == 1:
        divisor = tl.where(given, items, rows_with_tokens)
    elif AGGREGATION == 2:
        divisor = tl.where(given, items, n_rows_f)
    else:
        divisor = tl.where(given, items, n_rows_f) * norm_length
    # 3. row weights (ppo::row_weight) and the loss, rows in order
    loss = tl.full((), 0.0, tl.float32)
    for b0 in range(0, n_rows, BLOCK):
        rows = (b0 + offs).to(tl.int64)
        rmask = rows < n_rows
        tokens = tl.zeros((BLOCK,), tl.float32)
        row_loss = tl.zeros((BLOCK,), tl.float32)
        for j in range(0, per_row):
            base = partials_ptr + (rows * per_row + j) * N_PARTIALS
            row_loss += tl.load(base, mask=rmask, other=0.0)
            tokens += tl.load(base + 1, mask=rmask, other=0.0)
        if AGGREGATION == 1:
            d = divisor * tokens
        else:
            d = tl.zeros((BLOCK,), tl.float32) + divisor
        w = tl.where(d != 0.0, 1.0 / tl.where(d != 0.0, d, 1.0), 0.0)
        tl.store(row_scale_ptr + rows, w, mask=rmask)
        loss += tl.sum(w * row_loss, axis=0)
    tl.store(loss_ptr, loss)
    # 4. statistics over all tiles
    n_tiles = n_rows * per_row
    if IS_VALUE:
        # weighted moments of R and R - v, merged block by block with Chan's formula
        n = tl.full((), 0.0, tl.float32)
        clipped = tl.full((), 0.0, tl.float32)
        mean_r = tl.full((), 0.0, tl.float32)
        m2_r = tl.full((), 0.0, tl.float32)
        mean_e = tl.full((), 0.0, tl.float32)
        m2_e = tl.full((), 0.0, tl.float32)
        for t0 in range(0, n_tiles, BLOCK):
            idx = (t0 + offs).to(tl.int64)
            tmask = idx < n_tiles
            base = partials_ptr + idx * N_PARTIALS
            cnt = tl.load(base + 1, mask=tmask, other=0.0)
            clipped += tl.sum(tl.load(base + 2, mask=tmask, other=0.0), axis=0)
            bn = tl.sum(cnt, axis=0)
            inv_bn = tl.where(bn > 0.0, 1.0 / tl.where(bn > 0.0, bn, 1.0), 0.0)
            tot = n + bn
            inv_tot = tl.where(tot > 0.0, 1.0 / tl.where(tot > 0.0, tot, 1.0), 0.0)
            tm = tl.load(base + 3, mask=tmask, other=0.0)
            bm = tl.sum(cnt * tm, axis=0) * inv_bn
            bm2 = tl.sum(tl.load(base + 4, mask=tmask, other=0.0) + cnt * (tm - bm) * (tm - bm), axis=0)
            delta = bm - mean_r
            mean_r = mean_r + delta * bn * inv_tot
            m2_r = m2_r + bm2 + delta * delta * n * bn * inv_tot
            tm = tl.load(base + 5, mask=tmask, other=0.0)
            bm = tl.sum(cnt * tm, axis=0) * inv_bn
            bm2 = tl.sum(tl.load(base + 6, mask=tmask, other=0.0) + cnt * (tm - bm) * (tm - bm), axis=0)
            delta = bm - mean_e
            mean_e = mean_e + delta * bn * inv_tot
            m2_e = m2_e + bm2 + delta * delta * n * bn * inv_tot
            n = tot
        inv_n = tl.where(n != 0.0, 1.0 / tl.where(n != 0.0, n, 1.0), 0.0)
        var_r = m2_r * inv_n
        var_e = m2_e * inv_n
        tl.store(stats_ptr + 0, clipped * inv_n)
        tl.store(stats_ptr + 1, tl.where(var_r > 0.0, 1.0 - var_e / tl.where(var_r > 0.0, var_r, 1.0), 0.0))
    else:
        s1 = tl.full((), 0.0, tl.float32)
        s2 = tl.full((), 0.0, tl.float32)
        s3 = tl.full((), 0.0, tl.float32)
        s4 = tl.full((), 0.0, tl.float32)
        s5 = tl.full((), 0.0, tl.float32)
        r_min = tl.full((), float("inf"), tl.float32)
        r_max = tl.full((), float("-inf"), tl.float32)
        for t0 in range(0, n_tiles, BLOCK):
            idx = (t0 + offs).to(tl.int64)
            tmask = idx < n_tiles
            base = partials_ptr + idx * N_PARTIALS
            s1 += tl.sum(tl.load(base + 1, mask=tmask, other=0.0), axis=0)
            s2 += tl.sum(tl.load(base + 2, mask=tmask, other=0.0), axis=0)
            s3 += tl.sum(tl.load(base + 3, mask=tmask, other=0.0), axis=0)
            s4 += tl.sum(tl.load(base + 4, mask=tmask, other=0.0), axis=0)
            s5 += tl.sum(tl.load(base + 5, mask=tmask, other=0.0), axis=0)
            r_min = tl.minimum(r_min, tl.min(tl.load(base + 6, mask=tmask, other=float("inf")), axis=0))
            r_max = tl.maximum(r_max, tl.max(tl.load(base + 7, mask=tmask, other=float("-inf")), axis=0))
        inv_n = tl.where(s1 != 0.0, 1.0 / tl.where(s1 != 0.0, s1, 1.0), 0.0)
        any_valid = r_min <= r_max
        tl.store(stats_ptr + 0, s2 * inv_n)
        tl.store(stats_ptr + 1, s3 * inv_n)
        tl.store(stats_ptr + 2, s4 * inv_n)
        tl.store(stats_ptr + 3, s5 * inv_n)
        tl.store(stats_ptr + 4, tl.where(any_valid, r_min, 0.0))
        tl.store(stats_ptr + 5, tl.where(any_valid, r_max, 0.0))


# ---------------------------------------------------------------------------------------------
# Launch arguments: one builder per kernel, used by the launchers and by aot_specs(), so the
# configurations compiled ahead of time are the ones that run.
# ---------------------------------------------------------------------------------------------

def _strides(t):
    return t.stride(0), t.stride(1)


def _grid(n_rows, n_cols, block):
    tiles = triton.cdiv(n_cols, block)
    if tiles > MAX_GRID_Y:
        raise ValueError(f"T = {n_cols} needs {tiles} blocks of {block} per row, more than the grid allows "
                         f"({MAX_GRID_Y})")
    return (n_rows, tiles)


def _kl_fwd_launch(lp, ref, kl, dkl, estimator, clamp, cap=None):
    n_rows, n_cols = lp.shape
    block, warps = launch_config(n_cols)
    args = dict(lp_ptr=lp, ref_ptr=ref, kl_ptr=kl, dkl_ptr=dkl if dkl is not None else kl,  # unread placeholder
                stride_lp_r=lp.stride(0), stride_lp_c=lp.stride(1), stride_ref_r=ref.stride(0),
                stride_ref_c=ref.stride(1), n_cols=n_cols, clamp=float(clamp) if clamp is not None else 1.0,
                cap=float(cap) if cap is not None else 1.0)
    constexprs = dict(ESTIMATOR=estimator, HAS_CLAMP=clamp is not None, HAS_CAP=cap is not None,
                      NEED_GRAD=dkl is not None, BLOCK=block)
    return args, constexprs, warps, _grid(n_rows, n_cols, block)


def _policy_fwd_launch(lp, old, adv, mask, partials, token_grad, eps_low, eps_high, dual_clip, log_ratio_clamp,
                       cispo=False):
    n_rows, n_cols = lp.shape
    block, warps = launch_config(n_cols)
    args = dict(lp_ptr=lp, old_ptr=old, adv_ptr=adv, mask_ptr=mask, partials_ptr=partials,
                token_grad_ptr=token_grad if token_grad is not None else partials,  # unread placeholder
                stride_lp_r=lp.stride(0), stride_lp_c=lp.stride(1), stride_old_r=old.stride(0),
                stride_old_c=old.stride(1), stride_adv_r=adv.stride(0), stride_adv_c=adv.stride(1),
                stride_m_r=mask.stride(0), stride_m_c=mask.stride(1), n_cols=n_cols,
                # 1 - eps and 1 + eps rounded to fp32 as the reference's ratio.clamp(1 - eps, 1 + eps)
                ratio_low=1.0 - eps_low, ratio_high=1.0 + eps_high,
                dual_clip=float(dual_clip) if dual_clip is not None else 2.0,
                log_ratio_clamp=float(log_ratio_clamp) if log_ratio_clamp is not None else 1.0)
    constexprs = dict(HAS_DUAL=dual_clip is not None, HAS_LOG_RATIO_CLAMP=log_ratio_clamp is not None,
                      CISPO=bool(cispo), NEED_GRAD=token_grad is not None, BLOCK=block)
    return args, constexprs, warps, _grid(n_rows, n_cols, block)


def _value_fwd_launch(v, old, ret, mask, partials, token_grad, clip_eps):
    n_rows, n_cols = v.shape
    block, warps = launch_config(n_cols)
    args = dict(v_ptr=v, old_ptr=old, ret_ptr=ret, mask_ptr=mask, partials_ptr=partials,
                token_grad_ptr=token_grad if token_grad is not None else partials,
                stride_v_r=v.stride(0), stride_v_c=v.stride(1), stride_old_r=old.stride(0),
                stride_old_c=old.stride(1), stride_ret_r=ret.stride(0), stride_ret_c=ret.stride(1),
                stride_m_r=mask.stride(0), stride_m_c=mask.stride(1), n_cols=n_cols, clip_eps=float(clip_eps))
    constexprs = dict(NEED_GRAD=token_grad is not None, BLOCK=block)
    return args, constexprs, warps, _grid(n_rows, n_cols, block)


def _finalize_launch(partials, loss, stats, row_scale, num_items, num_items_int, n_rows, per_row, norm_length,
                     aggregation, is_value):
    args = dict(partials_ptr=partials, loss_ptr=loss, stats_ptr=stats, row_scale_ptr=row_scale,
                num_items_ptr=num_items if num_items is not None else loss,  # unread placeholder
                n_rows=n_rows, per_row=per_row, num_items=float(num_items_int), norm_length=float(norm_length))
    constexprs = dict(AGGREGATION=aggregation, IS_VALUE=is_value,
                      N_PARTIALS=VALUE_PARTIALS if is_value else POLICY_PARTIALS,
                      NUM_ITEMS_FROM_PTR=num_items is not None, BLOCK=FINALIZE_BLOCK)
    return args, constexprs, FINALIZE_WARPS, (1,)


# ---------------------------------------------------------------------------------------------
# Launchers (called by rlhf_fast/ops/{kl_penalty,ppo_policy_loss,value_loss}.py)
# ---------------------------------------------------------------------------------------------

def _run(kernel, launch):
    args, constexprs, warps, grid = launch
    kernel[grid](**args, **constexprs, num_warps=warps, num_stages=NUM_STAGES)


def kl_penalty_fwd(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: int, clamp: float | None,
                   cap: float | None, need_grad: bool):
    """logprobs, ref_logprobs (R, C), any strides and float dtypes -> (kl (R, C) fp32 contiguous, dk/dx
    (R, C) fp32 contiguous, or (0,) without need_grad). clamp: of x; cap: of the value (None: none)."""
    kl = torch.empty(logprobs.shape, dtype=torch.float32, device=logprobs.device)
    dkl = torch.empty(logprobs.shape if need_grad else (0,), dtype=torch.float32, device=logprobs.device)
    if kl.numel() > 0:
        _run(_kl_penalty_fwd_kernel, _kl_fwd_launch(logprobs, ref_logprobs, kl, dkl if need_grad else None,
                                                    estimator, clamp, cap))
    return kl, dkl


def _loss_fwd(kernel, launch_fn, inputs, n_partials, n_stats, aggregation, num_items, num_items_int, norm_length,
              need_grad, *params):
    x = inputs[0]
    n_rows, n_cols = x.shape
    dev = x.device
    block, _ = launch_config(n_cols)
    per_row = triton.cdiv(n_cols, block) if n_cols > 0 else 0
    partials = torch.empty((n_rows * per_row * n_partials,), dtype=torch.float32, device=dev)
    token_grad = torch.empty((n_rows, n_cols) if need_grad else (0,), dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    stats = torch.empty((n_stats,), dtype=torch.float32, device=dev)
    row_scale = torch.empty((n_rows,), dtype=torch.float32, device=dev)
    if n_rows * per_row > 0:
        _run(kernel, launch_fn(*inputs, partials, token_grad if need_grad else None, *params))
    norm = norm_length if norm_length > 0 else n_cols
    _run(_ppo_loss_finalize_kernel, _finalize_launch(partials, loss, stats, row_scale, num_items, num_items_int,
                                                     n_rows, per_row, norm, aggregation,
                                                     n_partials == VALUE_PARTIALS))
    return loss, stats, token_grad, row_scale


def ppo_policy_loss_fwd(logprobs, old_logprobs, advantages, mask, eps_low, eps_high, dual_clip, log_ratio_clamp,
                        aggregation, num_items, num_items_int, norm_length, need_grad, cispo=False):
    """(B, T) inputs (any strides; float dtypes, mask bool or float) -> (loss (), stats (6,), token_grad
    (B, T) or (0,), row_scale (B,)), all fp32; see rlhf_fast/ops/ppo_policy_loss.py."""
    return _loss_fwd(_ppo_policy_loss_fwd_kernel, _policy_fwd_launch, (logprobs, old_logprobs, advantages, mask),
                     POLICY_PARTIALS, POLICY_STATS, aggregation, num_items, num_items_int, norm_length, need_grad,
                     eps_low, eps_high, dual_clip, log_ratio_clamp, cispo)


def value_loss_fwd(values, old_values, returns, mask, clip_eps, aggregation, num_items, num_items_int, norm_length,
                   need_grad):
    """As ppo_policy_loss_fwd for value_loss: stats (2,)."""
    return _loss_fwd(_value_loss_fwd_kernel, _value_fwd_launch, (values, old_values, returns, mask),
                     VALUE_PARTIALS, VALUE_STATS, aggregation, num_items, num_items_int, norm_length, need_grad,
                     clip_eps)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs (compiled and inspected by rlhf_fast.kernels._aot, no GPU needed)
# ---------------------------------------------------------------------------------------------

# (B, T) of RL batches: T = 2048 (one full block per row) and T = 1000 (a masked block whose rows
# are not 16-byte aligned).
AOT_SHAPES = ((64, 2048), (64, 1000))
AOT_DTYPES = (torch.bfloat16, torch.float32, torch.float16)


def aot_specs(shapes=AOT_SHAPES, dtypes=AOT_DTYPES):
    """The distinct kernel configurations the launchers use for `shapes` x `dtypes` (all inputs of one
    dtype, a bool mask): every estimator of kl_penalty, without gradient, and with the derivative and
    a clamp; the policy loss with and without dual clip and with the cispo objective, and the value loss,
    each with the per-token gradient; the finalize kernel of both losses for every aggregation. Built from the
    launchers' own argument builders on meta tensors, so they cannot drift from what runs."""
    from rlhf_fast.kernels._aot import SpecSet, spec_from_args

    meta = dict(device="meta")
    specs = SpecSet()

    def add(name, fn, launch, shape_label):
        args, constexprs, warps, _ = launch
        specs.add(spec_from_args(name, fn, args, constexprs, warps, NUM_STAGES), shape_label)

    for dtype in dtypes:
        dt = str(dtype).removeprefix("torch.")
        for n_rows, n_cols in shapes:
            label = f"{dt} B={n_rows} T={n_cols}"
            x = torch.empty((n_rows, n_cols), dtype=dtype, **meta)
            mask = torch.empty((n_rows, n_cols), dtype=torch.bool, **meta)
            f32 = torch.empty((n_rows, n_cols), dtype=torch.float32, **meta)
            for est, est_name in enumerate(("k1", "abs", "k2", "k3")):
                add(f"kl_penalty_fwd[{est_name}]", _kl_penalty_fwd_kernel, _kl_fwd_launch(x, x, f32, None, est, None),
                    label)
                add(f"kl_penalty_fwd[{est_name}]+grad+clamp", _kl_penalty_fwd_kernel,
                    _kl_fwd_launch(x, x, f32, f32, est, 10.0), label)
                add(f"kl_penalty_fwd[{est_name}]+grad+cap", _kl_penalty_fwd_kernel,
                    _kl_fwd_launch(x, x, f32, f32, est, None, 10.0), label)
            block, _ = launch_config(n_cols)
            per_row = triton.cdiv(n_cols, block)
            partials = torch.empty((n_rows * per_row * POLICY_PARTIALS,), dtype=torch.float32, **meta)
            for dual in (None, 3.0):
                add("ppo_policy_loss_fwd" + ("+dual" if dual else ""), _ppo_policy_loss_fwd_kernel,
                    _policy_fwd_launch(x, x, x, mask, partials, f32, 0.2, 0.28, dual, 20.0), label)
            add("ppo_policy_loss_fwd+cispo", _ppo_policy_loss_fwd_kernel,
                _policy_fwd_launch(x, x, x, mask, partials, f32, 0.2, 4.0, None, 20.0, True), label)
            add("value_loss_fwd", _value_loss_fwd_kernel, _value_fwd_launch(x, x, x, mask, partials, f32, 0.2), label)
    scalar = torch.empty((), dtype=torch.float32, **meta)
    for is_value in (False, True):
        for agg in range(4):
            partials = torch.empty((64 * POLICY_PARTIALS,), dtype=torch.float32, **meta)
            launch = _finalize_launch(partials, scalar, torch.empty((8,), **meta), torch.empty((64,), **meta),
                                      None, -1, 64, 2, 2048.0, agg, is_value)
            add(f"{'value' if is_value else 'policy'}_finalize[agg={agg}]", _ppo_loss_finalize_kernel, launch,
                "B=64")
    return specs.specs()
