"""Triton kernels of ranking_loss (and pairwise_loss, its K = 2 case): the reward model's K-wise loss.

Cost model, P prompts of K candidates: the eager vectorized loss materializes about ten (P, K, K)
fp32 pair matrices per pass (differences, softplus, masks, products; 40 * P * K^2 bytes moved) over
~15 launches forward and ~20 backward; a per-pair Python loop is ~6 launches per pair. Here the
forward is one launch that reads the P * K rewards once and keeps each prompt's K x K pairs in
registers (a (BLOCK_P, BLOCK_K, BLOCK_K) tile per program), plus a one-program launch that adds the
per-program sums in a fixed order (deterministic); the backward is one launch that recomputes the
pairs from the rewards and writes the gradient once. Both are launch-latency bound at InstructGPT
sizes (P = 1024, K = 9: 37 KB of rewards).

Math (rlhf_fast/ranking_math.h, shared with the CPU and CUDA kernels): candidate i is above j when its
key (rank, or position without ranks) is smaller; each such pair of a prompt with margin m adds
softplus(m - (r_i - r_j)) = max(x, 0) + log(1 + exp(-|x|)) at x = m - (r_i - r_j) (finite for any
finite rewards; log(1 + e) instead of log1p, which Triton lacks, costs at most ~1e-7 absolute), the
loss is the mean over prompts with pairs of the mean over their pairs, and d/dr_i of a pair is
-sigmoid(x) = -exp(min(x, 0)) / (1 + exp(-|x|)) scaled by g / (pairs_p * ranked_prompts) (+ for the loser).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest K a program holds as a K x K tile in registers; larger K runs on the cpu/cuda backends.
MAX_K = 64
# Pair tile per program: BLOCK_P prompts x BLOCK_K x BLOCK_K, at most TILE elements.
TILE = 2048
MAX_BLOCK_P = 64
# Partials the one-program finalize kernel sums per loop step. 512: at 1024 triton 3.6 gives it a 32-byte stack
# frame on sm_90a (its five accumulators, three int64, in 96 registers; 3.9 does not), which
# `rlhf-fast inspect` rightly reports.
FINALIZE_BLOCK = 512


@triton.jit
def _prompt_pairs(rewards_ptr, num_ptr, ranks_ptr, margins_ptr, n_prompts, k, margin, pid,
                  HAS_NUM: tl.constexpr, HAS_RANKS: tl.constexpr, HAS_MARGINS: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """The prompts of program `pid`: offsets (BP, BK), candidates in use (BP, BK), ranked pairs
    beats[p, i, j] = i above j (BP, BK, BK), diff = r_i - r_j and x = m - diff (BP, BK, BK)."""
    p = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)           # (BP,)
    in_batch = p < n_prompts
    cand = tl.arange(0, BLOCK_K)                                      # (BK,)
    if HAS_NUM:
        n = tl.load(num_ptr + p, mask=in_batch, other=0)
    else:
        n = tl.where(in_batch, k, 0)
    in_use = cand[None, :] < n[:, None]                               # (BP, BK)
    offs = p[:, None] * k + cand[None, :]
    # Candidates past num_candidates are never read: padding may hold anything, NaN included.
    r = tl.load(rewards_ptr + offs, mask=in_use, other=0.0).to(tl.float32)
    if HAS_RANKS:
        key = tl.load(ranks_ptr + offs, mask=in_use, other=0)
    else:
        key = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.int64) + cand[None, :]
    m = tl.zeros((BLOCK_P,), dtype=tl.float32) + margin
    if HAS_MARGINS:
        m += tl.load(margins_ptr + p, mask=in_batch, other=0.0)
    beats = (key[:, :, None] < key[:, None, :]) & in_use[:, :, None] & in_use[:, None, :]
    diff = r[:, :, None] - r[:, None, :]
    x = m[:, None, None] - diff
    return offs, in_batch, cand, beats, diff, x


@triton.jit
def _ranking_loss_fwd_kernel(
    rewards_ptr,   # (P, K) fp32/bf16/fp16, contiguous
    num_ptr,       # (P,) int64 candidates in use; read only when HAS_NUM
    ranks_ptr,     # (P, K) int64 ranks (0 = best); read only when HAS_RANKS
    margins_ptr,   # (P,) fp32 per-prompt margins added to `margin`; read only when HAS_MARGINS
    part_f_ptr,    # (G, 2) fp32 out: per program (sum of prompt mean losses, sum of r_w - r_l)
    part_i_ptr,    # (G, 3) int64 out: per program (pairs, pairs with r_w > r_l, ranked prompts)
    n_prompts,
    k,
    margin,
    HAS_NUM: tl.constexpr, HAS_RANKS: tl.constexpr, HAS_MARGINS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    _, _, _, beats, diff, x = _prompt_pairs(rewards_ptr, num_ptr, ranks_ptr, margins_ptr, n_prompts, k, margin, pid,
                                            HAS_NUM, HAS_RANKS, HAS_MARGINS, BLOCK_P, BLOCK_K)
    softplus = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
    pair_loss = tl.where(beats, softplus, 0.0)
    pairs = tl.sum(tl.sum(beats.to(tl.int32), axis=2), axis=1)                    # (BP,)
    correct = tl.sum(tl.sum((beats & (diff > 0.0)).to(tl.int32), axis=2), axis=1)
    prompt_loss = tl.sum(tl.sum(pair_loss, axis=2), axis=1) / tl.maximum(pairs, 1).to(tl.float32)
    diff_sum = tl.sum(tl.sum(tl.where(beats, diff, 0.0), axis=2), axis=1)
    tl.store(part_f_ptr + pid * 2, tl.sum(prompt_loss, axis=0))  # prompts without pairs add 0
    tl.store(part_f_ptr + pid * 2 + 1, tl.sum(diff_sum, axis=0))
    tl.store(part_i_ptr + pid * 3, tl.sum(pairs, axis=0).to(tl.int64))
    tl.store(part_i_ptr + pid * 3 + 1, tl.sum(correct, axis=0).to(tl.int64))
    tl.store(part_i_ptr + pid * 3 + 2, tl.sum((pairs > 0).to(tl.int32), axis=0).to(tl.int64))


@triton.jit
def _ranking_loss_finalize_kernel(
    part_f_ptr,       # (G, 2) fp32 from the forward kernel
    part_i_ptr,       # (G, 3) int64 from the forward kernel
    loss_ptr,         # () fp32 out
    accuracy_ptr,     # () fp32 out
    mean_margin_ptr,  # () fp32 out
    counts_ptr,       # (2,) int64 out: (pairs, ranked prompts)
    n_parts,
    BLOCK: tl.constexpr,
):
    # One program; the sums go in program order, so the loss does not depend on scheduling.
    idx = tl.arange(0, BLOCK)
    loss = tl.zeros((BLOCK,), dtype=tl.float32)
    diff = tl.zeros((BLOCK,), dtype=tl.float32)
    pairs = tl.zeros((BLOCK,), dtype=tl.int64)
    correct = tl.zeros((BLOCK,), dtype=tl.int64)
    ranked = tl.zeros((BLOCK,), dtype=tl.int64)
    for g0 in range(0, n_parts, BLOCK):
        g = g0 + idx
        inside = g < n_parts
        loss += tl.load(part_f_ptr + g * 2, mask=inside, other=0.0)
        diff += tl.load(part_f_ptr + g * 2 + 1, mask=inside, other=0.0)
        pairs += tl.load(part_i_ptr + g * 3, mask=inside, other=0)
        correct += tl.load(part_i_ptr + g * 3 + 1, mask=inside, other=0)
        ranked += tl.load(part_i_ptr + g * 3 + 2, mask=inside, other=0)
    n_pairs = tl.sum(pairs, axis=0)
    n_ranked = tl.sum(ranked, axis=0)
    pairs_f = tl.maximum(n_pairs, 1).to(tl.float32)
    tl.store(loss_ptr, tl.sum(loss, axis=0) / tl.maximum(n_ranked, 1).to(tl.float32))
    tl.store(accuracy_ptr, tl.sum(correct, axis=0).to(tl.float32) / pairs_f)
    tl.store(mean_margin_ptr, tl.sum(diff, axis=0) / pairs_f)
    tl.store(counts_ptr, n_pairs)
    tl.store(counts_ptr + 1, n_ranked)


@triton.jit
def _ranking_loss_bwd_kernel(
    grad_rewards_ptr,  # (P, K) out, contiguous, dtype of rewards
    grad_loss_ptr,     # () fp32 upstream gradient
    counts_ptr,        # (2,) int64 from the forward: (pairs, ranked prompts)
    rewards_ptr,       # (P, K) as in the forward
    num_ptr, ranks_ptr, margins_ptr,
    n_prompts,
    k,
    margin,
    HAS_NUM: tl.constexpr, HAS_RANKS: tl.constexpr, HAS_MARGINS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs, in_batch, cand, beats, diff, x = _prompt_pairs(rewards_ptr, num_ptr, ranks_ptr, margins_ptr, n_prompts, k,
                                                         margin, pid, HAS_NUM, HAS_RANKS, HAS_MARGINS, BLOCK_P,
                                                         BLOCK_K)
    pairs = tl.sum(tl.sum(beats.to(tl.int32), axis=2), axis=1)                    # (BP,)
    ranked = tl.load(counts_ptr + 1)
    scale = tl.load(grad_loss_ptr) / (tl.maximum(ranked, 1).to(tl.float32) * tl.maximum(pairs, 1).to(tl.float32))
    sig = tl.exp(tl.minimum(x, 0.0)) / (1.0 + tl.exp(-tl.abs(x)))                # sigmoid(x), no overflow
    w = tl.where(beats, -sig, 0.0) * scale[:, None, None]                         # d/dr_i of pair (i, j)
    grad = tl.sum(w, axis=2) - tl.sum(w, axis=1)                                  # (BP, BK)
    store = in_batch[:, None] & (cand[None, :] < k)
    tl.store(grad_rewards_ptr + offs, grad.to(grad_rewards_ptr.dtype.element_ty), mask=store)


# ---------------------------------------------------------------------------------------------
# Launch configuration (shared by the launchers and aot_specs)
# ---------------------------------------------------------------------------------------------

def launch_config(k: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_K, num_warps): BLOCK_K = next_power_of_2(K) (>= 2); as many prompts per program
    as fit a TILE-element pair tile; 4 warps (8 past TILE) keep it at <= 16 pairs per thread."""
    block_k = max(triton.next_power_of_2(max(k, 1)), 2)
    block_p = max(1, min(MAX_BLOCK_P, TILE // (block_k * block_k)))
    tile = block_p * block_k * block_k
    return block_p, block_k, 4 if tile <= TILE else 8


def _common_args(rewards, num_candidates, ranks, margins, margin):
    n_prompts, k = rewards.shape
    block_p, block_k, num_warps = launch_config(k)
    # Unread placeholders fill the slots of absent optional tensors.
    args = dict(rewards_ptr=rewards, num_ptr=num_candidates if num_candidates is not None else rewards,
                ranks_ptr=ranks if ranks is not None else rewards,
                margins_ptr=margins if margins is not None else rewards, n_prompts=n_prompts, k=k,
                margin=float(margin))
    constexprs = dict(HAS_NUM=num_candidates is not None, HAS_RANKS=ranks is not None,
                      HAS_MARGINS=margins is not None, BLOCK_P=block_p, BLOCK_K=block_k)
    return args, constexprs, num_warps, (triton.cdiv(n_prompts, block_p),)


def _fwd_launch(rewards, num_candidates, ranks, margins, margin, part_f, part_i):
    args, constexprs, num_warps, grid = _common_args(rewards, num_candidates, ranks, margins, margin)
    args = dict(args, part_f_ptr=part_f, part_i_ptr=part_i)
    return args, constexprs, num_warps, grid


def _bwd_launch(grad_rewards, grad_loss, counts, rewards, num_candidates, ranks, margins, margin):
    args, constexprs, num_warps, grid = _common_args(rewards, num_candidates, ranks, margins, margin)
    args = dict(args, grad_rewards_ptr=grad_rewards, grad_loss_ptr=grad_loss, counts_ptr=counts)
    return args, constexprs, num_warps, grid


def _finalize_launch(part_f, part_i, loss, accuracy, mean_margin, counts):
    args = dict(part_f_ptr=part_f, part_i_ptr=part_i, loss_ptr=loss, accuracy_ptr=accuracy,
                mean_margin_ptr=mean_margin, counts_ptr=counts, n_parts=part_f.shape[0])
    return args, dict(BLOCK=FINALIZE_BLOCK), 4, (1,)


# ---------------------------------------------------------------------------------------------
# Launchers (called by rlhf_fast/ops/ranking_loss.py)
# ---------------------------------------------------------------------------------------------

def ranking_loss_fwd(rewards, num_candidates, ranks, margins, margin):
    """rewards (P, K) contiguous, K <= MAX_K; num_candidates (P,) int64, ranks (P, K) int64, margins (P,)
    fp32, each optional and already range-checked. Returns (loss, accuracy, mean_margin) 0-dim fp32 and
    counts (2,) int64 = (pairs, ranked prompts)."""
    assert rewards.dim() == 2 and rewards.is_contiguous() and rewards.shape[1] <= MAX_K
    dev = rewards.device
    loss, accuracy, mean_margin = (torch.zeros((), dtype=torch.float32, device=dev) for _ in range(3))
    counts = torch.zeros(2, dtype=torch.int64, device=dev)
    if rewards.numel() == 0:
        return loss, accuracy, mean_margin, counts
    _, constexprs, _, grid = _common_args(rewards, num_candidates, ranks, margins, margin)
    part_f = torch.empty((grid[0], 2), dtype=torch.float32, device=dev)
    part_i = torch.empty((grid[0], 3), dtype=torch.int64, device=dev)
    args, constexprs, num_warps, grid = _fwd_launch(rewards, num_candidates, ranks, margins, margin, part_f, part_i)
    _ranking_loss_fwd_kernel[grid](**args, **constexprs, num_warps=num_warps)
    args, constexprs, num_warps, grid = _finalize_launch(part_f, part_i, loss, accuracy, mean_margin, counts)
    _ranking_loss_finalize_kernel[grid](**args, **constexprs, num_warps=num_warps)
    return loss, accuracy, mean_margin, counts


def ranking_loss_bwd(grad_loss, rewards, num_candidates, ranks, margins, margin, counts):
    """Gradient w.r.t. rewards, (P, K) contiguous in rewards.dtype; grad_loss () fp32, counts from the
    forward."""
    grad = torch.empty_like(rewards)
    if rewards.numel() == 0:
        return grad
    args, constexprs, num_warps, grid = _bwd_launch(grad, grad_loss.float().contiguous(), counts, rewards,
                                                    num_candidates, ranks, margins, margin)
    _ranking_loss_bwd_kernel[grid](**args, **constexprs, num_warps=num_warps)
    return grad


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs (compiled and inspected by rlhf_fast.kernels._aot, no GPU needed)
# ---------------------------------------------------------------------------------------------

# K: pairwise (2), InstructGPT's 4..9 (9 -> BLOCK_K 16), and the largest the kernel takes.
AOT_KS = (2, 9, 64)
AOT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def aot_specs(ks=AOT_KS, dtypes=AOT_DTYPES, n_prompts: int = 1024):
    """Forward and backward for `ks` x `dtypes` (with ranks and num_candidates at K > 2, as the reward
    model uses them; plain at K = 2, as pairwise_loss does, with per-pair margins), plus the finalize
    kernel; built from the launchers' own argument builders on meta tensors."""
    from rlhf_fast.kernels._aot import SpecSet, spec_from_args

    meta = dict(device="meta")
    specs = SpecSet()
    add = specs.add

    for dtype in dtypes:
        for k in ks:
            rewards = torch.empty((n_prompts, k), dtype=dtype, **meta)
            pairwise = k == 2
            num = None if pairwise else torch.empty(n_prompts, dtype=torch.int64, **meta)
            ranks = None if pairwise else torch.empty((n_prompts, k), dtype=torch.int64, **meta)
            margins = torch.empty(n_prompts, dtype=torch.float32, **meta) if pairwise else None
            _, _, _, grid = _common_args(rewards, num, ranks, margins, 0.0)
            part_f = torch.empty((grid[0], 2), dtype=torch.float32, **meta)
            part_i = torch.empty((grid[0], 3), dtype=torch.int64, **meta)
            shape = f"{str(dtype).removeprefix('torch.')} P={n_prompts} K={k}"
            args, constexprs, warps, _ = _fwd_launch(rewards, num, ranks, margins, 0.0, part_f, part_i)
            add(spec_from_args("ranking_loss_fwd", _ranking_loss_fwd_kernel, args, constexprs, warps, 1), shape)
            scalar = torch.empty((), dtype=torch.float32, **meta)
            counts = torch.empty(2, dtype=torch.int64, **meta)
            args, constexprs, warps, _ = _bwd_launch(torch.empty_like(rewards), scalar, counts, rewards, num, ranks,
                                                     margins, 0.0)
            add(spec_from_args("ranking_loss_bwd", _ranking_loss_bwd_kernel, args, constexprs, warps, 1), shape)
    part_f = torch.empty((128, 2), dtype=torch.float32, **meta)
    part_i = torch.empty((128, 3), dtype=torch.int64, **meta)
    scalar = torch.empty((), dtype=torch.float32, **meta)
    args, constexprs, warps, _ = _finalize_launch(part_f, part_i, scalar, scalar, scalar,
                                                  torch.empty(2, dtype=torch.int64, **meta))
    add(spec_from_args("ranking_loss_finalize", _ranking_loss_finalize_kernel, args, constexprs, warps, 1), "G=128")
    return specs.specs()
