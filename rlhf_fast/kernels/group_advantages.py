"""Triton kernels of group_advantages: GRPO / Dr. GRPO / RLOO / REINFORCE++ advantages of (P, K) scores.

Cost model, P prompts of K answers, b-byte scores: the eager formula as trainers write it (view(-1, K),
mean, std, repeat_interleave, subtract, divide, masks) is ~10-15 launches each writing a (P, K) or (P,)
fp32 temporary; the per-sample Python loop of some trainers is ~4 launches per answer. Here the
group statistics are one launch that reads the scores (and the mask) once and writes the fp32
advantages once, a (BLOCK_P, BLOCK_K) tile of whole groups per program: b + 1 + 4 bytes per answer.
Batch scaling (GRPO's scale="batch", REINFORCE++ whitening) adds one launch that combines the
per-program partial statistics (count, mean, M2, min, max; Chan's formula, in a fixed order, so the
result is deterministic) and rescales the advantages, which the first kernel then leaves in float64:
8 + 8 + b + 1 read and 4 written per answer.

Statistics in float64: a sum of squares of fp32 scores near 1e38 does not overflow, so any finite
score gives finite statistics, and the cost is nothing at these sizes (the kernels are launch bound).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest K one program holds as a row of registers; larger groups run on the torch backend.
MAX_K = 4096
# Elements of the (BLOCK_P, BLOCK_K) tile of one program of the statistics kernel.
TILE = 2048
MAX_BLOCK_P = 64
SCALE_BLOCK = 1024   # answers rescaled per program of the batch kernel
PARTS_BLOCK = 256    # partial statistics combined per step of the batch kernel
MODE_CODES = {"grpo": 0, "dr_grpo": 1, "rloo": 2, "reinforce_pp": 3, "reinforce_pp_baseline": 4}
N_PARTIAL = 5        # count, mean, M2, min, max


@triton.jit
def _valid_scores(scores_ptr, mask_ptr, offs, in_bounds, HAS_MASK: tl.constexpr):
    """(scores as float64 with 0 where invalid, valid): valid = in bounds, finite and mask != 0."""
    s = tl.load(scores_ptr + offs, mask=in_bounds, other=0.0).to(tl.float64)
    valid = in_bounds & ((s - s) == 0.0)  # NaN and +-inf give NaN: dropped like a masked answer
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + offs, mask=in_bounds, other=0) != 0)
    return tl.where(valid, s, 0.0), valid


@triton.jit
def _group_advantages_fwd_kernel(
    scores_ptr,   # (P, K) any float dtype, contiguous
    mask_ptr,     # (P, K) uint8 (1 = valid), contiguous; unused without HAS_MASK
    out_ptr,      # (P, K) fp32 advantages; float64 when batch scaling follows (the input of the next kernel)
    part_ptr,     # (programs, 5) fp64: count, mean, M2, min, max of the batch statistic; unused if PARTIAL == 0
    n_prompts, k, eps,
    MODE: tl.constexpr, SCALE_GROUP: tl.constexpr, PARTIAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)                         # (BP,)
    cand = tl.arange(0, BLOCK_K)                                      # (BK,)
    in_bounds = (p[:, None] < n_prompts) & (cand[None, :] < k)        # (BP, BK)
    offs = p[:, None] * k + cand[None, :]                             # int64: no 2^31 limit on P * K
    r, valid = _valid_scores(scores_ptr, mask_ptr, offs, in_bounds, HAS_MASK)

    # Two-pass group statistics: mean, then the centred sum of squares (no cancellation).
    n = tl.sum(valid.to(tl.float64), axis=1)                          # (BP,)
    mean = tl.sum(r, axis=1) / tl.maximum(n, 1.0)
    dev = tl.where(valid, r - mean[:, None], 0.0)
    std = tl.sqrt(tl.sum(dev * dev, axis=1) / tl.maximum(n - 1.0, 1.0))
    hi = tl.max(tl.where(valid, r, float("-inf")), axis=1)
    lo = tl.min(tl.where(valid, r, float("inf")), axis=1)
    # fewer than two valid answers, or all equal: no signal, advantage exactly 0 (never rounding noise / eps)
    constant = (n < 2.0) | (hi == lo)

    if MODE == 2:    # rloo: r - mean of the other n - 1 answers = n / (n - 1) * (r - mean)
        c = dev * (n / tl.maximum(n - 1.0, 1.0))[:, None]
    elif MODE == 3:  # reinforce_pp: no group baseline, whitened over the batch by the second kernel
        c = r
    else:            # grpo, dr_grpo, reinforce_pp_baseline
        c = dev
    if MODE != 3:
        c = tl.where(constant[:, None], 0.0, c)
    c = tl.where(valid, c, 0.0)
    if SCALE_GROUP:  # a zero divisor (eps = 0) only meets constant groups, whose c is 0: never 0 / 0
        c = c / tl.where(std + eps > 0.0, std + eps, 1.0)[:, None]
    tl.store(out_ptr + offs, c.to(out_ptr.dtype.element_ty), mask=in_bounds)

    if PARTIAL != 0:  # 1: batch statistics of the raw scores (GRPO scale="batch"); 2: of the advantages
        x = r if PARTIAL == 1 else c
        nb = tl.sum(tl.sum(valid.to(tl.float64), axis=1), axis=0)
        mb = tl.sum(tl.sum(x, axis=1), axis=0) / tl.maximum(nb, 1.0)
        d = tl.where(valid, x - mb, 0.0)
        m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
        xmin = tl.min(tl.min(tl.where(valid, x, float("inf")), axis=1), axis=0)
        xmax = tl.max(tl.max(tl.where(valid, x, float("-inf")), axis=1), axis=0)
        base = part_ptr + pid * 5
        tl.store(base + 0, nb)
        tl.store(base + 1, mb)
        tl.store(base + 2, m2)
        tl.store(base + 3, xmin)
        tl.store(base + 4, xmax)


@triton.jit
def _group_advantages_batch_kernel(
    scores_ptr,   # (N,) any float dtype: validity only
    mask_ptr,     # (N,) uint8; unused without HAS_MASK
    c_ptr,        # (N,) fp64 advantages before batch scaling, from the first kernel
    out_ptr,      # (N,) fp32 advantages
    part_ptr,     # (n_parts, 5) fp64 partial statistics of the first kernel
    numel, n_parts, eps,
    CENTER: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, PARTS: tl.constexpr,
):
    # Every program combines all partials in the same order (Chan et al.), so all agree bit for bit.
    total = tl.zeros((), dtype=tl.float64)
    mean = tl.zeros((), dtype=tl.float64)
    m2 = tl.zeros((), dtype=tl.float64)
    lo = tl.full((), float("inf"), tl.float64)
    hi = tl.full((), float("-inf"), tl.float64)
    for start in range(0, n_parts, PARTS):
        j = start + tl.arange(0, PARTS).to(tl.int64)
        there = j < n_parts
        nb = tl.load(part_ptr + j * 5 + 0, mask=there, other=0.0)
        mb = tl.load(part_ptr + j * 5 + 1, mask=there, other=0.0)
        m2b = tl.load(part_ptr + j * 5 + 2, mask=there, other=0.0)
        cn = tl.sum(nb, axis=0)
        cmean = tl.sum(nb * mb, axis=0) / tl.maximum(cn, 1.0)
        cm2 = tl.sum(m2b + nb * (mb - cmean) * (mb - cmean), axis=0)
        both = total + cn
        delta = cmean - mean
        mean = mean + delta * cn / tl.maximum(both, 1.0)
        m2 = m2 + cm2 + delta * delta * total * cn / tl.maximum(both, 1.0)
        total = both
        lo = tl.minimum(lo, tl.min(tl.load(part_ptr + j * 5 + 3, mask=there, other=float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.load(part_ptr + j * 5 + 4, mask=there, other=float("-inf")), axis=0))
    std = tl.where(total >= 2.0, tl.sqrt(m2 / tl.maximum(total - 1.0, 1.0)), 0.0)
    constant = (total < 2.0) | (hi == lo)
    denom = tl.where(std + eps > 0.0, std + eps, 1.0)  # 0 only with eps = 0 on a constant batch

    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < numel
    _, valid = _valid_scores(scores_ptr, mask_ptr, offs, in_bounds, HAS_MASK)
    c = tl.load(c_ptr + offs, mask=in_bounds, other=0.0)
    if CENTER:  # whitening: a batch whose values are all equal whitens to 0
        y = tl.where(constant, 0.0, (c - mean) / denom)
    else:
        y = c / denom
    tl.store(out_ptr + offs, tl.where(valid, y, 0.0).to(tl.float32), mask=in_bounds)


def _block_p(n_prompts: int, k: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_K): whole groups per program, a tile of at most TILE elements (K up to MAX_K)."""
    block_k = triton.next_power_of_2(max(k, 1))
    return max(1, min(MAX_BLOCK_P, TILE // block_k, triton.next_power_of_2(max(n_prompts, 1)))), block_k


def _partial_kind(mode: str, scale: str) -> int:
    """0: no batch scaling; 1: batch statistics of the raw scores (GRPO); 2: of the advantages (whitening)."""
    return 0 if scale != "batch" else (1 if mode == "grpo" else 2)


def _fwd_launch(scores, mask_u8, out, parts, has_mask: bool, mode: str, scale: str, eps: float):
    """(arguments, constexprs, num_warps, grid) of the statistics kernel."""
    n_prompts, k = scores.shape
    block_p, block_k = _block_p(n_prompts, k)
    args = dict(scores_ptr=scores, mask_ptr=mask_u8, out_ptr=out, part_ptr=parts, n_prompts=n_prompts, k=k,
                eps=eps)
    constexprs = dict(MODE=MODE_CODES[mode], SCALE_GROUP=scale == "group", PARTIAL=_partial_kind(mode, scale),
                      HAS_MASK=has_mask, BLOCK_P=block_p, BLOCK_K=block_k)
    # 4 warps hold a 2048-element tile in float64 without spilling; the longest groups get 8
    warps = 8 if block_p * block_k > TILE else 4
    return args, constexprs, warps, (triton.cdiv(n_prompts, block_p),)


def _batch_launch(scores, mask_u8, c, out, parts, n_parts: int, has_mask: bool, center: bool, eps: float):
    """(arguments, constexprs, num_warps, grid) of the batch-scaling kernel."""
    numel = out.numel()
    args = dict(scores_ptr=scores, mask_ptr=mask_u8, c_ptr=c, out_ptr=out, part_ptr=parts, numel=numel,
                n_parts=n_parts, eps=eps)
    constexprs = dict(CENTER=center, HAS_MASK=has_mask, BLOCK=SCALE_BLOCK, PARTS=PARTS_BLOCK)
    return args, constexprs, 4, (triton.cdiv(numel, SCALE_BLOCK),)


def group_advantages_fwd(scores: torch.Tensor, mask: torch.Tensor | None, mode: str, scale: str,
                         eps: float) -> torch.Tensor:
    """scores (P, K) contiguous, mask (P, K) bool contiguous or None -> advantages (P, K) fp32."""
    n_prompts, k = scores.shape
    out = torch.empty((n_prompts, k), dtype=torch.float32, device=scores.device)
    if out.numel() == 0:
        return out
    programs = triton.cdiv(n_prompts, _block_p(n_prompts, k)[0])
    partial = _partial_kind(mode, scale)
    parts = torch.empty((programs if partial else 1, N_PARTIAL), dtype=torch.float64, device=scores.device)
    mask_u8 = mask.view(torch.uint8) if mask is not None else scores  # a dummy pointer without a mask
    # Before batch scaling the advantages stay float64: r - m_g of scores near 1e38 exceeds fp32's range
    # although the scaled result does not.
    c = torch.empty((n_prompts, k), dtype=torch.float64, device=scores.device) if partial else out
    args, constexprs, warps, grid = _fwd_launch(scores, mask_u8, c, parts, mask is not None, mode, scale, eps)
    _group_advantages_fwd_kernel[grid](**args, **constexprs, num_warps=warps)
    if partial:
        args, constexprs, warps, grid = _batch_launch(scores.view(-1), mask_u8.view(-1), c.view(-1), out.view(-1),
                                                      parts, programs, mask is not None, partial == 2, eps)
        _group_advantages_batch_kernel[grid](**args, **constexprs, num_warps=warps)
    return out


# (dtype, P, K): a GRPO size (one tile = many groups) and the longest groups (one group per program)
AOT_CASES = ((torch.float32, 4096, 8), (torch.float32, 64, MAX_K))
# (mode, scale, mask): the group-scaled path and the whitening path (with the batch kernel); the other
# modes differ from these by a few element-wise operations. Kept small: the suite compiles every spec.
AOT_CONFIGS = (("grpo", "group", True), ("reinforce_pp", "batch", True))


def aot_specs(cases=AOT_CASES, configs=AOT_CONFIGS):
    """The launcher's configurations for `cases` x `configs`, and the batch-scaling kernel with and without
    centering; built from the launcher's own argument builders on meta tensors."""
    from rlhf_fast.kernels._aot import SpecSet, spec_from_args

    meta = dict(device="meta")
    specs = SpecSet()
    for dtype, n_prompts, k in cases:
        scores = torch.empty((n_prompts, k), dtype=dtype, **meta)
        mask = torch.empty((n_prompts, k), dtype=torch.uint8, **meta)
        out = torch.empty((n_prompts, k), dtype=torch.float32, **meta)
        c64 = torch.empty((n_prompts, k), dtype=torch.float64, **meta)
        parts = torch.empty((n_prompts, N_PARTIAL), dtype=torch.float64, **meta)
        shape = f"{str(dtype).removeprefix('torch.')} P={n_prompts} K={k}"
        for mode, scale, has_mask in configs:
            c = c64 if scale == "batch" else out
            args, constexprs, warps, _ = _fwd_launch(scores, mask, c, parts, has_mask, mode, scale, 1e-4)
            specs.add(spec_from_args(f"group_advantages_fwd[{mode},{scale}]", _group_advantages_fwd_kernel, args,
                                     constexprs, warps, 1), shape)
        for center in (False, True):
            args, constexprs, warps, _ = _batch_launch(scores.view(-1), mask.view(-1), c64.view(-1), out.view(-1),
                                                       parts, n_prompts, True, center, 1e-4)
            specs.add(spec_from_args("group_advantages_batch" + ("+center" if center else ""),
                                     _group_advantages_batch_kernel, args, constexprs, warps, 1), shape)
    return specs.specs()
