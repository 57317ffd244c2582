"""Triton kernels of linear_logprobs: log softmax(z)[label] (and the entropy of softmax(z)) with
z = softcap(hidden @ weight.T + bias) / T, the lm_head GEMM and the softmax fused into one kernel
so that no (N, V) tensor ever exists, forward or backward (the Cut-Cross-Entropy idea,
Wijmans et al. 2024).

Shapes: hidden (N, H), weight (V, H), bias (V,), all fp32 / bf16 / fp16 and contiguous; labels (N,)
int64. softcap(l) = c * tanh(l / c) (Gemma), or the identity.

Cost model, N = 8192 tokens, H = 4096, V = 128256 (Llama-3), bf16, on an H100 SXM (989 TFLOP/s dense
bf16, 3.35 TB/s HBM3, 50 MB L2). One lm_head GEMM is 2 N V H = 8.6 TFLOP (8.7 ms at peak).

  eager    forward: GEMM -> (N, V) bf16 logits (2.1 GB written) -> .float() (4.2 GB) -> log_softmax
           (4.2 GB more) -> gather; the backward holds and writes three more (N, V) buffers:
           ~25 GB of HBM traffic (7.5 ms at 3.35 TB/s) and 10+ GB alive, on top of 3 GEMMs.
  forward  one kernel + a tiny combine: the GEMM of each (BLOCK_M x BLOCK_N) logits tile is
           followed, still in registers, by bias, softcap, 1/T and the online-logsumexp fold
           (running max m, s = sum exp(z - m), t = sum exp(z - m)(z - m) for the entropy, and the
           label's z when it falls in the tile). HBM: W streamed once per group of GROUP_M row
           blocks (1.05 GB x N / (BLOCK_M GROUP_M) = 8.4 GB, see vocab_splits) plus the hidden
           states (67 MB): 2.5 ms, overlapped with 8.7 ms of MMA. The fold is ~20 FP32/MUFU
           operations per logit against 2 H = 8192 MMA flops: ~8% on top of the GEMM, as this
           kernel does not overlap its epilogue with the next tile's MMAs. Extra memory: 12 bytes
           per row and vocabulary split. Expected: ~9.4 ms at the MMA peak, 13-16 ms at the 55-65%
           of peak that Triton's 128 x 128 WGMMA tiles reach.
  backward one kernel: recompute the tile's logits (GEMM), turn them into dL/dlogits in registers,
           then dH[rows] += G @ W_tile and dW[cols] += G^T @ h_rows (two more GEMMs) with fp32
           atomics: 3 GEMMs = 25.8 TFLOP (26 ms at peak) -- and the atomics below.

The price of keeping G in registers is the accumulation of dH and dW across tiles. Both
accumulators are (tile x H) = 128 x 4096 fp32 = 2 MB: they cannot stay on chip, so every tile
adds its contribution to fp32 buffers with relaxed atomics (RED.E.ADD.F32 on sm_80,
REDG.E.ADD.F32x4 on sm_90a: no return value, no fences), resolved in L2:
4 N V H (1/BLOCK_N + 1/BLOCK_M) bytes = 269 GB of reductions at 128 x 128 tiles. At the 2.5-5 TB/s
an H100 L2 may sustain for coalesced fp32 reductions (not measured here) that is 55-110 ms, two to
four times the 26 ms of MMA: the backward is atomics-bound. The dW accumulator (2.1 GB fp32) is
also re-read from HBM once per group of row blocks (~34 GB, ~10 ms, overlapped). The alternatives
within "G stays in registers" are worse: owning a row block and looping over the vocabulary (or a
vocabulary tile and looping over rows) needs the 2 MB accumulator on chip; splitting H to make it
fit recomputes the logits GEMM H / BLOCK_H times (16x at BLOCK_H = 256); a read-modify-write of an
owned fp32 slab moves twice the bytes of a RED. The way out is to let G leave the chip: writing G
per chunk of rows in bf16 and running the two gradient GEMMs on it moves 6 N V bytes (6.3 GB,
~2 ms) -- the host-tiled design of the CPU/CUDA backends, which should then use 16-bit tensor-core
GEMMs. Atomics also make dW / dH / dbias non-deterministic at fp32 rounding (summation order).

Numerics: the GEMMs accumulate in fp32. bf16/fp16 operands use bf16/fp16 tensor-core MMA (HMMA on
sm_80, WGMMA on sm_90a); for the gradient GEMMs G is rounded once to the input dtype (as an eager
bf16/fp16 backward rounds its grad_logits), accumulation stays fp32. fp32 inputs use
input_precision="tf32x3": three TF32 MMAs per product (a_hi b_hi + a_hi b_lo + a_lo b_hi), about
1e-6 relative per product instead of TF32's 5e-4 -- fp32-class results on tensor cores at a third
of the TF32 rate (~165 TFLOP/s on H100, 2.5x the 67 TFLOP/s of "ieee" FMA).

Row math and defined values follow csrc/include/rlhf_fast/gather_logprobs_math.h (shared by the
CPU and CUDA backends): lse = m + log s, logprob = z_y - lse, entropy = log s - t / s (clamped
>= 0), dL/dz_j = g_lp ([j == y] - p_j) - g_H p_j (log p_j + H) with log p clamped at -FLT_MAX;
then dL/dl = dL/dz (1 - tanh^2(l / c)) / T. Ignored rows (label == ignore_index) give logprob 0,
entropy 0, lse -inf and no gradient; a row of all -inf logits gives lse = logprob = -inf,
entropy 0 and no gradient.

Ignored rows (prompt tokens: often half of an RLHF batch) are skipped without a host sync: the
launchers sort the row indices so that kept rows come first (a stable argsort of N flags), the
kernels gather their rows through that permutation, and a row block with no kept row exits
before its first load.

Under TRITON_INTERPRET=1 (CPU tests) tl.dot computes wrongly on bf16 operands (they are stored as
uint16 there), so the launchers set UPCAST and the kernels widen loaded tiles to fp32 before the
dot; G is still rounded to the input dtype first, so the interpreter computes what the GPU does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Floor for log-probabilities (kMinLog of the header): -FLT_MAX.
MIN_LOG: tl.constexpr = tl.constexpr(-3.4028234663852886e38)


# ---------------------------------------------------------------------------------------------
# Tuning (H100-class; every configuration below is compiled by `rlhf-fast inspect`)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TileConfig:
    block_m: int     # rows of hidden per tile
    block_n: int     # vocabulary entries per tile
    block_k: int     # hidden features per MMA step
    num_warps: int
    num_stages: int  # software-pipelining depth of the K loops (operand tiles in shared memory)
    group_m: int     # row blocks that walk the vocabulary together (L2 reuse of W tiles)
    block_kg: int = 0  # backward: hidden features per step of the two gradient GEMMs (0: block_k)

    @property
    def k_step(self) -> int:
        return self.block_kg or self.block_k


# Forward, 16-bit: 128 x 128 tiles on 8 warps (two warpgroups of 64 rows for WGMMA). The fp32
# accumulator is 64 registers per thread and the fold epilogue (exp, max, sums over the tile) about
# as many again: 233-254 registers, no spills; 128 x 256 would double both. At 256 threads x ~250
# registers one program runs per SM, so the grid is sized in SMs (vocab_splits). BLOCK_K = 64:
# a pipeline stage is (128 + 128) x 64 x 2 B = 32 KB, 3 stages = 96 KB of shared memory (two K
# steps in flight while one is consumed). A 128 x 128 tile does 64 MMA flops per byte it loads from
# L2 -- enough for ~770 TFLOP/s at the ~12 TB/s of H100's L2.
FWD_16 = TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, group_m=8)
# fp32 (tf32x3): the hi/lo TF32 halves of both operands sit in registers next to the accumulator;
# BLOCK_K = 16 is the largest step that compiles without spills on sm_80 (48 KB for 3 stages).
FWD_32 = TileConfig(block_m=128, block_n=128, block_k=16, num_warps=8, num_stages=3, group_m=8)
# Backward, 16-bit: the same 128 x 128 logits tile (the atomic traffic per element of dH and dW is
# 1/BLOCK_M + 1/BLOCK_N: for a tile of a given area, least when square). After the recompute G is
# kept in registers in the input dtype (32 per thread; on sm_90a it is WGMMA's register A operand,
# G^T goes through 32 KB of shared memory) and each gradient GEMM walks H in steps of BLOCK_KG = 8:
# (128 x 8) fp32 results, 4 registers per thread on their way to the RED instructions. Steps of 16
# or 32 spill on sm_80 (mma.sync holds G's K = 128 fragments in registers) in the softcap+entropy
# variant; on sm_90a the step only sets WGMMA's N (64x8x16), and these loops are bound by the
# atomics (64 MMA flops per byte of RED), not by MMA issue. The recompute uses BLOCK_K = 32 with 2
# stages (38 KB of shared memory): the epilogue between the loops needs the registers a deeper
# pipeline would hold. 167-253 registers, one program per SM.
BWD_16 = TileConfig(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=2, group_m=8, block_kg=8)
# fp32 backward: tf32x3 triples the operand fragments; 128 x 128 spills ~1 KB on both archs, 128 x 64
# with K steps of 16 / 8 fits (230 registers).
BWD_32 = TileConfig(block_m=128, block_n=64, block_k=16, num_warps=8, num_stages=2, group_m=8, block_kg=8)
# Under the interpreter every tl operation is a numpy call on a whole tile: few, large tiles keep
# the Python-level loops short. BLOCK_M = 32 gives N = 37..96 two or three row blocks, BLOCK_N =
# 512 gives V = 1000 two tiles and V = 32001 63, BLOCK_K = 32 makes H = 64 / 100 take two / four
# K steps (the last ragged). tl.dot has no minimum shape there.
INTERPRET = TileConfig(block_m=32, block_n=512, block_k=32, num_warps=4, num_stages=1, group_m=2)
# Programs the forward grid should fill: SMs on a GPU (one program per SM, see FWD_16); a stand-in
# under the interpreter so that the tests exercise the vocabulary split.
INTERPRET_SLOTS = 4
# Combine kernel: rows per program (a streaming pass over 3 floats per row and split).
COMBINE_BLOCK = 1024
COMBINE_WARPS = 4

# fp32 operands: three TF32 MMAs per product (see the module docstring).
FP32_DOT_PRECISION = "tf32x3"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(dtype: torch.dtype, interpret: bool) -> tuple[TileConfig, TileConfig]:
    """(forward, backward) tile configs."""
    if interpret:
        return INTERPRET, INTERPRET
    return (FWD_32, BWD_32) if dtype == torch.float32 else (FWD_16, BWD_16)


def _dot_precision(dtype: torch.dtype) -> str:
    # Only fp32 x fp32 dots read it; 16-bit operands always run 16-bit MMA.
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) with GROUP_M consecutive row blocks per column of the grid: the programs that
    run at the same time share GROUP_M hidden blocks and a few W tiles in L2 (Triton tutorial 03)."""
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _tanh(x):
    """tanh from tl.exp (libdevice is not available under the interpreter). |x| >= 0.25:
    (1 - e) / (1 + e) with e = exp(-2|x|) <= 0.61, where 1 - e loses at most ~2 bits to e's
    rounding; |x| < 0.25: the odd Taylor series to x^11 (truncation < 1e-8 relative). tanh(+-inf)
    = +-1 and NaN propagates."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    poly = -1382.0 / 155925.0
    poly = 62.0 / 2835.0 + x2 * poly
    poly = -17.0 / 315.0 + x2 * poly
    poly = 2.0 / 15.0 + x2 * poly
    poly = -1.0 / 3.0 + x2 * poly
    small = ax + ax * x2 * poly
    r = tl.where(ax < 0.25, small, big)
    return tl.where(x < 0, -r, r)


@triton.jit
def _raw_logits(hidden_ptr, weight_ptr, row_off, col_off, hdim, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """hidden[rows] @ weight[cols].T as a (BLOCK_M, BLOCK_N) fp32 tile, from the int64 element
    offsets of the rows (row_off = rows * H) and vocabulary rows (col_off = cols * H). All point at
    real rows (padding is masked by the caller), so only the ragged end of H needs a mask (EVEN_K:
    none). Addresses are formed from the offsets at each step rather than carried as (BLOCK, BLOCK_K)
    pointer tensors: those would be 64-bit per element and live across the whole kernel."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, hdim, BLOCK_K):
        a_ptrs = hidden_ptr + row_off[:, None] + (k + offs_k)[None, :]  # (BLOCK_M, BLOCK_K)
        b_ptrs = weight_ptr + col_off[None, :] + (k + offs_k)[:, None]  # (BLOCK_K, BLOCK_N): W^T
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k + k < hdim
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _linear_logprobs_fwd_kernel(
    hidden_ptr,    # (N, H) fp32/bf16/fp16, contiguous
    weight_ptr,    # (V, H) same dtype, contiguous
    bias_ptr,      # (V,) same dtype; only read when HAS_BIAS
    labels_ptr,    # (N,) int64, each in [0, V) or == ignore_index
    order_ptr,     # (N,) int64: a permutation of the rows, kept rows first
    stats_ptr,     # (3, S, N) fp32 out: per split and row m, s, t (t only when RETURN_ENTROPY)
    zlabel_ptr,    # (N,) fp32 out: the label's z, written by the split that holds the label
    n_rows,        # N
    n_vocab,       # V
    hdim,          # H, also the row stride of hidden and weight
    n_splits,      # S: the vocabulary is cut into S ranges of tiles_per_split tiles
    tiles_per_split,
    plane,         # S * N: elements between the m, s and t planes of stats
    inv_temp,      # 1 / T
    softcap,       # c (read when SOFTCAP)
    inv_softcap,   # 1 / c
    ignore_index,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    EVEN_K: tl.constexpr,        # H % BLOCK_K == 0
    UPCAST: tl.constexpr,        # interpreter: widen operands to fp32 before tl.dot
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # One program: BLOCK_M rows x one range of the vocabulary. int64 from the program id on: row,
    # column and plane offsets times H pass 2^31 long before N or V do.
    pid = tl.program_id(0).to(tl.int64)
    pid_m, pid_s = _swizzle(pid, tl.cdiv(n_rows, BLOCK_M), n_splits, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_rows
    rows = tl.load(order_ptr + offs_m, mask=row_ok, other=0)  # padding rows read row 0, masked
    labels = tl.load(labels_ptr + rows)
    live = row_ok & (labels != ignore_index)
    # Kept rows come first in `order`: a block past them has nothing to do (its rows' outputs come
    # from the combine kernel, which never reads their statistics).
    if tl.max(live.to(tl.int32), axis=0) > 0:
        n_tiles = tl.cdiv(n_vocab, BLOCK_N)
        tile_lo = pid_s * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)
        arange_n = tl.arange(0, BLOCK_N)

        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max of z per row
        s = tl.zeros((BLOCK_M,), tl.float32)                # sum exp(z - m)
        t = tl.zeros((BLOCK_M,), tl.float32)                # sum exp(z - m) * (z - m)
        z_label = tl.zeros((BLOCK_M,), tl.float32)
        for tile in range(tile_lo, tile_hi):
            col0 = tile * BLOCK_N
            cols = col0 + arange_n                     # int64
            col_ok = cols < n_vocab
            cols_ld = tl.minimum(cols, n_vocab - 1)    # past V: load row V-1, masked to -inf below
            raw = _raw_logits(hidden_ptr, weight_ptr, rows * hdim, cols_ld * hdim, hdim, DOT_PRECISION, EVEN_K,
                              UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
            if HAS_BIAS:
                raw += tl.load(bias_ptr + cols_ld).to(tl.float32)[None, :]
            if SOFTCAP:
                raw = softcap * _tanh(raw * inv_softcap)
            z = tl.where(col_ok[None, :], raw * inv_temp, float("-inf"))

            # The label's z, if it is in this tile: an int32 compare against the tile-local label
            # (labels are < V; an ignored label is never picked up by a kept row).
            local = (labels - col0).to(tl.int32)
            z_label += tl.sum(tl.where(arange_n[None, :] == local[:, None], z, 0.0), axis=1)

            # Online softmax: move s and t from the old max to the new one. The reference point is
            # 0 while a row has shown nothing finite (so z - ref is never -inf - -inf); clamping the
            # shift at MIN_LOG makes an empty history rescale by exp(-FLT_MAX) = 0, with
            # 0 * shift = 0 rather than 0 * -inf. When the max does not move, alpha == 1 exactly.
            m_new = tl.maximum(m, tl.max(z, axis=1))
            ref = tl.where(m_new > float("-inf"), m_new, 0.0)
            shift = tl.maximum(m - ref, MIN_LOG)
            alpha = tl.exp(shift)
            d = z - ref[:, None]  # <= 0; -inf past V and at -inf logits
            e = tl.exp(d)
            if RETURN_ENTROPY:
                t = alpha * (t + s * shift) + tl.sum(e * tl.maximum(d, MIN_LOG), axis=1)
            s = alpha * s + tl.sum(e, axis=1)
            m = m_new

        out = stats_ptr + pid_s * n_rows + rows
        tl.store(out, m, mask=row_ok)
        tl.store(out + plane, s, mask=row_ok)
        if RETURN_ENTROPY:
            tl.store(out + 2 * plane, t, mask=row_ok)
        here = live & (labels >= tile_lo * BLOCK_N) & (labels < tile_hi * BLOCK_N)
        tl.store(zlabel_ptr + rows, z_label, mask=here)


@triton.jit
def _linear_logprobs_combine_kernel(
    stats_ptr,     # (3, S, N) fp32: m, s, t of each split (t only when RETURN_ENTROPY)
    zlabel_ptr,    # (N,) fp32: the label's z (read for kept rows only)
    labels_ptr,    # (N,) int64
    logprobs_ptr,  # (N,) fp32 out
    entropy_ptr,   # (N,) fp32 out; only touched when RETURN_ENTROPY
    lse_ptr,       # (N,) fp32 out
    n_rows,
    n_splits,
    plane,         # S * N
    ignore_index,
    RETURN_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Merges the S partial statistics of each row (logprobs::merge of the header, vectorized over
    # rows), then writes lse, logprob and entropy. Ignored rows never read their statistics (the
    # forward may have skipped them).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_rows
    labels = tl.load(labels_ptr + offs, mask=ok, other=ignore_index)
    live = ok & (labels != ignore_index)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    t = tl.zeros((BLOCK,), tl.float32)
    for split in range(0, n_splits):
        at = stats_ptr + split * n_rows + offs
        m_i = tl.load(at, mask=live, other=float("-inf"))
        s_i = tl.load(at + plane, mask=live, other=0.0)
        m_new = tl.maximum(m, m_i)
        ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        shift = tl.maximum(m - ref, MIN_LOG)    # clamped: an empty side has s = t = 0
        shift_i = tl.maximum(m_i - ref, MIN_LOG)
        a = tl.exp(shift)
        a_i = tl.exp(shift_i)
        if RETURN_ENTROPY:
            t_i = tl.load(at + 2 * plane, mask=live, other=0.0)
            t = a * (t + s * shift) + a_i * (t_i + s_i * shift_i)
        s = a * s + a_i * s_i
        m = m_new
    has_mass = s > 0.0  # false only for a row of all -inf logits
    s_safe = tl.where(has_mass, s, 1.0)
    lse = tl.where(has_mass, m + tl.log(s_safe), float("-inf"))
    z_label = tl.load(zlabel_ptr + offs, mask=live, other=0.0)
    logprob = tl.where(has_mass, z_label - tl.where(has_mass, lse, 0.0), float("-inf"))
    tl.store(lse_ptr + offs, tl.where(live, lse, float("-inf")), mask=ok)
    tl.store(logprobs_ptr + offs, tl.where(live, logprob, 0.0), mask=ok)
    if RETURN_ENTROPY:
        entropy = tl.maximum(tl.log(s_safe) - t / s_safe, 0.0)  # clamp fp32 rounding below zero
        tl.store(entropy_ptr + offs, tl.where(live & has_mass, entropy, 0.0), mask=ok)


@triton.jit
def _has_grad(rows, row_ok, labels_ptr, lse_ptr, ignore_index):
    """logprobs::row_has_grad per row: a kept label and finite mass (padding rows: False)."""
    labels = tl.load(labels_ptr + rows)
    lse = tl.load(lse_ptr + rows)
    return row_ok & (labels != ignore_index) & (lse > float("-inf"))


@triton.jit
def _linear_logprobs_bwd_kernel(
    grad_logprobs_ptr,  # (N,) fp32 upstream gradient of the log-probs
    grad_entropy_ptr,   # (N,) fp32 upstream gradient of the entropy; only read when HAS_GRAD_ENTROPY
    hidden_ptr,         # (N, H) fp32/bf16/fp16, contiguous
    weight_ptr,         # (V, H) same dtype, contiguous
    bias_ptr,           # (V,) same dtype; only read when HAS_BIAS
    labels_ptr,         # (N,) int64
    order_ptr,          # (N,) int64: a permutation of the rows, kept rows first
    lse_ptr,            # (N,) fp32 saved by the forward
    entropy_ptr,        # (N,) fp32 saved by the forward; only read when HAS_GRAD_ENTROPY
    grad_hidden_ptr,    # (N, H) fp32, zero-initialized, accumulated with atomics
    grad_weight_ptr,    # (V, H) fp32, zero-initialized, accumulated with atomics
    grad_bias_ptr,      # (V,) fp32, zero-initialized; only touched when HAS_BIAS
    n_rows,
    n_vocab,
    hdim,
    inv_temp,
    softcap,
    inv_softcap,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KG: tl.constexpr,      # H step of the gradient GEMMs
    GROUP_M: tl.constexpr,
):
    # One program: one (BLOCK_M rows, BLOCK_N vocabulary entries) tile.
    pid = tl.program_id(0).to(tl.int64)
    pid_m, pid_n = _swizzle(pid, tl.cdiv(n_rows, BLOCK_M), tl.cdiv(n_vocab, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(order_ptr + offs_m, mask=offs_m < n_rows, other=0)
    live = _has_grad(rows, offs_m < n_rows, labels_ptr, lse_ptr, ignore_index)
    if tl.max(live.to(tl.int32), axis=0) > 0:
        col0 = pid_n * BLOCK_N
        arange_n = tl.arange(0, BLOCK_N)
        cols = col0 + arange_n
        col_ok = cols < n_vocab
        cols_ld = tl.minimum(cols, n_vocab - 1)
        row_off = rows * hdim     # int64 element offsets of the tile's rows in hidden / grad_hidden
        col_off = cols_ld * hdim  # and of its vocabulary rows in weight / grad_weight
        raw = _raw_logits(hidden_ptr, weight_ptr, row_off, col_off, hdim, DOT_PRECISION, EVEN_K, UPCAST,
                          BLOCK_M, BLOCK_N, BLOCK_K)

        # The per-row values are read after the K loop, not kept from before it: on sm_80 the
        # pipelined MMA loop needs nearly all 255 registers, and values carried across it spill
        # (checked with rlhf-fast inspect). The reads are L1/L2 hits.
        live = _has_grad(rows, offs_m < n_rows, labels_ptr, lse_ptr, ignore_index)
        # Rows without a gradient get lse = +inf, so p = exp(max(z - lse, MIN_LOG)) = 0 across the
        # row, and zero upstream gradients: their G is exactly 0 without a per-element select.
        lse = tl.where(live, tl.load(lse_ptr + rows), float("inf"))
        g_lp = tl.where(live, tl.load(grad_logprobs_ptr + rows), 0.0)
        if HAS_BIAS:
            raw += tl.load(bias_ptr + cols_ld).to(tl.float32)[None, :]
        # z exactly as the forward formed it (same operations, same order), so that p is
        # consistent with the saved lse to the last bit (a vocabulary of one gives p = 1 exactly).
        if SOFTCAP:
            u = _tanh(raw * inv_softcap)
            raw = softcap * u
        z = tl.where(col_ok[None, :], raw * inv_temp, float("-inf"))  # past V: p = 0, so G = 0 too

        # dL/dz = g_lp ([j == y] - p) - g_H p (log p + H) (logprobs::grad_logit), written as
        # -(p * (g_lp + g_H H) + g_H * (p * log p)): one per-row factor fewer, and p * log p is
        # formed first so that p = 0 meets log p = MIN_LOG as 0, never g_H * MIN_LOG = inf.
        log_p = tl.maximum(z - lse[:, None], MIN_LOG)
        p = tl.exp(log_p)
        if HAS_GRAD_ENTROPY:
            g_ent = tl.where(live, tl.load(grad_entropy_ptr + rows), 0.0)
            row_factor = g_lp + g_ent * tl.where(live, tl.load(entropy_ptr + rows), 0.0)
            g = -(p * row_factor[:, None] + g_ent[:, None] * (p * log_p))
        else:
            g = -p * g_lp[:, None]
        local = (tl.load(labels_ptr + rows) - col0).to(tl.int32)  # the label's column in this tile
        g += tl.where(arange_n[None, :] == local[:, None], g_lp[:, None], 0.0)
        # Chain rule to the raw logit: 1/T, and the softcap's derivative 1 - tanh^2.
        if SOFTCAP:
            g = g * (inv_temp * (1.0 - u * u))
        else:
            g = g * inv_temp
        if HAS_BIAS:
            tl.atomic_add(grad_bias_ptr + cols, tl.sum(g, axis=0), mask=col_ok, sem="relaxed")

        # G rounded once to the operand dtype (fp32 stays fp32 and runs tf32x3).
        g_op = g.to(hidden_ptr.dtype.element_ty)
        if UPCAST:
            g_op = g_op.to(tl.float32)
        offs_k = tl.arange(0, BLOCK_KG)
        # dH[rows] += G @ W[cols]: (BLOCK_M, BLOCK_N) @ (BLOCK_N, BLOCK_KG) per step of H. Relaxed
        # atomics: the adds need atomicity, not ordering (RED, no fences). Rows without a gradient
        # and padding rows (which alias row 0 of `order`) are masked off.
        for k in range(0, hdim, BLOCK_KG):
            ks = k + offs_k
            if EVEN_K:
                w = tl.load(weight_ptr + col_off[:, None] + ks[None, :])
                mask = live[:, None]
            else:
                k_ok = ks < hdim
                w = tl.load(weight_ptr + col_off[:, None] + ks[None, :], mask=k_ok[None, :], other=0.0)
                mask = live[:, None] & k_ok[None, :]
            if UPCAST:
                w = w.to(tl.float32)
            tl.atomic_add(grad_hidden_ptr + row_off[:, None] + ks[None, :],
                          tl.dot(g_op, w, input_precision=DOT_PRECISION), mask=mask, sem="relaxed")
        # dW[cols] += G^T @ hidden[rows]: (BLOCK_N, BLOCK_M) @ (BLOCK_M, BLOCK_KG) per step of H
        # (G^T is a view of the shared-memory copy of G on the GPU).
        g_t = tl.trans(g_op)
        for k in range(0, hdim, BLOCK_KG):
            ks = k + offs_k
            if EVEN_K:
                h = tl.load(hidden_ptr + row_off[:, None] + ks[None, :])
                mask = col_ok[:, None]
            else:
                k_ok = ks < hdim
                h = tl.load(hidden_ptr + row_off[:, None] + ks[None, :], mask=k_ok[None, :], other=0.0)
                mask = col_ok[:, None] & k_ok[None, :]
            if UPCAST:
                h = h.to(tl.float32)
            tl.atomic_add(grad_weight_ptr + col_off[:, None] + ks[None, :],
                          tl.dot(g_t, h, input_precision=DOT_PRECISION), mask=mask, sem="relaxed")


# ---------------------------------------------------------------------------------------------
# Launch configuration: shared by the launchers and aot_specs(), so that what is compiled ahead of
# time is what runs.
# ---------------------------------------------------------------------------------------------

def vocab_splits(row_blocks: int, n_tiles: int, slots: int, group_m: int) -> tuple[int, int]:
    """(S, tiles per split) of the forward grid: row_blocks x S programs, ordered by _swizzle in
    groups of group_m row blocks x S splits.

    S = slots // group_m makes one group one wave of `slots` concurrent programs (one per SM), so
    what is live in L2 at a time is group_m hidden blocks (1 MB each at BLOCK_M = 128, H = 4096,
    bf16) plus S weight tiles that the group_m programs of a split read in step (1 MB each): 24 MB
    at 8 x 16 on an H100, inside its 50 MB L2. Every W tile then comes from HBM once per group
    (V H b x N / (BLOCK_M group_m): 8.4 GB at N = 8192, 2.5 ms at 3.35 TB/s, overlapped with 8.7 ms
    of MMA) and every hidden block once per split range. Few row blocks (short batches) get more
    splits, up to one vocabulary tile each, so that the GPU still fills.
    """
    splits = max(1, min(n_tiles, slots // max(1, min(row_blocks, group_m))))
    per = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, per), per


def _slots(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRET_SLOTS


def _fwd_launch(hidden, weight, bias, labels, order, stats, z_label, temperature, softcap, ignore_index,
                return_entropy, slots, interpret):
    """Keyword arguments, constexprs, tile config and grid of the forward kernel, and its split S
    (the stats buffer is (2 or 3, S, N))."""
    n_rows, hdim = hidden.shape
    n_vocab = weight.shape[0]
    cfg, _ = _configs(hidden.dtype, interpret)
    row_blocks = triton.cdiv(n_rows, cfg.block_m)
    n_splits, per = vocab_splits(row_blocks, triton.cdiv(n_vocab, cfg.block_n), slots, cfg.group_m)
    cap = 1.0 if softcap is None else float(softcap)  # unread without SOFTCAP
    args = dict(hidden_ptr=hidden, weight_ptr=weight, bias_ptr=bias if bias is not None else hidden,
                labels_ptr=labels, order_ptr=order, stats_ptr=stats, zlabel_ptr=z_label, n_rows=n_rows,
                n_vocab=n_vocab, hdim=hdim, n_splits=n_splits, tiles_per_split=per, plane=n_splits * n_rows,
                inv_temp=1.0 / temperature, softcap=cap, inv_softcap=1.0 / cap, ignore_index=ignore_index)
    constexprs = dict(HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, RETURN_ENTROPY=bool(return_entropy),
                      EVEN_K=hdim % cfg.block_k == 0, UPCAST=interpret, DOT_PRECISION=_dot_precision(hidden.dtype),
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
    return args, constexprs, cfg, (row_blocks * n_splits,), n_splits


def _combine_launch(stats, z_label, labels, logprobs, entropy, lse, n_splits, ignore_index, return_entropy):
    """Keyword arguments, constexprs and grid of the combine kernel."""
    n_rows = labels.shape[0]
    args = dict(stats_ptr=stats, zlabel_ptr=z_label, labels_ptr=labels, logprobs_ptr=logprobs,
                entropy_ptr=entropy if entropy is not None else lse, lse_ptr=lse, n_rows=n_rows, n_splits=n_splits,
                plane=n_splits * n_rows, ignore_index=ignore_index)
    constexprs = dict(RETURN_ENTROPY=bool(return_entropy), BLOCK=COMBINE_BLOCK)
    return args, constexprs, (triton.cdiv(n_rows, COMBINE_BLOCK),)


def _bwd_launch(grad_logprobs, grad_entropy, hidden, weight, bias, labels, order, lse, entropy, grad_hidden,
                grad_weight, grad_bias, temperature, softcap, ignore_index, interpret):
    """Keyword arguments, constexprs, tile config and grid of the backward kernel."""
    n_rows, hdim = hidden.shape
    n_vocab = weight.shape[0]
    _, cfg = _configs(hidden.dtype, interpret)
    with_entropy = grad_entropy is not None
    cap = 1.0 if softcap is None else float(softcap)
    # Placeholders fill the pointer slots the constexprs compile out.
    args = dict(grad_logprobs_ptr=grad_logprobs, grad_entropy_ptr=grad_entropy if with_entropy else grad_logprobs,
                hidden_ptr=hidden, weight_ptr=weight, bias_ptr=bias if bias is not None else hidden,
                labels_ptr=labels, order_ptr=order, lse_ptr=lse, entropy_ptr=entropy if with_entropy else lse,
                grad_hidden_ptr=grad_hidden, grad_weight_ptr=grad_weight,
                grad_bias_ptr=grad_bias if grad_bias is not None else grad_hidden, n_rows=n_rows, n_vocab=n_vocab,
                hdim=hdim, inv_temp=1.0 / temperature, softcap=cap, inv_softcap=1.0 / cap,
                ignore_index=ignore_index)
    constexprs = dict(HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, HAS_GRAD_ENTROPY=with_entropy,
                      EVEN_K=hdim % max(cfg.block_k, cfg.k_step) == 0, UPCAST=interpret,
                      DOT_PRECISION=_dot_precision(hidden.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      BLOCK_K=cfg.block_k, BLOCK_KG=cfg.k_step, GROUP_M=cfg.group_m)
    grid = (triton.cdiv(n_rows, cfg.block_m) * triton.cdiv(n_vocab, cfg.block_n),)
    return args, constexprs, cfg, grid


def _kept_first(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Row order with kept rows first (stable), int64: one small sort, no host sync."""
    return torch.argsort((labels == ignore_index).to(torch.int8), stable=True)


def _check(hidden, weight, bias, labels):
    assert hidden.dim() == 2 and hidden.is_contiguous(), "hidden must be a contiguous (N, H) tensor"
    assert weight.dim() == 2 and weight.is_contiguous() and weight.shape[1] == hidden.shape[1]
    assert weight.dtype == hidden.dtype and hidden.dtype in (torch.float32, torch.bfloat16, torch.float16)
    assert bias is None or (bias.shape == weight.shape[:1] and bias.dtype == hidden.dtype)
    assert labels.dtype == torch.int64 and labels.shape == hidden.shape[:1]


# ---------------------------------------------------------------------------------------------
# Launchers (called by rlhf_fast/ops/linear_logprobs.py)
# ---------------------------------------------------------------------------------------------

def linear_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                        temperature: float, softcap: float | None, ignore_index: int, return_entropy: bool):
    """Forward: hidden (N, H), weight (V, H), bias (V,) or None (contiguous, one dtype of fp32 /
    bf16 / fp16), labels (N,) int64 already range-checked; softcap None for no cap. Returns fp32
    (logprobs (N,), entropy (N,) or None, lse (N,)); lse is -inf on ignored rows."""
    _check(hidden, weight, bias, labels)
    n_rows = hidden.shape[0]
    labels = labels.contiguous()
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logprobs = torch.empty(n_rows, **f32)
    lse = torch.empty(n_rows, **f32)
    entropy = torch.empty(n_rows, **f32) if return_entropy else None
    if n_rows == 0:
        return logprobs, entropy, lse
    interpret = _interpret()
    cfg, _ = _configs(hidden.dtype, interpret)
    n_splits, _ = vocab_splits(triton.cdiv(n_rows, cfg.block_m), triton.cdiv(weight.shape[0], cfg.block_n),
                               _slots(hidden.device), cfg.group_m)
    stats = torch.empty((3 if return_entropy else 2, n_splits, n_rows), **f32)  # m, s (, t) per split
    z_label = torch.empty(n_rows, **f32)
    order = _kept_first(labels, ignore_index)
    args, constexprs, cfg, grid, _ = _fwd_launch(hidden, weight, bias.contiguous() if bias is not None else None,
                                                 labels, order, stats, z_label, temperature, softcap, ignore_index,
                                                 return_entropy, _slots(hidden.device), interpret)
    _linear_logprobs_fwd_kernel[grid](**args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    args, constexprs, grid = _combine_launch(stats, z_label, labels, logprobs, entropy, lse, n_splits, ignore_index,
                                             return_entropy)
    _linear_logprobs_combine_kernel[grid](**args, **constexprs, num_warps=COMBINE_WARPS, num_stages=1)
    return logprobs, entropy, lse


def linear_logprobs_bwd(grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None, hidden: torch.Tensor,
                        weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, lse: torch.Tensor,
                        entropy: torch.Tensor, temperature: float, softcap: float | None, ignore_index: int):
    """Backward: (grad_hidden (N, H), grad_weight (V, H), grad_bias (V,) or None) in the inputs'
    dtype. grad_logprobs (N,) fp32; grad_entropy (N,) fp32 or None (then the entropy term is
    compiled out and `entropy` is unread); lse (and entropy) as returned by the forward."""
    _check(hidden, weight, bias, labels)
    n_rows = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    # fp32 accumulators of the atomics (for fp32 inputs, the outputs themselves: .to() is a no-op).
    grad_hidden = torch.zeros(hidden.shape, **f32)
    grad_weight = torch.zeros(weight.shape, **f32)
    grad_bias = torch.zeros(weight.shape[0], **f32) if bias is not None else None
    if n_rows > 0:
        labels = labels.contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.float().contiguous()
            entropy = entropy.float().contiguous()
        args, constexprs, cfg, grid = _bwd_launch(
            grad_logprobs.float().contiguous(), grad_entropy, hidden, weight,
            bias.contiguous() if bias is not None else None, labels, _kept_first(labels, ignore_index),
            lse.float().contiguous(), entropy, grad_hidden, grad_weight, grad_bias, temperature, softcap,
            ignore_index, _interpret())
        _linear_logprobs_bwd_kernel[grid](**args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dtype = hidden.dtype
    return grad_hidden.to(dtype), grad_weight.to(dtype), (grad_bias.to(dtype) if grad_bias is not None else None)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs (compiled and inspected by rlhf_fast.kernels._aot, no GPU needed)
# ---------------------------------------------------------------------------------------------

# Llama-3 (128256) and Llama-2/Mistral (32000) vocabularies at H = 4096. Both are multiples of 16
# (as is H), so they specialize identically and share one compiled kernel per variant.
AOT_SHAPES = ((4096, 128256), (4096, 32000))
AOT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (entropy, softcap) variants compiled per dtype: both off and both on for every dtype, and the
# two mixed ones for bf16 (the training dtype). The bias variant only adds a load and an add.
AOT_VARIANTS = {torch.bfloat16: ((False, False), (True, False), (False, True), (True, True)),
                torch.float16: ((False, False), (True, True)),
                torch.float32: ((False, False), (True, True))}
AOT_SMS = 132  # H100 SXM


def aot_specs(shapes=AOT_SHAPES, dtypes=AOT_DTYPES, n_rows: int = 8192):
    """The kernel configurations the launchers use on an H100 for `shapes` x `dtypes` (variants in
    AOT_VARIANTS), built by the launchers' own argument builders on meta tensors and specialized as
    triton.jit does at launch, so they cannot drift from what runs. Always the GPU configuration,
    also when this process runs under the interpreter (specs are only built there)."""
    from rlhf_fast.kernels._aot import KernelSpec, SpecSet, spec_from_args

    meta = dict(device="meta")
    specs = SpecSet()

    def add(spec: KernelSpec, shape: str, tensor_cores: bool) -> None:
        spec.requires_tensor_cores = tensor_cores
        specs.add(spec, shape)

    labels = torch.empty((n_rows,), dtype=torch.int64, **meta)
    vec = torch.empty((n_rows,), dtype=torch.float32, **meta)
    for dtype in dtypes:
        for hdim, vocab in shapes:
            hidden = torch.empty((n_rows, hdim), dtype=dtype, **meta)
            weight = torch.empty((vocab, hdim), dtype=dtype, **meta)
            grad_hidden = torch.empty((n_rows, hdim), dtype=torch.float32, **meta)
            grad_weight = torch.empty((vocab, hdim), dtype=torch.float32, **meta)
            shape = f"{str(dtype).removeprefix('torch.')} H={hdim} V={vocab}"
            for ent, cap in AOT_VARIANTS[dtype]:
                softcap = 30.0 if cap else None
                suffix = ("+entropy" if ent else "") + ("+softcap" if cap else "")
                args, constexprs, cfg, _, _ = _fwd_launch(hidden, weight, None, labels, labels, vec, vec, 1.0, softcap,
                                                          -100, ent, AOT_SMS, False)
                add(spec_from_args(f"linear_logprobs_fwd{suffix}", _linear_logprobs_fwd_kernel, args, constexprs,
                                   cfg.num_warps, cfg.num_stages), shape, True)
                args, constexprs, cfg, _ = _bwd_launch(vec, vec if ent else None, hidden, weight, None, labels, labels,
                                                       vec, vec, grad_hidden, grad_weight, None, 1.0, softcap, -100,
                                                       False)
                add(spec_from_args(f"linear_logprobs_bwd{suffix}", _linear_logprobs_bwd_kernel, args, constexprs,
                                   cfg.num_warps, cfg.num_stages), shape, True)
    # The combine kernel does not depend on dtype, H or V (16 splits: the N = 8192 H100 grid).
    for ent in (False, True):
        args, constexprs, _ = _combine_launch(vec, vec, labels, vec, vec if ent else None, vec, 16, -100, ent)
        add(spec_from_args("linear_logprobs_combine" + ("+entropy" if ent else ""), _linear_logprobs_combine_kernel,
                           args, constexprs, COMBINE_WARPS, 1), f"N={n_rows} any dtype, H, V", False)
    return specs.specs()
