"""Triton kernels of gather_logprobs: log softmax(logits / T)[label] per row, and the entropy.

Cost model, logits (N, V) in a dtype of b bytes (2 for bf16/fp16, 4 for fp32), per element of the
logits (the per-row numbers are noise next to V = 32k..256k):

  eager PyTorch, forward   x.float() / T -> log_softmax -> gather; + exp, p * logp, sum for the entropy
                           reads b + 4 + 4 (+ 12), writes 4 + 4 (+ 8)  ->  ~16 + b bytes, ~36 + b with entropy
  eager PyTorch, backward  scatter of the label grad into zeros, softmax-gradient, cast back
                           ~5 more (N, V) fp32 reads/writes  ->  ~20 + b bytes, more with entropy
  fused, forward           reads the logits once (online logsumexp, entropy folded into the same pass)
                           and writes three fp32 numbers per row  ->  b bytes
  fused, backward          reads the logits once more, writes the gradient once in their dtype
                           ->  2b bytes; rows whose label is ignore_index (the prompt tokens of an
                           RLHF batch) skip the read: b bytes

For bf16 logits that is ~2 + 4 bytes per element instead of ~40, and no (N, V) fp32 tensor is ever
allocated: the backward recomputes p_j = exp(z_j - lse) from the logits and the saved lse (and
entropy). Both kernels are memory-bound; there is one exp per element per pass (MUFU throughput is
about twice the bf16 element rate of HBM3 on H100), so the fp32 math is free.

The row math and the defined values follow csrc/include/rlhf_fast/gather_logprobs_math.h, the
header shared by the CPU and CUDA kernels; see that file for the derivation. With z = x / T:

  lse      = log sum_j exp(z_j)                        (-inf for a row of all -inf logits)
  logprob  = z_y - lse                                 (0 at ignore_index, -inf for an all -inf row)
  entropy  = log s - t / s, clamped >= 0               (0 at ignore_index and for an all -inf row)
             with s = sum exp(z - m), t = sum exp(z - m) * (z - m), m the running max
  dL/dx_j  = (g_lp * ([j == y] - p_j) - g_H * p_j * (log p_j + entropy)) / T
             (zero for ignored rows and all -inf rows)

Elements at -inf carry no mass: log p is clamped at MIN_LOG = -FLT_MAX, so exp(MIN_LOG) == 0 and
0 * MIN_LOG == 0 (never 0 * -inf = NaN), exactly as in the header.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Floor for log-probabilities (kMinLog of the header): -FLT_MAX.
MIN_LOG: tl.constexpr = tl.constexpr(-3.4028234663852886e38)

# Tuning. Forward: one program per row walks the row in blocks of FWD_MAX_BLOCK; 4096 elements on
# 8 warps is 16 elements per thread (two 128-bit loads of bf16, four of fp32) in flight per step, at
# 48-64 registers (rlhf-fast inspect), so several rows share an SM. Backward: one
# program per (row, vocab block); the work is element-wise, so the same block/warp shape keeps the
# loads 128-bit and the grid large.
FWD_MAX_BLOCK = 4096
BWD_MAX_BLOCK = 4096
# Elements per thread we aim for: 16 keeps every thread issuing 128-bit loads (8 x bf16 = 16 bytes)
# with two or more in flight, while staying well clear of register spills.
ELEMS_PER_THREAD = 16
MAX_NUM_WARPS = 8
# Grid axis 1 (vocab blocks of the backward) is limited by CUDA to 65535.
MAX_GRID_Y = 65535


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _gather_logprobs_fwd_kernel(
    logits_ptr,    # (N, V) fp32/bf16/fp16, row i at logits_ptr + i * stride_row, unit stride along V
    labels_ptr,    # (N,) int64, each in [0, V) or == ignore_index
    logprobs_ptr,  # (N,) fp32, out
    entropy_ptr,   # (N,) fp32, out; only touched when RETURN_ENTROPY
    lse_ptr,       # (N,) fp32, out: logsumexp(logits / T) of each row
    stride_row,    # elements between the starts of consecutive rows (any value >= V)
    n_cols,        # V
    inv_temp,      # 1 / T
    ignore_index,
    RETURN_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # int64 row offset: row * stride_row passes 2^31 long before N does.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)

    # Running max of the row (scalar), and lane-wise running sums relative to it: s = sum exp(z - m),
    # t = sum exp(z - m) * (z - m). Lane-wise sums cost no reduction inside the loop: only the block
    # max is reduced per step; s and t are summed across lanes once, at the end.
    m = tl.full((), float("-inf"), tl.float32)
    s_acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    t_acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        # Lanes past V read -inf: they then carry exactly no mass, like -inf logits.
        z = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # Reference point of the exponentials: the running max, or 0 while the row has shown nothing
        # finite, so that z - ref is never -inf - (-inf).
        ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        # Online softmax: move the sums from the old max to the new one. shift <= 0; clamping it at
        # MIN_LOG makes an empty history (m == -inf, sums 0) rescale by exp(-FLT_MAX) == 0 with
        # 0 * shift == 0 instead of 0 * -inf. When the max does not move, alpha == 1 exactly.
        shift = tl.maximum(m - ref, MIN_LOG)
        alpha = tl.exp(shift)
        d = z - ref  # <= 0; -inf for masked lanes and -inf logits
        e = tl.exp(d)
        if RETURN_ENTROPY:
            # t relative to the new max: sum e' (d' + shift) rescaled; e * max(d, MIN_LOG) is 0 at -inf
            t_acc = alpha * (t_acc + s_acc * shift) + e * tl.maximum(d, MIN_LOG)
        s_acc = alpha * s_acc + e
        m = m_new

    s = tl.sum(s_acc, axis=0)
    has_mass = s > 0.0  # false only for a row of all -inf logits (then m == -inf)
    s_safe = tl.where(has_mass, s, 1.0)
    # 0 for an all -inf row instead of -inf, so that no -inf - (-inf) is ever formed below
    lse_safe = tl.where(has_mass, m, 0.0) + tl.log(s_safe)
    tl.store(lse_ptr + row, tl.where(has_mass, lse_safe, float("-inf")))

    label = tl.load(labels_ptr + row)
    keep = label != ignore_index
    # One scalar read of the label's logit (the row was just streamed, so it is an L2 hit).
    z_label = tl.load(row_ptr + tl.where(keep, label, 0), mask=keep, other=0.0).to(tl.float32) * inv_temp
    logprob = tl.where(has_mass, z_label - lse_safe, float("-inf"))
    tl.store(logprobs_ptr + row, tl.where(keep, logprob, 0.0))

    if RETURN_ENTROPY:
        t = tl.sum(t_acc, axis=0)
        entropy = tl.maximum(tl.log(s_safe) - t / s_safe, 0.0)  # clamp fp32 rounding below zero
        tl.store(entropy_ptr + row, tl.where(keep & has_mass, entropy, 0.0))


@triton.jit
def _gather_logprobs_bwd_kernel(
    grad_logits_ptr,    # (N, V) out, contiguous, dtype of the logits
    grad_logprobs_ptr,  # (N,) fp32, upstream gradient of the log-probs
    grad_entropy_ptr,   # (N,) fp32, upstream gradient of the entropy; only read when HAS_GRAD_ENTROPY
    logits_ptr,         # (N, V) fp32/bf16/fp16, row i at logits_ptr + i * stride_row, unit stride along V
    labels_ptr,         # (N,) int64
    lse_ptr,            # (N,) fp32, saved by the forward
    entropy_ptr,        # (N,) fp32, saved by the forward; only read when HAS_GRAD_ENTROPY
    stride_row,         # elements between the starts of consecutive rows of the logits
    n_cols,             # V
    inv_temp,           # 1 / T
    ignore_index,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * V passes 2^31 long before N does
    # Column offsets stay int32: they are < V, and V / BLOCK_V <= 65535 (the grid's axis-1 limit).
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < n_cols

    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    has_grad = (label != ignore_index) & (lse > float("-inf"))
    # Rows without a gradient (ignored label, or all -inf logits) never read their logits: a load
    # predicated off moves no bytes. They load -inf, and with lse := 0 and zeroed upstream gradients
    # every term below is exactly 0, so their zeros are written without a branch. (The read limit is
    # a select on the scalar rather than `mask & has_grad`: same predicate, and the Triton
    # interpreter mishandles a scalar i1 broadcast into a block mask.)
    n_read = tl.where(has_grad, n_cols, 0)
    x = tl.load(logits_ptr + row * stride_row + offs, mask=offs < n_read, other=float("-inf"))
    z = x.to(tl.float32) * inv_temp
    lse = tl.where(has_grad, lse, 0.0)
    g_lp = tl.where(has_grad, tl.load(grad_logprobs_ptr + row), 0.0)

    log_p = tl.maximum(z - lse, MIN_LOG)  # clamped: p == 0 and p * log_p == 0 at -inf logits
    p = tl.exp(log_p)
    g = -g_lp * p
    if HAS_GRAD_ENTROPY:
        g_ent = tl.where(has_grad, tl.load(grad_entropy_ptr + row), 0.0)
        entropy = tl.load(entropy_ptr + row)
        g -= g_ent * p * (log_p + entropy)
    # The label's own term, added in fp32 before the single rounding to the output dtype. An int32
    # compare: a kept label is < V; an ignored one may truncate to anything, but then g_lp == 0.
    g += tl.where(offs == label.to(tl.int32), g_lp, 0.0)
    out = grad_logits_ptr + row * n_cols + offs
    tl.store(out, (g * inv_temp).to(grad_logits_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration: one helper for the launchers and for aot_specs(), so the configurations
# compiled ahead of time are the ones that run.
# ---------------------------------------------------------------------------------------------

def launch_config(n_cols: int, max_block: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of `n_cols` elements.

    BLOCK_V is next_power_of_2(V) capped at `max_block`: a short row is one masked block, a long row
    is walked (forward) or split over programs (backward) in blocks of max_block. num_warps gives each
    thread ELEMS_PER_THREAD elements (one warp below 512 elements, 8 warps at 4096): enough bytes per
    thread for 128-bit loads with several in flight, without spreading a small block over idle warps.
    """
    block = min(triton.next_power_of_2(max(n_cols, 1)), max_block)
    num_warps = min(max(block // (32 * ELEMS_PER_THREAD), 1), MAX_NUM_WARPS)
    return block, num_warps


# num_stages: Triton software-pipelines loads that feed tl.dot; this forward loop (a load feeding a
# reduction) compiles to the same SASS with 1, 2 or 3 stages (checked with rlhf-fast inspect), and the
# backward has no loop. Latency is hidden by occupancy instead: at <= 64 registers, four 8-warp
# programs fit an SM, i.e. 32 KB (bf16) to 64 KB (fp32) of loads in flight per SM per step, above the
# ~18 KB that H100's bandwidth-latency product asks for.
NUM_STAGES = 1


def _fwd_launch(logits, labels, logprobs, entropy, lse, temperature, ignore_index, return_entropy):
    """Keyword arguments, constexprs, num_warps and grid of the forward kernel."""
    n_rows, n_cols = logits.shape
    block, num_warps = launch_config(n_cols, FWD_MAX_BLOCK)
    args = dict(logits_ptr=logits, labels_ptr=labels, logprobs_ptr=logprobs,
                # without entropy the kernel never touches entropy_ptr: any fp32 tensor fills the slot
                entropy_ptr=entropy if entropy is not None else lse, lse_ptr=lse,
                stride_row=logits.stride(0), n_cols=n_cols, inv_temp=1.0 / temperature,
                ignore_index=ignore_index)
    constexprs = dict(RETURN_ENTROPY=bool(return_entropy), BLOCK_V=block)
    return args, constexprs, num_warps, (n_rows,)


def _bwd_launch(grad_logits, grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature,
                ignore_index):
    """Keyword arguments, constexprs, num_warps and grid of the backward kernel."""
    n_rows, n_cols = logits.shape
    block, num_warps = launch_config(n_cols, BWD_MAX_BLOCK)
    with_entropy = grad_entropy is not None
    args = dict(grad_logits_ptr=grad_logits, grad_logprobs_ptr=grad_logprobs,
                grad_entropy_ptr=grad_entropy if with_entropy else grad_logprobs,  # unread placeholders
                logits_ptr=logits, labels_ptr=labels, lse_ptr=lse,
                entropy_ptr=entropy if with_entropy else lse,
                stride_row=logits.stride(0), n_cols=n_cols, inv_temp=1.0 / temperature,
                ignore_index=ignore_index)
    constexprs = dict(HAS_GRAD_ENTROPY=with_entropy, BLOCK_V=block)
    return args, constexprs, num_warps, (n_rows, triton.cdiv(n_cols, block))


# ---------------------------------------------------------------------------------------------
# Launchers (called by rlhf_fast/ops/gather_logprobs.py)
# ---------------------------------------------------------------------------------------------

def gather_logprobs_fwd(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
                        return_entropy: bool):
    """Forward: logits (N, V) fp32/bf16/fp16 with unit stride along V (any row stride), labels (N,)
    int64 already range-checked. Returns fp32 (logprobs (N,), entropy (N,) or None, lse (N,))."""
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits must be (N, V) with unit stride along V"
    assert labels.dtype == torch.int64 and labels.shape == logits.shape[:1]
    n_rows = logits.shape[0]
    labels = labels.contiguous()
    logprobs = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logprobs)
    entropy = torch.empty_like(logprobs) if return_entropy else None
    if n_rows == 0:
        return logprobs, entropy, lse
    args, constexprs, num_warps, grid = _fwd_launch(logits, labels, logprobs, entropy, lse, temperature,
                                                    ignore_index, return_entropy)
    _gather_logprobs_fwd_kernel[grid](**args, **constexprs, num_warps=num_warps, num_stages=NUM_STAGES)
    return logprobs, entropy, lse


def gather_logprobs_bwd(grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None, logits: torch.Tensor,
                        labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor, temperature: float,
                        ignore_index: int) -> torch.Tensor:
    """Backward: gradient w.r.t. logits, (N, V) contiguous in logits.dtype. grad_logprobs (N,) fp32;
    grad_entropy (N,) fp32 or None (then the entropy term is compiled out and `entropy` is unread)."""
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits must be (N, V) with unit stride along V"
    n_rows, n_cols = logits.shape
    grad_logits = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return grad_logits
    grad_logprobs = grad_logprobs.float().contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.float().contiguous()
        entropy = entropy.float().contiguous()
    args, constexprs, num_warps, grid = _bwd_launch(grad_logits, grad_logprobs, grad_entropy, logits,
                                                    labels.contiguous(), lse.contiguous(), entropy,
                                                    temperature, ignore_index)
    if grid[1] > MAX_GRID_Y:
        raise ValueError(f"logits: vocabulary of {n_cols} needs {grid[1]} blocks of {constexprs['BLOCK_V']}, "
                         f"more than the grid allows ({MAX_GRID_Y})")
    _gather_logprobs_bwd_kernel[grid](**args, **constexprs, num_warps=num_warps, num_stages=NUM_STAGES)
    return grad_logits


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs (compiled and inspected by rlhf_fast.kernels._aot, no GPU needed)
# ---------------------------------------------------------------------------------------------

# Vocabularies of common model families: Llama-2/Mistral 32000, GPT-2 50257 (odd: rows are not
# 16-byte aligned, so no 128-bit loads), Llama-3 128256, Gemma 262144.
AOT_VOCABS = (32000, 50257, 128256, 262144)
AOT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def aot_specs(vocabs=AOT_VOCABS, dtypes=AOT_DTYPES, n_rows: int = 2):
    """The distinct kernel configurations the launchers use for `vocabs` x `dtypes`, forward with and
    without entropy, backward with and without the entropy gradient.

    Built by calling the launchers' own argument builders on meta tensors and specializing the
    arguments the way triton.jit does at launch (i32/i64, 16-divisibility), so they cannot drift
    from what runs. Shapes that give the same compiled kernel are merged into one spec.
    """
    from rlhf_fast.kernels._aot import SpecSet, spec_from_args

    meta = dict(device="meta")
    specs = SpecSet()
    for dtype in dtypes:
        for vocab in vocabs:
            logits = torch.empty((n_rows, vocab), dtype=dtype, **meta)
            labels = torch.empty((n_rows,), dtype=torch.int64, **meta)
            vec = torch.empty((n_rows,), dtype=torch.float32, **meta)
            launches = []
            for ent in (False, True):
                args, constexprs, warps, _ = _fwd_launch(logits, labels, vec, vec if ent else None, vec, 1.0,
                                                         -100, ent)
                launches.append((_gather_logprobs_fwd_kernel, "fwd" + ("+entropy" if ent else ""),
                                 args, constexprs, warps))
                args, constexprs, warps, _ = _bwd_launch(torch.empty_like(logits), vec, vec if ent else None,
                                                         logits, labels, vec, vec, 1.0, -100)
                launches.append((_gather_logprobs_bwd_kernel, "bwd" + ("+entropy" if ent else ""),
                                 args, constexprs, warps))
            for fn, kind, args, constexprs, warps in launches:
                spec = spec_from_args(f"gather_logprobs_{kind}", fn, args, constexprs, warps, NUM_STAGES)
                specs.add(spec, f"V={vocab}", new_shape=f"{str(dtype).removeprefix('torch.')} V={vocab}")
    return specs.specs()
