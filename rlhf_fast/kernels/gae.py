"""Triton kernels of gae: generalized advantage estimation over packed sequences with masked positions.

Cost model, N tokens of S sequences, rewards and values of b bytes: the Python loop over time steps
(what trainers write) launches ~8 kernels per step, T * 8 launches for a (B, T) batch whatever B is --
at T = 2048 that is ~16K launches, ~100 ms of launch latency on a GPU for ~5 MB of data. Here one
launch reads rewards, values and mask once and writes advantages and returns once: (2b + 1 + 8) N
bytes, ~4.7 MB at (256, 2048) fp32 (~2 us of H100 bandwidth); whitening adds two tiny launches and one
read + write of the advantages.

Parallel form (rlhf_fast/gae_math.h, shared with the CPU and CUDA kernels). Position t is an affine
map of the carry (A', V') = (advantage, value) at the next valid position:
    valid:  (A', V') -> ((r_t - V_t) + gamma * lam * A' + gamma * V',  V_t)
    masked: the identity (its reward and value are never used)
Maps compose into maps of the same 5-number form (dA, a, b, dV, e): (A, V) -> (dA + a A + b V,
dV + e V). One program walks its sequence from the end in blocks of BLOCK positions: it loads a
block in DESCENDING position order, so that a forward tl.associative_scan composes each position's
map with those to its right (a reverse=True scan would be the natural choice, but Triton's reverse
scan is wrong for non-commutative combines, triton-lang/triton#4362), applies the scanned maps to
the carry coming from the block to its right, and passes the carry of its first position on.

Whitening: each program also folds its valid advantages into (count, mean, M2) block by block
(Chan's merge); a one-program kernel merges the S triples into the batch mean and 1 / sqrt(var +
1e-8) (unbiased variance, 0 below two valid tokens); a last element-wise kernel applies them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

WHITEN_EPS = 1e-8

# Tuning. Scan block: next_power_of_2 of the mean sequence length, in [MIN_BLOCK, MAX_BLOCK]; one warp
# per 256 positions (8 positions and 5 scan values per thread per block, ~40 fp32 registers of state).
MIN_BLOCK = 32
MAX_BLOCK = 1024
POSITIONS_PER_WARP = 256
# Element-wise whitening pass and the merge of per-sequence moments.
APPLY_BLOCK = 1024
MERGE_BLOCK = 1024


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _gae_compose(dA_r, a_r, b_r, dV_r, e_r, dA_l, a_l, b_l, dV_l, e_l):
    # (left o right): `right` (positions to the right, scanned first) applied first, then `left`.
    return (dA_l + a_l * dA_r + b_l * dV_r, a_l * a_r, a_l * b_r + b_l * e_r, dV_l + e_l * dV_r, e_l * e_r)


@triton.jit
def _gae_fwd_kernel(
    rewards_ptr,     # (N,) fp32/bf16/fp16, packed sequences
    values_ptr,      # (N,) same dtype as rewards
    mask_ptr,        # (N,) bool: position takes part
    cu_seqlens_ptr,  # (S+1,) int64 offsets
    adv_ptr,         # (N,) fp32 out: advantages (0 at masked positions)
    ret_ptr,         # (N,) fp32 out: returns = advantages + values (0 at masked positions)
    moments_ptr,     # (S, 3) fp32 out: (count, mean, M2) of each sequence's valid advantages; WHITEN only
    gamma,
    gamma_lam,
    WHITEN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    start = tl.load(cu_seqlens_ptr + seq)
    end = tl.load(cu_seqlens_ptr + seq + 1)
    idx = tl.arange(0, BLOCK)
    # Carry: advantage and value at the next valid position (0 past the end of the sequence).
    carry_a = tl.zeros((), dtype=tl.float32)
    carry_v = tl.zeros((), dtype=tl.float32)
    count = tl.zeros((), dtype=tl.float32)
    mean = tl.zeros((), dtype=tl.float32)
    m2 = tl.zeros((), dtype=tl.float32)
    for off in range(0, end - start, BLOCK):
        pos = end - 1 - off - idx                     # descending: element i is to the left of i - 1
        inside = pos >= start
        valid = tl.load(mask_ptr + pos, mask=inside, other=0) != 0
        r = tl.load(rewards_ptr + pos, mask=inside, other=0.0).to(tl.float32)
        v = tl.load(values_ptr + pos, mask=inside, other=0.0).to(tl.float32)
        # Each position's map; masked positions (and lanes past the start) are the identity. Selected,
        # never multiplied by the mask: masked rewards and values may hold anything, NaN included.
        dA = tl.where(valid, r - v, 0.0)
        a = tl.where(valid, gamma_lam, 1.0)
        b = tl.where(valid, gamma, 0.0)
        dV = tl.where(valid, v, 0.0)
        e = tl.where(valid, 0.0, 1.0)
        dA, a, b, dV, e = tl.associative_scan((dA, a, b, dV, e), 0, _gae_compose)
        adv_all = dA + a * carry_a + b * carry_v      # advantage at (or passed through) each position
        val_all = dV + e * carry_v
        adv = tl.where(valid, adv_all, 0.0)
        tl.store(adv_ptr + pos, adv, mask=inside)
        tl.store(ret_ptr + pos, tl.where(valid, adv_all + v, 0.0), mask=inside)
        # The block's leftmost element carries into the next block (lanes past the start are identities).
        first = idx == BLOCK - 1
        carry_a = tl.sum(tl.where(first, adv_all, 0.0), axis=0)
        carry_v = tl.sum(tl.where(first, val_all, 0.0), axis=0)
        if WHITEN:
            # Block moments (two passes over registers), then Chan's merge into the running ones.
            n_b = tl.sum(valid.to(tl.float32), axis=0)
            mean_b = tl.sum(adv, axis=0) / tl.maximum(n_b, 1.0)
            dev = tl.where(valid, adv - mean_b, 0.0)
            m2_b = tl.sum(dev * dev, axis=0)
            n_new = count + n_b
            w = n_b / tl.maximum(n_new, 1.0)
            d = mean_b - mean
            mean = mean + d * w
            m2 = m2 + m2_b + d * d * count * w
            count = n_new
    if WHITEN:
        tl.store(moments_ptr + seq * 3, count)
        tl.store(moments_ptr + seq * 3 + 1, mean)
        tl.store(moments_ptr + seq * 3 + 2, m2)


@triton.jit
def _gae_merge_moments_kernel(
    moments_ptr,  # (S, 3) fp32: (count, mean, M2) per sequence
    out_ptr,      # (2,) fp32 out: (batch mean, 1 / sqrt(unbiased var + eps))
    n_seq,
    eps,
    BLOCK: tl.constexpr,
):
    # One program. Two passes over the triples: count and mean, then M2 = sum M2_i + n_i (mean_i - mean)^2.
    idx = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    weighted = tl.zeros((BLOCK,), dtype=tl.float32)
    for s0 in range(0, n_seq, BLOCK):
        s = s0 + idx
        inside = s < n_seq
        n_i = tl.load(moments_ptr + s * 3, mask=inside, other=0.0)
        total += n_i
        weighted += n_i * tl.load(moments_ptr + s * 3 + 1, mask=inside, other=0.0)
    n = tl.sum(total, axis=0)
    mean = tl.sum(weighted, axis=0) / tl.maximum(n, 1.0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s0 in range(0, n_seq, BLOCK):
        s = s0 + idx
        inside = s < n_seq
        n_i = tl.load(moments_ptr + s * 3, mask=inside, other=0.0)
        d = tl.load(moments_ptr + s * 3 + 1, mask=inside, other=0.0) - mean
        acc += tl.load(moments_ptr + s * 3 + 2, mask=inside, other=0.0) + n_i * d * d
    m2 = tl.sum(acc, axis=0)
    var = tl.where(n >= 2.0, m2 / tl.maximum(n - 1.0, 1.0), 0.0)
    tl.store(out_ptr, mean)
    tl.store(out_ptr + 1, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _gae_whiten_kernel(
    adv_ptr,    # (N,) fp32, advantages, whitened in place (masked positions stay 0)
    mask_ptr,   # (N,) bool
    stats_ptr,  # (2,) fp32: (mean, rstd) from _gae_merge_moments_kernel
    total,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < total
    valid = tl.load(mask_ptr + offs, mask=inside, other=0) != 0
    adv = tl.load(adv_ptr + offs, mask=inside, other=0.0)
    mean = tl.load(stats_ptr)
    rstd = tl.load(stats_ptr + 1)
    tl.store(adv_ptr + offs, tl.where(valid, (adv - mean) * rstd, 0.0), mask=inside)


# ---------------------------------------------------------------------------------------------
# Launch configuration (shared by the launcher and aot_specs)
# ---------------------------------------------------------------------------------------------

def launch_config(total: int, n_seq: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the scan for `n_seq` sequences of `total` tokens in all: BLOCK covers a
    mean-length sequence in one block (a power of two in [MIN_BLOCK, MAX_BLOCK]); longer ones loop."""
    mean_len = -(-total // max(n_seq, 1))
    block = min(max(triton.next_power_of_2(max(mean_len, 1)), MIN_BLOCK), MAX_BLOCK)
    return block, max(1, block // POSITIONS_PER_WARP)


def _fwd_launch(rewards, values, mask, cu_seqlens, adv, ret, moments, gamma, lam, whiten):
    n_seq = cu_seqlens.numel() - 1
    block, num_warps = launch_config(rewards.numel(), n_seq)
    args = dict(rewards_ptr=rewards, values_ptr=values, mask_ptr=mask, cu_seqlens_ptr=cu_seqlens, adv_ptr=adv,
                ret_ptr=ret, moments_ptr=moments, gamma=float(gamma), gamma_lam=float(gamma * lam))
    return args, dict(WHITEN=bool(whiten), BLOCK=block), num_warps, (n_seq,)


def _merge_launch(moments, stats, n_seq):
    return dict(moments_ptr=moments, out_ptr=stats, n_seq=n_seq, eps=WHITEN_EPS), dict(BLOCK=MERGE_BLOCK), 4, (1,)


def _whiten_launch(adv, mask, stats):
    total = adv.numel()
    args = dict(adv_ptr=adv, mask_ptr=mask, stats_ptr=stats, total=total)
    return args, dict(BLOCK=APPLY_BLOCK), 4, (triton.cdiv(total, APPLY_BLOCK),)


# ---------------------------------------------------------------------------------------------
# Launcher (called by rlhf_fast/ops/gae.py)
# ---------------------------------------------------------------------------------------------

def gae_fwd(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor,
            gamma: float, lam: float, whiten: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards, values (N,) of one float dtype, mask (N,) bool, cu_seqlens (S+1,) int64 (values already
    checked), all contiguous. Returns fp32 (advantages (N,), returns (N,))."""
    assert rewards.dim() == 1 and rewards.is_contiguous() and values.dtype == rewards.dtype
    assert mask.dtype == torch.bool and cu_seqlens.dtype == torch.int64
    total, n_seq = rewards.numel(), cu_seqlens.numel() - 1
    adv = torch.empty(total, dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if total == 0 or n_seq == 0:
        return adv, ret
    moments = torch.empty((n_seq, 3) if whiten else (1, 3), dtype=torch.float32, device=rewards.device)
    args, constexprs, num_warps, grid = _fwd_launch(rewards, values, mask, cu_seqlens, adv, ret, moments, gamma,
                                                    lam, whiten)
    _gae_fwd_kernel[grid](**args, **constexprs, num_warps=num_warps)
    if whiten:
        stats = torch.empty(2, dtype=torch.float32, device=rewards.device)
        args, constexprs, num_warps, grid = _merge_launch(moments, stats, n_seq)
        _gae_merge_moments_kernel[grid](**args, **constexprs, num_warps=num_warps)
        args, constexprs, num_warps, grid = _whiten_launch(adv, mask, stats)
        _gae_whiten_kernel[grid](**args, **constexprs, num_warps=num_warps)
    return adv, ret


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs (compiled and inspected by rlhf_fast.kernels._aot, no GPU needed)
# ---------------------------------------------------------------------------------------------

# (sequences, tokens): the padded (256, 2048) benchmark batch and short packed sequences.
AOT_SHAPES = ((256, 256 * 2048), (64, 64 * 200))
AOT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def aot_specs(shapes=AOT_SHAPES, dtypes=AOT_DTYPES):
    """The distinct configurations the launcher uses for `shapes` x `dtypes`, with and without
    whitening, plus the two whitening kernels; built from the launcher's own argument builders on
    meta tensors."""
    from rlhf_fast.kernels._aot import SpecSet, spec_from_args

    meta = dict(device="meta")
    specs = SpecSet()
    add = specs.add

    for dtype in dtypes:
        for n_seq, total in shapes:
            x = torch.empty(total, dtype=dtype, **meta)
            f32 = torch.empty(total, dtype=torch.float32, **meta)
            mask = torch.empty(total, dtype=torch.bool, **meta)
            cu = torch.empty(n_seq + 1, dtype=torch.int64, **meta)
            moments = torch.empty((n_seq, 3), dtype=torch.float32, **meta)
            for whiten in (False, True):
                args, constexprs, warps, _ = _fwd_launch(x, x, mask, cu, f32, f32, moments, 0.99, 0.95, whiten)
                name = "gae_fwd" + ("+whiten" if whiten else "")
                add(spec_from_args(name, _gae_fwd_kernel, args, constexprs, warps, 1),
                    f"{str(dtype).removeprefix('torch.')} S={n_seq} N={total}")
    stats = torch.empty(2, dtype=torch.float32, **meta)
    moments = torch.empty((256, 3), dtype=torch.float32, **meta)
    args, constexprs, warps, _ = _merge_launch(moments, stats, 256)
    add(spec_from_args("gae_merge_moments", _gae_merge_moments_kernel, args, constexprs, warps, 1), "S=256")
    f32 = torch.empty(256 * 2048, dtype=torch.float32, **meta)
    mask = torch.empty(256 * 2048, dtype=torch.bool, **meta)
    args, constexprs, warps, _ = _whiten_launch(f32, mask, stats)
    add(spec_from_args("gae_whiten", _gae_whiten_kernel, args, constexprs, warps, 1), "N=524288")
    return specs.specs()
