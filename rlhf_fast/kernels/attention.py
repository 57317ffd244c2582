"""Triton kernels of attention: flash-attention-2 (tiled online softmax, logsumexp saved, backward by
recomputation) for dense, varlen and shared-prefix attention, as one kernel family driven by segments.

Cost model, one head, T queries and S keys of D elements in a dtype of b bytes (causal T = S halves the
FLOPs and, here, the key blocks visited):

  eager     S = q k^T and P = softmax(S) are (T, S) fp32 tensors written to and read from memory, twice
            more in the backward (dP, dS): ~16 T S bytes per head, which at T = S = 2048 is 64 MB per head
            against the 2 (T + 2 S) D b = 1.5 MB of q, k, v at D = 128 in bf16. Memory-bound on S and P.
  fused     q, k, v read once per (query block, key block) pair from L2/SMEM tiles; S and P live in
            registers only. Forward writes O and one fp32 logsumexp per row. The backward recomputes
            P = exp(S - lse) tile by tile from q, k and the saved lse, plus the standard preprocessing
            delta = rowsum(dO * O) (one fp32 per row), so nothing of size (T, S) ever reaches memory:
            4 T S D FLOPs forward, 10 T S D backward (5 GEMMs: S, dV, dP, dK, dQ), compute-bound.

Segments. Every entry point (dense batch with key padding, varlen, shared prefix) is described by two
int32 tables the kernels read once per program (built in rlhf_fast/ops/attention/):

  query segments (n, 8)  [batch, q_lo, q_hi, ka_lo, ka_hi, kb_lo, kb_hi, diag]
      queries q_lo <= i < q_hi of batch `batch` attend to every key in [ka_lo, ka_hi) ("range A",
      the prompt of a shared-prefix answer) and to the keys j in [kb_lo, kb_hi) with j <= i + diag
      ("range B", causal; all of them when not causal). Forward and dq programs walk these.
  key segments (n, 8)    [batch, k_lo, k_hi, qa_lo, qa_hi, qb_lo, qb_hi, diag]
      the same relation seen from the keys: keys k_lo <= j < k_hi are attended by every query in
      [qa_lo, qa_hi) and by the queries i in [qb_lo, qb_hi) with i >= j - diag. dK/dV programs walk these.

Indices are token indices along the T axis of a (batches, heads, T, D) strided view; packed (total, H, D)
tensors are the view with one batch. diag puts the causal diagonal anywhere: S - T for a dense batch
(bottom-right alignment), k_hi - q_hi for a varlen sequence, 0 inside a shared-prefix group.

Skipping. A program never visits a key block that no query of its block sees: the loops run between
bounds computed from the segment (the causal diagonal, the first and last non-padding key), not over
all S keys with a mask. Blocks wholly inside the visible region run unmasked; only the blocks that
straddle the diagonal or a bound pay for the mask (and a dense key mask with holes is applied per
element in addition). Rows with no visible key store out = 0 and lse = +inf, so the backward's
exp(S - lse) is exactly 0 for them: zero gradients, never NaN.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

# fp32 inputs on the GPU multiply on TF32 tensor cores (10-bit mantissa products, fp32 accumulation), as
# torch does with allow_tf32; "ieee" would be exact fp32 FMA on the CUDA cores, ~8x slower. bf16/fp16
# (the training dtypes) are unaffected. The interpreter computes in numpy fp32 whatever this says.
FP32_DOT_PRECISION = "tf32"
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(base, rows, stride, offs_d, row_hi, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """(len(rows), BLOCK_D) tile; rows >= row_hi (when checked) and columns >= HEAD_DIM read 0."""
    ptrs = base + rows[:, None].to(tl.int64) * stride + offs_d[None, :]  # int64: rows * stride passes 2^31
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=rows[:, None] < row_hi, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < row_hi) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _load_tile_t(base, rows, stride, offs_d, row_hi, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_D, len(rows)) transposed tile, rows >= row_hi read 0."""
    ptrs = base + rows[None, :].to(tl.int64) * stride + offs_d[:, None]
    if HEAD_DIM == BLOCK_D:
        x = tl.load(ptrs, mask=rows[None, :] < row_hi, other=0.0)
    else:
        x = tl.load(ptrs, mask=(rows[None, :] < row_hi) & (offs_d[:, None] < HEAD_DIM), other=0.0)
    return x


@triton.jit
def _store_tile(base, rows, stride, offs_d, row_hi, x, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ptrs = base + rows[:, None].to(tl.int64) * stride + offs_d[None, :]
    if HEAD_DIM == BLOCK_D:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=rows[:, None] < row_hi)
    else:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=(rows[:, None] < row_hi) & (offs_d[None, :] < HEAD_DIM))


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _attention_fwd_inner(acc, l_i, m_i, q, rows, k_base, v_base, km_base, stride_kt, stride_vt,
                         lo, hi, k_hi, diag, qk_scale, offs_n, offs_d,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         MASK_BOUNDS: tl.constexpr, MASK_CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
                         UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Key blocks starting at lo, lo + BLOCK_N, ... < hi into the running (acc, l_i, m_i) of one query block.

    Unmasked variants are only called on blocks every query row sees whole; the masked one checks
    j < k_hi, the causal diagonal j <= i + diag and the key-padding mask.
    """
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, stride_kt, offs_d, k_hi, HEAD_DIM, BLOCK_D, MASK_BOUNDS)
        if UPCAST:
            k = k.to(tl.float32)
        # scores in base 2: s = (q . k) * scale * log2(e), so that exp2(s - m) is the softmax numerator
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASK_BOUNDS or MASK_CAUSAL or HAS_KEY_MASK:
            visible = cols[None, :] < k_hi
            if MASK_CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + diag)
            if HAS_KEY_MASK:
                km = tl.load(km_base + cols, mask=cols < k_hi, other=0)
                visible = visible & (km[None, :] != 0)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no visible key yet keeps m = -inf; take exponentials relative to 0
            # then, so that -inf - (-inf) is never formed (p = exp2(-inf) = 0, alpha = 0).
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = m_new
        # Online softmax: rescale what was accumulated against the old max by 2^(m_old - m_new).
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, cols, stride_vt, offs_d, k_hi, HEAD_DIM, BLOCK_D, MASK_BOUNDS)
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    Q,             # (batches, Hq, T, D) strided, unit stride along D; fp32/bf16/fp16
    K, V,          # (batches, Hkv, S, D) strided, unit stride along D
    Out,           # (batches, Hq, T, D) out, strided, unit stride along D
    Lse,           # (batches, Hq, T) fp32 out, unit stride along T: natural-log logsumexp, +inf for empty rows
    KeyMask,       # (batches, S) uint8 (1 = key exists); only read when HAS_KEY_MASK
    Seg,           # (n_segments, 8) int32 query segments (module docstring)
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_lb, stride_lh,
    stride_mb,
    num_heads,     # Hq
    n_mblocks,     # cdiv(longest query segment, BLOCK_M)
    qk_scale,      # scale * log2(e)
    GROUP: tl.constexpr,          # Hq // Hkv
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_RANGE_A: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per (query block, head, segment), flattened into axis 0 (no 65535 limit on axis 1/2).
    # Query blocks run last-first: under a causal mask the last blocks of a segment see the most keys,
    # and starting them first evens out the tail of the launch.
    pid = tl.program_id(0)
    mb = n_mblocks - 1 - pid % n_mblocks
    rest = pid // n_mblocks
    h = rest % num_heads
    meta = Seg + (rest // num_heads) * 8
    batch = tl.load(meta + 0).to(tl.int64)
    q_lo = tl.load(meta + 1)
    q_hi = tl.load(meta + 2)
    m0 = q_lo + mb * BLOCK_M
    if m0 >= q_hi:
        return
    kb_lo = tl.load(meta + 5)
    kb_hi = tl.load(meta + 6)
    diag = tl.load(meta + 7)
    kvh = h // GROUP

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m
    q = _load_tile(Q + batch * stride_qb + h.to(tl.int64) * stride_qh, rows, stride_qt, offs_d, q_hi,
                   HEAD_DIM, BLOCK_D, True)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + batch * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + batch * stride_vb + kvh.to(tl.int64) * stride_vh
    km_base = KeyMask + batch * stride_mb

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    if HAS_RANGE_A:  # every key of [ka_lo, ka_hi): whole blocks unmasked, then at most one partial block
        ka_lo = tl.load(meta + 3)
        ka_hi = tl.load(meta + 4)
        a_mid = ka_lo + (ka_hi - ka_lo) // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _attention_fwd_inner(acc, l_i, m_i, q, rows, k_base, v_base, km_base, stride_kt, stride_vt,
                                             ka_lo, a_mid, ka_hi, 0, qk_scale, offs_n, offs_d,
                                             HEAD_DIM, BLOCK_D, BLOCK_N, False, False, False, UPCAST, DOT_PRECISION)
        acc, l_i, m_i = _attention_fwd_inner(acc, l_i, m_i, q, rows, k_base, v_base, km_base, stride_kt, stride_vt,
                                             a_mid, ka_hi, ka_hi, 0, qk_scale, offs_n, offs_d,
                                             HEAD_DIM, BLOCK_D, BLOCK_N, True, False, False, UPCAST, DOT_PRECISION)

    # Range B. Keys below full_hi are seen by every row of the block (the first row is the strictest);
    # keys at or beyond end are seen by none (the last valid row is the most lenient): never loaded.
    if CAUSAL:
        last_row = tl.minimum(m0 + BLOCK_M, q_hi) - 1
        full_hi = tl.minimum(kb_hi, m0 + diag + 1)
        end = tl.minimum(kb_hi, last_row + diag + 1)
    else:
        full_hi = kb_hi
        end = kb_hi
    mid = kb_lo + tl.maximum(full_hi - kb_lo, 0) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _attention_fwd_inner(acc, l_i, m_i, q, rows, k_base, v_base, km_base, stride_kt, stride_vt,
                                         kb_lo, mid, kb_hi, diag, qk_scale, offs_n, offs_d,
                                         HEAD_DIM, BLOCK_D, BLOCK_N, False, False, HAS_KEY_MASK, UPCAST,
                                         DOT_PRECISION)
    acc, l_i, m_i = _attention_fwd_inner(acc, l_i, m_i, q, rows, k_base, v_base, km_base, stride_kt, stride_vt,
                                         mid, end, kb_hi, diag, qk_scale, offs_n, offs_d,
                                         HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_KEY_MASK, UPCAST,
                                         DOT_PRECISION)

    empty = l_i == 0.0  # no visible key: out 0, lse +inf (the backward's exp(s - lse) is then 0)
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * LN2)
    _store_tile(Out + batch * stride_ob + h.to(tl.int64) * stride_oh, rows, stride_ot, offs_d, q_hi, out,
                HEAD_DIM, BLOCK_D)
    tl.store(Lse + batch * stride_lb + h.to(tl.int64) * stride_lh + rows, lse, mask=rows < q_hi)


# ---------------------------------------------------------------------------------------------
# Backward: delta = rowsum(dO * O), then dK/dV (key-block programs) and dQ (query-block programs)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _attention_bwd_preprocess_kernel(
    Out, DO,       # (batches, Hq, T, D) strided, unit stride along D
    Delta,         # (batches, Hq, T) fp32 out, strides as Lse
    stride_ob, stride_oh, stride_ot,
    stride_db, stride_dh, stride_dt,
    stride_lb, stride_lh,
    num_heads, seqlen, n_mblocks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    rest = pid // n_mblocks
    b = (rest // num_heads).to(tl.int64)
    h = (rest % num_heads).to(tl.int64)
    rows = (pid % n_mblocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(Out + b * stride_ob + h * stride_oh, rows, stride_ot, offs_d, seqlen, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + b * stride_db + h * stride_dh, rows, stride_dt, offs_d, seqlen, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b * stride_lb + h * stride_lh + rows, delta, mask=rows < seqlen)


@triton.jit
def _attention_bwd_dkdv_inner(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                              lo, hi, row_hi, diag, qk_scale, offs_m, offs_d,
                              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                              MASK_CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Query blocks starting at lo, lo + BLOCK_M, ... < hi (rows >= row_hi read as absent) into dk, dv of
    one key block. Everything is computed transposed, keys along rows: (BLOCK_N, BLOCK_M) tiles."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q_t = _load_tile_t(q_base, rows, stride_qt, offs_d, row_hi, HEAD_DIM, BLOCK_D)  # (D, BM)
        # absent rows: lse = +inf makes p exactly 0, delta 0, q and dO 0: they add nothing
        lse = tl.load(lse_base + rows, mask=rows < row_hi, other=float("inf"))
        do = _load_tile(do_base, rows, stride_dot, offs_d, row_hi, HEAD_DIM, BLOCK_D, True)  # (BM, D)
        if UPCAST:
            q_t = q_t.to(tl.float32)
            do = do.to(tl.float32)
        s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :] * LOG2E)  # P^T recomputed from the saved logsumexp
        if MASK_CAUSAL:
            p_t = tl.where(cols[:, None] <= rows[None, :] + diag, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        delta = tl.load(delta_base + rows, mask=rows < row_hi, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])  # dS = P * (dP - rowsum(dO * O)), the softmax backward
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO,   # as in the forward; DO (batches, Hq, T, D) strided
    Lse, Delta,    # (batches, Hq, T) fp32, strides stride_lb, stride_lh, 1
    DK, DV,        # (batches, Hkv, S, D) out, strided
    KeyMask,       # (batches, S) uint8; only read when HAS_KEY_MASK
    KSeg,          # (n_segments, 8) int32 key segments (module docstring)
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    stride_lb, stride_lh,
    stride_mb,
    num_kv_heads, n_nblocks, qk_scale, sm_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_RANGE_A: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per (key block, kv head, key segment). It owns dK/dV of its block outright: the GROUP
    # query heads sharing the kv head (GQA) are summed inside the program, so no atomics.
    pid = tl.program_id(0)
    nb = pid % n_nblocks
    rest = pid // n_nblocks
    kvh = rest % num_kv_heads
    meta = KSeg + (rest // num_kv_heads) * 8
    batch = tl.load(meta + 0).to(tl.int64)
    k_lo = tl.load(meta + 1)
    k_hi = tl.load(meta + 2)
    n0 = k_lo + nb * BLOCK_N
    if n0 >= k_hi:
        return
    qb_lo = tl.load(meta + 5)
    qb_hi = tl.load(meta + 6)
    diag = tl.load(meta + 7)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = n0 + offs_n
    k = _load_tile(K + batch * stride_kb + kvh.to(tl.int64) * stride_kh, cols, stride_kt, offs_d, k_hi,
                   HEAD_DIM, BLOCK_D, True)
    v = _load_tile(V + batch * stride_vb + kvh.to(tl.int64) * stride_vh, cols, stride_vt, offs_d, k_hi,
                   HEAD_DIM, BLOCK_D, True)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)

    # Range B rows: under the causal mask, rows below n0 - diag see no key of the block (skipped), rows
    # from n0 + BLOCK_N - 1 - diag on see all of them (unmasked); the band in between is masked.
    if CAUSAL:
        start = tl.maximum(qb_lo, n0 - diag)
        full_lo = tl.minimum(qb_hi, tl.maximum(start, n0 + BLOCK_N - 1 - diag))
        mid = start + tl.cdiv(full_lo - start, BLOCK_M) * BLOCK_M
    else:
        start = qb_lo
        mid = qb_lo
    for g in range(GROUP):
        h = (kvh * GROUP + g).to(tl.int64)
        q_base = Q + batch * stride_qb + h * stride_qh
        do_base = DO + batch * stride_dob + h * stride_doh
        lse_base = Lse + batch * stride_lb + h * stride_lh
        delta_base = Delta + batch * stride_lb + h * stride_lh
        if HAS_RANGE_A:
            qa_lo = tl.load(meta + 3)
            qa_hi = tl.load(meta + 4)
            dk, dv = _attention_bwd_dkdv_inner(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base,
                                               stride_qt, stride_dot, qa_lo, qa_hi, qa_hi, 0, qk_scale,
                                               offs_m, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, False, UPCAST,
                                               DOT_PRECISION)
        dk, dv = _attention_bwd_dkdv_inner(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base,
                                           stride_qt, stride_dot, start, mid, qb_hi, diag, qk_scale,
                                           offs_m, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, UPCAST,
                                           DOT_PRECISION)
        dk, dv = _attention_bwd_dkdv_inner(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base,
                                           stride_qt, stride_dot, mid, qb_hi, qb_hi, diag, qk_scale,
                                           offs_m, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, False, UPCAST,
                                           DOT_PRECISION)

    dk = dk * sm_scale  # dS is the gradient of the scaled scores: dK = scale * dS^T Q
    if HAS_KEY_MASK:  # padding keys: P was not masked above (their columns are independent), zero them here
        km = tl.load(KeyMask + batch * stride_mb + cols, mask=cols < k_hi, other=0)
        dk = tl.where(km[:, None] != 0, dk, 0.0)
        dv = tl.where(km[:, None] != 0, dv, 0.0)
    _store_tile(DK + batch * stride_dkb + kvh.to(tl.int64) * stride_dkh, cols, stride_dkt, offs_d, k_hi, dk,
                HEAD_DIM, BLOCK_D)
    _store_tile(DV + batch * stride_dvb + kvh.to(tl.int64) * stride_dvh, cols, stride_dvt, offs_d, k_hi, dv,
                HEAD_DIM, BLOCK_D)


@triton.jit
def _attention_bwd_dq_inner(dq, q, do, lse, delta, rows, k_base, v_base, km_base, stride_kt, stride_vt,
                            lo, hi, k_hi, diag, qk_scale, offs_n, offs_d,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                            MASK_BOUNDS: tl.constexpr, MASK_CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
                            UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, stride_kt, offs_d, k_hi, HEAD_DIM, BLOCK_D, MASK_BOUNDS)
        v = _load_tile(v_base, cols, stride_vt, offs_d, k_hi, HEAD_DIM, BLOCK_D, MASK_BOUNDS)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASK_BOUNDS or MASK_CAUSAL or HAS_KEY_MASK:
            visible = cols[None, :] < k_hi
            if MASK_CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + diag)
            if HAS_KEY_MASK:
                km = tl.load(km_base + cols, mask=cols < k_hi, other=0)
                visible = visible & (km[None, :] != 0)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta,
    DQ,            # (batches, Hq, T, D) out, strided
    KeyMask, Seg,  # as in the forward
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    stride_lb, stride_lh,
    stride_mb,
    num_heads, n_mblocks, qk_scale, sm_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_RANGE_A: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Same program layout and key-block bounds as the forward.
    pid = tl.program_id(0)
    mb = n_mblocks - 1 - pid % n_mblocks
    rest = pid // n_mblocks
    h = rest % num_heads
    meta = Seg + (rest // num_heads) * 8
    batch = tl.load(meta + 0).to(tl.int64)
    q_lo = tl.load(meta + 1)
    q_hi = tl.load(meta + 2)
    m0 = q_lo + mb * BLOCK_M
    if m0 >= q_hi:
        return
    kb_lo = tl.load(meta + 5)
    kb_hi = tl.load(meta + 6)
    diag = tl.load(meta + 7)
    kvh = h // GROUP

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m
    hh = h.to(tl.int64)
    q = _load_tile(Q + batch * stride_qb + hh * stride_qh, rows, stride_qt, offs_d, q_hi, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + batch * stride_dob + hh * stride_doh, rows, stride_dot, offs_d, q_hi, HEAD_DIM, BLOCK_D,
                    True)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_ok = rows < q_hi
    lse = tl.load(Lse + batch * stride_lb + hh * stride_lh + rows, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(Delta + batch * stride_lb + hh * stride_lh + rows, mask=row_ok, other=0.0)
    k_base = K + batch * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + batch * stride_vb + kvh.to(tl.int64) * stride_vh
    km_base = KeyMask + batch * stride_mb
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    if HAS_RANGE_A:
        ka_lo = tl.load(meta + 3)
        ka_hi = tl.load(meta + 4)
        a_mid = ka_lo + (ka_hi - ka_lo) // BLOCK_N * BLOCK_N
        dq = _attention_bwd_dq_inner(dq, q, do, lse, delta, rows, k_base, v_base, km_base, stride_kt, stride_vt,
                                     ka_lo, a_mid, ka_hi, 0, qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N,
                                     False, False, False, UPCAST, DOT_PRECISION)
        dq = _attention_bwd_dq_inner(dq, q, do, lse, delta, rows, k_base, v_base, km_base, stride_kt, stride_vt,
                                     a_mid, ka_hi, ka_hi, 0, qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N,
                                     True, False, False, UPCAST, DOT_PRECISION)
    if CAUSAL:
        last_row = tl.minimum(m0 + BLOCK_M, q_hi) - 1
        full_hi = tl.minimum(kb_hi, m0 + diag + 1)
        end = tl.minimum(kb_hi, last_row + diag + 1)
    else:
        full_hi = kb_hi
        end = kb_hi
    mid = kb_lo + tl.maximum(full_hi - kb_lo, 0) // BLOCK_N * BLOCK_N
    dq = _attention_bwd_dq_inner(dq, q, do, lse, delta, rows, k_base, v_base, km_base, stride_kt, stride_vt,
                                 kb_lo, mid, kb_hi, diag, qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N,
                                 False, False, HAS_KEY_MASK, UPCAST, DOT_PRECISION)
    dq = _attention_bwd_dq_inner(dq, q, do, lse, delta, rows, k_base, v_base, km_base, stride_kt, stride_vt,
                                 mid, end, kb_hi, diag, qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N,
                                 True, CAUSAL, HAS_KEY_MASK, UPCAST, DOT_PRECISION)
    _store_tile(DQ + batch * stride_dqb + hh * stride_dqh, rows, stride_dqt, offs_d, q_hi, dq * sm_scale,
                HEAD_DIM, BLOCK_D)


# ---------------------------------------------------------------------------------------------
# Launch configuration: one helper for the launchers and for aot_specs(), so that the configurations
# compiled ahead of time are the ones that run.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TileConfig:
    block_m: int     # query rows per tile
    block_n: int     # key rows per tile
    num_warps: int
    num_stages: int


def block_d(head_dim: int) -> int:
    """Head-dim tile: the next power of two, at least 16 (the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(head_dim))


# Tiles per kernel, dtype and head-dim tile, chosen with rlhf-fast inspect: tensor-core MMA,
# no register spills and shared memory within an SM on both sm_80 and sm_90a. Forward: a 128-row query
# tile amortises each K/V tile over 128 rows (flash-attention-2's arithmetic intensity); 64-key tiles keep
# the (128, 64) fp32 score tile and the (128, D) fp32 accumulator in registers (8 warps of 16 query rows
# at D >= 64).
# dK/dV programs hold one key tile with its dK and dV accumulators and stream 32-row query tiles (128 keys
# at D <= 64, 64 at D = 128: 128 spills on sm_80); dQ programs hold one query tile and stream 64-key tiles.
# num_stages: K/V (or Q/dO) tiles double/triple-buffered in shared memory. fp32 operands (TF32 MMA) take
# twice the registers and shared memory per element: smaller tiles. A head dim that is not a power of two
# is padded to one with masked loads, which hold more registers live: it takes the next wider tiles.
_TILES_16BIT = {
    "fwd": {16: TileConfig(128, 64, 4, 3), 32: TileConfig(128, 64, 4, 3), 64: TileConfig(128, 64, 8, 3),
            128: TileConfig(128, 64, 8, 3), 256: TileConfig(64, 32, 8, 2)},
    "dkdv": {16: TileConfig(32, 128, 4, 2), 32: TileConfig(32, 128, 4, 2), 64: TileConfig(32, 128, 8, 2),
             128: TileConfig(32, 64, 8, 2), 256: TileConfig(32, 32, 8, 1)},
    "dq": {16: TileConfig(128, 64, 8, 2), 32: TileConfig(128, 64, 8, 2), 64: TileConfig(128, 64, 8, 2),
           128: TileConfig(64, 64, 8, 2), 256: TileConfig(32, 64, 8, 1)},
}
_TILES_FP32 = {
    "fwd": {16: TileConfig(128, 64, 8, 2), 32: TileConfig(128, 64, 8, 2), 64: TileConfig(128, 64, 8, 3),
            128: TileConfig(64, 32, 4, 2), 256: TileConfig(32, 32, 4, 1)},
    "dkdv": {16: TileConfig(32, 128, 8, 2), 32: TileConfig(32, 128, 8, 2), 64: TileConfig(16, 32, 4, 1),
             128: TileConfig(16, 32, 4, 1), 256: TileConfig(16, 16, 4, 1)},
    "dq": {16: TileConfig(128, 32, 4, 2), 32: TileConfig(128, 64, 8, 2), 64: TileConfig(64, 32, 8, 1),
           128: TileConfig(32, 64, 8, 1), 256: TileConfig(16, 32, 4, 1)},
}
# Under TRITON_INTERPRET=1 (tests on CPU) small, unequal tiles exercise the multi-block loops, the
# partial blocks and the diagonal bands at the sequence lengths the interpreter can afford.
_INTERPRET = TileConfig(32, 16, 1, 1)
_INTERPRET_DKDV = TileConfig(16, 32, 1, 1)
PREPROCESS_BLOCK_M = 64


def tile_config(kind: str, head_dim: int, dtype: torch.dtype = torch.bfloat16, interpret: bool = False) -> TileConfig:
    """TileConfig of kernel `kind` ("fwd", "dkdv", "dq") at this head dim and dtype."""
    if interpret:
        return _INTERPRET_DKDV if kind == "dkdv" else _INTERPRET
    width = block_d(head_dim)
    if width != head_dim:
        width = min(2 * width, 256)
    return (_TILES_FP32 if dtype == torch.float32 else _TILES_16BIT)[kind][width]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _common(q, k, causal, has_range_a, key_mask, interpret):
    """constexprs shared by the three main kernels."""
    head_dim = q.shape[-1]
    return dict(GROUP=q.shape[1] // k.shape[1], HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), CAUSAL=bool(causal),
                HAS_RANGE_A=bool(has_range_a), HAS_KEY_MASK=key_mask is not None,
                # the interpreter's tl.dot is wrong on bf16 operands: it computes in fp32 instead
                UPCAST=bool(interpret and q.dtype == torch.bfloat16),
                DOT_PRECISION="ieee" if interpret or q.dtype != torch.float32 else FP32_DOT_PRECISION)


def _strides3(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _fwd_launch(q, k, v, out, lse, key_mask, q_seg, max_q_len, scale, causal, has_range_a, interpret=False):
    cfg = tile_config("fwd", q.shape[-1], q.dtype, interpret)
    n_mblocks = max(triton.cdiv(max_q_len, cfg.block_m), 1)
    mask = key_mask if key_mask is not None else lse  # never read without HAS_KEY_MASK: any tensor fills the slot
    args = dict(Q=q, K=k, V=v, Out=out, Lse=lse, KeyMask=mask, Seg=q_seg)
    for name, x in (("q", q), ("k", k), ("v", v), ("o", out)):
        args.update(zip((f"stride_{name}b", f"stride_{name}h", f"stride_{name}t"), _strides3(x), strict=True))
    args.update(stride_lb=lse.stride(0), stride_lh=lse.stride(1), stride_mb=mask.stride(0),
                num_heads=q.shape[1], n_mblocks=n_mblocks, qk_scale=scale * 1.4426950408889634)
    constexprs = dict(_common(q, k, causal, has_range_a, key_mask, interpret),
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
    return args, constexprs, cfg, (n_mblocks * q.shape[1] * q_seg.shape[0],)


def _preprocess_launch(out, do, delta):
    head_dim = out.shape[-1]
    n_mblocks = max(triton.cdiv(out.shape[2], PREPROCESS_BLOCK_M), 1)
    args = dict(Out=out, DO=do, Delta=delta)
    args.update(zip(("stride_ob", "stride_oh", "stride_ot"), _strides3(out), strict=True))
    args.update(zip(("stride_db", "stride_dh", "stride_dt"), _strides3(do), strict=True))
    args.update(stride_lb=delta.stride(0), stride_lh=delta.stride(1), num_heads=out.shape[1], seqlen=out.shape[2],
                n_mblocks=n_mblocks)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_M=PREPROCESS_BLOCK_M)
    num_warps = 4 if block_d(head_dim) >= 128 else 2
    return args, constexprs, num_warps, (n_mblocks * out.shape[0] * out.shape[1],)


def _dkdv_launch(q, k, v, do, lse, delta, dk, dv, key_mask, k_seg, max_k_len, scale, causal, has_range_a,
                 interpret=False):
    cfg = tile_config("dkdv", q.shape[-1], q.dtype, interpret)
    n_nblocks = max(triton.cdiv(max_k_len, cfg.block_n), 1)
    mask = key_mask if key_mask is not None else lse
    args = dict(Q=q, K=k, V=v, DO=do, Lse=lse, Delta=delta, DK=dk, DV=dv, KeyMask=mask, KSeg=k_seg)
    for name, x in (("q", q), ("k", k), ("v", v), ("do", do), ("dk", dk), ("dv", dv)):
        args.update(zip((f"stride_{name}b", f"stride_{name}h", f"stride_{name}t"), _strides3(x), strict=True))
    args.update(stride_lb=lse.stride(0), stride_lh=lse.stride(1), stride_mb=mask.stride(0),
                num_kv_heads=k.shape[1], n_nblocks=n_nblocks, qk_scale=scale * 1.4426950408889634, sm_scale=scale)
    constexprs = dict(_common(q, k, causal, has_range_a, key_mask, interpret),
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
    return args, constexprs, cfg, (n_nblocks * k.shape[1] * k_seg.shape[0],)


def _dq_launch(q, k, v, do, lse, delta, dq, key_mask, q_seg, max_q_len, scale, causal, has_range_a,
               interpret=False):
    cfg = tile_config("dq", q.shape[-1], q.dtype, interpret)
    n_mblocks = max(triton.cdiv(max_q_len, cfg.block_m), 1)
    mask = key_mask if key_mask is not None else lse
    args = dict(Q=q, K=k, V=v, DO=do, Lse=lse, Delta=delta, DQ=dq, KeyMask=mask, Seg=q_seg)
    for name, x in (("q", q), ("k", k), ("v", v), ("do", do), ("dq", dq)):
        args.update(zip((f"stride_{name}b", f"stride_{name}h", f"stride_{name}t"), _strides3(x), strict=True))
    args.update(stride_lb=lse.stride(0), stride_lh=lse.stride(1), stride_mb=mask.stride(0),
                num_heads=q.shape[1], n_mblocks=n_mblocks, qk_scale=scale * 1.4426950408889634, sm_scale=scale)
    constexprs = dict(_common(q, k, causal, has_range_a, key_mask, interpret),
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
    return args, constexprs, cfg, (n_mblocks * q.shape[1] * q_seg.shape[0],)


# ---------------------------------------------------------------------------------------------
# Launchers (called by rlhf_fast/ops/attention/). Tensors are 4-D strided views (batches, heads,
# tokens, D) with unit stride along D; packed (total, H, D) tensors are passed as (1, H, total, D) views.
# ---------------------------------------------------------------------------------------------

def _check(*tensors):
    for t in tensors:
        assert t.dim() == 4 and t.stride(-1) == 1, "attention kernels take (batches, heads, tokens, D) views " \
                                                   "with unit stride along D"


def segment_attention_fwd(q, k, v, out, lse, q_segments, max_q_len: int, *, key_mask=None, causal: bool,
                          scale: float, has_range_a: bool) -> None:
    """Forward into `out` (same shape as q) and `lse` ((batches, Hq, T) fp32, unit stride along T).
    key_mask: (batches, S) uint8 or None. q_segments: (n, 8) int32 on q's device."""
    _check(q, k, v, out)
    if q_segments.shape[0] == 0 or max_q_len == 0:
        return
    interpret = _interpret()
    args, constexprs, cfg, grid = _fwd_launch(q, k, v, out, lse, key_mask, q_segments, max_q_len, scale, causal,
                                              has_range_a, interpret)
    _attention_fwd_kernel[grid](**args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def segment_attention_bwd(do, q, k, v, out, lse, dq, dk, dv, q_segments, k_segments, max_q_len: int,
                          max_k_len: int, *, key_mask=None, causal: bool, scale: float, has_range_a: bool) -> None:
    """Backward into dq, dk, dv (shapes of q, k, v; every key row no segment covers must be pre-zeroed)."""
    _check(do, q, k, v, out, dq, dk, dv)
    interpret = _interpret()
    delta = torch.empty_like(lse)
    if q.shape[2] > 0:
        args, constexprs, num_warps, grid = _preprocess_launch(out, do, delta)
        _attention_bwd_preprocess_kernel[grid](**args, **constexprs, num_warps=num_warps, num_stages=1)
    if k_segments.shape[0] > 0 and max_k_len > 0:
        args, constexprs, cfg, grid = _dkdv_launch(q, k, v, do, lse, delta, dk, dv, key_mask, k_segments, max_k_len,
                                                   scale, causal, has_range_a, interpret)
        _attention_bwd_dkdv_kernel[grid](**args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if q_segments.shape[0] > 0 and max_q_len > 0:
        args, constexprs, cfg, grid = _dq_launch(q, k, v, do, lse, delta, dq, key_mask, q_segments, max_q_len, scale,
                                                 causal, has_range_a, interpret)
        _attention_bwd_dq_kernel[grid](**args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs (rlhf-fast inspect): the launch configurations of the GPU
# benchmark shapes, bf16, D = 64 and 128, dense causal (no padding) and shared prefix (range A).
# ---------------------------------------------------------------------------------------------

def aot_specs(head_dims=(64, 128), dtypes=(torch.bfloat16,), batch=8, heads=32, seqlen=2048):
    from rlhf_fast.kernels._aot import spec_from_args

    specs = []
    for dtype in dtypes:
        for head_dim in head_dims:
            meta = dict(device="meta", dtype=dtype)
            # (B, T, H, D) memory seen as (B, H, T, D), as transformers hands q/k/v over
            q = torch.empty(batch, seqlen, heads, head_dim, **meta).transpose(1, 2)
            k = torch.empty(batch, seqlen, heads, head_dim, **meta).transpose(1, 2)
            lse = torch.empty(batch, heads, seqlen, device="meta", dtype=torch.float32)
            seg = torch.empty(batch, 8, device="meta", dtype=torch.int32)
            dt = str(dtype).removeprefix("torch.")
            for variant, has_a in (("causal", False), ("shared-prefix", True)):
                shape = f"{dt} D={head_dim} {variant}"
                args, cx, cfg, _ = _fwd_launch(q, k, k, q, lse, None, seg, seqlen, head_dim ** -0.5, True, has_a)
                specs.append(_spec(spec_from_args, "attention_fwd", _attention_fwd_kernel, args, cx, cfg, shape))
                args, cx, cfg, _ = _dkdv_launch(q, k, k, q, lse, lse, k, k, None, seg, seqlen, head_dim ** -0.5,
                                                True, has_a)
                specs.append(_spec(spec_from_args, "attention_bwd_dkdv", _attention_bwd_dkdv_kernel, args, cx, cfg,
                                   shape))
                args, cx, cfg, _ = _dq_launch(q, k, k, q, lse, lse, q, None, seg, seqlen, head_dim ** -0.5, True,
                                              has_a)
                specs.append(_spec(spec_from_args, "attention_bwd_dq", _attention_bwd_dq_kernel, args, cx, cfg, shape))
            args, cx, warps, _ = _preprocess_launch(q, q, lse)
            spec = spec_from_args("attention_bwd_preprocess", _attention_bwd_preprocess_kernel, args, cx, warps, 1)
            spec.shapes.append(f"{dt} D={head_dim}")
            specs.append(spec)
    return specs


def _spec(spec_from_args, name, fn, args, constexprs, cfg, shape):
    spec = spec_from_args(name, fn, args, constexprs, cfg.num_warps, cfg.num_stages)
    spec.shapes.append(shape)
    spec.requires_tensor_cores = True
    return spec

